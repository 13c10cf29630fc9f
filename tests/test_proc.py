"""``RayProcesses.reap``: everything started below a command is stopped, also a process that appears while the
reaping goes on (a raylet still starting its agents when a start is cut short), re-parented to the command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

# A parent that, when told to stop, starts a child and exits: the child is orphaned while the reaping runs.
PARENT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    def stop(*_):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(sys.argv[1], "w") as f:
            f.write(str(child.pid))
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(600)
""")

COMMAND = textwrap.dedent("""
    import json, subprocess, sys
    from ray_vlm.core._proc import RayProcesses
    procs = RayProcesses()
    parent = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    print(json.dumps(procs.reap(timeout_s=0.2)))
""")


def _alive(pid: int) -> bool:
    import ray  # noqa: F401  (puts the psutil bundled with Ray on sys.path)

    # isort: split
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_reap_stops_a_process_started_while_reaping(tmp_path):
    pid_file = tmp_path / "late.pid"
    with open(tmp_path / "err", "w") as err:  # a file, not a pipe: a process left behind would hold a pipe open
        run = subprocess.run([sys.executable, "-c", COMMAND, PARENT, str(pid_file)], stdout=subprocess.DEVNULL,
                             stderr=err, timeout=120, start_new_session=True)
    assert run.returncode == 0, (tmp_path / "err").read_text()
    assert pid_file.exists(), "the parent was not asked to stop"
    late = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 10
        while _alive(late) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(late), "the process started during the reaping was left running"
    finally:
        if _alive(late):
            os.kill(late, 9)
