"""The memory benchmark's process-tree accounting (no timing: only which processes and sizes it sees)."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.bench import _tree_memory_bytes


def test_tree_memory_counts_children_and_names_them():
    # a child holding ~64 MB of touched heap
    code = ("import sys, time; b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            "print('ok', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ok"
        per: dict[str, int] = {}
        pss, rss = _tree_memory_bytes(os.getpid(), per)
        alone, _ = _tree_memory_bytes(child.pid)
        assert rss >= pss > alone >= 60 * 2**20
        names = [k for k in per if k.startswith(f"{child.pid} ")]
        assert len(names) == 1 and "-c import sys" in names[0]  # its command line, cut to 60 chars
        assert per[names[0]] == alone or abs(per[names[0]] - alone) < 4 * 2**20  # sampled twice, same process
        assert f"{os.getpid()} " in " ".join(per)  # the root itself is counted
        assert sum(per.values()) == pss
    finally:
        child.kill()
        child.wait()
