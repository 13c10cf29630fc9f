"""Token store (v2, Lance): vector codecs, commits and their visibility (local disk and S3 via moto), concurrent
committers, time-ranged commits through the ledger, compaction, segments, schema versions, v1 migration.

What landed is checked with Lance directly (``fixtures.stores.read_committed``) where the point is what is on
disk; the store's readers are checked for what they make visible. Races are asserted to have happened (the loser
really lost a video), so no test passes by accident.
"""

from __future__ import annotations

import json
import threading
import uuid

import lance
import numpy as np
import pyarrow as pa
import pytest

from fixtures.stores import read_committed
from ray_vlm.core import schema as S
from ray_vlm.store.codec import column_to_matrix, decode_vectors, quantize, vectors_per_row
from ray_vlm.store.token_store import (
    CHUNK_END_S,
    FRAMES_FILE,
    GENERATION,
    WRITE_ID,
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
    """Factory of TokenStore instances on one fresh store root (each call: a new store object, as another process
    would have)."""
    if request.param == "local":
        uri, opts = str(tmp_path / "store"), None
    else:
        bucket, opts = request.getfixturevalue("s3_bucket")
        opts = dict(opts, skip_instance_cache=True)
        uri = f"s3://{bucket}/stores/{uuid.uuid4().hex[:8]}"

    def make() -> TokenStore:
        return TokenStore(uri, storage_options=opts)

    make.backend = request.param
    make.uri, make.opts = uri, opts
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


def _write(store: TokenStore, chunks, generation: str = "g1") -> tuple[str, str]:
    """Write frames as the write operator does; returns (fragments JSON, write id)."""
    wid = uuid.uuid4().hex
    return json.dumps(store.write_frames(_frames_table(chunks), generation, wid)), wid


def _video_row(vid: str, status: str = S.STATUS_OK, frames: int = 0, generation: str = "g1", **kw) -> dict:
    row = {S.VIDEO_ID: vid, S.URI: f"/archive/{vid}.mp4", S.STATUS: status, S.SIZE_BYTES: 1000 + len(vid),
           S.MTIME: 1.5e9, S.FRAMES_KEPT: frames, S.DURATION_S: float(frames), S.CONFIG_HASH: "cfg",
           S.INDEXED_AT: 1.0, "generation": generation}
    row.update(kw)
    return row


def _pts(table: pa.Table, vid: str) -> list[float]:
    return table.filter(pa.compute.equal(table[S.VIDEO_ID], vid))[S.PTS_S].to_pylist()


# ================================================================ commits and visibility


def test_readers_see_nothing_before_the_sources_commit(make_store):
    st = make_store()
    assert st.latest_version() == 0 and st.read_frames().num_rows == 0 and st.read_videos().num_rows == 0
    frags, _ = _write(st, [("a", 0, 3, 0.0)])
    # the rows are written (a Lance fragment exists), but no sources version names them: invisible
    assert st.latest_version() == 0 and st.read_frames().num_rows == 0
    v = st.commit([frags], [_video_row("a", frames=3)])
    assert v == 1
    other = make_store()  # a fresh reader (another process) sees it
    assert other.latest_version() == 1
    frames = other.read_frames()
    assert frames.schema.equals(S.FRAMES_SCHEMA)
    assert frames[S.PTS_S].to_pylist() == [0.0, 1.0, 2.0]
    assert other.read_videos()[S.VIDEO_ID].to_pylist() == ["a"]
    videos, oracle = read_committed(make_store.uri, make_store.opts)
    assert [v[S.VIDEO_ID] for v in videos] == ["a"] and [f[S.PTS_S] for f in oracle] == [0.0, 1.0, 2.0]
    m = other.manifest()
    assert m["counts"]["videos"] == 1 and m["counts"]["frames"] == 3 and m["videos"]["a"]["committed_version"] == 1


def test_kill_between_frames_and_sources_commit_leaves_readers_on_the_old_version(make_store):
    st = make_store()
    frags, _ = _write(st, [("a", 0, 2, 0.0)])
    v1 = st.commit([frags], [_video_row("a", frames=2)])

    class Killed(BaseException):
        pass

    def die(version):
        raise Killed()

    frags_b, _ = _write(st, [("b", 0, 4, 10.0)])
    st._before_sources_commit = die  # the frames are appended, then the job dies before the sources commit
    with pytest.raises(Killed):
        st.commit([frags_b], [_video_row("b", frames=4)])
    reader = make_store()
    assert reader.latest_version() == v1 == 1
    assert reader.read_videos()[S.VIDEO_ID].to_pylist() == ["a"]
    assert reader.read_frames()[S.VIDEO_ID].to_pylist() == ["a", "a"]
    assert lance.dataset(st.dataset_uri("frames"), storage_options=st.lance_options).count_rows() == 6
    # compaction removes the invisible rows, but only once they are older than the grace
    assert reader.compact(retention_s=3600)["removed_rows"] == 0
    assert reader.compact(retention_s=0)["removed_rows"] == 4
    assert lance.dataset(st.dataset_uri("frames"), storage_options=st.lance_options).count_rows() == 2
    assert reader.read_frames().num_rows == 2
    # a rerun commits b
    frags_b, _ = _write(reader, [("b", 0, 4, 10.0)])
    assert reader.commit([frags_b], [_video_row("b", frames=4)]) > v1
    assert sorted(reader.read_videos()[S.VIDEO_ID].to_pylist()) == ["a", "b"]


def test_two_concurrent_committers_one_wins_the_other_drops_the_shared_video(make_store):
    a, b = make_store(), make_store()
    shared = "shared"
    fa, _ = _write(a, [("va", 0, 2, 0.0), (shared, 0, 3, 100.0)], "ga")
    fb, _ = _write(b, [("vb", 0, 2, 50.0), (shared, 0, 3, 200.0)], "gb")
    barrier = threading.Barrier(2, timeout=30)

    def hook(version):  # both have read the store before either commits
        barrier.wait()

    a._before_sources_commit = b._before_sources_commit = hook
    results, errors = {}, []

    def run(name, st, frags, vid, gen):
        try:
            results[name] = st.commit_detailed(
                [frags], [_video_row(vid, frames=2, generation=gen), _video_row(shared, frames=3, generation=gen)])
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", a, fa, "va", "ga")),
               threading.Thread(target=run, args=("b", b, fb, "vb", "gb"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    won = [k for k in results if shared in results[k].committed_video_ids]
    lost = [k for k in results if shared in results[k].dropped_video_ids]
    assert len(won) == 1 and len(lost) == 1, results  # the race really happened, and exactly one won it
    winner, loser = won[0], lost[0]
    assert results[loser].committed_video_ids == ("v" + loser,)
    assert results[loser].conflicts and results[loser].conflicts[0].video_id == shared
    reader = make_store()
    videos = reader.read_videos()
    assert sorted(videos[S.VIDEO_ID].to_pylist()) == ["shared", "va", "vb"]
    assert _pts(reader.read_frames(), shared) == ([100.0, 101.0, 102.0] if winner == "a" else [200.0, 201.0, 202.0])
    rows, frames = read_committed(make_store.uri, make_store.opts)
    assert sorted(r[S.VIDEO_ID] for r in rows) == ["shared", "va", "vb"]
    assert sorted(f[S.PTS_S] for f in frames if f[S.VIDEO_ID] == shared) == _pts(reader.read_frames(), shared)
    # the loser's duplicate sources row (if it landed) was deleted: one row per video on disk
    src = lance.dataset(reader.dataset_uri("sources"), storage_options=reader.lance_options).to_table()
    assert sorted(src[S.VIDEO_ID].to_pylist()) == ["shared", "va", "vb"]


def test_many_committers_without_coordination_all_land_once(make_store):
    n = 4
    stores = [make_store() for _ in range(n)]
    frags = [_write(s, [(f"v{i}", 0, 1, float(i))], f"g{i}")[0] for i, s in enumerate(stores)]
    versions, errors = [], []

    def run(i):
        try:
            versions.append(stores[i].commit([frags[i]], [_video_row(f"v{i}", frames=1, generation=f"g{i}")]))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(set(versions)) == n
    reader = make_store()
    assert sorted(reader.read_videos()[S.VIDEO_ID].to_pylist()) == [f"v{i}" for i in range(n)]
    assert reader.read_frames().num_rows == n


def test_rerun_with_same_video_ids_replaces_instead_of_duplicating(make_store):
    st = make_store()
    f1, _ = _write(st, [("a", 0, 2, 0.0), ("b", 0, 2, 10.0)], "g1")
    st.commit([f1], [_video_row("a", status=S.STATUS_FAILED, frames=2), _video_row("b", frames=2)])
    # retry of "a" (e.g. retry-failed): a new generation's frames and row; "b" untouched
    f2, _ = _write(st, [("a", 0, 3, 500.0)], "g2")
    res = st.commit_detailed([f2], [_video_row("a", frames=3, generation="g2")])
    assert res.version == 2 and res.replaced_video_ids == ("a",)
    videos = st.read_videos()
    assert videos[S.VIDEO_ID].to_pylist() == ["a", "b"]
    assert videos[S.STATUS].to_pylist() == [S.STATUS_OK, S.STATUS_OK]
    frames = st.read_frames()
    assert _pts(frames, "a") == [500.0, 501.0, 502.0] and _pts(frames, "b") == [10.0, 11.0]
    # the same rerun again: still one row per video and one copy of each frame
    f3, _ = _write(st, [("a", 0, 3, 500.0)], "g3")
    st.commit([f3], [_video_row("a", frames=3, generation="g3")])
    assert st.read_videos().num_rows == 2 and st.read_frames().num_rows == 5
    # old versions stay readable (time travel) and show the old row; a failed video shows no frames
    assert st.read_videos(version=1)[S.STATUS].to_pylist() == [S.STATUS_FAILED, S.STATUS_OK]
    assert st.read_frames(version=1).num_rows == 2
    assert st.read_frames(version=2).num_rows == 5


def test_expected_version_drops_videos_committed_by_others_since(make_store):
    st = make_store()
    st.commit([_write(st, [("x", 0, 1, 0.0)])[0]], [_video_row("x", frames=1)])  # v1
    other = make_store()
    other.commit([_write(other, [("y", 0, 1, 1.0)], "gy")[0]], [_video_row("y", frames=1, generation="gy")])  # v2
    # a job whose view is v1 commits x (live at v1: replaced) and y (committed after v1: dropped)
    f, _ = _write(st, [("x", 0, 2, 9.0), ("y", 0, 2, 9.0)], "g9")
    res = st.commit_detailed([f], [_video_row("x", frames=2, generation="g9"),
                                   _video_row("y", frames=2, generation="g9")], expected_version=1)
    assert res.version == 3 and res.replaced_video_ids == ("x",) and res.dropped_video_ids == ("y",)
    frames = st.read_frames()
    assert _pts(frames, "y") == [1.0] and len(_pts(frames, "x")) == 2
    # everything dropped: no version written
    res = st.commit_detailed([], [_video_row("y")], expected_version=1)
    assert res.created is False and res.version == 3 and st.latest_version() == 3
    with pytest.raises(StoreError, match="expected_version"):
        st.commit([], [_video_row("z")], expected_version=7)


def test_committed_inputs_and_statuses_come_from_the_sources(make_store):
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
    with pytest.raises(StoreError, match="config_hash"):
        st.commit([], [_video_row("a", config_hash=None)])
    with pytest.raises(StoreError, match="not JSON"):
        st.commit(["{not json"], [_video_row("a")])
    with pytest.raises(StoreError, match="video_id"):
        st.commit([], [_video_row("")])
    assert st.latest_version() == 0


def test_newer_schema_version_and_v1_stores_are_refused_with_what_to_do(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    st.commit([], [_video_row("a")])
    desc = tmp_path / "s" / "ray_vlm_store.json"
    meta = json.loads(desc.read_text())
    desc.write_text(json.dumps(dict(meta, schema_version=S.SCHEMA_VERSION + 1)))
    with pytest.raises(StoreError, match="upgrade ray-vlm"):
        TokenStore(str(tmp_path / "s")).read_videos()
    desc.write_text(json.dumps(dict(meta, format="something/else")))
    with pytest.raises(StoreError, match="unknown format"):
        TokenStore(str(tmp_path / "s")).latest_version()
    (tmp_path / "v1" / "_manifests").mkdir(parents=True)
    with pytest.raises(StoreError, match="ray-vlm migrate"):
        TokenStore(str(tmp_path / "v1")).latest_version()


def test_iter_frames_matches_read_frames_and_column_projection(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    e1, _ = _write(st, [("a", 0, 5, 0.0), ("b", 0, 2, 50.0)])
    e2, _ = _write(st, [("a", 1, 4, 5.0)])
    st.commit([e1, e2], [_video_row("a", frames=9), _video_row("b", frames=2)])
    full = st.read_frames(columns=[S.VIDEO_ID, S.PTS_S, S.GLOBAL_TOKEN, S.DIM, S.TOKEN_DTYPE])
    assert full.column_names == [S.VIDEO_ID, S.PTS_S, S.GLOBAL_TOKEN, S.DIM, S.TOKEN_DTYPE]
    assert _pts(full, "a") == [float(i) for i in range(9)]
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


def test_segments_track_follows_its_sources_visibility(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    seg = pa.Table.from_pylist([
        {S.VIDEO_ID: "a", S.TRACK: "speech", S.START_S: 1.0, S.END_S: 2.5, S.TEXT: "hello", S.EMBEDDING: [0.1, 0.2],
         S.CONFIDENCE: 0.9, S.LINEAGE: '{"model": "asr"}', S.CHUNK_INDEX: 0},
        {S.VIDEO_ID: "a", S.TRACK: "ocr", S.START_S: 0.0, S.END_S: 4.0, S.TEXT: "EXIT", S.EMBEDDING: None,
         S.CONFIDENCE: None, S.LINEAGE: None, S.CHUNK_INDEX: 0},
    ], schema=S.SEGMENTS_SCHEMA)
    res = st.add_videos(_frames_table([("a", 0, 2, 0.0)]), [_video_row("a", frames=2)], segments=seg)
    assert res.version == 1
    got = st.read_segments()
    assert got.schema.equals(S.SEGMENTS_SCHEMA) and got[S.TEXT].to_pylist() == ["EXIT", "hello"]
    assert st.read_segments(track="speech")[S.EMBEDDING].to_pylist() == [pytest.approx([0.1, 0.2])]
    # the source fails on a retry: its segments and frames vanish with it
    st.commit([], [_video_row("a", status=S.STATUS_FAILED, generation="g2")])
    assert st.read_segments().num_rows == 0 and st.read_frames().num_rows == 0
    assert st.read_segments(version=1).num_rows == 2


# ================================================================ ledger: time-ranged commits


def _write_row(vid, ci, last, frags, frames, *, status=S.STATUS_OK, wid="w", gen="g1", end=None, **kw):
    row = {S.VIDEO_ID: vid, S.CHUNK_INDEX: ci, S.IS_LAST: last, FRAMES_FILE: frags, WRITE_ID: wid if frags else "",
           GENERATION: gen, S.FRAMES_IN: frames + 1, S.FRAMES_KEPT: frames, S.PATCHES_TOTAL: 16 * (frames + 1),
           S.PATCHES_KEPT: 5 * frames, S.TOKENS: 2 * frames, S.STORED_BYTES: 40 * frames, S.CONFIG_HASH: "cfg",
           S.URI: f"/archive/{vid}.mp4", S.STATUS: status, S.ENCODER: "enc", S.ENCODER_REVISION: "rev",
           S.SPACE: "space", S.DURATION_S: 30.0 if last else None, S.FRAMES_SAMPLED: 40 if last else None,
           CHUNK_END_S: float(end if end is not None else 10 * (ci + 1))}
    row.update(kw)
    return row


def test_ledger_commits_gap_free_prefixes_as_partial_then_the_final_row(make_store):
    st = make_store()
    f1, w1 = _write(st, [("a", 1, 3, 10.0), ("b", 0, 2, 90.0)])
    f0, w0 = _write(st, [("a", 0, 2, 0.0)])
    led = ChunkLedger()
    led.add([_write_row("a", 1, True, f1, 3, wid=w1), _write_row("b", 0, True, f1, 2, wid=w1)])
    assert led.complete_video_ids() == ["b"] and led.pending() == {"a": [0]}
    res = led.commit(st)
    assert res.version == 1 and res.committed_video_ids == ("b",)  # a has a gap before chunk 1: nothing of it
    assert st.read_frames()[S.VIDEO_ID].to_pylist() == ["b", "b"]
    led.add({k: np.asarray([v], dtype=object) for k, v in _write_row("a", 0, False, f0, 2, wid=w0).items()})
    res = led.commit(st)
    assert res.committed_video_ids == ("a",)
    assert led.commit(st) is None and led.pending() == {}
    row = st.read_videos(video_ids=["a"]).to_pylist()[0]
    assert (row[S.FRAMES_KEPT], row[S.PATCHES_TOTAL], row[S.PATCHES_KEPT], row[S.TOKENS], row[S.STORED_BYTES]) == \
        (5, 16 * 7, 25, 10, 200)
    assert row[S.DURATION_S] == 30.0 and row[S.FRAMES_SAMPLED] == 40 and row[S.ENCODER] == "enc"
    assert row[S.STATUS] == S.STATUS_OK and row[S.CHUNKS_COMMITTED] == 2
    assert _pts(st.read_frames(video_ids=["a"]), "a") == [0.0, 1.0, 10.0, 11.0, 12.0]


def test_ledger_commits_a_long_video_chunk_by_chunk_and_a_new_job_resumes_it(make_store):
    st = make_store()
    led = ChunkLedger()
    for ci in range(3):  # chunks 0..2 of a video whose last chunk is 4
        f, w = _write(st, [("long", ci, 2, 10.0 * ci)])
        led.add([_write_row("long", ci, False, f, 2, wid=w)])
        led.commit(st)
        rec = st.manifest()["videos"]["long"]
        assert (rec["status"], rec["chunks_committed"], rec["resume_s"]) == (S.STATUS_PARTIAL, ci + 1, 10.0 * (ci + 1))
        assert rec["next_frame_index"] == 3 * (ci + 1) and rec["frames_kept"] == 2 * (ci + 1)
        assert st.read_frames().num_rows == 2 * (ci + 1)  # readers see whole chunks as they land
    # the job dies; a new job (another generation) resumes from the committed prefix
    base = {"long": st.manifest()["videos"]["long"]}
    led2 = ChunkLedger(base)
    f3, w3 = _write(st, [("long", 3, 2, 30.0), ("long", 4, 1, 40.0)], "g2")
    led2.add([_write_row("long", 3, False, f3, 2, wid=w3, gen="g2"),
              _write_row("long", 4, True, f3, 1, wid=w3, gen="g2")])
    res = led2.commit(st)
    assert res.committed_video_ids == ("long",)
    rec = st.manifest()["videos"]["long"]
    assert rec["status"] == S.STATUS_OK and rec["chunks_committed"] == 5 and rec["frames_kept"] == 9
    assert rec["generations"] == [(0, "g1"), (3, "g2")]
    frames = st.read_frames()
    assert _pts(frames, "long") == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 40.0]
    _, oracle = read_committed(make_store.uri, make_store.opts)
    assert sorted((f[S.CHUNK_INDEX], f["generation"]) for f in oracle) == \
        [(0, "g1")] * 2 + [(1, "g1")] * 2 + [(2, "g1")] * 2 + [(3, "g2")] * 2 + [(4, "g2")]
    # a second resumer of the same prefix loses: the row moved on
    led3 = ChunkLedger(base)
    f3b, w3b = _write(st, [("long", 3, 2, 30.0)], "g3")
    led3.add([_write_row("long", 3, False, f3b, 2, wid=w3b, gen="g3")])
    res = led3.commit(st)
    assert res.dropped_video_ids == ("long",) and st.read_frames().num_rows == 9


def test_ledger_deletes_the_second_copy_of_a_chunk_written_twice(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    # a retried task wrote chunk 1 again, in fragments that also hold chunk 2
    fa, wa = _write(st, [("a", 0, 2, 0.0), ("a", 1, 2, 10.0)])
    fb, wb = _write(st, [("a", 1, 2, 10.0), ("a", 2, 2, 20.0)])
    led = ChunkLedger()
    led.add([_write_row("a", 0, False, fa, 2, wid=wa), _write_row("a", 1, False, fa, 2, wid=wa),
             _write_row("a", 1, False, fb, 2, wid=wb), _write_row("a", 2, True, fb, 2, wid=wb)])
    assert led.duplicates == 1
    led.commit(st)
    assert st.read_frames()[S.PTS_S].to_pylist() == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]
    assert st.read_videos()[S.FRAMES_KEPT].to_pylist() == [6]
    on_disk = lance.dataset(st.dataset_uri("frames")).to_table().to_pylist()
    assert sorted(r[S.PTS_S] for r in on_disk) == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]  # the copy is gone
    # a late duplicate of a committed video is ignored, not re-committed
    led.add([_write_row("a", 2, True, fb, 2, wid="late")])
    assert led.commit(st) is None and led.duplicates == 2


def test_ledger_failed_chunk_fails_the_video_and_hides_its_committed_chunks(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    f, w = _write(st, [("a", 0, 2, 0.0)])
    led = ChunkLedger()
    led.add([_write_row("a", 0, False, f, 2, wid=w)])
    led.commit(st)
    assert st.read_frames().num_rows == 2  # the first chunk was visible while the video was partial
    led.add([_write_row("a", 1, True, "", 0, chunk_error="WriteShards: boom")])
    led.commit(st)
    row = st.read_videos().to_pylist()[0]
    assert row[S.STATUS] == S.STATUS_FAILED and row[S.ERROR_TYPE] == S.ERR_INTERNAL and "boom" in row[S.ERROR]
    assert row[S.FRAMES_KEPT] == 0 and st.read_frames().num_rows == 0


def test_ledger_keeps_its_work_when_the_commit_fails(tmp_path, monkeypatch):
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


# ================================================================ stats and maintenance


def test_payload_stats_per_layout(tmp_path):
    st = TokenStore(str(tmp_path / "s"))
    st.add_videos(_frames_table([("a", 0, 6, 0.0)]), [_video_row("a", frames=6, duration_s=1800.0)])
    stats = st.payload_stats()
    s = stats["global:fp16"]
    # 6 frames x (8 fp16 = 16 bytes + 4 scale bytes) over half an hour
    assert s["frames"] == 6 and s["global_bytes"] == 6 * 20 and s["payload_bytes"] == 120
    assert s["hours"] == 0.5 and s["bytes_per_hour"] == 240.0


def test_compaction_merges_fragments_keeps_answers_and_cleans_old_versions(make_store):
    st = make_store()
    for i in range(12):  # twelve small commits: twelve fragments
        st.add_videos(_frames_table([(f"v{i}", 0, 5, 0.0)]), [_video_row(f"v{i}", frames=5)])
    before = st.read_frames()
    n_frags = len(lance.dataset(st.dataset_uri("frames"), storage_options=st.lance_options).get_fragments())
    assert n_frags == 12
    pinned = make_store()
    old_version = pinned.latest_version()
    old_committed = {v: r["committed_version"] for v, r in pinned.manifest(old_version)["videos"].items()}
    assert st.maybe_compact(retention_s=0, max_small=64) is None  # 12 small fragments: the policy waits
    out = st.maybe_compact(retention_s=0, max_small=4)  # more than 4 beyond what the data needs: compact
    assert out is not None and out["fragments_before"] > out["fragments_after"]
    frames_ds = lance.dataset(st.dataset_uri("frames"), storage_options=st.lance_options)
    assert len(frames_ds.get_fragments()) == 1
    assert st.read_frames().equals(before)
    # compaction rewrites files: the sources dataset gets a new version holding the same rows, and each video
    # keeps the version that committed it (what the window index keys its shards on)
    assert st.latest_version() > old_version
    assert {v: r["committed_version"] for v, r in st.manifest()["videos"].items()} == old_committed
    # old versions stay readable until the retention removes them (here 0 s: gone)
    assert old_version not in st.versions()
    with pytest.raises(StoreError, match="does not exist"):
        make_store().read_videos(version=old_version)
    assert st.maybe_compact(max_small=64) is None  # nothing left to compact


def test_a_reader_keeps_answering_its_version_after_a_compaction_removed_the_files_it_had_open(make_store):
    """A reader reuses its dataset handle for point reads; compaction with no retention deletes the files that
    handle names: the next read of the same version opens the compacted dataset and returns the same rows."""
    st = make_store()
    for i in range(6):
        st.add_videos(_frames_table([(f"v{i}", 0, 5, 0.0), (f"v{i}", 1, 5, 5.0)]), [_video_row(f"v{i}", frames=10)])
    reader = make_store()
    version = reader.latest_version()
    before = reader.read_frames(version, video_ids=["v1", "v4"])
    assert before.num_rows == 20
    out = make_store().compact(retention_s=0)
    assert out["fragments_after"] < out["fragments_before"] and out["bytes_removed"] > 0
    again = reader.read_frames(version, video_ids=["v1", "v4"])  # the manifest of `version` is the reader's own
    assert again.equals(before)
    assert reader.read_frames(video_ids=["v1", "v4"]).equals(before)  # and at the version compaction created


# ================================================================ v1 stores


def test_migrate_a_v1_store_loses_nothing(tmp_path):
    """The v1 fixture was written by ray-vlm 0.1's writer (four sample clips, then a broken file)."""
    from pathlib import Path

    from ray_vlm.store.migrate import migrate
    from ray_vlm.store.v1 import V1Store

    old = Path(__file__).parent / "data" / "store_v1"
    v1 = V1Store(str(old))
    new = tmp_path / "v2"
    report = migrate(str(old), str(new))
    st = TokenStore(str(new))
    assert report["videos"] == 5 and report["frames"] == v1.read_frames().num_rows == 26
    old_videos, new_videos = v1.read_videos(), st.read_videos()
    for name in old_videos.schema.names:
        assert new_videos[name].to_pylist() == old_videos[name].to_pylist(), name
    old_frames, new_frames = v1.read_frames(), st.read_frames()
    assert new_frames.equals(old_frames.cast(new_frames.schema))
    rows, frames = read_committed(new)
    assert len(rows) == 5 and len(frames) == 26
    with pytest.raises(StoreError, match="not empty"):
        migrate(str(old), str(new))
    with pytest.raises(StoreError, match="ray-vlm migrate"):
        TokenStore(str(old)).read_videos()
