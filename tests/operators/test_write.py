"""WriteShards: Lance fragments whose rows match FRAMES_SCHEMA (checked with Lance directly), per-chunk rows the
driver can commit, retry-safe writes, and per-chunk failures as data."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest

from ray_vlm.core import schema as S
from ray_vlm.core.config import CompressConfig
from ray_vlm.operators.compress import CompressTokens
from ray_vlm.operators.write import WriteShards
from ray_vlm.store.token_store import (
    CHUNK_ERROR,
    FRAMES_FILE,
    FRAMES_FILE_BYTES,
    FRAMES_FILE_ROWS,
    GENERATION,
    WRITE_ID,
    ChunkLedger,
    TokenStore,
)

pytestmark = pytest.mark.timeout(60)
D, GH, GW = 16, 3, 3


def _objects(items):
    col = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        col[i] = x
    return col


def _chunks(specs, compress=CompressConfig(grid=2, patches=True, dtype="int8"), seed=0):
    """Compressed chunk rows for ``(video_id, chunk_index, is_last, n_frames, status)`` specs."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in (S.GLOBAL_EMB, S.PATCH_EMB, S.KEEP_MASK, S.VIDEO_ID, S.URI, S.CHUNK_INDEX, S.IS_LAST,
                            S.STATUS, S.ERROR_TYPE, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S, S.ENCODER,
                            S.ENCODER_REVISION, S.SPACE, S.DURATION_S, S.FRAMES_SAMPLED, S.SIZE_BYTES, S.MTIME,
                            S.WIDTH)}
    for vid, ci, last, t, status in specs:
        mask = rng.random((t, GH, GW)) > 0.4
        mask[:, 1, 1] = True
        cols[S.GLOBAL_EMB].append(rng.normal(size=(t, D)).astype(np.float32))
        cols[S.PATCH_EMB].append(rng.normal(size=(t, GH * GW, D)).astype(np.float32))
        cols[S.KEEP_MASK].append(mask)
        cols[S.VIDEO_ID].append(vid)
        cols[S.URI].append(f"s3://archive/{vid}.mp4")
        cols[S.CHUNK_INDEX].append(ci)
        cols[S.IS_LAST].append(last)
        cols[S.STATUS].append(status)
        cols[S.ERROR_TYPE].append(S.ERR_DECODE if status == S.STATUS_FAILED else None)
        cols[S.FRAME_INDEX].append(np.arange(t, dtype=np.int32) + 100 * ci)
        pts = np.arange(t, dtype=np.float64) * 2.0 + 100.0 * ci
        cols[S.PTS_S].append(pts)
        cols[S.SPAN_END_S].append(pts + 2.0)
        enc = t > 0 or status != S.STATUS_FAILED
        cols[S.ENCODER].append("bundled:test" if enc else None)
        cols[S.ENCODER_REVISION].append("abc123" if enc else None)
        cols[S.SPACE].append("space-1" if enc else None)
        cols[S.DURATION_S].append(2.0 * t + 100.0 * ci if last else np.nan)
        cols[S.FRAMES_SAMPLED].append(t + ci * 10 if last else 0)
        cols[S.SIZE_BYTES].append(12345)
        cols[S.MTIME].append(np.nan)
        cols[S.WIDTH].append(640)
    batch = {}
    for k, v in cols.items():
        if k in (S.GLOBAL_EMB, S.PATCH_EMB, S.KEEP_MASK, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S):
            batch[k] = _objects(v)
        elif k in (S.CHUNK_INDEX, S.FRAMES_SAMPLED, S.SIZE_BYTES, S.WIDTH):
            batch[k] = np.asarray(v, dtype=np.int64)
        elif k in (S.DURATION_S, S.MTIME):
            batch[k] = np.asarray(v, dtype=np.float64)
        elif k == S.IS_LAST:
            batch[k] = np.asarray(v, dtype=bool)
        else:
            batch[k] = np.asarray(v, dtype=object)
    return CompressTokens(compress)(batch), batch


def _fragment_rows(store, frags_json: str) -> pa.Table:
    """The rows of the fragments a write returned, read with Lance (appended to a scratch copy of nothing)."""
    frags = [lance.FragmentMetadata.from_json(json.dumps(f)) for f in json.loads(frags_json)]
    ds = lance.dataset(str(store / "frames.lance"))
    committed = lance.LanceDataset.commit(str(store / "frames.lance"), lance.LanceOperation.Append(frags),
                                          read_version=ds.version)
    return committed.to_table()


def test_frames_fragments_match_the_schema_and_the_inputs(tmp_path):
    store = tmp_path / "store"
    comp, raw = _chunks([("a", 0, False, 3, S.STATUS_OK), ("a", 1, True, 2, S.STATUS_OK),
                         ("b", 0, True, 4, S.STATUS_OK)])
    op = WriteShards(str(store), "cfghash0001", generation="g1")
    out = op(comp)
    assert len(set(out[FRAMES_FILE])) == 1 and len(set(out[WRITE_ID])) == 1
    assert set(out[GENERATION]) == {"g1"}
    assert TokenStore(str(store)).read_frames().num_rows == 0  # written, not committed: invisible
    table = _fragment_rows(store, out[FRAMES_FILE][0])
    # the schema exactly: FRAMES_SCHEMA's names, types and nullability, then the lineage columns
    assert table.schema.remove_metadata().equals(
        pa.schema(list(S.FRAMES_SCHEMA) + [table.schema.field(n) for n in ("generation", "write_id", "written_at")]))
    assert set(table.column("generation").to_pylist()) == {"g1"}
    assert set(table.column("write_id").to_pylist()) == {out[WRITE_ID][0]}
    assert table.num_rows == 9 and out[FRAMES_FILE_ROWS].tolist() == [9, 9, 9]
    assert out[FRAMES_FILE_BYTES][0] > 0
    table = table.drop_columns(["generation", "write_id", "written_at"])
    rows = table.to_pylist()
    a = [r for r in rows if r[S.VIDEO_ID] == "a"]
    assert [r[S.FRAME_INDEX] for r in a] == [0, 1, 2, 100, 101]
    assert [r[S.PTS_S] for r in a] == [0.0, 2.0, 4.0, 100.0, 102.0]
    assert [r[S.SPAN_END_S] for r in a] == [2.0, 4.0, 6.0, 102.0, 104.0]
    assert [r[S.CHUNK_INDEX] for r in a] == [0, 0, 0, 1, 1]
    r0 = a[0]
    assert (r0[S.ENCODER], r0[S.ENCODER_REVISION], r0[S.SPACE], r0[S.CONFIG_HASH]) == \
        ("bundled:test", "abc123", "space-1", "cfghash0001")
    assert (r0[S.LAYOUT], r0[S.DIM], r0[S.TOKEN_DTYPE], r0[S.GRID_SIZE], r0[S.PATCH_GRID_H]) == \
        ("global+grid2+patches:int8", D, "int8", 2, GH)
    # token bytes are exactly what compress produced
    assert r0[S.GLOBAL_TOKEN] == comp[S.GLOBAL_TOKEN][0][0]
    assert r0[S.PATCH_INDEX] == comp[S.PATCH_INDEX][0][0]
    mask0 = raw[S.KEEP_MASK][0][0].reshape(-1)
    assert np.frombuffer(r0[S.PATCH_INDEX], "<u2").tolist() == np.flatnonzero(mask0).tolist()
    assert len(r0[S.GRID_TOKENS]) == 4 * D and len(r0[S.GRID_SCALES]) == 16
    # per-chunk rows: counts the driver sums
    assert out[S.FRAMES_KEPT].tolist() == [3, 2, 4]
    kept = [int(m.sum()) for m in raw[S.KEEP_MASK]]
    assert out[S.PATCHES_KEPT].tolist() == kept and out[S.PATCHES_TOTAL].tolist() == [27, 18, 36]
    assert out[S.TOKENS].tolist() == [t * 5 + k for t, k in zip([3, 2, 4], kept)]
    payload = [sum(len(r[c] or b"") for c in (S.GLOBAL_TOKEN, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_INDEX,
                                              S.PATCH_TOKENS, S.PATCH_SCALES)) + 4 for r in rows]
    assert out[S.STORED_BYTES].sum() == sum(payload)
    assert all(e is None for e in out[CHUNK_ERROR])
    # nothing visible yet: the fragments are written, but no sources version names them
    assert TokenStore(str(store)).latest_version() == 0 and TokenStore(str(store)).read_frames().num_rows == 0


def test_output_rows_are_plain_scalars_and_commit_into_a_valid_videos_table(tmp_path):
    store = tmp_path / "store"
    comp, _ = _chunks([("a", 0, False, 3, S.STATUS_OK), ("a", 1, True, 2, S.STATUS_OK),
                       ("f", 0, True, 0, S.STATUS_FAILED)])
    out = WriteShards(str(store), "cfghash0001")(comp)
    for k, col in out.items():
        assert all(not isinstance(v, (np.ndarray, list, bytes)) for v in col), k
    # the rows survive an Arrow round trip (what Ray Data does between stages)
    pa.Table.from_pydict({k: list(v) for k, v in out.items()})
    led = ChunkLedger()
    led.add(out)
    version = led.commit(TokenStore(str(store))).version
    assert version == 1
    videos = lance.dataset(str(store / "sources.lance")).to_table()
    assert videos.select(S.VIDEOS_SCHEMA.names).schema.remove_metadata().equals(S.VIDEOS_SCHEMA.remove_metadata())
    rows = {r[S.VIDEO_ID]: r for r in videos.to_pylist()}
    a, f = rows["a"], rows["f"]
    assert (a[S.STATUS], a[S.FRAMES_KEPT], a[S.DURATION_S], a[S.FRAMES_SAMPLED]) == (S.STATUS_OK, 5, 104.0, 12)
    assert (a[S.SIZE_BYTES], a[S.MTIME], a[S.WIDTH], a[S.CONFIG_HASH]) == (12345, None, 640, "cfghash0001")
    assert a[S.CHUNKS_COMMITTED] == 2
    assert (f[S.STATUS], f[S.ERROR_TYPE], f[S.FRAMES_KEPT], f[S.ENCODER]) == (S.STATUS_FAILED, S.ERR_DECODE, 0, None)
    assert TokenStore(str(store)).read_frames()[S.VIDEO_ID].to_pylist() == ["a"] * 5


def test_a_retried_batch_writes_new_fragments_never_overwriting(tmp_path):
    comp, _ = _chunks([("a", 0, True, 2, S.STATUS_OK)])
    op = WriteShards(str(tmp_path / "s"), "cfg")
    first, second = op(comp), op(comp)
    assert first[WRITE_ID][0] != second[WRITE_ID][0]
    files = [json.loads(o[FRAMES_FILE][0])[0]["files"][0]["path"] for o in (first, second)]
    assert files[0] != files[1]
    assert all((tmp_path / "s" / "frames.lance" / "data" / f).exists() for f in files)


def test_bad_chunk_is_data_and_the_rest_is_written(tmp_path):
    comp, _ = _chunks([("a", 0, True, 2, S.STATUS_OK), ("b", 0, True, 3, S.STATUS_OK)])
    comp[S.GLOBAL_TOKEN][1] = [b"\x00" * 3] * 3  # wrong width
    out = WriteShards(str(tmp_path / "s"), "cfg")(comp)
    assert out[CHUNK_ERROR][0] is None and "global tokens" in out[CHUNK_ERROR][1]
    assert out[FRAMES_FILE][1] == "" and out[FRAMES_FILE_ROWS][0] == 2
    assert _fragment_rows(tmp_path / "s", out[FRAMES_FILE][0])[S.VIDEO_ID].to_pylist() == ["a", "a"]


def test_storage_failure_marks_chunks_instead_of_raising(tmp_path):
    comp, _ = _chunks([("a", 0, True, 2, S.STATUS_OK)])
    op = WriteShards(str(tmp_path / "s"), "cfg")

    def broken(*a, **k):
        raise ConnectionError("S3 went away")

    op.store.write_frames = broken
    out = op(comp)
    assert "S3 went away" in out[CHUNK_ERROR][0] and out[FRAMES_FILE][0] == ""
    led = ChunkLedger()
    led.add(out)
    st = TokenStore(str(tmp_path / "s"))
    led.commit(st)
    row = st.read_videos().to_pylist()[0]
    assert row[S.STATUS] == S.STATUS_FAILED and row[S.ERROR_TYPE] == S.ERR_INTERNAL


def test_batch_without_frames_writes_no_fragment(tmp_path):
    comp, _ = _chunks([("f", 0, True, 0, S.STATUS_FAILED)])
    out = WriteShards(str(tmp_path / "s"), "cfg")(comp)
    assert out[FRAMES_FILE].tolist() == [""] and out[S.FRAMES_KEPT].tolist() == [0]
    assert not (tmp_path / "s").exists()


def test_missing_columns_name_the_operator(tmp_path):
    with pytest.raises(S.SchemaError, match="WriteShards"):
        WriteShards(str(tmp_path), "cfg")({S.VIDEO_ID: np.array(["a"])})
