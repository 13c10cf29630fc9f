"""End to end through Ray Data: a folder with good and bad inputs, reruns, a killed job, an S3 source + store.

Outputs are checked with Lance directly (``fixtures.stores.read_committed``), not through the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest

from fixtures import videos as V
from fixtures.stores import read_committed, store_version
from ray_vlm.core import schema as S
from ray_vlm.core.config import IndexConfig
from ray_vlm.core.samples import sample_videos

pytestmark = pytest.mark.timeout(900)

FAST = IndexConfig.model_validate({"commit_interval_s": 0.5, "decode": {"stall_timeout_s": 30}})


def _library(root: Path) -> dict[str, str]:
    """Real clips + bad inputs; returns {file name: expected status}."""
    root.mkdir(parents=True, exist_ok=True)
    expect = {}
    for p in sample_videos(("bikes.mp4", "carphone_pristine.mp4")):
        shutil.copy(p, root / p.name)
        expect[p.name] = S.STATUS_OK
    (root / "empty.mp4").write_bytes(b"")
    expect["empty.mp4"] = S.STATUS_FAILED
    (root / "notes.mp4").write_text("this is not a video, just text named .mp4\n" * 20)
    expect["notes.mp4"] = S.STATUS_FAILED
    good = (root / "bikes.mp4").read_bytes()
    corrupt = bytearray(good)
    rng = np.random.default_rng(1)
    corrupt[:4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()  # header destroyed
    (root / "corrupt.mp4").write_bytes(bytes(corrupt))
    expect["corrupt.mp4"] = S.STATUS_FAILED
    return expect


def _committed(store: Path) -> tuple[list[dict], list[dict]]:
    """(videos rows, visible frames rows) of the latest version, read with Lance (not through the code under test)."""
    return read_committed(store)


def test_index_folder_every_input_accounted_for_and_rerun_adds_nothing(ray_local, tmp_path):
    from ray_vlm.pipelines.archive_index import index_archive

    lib = tmp_path / "lib"
    expect = _library(lib)
    store = tmp_path / "store"
    summary = index_archive([str(lib)], str(store), FAST)
    assert summary.inputs == len(expect)
    # The job's memory bounds reach Ray Data (a long video's frames piled up past the cap without the third).
    import ray.data

    ctx = ray.data.DataContext.get_current()
    res = FAST.resources
    assert ctx.execution_options.resource_limits.object_store_memory == res.object_store_memory_mb * 2**20
    assert ctx.target_max_block_size == res.max_block_mb * 2**20
    assert ctx.object_store_memory_pressure_fraction == res.object_store_pressure_fraction == 0.8
    assert summary.videos_ok == 2 and summary.videos_failed == 3 and summary.videos_partial == 0
    videos, frames = _committed(store)
    by_name = {Path(v[S.URI]).name: v for v in videos}
    assert set(by_name) == set(expect)
    for name, status in expect.items():
        assert by_name[name][S.STATUS] == status, (name, by_name[name])
    assert by_name["empty.mp4"][S.ERROR_TYPE] == S.ERR_EMPTY
    assert by_name["notes.mp4"][S.ERROR_TYPE] in (S.ERR_NOT_VIDEO, S.ERR_POLICY)
    assert by_name["corrupt.mp4"][S.ERROR_TYPE] in (S.ERR_NOT_VIDEO, S.ERR_DECODE, S.ERR_NO_FRAMES)
    for v in videos:
        if v[S.STATUS] == S.STATUS_FAILED:
            assert v[S.ERROR], v
    # Frames: unique, times from pts at ~1 fps, spans covering the video without gaps.
    keys = [(f[S.VIDEO_ID], f[S.FRAME_INDEX]) for f in frames]
    assert len(keys) == len(set(keys))
    bikes = sorted((f for f in frames if f[S.VIDEO_ID] == by_name["bikes.mp4"][S.VIDEO_ID]),
                   key=lambda f: f[S.PTS_S])
    assert bikes[0][S.PTS_S] == pytest.approx(0.0, abs=0.04)
    for f in bikes:  # each sample within one frame period (1/25 s) of k / 1 fps
        assert abs(f[S.PTS_S] - f[S.FRAME_INDEX]) <= 0.04 + 1e-9
    for a, b in zip(bikes, bikes[1:]):
        assert a[S.SPAN_END_S] == pytest.approx(b[S.PTS_S])
    assert bikes[-1][S.SPAN_END_S] == pytest.approx(10.0, abs=0.05)
    assert by_name["bikes.mp4"][S.FRAMES_SAMPLED] == 10

    # Rerun: nothing new committed, nothing duplicated.
    version = store_version(store)
    again = index_archive([str(lib)], str(store), FAST)
    assert again.videos_skipped == len(expect)
    assert again.videos_ok == again.videos_failed == 0
    assert store_version(store) == version
    videos2, frames2 = _committed(store)
    assert len(videos2) == len(videos) and len(frames2) == len(frames)


def _cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, RAY_VLM_QUIET="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "ray_vlm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True, **kw)


@pytest.mark.slow
def test_killed_job_resumes_complete_without_duplicates(tmp_path):
    # the first run cannot finish, however fast the machine: the kill below lands mid-job for certain
    args, names, store, hang = V.unfinishable_index_job(tmp_path)
    proc = _cli(*args, env_extra=hang)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # wait for the first committed increment, then kill
            if store_version(store) > 0:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("no commit within 300 s")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before, _ = _committed(store)
    finished = [v for v in before if v[S.STATUS] != S.STATUS_PARTIAL]
    assert 0 < len(finished) < len(names), "the kill must land mid-job for this test to mean anything"
    done_before = {v[S.VIDEO_ID]: v[S.INDEXED_AT] for v in finished}

    proc = _cli(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["videos_skipped"] == len(finished)
    videos, frames = _committed(store)
    assert sorted(Path(v[S.URI]).name for v in videos) == sorted(names)
    assert all(v[S.STATUS] == S.STATUS_OK for v in videos)
    keys = [(f[S.VIDEO_ID], f[S.FRAME_INDEX]) for f in frames]
    assert len(keys) == len(set(keys))
    for v in videos:  # finished work was not redone
        if v[S.VIDEO_ID] in done_before:
            assert v[S.INDEXED_AT] == done_before[v[S.VIDEO_ID]]
        assert sum(1 for k in keys if k[0] == v[S.VIDEO_ID]) == v[S.FRAMES_KEPT]


@pytest.mark.slow
def test_a_video_killed_part_way_resumes_from_its_last_committed_chunk(tmp_path):
    """A long video committed chunk by chunk; the job is killed after 5 of its 15 chunks: the rerun decodes only
    the 10 left (counted by the job), and the store holds exactly the frames of an uninterrupted run.

    Each chunk (8 frames of 224 x 224 RGB, 1.2 MB) is bigger than the 1 MB blocks asked for, so Ray Data hands
    every chunk downstream as soon as it is decoded (with larger blocks a few chunks travel together)."""
    from ray_vlm.operators.decode import FAULT_ENV

    lib = tmp_path / "lib"
    lib.mkdir()
    V.make_video(lib / "long.mp4", width=64, height=48, fps=25.0, duration_s=60.0, gop_s=2.0)
    cfg = tmp_path / "cfg.yaml"
    # commits run on their own clock: the 5th chunk arrives well within a second of the 4th, and is committed
    # while the pipeline waits on the stuck decoder (not only when a later batch arrives)
    cfg.write_text("commit_interval_s: 1.0\ndecode: {target_fps: 2, chunk_frames: 8, stall_timeout_s: 600}\n"
                   "resources: {max_block_mb: 1}\n")
    store, whole = tmp_path / "store", tmp_path / "whole"
    args = ["index", str(lib), "--config", str(cfg), "--json"]
    # the decoder hangs after sending 40 frames (5 chunks) of the video: the job commits them and waits
    proc = _cli(*args, "--store", str(store), env_extra={FAULT_ENV: "hang@40:long"})
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if store_version(store) > 0:
                rows, _ = _committed(store)
                if rows and rows[0][S.CHUNKS_COMMITTED] == 5:
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the first 5 chunks were not committed within 300 s")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [row], before = _committed(store)
    assert row[S.STATUS] == S.STATUS_PARTIAL and row[S.RESUME_S] == pytest.approx(20.0, abs=0.05)
    assert row[S.NEXT_FRAME_INDEX] == 40 and len(before) == row[S.FRAMES_KEPT] > 0
    for name, target in (("rerun", store), ("whole", whole)):
        p = _cli(*args, "--store", str(target))
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
        summary = json.loads(out.decode().strip().splitlines()[-1])
        if name == "rerun":
            assert summary["videos_resumed"] == 1 and summary["chunks_decoded"] == 10  # not the 5 committed
        else:
            assert summary["chunks_decoded"] == 15
    [row], frames = _committed(store)
    [ref], ref_frames = _committed(whole)
    assert row[S.STATUS] == S.STATUS_OK and row[S.CHUNKS_COMMITTED] == 15
    key = [S.FRAME_INDEX, S.CHUNK_INDEX]
    assert sorted(tuple(f[k] for k in key) for f in frames) == sorted(tuple(f[k] for k in key) for f in ref_frames)
    got = {f[S.FRAME_INDEX]: f[S.PTS_S] for f in frames}
    assert got == pytest.approx({f[S.FRAME_INDEX]: f[S.PTS_S] for f in ref_frames})
    assert (row[S.FRAMES_KEPT], row[S.FRAMES_SAMPLED], row[S.DURATION_S]) == \
        (ref[S.FRAMES_KEPT], ref[S.FRAMES_SAMPLED], pytest.approx(ref[S.DURATION_S]))
    gens = {f["generation"] for f in frames if f[S.CHUNK_INDEX] < 5}, {f["generation"] for f in frames
                                                                       if f[S.CHUNK_INDEX] >= 5}
    assert len(gens[0]) == len(gens[1]) == 1 and gens[0] != gens[1]  # the first run's chunks were kept, not redone


@pytest.mark.s3
def test_s3_source_and_store(ray_local, s3_bucket, tmp_path):
    import boto3

    from ray_vlm.pipelines.archive_index import index_archive
    from ray_vlm.store.token_store import TokenStore

    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    lib = tmp_path / "lib"
    expect = _library(lib)
    for p in lib.iterdir():
        s3.upload_file(str(p), bucket, f"videos/{p.name}")
    store = f"s3://{bucket}/store"
    summary = index_archive([f"s3://{bucket}/videos/"], store, FAST, storage_options=opts)
    assert (summary.videos_ok, summary.videos_failed) == (2, 3)
    rows = TokenStore(store, opts).read_videos().to_pylist()
    assert sorted(Path(r[S.URI]).name for r in rows) == sorted(expect)
    assert all(r[S.URI].startswith(f"s3://{bucket}/videos/") for r in rows)
    keys = s3.list_objects_v2(Bucket=bucket, Prefix="store/sources.lance/_versions/")["Contents"]
    assert keys, "the sources dataset's versions must be objects in the bucket"
    videos, frames = read_committed(store, opts)
    assert len(videos) == len(expect) and len(frames) == sum(v[S.FRAMES_KEPT] for v in videos) > 0
    again = index_archive([f"s3://{bucket}/videos/"], store, FAST, storage_options=opts)
    assert again.videos_skipped == len(expect) and again.videos_ok == 0


def test_hf_encoder_through_the_whole_job(ray_local, tmp_path):
    """A tiny random CLIP given as hf:<local dir> indexes real video; the store records its space, and
    queries embed text with the same model (the bundled encoder's space is refused)."""
    from fixtures.models import build_tiny_hf
    from ray_vlm.models import get_spec, load_encoder
    from ray_vlm.pipelines.archive_index import index_archive
    from ray_vlm.query.searcher import QueryError, search

    model_dir = build_tiny_hf("clip", tmp_path / "tiny-clip")
    enc_id = f"hf:{model_dir}"
    spec = get_spec(enc_id)
    cfg = IndexConfig.model_validate({"encoder": {"id": enc_id}, "compress": {"grid": 2, "dtype": "int8"}})
    store = tmp_path / "store"
    s = index_archive([str(p) for p in sample_videos(("bikes.mp4",))], str(store), cfg)
    assert s.videos_ok == 1 and s.encoder == enc_id
    videos, frames = _committed(store)
    assert videos[0][S.SPACE] == spec.space and len(frames) == videos[0][S.FRAMES_KEPT] > 0
    t = lance.dataset(str(store / "frames.lance")).to_table()
    assert set(t.column(S.ENCODER).to_pylist()) == {enc_id}
    assert set(t.column(S.DIM).to_pylist()) == {spec.dim}
    assert set(t.column(S.PATCH_GRID_H).to_pylist()) == {spec.patch_grid[0]}
    g = np.frombuffer(t.column(S.GLOBAL_TOKEN)[0].as_py(), dtype=np.int8)
    assert g.shape == (spec.dim,)  # int8 layout: one byte per dimension
    moments = search(str(store), "a bicycle", top_k=2)
    assert moments and all(0 <= m.start_s < m.end_s <= 10.05 for m in moments)
    with pytest.raises(QueryError, match="space"):
        search(str(store), "a bicycle", encoder=load_encoder("bundled:effnet-lite0-minilm"))


def test_encoder_actor_killed_mid_job_is_restarted_and_the_job_completes(ray_local, tmp_path):
    """Ray logs ``core_worker.cc ... has constructor arguments in the object store and max_restarts > 0`` for the
    encoder actors (Ray Data passes every actor pool's function and context by reference): the restart it warns
    about works, because the driver holds those references for the whole job. SIGKILL the encoder mid-task."""
    import threading

    import psutil  # Ray's bundled copy (ray is imported by the fixture)

    from ray_vlm.pipelines.archive_index import index_archive

    lib = tmp_path / "lib"
    names = V.sample_clip_library(lib, copies=3)
    killed: list[str] = []
    done = threading.Event()

    def kill_the_encoder_while_it_works() -> None:
        me = psutil.Process()
        while not done.is_set() and not killed:
            for proc in me.children(recursive=True):
                try:
                    cmd = " ".join(proc.cmdline())
                    if "EncodeStage" in cmd and ".submit" in cmd:  # running a batch, not starting
                        proc.kill()
                        killed.append(cmd)
                        return
                except psutil.Error:
                    continue
            time.sleep(0.05)

    t = threading.Thread(target=kill_the_encoder_while_it_works, daemon=True)
    t.start()
    cfg = IndexConfig.model_validate({"commit_interval_s": 0.5, "decode": {"chunk_frames": 4, "stall_timeout_s": 30}})
    try:
        s = index_archive([str(lib)], str(tmp_path / "store"), cfg)
    finally:
        done.set()
        t.join(10)
    assert killed, "the encoder was never caught running a batch: the test proved nothing"
    assert (s.videos_ok, s.videos_failed, s.videos_partial) == (len(names), 0, 0), s.failures
    videos, frames = _committed(tmp_path / "store")
    assert sorted(Path(v[S.URI]).name for v in videos) == sorted(names)
    keys = [(f[S.VIDEO_ID], f[S.FRAME_INDEX]) for f in frames]
    assert len(keys) == len(set(keys))


def test_aspect_preserving_frames_through_the_whole_job(ray_local, tmp_path):
    """``encoder.aspect: keep``: each video's frames keep its picture's shape (bikes.mp4 is 640x272, 2.35:1: a 4x10
    grid of 32-pixel patches; carphone 176x144: 6x8), the grid is stored per frame, and queries ground on it."""
    from ray_vlm.pipelines.archive_index import index_archive
    from ray_vlm.query.searcher import search

    cfg = FAST.model_copy(update={"encoder": FAST.encoder.model_copy(update={"aspect": "keep"})})
    store = tmp_path / "store"
    s = index_archive([str(p) for p in sample_videos(("bikes.mp4", "carphone_pristine.mp4"))], str(store), cfg)
    assert s.videos_ok == 2
    videos, _ = _committed(store)
    names = {v[S.VIDEO_ID]: Path(v[S.URI]).name for v in videos}
    t = lance.dataset(str(store / "frames.lance")).to_table()
    grids = {(names[v], h, w) for v, h, w in zip(t.column(S.VIDEO_ID).to_pylist(), t.column(S.PATCH_GRID_H).to_pylist(),
                                                  t.column(S.PATCH_GRID_W).to_pylist())}
    assert grids == {("bikes.mp4", 4, 10), ("carphone_pristine.mp4", 6, 8)}
    idx = [np.frombuffer(b, dtype="<u2") for b in t.column(S.PATCH_INDEX).to_pylist() if b]
    assert idx and max(int(i.max()) for i in idx) < 48  # flat indices within each frame's own grid
    moments = search(str(store), "a bicycle", top_k=3)  # the default fused method reads the patch tokens
    assert moments and Path(moments[0].uri).name == "bikes.mp4"
