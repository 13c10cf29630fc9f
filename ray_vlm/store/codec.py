"""Vectors in the token store: fixed-width little-endian fp16, or int8 with one float32 scale per vector, held in
plain binary columns and read back with ``np.frombuffer`` over the Arrow data buffer (``column_to_matrix``), which is
far faster than a ``FixedSizeList<float16>`` column (``benchmarks/results/store.json``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ray_vlm.store.errors import StoreError

_DTYPES: dict[str, np.dtype] = {"fp16": np.dtype("<f2"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
SCALE_DTYPE = np.dtype("<f4")
_INDEX_DTYPE = np.dtype("<u2")
_FP16_MAX = 65504.0


def token_dtype(name: str) -> np.dtype:
    """Numpy dtype of a TOKEN_DTYPE name ("fp16" | "int8")."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise StoreError(f"unknown token dtype {name!r}; expected 'fp16' or 'int8'") from None


def quantize(vectors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Quantise vectors for storage.

    Args:
        vectors: float (N, D).
        dtype: "fp16" (values clipped to the fp16 range; scale 1.0) or "int8" (symmetric, per-vector
            scale = absmax / 127; an all-zero vector gets scale 1.0).

    Returns:
        (codes, scales): codes (N, D) little-endian fp16 or int8, scales float32 (N,).
    """
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"quantize: expected (N, D) vectors, got shape {v.shape}")
    dt = token_dtype(dtype)
    if dt.kind == "f":
        codes = np.clip(v, -_FP16_MAX, _FP16_MAX).astype(dt)
        return codes, np.ones(len(v), dtype=np.float32)
    absmax = np.abs(v).max(axis=1) if v.shape[1] else np.zeros(len(v), np.float32)
    scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(v / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def decode_vectors(buf: bytes | np.ndarray | memoryview, dim: int, dtype: str, scales=None) -> np.ndarray:
    """Decode a buffer of stored vectors.

    Args:
        buf: bytes (or a uint8/fp16/int8 array) holding N*dim codes of ``dtype``.
        dim: D.
        dtype: "fp16" | "int8".
        scales: float32 (N,) per-vector scales for int8 (bytes of float32 are accepted too); ignored for fp16.

    Returns:
        float32 (N, D).
    """
    dt = token_dtype(dtype)
    raw = np.frombuffer(buf if not isinstance(buf, np.ndarray) else np.ascontiguousarray(buf).view(np.uint8),
                        dtype=np.uint8)
    width = dim * dt.itemsize
    if dim <= 0 or raw.size % width:
        raise StoreError(f"decode_vectors: {raw.size} bytes is not a whole number of {dim}-dim {dtype} vectors")
    out = raw.view(dt).reshape(-1, dim).astype(np.float32)
    return _apply_scales(out, dt, scales)


def _apply_scales(out: np.ndarray, dt: np.dtype, scales) -> np.ndarray:
    if dt.kind == "f" or scales is None:
        return out
    if isinstance(scales, (bytes, bytearray, memoryview)):
        scales = np.frombuffer(scales, dtype=SCALE_DTYPE)
    elif isinstance(scales, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_binary(scales.type) or pa.types.is_large_binary(scales.type):
            scales = binary_column_values(scales, SCALE_DTYPE)
        else:
            scales = scales.to_numpy(zero_copy_only=False)
    s = np.asarray(scales, dtype=np.float32).reshape(-1)
    if len(s) != len(out):
        raise StoreError(f"decode: {len(out)} int8 vectors but {len(s)} scales")
    out *= s[:, None]
    return out


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row byte lengths int64 (N,), data uint8 (bytes,)) of one binary chunk, zero-copy on the data."""
    n = len(arr)
    if pa.types.is_fixed_size_binary(arr.type):
        width = arr.type.byte_width
        buf = arr.buffers()[1]
        data = np.frombuffer(buf, dtype=np.uint8, count=n * width, offset=arr.offset * width) if n else \
            np.zeros(0, np.uint8)
        lengths = np.full(n, width, dtype=np.int64)
        if arr.null_count:
            lengths[~np.asarray(arr.is_valid())] = 0  # nulls: their bytes are skipped below
            data = data.reshape(n, width)[lengths > 0].reshape(-1) if width else data
        return lengths, data
    off_t: type[np.integer]
    if pa.types.is_binary(arr.type) or pa.types.is_string(arr.type):
        off_t = np.int32
    elif pa.types.is_large_binary(arr.type) or pa.types.is_large_string(arr.type):
        off_t = np.int64
    else:
        raise StoreError(f"expected a binary column, got {arr.type}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_t, count=n + 1, offset=arr.offset * np.dtype(off_t).itemsize)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(bufs[2], dtype=np.uint8, count=end - start, offset=start) if end > start else \
        np.zeros(0, np.uint8)
    return np.diff(offsets).astype(np.int64), data


def _chunks(column) -> list[pa.Array]:
    if isinstance(column, pa.ChunkedArray):
        return list(column.chunks)
    if isinstance(column, pa.Array):
        return [column]
    raise StoreError(f"expected a pyarrow Array or ChunkedArray, got {type(column).__name__}")


def binary_column_values(column, dtype: np.dtype) -> np.ndarray:
    """All values of a binary column viewed as one flat array of ``dtype`` (rows concatenated).

    Null rows contribute nothing. Each row must hold a whole number of ``dtype`` items.
    """
    dtype = np.dtype(dtype)
    parts = []
    for arr in _chunks(column):
        lengths, data = _binary_parts(arr)
        if np.any(lengths % dtype.itemsize):
            raise StoreError(f"binary column rows are not whole {dtype} items")
        parts.append(data)
    data = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return data.view(dtype)


def vectors_per_row(column, dim: int, dtype: str) -> np.ndarray:
    """Number of stored vectors in each row of a token column: int64 (N,) (0 for nulls)."""
    width = dim * token_dtype(dtype).itemsize
    per_chunk = [(_binary_parts(a)[0]) for a in _chunks(column)]
    lengths = np.concatenate(per_chunk) if per_chunk else np.zeros(0, np.int64)
    if np.any(lengths % width):
        raise StoreError(f"token column rows are not whole {dim}-dim {dtype} vectors")
    return lengths // width


def column_to_matrix(column, dim: int, dtype: str, scales=None, out_dtype=np.float32) -> np.ndarray:
    """Decode a whole token column at once (no per-row Python loop).

    Uses ``np.frombuffer`` over the Arrow data buffer, honouring offsets and slices. Works for
    one-vector-per-row columns (``global_token``) and many-per-row ones (``grid_tokens``,
    ``patch_tokens``): the vectors of all rows come back concatenated in row order; use
    ``vectors_per_row`` to split them.

    Args:
        column: pa.BinaryArray / LargeBinaryArray / FixedSizeBinaryArray, or a ChunkedArray of them.
        dim: D.
        dtype: "fp16" | "int8".
        scales: for int8, float32 (N_vectors,) as ndarray, a float32 arrow column (``global_scale``) or a
            binary arrow column of float32 bytes (``grid_scales``, ``patch_scales``).
        out_dtype: np.float32 (default: decoded values, scales applied). None returns the stored codes
            themselves, (N, D) fp16 or int8, zero-copy over the Arrow buffer when the column has one
            chunk (scales are then the caller's: ANN libraries take fp16 / int8 directly). The fp16 ->
            float32 conversion is what costs here; the view is free.

    Returns:
        (N_vectors, D) float32, or the stored dtype when ``out_dtype`` is None.
    """
    dt = token_dtype(dtype)
    width = dim * dt.itemsize
    if dim <= 0:
        raise StoreError(f"column_to_matrix: dim must be positive, got {dim}")
    parts = []
    for arr in _chunks(column):
        lengths, data = _binary_parts(arr)
        if np.any(lengths % width):
            raise StoreError(f"column_to_matrix: rows are not whole {dim}-dim {dtype} vectors ({width} bytes)")
        parts.append(data.view(dt).reshape(-1, dim))
    if out_dtype is None:
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros((0, dim), dt)
    total = sum(len(p) for p in parts)
    out = np.empty((total, dim), dtype=out_dtype)
    row = 0
    for p in parts:  # one pass: convert straight into the output
        out[row:row + len(p)] = p
        row += len(p)
    return _apply_scales(out, dt, scales)
