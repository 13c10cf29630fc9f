"""``ray-vlm serve`` and ``ray-vlm index`` as a service manager runs them: started as subprocesses in their own
session, stopped with SIGTERM. They exit 0, leave no process of the session behind, keep the store consistent (a
rerun completes), print no crash banner, and by default print none of Ray's own log lines.

Every wait is on a condition (a line on stdout, a committed manifest, the process's exit) with a generous limit,
never on a fixed sleep; every process of a started session is killed at teardown, so a failure leaks nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import videos as V
from fixtures.stores import read_committed, store_version
from ray_vlm.core import schema as S

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Lines only Ray prints (its C++ log lines, its Python loggers, its driver messages): none may reach the console
# of a default (quiet) run.
RAY_LINES = re.compile(
    r"core_worker\.cc|\(raylet\)|INFO worker\.py|Started a local Ray instance|Registered dataset logger|"
    r"Executing DAG|\(MapWorker|\(pid=|streaming_executor|Token authentication is enabled|"
    r"INFO .* serve \d+ --|Started Serve|SIGTERM received|PC: @"
)
CRASH_BANNER = re.compile(r"\*\*\* SIGTERM received|PC: @")


def _psutil():
    import ray  # noqa: F401  (puts the psutil bundled with Ray on sys.path)

    # isort: split
    import psutil

    return psutil


def _session_procs(sid: int) -> list:
    """Live processes of session ``sid`` (zombies excluded): the command and everything it started."""
    psutil = _psutil()
    out = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def _kill_session(sid: int) -> None:
    psutil = _psutil()
    for p in _session_procs(sid):
        try:
            p.kill()
        except psutil.Error:
            pass


def _assert_nothing_left(sid: int, within_s: float = 30.0) -> None:
    """No process of the session is alive (allowing ``within_s`` for ones already exiting to be reaped)."""
    deadline = time.monotonic() + within_s
    while True:
        left = _session_procs(sid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except Exception:
            names.append(str(p.pid))
    assert not left, "processes left behind: " + "; ".join(names)


def _start(args: list[str], tmp_path: Path, name: str, env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """``python -m ray_vlm.cli ARGS`` in its own session, stdout and stderr to files (nothing blocks on a pipe)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_VLM_TOKEN")}
    full_env.update({"PYTHONUNBUFFERED": "1", "RAY_VLM_LOG_DIR": str(tmp_path / "logs"), **(env or {})})
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "ray_vlm.cli", *args], stdout=fo, stderr=fe, env=full_env,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, out, err


def _wait_for(cond, proc: subprocess.Popen, err: Path, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s: {err.read_text()[-3000:]}"
        time.sleep(0.2)


def _committed(store: Path) -> tuple[list[dict], list[tuple]]:
    """(videos rows, visible frame keys) of the latest version, read with Lance (not through the store's code)."""
    videos, frames = read_committed(store)
    return videos, [(f[S.VIDEO_ID], f[S.FRAME_INDEX]) for f in frames]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- index: quiet


@pytest.fixture(scope="module")
def small_lib(tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures.videos import make_video

    lib = tmp_path_factory.mktemp("sig") / "lib"
    lib.mkdir()
    make_video(lib / "a.mp4", duration_s=2.0, seed=1)
    make_video(lib / "b.mp4", duration_s=2.0, seed=2, static=True)
    return lib


@pytest.fixture(scope="module")
def quiet_store(small_lib, tmp_path_factory):
    """``ray-vlm index`` of two small videos, default output: (store, stdout, stderr, log dir)."""
    tmp = tmp_path_factory.mktemp("quiet")
    store = tmp / "store"
    proc, out, err = _start(["index", str(small_lib), "--store", str(store)], tmp, "index")
    try:
        assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
        _assert_nothing_left(proc.pid)
    finally:
        _kill_session(proc.pid)
    return store, out.read_text(), err.read_text(), tmp / "logs"


def test_index_prints_only_our_progress_summary_and_errors(quiet_store):
    store, out, err, logs = quiet_store
    both = out + err
    assert "ok / partial / failed" in out and "2 / 0 / 0" in out  # our summary
    bad = [line for line in both.splitlines() if RAY_LINES.search(line)]
    assert not bad, "Ray's lines reached the console:\n" + "\n".join(bad)
    # They went to the log file instead (Ray Data's actor pool always logs the core_worker.cc line).
    logged = "".join(p.read_text() for p in logs.glob("index-*.log"))
    assert "core_worker.cc" in logged


def test_index_verbose_shows_rays_lines(small_lib, tmp_path):
    proc, out, err = _start(["index", str(small_lib), "--store", str(tmp_path / "store"), "--verbose", "--json"],
                            tmp_path, "index-verbose")
    try:
        assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    finally:
        _kill_session(proc.pid)
    both = out.read_text() + err.read_text()
    assert "Started a local Ray instance" in both and "core_worker.cc" in both
    assert json.loads(out.read_text().strip().splitlines()[-1])["videos_ok"] == 2


# ---------------------------------------------------------------------------------------------- serve


def _serve(store: Path, tmp_path: Path, name: str, *extra: str):
    port = _free_port()
    proc, out, err = _start(["serve", "--store", str(store), "--port", str(port), "--num-cpus", "0.1", *extra],
                            tmp_path, name)
    _wait_for(lambda: "ray-vlm: serving" in out.read_text(), proc, err, "'serving' line")
    return proc, out, err, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_on_signal_exit_0_nothing_left(quiet_store, tmp_path, sig):
    import requests

    store = quiet_store[0]
    proc, out, err, base = _serve(store, tmp_path, "serve")
    try:
        r = requests.post(f"{base}/v1/search", json={"query": "a white square", "top_k": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["moments"]
        assert len(_session_procs(proc.pid)) > 5  # Ray's processes run in the session: the check below means it
        proc.send_signal(sig)
        code = proc.wait(timeout=180)
        assert code == 0, err.read_text()[-3000:]
        _assert_nothing_left(proc.pid)
        with pytest.raises(requests.RequestException):
            requests.get(f"{base}/healthz", timeout=5)
    finally:
        _kill_session(proc.pid)
    text = out.read_text() + err.read_text()
    assert not CRASH_BANNER.search(text), text[-3000:]
    bad = [line for line in text.splitlines() if RAY_LINES.search(line)]
    assert not bad, "Ray's lines reached the console:\n" + "\n".join(bad)
    assert f"ray-vlm: {signal.Signals(sig).name}: stopping" in err.read_text()
    assert "ray-vlm: stopped" in err.read_text()


def test_serve_sigterm_while_starting_exit_0_nothing_left(quiet_store, tmp_path):
    """SIGTERM once Ray's raylet runs but before the service is up (ray.init sets its own SIGTERM handler then)."""
    proc, out, err = _start(["serve", "--store", str(quiet_store[0]), "--port", str(_free_port()), "--num-cpus",
                             "0.1"], tmp_path, "serve-starting")

    def raylet_started() -> bool:
        return any("raylet" in " ".join(p.info["cmdline"] or [])[:300] for p in _session_procs(proc.pid))

    try:
        _wait_for(raylet_started, proc, err, "a raylet in the session", timeout_s=300)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        assert code == 0, err.read_text()[-3000:]
        _assert_nothing_left(proc.pid)
    finally:
        _kill_session(proc.pid)
    assert "ray-vlm: serving" not in out.read_text()  # it did stop while starting
    assert not CRASH_BANNER.search(out.read_text() + err.read_text())


def test_serve_second_signal_forces_exit_and_kills_ray(quiet_store, tmp_path):
    proc, out, err, _ = _serve(quiet_store[0], tmp_path, "serve-force")
    try:
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "stopping" in err.read_text(), proc, err, "'stopping' line", timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        assert code in (0, 128 + signal.SIGTERM), err.read_text()[-3000:]  # 0: the clean stop won the race
        _assert_nothing_left(proc.pid)
    finally:
        _kill_session(proc.pid)


# ---------------------------------------------------------------------------------------------- index: SIGTERM


def test_index_sigterm_commits_exits_0_and_rerun_completes(tmp_path):
    # the job cannot finish before the signal on any machine, and the stop must also leave a video stuck in flight
    args, names, store, hang = V.unfinishable_index_job(tmp_path)
    proc, out, err = _start(args, tmp_path, "index-term", env=hang)
    try:
        _wait_for(lambda: store_version(store) > 0,
                  proc, err, "first commit")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
        assert code == 0, err.read_text()[-3000:]
        _assert_nothing_left(proc.pid)
    finally:
        _kill_session(proc.pid)
    summary = json.loads(out.read_text().strip().splitlines()[-1])
    assert summary["interrupted"] == "SIGTERM", summary
    assert "run the same command again to resume" in err.read_text()
    assert not CRASH_BANNER.search(err.read_text()), err.read_text()[-3000:]
    before, frames = _committed(store)
    assert 0 < len(before) < len(names), "the signal must land mid-job for this test to mean anything"
    assert len({v[S.VIDEO_ID] for v in before}) == len(before) and len(set(frames)) == len(frames)
    for v in before:  # every committed video (or committed prefix of a partial one) holds what its row says
        assert sum(1 for k in frames if k[0] == v[S.VIDEO_ID]) == v[S.FRAMES_KEPT]
    finished = [v for v in before if v[S.STATUS] != S.STATUS_PARTIAL]
    done_before = {v[S.VIDEO_ID]: v[S.INDEXED_AT] for v in finished}

    proc, out, err = _start(args, tmp_path, "index-rerun")
    try:
        assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
        _assert_nothing_left(proc.pid)
    finally:
        _kill_session(proc.pid)
    summary = json.loads(out.read_text().strip().splitlines()[-1])
    assert summary["interrupted"] is None and summary["videos_skipped"] == len(finished)
    videos, frames = _committed(store)
    assert sorted(Path(v[S.URI]).name for v in videos) == sorted(names)
    assert all(v[S.STATUS] == S.STATUS_OK for v in videos)
    assert len(set(frames)) == len(frames)
    for v in videos:
        if v[S.VIDEO_ID] in done_before:  # finished work was not redone
            assert v[S.INDEXED_AT] == done_before[v[S.VIDEO_ID]]
        assert sum(1 for k in frames if k[0] == v[S.VIDEO_ID]) == v[S.FRAMES_KEPT]
