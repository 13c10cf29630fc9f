"""Window index: windows and runs, ANN + rescoring vs brute force on planted targets, incremental shards,
versions, S3 round trip, errors.

Stores are written the way the pipeline writes them (FRAMES_SCHEMA Parquet files committed by
``TokenStore.commit``); index files are checked on disk with json / pyarrow directly.
"""

from __future__ import annotations

import json
import math
import os
import uuid

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_vlm.core import schema as S
from ray_vlm.query import windows as index_mod
from ray_vlm.query.windows import (
    EmptyStoreError,
    SpaceMismatchError,
    StaleIndexError,
    WindowIndexConfig,
    WindowIndexError,
    brute_force_search,
    ensure_index,
    open_index,
    run_starts,
    window_starts,
    window_vectors,
)
from ray_vlm.store.codec import quantize
from ray_vlm.store.token_store import TokenStore

pytestmark = pytest.mark.timeout(180)
D = 32
SPACE = "test-space"
# Tests of incremental shards switch merging off unless they test merging itself.
# one thread: the HNSW graph is then the same on every run (several threads insert in an order set by timing)
NO_MERGE = WindowIndexConfig(window_s=8.0, merge_below_windows=0, threads=1)


# ================================================================ helpers


def _unit(rng, n, dim=D):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _video(rng, n_frames: int, scene_s: int = 20) -> np.ndarray:
    """Video-like unit vectors (n, D): scenes of ``scene_s`` frames, each a centroid plus small noise."""
    n_scenes = math.ceil(n_frames / scene_s)
    c = _unit(rng, n_scenes)
    x = c[np.arange(n_frames) // scene_s] + 0.15 * _unit(rng, n_frames)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _plant(x: np.ndarray, at: int, n: int, direction: np.ndarray, weight: float = 1.5) -> None:
    x[at:at + n] += weight * direction
    x[at:at + n] /= np.linalg.norm(x[at:at + n], axis=1, keepdims=True)


def _frames_table(vid: str, vecs: np.ndarray, pts: np.ndarray | None = None, dtype: str = "fp16",
                  space: str = SPACE) -> pa.Table:
    n = len(vecs)
    pts = np.arange(n, dtype=np.float64) if pts is None else np.asarray(pts, np.float64)
    span = np.r_[pts[1:], pts[-1] + 1.0] if n else pts
    codes, scales = quantize(vecs, dtype)
    return pa.table({
        S.VIDEO_ID: pa.array([vid] * n, pa.string()), S.FRAME_INDEX: np.arange(n, dtype=np.int32),
        S.PTS_S: pts, S.SPAN_END_S: span, S.CHUNK_INDEX: np.zeros(n, np.int32),
        S.ENCODER: pa.array(["enc"] * n), S.ENCODER_REVISION: pa.array(["rev"] * n),
        S.SPACE: pa.array([space] * n), S.CONFIG_HASH: pa.array(["cfg"] * n),
        S.LAYOUT: pa.array([f"global:{dtype}"] * n), S.DIM: np.full(n, D, np.int32),
        S.TOKEN_DTYPE: pa.array([dtype] * n), S.GLOBAL_TOKEN: pa.array([c.tobytes() for c in codes], pa.binary()),
        S.GLOBAL_SCALE: scales, S.GRID_SIZE: np.zeros(n, np.int8),
        S.GRID_TOKENS: pa.nulls(n, pa.binary()), S.GRID_SCALES: pa.nulls(n, pa.binary()),
        S.PATCH_GRID_H: np.zeros(n, np.int16), S.PATCH_GRID_W: np.zeros(n, np.int16),
        S.PATCH_INDEX: pa.nulls(n, pa.binary()), S.PATCH_TOKENS: pa.nulls(n, pa.binary()),
        S.PATCH_SCALES: pa.nulls(n, pa.binary()),
    }, schema=S.FRAMES_SCHEMA)


def _commit(store: TokenStore, videos: dict, dtype: str = "fp16", space: str = SPACE,
            failed: tuple[str, ...] = ()) -> int:
    """Write ``videos`` ({id: vecs or (vecs, pts)}) and commit them (+ failed rows) in one commit."""
    tables = []
    rows = []
    for vid, v in videos.items():
        vecs, pts = v if isinstance(v, tuple) else (v, None)
        tables.append(_frames_table(vid, vecs, pts, dtype, space))
        rows.append({S.VIDEO_ID: vid, S.URI: f"/archive/{vid}.mp4", S.STATUS: S.STATUS_OK,
                     S.FRAMES_KEPT: len(vecs), S.DURATION_S: float(len(vecs)), S.CONFIG_HASH: "cfg",
                     S.INDEXED_AT: 1.0, S.SPACE: space})
    for vid in failed:
        rows.append({S.VIDEO_ID: vid, S.URI: f"/archive/{vid}.mp4", S.STATUS: S.STATUS_FAILED,
                     S.ERROR_TYPE: S.ERR_DECODE, S.FRAMES_KEPT: 0, S.CONFIG_HASH: "cfg", S.INDEXED_AT: 1.0})
    return store.add_videos(pa.concat_tables(tables) if tables else None, rows).version


def _index_manifest(store: TokenStore, config: WindowIndexConfig, version: int) -> dict:
    """An index manifest read straight from the filesystem (not through the index module)."""
    return json.loads(store.fs.cat_file(f"{store.root}/_index/{config.family()}/v{version:08d}.json"))


@pytest.fixture()
def archive(tmp_path):
    """A local store, v1: 12 videos of 160-400 frames; video "v07" holds a 3-frame event at 100..102 s."""
    rng = np.random.default_rng(0)
    st = TokenStore(str(tmp_path / "store"))
    videos = {f"v{i:02d}": _video(rng, int(rng.integers(160, 400))) for i in range(12)}
    event = _unit(rng, 1)[0]
    _plant(videos["v07"], 100, 3, event)
    _commit(st, videos)
    return st, videos, event, rng


# ================================================================ windows and runs


def test_window_starts_follow_the_time_grid_and_restart_per_video():
    video = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    pts = np.array([0.0, 3.9, 4.0, 7.5, 8.2, 30.0, 0.5, 1.0, 9.0])
    assert window_starts(video, pts, 4.0).tolist() == [0, 2, 4, 5, 6, 8]
    # pruned footage: a kept frame covering a long static stretch still starts its own slot only once
    assert window_starts(np.zeros(3, int), np.array([0.0, 1.0, 50.0]), 8.0).tolist() == [0, 2]
    assert window_starts(np.zeros(0, int), np.zeros(0), 8.0).tolist() == []


def test_window_vectors_are_normalised_means_and_max():
    f = np.array([[1, 0], [1, 0], [0, 1], [3, 4]], np.float32)
    v = window_vectors(f, np.array([0, 2]))
    np.testing.assert_allclose(v, [[1, 0], [0.6, 1] / np.linalg.norm([0.6, 1])], rtol=1e-6)
    m = window_vectors(f, np.array([0, 2]), pool="max")
    np.testing.assert_allclose(m[1], [0.6, 0.8], rtol=1e-6)


def test_run_starts_split_windows_at_visual_changes_strongest_first():
    rng = np.random.default_rng(1)
    a, b, c = _unit(rng, 3)
    f = np.stack([a, a, a, b, b, c, c, a])  # window 0 = rows 0..7, window 1 = row 8
    f = np.vstack([f, a[None]])
    starts = np.array([0, 8])
    assert run_starts(f, starts, 0.85, 4).tolist() == [0, 3, 5, 7, 8]  # three changes, four runs
    # capped: the strongest changes (lowest cosine with the frame before) survive
    order = [[3, 5, 7][i] for i in np.argsort([float(a @ b), float(b @ c), float(c @ a)])]
    assert run_starts(f, starts, 0.85, 3).tolist() == [0, *sorted(order[:2]), 8]
    assert run_starts(f, starts, 0.85, 2).tolist() == [0, order[0], 8]
    assert run_starts(f, starts, 0.85, 1).tolist() == [0, 8]
    # a change at a window start does not add a run
    assert run_starts(f, np.array([0, 3]), 0.85, 2).tolist()[:2] == [0, 3]


# ================================================================ search and rescoring


@pytest.mark.parametrize("quantization", ["i8", "f16"])
def test_planted_event_is_found_by_ann_and_matches_brute_force(archive, quantization):
    st, videos, event, rng = archive
    idx = ensure_index(st.uri, config=WindowIndexConfig(quantization=quantization, merge_below_windows=0, threads=1))
    assert idx.store_version == 1 and idx.space == SPACE and idx.dim == D
    frames = sum(len(v) for v in videos.values())
    assert idx.num_frames == frames
    query = event + 0.3 * _unit(rng, 1)[0]
    r = idx.retrieve(query, k_windows=8, neighbours=1)
    best = r.best_frame()
    seg_vid = [vid for vid, rows in r.frames.segments() if rows.start <= best < rows.stop][0]
    assert seg_vid == "v07" and 100 <= r.frames.pts_s[best] < 103
    gt_ids, gt_scores = brute_force_search(idx, query, k=3)[0]
    assert r.frames.window_ids[best] == gt_ids[0]
    assert r.frame_scores[best] == pytest.approx(gt_scores[0], abs=1e-5)
    w = idx.windows([gt_ids[0]])
    assert w["video_id"][0] == "v07" and w["start_s"][0] <= 100 < w["end_s"][0]

    # recall of the product path's top-1 window against brute force over many random queries
    queries = np.stack([videos[f"v{int(rng.integers(12)):02d}"][int(rng.integers(150))] + 0.8 * _unit(rng, 1)[0]
                        for _ in range(40)])
    gt = brute_force_search(idx, queries, k=1)
    hits = []
    for q, (gt_ids, _) in zip(queries, gt):
        r = idx.retrieve(q, k_windows=32)
        hits.append(r.frames.window_ids[r.best_frame()] == gt_ids[0])
    assert np.mean(hits) >= 0.95


def test_search_returns_unique_live_windows_best_first(archive):
    st, videos, event, rng = archive
    idx = ensure_index(st.uri, config=NO_MERGE)
    q = _unit(rng, 3)
    res = idx.search(q, k=50)
    assert len(res) == 3
    for ids, scores in res:
        assert len(ids) == 50 and len(set(ids.tolist())) == 50
        assert np.all(np.diff(scores) <= 1e-6)
    # exact search over the window vectors agrees with the graph on this small index
    ex = idx.search(q, k=10, exact=True)
    for (a, _), (b, _) in zip(idx.search(q, k=10), ex):
        assert len(np.intersect1d(a, b)) >= 9
    # k larger than the index: every live window once (exact), nearly all of them (graph)
    ids, _ = idx.search(q[0], k=10**6, exact=True)[0]
    assert sorted(ids.tolist()) == list(range(idx.num_windows))
    ids, _ = idx.search(q[0], k=10**6)[0]
    assert len(set(ids.tolist())) == len(ids) >= 0.95 * idx.num_windows


def test_window_table_and_frames_of_match_the_store(archive):
    st, videos, event, rng = archive
    idx = ensure_index(st.uri, config=NO_MERGE)
    wt = idx.window_table
    assert wt.num_rows == idx.num_windows and all(wt["live"].to_pylist())
    # every window lies in one 8 s slot of its video, and the windows tile each video's frames
    start, end = wt["start_s"].to_numpy(), wt["end_s"].to_numpy()
    assert np.all(np.floor(start / 8.0) == np.floor((end - 1.0) / 8.0))
    per_video = {}
    for vid, n in zip(wt["video_id"].to_pylist(), wt["n_rows"].to_pylist()):
        per_video[vid] = per_video.get(vid, 0) + n
    assert per_video == {k: len(v) for k, v in videos.items()}

    # frames of v07's window at 100 s plus one neighbour each side: 24 contiguous frames in time order
    ids = wt["window_id"].to_numpy()[(wt["video_id"].to_numpy(zero_copy_only=False) == "v07") & (start == 96.0)]
    block = idx.frames_of(ids, neighbours=1)
    assert block.video_ids == ("v07",) and block.pts_s.tolist() == [float(t) for t in range(88, 112)]
    assert np.all(np.isin(block.window_ids, ids[0] + np.arange(-1, 2)))
    # vectors are the stored fp16 codes, checked against the frames dataset read with Lance itself
    raw = lance.dataset(st.dataset_uri("frames")).to_table(filter="video_id = 'v07'").sort_by(S.FRAME_INDEX)
    stored = np.frombuffer(b"".join(raw[S.GLOBAL_TOKEN].to_pylist()), "<f2").reshape(-1, D)
    np.testing.assert_array_equal(block.vectors, stored[88:112].astype(np.float32))
    np.testing.assert_allclose(block.score(event), block.vectors @ event, rtol=1e-5, atol=1e-6)
    # two far-apart windows of one video stay two segments; overlapping ones merge; video edges clip
    first_v07 = int(ids[0]) - 12
    b2 = idx.frames_of([first_v07, first_v07 + 1, int(ids[0]) + 5], neighbours=1)
    assert b2.video_ids == ("v07", "v07")
    assert b2.pts_s[b2.segment_starts[0]] == 0.0 and b2.segment_starts[1] == 24
    assert idx.video_frames("v03").pts_s.tolist() == [float(t) for t in range(len(videos["v03"]))]
    with pytest.raises(WindowIndexError, match="not in this index"):
        idx.video_frames("nope")


def test_int8_store_and_i8_graph(tmp_path):
    rng = np.random.default_rng(3)
    st = TokenStore(str(tmp_path / "store"))
    videos = {f"v{i}": _video(rng, 200) for i in range(6)}
    event = _unit(rng, 1)[0]
    _plant(videos["v4"], 50, 2, event)
    _commit(st, videos, dtype="int8")
    cfg = WindowIndexConfig(quantization="i8", merge_below_windows=0)
    idx = ensure_index(st.uri, config=cfg)
    r = idx.retrieve(event, k_windows=4)
    b = r.best_frame()
    assert r.frames.token_dtype == "int8" and 50 <= r.frames.pts_s[b] < 52
    # decoded int8 vectors (codes x scale) are close to the originals
    vec = idx.video_frames("v4").vectors
    assert np.abs(vec - videos["v4"]).max() < 0.02
    assert _index_manifest(st, cfg, 1)["shards"][0]["token_dtype"] == "int8"


@pytest.mark.parametrize("read_group_frames", [100, 10**6])
def test_a_store_whose_token_dtype_changed_between_jobs(tmp_path, read_group_frames):
    rng = np.random.default_rng(4)
    st = TokenStore(str(tmp_path / "store"))
    _commit(st, {"a": _video(rng, 150), "b": _video(rng, 150)}, dtype="fp16")
    late = _video(rng, 150)
    event = _unit(rng, 1)[0]
    _plant(late, 60, 3, event)
    _commit(st, {"c": late}, dtype="int8")
    # one shard holds all three (groups of one video each, or one mixed read): int8 frames become fp16
    idx = ensure_index(st.uri, config=WindowIndexConfig(read_group_frames=read_group_frames))
    assert len(idx.shard_ids) == 1 and idx.num_frames == 450
    r = idx.retrieve(event, k_windows=4)
    assert r.frames.token_dtype == "fp16" and 60 <= r.frames.pts_s[r.best_frame()] < 63
    assert np.abs(idx.video_frames("c").vectors - late).max() < 0.02


# ================================================================ increments and versions


def test_second_commit_builds_only_a_new_shard_and_filters_replaced_videos(archive):
    st, videos, event, rng = archive
    idx1 = ensure_index(st.uri, config=NO_MERGE)
    (shard1,) = idx1.shard_ids
    shard1_dir = os.path.join(st.root, "_index", NO_MERGE.family(), "shards", shard1)
    mtimes = {f: os.path.getmtime(os.path.join(shard1_dir, f)) for f in os.listdir(shard1_dir)}
    # v2: a new video, and v07 replaced by footage without the event (the event now lives in "new")
    new = _video(rng, 120)
    _plant(new, 30, 3, event)
    replaced = _video(rng, 150)
    assert _commit(st, {"new": new, "v07": replaced}) == 2
    assert st.manifest()["videos"]["v07"]["committed_version"] == 2

    idx2 = ensure_index(st.uri, config=NO_MERGE)
    m2 = _index_manifest(st, NO_MERGE, 2)
    assert m2["base_version"] == 1 and len(m2["shards"]) == 2
    assert m2["shards"][0]["id"] == shard1 and m2["built_shards"] == [m2["shards"][1]["id"]]
    assert m2["shards"][1]["videos"] == 2  # only "new" and the replaced "v07" were read and indexed
    assert {f: os.path.getmtime(os.path.join(shard1_dir, f)) for f in os.listdir(shard1_dir)} == mtimes
    assert idx2.num_frames == sum(len(v) for k, v in videos.items() if k != "v07") + 120 + 150

    # the old v07 windows are dead: never returned, flagged in the table
    wt = idx2.window_table
    vid = wt["video_id"].to_numpy(zero_copy_only=False)
    live = wt["live"].to_numpy(zero_copy_only=False)
    shard = wt["shard"].to_numpy()
    assert not live[(vid == "v07") & (shard == 0)].any() and live[(vid == "v07") & (shard == 1)].all()
    dead = set(wt["window_id"].to_numpy()[~live].tolist())
    for ids, _ in idx2.search(_unit(rng, 5), k=idx2.num_windows):  # a graph may not reach every node
        assert not dead & set(ids.tolist()) and len(ids) >= 0.95 * idx2.num_windows
    for ids, _ in idx2.search(_unit(rng, 2), k=idx2.num_windows, exact=True):
        assert sorted(ids.tolist()) == sorted(set(wt["window_id"].to_numpy().tolist()) - dead)
    r = idx2.retrieve(event, k_windows=8)
    b = r.best_frame()
    seg_vid = [v for v, rows in r.frames.segments() if rows.start <= b < rows.stop][0]
    assert seg_vid == "new" and 30 <= r.frames.pts_s[b] < 33
    assert brute_force_search(idx2, event, k=1)[0][0][0] == r.frames.window_ids[b]
    # the v1 index still serves v1 (old v07 live there, "new" unknown)
    old = open_index(st.uri, version=1, config=NO_MERGE)
    assert "new" not in set(old.window_table["video_id"].to_pylist())
    # exact search: which window an approximate (HNSW) walk reaches first varies between graph builds
    best_window = brute_force_search(old, event, k=1)[0][0][0]
    assert old.windows([best_window])["video_id"][0] == "v07"


def test_index_of_an_older_version_is_not_used_for_a_newer_one(archive):
    st, videos, event, rng = archive
    ensure_index(st.uri, config=NO_MERGE)
    _commit(st, {"late": _video(rng, 100)})
    with pytest.raises(StaleIndexError, match="version 2.*serves v1"):
        open_index(st.uri, config=NO_MERGE)
    assert not st.fs.exists(f"{st.root}/_index/{NO_MERGE.family()}/v00000002.json")
    idx = ensure_index(st.uri, config=NO_MERGE)
    assert idx.store_version == 2 and "late" in set(idx.window_table["video_id"].to_pylist())
    assert open_index(st.uri, config=NO_MERGE).shard_ids == idx.shard_ids  # now served without building
    # another family (other window length) never reuses these files
    with pytest.raises(StaleIndexError):
        open_index(st.uri, config=WindowIndexConfig(window_s=4.0))


def test_small_shards_are_folded_into_the_increment_and_dead_shards_rebuilt(archive):
    st, videos, event, rng = archive
    merging = WindowIndexConfig(merge_below_windows=10_000)
    first = ensure_index(st.uri, config=merging).shard_ids
    _commit(st, {"x": _video(rng, 90)})
    ensure_index(st.uri, config=merging)
    m = _index_manifest(st, merging, 2)
    assert len(m["shards"]) == 1 and m["shards"][0]["id"] != first[0] and m["shards"][0]["videos"] == 13
    assert m["dropped_shards"][0]["id"] == first[0]
    # without merging, a shard most of whose videos were replaced is rebuilt instead of kept
    cfg = WindowIndexConfig(merge_below_windows=0, max_dead_fraction=0.5)
    base = ensure_index(st.uri, config=cfg).shard_ids
    _commit(st, {k: _video(rng, 100) for k in sorted(videos)[:9]})
    idx = ensure_index(st.uri, config=cfg)
    m = _index_manifest(st, cfg, 3)
    assert base[0] not in idx.shard_ids and len(idx.shard_ids) == 1
    assert "dead" in m["dropped_shards"][0]["why"] and m["shards"][0]["videos"] == 13
    assert idx.num_frames == 9 * 100 + sum(len(videos[k]) for k in sorted(videos)[9:]) + 90


def test_index_manifest_and_files_on_disk(archive):
    st, videos, event, rng = archive
    idx = ensure_index(st.uri, config=NO_MERGE)
    m = _index_manifest(st, NO_MERGE, 1)
    assert m["format"] == "ray-vlm/window-index/v1" and m["store_version"] == 1 and m["space"] == SPACE
    (e,) = m["shards"]
    d = os.path.join(st.root, "_index", NO_MERGE.family(), "shards", e["id"])
    for name, size in e["files"].items():
        assert os.path.getsize(os.path.join(d, name)) == size
    assert os.path.getsize(os.path.join(d, "frames.codes")) == e["frames"] * D * 2
    wins = pq.read_table(os.path.join(d, "windows.parquet"))
    assert wins.num_rows == e["windows"] == m["counts"]["windows"] == idx.num_windows
    assert int(wins["n_runs"].to_numpy().sum()) == e["runs"] >= e["windows"]
    assert m["counts"]["live_videos"] == 12
    # no stray temporary directories are left behind
    assert [n for n in os.listdir(os.path.dirname(d)) if n.startswith(".tmp")] == []


@pytest.mark.s3
def test_s3_round_trip(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    opts = dict(opts, skip_instance_cache=True)
    uri = f"s3://{bucket}/stores/{uuid.uuid4().hex[:8]}"
    st = TokenStore(uri, storage_options=opts)
    rng = np.random.default_rng(5)
    videos = {f"v{i}": _video(rng, 150) for i in range(4)}
    event = _unit(rng, 1)[0]
    _plant(videos["v2"], 40, 3, event)
    _commit(st, videos)
    built = ensure_index(uri, storage_options=opts, cache_dir=tmp_path / "cache-a", config=NO_MERGE)
    keys = st.fs.find(f"{st.root}/_index")
    assert any(k.endswith("/v00000001.json") for k in keys)
    assert sum(k.endswith(("windows.usearch", "frames.codes")) for k in keys) == 2
    # another machine: empty cache, loads without building, same answers
    other = open_index(uri, storage_options=opts, cache_dir=tmp_path / "cache-b", config=NO_MERGE)
    assert other.shard_ids == built.shard_ids
    assert (tmp_path / "cache-b").exists()
    q = _unit(rng, 4)
    for (a, sa), (b, sb) in zip(built.search(q, 10), other.search(q, 10)):
        assert a.tolist() == b.tolist()
        np.testing.assert_allclose(sa, sb)
    r = other.retrieve(event, k_windows=4)
    assert 40 <= r.frames.pts_s[r.best_frame()] < 43
    # an increment on S3 uploads only the new shard
    _commit(st, {"v9": _video(rng, 60)})
    inc = ensure_index(uri, storage_options=opts, cache_dir=tmp_path / "cache-b", config=NO_MERGE)
    assert len(inc.shard_ids) == 2 and inc.shard_ids[0] == built.shard_ids[0]


# ================================================================ errors


def test_empty_store_and_failed_only_store_raise(tmp_path):
    st = TokenStore(str(tmp_path / "empty"))
    with pytest.raises(EmptyStoreError, match="holds no indexed frames"):
        ensure_index(st.uri)
    _commit(st, {}, failed=("bad",))
    with pytest.raises(EmptyStoreError, match="v1 holds no indexed frames"):
        ensure_index(st.uri)
    assert not os.path.exists(os.path.join(st.root, "_index"))


def test_wrong_space_and_bad_queries_raise(archive):
    st, videos, event, rng = archive
    with pytest.raises(SpaceMismatchError, match="'test-space'.*'clip'"):
        ensure_index(st.uri, config=NO_MERGE, space="clip")
    idx = ensure_index(st.uri, config=NO_MERGE, space=SPACE)
    idx.check_space(SPACE)
    with pytest.raises(SpaceMismatchError):
        idx.check_space("clip")
    with pytest.raises(WindowIndexError, match=r"\(Q, 32\)"):
        idx.search(np.ones(16, np.float32))
    with pytest.raises(WindowIndexError, match="all zeros"):
        idx.search(np.zeros(D, np.float32))
    with pytest.raises(WindowIndexError, match="NaN"):
        idx.retrieve(np.full(D, np.nan, np.float32))
    with pytest.raises(WindowIndexError, match="outside"):
        idx.frames_of([idx.num_windows + 5])


def test_a_new_video_of_another_space_is_refused(archive):
    st, videos, event, rng = archive
    ensure_index(st.uri, config=NO_MERGE)
    _commit(st, {"other": _video(rng, 50)}, space="other-space")
    with pytest.raises(SpaceMismatchError, match="mixes embedding spaces"):
        ensure_index(st.uri, config=NO_MERGE)
    fam = os.path.join(st.root, "_index", NO_MERGE.family())
    assert sorted(n for n in os.listdir(fam) if n.endswith(".json")) == ["v00000001.json"]
    assert len(os.listdir(os.path.join(fam, "shards"))) == 1  # the refused shard was removed


def test_config_is_validated():
    with pytest.raises(ValueError, match="window_s"):
        WindowIndexConfig(window_s=0)
    with pytest.raises(ValueError, match="quantization"):
        WindowIndexConfig(quantization="i4")
    assert WindowIndexConfig().family() != WindowIndexConfig(window_s=4.0).family()
    assert WindowIndexConfig().family() == WindowIndexConfig(expansion_search=16).family()  # search-time only


def test_concurrent_builder_losing_the_manifest_race_adopts_the_winner(archive, monkeypatch):
    st, videos, event, rng = archive
    winner = ensure_index(st.uri, config=NO_MERGE)
    fam = os.path.join(st.root, "_index", NO_MERGE.family())
    os.rename(os.path.join(fam, "v00000001.json"), os.path.join(fam, "held.json"))
    real = index_mod.create_only

    def racing(fs, path, data):  # the other builder's manifest lands just before ours
        os.rename(os.path.join(fam, "held.json"), path)
        return real(fs, path, data)

    monkeypatch.setattr(index_mod, "create_only", racing)
    loser = ensure_index(st.uri, config=NO_MERGE)
    assert loser.shard_ids == winner.shard_ids
    assert os.listdir(os.path.join(fam, "shards")) == winner.shard_ids  # the loser's shard was removed
