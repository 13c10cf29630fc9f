"""A multi-node Ray cluster on this machine indexes S3 into S3 while one worker node dies mid-job.

The test starts a head node with no CPUs and two worker nodes (``ray start --block``, each in its own session, with
its own ports, under one temporary directory of its own), so every task and actor of the job runs on a worker node.
The job is the ``index`` CLI on the head's machine, sent to the cluster by ``RAY_ADDRESS``. Once the first increment
is committed, the raylet of the worker node that holds the encoder actor is SIGKILLed (by the pid of the raylet that
node's ``ray start`` started) while the encoder is in a call; that ``ray start`` then stops the rest of the node.
The job either finishes on the surviving nodes or fails; a rerun on the surviving nodes completes it. The store,
read with Lance (``read_committed``), then holds every input exactly once, all ``ok``, with unique frames, and the
videos finished before the kill untouched.

The cluster never touches the session's Ray (``ray_local``): its own ``--temp-dir`` keeps its address file out of
the default one that a plain ``ray.init()`` reads, and its ports are chosen free. Only processes this test started
(descendants of its ``ray start`` commands, or processes naming its temporary directory) are stopped, and none may
be left when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fixtures import videos as V
from fixtures.stores import read_committed, store_version
from ray_vlm.core import schema as S

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(900)]

# Small chunks, small blocks (Ray Data would otherwise carry a whole test clip's chunks in one block) and frequent
# commits: the first increment lands early, with most of the work still to do.
CONFIG = """\
commit_interval_s: 0.2
decode: {chunk_frames: 2, stall_timeout_s: 120}
resources: {decode: {concurrency: 2}, max_block_mb: 1}
auto_compact: false
"""
WORKER_CPUS = 2
_COUNTS = ("videos_skipped", "videos_ok", "videos_partial", "videos_failed")
# Settings from the environment that would point the cluster or its driver elsewhere; the test sets its own.
_RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
NODE_STORE_BYTES = 128 * 2**20  # each node's object store (the job caps what it holds in flight at 64 MB)


def _psutil():
    import ray  # noqa: F401  (puts the psutil bundled with Ray on sys.path)

    # isort: split
    import psutil

    return psutil


_HANDED_OUT: set[int] = set()


def _free_port() -> int:
    """A free loopback port never handed out before in this test session: the kernel may return a port it just
    returned again once its socket is closed, and Ray refuses two components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class _Node:
    name: str
    proc: subprocess.Popen  # the node's ``ray start --block``: the parent of its raylet
    log: Path

    def raylet(self):
        """The node's raylet (a child of its ``ray start``), or None."""
        psutil = _psutil()
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return None
        return next((p for p in kids if _name(p) == "raylet"), None)

    def workers(self) -> list[str]:
        """Titles of the raylet's worker processes: ``ray::<what they run>`` (``ray::IDLE`` when idle); the
        node's agents are left out."""
        raylet = self.raylet()
        if raylet is None:
            return []
        out = []
        for p in _children(raylet):
            title = _cmdline(p).strip()
            if title.startswith("ray::") and not title.endswith("Agent"):
                out.append(title)
        return out


@dataclass
class _Cluster:
    """A head and worker nodes started with ``ray start --block`` under a temporary directory of their own."""

    logs: Path
    env: dict
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rvlm-cluster-"))
    nodes: list[_Node] = field(default_factory=list)
    seen: dict = field(default_factory=dict)  # pid -> psutil.Process of everything the nodes ever started
    address: str = ""

    def _launch(self, name: str, args: list[str]) -> _Node:
        log = self.logs / f"{name}.log"
        ports = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", f"--object-store-memory={NODE_STORE_BYTES}", "--num-gpus=0",
               *(f"{p}={_free_port()}" for p in ports), *args]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = _Node(name, proc, log)
        self.nodes.append(node)
        return node

    def _wait_started(self, node: _Node) -> None:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in node.log.read_text(errors="replace"):
            text = node.log.read_text(errors="replace")
            assert node.proc.poll() is None, f"{node.name} did not start:\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"{node.name} not started in 180 s:\n{text[-3000:]}"
            time.sleep(0.2)
        self.snapshot()

    def start(self, workers: int) -> None:
        """The head (no CPUs: no task or actor of a job runs there), then the workers, one after the other (nodes
        starting together under one temp dir would pick the same socket names)."""
        head = self._launch("head", ["--head", f"--port={_free_port()}", "--num-cpus=0", "--include-dashboard=false",
                                     f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}"])
        self._wait_started(head)
        self.address = (Path(self.temp_dir) / "ray_current_cluster").read_text().strip()
        for i in range(workers):
            self._wait_started(self._launch(f"worker{i}", [f"--address={self.address}", f"--num-cpus={WORKER_CPUS}"]))

    def snapshot(self) -> None:
        """Remember every process the nodes run now (a killed node's workers are re-parented away from it)."""
        for node in self.nodes:
            for p in _descendants(node.proc.pid):
                self.seen.setdefault(p.pid, p)

    def ours(self) -> list:
        """Live processes of this cluster: remembered descendants and any process naming its temp dir."""
        psutil = _psutil()
        self.snapshot()
        out = {}
        for p in self.seen.values():
            if _alive(p):
                out[p.pid] = p
        for p in psutil.process_iter():
            if p.pid not in out and self.temp_dir in _cmdline(p) and _alive(p):
                out[p.pid] = p
        return list(out.values())

    def shutdown(self) -> list[str]:
        """Stop every node (SIGTERM to each ``ray start``: it stops its node's processes), then kill whatever is
        left; returns the command lines that had to be killed."""
        psutil = _psutil()
        self.snapshot()
        for node in reversed(self.nodes):  # workers first, the head last
            if node.proc.poll() is None:
                with contextlib.suppress(OSError):
                    node.proc.send_signal(signal.SIGTERM)
                try:
                    node.proc.wait(60)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        os.killpg(node.proc.pid, signal.SIGKILL)
                    node.proc.wait(10)
        left = self.ours()
        if left:
            psutil.wait_procs(left, timeout=10)
        killed = []
        for _ in range(3):
            left = self.ours()
            if not left:
                break
            for p in left:
                killed.append(_cmdline(p)[:200])
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(left, timeout=5)
        with contextlib.suppress(OSError):  # Ray's own logs, kept with the test's
            shutil.copytree(Path(self.temp_dir) / "session_latest" / "logs", self.logs / "ray", dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except Exception:
        return ""


def _alive(p) -> bool:
    psutil = _psutil()
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _children(p) -> list:
    try:
        return p.children()
    except Exception:
        return []


def _descendants(pid: int) -> Iterator:
    psutil = _psutil()
    try:
        yield from psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return


def _index(cluster: _Cluster, args: list[str], logs: Path, name: str) -> subprocess.Popen:
    """``ray-vlm index ... --address <the cluster>``: each run connects to the running cluster and leaves it up."""
    env = dict(cluster.env, RAY_VLM_QUIET="1", RAY_VLM_LOG_DIR=str(logs))
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "ray_vlm.cli", *args, "--address", cluster.address],
                                stdout=out, stderr=err, env=env, start_new_session=True)


def _summary(logs: Path, name: str) -> dict | None:
    lines = (logs / f"{name}.out").read_text(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _complete(run: tuple[str, int, dict | None], inputs: int) -> bool:
    """Whether an ``index`` run exited 0 with every input skipped or ``ok``."""
    _, rc, s = run
    return rc == 0 and s is not None and s["videos_skipped"] + s["videos_ok"] == inputs


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def test_worker_node_killed_mid_job_every_input_indexed_once(s3_bucket, tmp_path):
    import boto3
    import lance

    from ray_vlm.store.token_store import lance_storage_options

    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    lib = tmp_path / "lib"
    names = V.sample_clip_library(lib, copies=3)  # 9 videos
    for name in names:
        s3.upload_file(str(lib / name), bucket, f"videos/{name}")
    store = f"s3://{bucket}/store"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    args = ["index", f"s3://{bucket}/videos/", "--store", store, "--config", str(cfg), "--json",
            "--s3-endpoint", endpoint]
    logs = tmp_path / "logs"
    logs.mkdir()

    # The cluster's own token (Ray's token authentication; nothing read from or written to ~/.ray), for its nodes
    # and its driver alike.
    env = {k: v for k, v in os.environ.items() if k not in _RAY_ENV}
    env.update(PYTHONUNBUFFERED="1", AWS_ACCESS_KEY_ID=opts["key"], AWS_SECRET_ACCESS_KEY=opts["secret"],
               AWS_DEFAULT_REGION="us-east-1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               # the GCS checks each node every second (Ray's default: 3 s): a dead node is found in about 5 s
               RAY_health_check_period_ms="1000",
               # a node told to stop stops now (Ray's default first drains it for up to 30 s)
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               # a node waits this long for its raylet to register (Ray's default, 30 s, is short on a busy machine)
               RAY_raylet_start_wait_time_s="120")
    cluster = _Cluster(logs, env)
    job = None
    timings = {}
    t = time.monotonic()
    try:
        cluster.start(workers=2)
        t0 = time.monotonic()
        timings["cluster_start_s"] = round(t0 - t, 1)
        job = _index(cluster, args, logs, "run1")

        # Once the first increment is committed, kill the raylet of the worker node holding the encoder actor while
        # the encoder is in a call: the actor restarts on the other node, where its calls and the node's tasks are
        # retried.
        target, running = None, []
        deadline = time.monotonic() + 300
        while target is None:
            assert time.monotonic() < deadline, "no commit with the encoder at work within 300 s"
            cluster.snapshot()
            assert job.poll() is None, (
                f"the job ended before the kill (rc {job.returncode}):\n{_tail(logs / 'run1.err')}")
            if store_version(store, opts) > 0:
                timings.setdefault("first_commit_s", round(time.monotonic() - t0, 1))
                for node in cluster.nodes[1:]:
                    titles = node.workers()
                    if any("EncodeStage" in t and ".submit" in t for t in titles):
                        target, running = node, [t for t in titles if t != "ray::IDLE"]
                        break
            if target is None:
                time.sleep(0.05)
        raylet = target.raylet()
        assert raylet is not None
        raylet.kill()
        timings["kill_at_s"] = round(time.monotonic() - t0, 1)
        before, _ = read_committed(store, opts)  # read after the kill: at most what was finished at the kill
        finished = [v for v in before if v[S.STATUS] != S.STATUS_PARTIAL]
        assert len(finished) < len(names), "the kill must land mid-job for this test to mean anything"
        done_before = {v[S.VIDEO_ID]: v[S.INDEXED_AT] for v in finished if v[S.STATUS] == S.STATUS_OK}
        target.proc.wait(60)  # its ``ray start`` notices the dead raylet and stops the rest of the node

        try:
            job.wait(600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job hangs after the node died:\n{_tail(logs / 'run1.err')}")
        timings["run1_s"] = round(time.monotonic() - t0, 1)
        runs = [("run1", job.returncode, _summary(logs, "run1"))]
        if not _complete(runs[-1], len(names)):  # failed, or left inputs to do: the rerun must finish them
            t1 = time.monotonic()
            job = _index(cluster, args, logs, "run2")
            try:
                job.wait(600)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the rerun hangs:\n{_tail(logs / 'run2.err')}")
            timings["run2_s"] = round(time.monotonic() - t1, 1)
            runs.append(("run2", job.returncode, _summary(logs, "run2")))
            assert job.returncode == 0, f"the rerun failed:\n{_tail(logs / 'run2.err')}"
            assert _complete(runs[-1], len(names)), runs[-1]
        print(f"\nkilled {target.name}'s raylet with {len(finished)}/{len(names)} videos finished, running {running}; "
              f"runs: {[(name, rc, s and {k: s[k] for k in _COUNTS}) for name, rc, s in runs]}")
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(30)
        t = time.monotonic()
        killed = cluster.shutdown()
        timings["shutdown_s"] = round(time.monotonic() - t, 1)
    assert not cluster.ours(), "processes of the test's cluster are left running"
    print(f"timings: {timings}; processes killed after the nodes stopped: {killed}")

    videos, frames = read_committed(store, opts)
    assert sorted(Path(v[S.URI]).name for v in videos) == sorted(names)
    assert all(v[S.URI].startswith(f"s3://{bucket}/videos/") for v in videos)
    assert all(v[S.STATUS] == S.STATUS_OK for v in videos), [(v[S.URI], v[S.STATUS], v[S.ERROR]) for v in videos]
    keys = [(f[S.VIDEO_ID], f[S.FRAME_INDEX]) for f in frames]
    assert len(keys) == len(set(keys)), "a frame is stored twice"
    for v in videos:
        assert sum(1 for k in keys if k[0] == v[S.VIDEO_ID]) == v[S.FRAMES_KEPT] > 0, v
        if v[S.VIDEO_ID] in done_before:  # finished before the kill: not redone
            assert v[S.INDEXED_AT] == done_before[v[S.VIDEO_ID]], v
    # One source row per video in the store itself, not only in what readers see.
    src = lance.dataset(f"{store}/sources.lance", storage_options=lance_storage_options(store, opts))
    ids = src.to_table(columns=[S.VIDEO_ID]).column(S.VIDEO_ID).to_pylist()
    assert len(ids) == len(set(ids)) == len(names)
