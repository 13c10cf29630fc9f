"""Encode stage: embed each chunk's frames into global and patch tokens, and drop the pixels.

Reads (one row per chunk):  FRAMES (object: uint8 (T, H, W, 3) at the encoder's input_size; T may be 0),
                            STATUS, ERROR_TYPE, ERROR.
Adds:                       GLOBAL_EMB (object: float32 (T, D)), PATCH_EMB (object: float32 (T, gh*gw, D)),
                            ENCODER, ENCODER_REVISION, SPACE (str).
Removes:                    FRAMES (pixels are not carried past this stage).
Every other column passes through unchanged (declared as ``EncodeFrames.reads`` / ``.adds``).

Frames of all rows in a batch are run together in sub-batches of ``EncoderConfig.batch_size`` (a row
is tens of frames; the accelerator wants full batches) and split back per row. If a sub-batch
raises, each of its rows is encoded on its own so only the rows that really fail are marked
``failed`` / ``ERR_ENCODE``; their embeddings are empty (0, D) / (0, gh*gw, D). Rows already failed
upstream, and rows with no frames, get empty embeddings without touching the model.

Frames of the wrong dtype, rank or size are a wiring error (the decoder resizes to the encoder's
``input_size``; no video can cause it), so they raise ``EncoderError`` naming both sizes instead of
failing every video quietly.
"""

from __future__ import annotations

import numpy as np

from ray_vlm.core import schema
from ray_vlm.core.config import ENCODE_RESOURCES, EncoderConfig
from ray_vlm.models import Encoder, EncoderError, load_encoder
from ray_vlm.models.base import check_frames, grid_of

OPERATOR = "EncodeFrames"
_MAX_ERROR_CHARS = 2000


class EncodeFrames:
    """Ray Data operator (class form: the model loads once per worker, in ``__init__``).

    Args:
        encoder: which encoder, its batch size, device and dtype (``EncoderConfig`` or its dict form).

    Example (``ray_vlm.pipelines.stages``; on a GPU cluster give ``resources.encode.num_gpus``)::

        map_stage(ds, Stage(EncodeFrames, dict(encoder=cfg.encoder), cfg.resources.encode))
    """

    reads = (schema.FRAMES, schema.STATUS, schema.ERROR_TYPE, schema.ERROR)
    adds = (schema.GLOBAL_EMB, schema.PATCH_EMB, schema.ENCODER, schema.ENCODER_REVISION, schema.SPACE)
    resources = ENCODE_RESOURCES  # one actor holds the model; frames of a call are batched for the accelerator

    def __init__(self, encoder: EncoderConfig | dict):
        cfg = encoder if isinstance(encoder, EncoderConfig) else EncoderConfig.model_validate(encoder)
        self._setup(load_encoder(cfg.id, device=cfg.device, dtype=cfg.dtype, runtime=cfg.runtime), cfg.batch_size)

    @classmethod
    def from_encoder(cls, encoder: Encoder, batch_size: int = 32) -> EncodeFrames:
        """Wrap an already-loaded encoder (tests, or the live path sharing one model)."""
        self = cls.__new__(cls)
        self._setup(encoder, batch_size)
        return self

    def _setup(self, encoder: Encoder, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"{OPERATOR}: batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.spec = encoder.spec
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------ validation

    def _check_row(self, i: int, frames) -> int:
        """Return T for row ``i``; raise EncoderError for frames that are not (T, H, W, 3) uint8 at input_size."""
        if not isinstance(frames, np.ndarray):
            kind = type(frames).__name__
            raise EncoderError(f"{OPERATOR}: row {i}: {schema.FRAMES} holds {kind}, expected an ndarray")
        if frames.size == 0:
            return 0
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise EncoderError(
                f"{OPERATOR}: row {i}: frames must be uint8 (T, H, W, 3) RGB, got {frames.dtype} {frames.shape}"
            )
        try:
            check_frames(frames[:0], self.spec)
        except EncoderError as e:
            raise EncoderError(f"{OPERATOR}: row {i}: {e}; the decoder must deliver the encoder's frame size") from e
        return frames.shape[0]

    # ------------------------------------------------------------ encoding

    def _encode_rows(self, frames_by_row: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Encode rows' frames together in sub-batches, rows of one frame size at a time; returns {row: (global,
        patches)}. May raise."""
        by_size: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        for r, frames in frames_by_row.items():
            by_size.setdefault((int(frames.shape[1]), int(frames.shape[2])), {})[r] = frames
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for size, rows_of_size in by_size.items():
            out.update(self._encode_same_size(rows_of_size, grid_of(size, self.spec)))
        return out

    def _encode_same_size(self, frames_by_row: dict[int, np.ndarray],
                          grid: tuple[int, int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        rows = list(frames_by_row)
        npatch = grid[0] * grid[1]
        flat = [(r, t) for r in rows for t in range(len(frames_by_row[r]))]
        g_out: dict[int, list[np.ndarray]] = {r: [] for r in rows}
        p_out: dict[int, list[np.ndarray]] = {r: [] for r in rows}
        for s in range(0, len(flat), self.batch_size):
            part = flat[s : s + self.batch_size]
            # Gather this sub-batch as contiguous slices of at most a few rows.
            pieces, owners = [], []
            start = 0
            while start < len(part):
                r, t0 = part[start]
                end = start
                while end < len(part) and part[end][0] == r:
                    end += 1
                pieces.append(frames_by_row[r][t0 : t0 + (end - start)])
                owners.append((r, end - start))
                start = end
            x = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
            g, p = self.encoder.encode_frames(x)
            if g.shape != (len(x), self.spec.dim) or p.shape != (len(x), npatch, self.spec.dim):
                raise EncoderError(
                    f"encoder returned shapes {g.shape} / {p.shape} for {len(x)} frames; expected "
                    f"({len(x)}, {self.spec.dim}) / ({len(x)}, {npatch}, {self.spec.dim})"
                )
            if not (np.isfinite(g).all() and np.isfinite(p).all()):
                raise EncoderError("encoder produced non-finite embeddings")
            off = 0
            for r, n in owners:
                g_out[r].append(g[off : off + n])
                p_out[r].append(p[off : off + n])
                off += n
        return {
            r: (
                np.concatenate(g_out[r]).astype(np.float32, copy=False),
                np.concatenate(p_out[r]).astype(np.float32, copy=False),
            )
            for r in rows
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed every row's frames.

        Args:
            batch: column batch with at least ``reads``; FRAMES rows are uint8 (T, H, W, 3).

        Returns:
            The batch without FRAMES, plus ``adds``; STATUS / ERROR_TYPE / ERROR updated for
            rows whose encoding failed.
        """
        schema.require_columns(batch, self.reads, OPERATOR)
        frames_col = batch[schema.FRAMES]
        n = len(frames_col)
        status = np.array(batch[schema.STATUS], dtype=object)
        error_type = np.array(batch[schema.ERROR_TYPE], dtype=object)
        error = np.array(batch[schema.ERROR], dtype=object)
        chunk_error = (np.array(batch[schema.CHUNK_ERROR], dtype=object) if schema.CHUNK_ERROR in batch
                       else np.full(n, None, dtype=object))

        todo: dict[int, np.ndarray] = {}
        for i in range(n):
            frames = frames_col[i]
            t = self._check_row(i, frames)
            if t > 0 and status[i] != schema.STATUS_FAILED:
                todo[i] = frames

        d, npatch = self.spec.dim, self.spec.num_patches
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if todo:
            try:
                results = self._encode_rows(todo)
            except Exception:  # noqa: BLE001 - isolate the failing row(s) below
                for i, frames in todo.items():
                    try:
                        results.update(self._encode_rows({i: frames}))
                    except Exception as e:  # noqa: BLE001 - per-row failure is data
                        status[i] = schema.STATUS_FAILED
                        error_type[i] = schema.ERR_ENCODE
                        error[i] = f"{OPERATOR}: {type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
                        chunk_error[i] = error[i]  # fails the whole video even when this is not its last chunk

        out = {k: v for k, v in batch.items() if k != schema.FRAMES}
        out[schema.STATUS] = status
        out[schema.ERROR_TYPE] = error_type
        out[schema.ERROR] = error
        out[schema.CHUNK_ERROR] = chunk_error
        # Rows with no frames, failed upstream or failed here: empty (0, D) / (0, gh*gw, D), one array each.
        out[schema.GLOBAL_EMB] = schema.object_column(
            [results[i][0] if i in results else np.zeros((0, d), np.float32) for i in range(n)]
        )
        out[schema.PATCH_EMB] = schema.object_column(
            [results[i][1] if i in results else np.zeros((0, npatch, d), np.float32) for i in range(n)]
        )
        out[schema.ENCODER] = np.array([self.spec.id] * n, dtype=object)
        out[schema.ENCODER_REVISION] = np.array([self.spec.revision] * n, dtype=object)
        out[schema.SPACE] = np.array([self.spec.space] * n, dtype=object)
        return out
