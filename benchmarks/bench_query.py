"""``ray-vlm bench query``: "when does X happen" latency over a 1,000-video-hour store, ANN vs brute force.

One run, one machine, side by side:

(a) brute force (``brute_force_search``): every frame's global token scored against the query
    (fp16 -> float32 in chunks of 256 k frames through torch's F16C conversion, numpy's own is ~10x
    slower; one BLAS matmul per chunk), best window = the window of the best frame;
(b) the product path: ``WindowIndex.retrieve``: usearch HNSW top-K windows, then exact scores of the
    candidate windows' frames (+1 neighbour window each side), best frame -> its window.

Recall of (b) is the share of queries whose best window is (a)'s best window (exact ground truth from a
batched pass over all frames); "target hit" is the share whose best window overlaps the scene or event the
query was aimed at, for (a) and (b). Also reported: index build time, bytes on disk and memory, the ANN
stage's recall/latency over its beam width (ef), and exact window search over mean-, max- and run-pooled
window vectors (why the index stores runs). The text encoder is excluded from the latencies and timed on
its own, in a fresh process.

The data is synthetic but store-like: it is written through ``TokenStore.commit`` as real frames fragments,
and the index is built by ``ensure_index`` from the store, as in production. Video model (unit vectors in
``dim`` dimensions): a few thousand topics; each video visits a few of them in scenes of ~20 s (geometric
lengths); each scene has its own centroid near its topic; frames drift slowly inside a scene (camera
motion: a piecewise-linear path through random anchors every 6 s) plus per-frame noise, so consecutive
frames have cosine ~0.9 and scenes of one topic ~0.5. Short *events* (2-6 frames, a unique direction)
are planted ~2 per hour. Queries are "text-like": far from every frame (cosine ~0.3-0.5, like CLIP text
vs image), half aimed at a scene, half at an event, all offset by a shared "modality gap" direction.
Generated data is cached under ``~/.cache/ray-vlm/bench`` (``$RAY_VLM_BENCH_CACHE``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("RAY_VLM_BENCH_CACHE", Path.home() / ".cache" / "ray-vlm" / "bench"))
SPACE = "synthetic/clustered-video-v1"
ENCODER = "synthetic:clustered-video"
FPS = 1.0
_GEN_VERSION = 3  # bump when the generator changes (invalidates the cache)


# ------------------------------------------------------------------------------------------ synthetic data


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _normalise(v: np.ndarray) -> np.ndarray:
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def synth_store(hours: float = 1000.0, dim: int = 384, seed: int = 0, cache: Path | None = None,
                videos_per_file: int = 40) -> tuple[str, dict]:
    """A local token store holding ``hours`` of synthetic 1 fps video (fp16 global tokens), cached.

    Returns:
        (store path, truth): truth holds the scene/event vectors the queries are drawn from:
        ``scene_centroids`` float32 (n_scenes, D), ``event_vectors`` float32 (n_events, D),
        ``event_scene`` int64 (n_events,), ``gap`` float32 (D,), ``frames`` total.
    """
    # Long: one synthetic archive written in one pass: scenes, drift and events are drawn from the same random stream.
    import pyarrow as pa

    from ray_vlm.core import schema as S
    from ray_vlm.store.token_store import TokenStore, new_generation

    root = (CACHE if cache is None else cache) / f"query-store-{hours:g}h-{dim}d-s{seed}-g{_GEN_VERSION}"
    truth_path = root / "truth.npz"
    if truth_path.exists() and TokenStore(str(root / "store")).latest_version() == 1:
        with np.load(truth_path, allow_pickle=False) as z:
            return str(root / "store"), {k: z[k] for k in z.files}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = TokenStore(str(root / "store"))
    rng = np.random.default_rng(seed)
    n_topics = 2000
    topics = _unit(rng, n_topics, dim)
    gap = _unit(rng, 1, dim)[0]
    total = int(round(hours * 3600 * FPS))
    lengths = []
    while sum(lengths) < total:  # videos of 15 min .. 1 h 45 min
        lengths.append(int(rng.integers(900, 6300)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < 60:
        lengths[-2] += lengths.pop()
    centroids, event_vecs, event_scene = [], [], []
    scene_where, event_where = [], []  # (video, first frame, frames) of every scene / event
    frags: list[dict] = []
    video_rows: list[dict] = []
    pending: list = []
    generation = new_generation()
    t0 = time.perf_counter()

    def flush():
        if not pending:
            return
        n = sum(len(p[1]) for p in pending)
        codes = np.concatenate([p[1] for p in pending])
        width = 2 * dim
        offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int64) * width).astype(np.int32).tobytes())
        token = pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(codes.tobytes())])
        vids = np.concatenate([np.full(len(p[1]), p[0], dtype=object) for p in pending])
        fidx = np.concatenate([np.arange(len(p[1]), dtype=np.int32) for p in pending])
        pts = fidx.astype(np.float64) / FPS
        cols = {
            S.VIDEO_ID: pa.array(vids.tolist(), pa.string()), S.FRAME_INDEX: fidx, S.PTS_S: pts,
            S.SPAN_END_S: pts + 1.0 / FPS, S.CHUNK_INDEX: (fidx // 32).astype(np.int32),
            S.ENCODER: pa.array([ENCODER] * n), S.ENCODER_REVISION: pa.array(["0"] * n),
            S.SPACE: pa.array([SPACE] * n), S.CONFIG_HASH: pa.array(["bench"] * n),
            S.LAYOUT: pa.array(["global:fp16"] * n), S.DIM: np.full(n, dim, np.int32),
            S.TOKEN_DTYPE: pa.array(["fp16"] * n), S.GLOBAL_TOKEN: token,
            S.GLOBAL_SCALE: np.ones(n, np.float32), S.GRID_SIZE: np.zeros(n, np.int8),
            S.PATCH_GRID_H: np.zeros(n, np.int16), S.PATCH_GRID_W: np.zeros(n, np.int16),
        }
        arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in S.FRAMES_SCHEMA]
        table = pa.Table.from_arrays([pa.array(a, f.type) if not isinstance(a, pa.Array) else a
                                      for a, f in zip(arrays, S.FRAMES_SCHEMA)], schema=S.FRAMES_SCHEMA)
        frags.extend(store.write_frames(table, generation))
        pending.clear()

    for vi, n in enumerate(lengths):
        vid = f"{vi:016x}"
        # scenes of this video
        scene_len = []
        while sum(scene_len) < n:
            scene_len.append(max(3, int(rng.geometric(1 / 20))))
        scene_len[-1] -= sum(scene_len) - n
        if scene_len[-1] <= 0:
            scene_len.pop()
        own_topics = rng.integers(0, n_topics, 3)
        c = _normalise(topics[rng.choice(own_topics, len(scene_len))] + 0.9 * _unit(rng, len(scene_len), dim))
        first_scene = sum(len(x) for x in centroids)
        centroids.append(c)
        starts = np.r_[0, np.cumsum(scene_len)[:-1]]
        scene_where.extend((vi, int(a), int(b)) for a, b in zip(starts, scene_len))
        scene_of = np.repeat(np.arange(len(scene_len)), scene_len)
        # slow drift: piecewise-linear through anchors every 6 s
        n_anchor = n // 6 + 2
        anchors = 0.45 * _unit(rng, n_anchor, dim)
        pos = np.arange(n) / 6.0
        k = pos.astype(np.int64)
        w = (pos - k)[:, None].astype(np.float32)
        x = c[scene_of]
        x += anchors[k] * (1 - w) + anchors[k + 1] * w
        x += 0.25 * _unit(rng, n, dim)
        # events: 2-6 frames carrying a unique direction, ~2 per hour
        for _ in range(rng.poisson(2.0 * n / 3600.0)):
            ln = int(rng.integers(2, 7))
            at = int(rng.integers(0, max(1, n - ln)))
            e = _unit(rng, 1, dim)[0]
            x[at:at + ln] += 1.0 * e
            event_vecs.append(e)
            event_scene.append(first_scene + int(scene_of[at]))
            event_where.append((vi, at, ln))
        _normalise(x)
        pending.append((vid, x.astype("<f2")))
        video_rows.append({S.VIDEO_ID: vid, S.URI: f"/synthetic/{vid}.mp4", S.STATUS: S.STATUS_OK,
                           S.FRAMES_KEPT: n, S.FRAMES_SAMPLED: n, S.DURATION_S: n / FPS, S.CONFIG_HASH: "bench",
                           S.INDEXED_AT: time.time(), S.SPACE: SPACE, S.ENCODER: ENCODER,
                           S.ENCODER_REVISION: "0", S.TOKENS: n, S.STORED_BYTES: n * 2 * dim})
        if len(pending) >= videos_per_file:
            flush()
    flush()
    store.commit(frags, [{**r, "generation": generation} for r in video_rows])
    truth = {"scene_centroids": np.concatenate(centroids), "event_vectors": np.asarray(event_vecs, np.float32),
             "event_scene": np.asarray(event_scene, np.int64), "gap": gap, "frames": np.int64(total),
             "scene_where": np.asarray(scene_where, np.int64).reshape(-1, 3),
             "event_where": np.asarray(event_where, np.int64).reshape(-1, 3),
             "generate_s": np.float64(time.perf_counter() - t0)}
    np.savez(truth_path, **truth)
    return str(root / "store"), truth


def synth_queries(truth: dict, n: int = 500, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text-like queries aimed at planted targets.

    Returns:
        (queries float32 (n, D) unit vectors, kinds int8 (n,): 0 = scene query, 1 = event query,
        targets int64 (n, 3): (video number, first frame, frames) the query is aimed at).
    """
    rng = np.random.default_rng(seed)
    c, ev = truth["scene_centroids"], truth["event_vectors"]
    dim = c.shape[1]
    kinds = (np.arange(n) % 2).astype(np.int8) if len(ev) else np.zeros(n, np.int8)
    q = np.empty((n, dim), np.float32)
    targets = np.empty((n, 3), np.int64)
    for i in range(n):
        noise = _unit(rng, 1, dim)[0]
        if kinds[i] == 0:
            j = rng.integers(len(c))
            q[i] = c[j] + 1.6 * noise + 0.6 * truth["gap"]
            targets[i] = truth["scene_where"][j]
        else:
            j = rng.integers(len(ev))
            q[i] = ev[j] + 0.4 * c[truth["event_scene"][j]] + 1.4 * noise + 0.6 * truth["gap"]
            targets[i] = truth["event_where"][j]
    return _normalise(q), kinds, targets


def _target_hit(index, window_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """bool (n,): the window overlaps the frames the query was aimed at."""
    w = index.windows(window_ids)
    video = np.asarray([int(v, 16) for v in w["video_id"]])
    a = targets[:, 1] / FPS
    b = (targets[:, 1] + targets[:, 2]) / FPS
    return (video == targets[:, 0]) & (w["start_s"] < b) & (w["end_s"] > a)


# ------------------------------------------------------------------------------------------ measuring


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pooling_recall(index, queries: np.ndarray, gt_top1: np.ndarray, ks=(16, 64, 128, 256),
                    chunk_rows: int = 262_144) -> dict:
    """Exact search (no graph) over window vectors pooled three ways, in one pass over the frames: share
    of queries whose ground-truth best window is among the top k windows. Isolates pooling from HNSW error.

    "mean": one L2-normalised mean per window; "max": element-wise max per window; "runs": what the index
    stores, one mean per run of similar frames (``WindowIndexConfig.split_cos`` / ``max_runs``); a window
    scores as its best run.
    """
    from ray_vlm.query.windows import run_starts, window_vectors

    kmax = max(ks)
    cfg = index.config
    pools = ("mean", "max", "runs")
    best_ids = {p: np.full((len(queries), 0), -1, np.int64) for p in pools}
    best = {p: np.full((len(queries), 0), -np.inf, np.float32) for p in pools}
    n_vec = dict.fromkeys(pools, 0)
    for i, ws, r0, vecs in index.iter_frame_chunks(chunk_rows):
        s = index._shards[i]
        starts = s.win_first_row[ws] - r0
        for pool in pools:
            if pool == "runs":
                rs = run_starts(vecs, starts, cfg.split_cos, cfg.max_runs)
                sc = window_vectors(vecs, rs) @ queries.T
                sc = np.maximum.reduceat(sc, np.searchsorted(rs, starts), axis=0).T
                n_vec[pool] += len(rs)
            else:
                sc = (window_vectors(vecs, starts, pool) @ queries.T).T
                n_vec[pool] += len(starts)
            ids = np.concatenate([best_ids[pool], np.broadcast_to(ws + index._offsets[i], sc.shape)], 1)
            scs = np.concatenate([best[pool], sc], 1)
            if scs.shape[1] > kmax:
                keep = np.argpartition(-scs, kmax - 1, axis=1)[:, :kmax]
                ids, scs = np.take_along_axis(ids, keep, 1), np.take_along_axis(scs, keep, 1)
            best_ids[pool], best[pool] = ids, scs
    res = {}
    for pool in pools:
        ranked = np.take_along_axis(best_ids[pool], np.argsort(-best[pool], axis=1), 1)
        res[pool] = {f"recall@{k}": float(np.mean([gt_top1[i] in ranked[i, :k] for i in range(len(queries))]))
                     for k in ks}
        res[pool]["vectors"] = n_vec[pool]
    return res


def lance_ann_bench(index, queries: np.ndarray, gt_top1: np.ndarray, root: Path, k_windows: int = 128,
                    neighbours: int = 1, appends: int = 10,
                    settings: Sequence[tuple[int, int]] = ((16, 256), (64, 1024), (256, 2048)),
                    index_type: str = "IVF_HNSW_SQ") -> dict:
    """The same window candidates from Lance's own vector index instead of the usearch shards, then the same exact
    rescoring (``frames_of`` + scores): latency per query and top-1 agreement with exact search.

    The vectors are what the usearch shards hold (one mean per run of similar frames, ``run_starts``), written as
    a Lance dataset in ``appends`` appends: the index is built after all but the last, and the last is indexed
    incrementally (``optimize_indices``), as a store that grows by fragments would be.
    """
    # Long: one comparison read top to bottom: vectors, the incremental index build, then the timed queries.
    import lance
    import pyarrow as pa

    from ray_vlm.query.windows import run_starts, window_vectors

    cfg = index.config
    ids, vecs = [], []
    for i, ws, r0, frames in index.iter_frame_chunks(262_144):
        s = index._shards[i]
        starts = s.win_first_row[ws] - r0
        rs = run_starts(frames, starts, cfg.split_cos, cfg.max_runs)
        vecs.append(window_vectors(frames, rs).astype(np.float32))
        ids.append((ws + index._offsets[i])[np.searchsorted(starts, rs, side="right") - 1])
    ids_a, vec_a = np.concatenate(ids).astype(np.int64), np.concatenate(vecs)
    dim = vec_a.shape[1]
    uri = str(root / "windows.lance")
    shutil.rmtree(uri, ignore_errors=True)
    parts = np.array_split(np.arange(len(ids_a)), appends)

    def table(rows):
        flat = pa.array(vec_a[rows].reshape(-1), pa.float32())
        return pa.table({"window_id": pa.array(ids_a[rows]),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})

    t = time.perf_counter()
    for j, rows in enumerate(parts[:-1]):
        lance.write_dataset(table(rows), uri, mode="create" if j == 0 else "append")
    write_s = time.perf_counter() - t
    ds = lance.dataset(uri)
    t = time.perf_counter()
    n_part = max(1, int(np.sqrt(len(ids_a))))
    ds.create_index("vector", index_type=index_type, num_partitions=n_part, metric="dot")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    lance.write_dataset(table(parts[-1]), uri, mode="append")
    ds = lance.dataset(uri)
    ds.optimize.optimize_indices()
    ds = lance.dataset(uri)
    incremental_s = time.perf_counter() - t
    k_runs = 2 * k_windows  # a window may hold several runs: ask for more, keep the best k windows

    def candidates(qv, nprobes, ef):
        got = ds.to_table(nearest={"column": "vector", "q": qv, "k": k_runs, "nprobes": nprobes, "ef": ef},
                          columns=["window_id"])["window_id"].to_numpy()
        _, first = np.unique(got, return_index=True)
        return got[np.sort(first)][:k_windows]

    sweep = []
    for nprobes, ef in settings:
        for qv in queries[:5]:  # warm the index cache
            candidates(qv, nprobes, ef)
        lat, lat_ann, hit, held = [], [], [], []
        for i, qv in enumerate(queries):
            t = time.perf_counter()
            cand = candidates(qv, nprobes, ef)
            t_ann = time.perf_counter()
            block = index.frames_of(cand, neighbours=neighbours)
            best = int(np.argmax(block.score(qv)))
            w = int(block.window_ids[best])
            lat.append(time.perf_counter() - t)
            lat_ann.append(t_ann - t)
            hit.append(w == gt_top1[i])
            held.append(gt_top1[i] in cand)
        sweep.append({"nprobes": nprobes, "ef": ef, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                      "ann_only_p50_ms": _pct(lat_ann, 50), "ann_only_p99_ms": _pct(lat_ann, 99),
                      "top1_window_recall": float(np.mean(hit)), "candidates_hold_gt_window": float(np.mean(held))})
    return {"index_type": index_type, "metric": "dot", "lance_cpu_threads": os.environ.get("LANCE_CPU_THREADS"),
            "vectors": int(len(ids_a)), "num_partitions": n_part, "k_windows": k_windows, "neighbours": neighbours,
            "write_s": write_s, "build_s": build_s, "incremental_append_and_index_s": incremental_s,
            "bytes_on_disk": _dir_bytes(Path(uri)), **sweep[0], "sweep": sweep, "queries": len(queries)}


def _encode_latency(n: int = 50) -> dict:
    """p50/p99 of the bundled MiniLM text encoder, one query at a time (CPU), in a fresh process, with
    torch's default thread count and with one thread. On a shared 2-core machine a 2-thread OpenMP
    region stalls whenever the other core is busy (measured 10 ms on a quiet machine, ~470 ms under load,
    for the same query); one query is too small to need two threads."""
    import subprocess
    import sys

    code = (
        "import json, time, numpy as np, torch\n"
        "from ray_vlm.models import load_encoder\n"
        "t = time.perf_counter(); enc = load_encoder('bundled:effnet-lite0-minilm', device='cpu')\n"
        "load_s = time.perf_counter() - t\n"
        f"texts = ['a person opens the ' + w + ' door at night, take ' + str(i) for i, w in "
        f"zip(range({n}), ['red', 'blue', 'kitchen', 'car', 'garage'] * {n})]\n"
        "res = {'load_s': load_s, 'queries': len(texts), 'default_threads': torch.get_num_threads()}\n"
        "for name, threads in (('default', torch.get_num_threads()), ('one_thread', 1)):\n"
        "    torch.set_num_threads(threads); enc.encode_text(texts[:2]); lat = []\n"
        "    for s in texts:\n"
        "        t = time.perf_counter(); enc.encode_text([s]); lat.append(time.perf_counter() - t)\n"
        "    res[name] = {'p50_ms': float(np.percentile(lat, 50) * 1e3), "
        "'p99_ms': float(np.percentile(lat, 99) * 1e3)}\n"
        "print(json.dumps(res))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _synth_tokens(rng: np.random.Generator, frames: int, dim: int, grid: int, patches: int, kept_fraction: float,
                  video_id: str = "bench"):
    """VideoTokens of the stored shapes: global + g x g grid (float32, as decoded), int8 kept patches (DiffFP:
    ``kept_fraction`` of patches kept per frame, the first frame whole), 1 fps."""
    from ray_vlm.query import grounding as G

    keep = rng.random((frames, patches)) < kept_fraction
    keep[0] = True
    counts = keep.sum(1)
    codes = rng.integers(-127, 128, size=(int(counts.sum()), dim), dtype=np.int8)
    scales = (1.0 / np.linalg.norm(codes.astype(np.float32), axis=1)).astype(np.float32)
    return G.VideoTokens(video_id, np.arange(frames, dtype=np.float64), np.arange(1, frames + 1, dtype=np.float64),
                         np.arange(frames), _unit(rng, frames, dim),
                         _unit(rng, frames * grid * grid, dim).reshape(frames, grid * grid, dim) if grid else None,
                         codes, scales, G.patch_sources(counts, np.nonzero(keep)[1], patches))


def ground_bench(dim: int = 384, grid: int = 2, patches: int = 49, kept_fraction: float = 0.3, queries: int = 20,
                 spans: int = 16, span_s: float = 24.0, seed: int = 0, frames: int = 3600) -> dict:
    """Cost of the grounding stage (``Searcher.ground``'s arithmetic: ``search.ground_spans``) per video-hour.

    One synthetic hour at 1 fps (3,600 stored frames of the stored shapes: D-wide global token, g x g grid,
    P patches of which ``kept_fraction`` kept, int8), one query at a time:

    * ``whole_hour``: ground the query in the whole hour (scores of every channel, calibrated fusion,
      smoothing, moments): what a named ``--video`` or a small library costs per video-hour;
    * ``candidates``: ground it in ``spans`` candidate spans of ``span_s`` seconds (a retrieved window with its
      neighbours), what a library-wide query costs after retrieval;
    * ``calibration``: a new query's library-wide centres on the 4,096-frame calibration sample (a fixed
      per-query cost, cached per query vector afterwards).

    Default params (global + grid + context tokens over each frame's 8 best patches) and content tokens only.
    Token reading/decoding is not included (tokens are cached per video by the Searcher). ``frames`` other
    than 3,600 (tests) scales ``ms_per_video_hour`` linearly.
    """
    from ray_vlm.query import grounding as G
    from ray_vlm.query.searcher import CALIBRATION_SAMPLE_FRAMES, ground_spans, scores_on, tokens_nbytes

    rng = np.random.default_rng(seed)
    hour = _synth_tokens(rng, int(frames), dim, grid, patches, kept_fraction, "hour")
    sample = {"sample": _synth_tokens(rng, CALIBRATION_SAMPLE_FRAMES, dim, grid, patches, kept_fraction, "sample")}
    qs = _unit(rng, queries, dim)
    slots = np.arange(0, frames - span_s, span_s)
    starts = np.sort(rng.choice(slots, min(spans, len(slots)), replace=False))
    cand = [("hour", float(s), float(s + span_s)) for s in starts]
    out = {"frames": hour.num_frames, "dim": dim, "grid": grid, "patches": patches, "kept_fraction": kept_fraction,
           "queries": queries, "candidate_spans": len(cand), "span_s": span_s,
           "token_bytes_per_video_hour": tokens_nbytes(hour), "threads": "numpy/BLAS default"}
    for name, params in (("fused", G.DEFAULT_PARAMS), ("content", G.GroundingParams(channels=G.CONTENT_CHANNELS))):
        units = G.channel_units(scores_on(sample, qs[:8], params), params)
        lat = {"calibration": [], "whole_hour": [], "candidates": []}
        for i in range(-1, queries):  # one warm-up query
            q = qs[max(i, 0)][None]
            t = time.perf_counter()
            cal = G.calibration_from_scores(scores_on(sample, q, params), units, params)
            t1 = time.perf_counter()
            ground_spans({"hour": hour}, [[("hour", 0.0, np.inf)]], q, cal, params)
            t2 = time.perf_counter()
            ground_spans({"hour": hour}, [cand], q, cal, params)
            t3 = time.perf_counter()
            if i >= 0:
                lat["calibration"].append(t1 - t)
                lat["whole_hour"].append(t2 - t1)
                lat["candidates"].append(t3 - t2)
        out[name] = {k: {"p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99)} for k, v in lat.items()}
        out[name]["ms_per_video_hour"] = out[name]["whole_hour"]["p50_ms"] * 3600.0 / hour.num_frames
    return out


def query_bench(out: Path, hours: float = 1000.0, dim: int = 384, queries: int = 500, k_windows: int = 128,
                neighbours: int = 1, window_s: float = 8.0, quantization: str = "i8",
                brute_force_queries: int = 10, rebuild: bool = True, encode: bool = True,
                pooling: bool = True, ef_values: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096),
                seed: int = 0, ground: bool = True, lance_ann: bool = True) -> dict:
    """Build the window index over a synthetic store and time queries: brute force vs ANN + rescoring.

    Args:
        out: JSON file written.
        hours: video-hours at 1 fps (1,000 h = 3.6 M frames).
        dim: token width.
        queries: queries for the ANN path and for recall.
        k_windows: ANN candidates per query.
        neighbours: windows either side of a candidate whose frames are rescored.
        window_s / quantization: index settings.
        brute_force_queries: queries timed for the brute-force path (each scans every frame: seconds).
        rebuild: drop a cached index first, so the build is timed.
        encode: also time the bundled text encoder.
        pooling: also compare mean- vs max-pooled vs run window vectors (exact window search).
        ef_values: HNSW beam widths swept for the ANN stage (recall vs latency).
        ground: also time the grounding stage per video-hour (``ground_bench``).
        lance_ann: also the same candidates from Lance's vector index (``lance_ann_bench``), side by side.

    Returns:
        The JSON-able results.
    """
    # Long: one benchmark run read top to bottom: ground truth, each side timed, the table and the JSON.
    from benchmarks.bench import _table, _write, machine
    from ray_vlm.query.windows import INDEX_DIR, WindowIndexConfig, brute_force_search, ensure_index

    t_all = time.perf_counter()
    t = time.perf_counter()
    store, truth = synth_store(hours, dim, seed)
    data_s = time.perf_counter() - t
    frames_total = int(truth["frames"])
    q, kinds, targets = synth_queries(truth, queries, seed + 1)
    config = WindowIndexConfig(window_s=window_s, quantization=quantization, threads=0)
    if rebuild:
        shutil.rmtree(Path(store) / INDEX_DIR, ignore_errors=True)
    gc.collect()
    rss0 = _rss_bytes()
    t = time.perf_counter()
    index = ensure_index(store, config=config)
    build_s = time.perf_counter() - t
    rss_index = _rss_bytes() - rss0
    disk = _dir_bytes(Path(store) / INDEX_DIR)
    ann_bytes = sum(e["files"]["windows.usearch"] for e in index.manifest["shards"])
    print(f"index: {index.num_windows} windows over {index.num_frames} frames, built in {build_s:.1f} s")

    # ground truth: exact best window per query, one batched pass over all frames
    t = time.perf_counter()
    gt = brute_force_search(index, q, k=1, chunk_rows=131_072)
    gt_s = time.perf_counter() - t
    gt_top1 = np.asarray([ids[0] for ids, _ in gt])
    gt_score = np.asarray([sc[0] for _, sc in gt])

    # (b) the product path, one query at a time
    lat_b, lat_ann, hit, ratio, near, best_w = [], [], [], [], [], []
    for i in range(len(q)):
        t = time.perf_counter()
        r = index.retrieve(q[i], k_windows=k_windows, neighbours=neighbours, threads=1)
        best = r.best_frame()
        lat_b.append(time.perf_counter() - t)
        w = int(r.frames.window_ids[best])
        best_w.append(w)
        hit.append(w == gt_top1[i])
        ratio.append(float(r.frame_scores[best]) / float(gt_score[i]))
        near.append(float(r.frame_scores[best]) >= float(gt_score[i]) - 1e-3)
    for i in range(min(len(q), 200)):  # the ANN stage alone
        t = time.perf_counter()
        index.search(q[i], k_windows, threads=1)
        lat_ann.append(time.perf_counter() - t)
    # the ANN stage's beam width: candidates holding the exact best window vs latency
    ef_sweep = {}
    for ef in ef_values:
        index.set_expansion_search(ef)
        lat, held = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            ids, _ = index.search(q[i], k_windows, threads=1)[0]
            lat.append(time.perf_counter() - t)
            held.append(gt_top1[i] in ids)
        ef_sweep[str(ef)] = {"candidates_hold_gt_window": float(np.mean(held)), "p50_ms": _pct(lat, 50),
                             "p99_ms": _pct(lat, 99)}
    index.set_expansion_search(config.expansion_search)
    # graph recall against exact search over the same (quantised) window vectors
    approx = index.search(q, k_windows)
    exact_w = index.search(q, k_windows, exact=True)
    graph_recall = float(np.mean([len(np.intersect1d(a[0], e[0])) / max(1, len(e[0]))
                                  for a, e in zip(approx, exact_w)]))
    cand_recall = float(np.mean([gt_top1[i] in approx[i][0] for i in range(len(q))]))

    # (a) brute force, one query at a time, over every frame
    lat_a = []
    nb = min(brute_force_queries, len(q))
    for i in range(nb):
        t = time.perf_counter()
        brute_force_search(index, q[i], k=1)
        lat_a.append(time.perf_counter() - t)

    res = {
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "data": {"hours": hours, "frames": frames_total, "dim": dim, "token_dtype": "fp16",
                 "frame_matrix_bytes": frames_total * dim * 2, "generate_or_load_s": data_s,
                 "queries": len(q), "scene_queries": int((kinds == 0).sum()), "event_queries": int((kinds == 1).sum())},
        "index": {"config": config.to_dict(), "windows": index.num_windows, "shards": len(index.shard_ids),
                  "build_s": build_s, "bytes_on_disk": disk, "ann_file_bytes": ann_bytes,
                  "rss_after_load_bytes": rss_index, "peak_rss_bytes": _peak_rss_bytes(),
                  "memory_bytes": index.memory_bytes(), "runs": int(sum(e["runs"] for e in index.manifest["shards"])),
                  "shard_timing": [e["timing"] for e in index.manifest["shards"]]},
        "brute_force": {"p50_ms": _pct(lat_a, 50), "p99_ms": _pct(lat_a, 99), "queries_timed": nb,
                        "target_hit": float(np.mean(_target_hit(index, gt_top1, targets))),
                        "note": "every frame scored per query (fp16->fp32 chunks + BLAS matmul); timed on "
                                f"{nb} queries, not extrapolated"},
        "ann_rescore": {"k_windows": k_windows, "neighbours": neighbours, "p50_ms": _pct(lat_b, 50),
                        "p99_ms": _pct(lat_b, 99), "mean_ms": float(np.mean(lat_b)) * 1e3,
                        "ann_only_p50_ms": _pct(lat_ann, 50), "ann_only_p99_ms": _pct(lat_ann, 99),
                        "top1_window_recall": float(np.mean(hit)),
                        "top1_window_recall_scene": float(np.mean(np.asarray(hit)[kinds == 0])),
                        "top1_window_recall_event": float(np.mean(np.asarray(hit)[kinds == 1])),
                        "best_score_reached": float(np.mean(near)),
                        "mean_score_ratio": float(np.mean(ratio)),
                        "candidates_hold_gt_window": cand_recall,
                        "target_hit": float(np.mean(_target_hit(index, np.asarray(best_w), targets))),
                        f"graph_recall@{k_windows}_vs_exact_windows": graph_recall},
        "ef_sweep": ef_sweep,
        "ground_truth_batched_s": gt_s,
        "speedup_p50": _pct(lat_a, 50) / _pct(lat_b, 50),
    }
    if lance_ann:
        res["lance_ann"] = lance_ann_bench(index, q, gt_top1, Path(store).parent, k_windows, neighbours)
    if pooling:
        t = time.perf_counter()
        res["pooling_exact_window_search"] = _pooling_recall(index, q, gt_top1)
        res["pooling_exact_window_search"]["seconds"] = time.perf_counter() - t
    if encode:
        try:
            res["text_encoder_bundled_minilm"] = _encode_latency()
        except Exception as e:  # noqa: BLE001 - the bench still reports the rest
            res["text_encoder_bundled_minilm"] = {"error": f"{type(e).__name__}: {e}"}
    if ground:
        t = time.perf_counter()
        res["grounding"] = ground_bench(dim=dim)
        res["grounding"]["seconds"] = time.perf_counter() - t
    res["total_s"] = time.perf_counter() - t_all
    b, a = res["ann_rescore"], res["brute_force"]
    rows = [
        ["(a) brute force, all frames", f"{a['p50_ms']:.1f}", f"{a['p99_ms']:.1f}", "1.000 (exact)", str(nb)],
        [f"(b) ANN top-{k_windows} windows + rescore", f"{b['p50_ms']:.2f}", f"{b['p99_ms']:.2f}",
         f"{b['top1_window_recall']:.3f}", str(len(q))],
        ["    ANN stage alone", f"{b['ann_only_p50_ms']:.2f}", f"{b['ann_only_p99_ms']:.2f}", "", str(len(lat_ann))],
    ]
    if lance_ann:
        la = res["lance_ann"]
        for sw in la["sweep"]:
            rows += [[f"(c) Lance {la['index_type']} (nprobes {sw['nprobes']}, ef {sw['ef']}) top-{k_windows} "
                      "windows + rescore", f"{sw['p50_ms']:.2f}", f"{sw['p99_ms']:.2f}",
                      f"{sw['top1_window_recall']:.3f}", str(la["queries"])],
                     ["    ANN stage alone", f"{sw['ann_only_p50_ms']:.2f}", f"{sw['ann_only_p99_ms']:.2f}", "",
                      str(la["queries"])]]
    if "one_thread" in res.get("text_encoder_bundled_minilm", {}):
        e = res["text_encoder_bundled_minilm"]
        for name in ("one_thread", "default"):
            label = "1 thread" if name == "one_thread" else f"{e['default_threads']} threads"
            rows.append([f"text encoder (MiniLM, CPU, {label}), separate", f"{e[name]['p50_ms']:.1f}",
                         f"{e[name]['p99_ms']:.1f}", "", str(e["queries"])])
    if ground:
        g = res["grounding"]
        for name in ("fused", "content"):
            rows.append([f"ground 1 video-hour ({name}), per query", f"{g[name]['whole_hour']['p50_ms']:.1f}",
                         f"{g[name]['whole_hour']['p99_ms']:.1f}", "", str(g["queries"])])
        rows.append([f"ground {g['candidate_spans']} candidate spans of {g['span_s']:g} s (fused)",
                     f"{g['fused']['candidates']['p50_ms']:.2f}", f"{g['fused']['candidates']['p99_ms']:.2f}", "",
                     str(g["queries"])])
        rows.append(["calibrate a new query (fused, 4,096-frame sample)",
                     f"{g['fused']['calibration']['p50_ms']:.1f}", f"{g['fused']['calibration']['p99_ms']:.1f}", "",
                     str(g["queries"])])
    _table(f"query latency: {hours:g} video-hours, {frames_total:,} frames, D={dim}, {os.cpu_count()} cores; "
           f"index of {index.num_windows:,} windows built in {build_s:.0f} s ({disk / 1e9:.2f} GB)",
           ["path", "p50 ms", "p99 ms", "top-1 window recall", "queries"], rows)
    _write(out, res)
    return res


if __name__ == "__main__":  # pragma: no cover - manual runs
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/query.json")
    p.add_argument("--hours", type=float, default=1000.0)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k-windows", type=int, default=128)
    p.add_argument("--quantization", default="i8")
    p.add_argument("--no-encode", action="store_true")
    p.add_argument("--no-pooling", action="store_true")
    p.add_argument("--ground-only", action="store_true", help="only the grounding cost per video-hour")
    a = p.parse_args()
    if a.ground_only:
        print(json.dumps(ground_bench(), indent=2))
        raise SystemExit(0)
    print(json.dumps(query_bench(Path(a.out), hours=a.hours, queries=a.queries, k_windows=a.k_windows,
                                 quantization=a.quantization, encode=not a.no_encode,
                                 pooling=not a.no_pooling), indent=2, default=str))
