"""Differential Frame Pruner (VideoLLaMA3's DiffFP) at patch level, over decoded chunks.

Each sampled frame is cut into the encoder's patch grid (gh x gw). A patch is *kept* when its mean absolute
pixel difference (pixels in 0..1) to the last **kept** version of the same patch exceeds ``threshold``;
otherwise it is redundant. Comparing against the last kept patch rather than the previous frame means slow
drift accumulates until it is kept, instead of being lost one small step at a time (the paper's code compares
neighbouring frames). A frame with no kept patch is dropped; the kept frame before it extends its
``span_end_s`` over the dropped frames, so pruned time stays covered.

The reference is reset at the first frame of every chunk (that frame is kept whole): chunks are independent
so they can run as separate tasks. With 32-frame chunks this costs at most 1/32 of the patches on a fully
static camera.
"""

from __future__ import annotations

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.config import PRUNE_RESOURCES, PruneConfig


def patch_means(frames: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-patch pixel blocks as float32 vectors.

    Args:
        frames: uint8 (T, H, W, 3).
        grid: (gh, gw) patch grid; H and W are cropped to a multiple of it.

    Returns:
        float32 (T, gh, gw, ph*pw*3) in 0..1.
    """
    t, h, w, c = frames.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    if ph == 0 or pw == 0:
        raise ValueError(f"PruneFrames: frame {h}x{w} is smaller than the patch grid {gh}x{gw}")
    x = frames[:, : gh * ph, : gw * pw, :].reshape(t, gh, ph, gw, pw, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(t, gh, gw, ph * pw * c)
    return x.astype(np.float32) * (1.0 / 255.0)


def diff_keep_mask(frames: np.ndarray, grid: tuple[int, int], threshold: float) -> np.ndarray:
    """Keep mask of the pruner for one chunk.

    Args:
        frames: uint8 (T, H, W, 3).
        grid: (gh, gw).
        threshold: mean absolute difference (0..1 pixels) a patch must exceed to be kept.

    Returns:
        bool (T, gh, gw); frame 0 is kept whole.
    """
    t = frames.shape[0]
    gh, gw = grid
    mask = np.zeros((t, gh, gw), dtype=bool)
    if t == 0:
        return mask
    patches = patch_means(frames, grid)
    ref = patches[0].copy()  # (gh, gw, P): last kept version of every patch
    mask[0] = True
    for i in range(1, t):
        diff = np.abs(patches[i] - ref).mean(axis=-1)  # (gh, gw)
        keep = diff > threshold
        mask[i] = keep
        if keep.any():
            ref[keep] = patches[i][keep]
    return mask


class PruneFrames:
    """Ray Data operator: drop static patches and frames from decoded chunks.

    Reads ``frames, pts_s, frame_index, chunk_end_s``; adds ``keep_mask, span_end_s, frames_in,
    patches_total, patches_kept``; removes pruned frames from ``frames, pts_s, frame_index``.
    """

    reads = (S.FRAMES, S.PTS_S, S.FRAME_INDEX, S.CHUNK_END_S)
    adds = (S.KEEP_MASK, S.SPAN_END_S, S.FRAMES_IN, S.PATCHES_TOTAL, S.PATCHES_KEPT)
    resources = PRUNE_RESOURCES  # numpy over one chunk per call

    def __init__(self, prune: PruneConfig, patch_grid: tuple[int, int], patch_px: int = 0):
        self.prune = prune
        self.grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.patch_px = int(patch_px)  # > 0: frames of any size; each row's grid is its size in patches

    def grid_of(self, frames: np.ndarray) -> tuple[int, int]:
        """The patch grid of a chunk's frames: ``patch_grid``, or (H, W) / ``patch_px`` for any-size frames."""
        if self.patch_px and frames.ndim == 4 and frames.shape[0]:
            return int(frames.shape[1]) // self.patch_px, int(frames.shape[2]) // self.patch_px
        return self.grid

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        S.require_columns(batch, self.reads, "PruneFrames")
        n = len(batch[S.FRAMES])
        out_frames, out_pts, out_idx, out_mask, out_span = [], [], [], [], []
        frames_in = np.zeros(n, dtype=np.int64)
        p_total = np.zeros(n, dtype=np.int64)
        p_kept = np.zeros(n, dtype=np.int64)
        for r in range(n):
            frames = np.asarray(batch[S.FRAMES][r])
            pts = np.asarray(batch[S.PTS_S][r], dtype=np.float64)
            idx = np.asarray(batch[S.FRAME_INDEX][r], dtype=np.int32)
            t = len(frames)
            gh, gw = self.grid_of(frames)
            if self.prune.enabled and t:
                mask = diff_keep_mask(frames, (gh, gw), self.prune.threshold)
            else:
                mask = np.ones((t, gh, gw), dtype=bool)
            keep_frame = mask.reshape(t, gh * gw).any(axis=1)
            kept = np.flatnonzero(keep_frame)
            # Each kept frame covers up to the next kept frame (or the chunk's end).
            chunk_end = float(batch[S.CHUNK_END_S][r])
            if not np.isfinite(chunk_end) and t:
                chunk_end = float(pts[-1])
            span = np.empty(len(kept), dtype=np.float64)
            if len(kept):
                span[:-1] = pts[kept[1:]]
                span[-1] = max(chunk_end, float(pts[kept[-1]]))
            out_frames.append(frames[kept])
            out_pts.append(pts[kept])
            out_idx.append(idx[kept])
            out_mask.append(mask[kept])
            out_span.append(span)
            frames_in[r] = t
            p_total[r] = t * gh * gw
            p_kept[r] = int(mask.sum())
        out = dict(batch)
        out[S.FRAMES] = S.object_column(out_frames)
        out[S.PTS_S] = S.object_column(out_pts)
        out[S.FRAME_INDEX] = S.object_column(out_idx)
        out[S.KEEP_MASK] = S.object_column(out_mask)
        out[S.SPAN_END_S] = S.object_column(out_span)
        out[S.FRAMES_IN] = frames_in
        out[S.PATCHES_TOTAL] = p_total
        out[S.PATCHES_KEPT] = p_kept
        return out

