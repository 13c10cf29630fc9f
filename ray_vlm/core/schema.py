"""Column names and pyarrow schemas of every stage boundary, and the store's SCHEMA_VERSION.

Data flows one way: source -> probe -> decode -> prune -> encode -> compress -> store.
Each stage reads and adds the columns listed here; nothing else names a column by string.

Batches between operators are ``dict[str, np.ndarray]`` (Ray Data's "numpy" batch format).
Between decode and compress a row is one *chunk* of one video (tens of seconds of sampled frames),
so per-chunk tensors are object columns holding one ndarray per row.

Statuses: every input ends as exactly one video row with status ``ok | partial | failed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from ray_vlm.core.errors import RayVlmError

if TYPE_CHECKING:
    import numpy as np

# Statuses and error classes live in ray_vlm.core.status (no pyarrow: the decoder child reads them too); this
# module re-exports them, so one module names every column and value.
from ray_vlm.core.status import (  # noqa: F401
    ERR_CRASHED,
    ERR_DECODE,
    ERR_EMPTY,
    ERR_ENCODE,
    ERR_INTERNAL,
    ERR_NO_FRAMES,
    ERR_NO_VIDEO_STREAM,
    ERR_NOT_FOUND,
    ERR_NOT_VIDEO,
    ERR_POLICY,
    ERR_TIMEOUT,
    ERR_TOO_LARGE,
    ERR_TOO_LONG,
    ERR_TRUNCATED,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PARTIAL,
    STATUSES,
)

# 2: the store on Lance (sources / frames / segments datasets, time-ranged commits); 1: Parquet + JSON manifests.
SCHEMA_VERSION = 2

# ---------------------------------------------------------------- source / probe columns (one row per input)
URI = "uri"  # normalised URI ("s3://bucket/key", "/abs/path.mp4", "memory://...")
VIDEO_ID = "video_id"  # content fingerprint, 16 hex chars (see ray_vlm.core.fs.fingerprint)
SIZE_BYTES = "size_bytes"
MTIME = "mtime"  # float seconds or NaN when the filesystem gives none
STATUS = "status"
ERROR_TYPE = "error_type"
ERROR = "error"
CONTAINER = "container"  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
CODEC = "codec"
WIDTH = "width"  # coded width in pixels (before rotation)
HEIGHT = "height"
ROTATION_DEG = "rotation_deg"  # display rotation, CLOCKWISE degrees (0/90/180/270), applied when decoding
DECLARED_DURATION_S = "declared_duration_s"  # what the container says, NaN if unknown
AVG_FPS = "avg_fps"  # informational only: never used for timestamps
REFUSED = "refused"  # source rows: a reason the input was refused at expansion ("" when accepted)

# ---------------------------------------------------------------- decode columns (one row per chunk)
CHUNK_INDEX = "chunk_index"  # 0.. within a video
IS_LAST = "is_last"  # the last chunk of a video carries the video's final status/metadata
FRAMES = "frames"  # object: uint8 ndarray (T, H, W, 3) RGB, already resized to the encoder's input
PTS_S = "pts_s"  # object: float64 ndarray (T,), from each frame's pts
FRAME_INDEX = "frame_index"  # object: int32 ndarray (T,), index of the sample within the video
CHUNK_END_S = "chunk_end_s"  # float: time the chunk's last frame covers up to (next sample or video end)
DURATION_S = "duration_s"  # on the last chunk: decoded coverage of the video in seconds
AUDIO = "audio"  # object: float32 ndarray (N,): 16 kHz mono audio taken with this chunk (N = 0: none)
AUDIO_SPANS = "audio_spans"  # object: float64 ndarray (k, 2): (start_s, n_samples) of each contiguous piece
AUDIO_RATE = 16_000  # samples per second of AUDIO
FRAMES_SAMPLED = "frames_sampled"  # on the last chunk: total frames sampled in the video

# ---------------------------------------------------------------- prune columns (added to the chunk)
KEEP_MASK = "keep_mask"  # object: bool ndarray (T, gh, gw); frames with nothing kept are removed
SPAN_END_S = "span_end_s"  # object: float64 ndarray (T,): each kept frame covers [pts_s, span_end_s)
FRAMES_IN = "frames_in"  # int: frames in the chunk before pruning
PATCHES_TOTAL = "patches_total"  # int: patches in the chunk before pruning
PATCHES_KEPT = "patches_kept"  # int: patches kept

# ---------------------------------------------------------------- encode columns (added; FRAMES dropped)
GLOBAL_EMB = "global_emb"  # object: float32 ndarray (T, D), L2-normalised, in the encoder's space
PATCH_EMB = "patch_emb"  # object: float32 ndarray (T, gh*gw, D), in the encoder's space
ENCODER = "encoder"  # encoder id, e.g. "bundled:effnet-lite0-minilm" or "hf:openai/clip-vit-base-patch32"
ENCODER_REVISION = "encoder_revision"  # weights hash prefix (bundled) or commit/path hash (hf)
SPACE = "space"  # embedding space id: a store is only ever queried with an encoder of the same space

# A chunk whose tokens could not be made or written (encode/compress/write) carries the reason here; it
# fails its whole video at commit (a video is never committed with a hole in it).
CHUNK_ERROR = "chunk_error"

# ---------------------------------------------------------------- write-op output (one row per chunk)
FRAMES_FILE = "frames_file"  # store-relative path of the frames file holding this chunk's rows ("" if none)
SEGMENTS_FILE = "segments_file"  # JSON list of the Lance fragments holding this chunk's segment rows ("" if none)
FRAMES_FILE_ROWS = "frames_file_rows"  # rows in that whole file
FRAMES_FILE_BYTES = "frames_file_bytes"  # bytes of that whole file

# ---------------------------------------------------------------- store: frames table (one row per kept frame)
LAYOUT = "layout"  # e.g. "global", "global+grid", "global+grid+patches"
DIM = "dim"
TOKEN_DTYPE = "token_dtype"  # "fp16" | "int8"
GLOBAL_TOKEN = "global_token"  # fixed_size_binary: D fp16 (2D bytes) or D int8 (D bytes)
GLOBAL_SCALE = "global_scale"  # float32 scale for int8 (1.0 for fp16)
GRID_SIZE = "grid_size"  # g: the content grid is g x g tokens (0 when absent)
GRID_TOKENS = "grid_tokens"  # binary: g*g*D in TOKEN_DTYPE
GRID_SCALES = "grid_scales"  # binary: g*g float32 (int8 only)
PATCH_GRID_H = "patch_grid_h"
PATCH_GRID_W = "patch_grid_w"
PATCH_INDEX = "patch_index"  # binary: uint16 flat indices (row-major in gh x gw) of kept patches
PATCH_TOKENS = "patch_tokens"  # binary: n_kept*D int8
PATCH_SCALES = "patch_scales"  # binary: n_kept float32
CONFIG_HASH = "config_hash"

# ---------------------------------------------------------------- store: videos table (one row per input)
FRAMES_KEPT = "frames_kept"
TOKENS = "tokens"  # total stored tokens for the video (global + grid + patches)
STORED_BYTES = "stored_bytes"  # bytes of token payload in the frames table
INDEXED_AT = "indexed_at"  # unix seconds
# How far a source got: its first CHUNKS_COMMITTED chunks are committed (all of them once the status is ok or
# failed; a prefix while it is partial), RESUME_S is where the next chunk starts and NEXT_FRAME_INDEX the index of
# its first sample (a rerun decodes from there).
CHUNKS_COMMITTED = "chunks_committed"
RESUME_S = "resume_s"
NEXT_FRAME_INDEX = "next_frame_index"

FRAMES_SCHEMA = pa.schema(
    [
        pa.field(VIDEO_ID, pa.string(), nullable=False),
        pa.field(FRAME_INDEX, pa.int32(), nullable=False),
        pa.field(PTS_S, pa.float64(), nullable=False),
        pa.field(SPAN_END_S, pa.float64(), nullable=False),
        pa.field(CHUNK_INDEX, pa.int32(), nullable=False),
        pa.field(ENCODER, pa.string(), nullable=False),
        pa.field(ENCODER_REVISION, pa.string(), nullable=False),
        pa.field(SPACE, pa.string(), nullable=False),
        pa.field(CONFIG_HASH, pa.string(), nullable=False),
        pa.field(LAYOUT, pa.string(), nullable=False),
        pa.field(DIM, pa.int32(), nullable=False),
        pa.field(TOKEN_DTYPE, pa.string(), nullable=False),
        # fixed-size binary whose width depends on D and dtype: kept as plain binary in the
        # schema and checked on write; np.frombuffer over the concatenated buffer reads it back.
        pa.field(GLOBAL_TOKEN, pa.binary(), nullable=False),
        pa.field(GLOBAL_SCALE, pa.float32(), nullable=False),
        pa.field(GRID_SIZE, pa.int8(), nullable=False),
        pa.field(GRID_TOKENS, pa.binary(), nullable=True),
        pa.field(GRID_SCALES, pa.binary(), nullable=True),
        pa.field(PATCH_GRID_H, pa.int16(), nullable=False),
        pa.field(PATCH_GRID_W, pa.int16(), nullable=False),
        pa.field(PATCH_INDEX, pa.binary(), nullable=True),
        pa.field(PATCH_TOKENS, pa.binary(), nullable=True),
        pa.field(PATCH_SCALES, pa.binary(), nullable=True),
    ],
    metadata={b"ray_vlm.schema_version": str(SCHEMA_VERSION).encode(), b"ray_vlm.table": b"frames"},
)

VIDEOS_SCHEMA = pa.schema(
    [
        pa.field(VIDEO_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR_TYPE, pa.string(), nullable=True),
        pa.field(ERROR, pa.string(), nullable=True),
        pa.field(SIZE_BYTES, pa.int64(), nullable=True),
        pa.field(MTIME, pa.float64(), nullable=True),
        pa.field(CONTAINER, pa.string(), nullable=True),
        pa.field(CODEC, pa.string(), nullable=True),
        pa.field(WIDTH, pa.int32(), nullable=True),
        pa.field(HEIGHT, pa.int32(), nullable=True),
        pa.field(ROTATION_DEG, pa.int16(), nullable=True),
        pa.field(DECLARED_DURATION_S, pa.float64(), nullable=True),
        pa.field(DURATION_S, pa.float64(), nullable=True),
        pa.field(FRAMES_SAMPLED, pa.int64(), nullable=True),
        pa.field(FRAMES_KEPT, pa.int64(), nullable=True),
        pa.field(PATCHES_TOTAL, pa.int64(), nullable=True),
        pa.field(PATCHES_KEPT, pa.int64(), nullable=True),
        pa.field(TOKENS, pa.int64(), nullable=True),
        pa.field(STORED_BYTES, pa.int64(), nullable=True),
        pa.field(ENCODER, pa.string(), nullable=True),
        pa.field(ENCODER_REVISION, pa.string(), nullable=True),
        pa.field(SPACE, pa.string(), nullable=True),
        pa.field(CONFIG_HASH, pa.string(), nullable=False),
        pa.field(INDEXED_AT, pa.float64(), nullable=False),
        pa.field(CHUNKS_COMMITTED, pa.int32(), nullable=True),
        pa.field(RESUME_S, pa.float64(), nullable=True),
        pa.field(NEXT_FRAME_INDEX, pa.int64(), nullable=True),
    ],
    metadata={b"ray_vlm.schema_version": str(SCHEMA_VERSION).encode(), b"ray_vlm.table": b"videos"},
)

# ---------------------------------------------------------------- store: segments (time-ranged items of a track)
# A second kind of track beside the frames: speech, on-screen text, sounds, live-stream items. One row per item:
# which source (its video_id), which track ("speech", "ocr", ...), the time range it covers, its text and/or
# embedding, a confidence, and its lineage (what made it: model id and revision, as JSON).
TRACK = "track"
START_S = "start_s"
END_S = "end_s"
TEXT = "text"
EMBEDDING = "embedding"  # float32 vector in the track's space (null when the item has only text)
CONFIDENCE = "confidence"
LINEAGE = "lineage"

SEGMENTS_SCHEMA = pa.schema(
    [
        pa.field(VIDEO_ID, pa.string(), nullable=False),
        pa.field(TRACK, pa.string(), nullable=False),
        pa.field(START_S, pa.float64(), nullable=False),
        pa.field(END_S, pa.float64(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=True),
        pa.field(EMBEDDING, pa.list_(pa.float32()), nullable=True),
        pa.field(CONFIDENCE, pa.float32(), nullable=True),
        pa.field(LINEAGE, pa.string(), nullable=True),
        pa.field(CHUNK_INDEX, pa.int32(), nullable=False),
    ],
    metadata={b"ray_vlm.schema_version": str(SCHEMA_VERSION).encode(), b"ray_vlm.table": b"segments"},
)

# Between the speech stage and the write: the segment rows a chunk adds, as the bytes of an Arrow IPC stream of
# SEGMENT_ITEMS_SCHEMA (the write adds video_id and chunk_index); b"" when none. Bytes travel through Ray Data
# unchanged, where nested Python objects would be converted.
SEGMENT_ITEMS = "segment_items"
SEGMENT_ITEM_FIELDS = (TRACK, START_S, END_S, TEXT, EMBEDDING, CONFIDENCE, LINEAGE)
SEGMENT_ITEMS_SCHEMA = pa.schema([SEGMENTS_SCHEMA.field(n) for n in SEGMENT_ITEM_FIELDS])


def segment_items_bytes(items: dict) -> bytes:
    """``{field: list}`` (SEGMENT_ITEM_FIELDS, equal lengths) as the bytes of a SEGMENT_ITEMS column; b"" when empty."""
    k = len(items[TRACK])
    if k == 0:
        return b""
    for name in SEGMENT_ITEM_FIELDS:
        if len(items[name]) != k:
            raise ValueError(f"segment items: {name} has {len(items[name])} values for {k} rows")
    emb = [None if e is None else [float(x) for x in e] for e in items[EMBEDDING]]
    arrays = [pa.array(emb if n == EMBEDDING else list(items[n]), type=SEGMENT_ITEMS_SCHEMA.field(n).type)
              for n in SEGMENT_ITEM_FIELDS]
    table = pa.Table.from_arrays(arrays, schema=SEGMENT_ITEMS_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SEGMENT_ITEMS_SCHEMA) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def segment_items_table(blob) -> pa.Table:
    """The SEGMENT_ITEMS_SCHEMA table of a SEGMENT_ITEMS value (empty for b"" / None)."""
    if blob is None or len(blob) == 0:
        return SEGMENT_ITEMS_SCHEMA.empty_table()
    table = pa.ipc.open_stream(pa.py_buffer(bytes(blob))).read_all()
    if not table.schema.equals(SEGMENT_ITEMS_SCHEMA, check_metadata=False):
        raise ValueError(f"segment items have schema {table.schema}, expected {SEGMENT_ITEMS_SCHEMA}")
    return table

# Video-level metadata columns that travel on every chunk row from probe to the store.
VIDEO_META_COLUMNS = (
    URI,
    VIDEO_ID,
    SIZE_BYTES,
    MTIME,
    STATUS,
    ERROR_TYPE,
    ERROR,
    CONTAINER,
    CODEC,
    WIDTH,
    HEIGHT,
    ROTATION_DEG,
    DECLARED_DURATION_S,
)


# ------------------------------------------------------------------------------------------ ground-batch results
# One row per (query, moment) of ``ray-vlm ground-batch`` / ``ray_vlm.pipelines.ground_batch`` (error rows have a
# null rank and the error columns set).
QUERY_ID = "query_id"  # int64: 1-based line number in QUERIES.txt, or the position in a Python list
QUERY = "query"
RANK = "rank"  # int32: 1 = best moment of this query across the library; null on error rows
START_S = "start_s"
END_S = "end_s"
SCORE = "score"  # calibrated in [0, 1]; compares across videos and queries
PEAK_S = "peak_s"
STORE_VERSION = "store_version"

ERR_BAD_QUERY = "bad_query"  # empty, oversized, control characters only
ERR_NO_MOMENTS = "no_moments"  # a valid query, but the store has no frame to ground it in

GROUND_RESULTS_SCHEMA = pa.schema([
    pa.field(QUERY_ID, pa.int64()),
    pa.field(QUERY, pa.string()),
    pa.field(RANK, pa.int32()),
    pa.field(VIDEO_ID, pa.string()),
    pa.field(URI, pa.string()),
    pa.field(START_S, pa.float64()),
    pa.field(END_S, pa.float64()),
    pa.field(SCORE, pa.float64()),
    pa.field(PEAK_S, pa.float64()),
    pa.field(STORE_VERSION, pa.int64()),
    pa.field(ERROR_TYPE, pa.string()),
    pa.field(ERROR, pa.string()),
])


def object_column(items) -> np.ndarray:
    """A column holding one object (usually an ndarray) per row; numpy never stacks or broadcasts them."""
    import numpy as np

    items = list(items)
    col = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        col[i] = x
    return col


class SchemaError(RayVlmError, ValueError):
    """A batch handed to an operator lacks columns it needs (message names the operator)."""

    code = "schema_invalid"


def require_columns(batch: dict, columns, operator: str) -> None:
    """Raise SchemaError naming ``operator`` if ``batch`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in batch]
    if missing:
        raise SchemaError(
            f"{operator}: input batch lacks column(s) {missing}; it has {sorted(batch)}"
        )
