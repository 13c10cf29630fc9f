"""ANN index over a token store: *windows* of frames, sharded, versioned with the store's versions.

Two stages answer a query over a large archive, since scoring every frame does not scale:

1. ANN over *windows*: the kept frames of one video whose ``pts_s`` fall in one ``window_s``-second slot
   ``[k W, (k+1) W)`` of its timeline (a fixed grid: ids are stable, a re-indexed video gets the same
   windows). A window covers ``[pts_s of its first frame, span_end_s of its last)``; pruned stretches are
   covered by the kept frame before them.
2. Exact frame scores inside the candidate windows (and ``neighbours`` windows either side, same video):
   :meth:`WindowIndex.frames_of` gathers those frames as contiguous runs of one video in time order, so the
   grounding layer scores them with one matmul. :meth:`WindowIndex.retrieve` does both stages for one query.

Window vectors: one per *run*, not one per window. A window is split into runs where consecutive frames'
cosine drops below ``split_cos`` (a cut, an event entering or leaving the picture), keeping at most
``max_runs`` runs (its strongest changes); each run stores the mean of its frames. A window scores as its best
run. Why: a window mean dilutes short events and an element-wise max drowns them; runs keep them
(``ray-vlm bench query``; results in ``benchmarks/results/query.json``).

Why usearch: one small wheel with no BLAS/OpenMP runtime to clash with torch's; HNSW with int8 and fp16
storage; a shard is one file that ``Index.restore(path, view=True)`` memory-maps; uint64 keys; soft deletes;
batch search that releases the GIL. int8 (each vector pre-scaled to max |x| = 1 so the 8 bits are used) is the
default. Text queries sit far from every frame, where HNSW's greedy walk needs a wide beam:
``expansion_search`` trades recall for latency.

Sharding and versions. Files live beside the store (through ``ray_vlm.core.fs``: local or ``s3://``)::

    <store>/_index/<family>/v00000007.json         index manifest for store version 7 (create-only)
    <store>/_index/<family>/shards/<shard_id>/     immutable shard files:
        windows.usearch   HNSW graph over run vectors (keys: shard-local run ids)
        windows.parquet   per window: video, start_s, end_s, first_row, n_rows, first_run, n_runs
        videos.parquet    per video: video_id, committed_version, first_window, n_windows, first_row, n_rows
        frames.parquet    per frame: pts_s, span_end_s, frame_index, scale
        frames.codes      the frames' global tokens, raw little-endian (n_frames, dim) fp16 or int8

The frame matrix duplicates the store's global tokens so a replica loads a shard with one download and a
memory map instead of decoding Parquet; the store stays the source of truth and the index a rebuildable cache.
``<family>`` names what changes built files (window length, run splitting, quantisation, graph degree,
build-time beam), so indexes built with other settings never mix.

:func:`ensure_index` serves a store version: it loads that version's index manifest if there is one;
otherwise it takes the newest index of an older version as a base, keeps its shards, and indexes only
the videos they lack: new ones, and *replaced* ones (a window is live only while the store still
names the ``committed_version`` its shard recorded). Dead windows are soft-deleted from the loaded graph.
A shard more than ``max_dead_fraction`` dead, or smaller than ``merge_below_windows``, is dropped and its
live videos indexed again inside the new shard (frequent commits must not leave thousands of tiny shards).
An index is never used for a newer store version than the one it names (:class:`StaleIndexError`). Two
processes building the same version race on a create-only manifest; the loser adopts the winner's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_vlm.core import schema as S
from ray_vlm.core.errors import RayVlmError
from ray_vlm.core.files import create_only, is_local, list_versions
from ray_vlm.store.codec import column_to_matrix, token_dtype
from ray_vlm.store.token_store import StoreError, TokenStore

log = logging.getLogger(__name__)

INDEX_FORMAT = "ray-vlm/window-index/v1"
INDEX_DIR = "_index"
SHARDS_DIR = "shards"
ANN_FILE = "windows.usearch"
WINDOWS_FILE = "windows.parquet"
VIDEOS_FILE = "videos.parquet"
FRAMES_FILE = "frames.parquet"
CODES_FILE = "frames.codes"
SHARD_FILES = (ANN_FILE, WINDOWS_FILE, VIDEOS_FILE, FRAMES_FILE, CODES_FILE)
CACHE_ENV = "RAY_VLM_INDEX_CACHE"
Quantization = Literal["f16", "f32", "i8"]

# Frames-table columns a shard build reads from the store.
BUILD_COLUMNS = (S.VIDEO_ID, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S, S.GLOBAL_TOKEN, S.GLOBAL_SCALE, S.DIM,
                 S.TOKEN_DTYPE, S.SPACE, S.ENCODER)


class WindowIndexError(RayVlmError, RuntimeError):
    """The window index cannot do what was asked (bad index files, unusable store, bad query)."""

    code = "window_index_error"


class EmptyStoreError(WindowIndexError):
    """The store (at that version) has no indexed frames: there is nothing to search."""

    code = "store_empty"


class SpaceMismatchError(WindowIndexError):
    """Vectors of different embedding spaces met (a query encoder or a new video of another space)."""

    code = "space_mismatch"


class StaleIndexError(WindowIndexError):
    """No index serves the requested store version (``open_index`` never builds; ``ensure_index`` does)."""

    code = "window_index_stale"


# ================================================================ configuration


@dataclasses.dataclass(frozen=True)
class WindowIndexConfig:
    """How windows are cut and how the ANN graph is built and searched.

    Attributes:
        window_s: window length W in seconds (frames with ``pts_s`` in ``[kW, (k+1)W)`` form window k).
        quantization: how usearch stores run vectors: "i8" (default), "f16" or "f32".
        connectivity: HNSW M (edges per node per layer).
        expansion_add: HNSW efConstruction.
        expansion_search: HNSW ef at query time (raised to the count asked for when that is larger). Not
            part of the family. Text queries sit far from every frame vector (cosine ~0.3), where HNSW's
            greedy walk needs a wide beam: at 1,000 h, ef 2048 is what keeps the right window in the
            candidates for most queries (``ray-vlm bench query`` sweeps it).
        split_cos: a window is split into runs where consecutive frames' cosine drops below this.
        max_runs: vectors per window at most (1: one mean per window, no splitting).
        max_shard_windows: a new shard holds at most this many windows (~1,100 h at 1 fps with 8 s windows).
        merge_below_windows: when an increment is built, shards with fewer windows are folded into it.
        max_dead_fraction: when an increment is built, shards with more dead windows are rebuilt.
        read_group_frames: frames read from the store at a time while building (bounds memory).
        threads: threads for graph construction and batch search (0: all cores).
    """

    window_s: float = 8.0
    quantization: Quantization = "i8"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 2048
    split_cos: float = 0.85
    max_runs: int = 3
    max_shard_windows: int = 500_000
    merge_below_windows: int = 50_000
    max_dead_fraction: float = 0.25
    read_group_frames: int = 400_000
    threads: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, got {self.window_s}")
        if self.quantization not in ("f16", "f32", "i8"):
            raise ValueError(f"quantization must be 'f16', 'f32' or 'i8', got {self.quantization!r}")
        for name in ("connectivity", "expansion_add", "expansion_search", "max_runs", "max_shard_windows",
                     "read_group_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not -1 <= self.split_cos <= 1:
            raise ValueError(f"split_cos is a cosine within [-1, 1], got {self.split_cos}")
        if not 0 <= self.max_dead_fraction <= 1:
            raise ValueError("max_dead_fraction must be within [0, 1]")

    def family(self) -> str:
        """Directory name under ``_index/``: changes whenever built files would differ."""
        key = {"format": INDEX_FORMAT, "window_s": float(self.window_s), "quantization": self.quantization,
               "connectivity": int(self.connectivity), "expansion_add": int(self.expansion_add),
               "split_cos": float(self.split_cos), "max_runs": int(self.max_runs)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        return f"w{self.window_s:g}s-{self.quantization}-{digest}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _metric(quantization: str) -> str:
    # Window vectors are unit length, so inner product ranks like cosine and skips the norms. int8 codes
    # of pre-scaled vectors are not unit length: cosine normalises them back.
    return "cos" if quantization == "i8" else "ip"


def _ann_input(vectors: np.ndarray, quantization: str) -> np.ndarray:
    """Vectors as handed to usearch: f32 as they are; for i8, each scaled to max |x| = 1 (usearch maps
    [-1, 1] to [-127, 127], and unit vectors in 384-d have components ~0.05: 3 bits would be used)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if quantization != "i8":
        return v
    peak = np.abs(v).max(axis=1, keepdims=True) if v.size else np.ones((len(v), 1), np.float32)
    return v / np.where(peak > 0, peak, 1.0)


def _new_ann(dim: int, config: WindowIndexConfig):
    from usearch.index import Index

    return Index(ndim=int(dim), metric=_metric(config.quantization), dtype=config.quantization,
                 connectivity=int(config.connectivity), expansion_add=int(config.expansion_add),
                 expansion_search=int(config.expansion_search))


_SMALL_DECODE = 1 << 20  # values: below this, decode on the calling thread only (see decode_codes)
_TORCH_GRAIN = 32768  # torch runs an element-wise op on one thread below this many elements


def decode_codes(codes: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    """float32 (n, D) from stored codes: fp16 as is, int8 times its per-row scale.

    torch (a core dependency) converts fp16 much faster than numpy, so it is used when importable: this
    conversion, not the matmul, is what scoring frames costs. A query's candidate frames are converted in
    slices under torch's parallel grain, since waking torch's thread pool on a busy machine costs more than the
    conversion (and the library must not change torch's global thread count).
    """
    if codes.dtype != np.float16:
        out = np.asarray(codes, dtype=np.float32)
        if dtype == "int8" and scales is not None:
            out *= np.asarray(scales, np.float32)[:, None]
        return out
    try:
        import warnings

        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return np.asarray(codes, dtype=np.float32)
    codes = np.ascontiguousarray(codes)
    out = np.empty(codes.shape, np.float32)
    with warnings.catch_warnings():  # read-only memmap slices: torch warns, and nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        src, dst = torch.from_numpy(codes), torch.from_numpy(out)
        if codes.size >= _SMALL_DECODE or codes.ndim != 2 or codes.shape[1] == 0:
            dst.copy_(src)
        else:
            step = max(1, _TORCH_GRAIN // codes.shape[1] - 1)
            for a in range(0, len(codes), step):
                dst[a:a + step].copy_(src[a:a + step])
    return out


# ================================================================ windows


def window_starts(video: np.ndarray, pts_s: np.ndarray, window_s: float) -> np.ndarray:
    """First row of each window.

    Args:
        video: int (N,) video of each frame; rows sorted by (video, pts_s).
        pts_s: float (N,) frame times.
        window_s: W.

    Returns:
        int64 (M,) row where each window starts (a window ends where the next starts, or at N).
    """
    n = len(pts_s)
    if n == 0:
        return np.zeros(0, np.int64)
    slot = np.floor(np.asarray(pts_s, np.float64) / float(window_s)).astype(np.int64)
    change = np.ones(n, dtype=bool)
    change[1:] = (video[1:] != video[:-1]) | (slot[1:] != slot[:-1])
    return np.flatnonzero(change).astype(np.int64)


def window_vectors(frames: np.ndarray, starts: np.ndarray, pool: Literal["mean", "max"] = "mean") -> np.ndarray:
    """Window vectors from frame vectors.

    Args:
        frames: float32 (N, D) frame vectors (decoded global tokens).
        starts: int64 (M,) first row of each window (ascending, starts[0] == 0).
        pool: "mean" (the index's choice) or "max" (element-wise; kept for the benchmark's comparison).

    Returns:
        float32 (M, D), L2-normalised (an all-zero window stays zero).
    """
    if len(starts) == 0:
        return np.zeros((0, frames.shape[1]), np.float32)
    ufunc = np.add if pool == "mean" else np.maximum
    pooled = ufunc.reduceat(np.asarray(frames, np.float32), starts, axis=0)  # the mean's direction is the sum's
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def run_starts(frames: np.ndarray, starts: np.ndarray, cut_cos: float, max_runs: int) -> np.ndarray:
    """Split windows at visual changes: first row of each *run* (consecutive similar frames of one window).

    A run starts at every window start and wherever a frame's cosine with the previous frame drops below
    ``cut_cos`` (a shot cut, or a short event entering or leaving the picture). A window keeps at most
    ``max_runs`` runs: its ``max_runs - 1`` strongest changes.

    Args:
        frames: float32 (N, D) frame vectors (unit length or close).
        starts: int64 (M,) window starts.
        cut_cos: cosine under which consecutive frames start a new run.
        max_runs: runs per window at most (1: no splitting).

    Returns:
        int64 (R,) run starts, ascending, a superset of ``starts``.
    """
    n = len(frames)
    if n < 2 or max_runs <= 1:
        return np.asarray(starts, np.int64)
    f = np.asarray(frames, np.float32)
    norms = np.linalg.norm(f, axis=1)
    cos = np.einsum("ij,ij->i", f[1:], f[:-1]) / np.maximum(norms[1:] * norms[:-1], 1e-12)
    cand = np.flatnonzero(cos < cut_cos) + 1  # rows that differ from the row before
    is_start = np.zeros(n, bool)
    is_start[starts] = True
    cand = cand[~is_start[cand]]
    if len(cand):
        win = np.searchsorted(starts, cand, side="right") - 1
        order = np.lexsort((cos[cand - 1], win))  # by window, strongest change first
        cand, win = cand[order], win[order]
        first = np.r_[0, np.flatnonzero(np.diff(win)) + 1]
        rank = np.arange(len(cand)) - np.repeat(first, np.diff(np.r_[first, len(cand)]))
        cand = cand[rank < max_runs - 1]
    return np.union1d(starts, cand).astype(np.int64)


# ================================================================ frames of a shard build


@dataclasses.dataclass
class FrameArrays:
    """Frames of some videos, grouped by video (in ``video_ids`` order) and in time order within each.

    Attributes:
        video_ids: V ids.
        committed_versions: int64 (V,) the store version that committed each video.
        video_starts: int64 (V+1,) row offsets: video i is rows ``[video_starts[i], video_starts[i+1])``.
        codes: (N, D) stored global tokens, fp16 or int8 (``token_dtype``).
        scales: float32 (N,) per-frame scale (1.0 for fp16).
        pts_s / span_end_s: float64 (N,); frame_index: int32 (N,).
        token_dtype: "fp16" | "int8".
        space / encoder: of every frame.
    """

    video_ids: list[str]
    committed_versions: np.ndarray
    video_starts: np.ndarray
    codes: np.ndarray
    scales: np.ndarray
    pts_s: np.ndarray
    span_end_s: np.ndarray
    frame_index: np.ndarray
    token_dtype: str
    space: str
    encoder: str

    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    def decoded(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """float32 (n, D) vectors of ``rows``."""
        return decode_codes(self.codes[rows], self.scales[rows], self.token_dtype)


def frames_from_table(table: pa.Table, committed_versions: Mapping[str, int]) -> FrameArrays:
    """FrameArrays from a frames table (``BUILD_COLUMNS``; any row order).

    Raises:
        SpaceMismatchError: rows of more than one embedding space.
        WindowIndexError: mixed token widths, or a video without a committed version.
    """
    if table.num_rows == 0:
        raise WindowIndexError("frames_from_table: no frames")
    table = table.sort_by([(S.VIDEO_ID, "ascending"), (S.PTS_S, "ascending")])
    spaces = table.column(S.SPACE).unique().to_pylist()
    if len(spaces) != 1:
        raise SpaceMismatchError(f"the frames belong to more than one embedding space: {sorted(spaces)}")
    dims = table.column(S.DIM).unique().to_pylist()
    if len(dims) != 1:
        raise WindowIndexError(f"the frames have more than one token width: {sorted(dims)}")
    dim = int(dims[0])
    dtypes = sorted(table.column(S.TOKEN_DTYPE).unique().to_pylist())
    scales = table.column(S.GLOBAL_SCALE).to_numpy().astype(np.float32)
    if len(dtypes) == 1:
        dtype = dtypes[0]
        token_dtype(dtype)
        codes = np.ascontiguousarray(column_to_matrix(table.column(S.GLOBAL_TOKEN), dim, dtype, out_dtype=None))
    else:  # a store whose layout changed between jobs: fp16 holds both
        dtype = "fp16"
        parts = []
        for name in dtypes:
            sel = table.filter(pa.compute.equal(table.column(S.TOKEN_DTYPE), name))
            parts.append(column_to_matrix(sel.column(S.GLOBAL_TOKEN), dim, name,
                                          sel.column(S.GLOBAL_SCALE).to_numpy()))
        mask = np.asarray(table.column(S.TOKEN_DTYPE).to_pylist(), dtype=object)
        full = np.empty((table.num_rows, dim), np.float32)
        for name, part in zip(dtypes, parts):
            full[mask == name] = part
        codes = full.astype("<f2")
        scales = np.ones(table.num_rows, np.float32)
    vids = table.column(S.VIDEO_ID).to_numpy(zero_copy_only=False)
    change = np.flatnonzero(np.r_[True, vids[1:] != vids[:-1]])
    video_ids = [str(v) for v in vids[change]]
    missing = [v for v in video_ids if v not in committed_versions]
    if missing:
        raise WindowIndexError(f"frames of videos with no committed version: {missing[:5]}")
    return FrameArrays(
        video_ids=video_ids,
        committed_versions=np.asarray([int(committed_versions[v]) for v in video_ids], np.int64),
        video_starts=np.r_[change, table.num_rows].astype(np.int64),
        codes=codes,
        scales=scales,
        pts_s=table.column(S.PTS_S).to_numpy().astype(np.float64),
        span_end_s=table.column(S.SPAN_END_S).to_numpy().astype(np.float64),
        frame_index=table.column(S.FRAME_INDEX).to_numpy().astype(np.int32),
        token_dtype=dtype,
        space=str(spaces[0]),
        encoder=str(table.column(S.ENCODER)[0].as_py()),
    )


# ================================================================ building one shard


def build_shard(groups: Iterable[FrameArrays], out_dir: str | os.PathLike, config: WindowIndexConfig,
                shard_id: str | None = None) -> dict:
    """Build one shard's files in a local directory from groups of frames (a plain function: Ray-able).

    Groups are consumed one at a time (memory: one group's frames plus the graph); each group holds
    whole videos. The files land in ``out_dir`` (created; must not exist yet).

    Args:
        groups: FrameArrays, all of one space, dim and token dtype (the first group's).
        out_dir: local directory for the shard's files.
        config: window and graph settings.
        shard_id: defaults to a fresh ``s-<uuid>``.

    Returns:
        The shard's manifest entry: ``{"id", "windows", "runs", "frames", "videos", "dim", "token_dtype", "space",
        "encoder", "files": {name: bytes}, "build_s"}``.
    """
    # Long: one streaming pass over the frames writes all five shard files, whose row offsets refer to each other.
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    shard_id = shard_id or f"s-{uuid.uuid4().hex[:16]}"
    ann = None
    first: FrameArrays | None = None
    vid_rows: list[tuple[str, int, int, int, int, int]] = []  # id, cv, first_window, n_windows, first_row, n_rows
    win_parts, frame_parts = [], []
    n_frames = n_windows = n_runs = 0
    timing = {"read_s": 0.0, "vectors_s": 0.0, "graph_s": 0.0}
    t_read = time.perf_counter()
    with open(out / CODES_FILE, "wb") as codes_file:
        for g in groups:
            timing["read_s"] += time.perf_counter() - t_read
            if first is None:
                first = g
                ann = _new_ann(g.dim, config)
            g = _as_kind(g, first)
            n = len(g.pts_s)
            if n == 0:
                continue
            video = np.repeat(np.arange(len(g.video_ids), dtype=np.int64), np.diff(g.video_starts))
            starts = window_starts(video, g.pts_s, config.window_s)
            ends = np.r_[starts[1:], n]
            t = time.perf_counter()
            decoded = g.decoded()
            runs = run_starts(decoded, starts, config.split_cos, config.max_runs)
            vecs = window_vectors(decoded, runs)
            del decoded
            keys = np.arange(n_runs, n_runs + len(runs), dtype=np.uint64)  # usearch keys: run ids
            timing["vectors_s"] += time.perf_counter() - t
            t = time.perf_counter()
            assert ann is not None  # made with the first group
            ann.add(keys, _ann_input(vecs, config.quantization), threads=config.threads)
            timing["graph_s"] += time.perf_counter() - t
            first_run = np.searchsorted(runs, starts)
            win_video = video[starts]
            per_video_windows = np.bincount(win_video, minlength=len(g.video_ids))
            first_window = np.r_[0, np.cumsum(per_video_windows)[:-1]]
            for i, vid in enumerate(g.video_ids):
                a, b = int(g.video_starts[i]), int(g.video_starts[i + 1])
                vid_rows.append((vid, int(g.committed_versions[i]), n_windows + int(first_window[i]),
                                 int(per_video_windows[i]), n_frames + a, b - a))
            win_parts.append({
                "video": (win_video + len(vid_rows) - len(g.video_ids)).astype(np.int32),
                "start_s": g.pts_s[starts],
                "end_s": g.span_end_s[ends - 1],
                "first_row": starts + n_frames,
                "n_rows": (ends - starts).astype(np.int32),
                "first_run": first_run + n_runs,
                "n_runs": np.diff(np.r_[first_run, len(runs)]).astype(np.int32),
            })
            frame_parts.append({"pts_s": g.pts_s, "span_end_s": g.span_end_s, "frame_index": g.frame_index,
                                "scale": g.scales.astype(np.float32)})
            np.ascontiguousarray(g.codes).tofile(codes_file)
            n_frames += n
            n_windows += len(starts)
            n_runs += len(runs)
            t_read = time.perf_counter()
    if first is None or n_windows == 0:
        shutil.rmtree(out, ignore_errors=True)
        raise EmptyStoreError("build_shard: no frames to index")
    assert ann is not None  # made with the first group
    ann.save(str(out / ANN_FILE))
    _write_parquet(out / WINDOWS_FILE, _concat_cols(win_parts))
    _write_parquet(out / FRAMES_FILE, _concat_cols(frame_parts))
    _write_parquet(out / VIDEOS_FILE, {
        "video_id": pa.array([r[0] for r in vid_rows], pa.string()),
        "committed_version": np.asarray([r[1] for r in vid_rows], np.int64),
        "first_window": np.asarray([r[2] for r in vid_rows], np.int64),
        "n_windows": np.asarray([r[3] for r in vid_rows], np.int64),
        "first_row": np.asarray([r[4] for r in vid_rows], np.int64),
        "n_rows": np.asarray([r[5] for r in vid_rows], np.int64),
    })
    return {
        "id": shard_id,
        "windows": int(n_windows),
        "runs": int(n_runs),
        "frames": int(n_frames),
        "videos": len(vid_rows),
        "dim": first.dim,
        "token_dtype": first.token_dtype,
        "space": first.space,
        "encoder": first.encoder,
        "files": {name: (out / name).stat().st_size for name in SHARD_FILES},
        "build_s": round(time.perf_counter() - t0, 3),
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }


def _as_kind(g: FrameArrays, first: FrameArrays) -> FrameArrays:
    """``g`` with the shard's token dtype (a store whose layout changed between jobs); other spaces or
    widths are refused."""
    if g.space != first.space:
        raise SpaceMismatchError(f"one shard cannot hold two embedding spaces: {first.space!r} and {g.space!r}")
    if g.dim != first.dim:
        raise WindowIndexError(f"one shard cannot hold {first.dim}-d and {g.dim}-d tokens")
    if g.token_dtype == first.token_dtype:
        return g
    from ray_vlm.store.codec import quantize

    codes, scales = quantize(g.decoded(), first.token_dtype)
    return dataclasses.replace(g, codes=codes, scales=scales, token_dtype=first.token_dtype)


def _concat_cols(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _write_parquet(path: Path, cols: dict) -> None:
    pq.write_table(pa.table(cols), str(path), compression="zstd")


# ================================================================ a loaded shard


class _Shard:
    """One shard's arrays (frame codes memory-mapped) and its usearch graph."""

    def __init__(self, entry: dict, local_dir: Path):
        self.entry = entry
        self.id = entry["id"]
        self.dir = local_dir
        self.dim = int(entry["dim"])
        self.token_dtype = entry["token_dtype"]
        self.n_windows = int(entry["windows"])
        self.n_runs = int(entry["runs"])
        self.n_frames = int(entry["frames"])
        videos = pq.read_table(local_dir / VIDEOS_FILE)
        self.video_ids = np.asarray(videos.column("video_id").to_pylist(), dtype=object)
        self.committed_versions = videos.column("committed_version").to_numpy()
        self.video_first_window = videos.column("first_window").to_numpy()
        self.video_n_windows = videos.column("n_windows").to_numpy()
        self.video_first_row = videos.column("first_row").to_numpy()
        self.video_n_rows = videos.column("n_rows").to_numpy()
        w = pq.read_table(local_dir / WINDOWS_FILE)
        self.win_video = w.column("video").to_numpy()
        self.win_start_s = w.column("start_s").to_numpy()
        self.win_end_s = w.column("end_s").to_numpy()
        self.win_first_row = w.column("first_row").to_numpy()
        self.win_n_rows = w.column("n_rows").to_numpy()
        self.win_first_run = w.column("first_run").to_numpy()
        self.win_n_runs = w.column("n_runs").to_numpy()
        self.run_window = np.repeat(np.arange(self.n_windows, dtype=np.int64), self.win_n_runs)
        f = pq.read_table(local_dir / FRAMES_FILE)
        self.pts_s = f.column("pts_s").to_numpy()
        self.span_end_s = f.column("span_end_s").to_numpy()
        self.frame_index = f.column("frame_index").to_numpy()
        self.scales = f.column("scale").to_numpy()
        if (len(self.win_video) != self.n_windows or len(self.pts_s) != self.n_frames
                or len(self.run_window) != self.n_runs):
            raise WindowIndexError(f"shard {self.id}: files disagree with its manifest entry")
        dt = token_dtype(self.token_dtype)
        expected = self.n_frames * self.dim * dt.itemsize
        size = os.path.getsize(local_dir / CODES_FILE)
        if size != expected:
            raise WindowIndexError(f"shard {self.id}: {CODES_FILE} holds {size} bytes, expected {expected}")
        self.codes = np.memmap(local_dir / CODES_FILE, dtype=dt, mode="r", shape=(self.n_frames, self.dim))
        self.row_window = np.repeat(np.arange(self.n_windows, dtype=np.int64), self.win_n_rows)

    def live_windows(self, live: Mapping[str, int]) -> np.ndarray:
        """bool (M,): windows whose video is live at that committed version."""
        ok_video = np.fromiter((live.get(v) == int(cv) for v, cv in zip(self.video_ids, self.committed_versions)),
                               dtype=bool, count=len(self.video_ids))
        return ok_video[self.win_video]

    def dead_run_keys(self, live: np.ndarray) -> np.ndarray:
        """uint64 usearch keys of the runs of dead windows."""
        dead = np.flatnonzero(~live)
        return _ranges(self.win_first_run[dead], self.win_first_run[dead] + self.win_n_runs[dead]).astype(np.uint64)

    def load_ann(self, dead_keys: np.ndarray, expansion_search: int):
        from usearch.index import Index

        path = str(self.dir / ANN_FILE)
        # A view memory-maps the file (no copy); soft deletes need a loaded copy (usearch must never be
        # asked to remove from a view: it crashes the process).
        ann = Index.restore(path, view=len(dead_keys) == 0)
        if ann is None:
            raise WindowIndexError(f"shard {self.id}: {ANN_FILE} is not a usearch index")
        if ann.size != self.n_runs or ann.ndim != self.dim:
            raise WindowIndexError(f"shard {self.id}: graph holds {ann.size} x {ann.ndim}, expected "
                                   f"{self.n_runs} x {self.dim}")
        if len(dead_keys):
            ann.remove(dead_keys.astype(np.uint64))
        # usearch defines this property's setter apart from its getter, which mypy reads as read-only
        ann.expansion_search = int(expansion_search)  # type: ignore[misc]
        return ann

    def decoded(self, rows: np.ndarray | slice) -> np.ndarray:
        return decode_codes(self.codes[rows], self.scales[rows], self.token_dtype)


# ================================================================ the index


@dataclasses.dataclass(frozen=True)
class FrameBlock:
    """Frames of some windows, in segments: each segment is contiguous frames of one video in time order.

    Attributes:
        video_ids: one per segment (a video appears in several segments when its candidates are far apart).
        segment_starts: int64 (S+1,) row offsets of the segments.
        window_ids: int64 (N,) window of each frame.
        pts_s / span_end_s: float64 (N,); frame i covers ``[pts_s[i], span_end_s[i])``.
        frame_index: int32 (N,).
        codes: (N, D) the stored global tokens (fp16, or int8 with ``scales``); ``vectors`` decodes them.
        scales: float32 (N,) per-frame scales (1.0 for fp16).
        token_dtype: "fp16" | "int8".
    """

    video_ids: tuple[str, ...]
    segment_starts: np.ndarray
    window_ids: np.ndarray
    pts_s: np.ndarray
    span_end_s: np.ndarray
    frame_index: np.ndarray
    codes: np.ndarray
    scales: np.ndarray
    token_dtype: str

    def __len__(self) -> int:
        return len(self.pts_s)

    @property
    def vectors(self) -> np.ndarray:
        """float32 (N, D) decoded global tokens (decoded on each access: keep the result)."""
        return decode_codes(self.codes, self.scales, self.token_dtype)

    def score(self, query_vecs: np.ndarray) -> np.ndarray:
        """Cosine of unit query vectors with every frame: float32 (N,) for (D,), (Q, N) for (Q, D)."""
        q = np.asarray(query_vecs, np.float32)
        return (q @ self.vectors.T) if q.ndim == 2 else np.einsum("ij,j->i", self.vectors, q)

    def segments(self) -> Iterator[tuple[str, slice]]:
        """(video_id, rows) per segment."""
        for i, vid in enumerate(self.video_ids):
            yield vid, slice(int(self.segment_starts[i]), int(self.segment_starts[i + 1]))


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """What :meth:`WindowIndex.retrieve` found for one query.

    Attributes:
        window_ids / window_scores: the ANN candidates, best first (scores: approximate cosine).
        frames: the candidates' frames (plus neighbour windows).
        frame_scores: float32 (N,) exact cosine of the query with each frame of ``frames``.
    """

    window_ids: np.ndarray
    window_scores: np.ndarray
    frames: FrameBlock
    frame_scores: np.ndarray

    def best_frame(self) -> int:
        """Row in ``frames`` of the highest-scoring frame (-1 if none)."""
        return int(np.argmax(self.frame_scores)) if len(self.frame_scores) else -1


class WindowIndex:
    """A loaded window index serving one store version. Thread-safe for concurrent searches.

    Window ids are global: shard offset + shard-local window id; they index :attr:`window_table`.
    """

    def __init__(self, manifest: dict, shards: list[_Shard], live: Mapping[str, int], config: WindowIndexConfig,
                 store_uri: str = ""):
        self.manifest = manifest
        self.config = config
        self.store_uri = store_uri
        self.store_version = int(manifest["store_version"])
        self.space = manifest["space"]
        self.encoder = manifest.get("encoder")
        self.dim = int(manifest["dim"])
        self.window_s = float(config.window_s)
        self._shards = shards
        self._offsets = np.r_[0, np.cumsum([s.n_windows for s in shards])].astype(np.int64)
        self._live = [s.live_windows(live) for s in shards]
        self._anns = [s.load_ann(s.dead_run_keys(m), config.expansion_search) for s, m in zip(shards, self._live)]
        self._live_counts = [int(m.sum()) for m in self._live]
        self._live_runs = [int(s.win_n_runs[m].sum()) for s, m in zip(shards, self._live)]
        if sum(self._live_counts) == 0:
            raise EmptyStoreError(f"{store_uri or 'the store'} v{self.store_version}: no live windows to search")

    def __repr__(self) -> str:
        return (f"WindowIndex({self.store_uri!r} v{self.store_version}, {len(self._shards)} shards, "
                f"{self.num_windows} live windows, space={self.space!r})")

    # ---------------------------------------------------------------- sizes and tables
    @property
    def num_windows(self) -> int:
        """Live windows."""
        return sum(self._live_counts)

    @property
    def num_frames(self) -> int:
        """Frames of live windows."""
        return int(sum(s.win_n_rows[m].sum() for s, m in zip(self._shards, self._live)))

    @property
    def shard_ids(self) -> list[str]:
        return [s.id for s in self._shards]

    def memory_bytes(self) -> dict[str, int]:
        """What the loaded index holds: ``graph`` (usearch: vectors + links, memory-mapped when no window is
        dead), ``frame_codes`` (memory-mapped frame matrix: page cache, touched as candidates are scored),
        ``arrays`` (per-window and per-frame metadata in RAM)."""
        arrays = 0
        for s in self._shards:
            arrays += sum(a.nbytes for a in (s.win_video, s.win_start_s, s.win_end_s, s.win_first_row,
                                            s.win_n_rows, s.win_first_run, s.win_n_runs, s.run_window,
                                            s.pts_s, s.span_end_s, s.frame_index, s.scales, s.row_window))
        graph = sum(max(a.memory_usage, s.entry["files"][ANN_FILE]) for a, s in zip(self._anns, self._shards))
        return {"graph": int(graph),
                "frame_codes": int(sum(s.codes.nbytes for s in self._shards)), "arrays": int(arrays)}

    def set_expansion_search(self, ef: int) -> None:
        """HNSW ef for later searches (a search asking for more results than ef raises it for itself)."""
        if int(ef) < 1:
            raise WindowIndexError("expansion_search must be at least 1")
        self.config = dataclasses.replace(self.config, expansion_search=int(ef))
        for a in self._anns:
            a.expansion_search = int(ef)

    @property
    def window_table(self) -> pa.Table:
        """One row per window id: window_id, video_id, start_s, end_s, n_rows, shard, first_row, live."""
        cols = defaultdict(list)
        for i, (s, m) in enumerate(zip(self._shards, self._live)):
            cols["window_id"].append(np.arange(self._offsets[i], self._offsets[i + 1], dtype=np.int64))
            cols["video_id"].append(s.video_ids[s.win_video])
            cols["start_s"].append(s.win_start_s)
            cols["end_s"].append(s.win_end_s)
            cols["n_rows"].append(s.win_n_rows)
            cols["shard"].append(np.full(s.n_windows, i, np.int32))
            cols["first_row"].append(s.win_first_row)
            cols["live"].append(m)
        out = {k: np.concatenate(v) for k, v in cols.items()}
        out["video_id"] = pa.array(out["video_id"].tolist(), pa.string())
        return pa.table(out)

    def windows(self, window_ids) -> dict[str, np.ndarray]:
        """video_id (object), start_s, end_s (float64) of some windows."""
        ids = np.asarray(window_ids, np.int64).reshape(-1)
        sh, local = self._locate(ids)
        vid = np.empty(len(ids), object)
        start = np.empty(len(ids))
        end = np.empty(len(ids))
        for i in np.unique(sh):
            sel = sh == i
            s = self._shards[i]
            vid[sel] = s.video_ids[s.win_video[local[sel]]]
            start[sel] = s.win_start_s[local[sel]]
            end[sel] = s.win_end_s[local[sel]]
        return {"video_id": vid, "start_s": start, "end_s": end}

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) and (ids.min() < 0 or ids.max() >= self._offsets[-1]):
            raise WindowIndexError(f"window ids outside [0, {int(self._offsets[-1])})")
        sh = np.searchsorted(self._offsets, ids, side="right") - 1
        return sh, ids - self._offsets[sh]

    def check_space(self, space: str) -> None:
        """Raise SpaceMismatchError unless queries of ``space`` can search this index."""
        if space != self.space:
            raise SpaceMismatchError(f"the index holds vectors of space {self.space!r}; a query encoder of space "
                                     f"{space!r} cannot search it (re-encode the query with the store's encoder)")

    # ---------------------------------------------------------------- search
    def search(self, query_vecs: np.ndarray, k: int = 64, *, exact: bool = False,
               threads: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k live windows per query.

        Args:
            query_vecs: float (Q, D) or (D,) query embeddings of this index's space (normalised here).
            k: windows per query.
            exact: brute force over the window vectors instead of the graph (recall baseline).
            threads: usearch threads (default ``config.threads``; 1 is best for one query).

        Returns:
            Q pairs ``(window_ids int64 (k',), scores float32 (k',))``, best first; a window's score is the
            cosine of its best run's (quantised) vector; k' = min(k, live windows).
        """
        q = as_queries(query_vecs, self.dim)
        if k < 1:
            raise WindowIndexError("k must be at least 1")
        threads = self.config.threads if threads is None else threads
        qa = _ann_input(q, self.config.quantization)
        ids_parts, score_parts = [], []
        for i, (ann, n_live, n_runs) in enumerate(zip(self._anns, self._live_counts, self._live_runs)):
            if n_live == 0:
                continue
            want = min(int(k), n_live)
            count = min(n_runs, want + want // 2 + 8)  # most windows are one run: a little over-fetch suffices
            while True:
                if not exact:  # ef below the count cannot return that many
                    ef = max(int(self.config.expansion_search), count)
                    if ann.expansion_search != ef:
                        ann.expansion_search = ef
                m = ann.search(qa, count, threads=threads, exact=exact)
                keys = np.asarray(m.keys, dtype=np.int64).reshape(len(q), -1)
                dist = np.asarray(m.distances, dtype=np.float32).reshape(len(q), -1)
                # one query gives Matches, trimmed to what was found; a batch gives BatchMatches + counts
                found = np.asarray(m.counts).reshape(-1) if hasattr(m, "counts") else np.array([keys.shape[1]])
                per_query = [self._dedupe(self._shards[i], keys[j, :found[j]], dist[j, :found[j]], want)
                             for j in range(len(q))]
                if count >= n_runs or all(len(w) >= want for w, _ in per_query):
                    break
                count = min(n_runs, count * 2)  # windows of many runs crowded the results: ask for more
            ids = np.full((len(q), want), -1, np.int64)
            scores = np.full((len(q), want), -np.inf, np.float32)
            for j, (w, sc) in enumerate(per_query):
                ids[j, :len(w)] = w + self._offsets[i]
                scores[j, :len(w)] = sc
            ids_parts.append(ids)
            score_parts.append(scores)
        ids = np.concatenate(ids_parts, axis=1)
        scores = np.concatenate(score_parts, axis=1)
        out = []
        for qi in range(len(q)):
            order = np.argsort(-scores[qi], kind="stable")[: int(k)]
            order = order[np.isfinite(scores[qi, order])]
            out.append((ids[qi, order], scores[qi, order]))
        return out

    @staticmethod
    def _dedupe(shard: _Shard, run_keys: np.ndarray, dist: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard-local windows of run hits (best run first, as usearch orders them), at most ``want``."""
        win = shard.run_window[run_keys]
        _, first = np.unique(win, return_index=True)
        first = np.sort(first)[:want]
        return win[first], (1.0 - dist[first]).astype(np.float32)

    # ---------------------------------------------------------------- frames of windows
    def frames_of(self, window_ids, neighbours: int = 0) -> FrameBlock:
        """Frames of some windows (plus ``neighbours`` windows either side within the same video).

        Overlapping or touching row ranges of one video are merged, so each segment is a contiguous run of
        one video's frames in time order: score it with one matmul and read the curve directly.

        Args:
            window_ids: int (n,) window ids (any order; duplicates ignored).
            neighbours: windows added on each side.

        Returns:
            FrameBlock, segments ordered by (shard, video, time).
        """
        ids = np.unique(np.asarray(window_ids, np.int64).reshape(-1))
        sh, local = self._locate(ids)
        vids, seg_lens, win_parts, rows_per_shard = [], [], [], []
        for i in np.unique(sh):
            s = self._shards[i]
            w = local[sh == i]
            v = s.win_video[w]
            lo = np.maximum(w - neighbours, s.video_first_window[v])
            hi = np.minimum(w + neighbours, s.video_first_window[v] + s.video_n_windows[v] - 1)
            # merge [lo, hi] window ranges of the same video (ids are sorted, so ranges are too)
            new = np.r_[True, (v[1:] != v[:-1]) | (lo[1:] > hi[:-1] + 1)]
            seg_lo = lo[new]
            seg_hi = np.maximum.reduceat(hi, np.flatnonzero(new))
            r0 = s.win_first_row[seg_lo]
            r1 = s.win_first_row[seg_hi] + s.win_n_rows[seg_hi]
            rows = _ranges(r0, r1)
            rows_per_shard.append((i, rows))
            vids.extend(s.video_ids[v[new]].tolist())
            seg_lens.append(r1 - r0)
            win_parts.append(s.row_window[rows] + self._offsets[i])
        dtypes = {self._shards[i].token_dtype for i, _ in rows_per_shard}
        dtype = dtypes.pop() if len(dtypes) == 1 else "fp16"  # mixed shards: int8 decoded into fp16
        if not rows_per_shard:
            return FrameBlock((), np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
                              np.zeros(0, np.int32), np.zeros((0, self.dim), np.float16), np.zeros(0, np.float32),
                              "fp16")
        pts, span, fidx, codes, scales = [], [], [], [], []
        for i, rows in rows_per_shard:
            s = self._shards[i]
            pts.append(s.pts_s[rows])
            span.append(s.span_end_s[rows])
            fidx.append(s.frame_index[rows])
            if s.token_dtype == dtype:
                codes.append(s.codes[rows])
                scales.append(s.scales[rows])
            else:
                codes.append(s.decoded(rows).astype(np.float16))
                scales.append(np.ones(len(rows), np.float32))
        lens = np.concatenate(seg_lens)
        return FrameBlock(
            video_ids=tuple(vids),
            segment_starts=np.r_[0, np.cumsum(lens)].astype(np.int64),
            window_ids=np.concatenate(win_parts),
            pts_s=np.concatenate(pts),
            span_end_s=np.concatenate(span),
            frame_index=np.concatenate(fidx),
            codes=np.concatenate(codes) if len(codes) > 1 else codes[0],
            scales=np.concatenate(scales),
            token_dtype=dtype,
        )

    def video_frames(self, video_id: str) -> FrameBlock:
        """All frames of one live video as one segment (for grounding inside a named video)."""
        for i, (s, m) in enumerate(zip(self._shards, self._live)):
            hit = np.flatnonzero(s.video_ids == video_id)
            for v in hit:
                w0 = int(s.video_first_window[v])
                if s.video_n_windows[v] and m[w0]:
                    ids = self._offsets[i] + np.arange(w0, w0 + int(s.video_n_windows[v]))
                    return self.frames_of(ids)
        raise WindowIndexError(f"video {video_id!r} is not in this index (store v{self.store_version})")

    def retrieve(self, query_vec: np.ndarray, k_windows: int = 128, neighbours: int = 1,
                 threads: int = 1) -> Retrieval:
        """Both stages for one query: ANN top ``k_windows`` windows, then exact scores of their frames.

        Args:
            query_vec: float (D,) query embedding of this index's space.
            k_windows: ANN candidates.
            neighbours: windows either side (same video) whose frames are scored too.
            threads: usearch threads for the ANN stage.
        """
        q = as_queries(query_vec, self.dim)
        if len(q) != 1:
            raise WindowIndexError("retrieve takes one query vector; use search() for batches")
        ids, scores = self.search(q, k_windows, threads=threads)[0]
        block = self.frames_of(ids, neighbours)
        return Retrieval(ids, scores, block, block.score(q[0]))

    # ---------------------------------------------------------------- exact baseline
    def iter_frame_chunks(self, chunk_rows: int = 262_144) -> Iterator[tuple[int, np.ndarray, int, np.ndarray]]:
        """(shard, window starts in chunk (local window ids), rows slice start, float32 vectors) chunks that
        end on window boundaries, over live windows only."""
        for i, (s, m) in enumerate(zip(self._shards, self._live)):
            live_w = np.flatnonzero(m)
            if not len(live_w):
                continue
            # runs of consecutive live windows are contiguous rows
            breaks = np.flatnonzero(np.diff(live_w) != 1) + 1
            for run in np.split(live_w, breaks):
                j = 0
                while j < len(run):
                    r0 = int(s.win_first_row[run[j]])
                    cum = s.win_first_row[run[j:]] + s.win_n_rows[run[j:]] - r0
                    take = max(1, int(np.searchsorted(cum, chunk_rows, side="right")))
                    ws = run[j:j + take]
                    r1 = int(s.win_first_row[ws[-1]] + s.win_n_rows[ws[-1]])
                    yield i, ws, r0, s.decoded(np.arange(r0, r1))
                    j += take


def brute_force_search(index: WindowIndex, query_vecs: np.ndarray, k: int = 10,
                       chunk_rows: int = 262_144) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact baseline: top-k live windows per query ranked by their best frame's cosine with the query.

    Scores every live frame (fp16/int8 -> float32 in chunks, one matmul per chunk), takes each window's
    maximum, keeps the top k. The top-1 window holds the archive's best frame.

    Args:
        index: the index whose frames are scored.
        query_vecs: float (Q, D) or (D,).
        k: windows per query.
        chunk_rows: frames converted at a time (memory: chunk_rows * (D + Q) * 4 bytes).

    Returns:
        Q pairs ``(window_ids int64 (k',), scores float32 (k',))``, best first.
    """
    q = as_queries(query_vecs, index.dim)
    best_ids = np.full((len(q), 0), -1, np.int64)
    best_scores = np.full((len(q), 0), -np.inf, np.float32)
    for i, ws, r0, vecs in index.iter_frame_chunks(chunk_rows):
        s = index._shards[i]
        scores = vecs @ q.T  # (rows, Q)
        starts = s.win_first_row[ws] - r0
        win_max = np.maximum.reduceat(scores, starts, axis=0).T  # (Q, windows)
        ids = np.broadcast_to(ws + index._offsets[i], win_max.shape)
        best_ids = np.concatenate([best_ids, ids], axis=1)
        best_scores = np.concatenate([best_scores, win_max.astype(np.float32)], axis=1)
        if best_ids.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_ids = np.take_along_axis(best_ids, keep, 1)
            best_scores = np.take_along_axis(best_scores, keep, 1)
    out = []
    for qi in range(len(q)):
        order = np.argsort(-best_scores[qi], kind="stable")
        out.append((best_ids[qi, order], best_scores[qi, order]))
    return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], ends[i])`` without a Python loop."""
    lens = (ends - starts).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.r_[0, np.cumsum(lens)[:-1]], lens)
    return np.arange(total, dtype=np.int64) + offsets


def as_queries(query_vecs, dim: int) -> np.ndarray:
    q = np.asarray(query_vecs, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise WindowIndexError(f"query vectors must be (Q, {dim}); got shape {tuple(np.shape(query_vecs))}")
    if len(q) == 0:
        raise WindowIndexError("no query vectors")
    if not np.all(np.isfinite(q)):
        raise WindowIndexError("query vectors contain NaN or inf")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise WindowIndexError("a query vector is all zeros")
    return np.ascontiguousarray(q / norms)


# ================================================================ versions: ensure / open


class _IndexFiles:
    """Where an index family's files live in the store, and their local cache."""

    def __init__(self, ts: TokenStore, config: WindowIndexConfig, cache_dir: str | os.PathLike | None):
        self.ts = ts
        self.fs = ts.fs
        self.local = is_local(ts.fs)
        self.family = config.family()
        self.root = f"{ts.root}/{INDEX_DIR}/{self.family}"
        if cache_dir is None:
            base = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ray-vlm" / "index"))
            cache_dir = base / hashlib.sha256(ts.uri.encode()).hexdigest()[:16]
        self.cache = Path(cache_dir) / self.family

    def manifest_path(self, version: int) -> str:
        return f"{self.root}/v{version:08d}.json"

    def shard_path(self, shard_id: str) -> str:
        return f"{self.root}/{SHARDS_DIR}/{_clean_id(shard_id)}"

    def versions(self) -> list[int]:
        return list_versions(self.fs, self.root)

    def read_manifest(self, version: int) -> dict:
        try:
            m = json.loads(self.fs.cat_file(self.manifest_path(version)))
        except FileNotFoundError:
            raise StaleIndexError(f"{self.ts.uri}: no index for store version {version} "
                                  f"(family {self.family})") from None
        except ValueError as e:
            raise WindowIndexError(f"{self.manifest_path(version)} is not valid JSON: {e}") from None
        if not isinstance(m, dict) or m.get("format") != INDEX_FORMAT or m.get("store_version") != version:
            raise WindowIndexError(f"{self.manifest_path(version)}: not a {INDEX_FORMAT} manifest for v{version}")
        return m

    def local_shard(self, entry: dict) -> Path:
        """Local directory holding a shard's files (the store itself when it is local, else the cache)."""
        if self.local:
            return Path(self.shard_path(entry["id"]))
        local = self.cache / SHARDS_DIR / _clean_id(entry["id"])
        for name, size in entry["files"].items():
            dst = local / name
            if dst.exists() and dst.stat().st_size == int(size):
                continue
            local.mkdir(parents=True, exist_ok=True)
            tmp = local / f".{name}.{uuid.uuid4().hex}.tmp"
            try:
                self.fs.get_file(f"{self.shard_path(entry['id'])}/{name}", str(tmp))
            except FileNotFoundError:
                raise WindowIndexError(f"{self.ts.uri}: shard file {entry['id']}/{name} is missing") from None
            if tmp.stat().st_size != int(size):
                tmp.unlink()
                raise WindowIndexError(f"{self.ts.uri}: shard file {entry['id']}/{name} has the wrong size")
            os.replace(tmp, dst)
        return local

    def build_dir(self, shard_id: str) -> Path:
        if self.local:
            return Path(self.root) / SHARDS_DIR / f".tmp-{shard_id}"
        return self.cache / SHARDS_DIR / f".tmp-{shard_id}"

    def publish(self, shard_id: str, built: Path) -> None:
        """Move a built shard to its final place (local: a rename; remote: upload, the build dir becomes
        the cache)."""
        if self.local:
            os.replace(built, self.shard_path(shard_id))
            return
        for name in SHARD_FILES:
            self.fs.put_file(str(built / name), f"{self.shard_path(shard_id)}/{name}")
        final = self.cache / SHARDS_DIR / shard_id
        shutil.rmtree(final, ignore_errors=True)
        os.replace(built, final)

    def remove_shard(self, shard_id: str) -> None:
        try:
            if self.local:
                shutil.rmtree(self.shard_path(shard_id), ignore_errors=True)
            else:
                self.fs.rm(self.shard_path(shard_id), recursive=True)
        except (FileNotFoundError, OSError):
            pass


def _clean_id(shard_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", str(shard_id)) or shard_id.startswith("."):
        raise WindowIndexError(f"bad shard id {shard_id!r}")
    return shard_id


def live_videos(manifest: dict) -> dict[str, int]:
    """``{video_id: committed_version}`` of the videos of a store version (its ``manifest()``) that have frames
    to index."""
    return {vid: int(rec["committed_version"]) for vid, rec in manifest["videos"].items()
            if rec.get("status") != S.STATUS_FAILED and int(rec.get("frames_kept") or 0) > 0}


def ensure_index(store_uri: str, storage_options: dict | None = None, window_s: float = 8.0,
                 cache_dir: str | os.PathLike | None = None, *, version: int | None = None,
                 space: str | None = None, config: WindowIndexConfig | None = None,
                 build: bool = True) -> WindowIndex:
    """The window index of a store version, building what is missing.

    Args:
        store_uri: token store root (local or ``s3://``).
        storage_options: for the store's filesystem.
        window_s: window length (ignored when ``config`` is given).
        cache_dir: local directory for shard files of a remote store (default
            ``$RAY_VLM_INDEX_CACHE`` or ``~/.cache/ray-vlm/index``, one sub-directory per store).
        version: store version to serve (default: latest).
        space: if given, the embedding space the caller will query with; checked against the store's.
        config: index settings (default ``WindowIndexConfig(window_s=window_s)``).
        build: False never builds (raises StaleIndexError when the version has no index).

    Returns:
        A loaded WindowIndex for that version.

    Raises:
        EmptyStoreError: the store version holds no frames.
        SpaceMismatchError: ``space`` differs from the store's, or the store mixes spaces.
        StaleIndexError: ``build=False`` and no index serves the version.
    """
    config = config or WindowIndexConfig(window_s=window_s)
    ts = TokenStore(store_uri, storage_options)
    try:
        m = ts.manifest(version)
    except StoreError as e:
        raise WindowIndexError(str(e)) from e
    version = int(m["version"])
    live = live_videos(m)
    if not live:
        raise EmptyStoreError(f"{store_uri} v{version} holds no indexed frames (videos: {m['counts']['videos']}, "
                              f"frames: {m['counts']['frames']}); index some videos first")
    if space is not None:  # refuse before building anything (the videos table is small)
        videos = ts.read_videos(version, video_ids=live)
        spaces = {x for x in videos.column(S.SPACE).to_pylist() if x}
        if spaces and spaces != {space}:
            raise SpaceMismatchError(f"{store_uri} holds vectors of space {sorted(spaces)[0]!r}"
                                     f"{' (and others)' if len(spaces) > 1 else ''}; queries of space {space!r} "
                                     f"cannot search it")
    files = _IndexFiles(ts, config, cache_dir)
    versions = files.versions()
    if version in versions:
        im = files.read_manifest(version)
    elif not build:
        newest = max([v for v in versions if v < version], default=None)
        hint = f"; the newest older index serves v{newest}" if newest is not None else ""
        raise StaleIndexError(f"{store_uri}: no index for store version {version}{hint}; run ensure_index to "
                              f"build the increment")
    else:
        base = max([v for v in versions if v < version], default=None)
        im = _build_version(ts, files, config, m, live, base)
    if space is not None and im["space"] != space:
        raise SpaceMismatchError(f"{store_uri} holds vectors of space {im['space']!r}; queries of space "
                                 f"{space!r} cannot search it")
    shards = [_Shard(e, files.local_shard(e)) for e in im["shards"]]
    return WindowIndex(im, shards, live, config, store_uri)


def open_index(store_uri: str, storage_options: dict | None = None, *, version: int | None = None,
               config: WindowIndexConfig | None = None, cache_dir: str | os.PathLike | None = None,
               space: str | None = None) -> WindowIndex:
    """Load the index of a store version without building anything (StaleIndexError if there is none)."""
    return ensure_index(store_uri, storage_options, cache_dir=cache_dir, version=version, space=space,
                        config=config, build=False)


def _build_version(ts: TokenStore, files: _IndexFiles, config: WindowIndexConfig, m: dict,
                   live: dict[str, int], base: int | None) -> dict:
    """Make the index manifest of store version ``m`` from an older one (or nothing): keep its good
    shards, index the rest into new ones, create the manifest (create-only; a lost race adopts the winner)."""
    # Long: keep, rebuild and commit are one transaction over the index manifest (a lost race adopts the winner).
    version = int(m["version"])
    base_m = files.read_manifest(base) if base is not None else None
    kept, covered = [], set()
    dropped = []
    for e in (base_m["shards"] if base_m else []):
        local = files.local_shard(e)
        videos = pq.read_table(local / VIDEOS_FILE, columns=["video_id", "committed_version", "n_windows"])
        vids = videos.column("video_id").to_pylist()
        cvs = videos.column("committed_version").to_pylist()
        nw = videos.column("n_windows").to_numpy()
        alive = np.asarray([live.get(v) == int(c) for v, c in zip(vids, cvs)], bool)
        dead_fraction = 1.0 - float(nw[alive].sum()) / max(1, int(nw.sum()))
        if dead_fraction > config.max_dead_fraction:
            dropped.append((e["id"], f"{dead_fraction:.0%} dead"))
            continue
        kept.append((e, {v for v, a in zip(vids, alive) if a}))
    todo = set(live) - set().union(*(c for _, c in kept)) if kept else set(live)
    if todo and config.merge_below_windows > 0:
        small = [(e, c) for e, c in kept if e["windows"] < config.merge_below_windows]
        if small:
            for e, c in small:
                dropped.append((e["id"], f"{e['windows']} windows: merged into the increment"))
                todo |= c
            kept = [(e, c) for e, c in kept if e["windows"] >= config.merge_below_windows]
    for _, c in kept:
        covered |= c
    spaces = {e["space"] for e, _ in kept}
    new_entries = []
    if todo:
        order = _video_order(m, todo)
        for group_ids in _split_shards(m, order, config):
            shard_id = f"s-{uuid.uuid4().hex[:16]}"
            built = files.build_dir(shard_id)
            shutil.rmtree(built, ignore_errors=True)
            entry = build_shard(_store_groups(ts, version, group_ids, live, config), built, config, shard_id)
            files.publish(shard_id, built)
            new_entries.append(entry)
            spaces.add(entry["space"])
            log.info("%s: built shard %s (%d windows of %d videos) in %.1f s", ts.uri, shard_id, entry["windows"],
                     entry["videos"], entry["build_s"])
    if len(spaces) > 1:
        for e in new_entries:
            files.remove_shard(e["id"])
        raise SpaceMismatchError(f"{ts.uri} v{version} mixes embedding spaces {sorted(spaces)}: one index cannot "
                                 f"serve them (index each space in its own store)")
    shards = [e for e, _ in kept] + new_entries
    first = shards[0]
    im = {
        "format": INDEX_FORMAT,
        "store_version": version,
        "base_version": base,
        "family": files.family,
        "config": config.to_dict(),
        "space": first["space"],
        "encoder": first["encoder"],
        "dim": first["dim"],
        "shards": shards,
        "built_shards": [e["id"] for e in new_entries],
        "dropped_shards": [{"id": i, "why": why} for i, why in dropped],
        "counts": {"shards": len(shards), "windows": int(sum(e["windows"] for e in shards)),
                   "frames": int(sum(e["frames"] for e in shards)), "live_videos": len(live)},
        "created_at": time.time(),
    }
    data = json.dumps(im, sort_keys=True, separators=(",", ":")).encode()
    try:
        if files.local:
            os.makedirs(files.root, exist_ok=True)
        create_only(files.fs, files.manifest_path(version), data)
    except FileExistsError:  # another process indexed this version first: use theirs, drop ours
        for e in new_entries:
            files.remove_shard(e["id"])
        return files.read_manifest(version)
    return im


def _video_order(m: dict, todo: set[str]) -> list[str]:
    """Videos to index, in video_id order (stable across builds, so shards group the same videos)."""
    return sorted(v for v in todo if v in m["videos"])


def _split_shards(m: dict, order: list[str], config: WindowIndexConfig) -> list[list[str]]:
    """Videos per new shard: at most ~max_shard_windows windows each (estimated from frames_kept and
    duration; a single long video is never split)."""
    out: list[list[str]] = []
    cur: list[str] = []
    cur_w = 0.0
    for v in order:
        rec = m["videos"][v]
        est = min(float(rec.get("frames_kept") or 0),
                  float(rec.get("duration_s") or 0.0) / config.window_s + 1.0) if rec.get("duration_s") else \
            float(rec.get("frames_kept") or 0)
        if cur and cur_w + est > config.max_shard_windows:
            out.append(cur)
            cur, cur_w = [], 0.0
        cur.append(v)
        cur_w += est
    if cur:
        out.append(cur)
    return out


def _store_groups(ts: TokenStore, version: int, video_ids: list[str], live: Mapping[str, int],
                  config: WindowIndexConfig) -> Iterator[FrameArrays]:
    """FrameArrays of ``video_ids`` read from the store ~``read_group_frames`` frames at a time."""
    m = ts.manifest(version)
    group, n = [], 0
    for v in video_ids + [None]:
        if v is not None:
            group.append(v)
            n += int(m["videos"][v].get("frames_kept") or 0)
        if group and (v is None or n >= config.read_group_frames):
            table = ts.read_frames(version, video_ids=group, columns=list(BUILD_COLUMNS))
            if table.num_rows:
                yield frames_from_table(table, live)
            group, n = [], 0
