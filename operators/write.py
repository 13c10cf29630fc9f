"""Write compressed chunks into the token store as new Lance fragments (the driver commits them later).

``WriteShards`` turns a batch of compressed chunk rows into ``FRAMES_SCHEMA`` rows (one per kept frame) and writes
them as new fragments of the store's ``frames`` dataset, tagged with the job's generation and a write id unique
to this call: a retried task writes new fragments and never touches committed ones. Nothing is visible to readers
until the driver commits.

It returns one small row per input chunk: the fragments it landed in (their metadata as JSON), the write id,
that chunk's counts (frames in / kept, patches total / kept, tokens, payload bytes), where it ends, and the video
columns it carried. The driver feeds these rows to ``ray_vlm.store.token_store.ChunkLedger``, which commits each
source's chunks as a gap-free prefix grows (``partial``) and its final row once the ``is_last`` chunk has arrived.
Per-chunk failures are data: a chunk that cannot be written carries ``chunk_error`` and fails its video at commit;
the batch goes on.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa

from ray_vlm.core import schema as S
from ray_vlm.core.config import WRITE_RESOURCES
from ray_vlm.operators._values import plain_scalar as _scalar
from ray_vlm.store.codec import token_dtype
from ray_vlm.store.token_store import (
    CHUNK_ERROR,
    FRAMES_FILE,
    FRAMES_FILE_BYTES,
    FRAMES_FILE_ROWS,
    GENERATION,
    SEGMENTS_FILE,
    WRITE_ID,
    TokenStore,
    new_generation,
)

# Video columns copied from each chunk into the output rows (the ledger keeps the last chunk's).
_VIDEO_COLS = (S.URI, S.STATUS, S.ERROR_TYPE, S.ERROR, S.SIZE_BYTES, S.MTIME, S.CONTAINER, S.CODEC, S.WIDTH,
               S.HEIGHT, S.ROTATION_DEG, S.DECLARED_DURATION_S, S.DURATION_S, S.FRAMES_SAMPLED, S.ENCODER,
               S.ENCODER_REVISION, S.SPACE)


class WriteShards:
    """Ray Data operator: write a batch's frames as new Lance fragments of the store; return per-chunk rows.

    Args:
        store_uri: token store root (local directory or ``s3://bucket/prefix``).
        config_hash: ``IndexConfig.output_hash(...)``, stored on every frame row.
        storage_options: for the store's filesystem.
        generation: the job attempt writing (one per ``index_archive`` run); a new one by default.

    Returns only the columns it adds: one small row per input chunk.
    """

    reads = (S.VIDEO_ID, S.URI, S.CHUNK_INDEX, S.IS_LAST, S.STATUS, S.FRAME_INDEX, S.PTS_S, S.GLOBAL_TOKEN,
             S.GLOBAL_SCALE, S.LAYOUT, S.DIM, S.TOKEN_DTYPE)
    adds = (S.VIDEO_ID, S.CHUNK_INDEX, S.IS_LAST, S.FRAMES_IN, S.FRAMES_KEPT, S.PATCHES_TOTAL, S.PATCHES_KEPT,
            S.TOKENS, S.STORED_BYTES, FRAMES_FILE, FRAMES_FILE_ROWS, FRAMES_FILE_BYTES, CHUNK_ERROR,
            S.CONFIG_HASH, S.CHUNK_END_S, GENERATION, WRITE_ID, SEGMENTS_FILE) + _VIDEO_COLS
    resources = WRITE_RESOURCES  # one fragment write per call: I/O bound, little CPU

    def __init__(self, store_uri: str, config_hash: str, storage_options: dict | None = None,
                 generation: str | None = None):
        self.store_uri = store_uri
        self.config_hash = str(config_hash)
        self.generation = generation or new_generation()
        self.store = TokenStore(store_uri, storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        S.require_columns(batch, self.reads, "WriteShards")
        n = len(batch[S.VIDEO_ID])
        errors = [_str_or_none(x) for x in batch[CHUNK_ERROR]] if CHUNK_ERROR in batch else [None] * n
        frames: list[dict | None] = []  # per chunk: validated per-frame columns (None: the chunk failed)
        stats = []
        for r in range(n):
            part, stat = None, _empty_stat()
            if not errors[r]:
                try:
                    part, stat = self._chunk(batch, r)
                except (ValueError, TypeError, KeyError) as e:
                    errors[r] = f"WriteShards: {e}"
            frames.append(part)
            stats.append(stat)

        frags, file_rows, file_bytes = "", 0, 0
        write_id = uuid.uuid4().hex
        with_frames = {r: f for r, f in enumerate(frames) if f is not None and f["n"]}
        rows_with_frames = list(with_frames)
        if rows_with_frames:
            table = _frames_table(list(with_frames.values()))
            try:
                written = self.store.write_frames(table, self.generation, write_id)
                frags = json.dumps(written)
                file_rows, file_bytes = len(table), int(table.nbytes)
            except Exception as e:  # noqa: BLE001 - storage failure: these chunks fail their videos, the job goes on
                msg = f"WriteShards: writing {len(table)} frames failed: {type(e).__name__}: {e}"
                for r in rows_with_frames:
                    errors[r] = errors[r] or msg
                frags = ""

        seg_frags, rows_with_segments = self._write_segments(batch, errors, write_id)
        out = self._output(batch, stats, errors, frags or seg_frags, file_rows, file_bytes, set(rows_with_frames),
                           write_id)
        out[FRAMES_FILE] = np.asarray([f if frags else "" for f in out[FRAMES_FILE]], dtype=object)
        out[SEGMENTS_FILE] = np.asarray([seg_frags if seg_frags and r in rows_with_segments and not errors[r] else ""
                                         for r in range(n)], dtype=object)
        return out

    def _write_segments(self, batch: dict, errors: list, write_id: str) -> tuple[str, set[int]]:
        """Write the chunks' segment rows (``segment_items``) as one new fragment; its JSON and the rows in it."""
        if S.SEGMENT_ITEMS not in batch:
            return "", set()
        parts = {}
        try:
            for r, blob in enumerate(batch[S.SEGMENT_ITEMS]):
                if errors[r] or blob is None or len(blob) == 0:
                    continue
                parts[r] = S.segment_items_table(blob)
            if not parts:
                return "", set()
            table = _segments_table(batch, parts)
            return json.dumps(self.store.write_segments(table, self.generation, write_id)), set(parts)
        except Exception as e:  # noqa: BLE001 - storage failure: these chunks fail their videos, the job goes on
            msg = f"WriteShards: writing segments failed: {type(e).__name__}: {e}"
            for r in parts:
                errors[r] = errors[r] or msg
            return "", set()

    # ---------------------------------------------------------------- one chunk
    def _chunk(self, batch: dict, r: int) -> tuple[dict, dict]:
        # Long: the per-frame columns of one chunk are validated together: each check uses the sizes the previous
        # ones established.
        gtok = list(batch[S.GLOBAL_TOKEN][r] if batch[S.GLOBAL_TOKEN][r] is not None else [])
        t = len(gtok)
        stat = _empty_stat()
        stat[S.FRAMES_IN] = _opt_int(batch, S.FRAMES_IN, r)
        stat[S.PATCHES_TOTAL] = _opt_int(batch, S.PATCHES_TOTAL, r)
        stat[S.PATCHES_KEPT] = _opt_int(batch, S.PATCHES_KEPT, r)
        if t == 0:
            for k in (S.FRAMES_IN, S.PATCHES_TOTAL, S.PATCHES_KEPT):
                stat[k] = stat[k] or 0
            return {"n": 0}, stat

        dim = int(batch[S.DIM][r])
        dtype = str(batch[S.TOKEN_DTYPE][r])
        item = token_dtype(dtype).itemsize
        g = int(batch[S.GRID_SIZE][r]) if S.GRID_SIZE in batch else 0
        gh = int(batch[S.PATCH_GRID_H][r]) if S.PATCH_GRID_H in batch else 0
        gw = int(batch[S.PATCH_GRID_W][r]) if S.PATCH_GRID_W in batch else 0
        fidx = np.asarray(batch[S.FRAME_INDEX][r], dtype=np.int32).reshape(-1)
        pts = np.asarray(batch[S.PTS_S][r], dtype=np.float64).reshape(-1)
        if S.SPAN_END_S in batch and batch[S.SPAN_END_S][r] is not None:
            span = np.asarray(batch[S.SPAN_END_S][r], dtype=np.float64).reshape(-1)
        else:  # unpruned chunk: each frame covers up to the next one, the last up to the chunk's end
            end = float(batch[S.CHUNK_END_S][r]) if S.CHUNK_END_S in batch else float("nan")
            span = np.append(pts[1:], end if np.isfinite(end) else pts[-1])
        gscale = np.asarray(batch[S.GLOBAL_SCALE][r], dtype=np.float32).reshape(-1)
        for name, arr in ((S.FRAME_INDEX, fidx), (S.PTS_S, pts), (S.SPAN_END_S, span), (S.GLOBAL_SCALE, gscale)):
            if len(arr) != t:
                raise ValueError(f"{name} has {len(arr)} values for {t} frames")
        if any(len(b) != dim * item for b in gtok):
            raise ValueError(f"global tokens are not {dim} x {dtype} ({dim * item} bytes)")

        def per_frame(col):
            if col not in batch or batch[col][r] is None:
                return [None] * t
            vals = list(batch[col][r])
            if len(vals) != t:
                raise ValueError(f"{col} has {len(vals)} values for {t} frames")
            return [None if v is None else bytes(v) for v in vals]

        grid_tok, grid_sc = per_frame(S.GRID_TOKENS), per_frame(S.GRID_SCALES)
        p_idx, p_tok, p_sc = per_frame(S.PATCH_INDEX), per_frame(S.PATCH_TOKENS), per_frame(S.PATCH_SCALES)
        if g and any(b is None or len(b) != g * g * dim * item for b in grid_tok):
            raise ValueError(f"grid tokens are not {g}x{g} x {dim} x {dtype}")
        n_patches = np.zeros(t, dtype=np.int64)
        for i in range(t):
            if p_tok[i] is None:
                continue
            kept = len(p_tok[i]) // dim
            if len(p_tok[i]) != kept * dim or len(p_idx[i] or b"") != 2 * kept or len(p_sc[i] or b"") != 4 * kept:
                raise ValueError(f"frame {i}: patch index / tokens / scales lengths disagree")
            n_patches[i] = kept

        payload = sum(len(b) for b in gtok) + 4 * t
        for col in (grid_tok, grid_sc, p_idx, p_tok, p_sc):
            payload += sum(len(b) for b in col if b is not None)
        stat[S.FRAMES_KEPT] = t
        stat[S.TOKENS] = int(t * (1 + g * g) + n_patches.sum())
        stat[S.STORED_BYTES] = int(payload)
        if stat[S.FRAMES_IN] is None:
            stat[S.FRAMES_IN] = t
        if stat[S.PATCHES_TOTAL] is None:
            stat[S.PATCHES_TOTAL] = t * gh * gw
        if stat[S.PATCHES_KEPT] is None:
            stat[S.PATCHES_KEPT] = int(n_patches.sum()) if any(b is not None for b in p_tok) else t * gh * gw

        encoder = {k: _str_or_none(batch[k][r]) if k in batch else None
                   for k in (S.ENCODER, S.ENCODER_REVISION, S.SPACE)}
        missing = [k for k, v in encoder.items() if not v]
        if missing:
            raise ValueError(f"frames without {missing}")
        part = {
            "n": t,
            S.VIDEO_ID: str(batch[S.VIDEO_ID][r]),
            S.FRAME_INDEX: fidx,
            S.PTS_S: pts,
            S.SPAN_END_S: span,
            S.CHUNK_INDEX: int(batch[S.CHUNK_INDEX][r]),
            **encoder,
            S.CONFIG_HASH: self.config_hash,
            S.LAYOUT: str(batch[S.LAYOUT][r]),
            S.DIM: dim,
            S.TOKEN_DTYPE: dtype,
            S.GLOBAL_TOKEN: [bytes(b) for b in gtok],
            S.GLOBAL_SCALE: gscale,
            S.GRID_SIZE: g,
            S.GRID_TOKENS: grid_tok,
            S.GRID_SCALES: grid_sc,
            S.PATCH_GRID_H: gh,
            S.PATCH_GRID_W: gw,
            S.PATCH_INDEX: p_idx,
            S.PATCH_TOKENS: p_tok,
            S.PATCH_SCALES: p_sc,
        }
        return part, stat

    # ---------------------------------------------------------------- output rows
    def _output(self, batch, stats, errors, frags, file_rows, file_bytes, in_file, write_id) -> dict[str, np.ndarray]:
        n = len(stats)
        out: dict[str, np.ndarray] = {
            S.VIDEO_ID: np.asarray([str(v) for v in batch[S.VIDEO_ID]], dtype=object),
            S.CHUNK_INDEX: np.asarray([int(v) for v in batch[S.CHUNK_INDEX]], dtype=np.int64),
            S.IS_LAST: np.asarray([bool(v) for v in batch[S.IS_LAST]], dtype=bool),
        }
        for k in (S.FRAMES_IN, S.FRAMES_KEPT, S.PATCHES_TOTAL, S.PATCHES_KEPT, S.TOKENS, S.STORED_BYTES):
            out[k] = np.asarray([int(s[k] or 0) for s in stats], dtype=np.int64)
        ok_file = [bool(frags) and r in in_file and not errors[r] for r in range(n)]
        out[FRAMES_FILE] = np.asarray([frags if ok else "" for ok in ok_file], dtype=object)
        out[FRAMES_FILE_ROWS] = np.asarray([file_rows if ok else 0 for ok in ok_file], dtype=np.int64)
        out[FRAMES_FILE_BYTES] = np.asarray([file_bytes if ok else 0 for ok in ok_file], dtype=np.int64)
        out[CHUNK_ERROR] = np.asarray(errors, dtype=object)
        out[S.CONFIG_HASH] = np.asarray([self.config_hash] * n, dtype=object)
        out[GENERATION] = np.asarray([self.generation] * n, dtype=object)
        out[WRITE_ID] = np.asarray([write_id if frags else ""] * n, dtype=object)
        ends = batch.get(S.CHUNK_END_S)
        out[S.CHUNK_END_S] = np.asarray([np.nan if ends is None or _scalar(ends[r]) is None else float(_scalar(ends[r]))
                                        for r in range(n)], dtype=np.float64)
        for k in _VIDEO_COLS:
            col = batch.get(k)
            out[k] = np.asarray([None if col is None else _scalar(col[r]) for r in range(n)], dtype=object)
        return out


def _frames_table(parts: list[dict]) -> pa.Table:
    """FRAMES_SCHEMA table from validated chunk parts, sorted by (video_id, frame_index)."""
    reps = [p["n"] for p in parts]

    def repeat(key):
        return [p[key] for p, k in zip(parts, reps) for _ in range(k)]

    def concat(key, dtype):
        return np.concatenate([np.asarray(p[key], dtype=dtype) for p in parts])

    def flat(key):
        return [b for p in parts for b in p[key]]

    cols = {
        S.VIDEO_ID: repeat(S.VIDEO_ID),
        S.FRAME_INDEX: concat(S.FRAME_INDEX, np.int32),
        S.PTS_S: concat(S.PTS_S, np.float64),
        S.SPAN_END_S: concat(S.SPAN_END_S, np.float64),
        S.CHUNK_INDEX: repeat(S.CHUNK_INDEX),
        S.ENCODER: repeat(S.ENCODER),
        S.ENCODER_REVISION: repeat(S.ENCODER_REVISION),
        S.SPACE: repeat(S.SPACE),
        S.CONFIG_HASH: repeat(S.CONFIG_HASH),
        S.LAYOUT: repeat(S.LAYOUT),
        S.DIM: repeat(S.DIM),
        S.TOKEN_DTYPE: repeat(S.TOKEN_DTYPE),
        S.GLOBAL_TOKEN: flat(S.GLOBAL_TOKEN),
        S.GLOBAL_SCALE: concat(S.GLOBAL_SCALE, np.float32),
        S.GRID_SIZE: repeat(S.GRID_SIZE),
        S.GRID_TOKENS: flat(S.GRID_TOKENS),
        S.GRID_SCALES: flat(S.GRID_SCALES),
        S.PATCH_GRID_H: repeat(S.PATCH_GRID_H),
        S.PATCH_GRID_W: repeat(S.PATCH_GRID_W),
        S.PATCH_INDEX: flat(S.PATCH_INDEX),
        S.PATCH_TOKENS: flat(S.PATCH_TOKENS),
        S.PATCH_SCALES: flat(S.PATCH_SCALES),
    }
    arrays = [pa.array(cols[f.name], type=f.type) for f in S.FRAMES_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=S.FRAMES_SCHEMA)
    return table.sort_by([(S.VIDEO_ID, "ascending"), (S.FRAME_INDEX, "ascending")])


def _segments_table(batch: dict, parts: dict[int, pa.Table]) -> pa.Table:
    """SEGMENTS_SCHEMA rows of the chunks in ``parts`` (row -> its segment items), sorted by (video_id, start_s)."""
    tables = []
    for r, items in parts.items():
        k = items.num_rows
        cols = {S.VIDEO_ID: pa.array([str(batch[S.VIDEO_ID][r])] * k, pa.string()),
                S.CHUNK_INDEX: pa.array([int(batch[S.CHUNK_INDEX][r])] * k, pa.int32())}
        arrays = [cols[f.name] if f.name in cols else items.column(f.name) for f in S.SEGMENTS_SCHEMA]
        tables.append(pa.Table.from_arrays(arrays, schema=S.SEGMENTS_SCHEMA))
    return pa.concat_tables(tables).sort_by([(S.VIDEO_ID, "ascending"), (S.START_S, "ascending")])


def _empty_stat() -> dict:
    return {S.FRAMES_IN: None, S.FRAMES_KEPT: 0, S.PATCHES_TOTAL: None, S.PATCHES_KEPT: None, S.TOKENS: 0,
            S.STORED_BYTES: 0}


def _opt_int(batch, key, r):
    if key not in batch:
        return None
    v = _scalar(batch[key][r])
    return None if v is None else int(v)


def _str_or_none(v):
    v = _scalar(v)
    return None if v is None or v == "" else str(v)
