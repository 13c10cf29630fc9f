"""Compress encoded chunks into stored tokens: LLaMA-VID content tokens + DiffFP-kept patch tokens.

Per kept frame:
- **global token**: the encoder's global embedding, re-normalised, in fp16 or int8 (+ float32 scale).
- **grid tokens** (``compress.grid = g > 0``): the patch-token grid (gh, gw) average-pooled to (g, g) with
  adaptive pooling bins (``floor(i*H/g) : ceil((i+1)*H/g)``, as ``torch.nn.AdaptiveAvgPool2d``), each
  pooled vector re-normalised. g*g vectors concatenated row-major; int8 adds g*g float32 scales.
- **patch tokens** (``compress.patches``): only the patches the pruner kept (``keep_mask`` True), int8 with
  a float32 scale per patch, and their flat row-major indices in the (gh, gw) grid as uint16. Query-time
  context tokens attend over them.

Everything is stored little-endian; ``ray_vlm.store.codec.decode_vectors`` / ``column_to_matrix`` read it back.
Rows with no frames (failed videos, fully pruned chunks) get empty per-frame lists.
"""

from __future__ import annotations

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.config import WRITE_RESOURCES, CompressConfig
from ray_vlm.store.codec import quantize
from ray_vlm.store.token_store import CHUNK_ERROR

_INDEX_DTYPE = np.dtype("<u2")
_SCALE_DTYPE = np.dtype("<f4")
_EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (..., D) scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, _EPS)


def adaptive_avg_pool(grid: np.ndarray, g: int) -> np.ndarray:
    """Average-pool a token grid to g x g with adaptive bins.

    Args:
        grid: float (T, gh, gw, D).
        g: output side.

    Returns:
        float32 (T, g, g, D). Bin i covers rows ``floor(i*gh/g) .. ceil((i+1)*gh/g) - 1`` (bins overlap
        when gh is not a multiple of g, and repeat rows when g > gh), the same as torch's adaptive pooling.
    """
    t, gh, gw, d = grid.shape
    x = np.asarray(grid, dtype=np.float32)
    out = np.empty((t, g, g, d), dtype=np.float32)
    for i in range(g):
        r0, r1 = (i * gh) // g, -((-(i + 1) * gh) // g)
        for j in range(g):
            c0, c1 = (j * gw) // g, -((-(j + 1) * gw) // g)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


class CompressTokens:
    """Ray Data operator: turn embeddings into stored, quantised tokens.

    Reads ``global_emb`` (object: float32 (T, D)), ``patch_emb`` (object: float32 (T, gh*gw, D); needed for
    grid or patch tokens) and ``keep_mask`` (object: bool (T, gh, gw); all patches kept if absent).
    Adds per-row object columns holding one value per frame: ``global_token`` (list of bytes),
    ``global_scale`` (float32 (T,)), ``grid_tokens``/``grid_scales``/``patch_index``/``patch_tokens``/
    ``patch_scales`` (list of bytes, or list of None when that part is not stored), and scalar columns
    ``layout, dim, token_dtype, grid_size, patch_grid_h, patch_grid_w``. Removes ``global_emb`` and
    ``patch_emb``; every other column passes through. A malformed row (shapes that disagree) gets no
    tokens and a message in ``chunk_error``, which fails its video at commit instead of the whole batch.
    """

    reads = (S.GLOBAL_EMB,)
    adds = (S.GLOBAL_TOKEN, S.GLOBAL_SCALE, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_INDEX, S.PATCH_TOKENS,
            S.PATCH_SCALES, S.LAYOUT, S.DIM, S.TOKEN_DTYPE, S.GRID_SIZE, S.PATCH_GRID_H, S.PATCH_GRID_W, CHUNK_ERROR)
    resources = WRITE_RESOURCES  # the index job runs it in the write stage's tasks, just before WriteShards

    def __init__(self, compress: CompressConfig):
        self.compress = compress

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        S.require_columns(batch, self.reads, "CompressTokens")
        n = len(batch[S.GLOBAL_EMB])
        cols: dict[str, list] = {k: [] for k in (
            S.GLOBAL_TOKEN, S.GLOBAL_SCALE, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_INDEX, S.PATCH_TOKENS,
            S.PATCH_SCALES, S.LAYOUT, S.DIM, S.TOKEN_DTYPE, S.GRID_SIZE, S.PATCH_GRID_H, S.PATCH_GRID_W)}
        patch_col = batch.get(S.PATCH_EMB)
        mask_col = batch.get(S.KEEP_MASK)
        errors = list(batch[CHUNK_ERROR]) if CHUNK_ERROR in batch else [None] * n
        for r in range(n):
            try:
                row = self._row(
                    batch[S.GLOBAL_EMB][r],
                    None if patch_col is None else patch_col[r],
                    None if mask_col is None else mask_col[r],
                )
            except (ValueError, TypeError) as e:  # a malformed chunk fails its video, not the batch
                errors[r] = errors[r] or f"CompressTokens: {e}"
                row = self._row(None, None, None)
            for k, v in row.items():
                cols[k].append(v)
        out = {k: v for k, v in batch.items() if k not in (S.GLOBAL_EMB, S.PATCH_EMB)}
        for k in (S.GLOBAL_TOKEN, S.GLOBAL_SCALE, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_INDEX, S.PATCH_TOKENS,
                  S.PATCH_SCALES):
            out[k] = S.object_column(cols[k])
        out[S.LAYOUT] = np.asarray(cols[S.LAYOUT], dtype=object)
        out[S.TOKEN_DTYPE] = np.asarray(cols[S.TOKEN_DTYPE], dtype=object)
        out[S.DIM] = np.asarray(cols[S.DIM], dtype=np.int32)
        out[S.GRID_SIZE] = np.asarray(cols[S.GRID_SIZE], dtype=np.int8)
        out[S.PATCH_GRID_H] = np.asarray(cols[S.PATCH_GRID_H], dtype=np.int16)
        out[S.PATCH_GRID_W] = np.asarray(cols[S.PATCH_GRID_W], dtype=np.int16)
        out[CHUNK_ERROR] = np.asarray(errors, dtype=object)
        return out

    def _row(self, global_emb, patch_emb, keep_mask) -> dict:
        # Long: one frame batch's tokens laid out in one pass: the checks, the global, grid and patch tokens share
        # the shapes worked out at the top.
        cfg = self.compress
        ge = None if global_emb is None else np.asarray(global_emb, dtype=np.float32)
        t = 0 if ge is None or ge.size == 0 else ge.shape[0]
        d = int(ge.shape[-1]) if ge is not None and ge.ndim == 2 else 0
        pe = None if patch_emb is None else np.asarray(patch_emb, dtype=np.float32)
        if pe is not None and pe.size == 0:
            pe = None
        km = None if keep_mask is None else np.asarray(keep_mask, dtype=bool)
        gh = gw = 0
        if km is not None and km.ndim == 3:
            gh, gw = int(km.shape[1]), int(km.shape[2])
        elif pe is not None:  # no mask: a square patch grid is the only shape we can infer
            side = int(round(np.sqrt(pe.shape[1])))
            if side * side == pe.shape[1]:
                gh = gw = side
        if t and pe is not None:
            assert ge is not None  # t > 0: there are global embeddings
            if pe.shape[0] != t or pe.shape[2] != d:
                raise ValueError(f"CompressTokens: patch_emb {pe.shape} does not match global_emb {ge.shape}")
            if gh * gw != pe.shape[1]:
                raise ValueError(
                    f"CompressTokens: patch_emb has {pe.shape[1]} patches but keep_mask is {gh}x{gw}; "
                    "pass keep_mask for non-square grids"
                )
        if km is not None and t and km.shape[0] != t:
            raise ValueError(f"CompressTokens: keep_mask has {km.shape[0]} frames, global_emb {t}")
        have_patches = pe is not None and gh > 0
        g = cfg.grid if have_patches else 0
        store_patches = cfg.patches and have_patches
        layout = CompressConfig(grid=g, patches=store_patches, dtype=cfg.dtype).layout

        row = {
            S.LAYOUT: layout, S.DIM: d, S.TOKEN_DTYPE: cfg.dtype, S.GRID_SIZE: g,
            S.PATCH_GRID_H: gh, S.PATCH_GRID_W: gw,
        }
        if t == 0:
            row.update({S.GLOBAL_TOKEN: [], S.GLOBAL_SCALE: np.zeros(0, np.float32), S.GRID_TOKENS: [],
                        S.GRID_SCALES: [], S.PATCH_INDEX: [], S.PATCH_TOKENS: [], S.PATCH_SCALES: []})
            return row

        assert ge is not None  # t > 0: there are global embeddings
        codes, scales = quantize(l2_normalize(ge), cfg.dtype)  # (T, D), (T,)
        row[S.GLOBAL_TOKEN] = [codes[i].tobytes() for i in range(t)]
        row[S.GLOBAL_SCALE] = scales.astype(np.float32)

        if g:
            assert pe is not None  # g > 0 only with patches
            pooled = l2_normalize(adaptive_avg_pool(pe.reshape(t, gh, gw, d), g)).reshape(t * g * g, d)
            gcodes, gscales = quantize(pooled, cfg.dtype)
            gcodes = gcodes.reshape(t, g * g, d)
            gscales = gscales.astype(_SCALE_DTYPE).reshape(t, g * g)
            row[S.GRID_TOKENS] = [gcodes[i].tobytes() for i in range(t)]
            row[S.GRID_SCALES] = [gscales[i].tobytes() for i in range(t)] if cfg.dtype == "int8" else [None] * t
        else:
            row[S.GRID_TOKENS] = [None] * t
            row[S.GRID_SCALES] = [None] * t

        if store_patches:
            if gh * gw > np.iinfo(np.uint16).max + 1:
                raise ValueError(f"CompressTokens: a {gh}x{gw} patch grid does not fit uint16 indices")
            flat_mask = km.reshape(t, gh * gw) if km is not None else np.ones((t, gh * gw), dtype=bool)
            counts = flat_mask.sum(axis=1)
            frame_of, patch_of = np.nonzero(flat_mask)  # row-major: frame by frame, patches ascending
            assert pe is not None  # store_patches only with patches
            pcodes, pscales = quantize(pe[frame_of, patch_of], "int8")  # (K, D) int8, (K,)
            ends = np.cumsum(counts)
            starts = ends - counts
            idx = patch_of.astype(_INDEX_DTYPE)
            pscales = pscales.astype(_SCALE_DTYPE)
            row[S.PATCH_INDEX] = [idx[a:b].tobytes() for a, b in zip(starts, ends)]
            row[S.PATCH_TOKENS] = [pcodes[a:b].tobytes() for a, b in zip(starts, ends)]
            row[S.PATCH_SCALES] = [pscales[a:b].tobytes() for a, b in zip(starts, ends)]
        else:
            row[S.PATCH_INDEX] = [None] * t
            row[S.PATCH_TOKENS] = [None] * t
            row[S.PATCH_SCALES] = [None] * t
        return row

