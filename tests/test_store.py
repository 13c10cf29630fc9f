"""Token store: vector codecs, manifest commit protocol (local disk and S3 via moto), readers, vacuum.

Outputs are checked with pyarrow / json directly where the point is what landed on disk; the store's
readers are checked for what they grant. Faults are asserted to have happened (the loser of a race really
got a 412 / EEXIST), so no test passes by accident.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_vlm.core import schema as S
from ray_vlm.store import token_store as store_mod
from ray_vlm.store.codec import column_to_matrix, decode_vectors, quantize, vectors_per_row
from ray_vlm.store.token_store import (
    FRAMES_FILE,
    FRAMES_FILE_BYTES,
    FRAMES_FILE_ROWS,
    ChunkLedger,
    StoreError,
    TokenStore,
)

pytestmark = pytest.mark.timeout(120)
D = 8


# ================================================================ codecs


def test_fp16_round_trip_error_below_1e3():
    v = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    codes, scales = quantize(v, "fp16")
    assert codes.dtype == np.dtype("<f2") and np.all(scales == 1.0)
    back = decode_vectors(codes.tobytes(), 64, "fp16")
    assert back.dtype == np.float32 and back.shape == (50, 64)
    assert np.abs(back - v).max() < 1e-3


def test_int8_round_trip_cosine_above_099_and_zero_vector():
    v = np.random.default_rng(1).normal(size=(50, 64)).astype(np.float32) * 3.0
    v[7] = 0.0
    codes, scales = quantize(v, "int8")
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    back = decode_vectors(codes.tobytes(), 64, "int8", scales.tobytes())
    nz = np.arange(50) != 7
    cos = (back[nz] * v[nz]).sum(1) / np.linalg.norm(back[nz], axis=1) / np.linalg.norm(v[nz], axis=1)
    assert cos.min() > 0.99
    assert np.all(back[7] == 0.0)
    # per-vector scale is absmax / 127
    np.testing.assert_allclose(scales[nz], np.abs(v[nz]).max(1) / 127.0, rtol=1e-6)


def test_column_to_matrix_honours_offsets_slices_chunks_and_nulls():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(10, D)).astype(np.float32)
    codes, _ = quantize(v, "fp16")
    arr = pa.array([codes[i].tobytes() for i in range(10)], type=pa.binary())
    # a slice starts mid-buffer: offsets must be honoured
    np.testing.assert_array_equal(column_to_matrix(arr.slice(3, 4), D, "fp16"), codes[3:7].astype(np.float32))
    chunked = pa.chunked_array([arr.slice(0, 2), arr.slice(5, 3)])
    np.testing.assert_array_equal(column_to_matrix(chunked, D, "fp16"), codes[[0, 1, 5, 6, 7]].astype(np.float32))
    large = pa.array([codes[i].tobytes() for i in range(10)], type=pa.large_binary())
    np.testing.assert_array_equal(column_to_matrix(large, D, "fp16"), codes.astype(np.float32))
    fixed = pa.array([codes[i].tobytes() for i in range(10)], type=pa.binary(2 * D))
    np.testing.assert_array_equal(column_to_matrix(fixed.slice(2), D, "fp16"), codes[2:].astype(np.float32))
    # out_dtype=None: the stored codes, zero-copy over the Arrow buffer
    codes_view = column_to_matrix(arr.slice(3, 4), D, "fp16", out_dtype=None)
    assert codes_view.dtype == np.float16 and np.array_equal(codes_view, codes[3:7])
    assert codes_view.ctypes.data == arr.buffers()[2].address + 3 * 2 * D
    # variable vectors per row (patch tokens) and nulls (rows without patches)
    q, s = quantize(v, "int8")
    rows = [q[0:3].tobytes(), None, q[3:4].tobytes(), b"", q[4:10].tobytes()]
    scales = [s[0:3].tobytes(), None, s[3:4].tobytes(), b"", s[4:10].tobytes()]
    col, scol = pa.array(rows, pa.binary()), pa.array(scales, pa.binary())
    assert vectors_per_row(col, D, "int8").tolist() == [3, 0, 1, 0, 6]
    got = column_to_matrix(col, D, "int8", scol)
    np.testing.assert_allclose(got, q.astype(np.float32) * s[:, None], rtol=1e-6)
    # a float32 scale column works as well as scale bytes
    np.testing.assert_allclose(
        column_to_matrix(pa.array([q[i].tobytes() for i in range(10)]), D, "int8", pa.array(s)),
        q.astype(np.float32) * s[:, None], rtol=1e-6)


def test_column_to_matrix_rejects_wrong_width():
    with pytest.raises(StoreError, match="not whole"):
        column_to_matrix(pa.array([b"\x00" * 15]), D, "fp16")
    with pytest.raises(StoreError, match="scales"):
        column_to_matrix(pa.array([b"\x01" * D]), D, "int8", np.ones(3, np.float32))


# ================================================================ helpers: stores on disk and on S3


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def make_store(request, tmp_path):
    """Factory of TokenStore instances on one fresh store root (each call: a new store object with its own
    manifest cache, as another process would have)."""
    if request.param == "local":
        uri, opts = str(tmp_path / "store"), None
    else:
        bucket, opts = request.getfixturevalue("s3_bucket")
        opts = dict(opts, skip_instance_cache=True)
        uri = f"s3://{bucket}/stores/{uuid.uuid4().hex[:8]}"

    def make() -> TokenStore:
        return TokenStore(uri, storage_options=opts)

    make.backend = request.param
    return make


def _frames_table(chunks: list[tuple[str, int, int, float]]) -> pa.Table:
    """FRAMES_SCHEMA rows for ``(video_id, chunk_index, n_frames, pts_offset_s)`` chunks (fp16, D=8)."""
    rows = []
    for vid, ci, n, off in chunks:
        for i in range(n):
            vec = np.full(D, off + i, dtype="<f2")
            rows.append({
                S.VIDEO_ID: vid, S.FRAME_INDEX: ci * 100 + i, S.PTS_S: off + i, S.SPAN_END_S: off + i + 1,
                S.CHUNK_INDEX: ci, S.ENCODER: "enc", S.ENCODER_REVISION: "rev", S.SPACE: "space",
                S.CONFIG_HASH: "cfg", S.LAYOUT: "global:fp16", S.DIM: D, S.TOKEN_DTYPE: "fp16",
                S.GLOBAL_TOKEN: vec.tobytes(), S.GLOBAL_SCALE: 1.0, S.GRID_SIZE: 0, S.GRID_TOKENS: None,
                S.GRID_SCALES: None, S.PATCH_GRID_H: 0, S.PATCH_GRID_W: 0, S.PATCH_INDEX: None,
                S.PATCH_TOKENS: None, S.PATCH_SCALES: None,
            })
    return pa.Table.from_pylist(rows, schema=S.FRAMES_SCHEMA)


def _stage_frames(store: TokenStore, chunks) -> dict:
    """Write a frames file under a staging name (as the write operator does); return its commit entry."""
    table = _frames_table(chunks)
    rel = f"data/frames/part-test-{uuid.uuid4().hex}.parquet"
    store.fs.makedirs(posixpath.dirname(store.path(rel)), exist_ok=True)
    with store.fs.open(store.path(rel), "wb") as f:
        pq.write_table(table, f)
    return {"path": rel, "video_ids": sorted({c[0] for c in chunks}), "rows": len(table), "bytes": None}


def _video_row(vid: str, status: str = S.STATUS_OK, frames: int = 0, **kw) -> dict:
    row = {S.VIDEO_ID: vid, S.URI: f"/archive/{vid}.mp4", S.STATUS: status, S.SIZE_BYTES: 1000 + len(vid),
           S.MTIME: 1.5e9, S.FRAMES_KEPT: frames, S.DURATION_S: float(frames), S.CONFIG_HASH: "cfg",
           S.INDEXED_AT: 1.0}
    row.update(kw)
    return row


def _manifest_json(store: TokenStore, version: int) -> dict:
    """A manifest read straight from the filesystem (not through TokenStore)."""
    return json.loads(store.fs.cat_file(f"{store.root}/_manifests/v{version:08d}.json"))


# ================================================================ commit protocol


def test_readers_see_nothing_before_a_manifest(make_store):
    st = make_store()
    assert st.latest_version() == 0
    entry = _stage_frames(st, [("a", 0, 3, 0.0)])
    # the data file exists, but no manifest names it: invisible
    assert st.fs.exists(st.path(entry["path"]))
    assert st.latest_version() == 0 and st.read_frames().num_rows == 0 and st.read_videos().num_rows == 0
    v = st.commit([entry], [_video_row("a", frames=3)])
    assert v == 1
    other = make_store()  # a fresh reader (another process) sees it
    assert other.latest_version() == 1
    frames = other.read_frames()
    assert frames.schema.equals(S.FRAMES_SCHEMA)
    assert frames[S.PTS_S].to_pylist() == [0.0, 1.0, 2.0]
    assert other.read_videos()[S.VIDEO_ID].to_pylist() == ["a"]
    m = _manifest_json(other, 1)
    assert m["schema_version"] == S.SCHEMA_VERSION and m["counts"]["videos"] == 1 and m["counts"]["frames"] == 3
    assert [e["path"] for e in m["frames_files"]] == [entry["path"]]


def test_kill_between_data_files_and_manifest_leaves_readers_on_old_version(make_store, monkeypatch):
    st = make_store()
    v1 = st.commit([_stage_frames(st, [("a", 0, 2, 0.0)])], [_video_row("a", frames=2)])
    # The job dies after staging frames and the videos file, just before the manifest PUT.
    entry = _stage_frames(st, [("b", 0, 4, 10.0)])

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed()

    monkeypatch.setattr(store_mod, "create_only", die)
    with pytest.raises(Killed):
        st.commit([entry], [_video_row("b", frames=4)])
    monkeypatch.undo()

    reader = make_store()
    assert reader.latest_version() == v1 == 1
    assert reader.read_videos()[S.VIDEO_ID].to_pylist() == ["a"]
    assert reader.read_frames()[S.VIDEO_ID].to_pylist() == ["a", "a"]
    # both staged files (frames + videos) are orphans; vacuum finds exactly them, and respects min_age_s
    assert reader.vacuum(dry_run=True) == []  # they are younger than the default hour
    orphans = reader.vacuum(dry_run=True, min_age_s=0)
    assert entry["path"] in orphans and len(orphans) == 2
    assert any(p.startswith("data/videos/") for p in orphans)
    assert reader.vacuum(dry_run=False, min_age_s=0) == orphans
    assert not reader.fs.exists(reader.path(entry["path"]))
    assert reader.vacuum(dry_run=True, min_age_s=0) == []
    # the committed version is intact after vacuum; a rerun commits b as v2
    assert reader.read_frames().num_rows == 2
    assert reader.commit([_stage_frames(reader, [("b", 0, 4, 10.0)])], [_video_row("b", frames=4)]) == 2


def test_two_concurrent_committers_one_wins_the_other_rebases_without_duplicates(make_store):
    a, b = make_store(), make_store()
    shared = "shared"
    ea = _stage_frames(a, [("va", 0, 2, 0.0), (shared, 0, 3, 100.0)])
    eb = _stage_frames(b, [("vb", 0, 2, 50.0), (shared, 0, 3, 200.0)])
    barrier = threading.Barrier(2, timeout=30)
    first_attempt = {"a": True, "b": True}

    def hook_for(name):
        def hook(version):
            if first_attempt[name]:  # both have built v1 before either tries to create it
                first_attempt[name] = False
                barrier.wait()
        return hook

    a._before_create, b._before_create = hook_for("a"), hook_for("b")
    results, errors = {}, []

    def run(name, st, entry, vid):
        try:
            results[name] = st.commit_detailed(
                [entry], [_video_row(vid, frames=2), _video_row(shared, frames=3)])
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", a, ea, "va")),
               threading.Thread(target=run, args=("b", b, eb, "vb"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    winner, loser = sorted(results, key=lambda k: results[k].version)
    rw, rl = results[winner], results[loser]
    assert (rw.version, rl.version) == (1, 2)
    # the fault really happened: the loser's create of v1 was refused by the filesystem / S3
    assert rw.conflicts == () and len(rl.conflicts) == 1 and rl.conflicts[0].version == 1
    if make_store.backend == "s3":
        assert rl.conflicts[0].http_status == 412
    assert rl.dropped_video_ids == (shared,) and set(rl.committed_video_ids) == {"v" + loser}
    # no video_id twice, and the shared video's frames are the winner's only
    reader = make_store()
    videos = reader.read_videos()
    assert sorted(videos[S.VIDEO_ID].to_pylist()) == ["shared", "va", "vb"]
    frames = reader.read_frames(video_ids=[shared])
    expected_pts = [100.0, 101.0, 102.0] if winner == "a" else [200.0, 201.0, 202.0]
    assert frames[S.PTS_S].to_pylist() == expected_pts
    m = _manifest_json(reader, 2)
    granted = [v for e in m["videos_files"] for v in e["video_ids"]]
    assert sorted(granted) == ["shared", "va", "vb"]
    assert m["videos"][shared]["committed_version"] == 1


def test_many_committers_without_coordination_all_land_once(make_store):
    n = 4
    stores = [make_store() for _ in range(n)]
    entries = [_stage_frames(s, [(f"v{i}", 0, 1, float(i))]) for i, s in enumerate(stores)]
    versions, errors = [], []

    def run(i):
        try:
            versions.append(stores[i].commit([entries[i]], [_video_row(f"v{i}", frames=1)]))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(versions) == list(range(1, n + 1))
    reader = make_store()
    assert sorted(reader.read_videos()[S.VIDEO_ID].to_pylist()) == [f"v{i}" for i in range(n)]
    assert reader.read_frames().num_rows == n


def test_rerun_with_same_video_ids_replaces_instead_of_duplicating(make_store):
    st = make_store()
    first = [_stage_frames(st, [("a", 0, 2, 0.0), ("b", 0, 2, 10.0)])]
    st.commit(first, [_video_row("a", status=S.STATUS_FAILED, frames=2), _video_row("b", frames=2)])
    # retry of "a" (e.g. retry-failed): new frames, new row; "b" untouched
    second = [_stage_frames(st, [("a", 0, 3, 500.0)])]
    res = st.commit_detailed(second, [_video_row("a", frames=3)])
    assert res.version == 2 and res.replaced_video_ids == ("a",)
    videos = st.read_videos()
    assert videos[S.VIDEO_ID].to_pylist() == ["a", "b"]
    assert videos[S.STATUS].to_pylist() == [S.STATUS_OK, S.STATUS_OK]
    frames = st.read_frames()
    assert frames.filter(pa.compute.equal(frames[S.VIDEO_ID], "a"))[S.PTS_S].to_pylist() == [500.0, 501.0, 502.0]
    assert frames.filter(pa.compute.equal(frames[S.VIDEO_ID], "b"))[S.PTS_S].to_pylist() == [10.0, 11.0]
    # the same rerun again: still one row per video and one copy of each frame
    st.commit([_stage_frames(st, [("a", 0, 3, 500.0)])], [_video_row("a", frames=3)])
    assert st.read_videos().num_rows == 2 and st.read_frames().num_rows == 5
    # old versions stay readable (time travel) and show the old row
    assert st.read_videos(version=1)[S.STATUS].to_pylist() == [S.STATUS_FAILED, S.STATUS_OK]
    assert st.read_frames(version=1).num_rows == 4
    # the old file still serves "b" only: its grant for "a" was removed
    m = _manifest_json(st, 3)
    old = [e for e in m["frames_files"] if e["path"] == first[0]["path"]]
    assert len(old) == 1 and old[0]["video_ids"] == ["b"]


def test_expected_version_drops_videos_committed_by_others_since(make_store):
    st = make_store()
    st.commit([_stage_frames(st, [("x", 0, 1, 0.0)])], [_video_row("x", frames=1)])  # v1
    other = make_store()
    other.commit([_stage_frames(other, [("y", 0, 1, 1.0)])], [_video_row("y", frames=1)])  # v2, by someone else
    # a job whose view is v1 commits x (live at v1: replaced) and y (committed after v1: dropped)
    res = st.commit_detailed([_stage_frames(st, [("x", 0, 2, 9.0), ("y", 0, 2, 9.0)])],
                             [_video_row("x", frames=2), _video_row("y", frames=2)], expected_version=1)
    assert res.version == 3 and res.replaced_video_ids == ("x",) and res.dropped_video_ids == ("y",)
    frames = st.read_frames()
    assert frames.filter(pa.compute.equal(frames[S.VIDEO_ID], "y"))[S.PTS_S].to_pylist() == [1.0]
    assert frames.filter(pa.compute.equal(frames[S.VIDEO_ID], "x")).num_rows == 2
    # everything dropped: no manifest written
    res = st.commit_detailed([], [_video_row("y")], expected_version=1)
    assert res.created is False and res.version == 3 and st.latest_version() == 3
    with pytest.raises(StoreError, match="expected_version"):
        st.commit([], [_video_row("z")], expected_version=7)


def test_committed_inputs_and_statuses_come_from_the_manifest(make_store):
    st = make_store()
    st.commit([], [_video_row("a"), _video_row("b", status=S.STATUS_FAILED, error_type=S.ERR_DECODE,
                                                 mtime=float("nan"))])
    assert st.committed_video_ids() == {"a", "b"}
    assert st.committed_video_ids(statuses=[S.STATUS_FAILED]) == {"b"}
    assert st.committed_video_ids(config_hash="other") == set()
    assert st.committed_inputs() == {"/archive/a.mp4": (1001, 1.5e9, "a"), "/archive/b.mp4": (1001, None, "b")}
    stats = st.stats()
    assert stats["videos"] == 2 and stats["by_status"] == {"failed": 1, "ok": 1}


def test_commit_rejects_bad_input(make_store):
    st = make_store()
    with pytest.raises(StoreError, match="repeated"):
        st.commit([], [_video_row("a"), _video_row("a")])
    with pytest.raises(StoreError, match="no video row"):
        st.commit([_stage_frames(st, [("a", 0, 1, 0.0)])], [_video_row("b")])
    with pytest.raises(StoreError, match="config_hash"):
        st.commit([], [_video_row("a", config_hash=None)])
    with pytest.raises(StoreError, match="not relative"):
        st.commit([{"path": "../../etc/passwd", "video_ids": ["a"], "rows": 1, "bytes": 1}], [_video_row("a")])
    with pytest.raises(StoreError, match="does not exist"):
        st.commit([{"path": "data/frames/missing.parquet", "video_ids": ["a"], "rows": 1}], [_video_row("a")])
    assert st.latest_version() == 0


def test_newer_schema_version_and_bad_manifest_paths_are_refused(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    st.commit([], [_video_row("a")])
    m = _manifest_json(st, 1)
    m2 = dict(m, version=2, schema_version=S.SCHEMA_VERSION + 1)
    (tmp_path / "s" / "_manifests" / "v00000002.json").write_text(json.dumps(m2))
    with pytest.raises(StoreError, match="upgrade"):
        TokenStore(str(tmp_path / "s")).read_videos()
    assert TokenStore(str(tmp_path / "s")).read_videos(version=1).num_rows == 1
    m3 = dict(m, version=3, frames_files=[{"path": "/etc/passwd", "video_ids": ["a"], "rows": 1, "bytes": 1}])
    (tmp_path / "s" / "_manifests" / "v00000003.json").write_text(json.dumps(m3))
    with pytest.raises(StoreError, match="not relative"):
        TokenStore(str(tmp_path / "s")).manifest(3)


def test_iter_frames_matches_read_frames_and_column_projection(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    e1 = _stage_frames(st, [("a", 0, 5, 0.0), ("b", 0, 2, 50.0)])
    e2 = _stage_frames(st, [("a", 1, 4, 5.0)])
    st.commit([e1, e2], [_video_row("a", frames=9), _video_row("b", frames=2)])
    full = st.read_frames(columns=[S.VIDEO_ID, S.PTS_S, S.GLOBAL_TOKEN, S.DIM, S.TOKEN_DTYPE])
    assert full.column_names == [S.VIDEO_ID, S.PTS_S, S.GLOBAL_TOKEN, S.DIM, S.TOKEN_DTYPE]
    assert full.filter(pa.compute.equal(full[S.VIDEO_ID], "a"))[S.PTS_S].to_pylist() == [float(i) for i in range(9)]
    batches = list(st.iter_frames(columns=[S.VIDEO_ID, S.PTS_S], batch_size=3))
    assert all(b.num_rows <= 3 for b in batches)
    got = sorted(zip(*[pa.Table.from_batches(batches)[c].to_pylist() for c in (S.VIDEO_ID, S.PTS_S)]))
    assert got == sorted(zip(full[S.VIDEO_ID].to_pylist(), full[S.PTS_S].to_pylist()))
    # the vectors decode to what was written (value = pts)
    mat = column_to_matrix(full[S.GLOBAL_TOKEN], D, "fp16")
    np.testing.assert_array_equal(mat[:, 0], np.asarray(full[S.PTS_S].to_pylist(), np.float32))
    assert st.read_frames(video_ids=["b"]).num_rows == 2
    with pytest.raises(StoreError, match="unknown column"):
        st.read_frames(columns=["nope"])


# ================================================================ ledger (driver-side aggregation)


def _write_row(vid, ci, last, path, frames, *, file_rows=10, status=S.STATUS_OK, **kw):
    row = {S.VIDEO_ID: vid, S.CHUNK_INDEX: ci, S.IS_LAST: last, FRAMES_FILE: path, FRAMES_FILE_ROWS: file_rows,
           FRAMES_FILE_BYTES: 123, S.FRAMES_IN: frames + 1, S.FRAMES_KEPT: frames, S.PATCHES_TOTAL: 16 * (frames + 1),
           S.PATCHES_KEPT: 5 * frames, S.TOKENS: 2 * frames, S.STORED_BYTES: 40 * frames, S.CONFIG_HASH: "cfg",
           S.URI: f"/archive/{vid}.mp4", S.STATUS: status, S.ENCODER: "enc", S.ENCODER_REVISION: "rev",
           S.SPACE: "space", S.DURATION_S: 30.0 if last else None, S.FRAMES_SAMPLED: 40 if last else None}
    row.update(kw)
    return row


def test_ledger_commits_a_video_only_when_all_chunks_arrived_and_sums_them(make_store):
    st = make_store()
    f1 = _stage_frames(st, [("a", 1, 3, 10.0), ("b", 0, 2, 90.0)])["path"]
    f0 = _stage_frames(st, [("a", 0, 2, 0.0)])["path"]
    led = ChunkLedger()
    led.add([_write_row("a", 1, True, f1, 3), _write_row("b", 0, True, f1, 2)])
    assert led.complete_video_ids() == ["b"] and led.pending() == {"a": [0]}
    res = led.commit(st)
    assert res.version == 1 and res.committed_video_ids == ("b",)
    assert st.read_frames()[S.VIDEO_ID].to_pylist() == ["b", "b"]  # a's rows in f1 are not granted yet
    led.add({k: np.asarray([v], dtype=object) for k, v in _write_row("a", 0, False, f0, 2).items()})
    res = led.commit(st)
    assert res.version == 2 and res.committed_video_ids == ("a",)
    assert led.commit(st) is None and led.pending() == {}
    row = st.read_videos(video_ids=["a"]).to_pylist()[0]
    assert (row[S.FRAMES_KEPT], row[S.PATCHES_TOTAL], row[S.PATCHES_KEPT], row[S.TOKENS], row[S.STORED_BYTES]) == \
        (5, 16 * 7, 25, 10, 200)
    assert row[S.DURATION_S] == 30.0 and row[S.FRAMES_SAMPLED] == 40 and row[S.ENCODER] == "enc"
    frames = st.read_frames(video_ids=["a"])
    assert frames[S.PTS_S].to_pylist() == [0.0, 1.0, 10.0, 11.0, 12.0]
    m = _manifest_json(st, 2)
    assert [e for e in m["frames_files"] if e["path"] == f1][0]["video_ids"] == ["a", "b"]  # one entry, merged


def test_ledger_grants_a_chunk_written_twice_only_once(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    # a retried task wrote chunk 1 again, in a file that also holds chunk 2
    fa = _stage_frames(st, [("a", 0, 2, 0.0), ("a", 1, 2, 10.0)])["path"]
    fb = _stage_frames(st, [("a", 1, 2, 10.0), ("a", 2, 2, 20.0)])["path"]
    led = ChunkLedger()
    led.add([_write_row("a", 0, False, fa, 2), _write_row("a", 1, False, fa, 2),
             _write_row("a", 1, False, fb, 2), _write_row("a", 2, True, fb, 2)])
    assert led.duplicates == 1
    led.commit(st)
    frames = st.read_frames()
    assert frames[S.PTS_S].to_pylist() == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]
    assert st.read_videos()[S.FRAMES_KEPT].to_pylist() == [6]
    entry = [e for e in st.manifest()["frames_files"] if e["path"] == fb][0]
    assert entry["chunks"] == {"a": [2]}
    # a late duplicate of a committed video is ignored, not re-committed
    led.add([_write_row("a", 2, True, fb, 2)])
    assert led.commit(st) is None and led.duplicates == 2


def test_ledger_failed_chunk_fails_the_video_and_grants_no_frames(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    f = _stage_frames(st, [("a", 0, 2, 0.0)])["path"]
    led = ChunkLedger()
    led.add([_write_row("a", 0, False, f, 2), _write_row("a", 1, True, "", 0, chunk_error="WriteShards: boom")])
    led.commit(st)
    row = st.read_videos().to_pylist()[0]
    assert row[S.STATUS] == S.STATUS_FAILED and row[S.ERROR_TYPE] == S.ERR_INTERNAL and "boom" in row[S.ERROR]
    assert row[S.FRAMES_KEPT] == 0 and st.read_frames().num_rows == 0


def test_ledger_keeps_videos_when_the_commit_fails(tmp_path, monkeypatch):
    st = TokenStore(str(tmp_path / "s"))
    led = ChunkLedger()
    led.add([_write_row("a", 0, True, "", 0)])

    def boom(*a, **k):
        raise OSError("store unreachable")

    monkeypatch.setattr(st, "commit_detailed", boom)
    with pytest.raises(OSError):
        led.commit(st)
    monkeypatch.undo()
    assert led.complete_video_ids() == ["a"]
    assert led.commit(st).version == 1


# ================================================================ stats


def test_payload_stats_per_layout(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    st.commit([_stage_frames(st, [("a", 0, 6, 0.0)])], [_video_row("a", frames=6, duration_s=1800.0)])
    stats = st.payload_stats()
    s = stats["global:fp16"]
    # 6 frames x (8 fp16 = 16 bytes + 4 scale bytes) over half an hour
    assert s["frames"] == 6 and s["global_bytes"] == 6 * 20 and s["payload_bytes"] == 120
    assert s["hours"] == 0.5 and s["bytes_per_hour"] == 240.0


def test_s3_staged_files_use_plain_puts_and_vacuum_lists_them(make_store):
    """On S3 (and disk) a staged file of a job that never commits is an orphan and nothing else."""
    st = make_store()
    e = _stage_frames(st, [("a", 0, 1, 0.0)])
    st.commit([e], [_video_row("a", frames=1)])
    orphan = _stage_frames(st, [("b", 0, 1, 0.0)])
    assert st.vacuum(min_age_s=0) == [orphan["path"]]
    names = {posixpath.basename(p) for p in st.fs.ls(st.path("data/frames"), detail=False)}
    assert posixpath.basename(e["path"]) in names


def test_local_manifest_create_is_exclusive(tmp_path):
    """The local create-only primitive fails on an existing name and leaves no temp files behind."""
    from ray_vlm.core.fs import get_filesystem

    fs = get_filesystem("file")
    p = str(tmp_path / "m" / "v00000001.json")
    store_mod.create_only(fs, p, b"one")
    with pytest.raises(FileExistsError):
        store_mod.create_only(fs, p, b"two")
    assert open(p, "rb").read() == b"one"
    assert os.listdir(tmp_path / "m") == ["v00000001.json"]


def test_a_manifest_put_whose_reply_was_lost_counts_as_committed(tmp_path, monkeypatch):
    """s3fs retries a PUT whose reply was lost; the retry's 412 must not make us commit a second time."""
    st = TokenStore(str(tmp_path / "s"))
    real = store_mod.create_only

    def landed_then_412(fs, path, data):
        real(fs, path, data)
        raise FileExistsError("PreconditionFailed on the retried PUT")

    monkeypatch.setattr(store_mod, "create_only", landed_then_412)
    res = st.commit_detailed([], [_video_row("a")])
    assert res.version == 1 and res.conflicts == () and res.committed_video_ids == ("a",)
    assert TokenStore(str(tmp_path / "s")).versions() == [1]
