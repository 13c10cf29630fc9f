"""``python -m benchmarks store-scale``: what committing, refreshing and querying cost as a store grows, v1 vs v2.

For each size (video-hours) and each store format, one run on one machine:

* **build**: a synthetic store of that many video-hours, written through the store's own write and commit calls
  in ``build_commits`` commits. v2 (``TokenStore``): ``write_frames`` (Lance fragments) of about
  ``build_write_frames`` frames at a time (many videos), then ``commit_detailed`` (sources merge-insert), then
  ``compact(retention_s=0)`` (what the index job's ``maybe_compact`` leaves behind, without the retention window).
  v1 (``V1Store``): one Parquet file per video under the 0.1 write operator's staging names (written without
  ``put_bytes``' fsync), then ``commit`` (a full-snapshot JSON manifest). Neither is one write per 32-frame chunk
  as the job does: that layout would take hours at these sizes (the output says so). v2's compaction erases the
  difference; v1 has none, so a v1 store the job wrote holds ~113 files per video-hour where the built one holds
  one (the built v1 stores' manifest bytes, open and refresh times are lower bounds; "files / h (job's layout)"
  reports what the job's commits add).
* **commit one more video-hour** through the job's path, timed ``repeats`` times after one untimed warm-up (a
  running job's driver, whose store object has committed before): 3,600 frames at 1 fps compressed by
  ``CompressTokens`` (global token only, fp16) into chunks of 32 frames, each chunk written by its own
  ``WriteShards`` call (the job's write batch of one chunk), then one driver commit (v2: ``ChunkLedger.commit``;
  v1: ``V1Store.commit`` of the video row and one frames-file grant per chunk file, as the 0.1 ledger did), then
  the job's read-back of the committed rows (``read_videos(version, video_ids=...)``). Reported: the chunk
  writes' and the commit's wall time and the bytes of files they created or changed under the store root.
* **reader**: open (a new ``TokenStore(uri)`` / ``V1Store(uri)`` and ``manifest()``), median of ``repeats``; and
  refresh (one reader object, after each timed commit: ``latest_version()`` + ``manifest()``).
* **files per video-hour** after the last commit and ``compact(retention_s=0)`` (v2) or ``vacuum`` (v1, which has
  no compaction): every file under the root (the window index's ``_index/`` excluded: a cache beside the store).
* **query** (up to ``query_max_hours``): ``Searcher.search_vectors`` for one precomputed query vector at a time
  (retrieve from the window index + ground), BLAS and usearch on one thread, p50/p99 over ``queries`` after a
  short warm-up; the window index is built first (timed apart). The Searcher reads v2 stores; for v1 the same
  Searcher runs over ``V1Store`` (same read API: ``manifest``, ``read_videos``, ``read_frames``).

Synthetic tokens: the global token only (fp16), ``dim`` wide, one video per hour (3,600 frames at 1 fps;
``sparse_fps`` for sizes of at least ``sparse_from_hours`` keeps their disk and build time bounded: the number of
videos and hours is unchanged and the measured hour is always 3,600 frames). Frames follow ~20 s scenes (a random
centroid each) plus per-frame noise, so windows split into runs as real footage does. Each size's stores are built
in a temporary directory and deleted after they are measured (``keep`` keeps them).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

SPACE = "synthetic/store-scale-v1"
ENCODER = "synthetic:store-scale"
CONFIG_HASH = "bench-store-scale"
CHUNK_FRAMES = 32  # the index job's chunk_frames: one WriteShards call per chunk (write batch_size 1)
VIDEO_S = 3600.0  # one synthetic video per hour
SCENE_S = 20.0
DEFAULT_SIZES = (100.0, 1000.0, 10000.0, 100000.0)
STORES = ("v1", "v2")
INDEX_DIR = "_index"


# ------------------------------------------------------------------------------------------ synthetic data


def _tokens(rng: np.random.Generator, n: int, dim: int, frames_per_scene: int) -> np.ndarray:
    """float32 (n, dim) unit vectors: scenes of ``frames_per_scene`` frames around a random centroid, plus noise."""
    scenes = rng.standard_normal((n // max(1, frames_per_scene) + 2, dim), dtype=np.float32)
    x = scenes[np.arange(n) // max(1, frames_per_scene)]
    x += 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _video_id(i: int) -> str:
    return f"{i:016x}"


def _frames_table(videos: Sequence[tuple[str, int]], fps: float, dim: int, rng: np.random.Generator) -> pa.Table:
    """FRAMES_SCHEMA rows of whole videos ``[(video_id, frames)]`` at ``fps`` (global fp16 token only)."""
    from ray_vlm.core import schema as S

    n = sum(k for _, k in videos)
    codes = _tokens(rng, n, dim, max(1, int(round(SCENE_S * fps)))).astype("<f2")
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int64) * 2 * dim).astype(np.int32).tobytes())
    token = pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(codes.tobytes())])
    vids = np.concatenate([np.full(k, v, dtype=object) for v, k in videos])
    fidx = np.concatenate([np.arange(k, dtype=np.int32) for _, k in videos])
    pts = fidx.astype(np.float64) / fps
    cols = {
        S.VIDEO_ID: pa.array(vids.tolist(), pa.string()), S.FRAME_INDEX: fidx, S.PTS_S: pts,
        S.SPAN_END_S: pts + 1.0 / fps, S.CHUNK_INDEX: (fidx // CHUNK_FRAMES).astype(np.int32),
        S.ENCODER: pa.array([ENCODER] * n), S.ENCODER_REVISION: pa.array(["0"] * n),
        S.SPACE: pa.array([SPACE] * n), S.CONFIG_HASH: pa.array([CONFIG_HASH] * n),
        S.LAYOUT: pa.array(["global:fp16"] * n), S.DIM: np.full(n, dim, np.int32),
        S.TOKEN_DTYPE: pa.array(["fp16"] * n), S.GLOBAL_TOKEN: token,
        S.GLOBAL_SCALE: np.ones(n, np.float32), S.GRID_SIZE: np.zeros(n, np.int8),
        S.PATCH_GRID_H: np.zeros(n, np.int16), S.PATCH_GRID_W: np.zeros(n, np.int16),
    }
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in S.FRAMES_SCHEMA]
    return pa.Table.from_arrays([a if isinstance(a, pa.Array) else pa.array(a, f.type)
                                 for a, f in zip(arrays, S.FRAMES_SCHEMA)], schema=S.FRAMES_SCHEMA)


def _video_row(video_id: str, frames: int, duration_s: float, dim: int) -> dict:
    """The video row a finished job commits for one synthetic video (v2 columns; v1 ignores the extra ones)."""
    from ray_vlm.core import schema as S

    chunks = math.ceil(frames / CHUNK_FRAMES)
    return {S.VIDEO_ID: video_id, S.URI: f"/synthetic/{video_id}.mp4", S.STATUS: S.STATUS_OK,
            S.SIZE_BYTES: int(duration_s * 250_000), S.MTIME: 1.7e9, S.CONTAINER: "mp4", S.CODEC: "h264",
            S.WIDTH: 1920, S.HEIGHT: 1080, S.ROTATION_DEG: 0, S.DECLARED_DURATION_S: duration_s,
            S.DURATION_S: duration_s, S.FRAMES_SAMPLED: frames, S.FRAMES_KEPT: frames, S.PATCHES_TOTAL: 0,
            S.PATCHES_KEPT: 0, S.TOKENS: frames, S.STORED_BYTES: frames * (2 * dim + 4), S.CONFIG_HASH: CONFIG_HASH,
            S.ENCODER: ENCODER, S.ENCODER_REVISION: "0", S.SPACE: SPACE, S.INDEXED_AT: time.time(),
            S.CHUNKS_COMMITTED: chunks, S.RESUME_S: duration_s, S.NEXT_FRAME_INDEX: frames}


def _plan(hours: float, fps: float, build_commits: int, build_write_frames: int) -> list[list[list[tuple]]]:
    """Videos of the build, grouped into commits and, inside a commit, into writes: ``[[[(vid, frames, s)]]]``."""
    total_s = hours * 3600.0
    videos = []
    t, i = 0.0, 0
    while t < total_s - 1e-9:
        d = min(VIDEO_S, total_s - t)
        videos.append((_video_id(i), max(1, int(round(d * fps))), d))
        t += d
        i += 1
    per_commit = max(1, math.ceil(len(videos) / max(1, build_commits)))
    commits = []
    for c in range(0, len(videos), per_commit):
        writes, cur, n = [], [], 0
        for v in videos[c:c + per_commit]:
            cur.append(v)
            n += v[1]
            if n >= build_write_frames:
                writes.append(cur)
                cur, n = [], 0
        if cur:
            writes.append(cur)
        commits.append(writes)
    return commits


# ------------------------------------------------------------------------------------------ building


def _build_v2(uri: str, plan, fps: float, dim: int, seed: int) -> dict:
    from ray_vlm.store.token_store import TokenStore, new_generation

    store = TokenStore(uri)
    store.create()
    writes = 0
    t0 = time.perf_counter()
    for ci, commit in enumerate(plan):
        generation = new_generation()  # one job run per build commit
        frags, rows = [], []
        for wi, videos in enumerate(commit):
            rng = np.random.default_rng([seed, ci, wi])  # the same frames as the v1 build
            frags.extend(store.write_frames(_frames_table([(v, k) for v, k, _ in videos], fps, dim, rng),
                                            generation))
            writes += 1
            rows.extend({**_video_row(v, k, d, dim), "generation": generation, "first_chunk": 0}
                        for v, k, d in videos)
        store.commit_detailed(frags, rows)
    build_s = time.perf_counter() - t0
    t = time.perf_counter()
    compact = store.compact(retention_s=0)
    return {"build_s": build_s, "writes": writes, "commits": len(plan), "compact_s": time.perf_counter() - t,
            "compact": compact}


def _build_v1(uri: str, plan, fps: float, dim: int, seed: int) -> dict:
    from ray_vlm.core import schema as S
    from ray_vlm.store.v1 import FRAMES_DIR, V1Store, parquet_bytes, staging_name

    store = V1Store(uri)
    os.makedirs(store.path(FRAMES_DIR), exist_ok=True)
    writes = 0
    t0 = time.perf_counter()
    for ci, commit in enumerate(plan):
        files, rows = [], []
        for wi, videos in enumerate(commit):
            rng = np.random.default_rng([seed, ci, wi])  # the same frames as the v2 build
            table = _as_v1(_frames_table([(v, k) for v, k, _ in videos], fps, dim, rng))
            start = 0
            for v, k, d in videos:  # one file per video: a video is read from one file, as from its 113 in the job
                rel = staging_name(FRAMES_DIR, [[v], CONFIG_HASH])
                data = parquet_bytes(table.slice(start, k), dictionary_columns=_string_columns())
                with open(store.path(rel), "wb") as f:  # the build skips put_bytes' fsync; commits keep theirs
                    f.write(data)
                start += k
                writes += 1
                files.append({"path": rel, "video_ids": [v], "rows": k, "bytes": len(data)})
                rows.append(_video_row(v, k, d, dim))
            assert start == table.num_rows and table.column(S.VIDEO_ID)[start - 1].as_py() == videos[-1][0]
        store.commit(files, rows)
    return {"build_s": time.perf_counter() - t0, "writes": writes, "commits": len(plan), "compact_s": None,
            "compact": None}


def _as_v1(table: pa.Table) -> pa.Table:
    """A frames table as the 0.1 writer stored it (the columns are the same; the schema version was 1)."""
    meta = dict(table.schema.metadata or {})
    meta[b"ray_vlm.schema_version"] = b"1"
    return table.replace_schema_metadata(meta)


def _string_columns() -> list[str]:
    from ray_vlm.core import schema as S

    return [f.name for f in S.FRAMES_SCHEMA if pa.types.is_string(f.type)]


# ------------------------------------------------------------------------------------------ one more hour


def _hour_chunks(video_id: str, dim: int, rng: np.random.Generator, fps: float = 1.0) -> list[dict]:
    """One video-hour as the compress stage's output: one batch (one chunk row) per ``CHUNK_FRAMES`` frames."""
    from ray_vlm.core import schema as S
    from ray_vlm.core.config import CompressConfig
    from ray_vlm.operators.compress import CompressTokens

    frames = int(round(VIDEO_S * fps))
    emb = _tokens(rng, frames, dim, max(1, int(round(SCENE_S * fps))))
    compress = CompressTokens(CompressConfig(grid=0, patches=False, dtype="fp16"))
    n_chunks = math.ceil(frames / CHUNK_FRAMES)
    out = []
    for c in range(n_chunks):
        a, b = c * CHUNK_FRAMES, min(frames, (c + 1) * CHUNK_FRAMES)
        last = c == n_chunks - 1
        fidx = np.arange(a, b, dtype=np.int32)
        pts = fidx / fps

        def obj(x):
            col = np.empty(1, dtype=object)
            col[0] = x
            return col

        batch = {
            S.GLOBAL_EMB: obj(emb[a:b]), S.VIDEO_ID: np.asarray([video_id], dtype=object),
            S.URI: np.asarray([f"/synthetic/{video_id}.mp4"], dtype=object),
            S.CHUNK_INDEX: np.asarray([c], np.int64), S.IS_LAST: np.asarray([last]),
            S.STATUS: np.asarray([S.STATUS_OK], dtype=object), S.ERROR_TYPE: np.asarray([None], dtype=object),
            S.FRAME_INDEX: obj(fidx), S.PTS_S: obj(pts), S.SPAN_END_S: obj(pts + 1.0 / fps),
            S.FRAMES_IN: np.asarray([b - a], np.int64), S.CHUNK_END_S: np.asarray([b / fps]),
            S.ENCODER: np.asarray([ENCODER], dtype=object), S.ENCODER_REVISION: np.asarray(["0"], dtype=object),
            S.SPACE: np.asarray([SPACE], dtype=object),
            S.DURATION_S: np.asarray([VIDEO_S if last else np.nan]),
            S.FRAMES_SAMPLED: np.asarray([frames if last else 0], np.int64),
            S.SIZE_BYTES: np.asarray([int(VIDEO_S * 250_000)], np.int64), S.MTIME: np.asarray([1.7e9]),
        }
        out.append(compress(batch))
    return out


class _V1Writer:
    """The 0.1 write operator's file layout: one staged Parquet file per call (zstd, dictionary strings)."""

    def __init__(self, uri: str):
        from ray_vlm.store.v1 import store_filesystem

        self.fs, root = store_filesystem(uri)
        self.root = root.rstrip("/") or root

    def __call__(self, batch: dict) -> tuple[dict, dict]:
        """(frames-file entry, per-chunk counts) of one chunk batch."""
        from ray_vlm.core import schema as S
        from ray_vlm.core.files import put_bytes
        from ray_vlm.operators.write import WriteShards, _frames_table
        from ray_vlm.store.v1 import FRAMES_DIR, parquet_bytes, staging_name

        part, stat = WriteShards._chunk(_Chunker(), batch, 0)  # the 0.1 operator validated chunks the same way
        table = _frames_table([part])
        vid = str(batch[S.VIDEO_ID][0])
        rel = staging_name(FRAMES_DIR, [[(vid, int(batch[S.CHUNK_INDEX][0]))], CONFIG_HASH])
        data = parquet_bytes(_as_v1(table), dictionary_columns=_string_columns())
        put_bytes(self.fs, f"{self.root}/{rel}", data)
        return {"path": rel, "video_ids": [vid], "rows": table.num_rows, "bytes": len(data)}, stat


class _Chunker:
    """What ``WriteShards._chunk`` reads of its operator (the config hash), without opening a v2 store."""

    config_hash = CONFIG_HASH


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root`` (the window index excluded)."""
    out = {}
    for d, dirs, files in os.walk(root):
        if d == root and INDEX_DIR in dirs:
            dirs.remove(INDEX_DIR)
        for f in files:
            p = os.path.join(d, f)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _written(before: dict, after: dict) -> dict:
    """Bytes and files created or changed between two snapshots."""
    new = [p for p in after if p not in before]
    changed = [p for p in after if p in before and after[p] != before[p]]
    return {"bytes": int(sum(after[p][0] for p in new + changed)), "files_created": len(new),
            "files_changed": len(changed), "files_removed": len([p for p in before if p not in after])}


class _Clock:
    """Wall seconds and CPU seconds (every thread of this process: Lance's too) of a block.

    On a shared machine the wall time grows with the other processes' load while the CPU time barely does."""

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def _commit_hour_v2(store, uri: str, video_id: str, chunks: list[dict], generation: str) -> dict:
    from ray_vlm.operators.write import WriteShards
    from ray_vlm.store.token_store import ChunkLedger

    root = store.root
    s0 = _snapshot(root)
    ledger = ChunkLedger()
    with _Clock() as w:
        for batch in chunks:  # the job constructs the operator in every write task
            ledger.add(WriteShards(uri, CONFIG_HASH, generation=generation)(batch))
    s1 = _snapshot(root)
    with _Clock() as c, _timed_calls(store, ("manifest", "latest_version", "create", "_append",
                                              "_merge_sources")) as parts:
        result = ledger.commit(store)
    s2 = _snapshot(root)
    assert result is not None and result.committed_video_ids == (video_id,), result
    with _Clock() as r:
        store.read_videos(result.version, video_ids=set(result.committed_video_ids))
    return {"write_s": w.wall, "commit_s": c.wall, "readback_s": r.wall, "write_cpu_s": w.cpu, "commit_cpu_s": c.cpu,
            "readback_cpu_s": r.cpu, "write": _written(s0, s1), "commit": _written(s1, s2), "version": result.version,
            "commit_parts_s": parts}


def _commit_hour_v1(store, video_id: str, chunks: list[dict], dim: int) -> dict:
    from ray_vlm.core import schema as S

    root = store.root
    writer = _V1Writer(store.uri)
    s0 = _snapshot(root)
    files, stats = [], []
    with _Clock() as w:
        for batch in chunks:
            entry, stat = writer(batch)
            files.append(entry)
            stats.append(stat)
    s1 = _snapshot(root)
    row = _video_row(video_id, sum(int(s[S.FRAMES_KEPT]) for s in stats), VIDEO_S, dim)
    for k in (S.FRAMES_KEPT, S.TOKENS, S.STORED_BYTES):
        row[k] = sum(int(s[k] or 0) for s in stats)
    with _Clock() as c:
        result = store.commit_detailed(files, [row])
    s2 = _snapshot(root)
    assert result.committed_video_ids == (video_id,), result
    with _Clock() as r:
        store.read_videos(result.version, video_ids={video_id})
    manifest_bytes = os.path.getsize(store._manifest_path(result.version))
    return {"write_s": w.wall, "commit_s": c.wall, "readback_s": r.wall, "write_cpu_s": w.cpu, "commit_cpu_s": c.cpu,
            "readback_cpu_s": r.cpu, "write": _written(s0, s1), "commit": _written(s1, s2), "version": result.version,
            "manifest_bytes": manifest_bytes}


@contextmanager
def _timed_calls(obj, names: Sequence[str]):
    """Seconds spent in some methods of one object while the block runs (outermost calls only)."""
    spent = dict.fromkeys(names, 0.0)
    depth = [0]
    originals = {n: getattr(obj, n) for n in names}

    def wrap(name, fn):
        def inner(*a, **kw):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[name] += time.perf_counter() - t
        return inner

    for n, fn in originals.items():
        setattr(obj, n, wrap(n, fn))
    try:
        yield spent
    finally:
        for n in names:
            delattr(obj, n)  # the instance attribute goes; the class's method shows again


# ------------------------------------------------------------------------------------------ reading


def _open_fresh(kind: str, uri: str) -> _Clock:
    from ray_vlm.store.token_store import TokenStore
    from ray_vlm.store.v1 import V1Store

    with _Clock() as c:
        (TokenStore if kind == "v2" else V1Store)(uri).manifest()
    return c


def _refresh(reader) -> _Clock:
    with _Clock() as c:
        reader.manifest(reader.latest_version())
    return c


def _v2_refresh_parts(uri: str) -> dict:
    """Where a fresh v2 reader's ``manifest()`` goes: opening the sources dataset, reading its rows, the rest."""
    from ray_vlm.store.token_store import SOURCES, TokenStore

    ts = TokenStore(uri)
    ts._check_format()
    t = time.perf_counter()
    ds = ts._dataset(SOURCES)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    table = ds.to_table(columns=[
        "video_id", "uri", "size_bytes", "mtime", "status", "error_type", "config_hash", "frames_kept", "duration_s",
        "chunks_committed", "resume_s", "next_frame_index", "generations", "revision",
        "_row_created_at_version", "_row_last_updated_at_version"])
    scan_s = time.perf_counter() - t
    t = time.perf_counter()
    ts.manifest()
    total_s = time.perf_counter() - t
    return {"open_sources_s": open_s, "scan_sources_s": scan_s, "manifest_total_s": total_s,
            "python_rest_s": max(0.0, total_s - open_s - scan_s), "sources_rows": table.num_rows,
            "sources_fragments": len(ds.get_fragments()), "sources_versions": len(ds.versions())}


# ------------------------------------------------------------------------------------------ queries


class _SynthEncoder:
    """Text side of the synthetic space: a seeded unit vector per text (the Searcher calibrates with some)."""

    def __init__(self, dim: int):
        from ray_vlm.models.base import EncoderSpec

        self.spec = EncoderSpec(ENCODER, "0", SPACE, dim, (224, 224), (1, 1))

    def encode_text(self, texts):
        out = [np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.spec.dim) for t in texts]
        v = np.asarray(out, dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


@contextmanager
def _as_v1_reader():
    """The Searcher and the window index read a v1 store through ``V1Store`` (the read API they use is the same)."""
    from unittest import mock

    import ray_vlm.query.windows as W
    import ray_vlm.store.token_store as T
    from ray_vlm.store.v1 import V1Store

    with mock.patch.object(T, "TokenStore", V1Store), mock.patch.object(W, "TokenStore", V1Store):
        yield


def _query(kind: str, uri: str, q: np.ndarray, dim: int, warmup: int) -> dict:
    from threadpoolctl import threadpool_limits

    from ray_vlm.query.searcher import RetrievalParams, Searcher
    from ray_vlm.query.windows import WindowIndexConfig

    ctx = _as_v1_reader() if kind == "v1" else _null()
    with ctx, threadpool_limits(1):
        t = time.perf_counter()
        s = Searcher(uri, encoder=_SynthEncoder(dim),
                     retrieval=RetrievalParams(index=WindowIndexConfig(threads=1)))
        s.prepare(retrieve=True, ground=False)
        index_s = time.perf_counter() - t
        for i in range(min(warmup, len(q))):  # the first rows warm up (calibration sample, first token reads)
            s.search_vectors(q[i:i + 1], top_k=5)
        lat, cpu, moments = [], [], 0
        for i in range(min(warmup, len(q)), len(q)):
            with _Clock() as c:
                got = s.search_vectors(q[i:i + 1], top_k=5)
            lat.append(c.wall)
            cpu.append(c.cpu)
            moments += len(got[0])
        st = s._state
        index = st.index
    ms, cpu_ms = np.asarray(lat) * 1e3, np.asarray(cpu) * 1e3
    return {"queries": len(lat), "warmup": min(warmup, len(q)), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
            "moments_per_query": moments / max(1, len(lat)), "index_build_or_load_s": index_s,
            "index_windows": int(index.num_windows) if index is not None else 0,
            "whole_library_grounded": index is None}


@contextmanager
def _null():
    yield


# ------------------------------------------------------------------------------------------ one size


def _files_under(root: str) -> int:
    return len(_snapshot(root))


def _dir_bytes(root: str) -> int:
    return sum(s for s, _ in _snapshot(root).values())


def _measure(kind: str, uri: str, hours: float, *, dim: int, repeats: int, seed: int, commit_fps: float,
             queries: np.ndarray | None, warmup: int) -> dict:
    """Commit, reader, compaction and query measurements of one built store."""
    # Long: one store's measurements read top to bottom, in the order a user meets them (commit, reopen, refresh,
    # compact, query), each on the store the previous one left.
    from ray_vlm.store.token_store import TokenStore, new_generation
    from ray_vlm.store.v1 import V1Store

    cls = TokenStore if kind == "v2" else V1Store
    load = {"start": os.getloadavg()[0]}
    driver = cls(uri)
    driver.manifest()  # the job reads the manifest when it starts
    reader = cls(uri)
    reader.manifest()
    commits, refresh, refresh_cpu = [], [], []
    generation = new_generation()
    for i in range(repeats + 1):  # the first commit warms the driver (a running job has committed before)
        rng = np.random.default_rng([seed, 7919, i])
        vid = f"ffff{i:012x}"
        chunks = _hour_chunks(vid, dim, rng, commit_fps)
        r = (_commit_hour_v2(driver, uri, vid, chunks, generation) if kind == "v2"
             else _commit_hour_v1(driver, vid, chunks, dim))
        rc = _refresh(reader)
        r["refresh_s"], r["refresh_cpu_s"] = rc.wall, rc.cpu
        if i:
            commits.append(r)
            refresh.append(rc.wall)
            refresh_cpu.append(rc.cpu)
    oc = [_open_fresh(kind, uri) for _ in range(repeats)]
    opens = [c.wall for c in oc]
    med = statistics.median
    out = {
        "commit_hour": {
            "commit_s": med([c["commit_s"] for c in commits]),
            "commit_cpu_s": med([c["commit_cpu_s"] for c in commits]),
            "commit_bytes": med([c["commit"]["bytes"] for c in commits]),
            "commit_files_created": med([c["commit"]["files_created"] for c in commits]),
            "write_s": med([c["write_s"] for c in commits]),
            "write_cpu_s": med([c["write_cpu_s"] for c in commits]),
            "write_bytes": med([c["write"]["bytes"] for c in commits]),
            "write_files_created": med([c["write"]["files_created"] for c in commits]),
            "readback_s": med([c["readback_s"] for c in commits]),
            "readback_cpu_s": med([c["readback_cpu_s"] for c in commits]),
            "total_s": med([c["write_s"] + c["commit_s"] + c["readback_s"] for c in commits]),
            "total_bytes": med([c["write"]["bytes"] + c["commit"]["bytes"] for c in commits]),
            "files_created": med([c["write"]["files_created"] + c["commit"]["files_created"] for c in commits]),
            "chunks": len(chunks), "frames": int(round(VIDEO_S * commit_fps)),
            "runs": commits,
        },
        "reader": {"open_s": med(opens), "refresh_s": med(refresh), "open_cpu_s": med([c.cpu for c in oc]),
                   "refresh_cpu_s": med(refresh_cpu), "open_runs_s": opens, "refresh_runs_s": refresh},
    }
    if kind == "v2":
        parts = [c["commit_parts_s"] for c in commits]
        out["commit_hour"]["commit_parts_s"] = {k: med([p[k] for p in parts]) for k in parts[0]}
        out["reader"]["manifest_parts"] = _v2_refresh_parts(uri)
    else:
        out["commit_hour"]["manifest_bytes"] = med([c["manifest_bytes"] for c in commits])
    # files per video-hour after compaction (v2) / vacuum (v1)
    files_before = _files_under(driver.root)
    t = time.perf_counter()
    if kind == "v2":
        driver.compact(retention_s=0)
    else:
        driver.vacuum(dry_run=False, min_age_s=0)
    compact_s = time.perf_counter() - t
    m = cls(uri).manifest()
    total_h = m["counts"]["duration_s"] / 3600.0
    files_after = _files_under(driver.root)
    out["files"] = {"before_compaction": files_before, "after_compaction": files_after, "hours": total_h,
                    "per_video_hour": files_after / total_h if total_h else float("nan"),
                    # v1 never compacts: a store the job wrote keeps every file its commits create
                    "job_layout_per_video_hour": (out["commit_hour"]["files_created"] if kind == "v1"
                                                  else files_after / total_h if total_h else float("nan")),
                    "compact_or_vacuum_s": compact_s, "bytes_on_disk": _dir_bytes(driver.root),
                    "videos": m["counts"]["videos"], "frames": m["counts"]["frames"]}
    if queries is not None:
        gc.collect()
        load["query"] = os.getloadavg()[0]
        out["query"] = _query(kind, uri, queries, dim, warmup)
    load["end"] = os.getloadavg()[0]
    out["load_avg_1m"] = load  # other work on the machine: timings under load are slower
    return out


# ------------------------------------------------------------------------------------------ the benchmark


def store_scale_bench(out: Path, *, sizes: Sequence[float] = DEFAULT_SIZES, dim: int = 32, repeats: int = 5,
                      queries: int = 200, warmup: int = 10, query_max_hours: float = 1000.0,
                      sparse_fps: float = 0.1, sparse_from_hours: float = 100000.0, build_commits: int = 10,
                      build_write_frames: int = 360_000, commit_fps: float = 1.0, stores: Sequence[str] = STORES,
                      work_dir: Path | None = None, keep: bool = False, seed: int = 0, echo=print) -> dict:
    """Build each size's stores, measure them, write JSON to ``out`` and return the report.

    Args:
        out: JSON results file (written after every size, so a long run leaves what it measured).
        sizes: store sizes in video-hours.
        dim: global token width (fp16).
        repeats: timed commits of one more video-hour (after one warm-up) and fresh reader opens per store.
        queries / warmup: query vectors timed / untimed first queries, per store, for sizes up to
            ``query_max_hours``.
        sparse_fps / sparse_from_hours: frames per second of the build for sizes of at least that many hours
            (1 fps below). The committed hour is always ``commit_fps``.
        build_commits: commits of the build phase (each one job run: one generation).
        build_write_frames: frames per write of the build phase (the job writes 32).
        commit_fps: frames per second of the measured hour (1.0: 3,600 frames, 113 chunks; tests use less).
        stores: "v1", "v2" or both.
        work_dir: where stores are built (default: a new temporary directory).
        keep: keep the stores (default: deleted after each size is measured).
        seed: data seed.
        echo: progress lines go here.
    """
    # Long: one run read top to bottom: per size, per store, build then measure, the JSON rewritten after each.
    from benchmarks.bench import machine

    out = Path(out)
    for kind in stores:
        if kind not in STORES:
            raise ValueError(f"unknown store format {kind!r}; expected one of {STORES}")
    base = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ray-vlm-store-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": machine(), "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0],
        "setup": {"dim": dim, "token": "global only, fp16", "video_s": VIDEO_S, "fps": 1.0,
                  "sparse_fps": sparse_fps, "sparse_from_hours": sparse_from_hours, "chunk_frames": CHUNK_FRAMES,
                  "build_commits": build_commits, "build_write_frames": build_write_frames,
                  "commit_fps": commit_fps, "repeats": repeats, "queries": queries, "query_warmup": warmup,
                  "query_max_hours": query_max_hours, "seed": seed,
                  "build_note": (f"v2 is built with ~{build_write_frames:,} frames per write (many videos) and "
                                 f"v1 with one file per video, not one write per {CHUNK_FRAMES}-frame chunk as the "
                                 "job does (hours of writes at these sizes); the measured commits use the job's "
                                 "layout. v2's compaction erases the difference; v1 has none, so a v1 store the job "
                                 "wrote holds ~113x the files of the built one and a larger manifest (the built "
                                 "v1 stores' commit bytes, open and refresh times are lower bounds)")},
        "sizes": [],
    }
    try:
        for hours in sizes:
            fps = sparse_fps if hours >= sparse_from_hours else 1.0
            plan = _plan(hours, fps, build_commits, build_write_frames)
            q = None
            if hours <= query_max_hours and queries > 0:
                rng = np.random.default_rng([seed, 4242])
                q = _tokens(rng, queries + warmup, dim, 1)
            entry: dict = {"hours": hours, "build_fps": fps, "videos": sum(len(w) for c in plan for w in c),
                           "frames": sum(k for c in plan for w in c for _, k, _ in w)}
            for kind in stores:
                uri = str(base / f"{kind}-{hours:g}h")
                shutil.rmtree(uri, ignore_errors=True)
                echo(f"{hours:g} h, {kind}: building ({entry['videos']:,} videos, {entry['frames']:,} frames at "
                     f"{fps:g} fps) ...")
                built = (_build_v2 if kind == "v2" else _build_v1)(uri, plan, fps, dim, seed)
                built["files"] = _files_under(uri)
                built["bytes_on_disk"] = _dir_bytes(uri)
                echo(f"  built in {built['build_s']:.1f} s"
                     + (f" + compacted in {built['compact_s']:.1f} s" if built["compact_s"] else "")
                     + f": {built['files']:,} files, {built['bytes_on_disk'] / 1e9:.2f} GB")
                res = _measure(kind, uri, hours, dim=dim, repeats=repeats, seed=seed, commit_fps=commit_fps,
                               queries=q, warmup=warmup)
                res["build"] = built
                entry[kind] = res
                c, r = res["commit_hour"], res["reader"]
                echo(f"  commit 1 h: {c['commit_s'] * 1e3:.0f} ms, {c['commit_bytes'] / 1e3:.1f} kB (writes "
                     f"{c['write_s']:.2f} s, {c['write_bytes'] / 1e6:.2f} MB); open {r['open_s'] * 1e3:.0f} ms, "
                     f"refresh {r['refresh_s'] * 1e3:.0f} ms; {res['files']['per_video_hour']:.3f} files/h"
                     + (f"; query p50 {res['query']['p50_ms']:.1f} ms p99 {res['query']['p99_ms']:.1f} ms"
                        if "query" in res else ""))
                if not keep:
                    shutil.rmtree(uri, ignore_errors=True)
                gc.collect()
            report["sizes"].append(entry)
            report["targets"] = _targets(report)
            _write(out, report)
    finally:
        if not keep and work_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    report["load_avg_1m_end"] = os.getloadavg()[0]
    _write(out, report)
    return report


def _targets(report: dict) -> dict:
    """The issue's targets, per store format, from the sizes measured so far."""
    out = {}
    sizes = report["sizes"]
    for kind in STORES:
        rows = [s for s in sizes if kind in s]
        if not rows:
            continue
        commit = [s[kind]["commit_hour"]["commit_s"] for s in rows]
        refresh = [s[kind]["reader"]["refresh_s"] for s in rows]
        commit_cpu = [s[kind]["commit_hour"]["commit_cpu_s"] for s in rows]
        refresh_cpu = [s[kind]["reader"]["refresh_cpu_s"] for s in rows]
        files = [s[kind]["files"]["job_layout_per_video_hour"] for s in rows]
        q1000 = [s[kind]["query"]["p50_ms"] for s in rows if s["hours"] == 1000.0 and "query" in s[kind]]
        t: dict = {
            "hours": [s["hours"] for s in rows],
            "commit_growth": max(commit) / min(commit), "refresh_growth": max(refresh) / min(refresh),
            "commit_cpu_growth": max(commit_cpu) / min(commit_cpu),
            "refresh_cpu_growth": max(refresh_cpu) / min(refresh_cpu),
            "commit_same_within_2x": max(commit) / min(commit) <= 2.0,
            "refresh_same_within_2x": max(refresh) / min(refresh) <= 2.0,
            "max_files_per_video_hour": max(files), "files_at_most_2_per_hour": max(files) <= 2.0,
        }
        if q1000:
            t["query_p50_ms_at_1000h"] = q1000[0]
            t["query_p50_at_most_20ms_at_1000h"] = q1000[0] <= 20.0
        out[kind] = t
    return out


def _write(out: Path, report: dict) -> None:
    from ray_vlm.cli import json_safe

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=1))


# ------------------------------------------------------------------------------------------ the table


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}")


def _kb(x: float | None) -> str:
    return "-" if x is None else (f"{x / 1e6:.1f} MB" if x >= 1e6 else f"{x / 1e3:.0f} kB")


def format_table(report: dict) -> str:
    """The report as one markdown table: a row per size, v1 | v2 side by side in each cell."""
    head = ["video-hours", "commit 1 h: ms", "commit 1 h: bytes", "chunk writes: s", "read-back: ms", "open: ms",
            "refresh: ms", "files / h (built store, compacted)", "files / h (job's layout)", "query p50: ms",
            "query p99: ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["sizes"]:
        def cell(fn, s=s):
            return " / ".join(fn(s[k]) if k in s else "-" for k in STORES)

        hours = f"{s['hours']:,.0f}" if s["hours"] >= 1 else f"{s['hours']:g}"
        if s.get("build_fps", 1.0) != 1.0:
            hours += f" ({s['build_fps']:g} fps)"
        lines.append("| " + " | ".join([
            hours,
            cell(lambda r: f"{_ms(r['commit_hour']['commit_s'])} ({_ms(r['commit_hour']['commit_cpu_s'])})"),
            cell(lambda r: _kb(r["commit_hour"]["commit_bytes"])),
            cell(lambda r: f"{r['commit_hour']['write_s']:.2f}"),
            cell(lambda r: _ms(r["commit_hour"]["readback_s"])),
            cell(lambda r: f"{_ms(r['reader']['open_s'])} ({_ms(r['reader']['open_cpu_s'])})"),
            cell(lambda r: f"{_ms(r['reader']['refresh_s'])} ({_ms(r['reader']['refresh_cpu_s'])})"),
            cell(lambda r: f"{r['files']['per_video_hour']:.3g}"),
            cell(lambda r: f"{r['files']['job_layout_per_video_hour']:.3g}"),
            cell(lambda r: f"{r['query']['p50_ms']:.1f} ({r['query']['cpu_p50_ms']:.1f})" if "query" in r else "-"),
            cell(lambda r: f"{r['query']['p99_ms']:.1f}" if "query" in r else "-"),
        ]) + " |")
    su = report["setup"]
    lines.append("")
    lines.append(f"v1 / v2 in each cell; after a wall time, in brackets, the CPU time of the process (all threads). "
                 f"{report['machine']}; D={su['dim']} fp16 global tokens, one video per hour "
                 f"at 1 fps (sizes from {su['sparse_from_hours']:,.0f} h built at {su['sparse_fps']:g} fps); the "
                 f"committed hour is {int(VIDEO_S * su['commit_fps']):,} frames in {CHUNK_FRAMES}-frame chunk "
                 f"writes; medians of {su['repeats']}.")
    lines.append(f"Build: {su['build_note']}. Files / h (job's layout): v2 after compaction; v1, which never "
                 "compacts, keeps the files each committed hour creates.")
    for kind, t in (report.get("targets") or {}).items():
        q = t.get("query_p50_ms_at_1000h")
        lines.append(f"{kind}: commit grows {t['commit_growth']:.2f}x (CPU {t['commit_cpu_growth']:.2f}x) and refresh "
                     f"{t['refresh_growth']:.2f}x (CPU {t['refresh_cpu_growth']:.2f}x) over "
                     f"{', '.join(f'{h:g}' for h in t['hours'])} h (target <= 2x); at most "
                     f"{t['max_files_per_video_hour']:.3g} files per video-hour (target <= 2)"
                     + (f"; query p50 at 1,000 h {q:.1f} ms (target <= 20)" if q is not None else "") + ".")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual runs
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/store_scale.json")
    p.add_argument("--sizes", default=",".join(f"{s:g}" for s in DEFAULT_SIZES))
    p.add_argument("--dim", type=int, default=32)
    a = p.parse_args()
    rep = store_scale_bench(Path(a.out), sizes=[float(x) for x in a.sizes.split(",")], dim=a.dim)
    print(format_table(rep))
