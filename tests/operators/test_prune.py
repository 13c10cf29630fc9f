"""DiffFP pruner: static patches go, changes stay, slow drift is not lost, pruned time stays covered."""

import numpy as np
import pytest

from ray_vlm.core import schema as S
from ray_vlm.core.config import PruneConfig
from ray_vlm.operators.prune import PruneFrames, diff_keep_mask


def _chunk(frames, fps=1.0, end=None):
    t = len(frames)
    pts = np.arange(t, dtype=np.float64) / fps
    col = lambda x: np.array([x, None], dtype=object)[:1]  # noqa: E731  one-row object column
    return {
        S.VIDEO_ID: np.array(["v"]),
        S.FRAMES: col(frames),
        S.PTS_S: col(pts),
        S.FRAME_INDEX: col(np.arange(t, dtype=np.int32)),
        S.CHUNK_END_S: np.array([t / fps if end is None else end]),
    }


def test_static_camera_prunes_noise_but_keeps_a_moving_object():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(1, 56, 56, 3)).astype(np.int16)
    noise = rng.normal(0, 3, size=(20, 56, 56, 3))  # ~1 % sensor noise
    frames = np.clip(base + noise, 0, 255).astype(np.uint8)
    # A bright square crosses the top-left patch (8x8 px patches on a 7x7 grid) in frames 10..12.
    frames[10:13, 0:8, 0:8] = 255
    out = PruneFrames(PruneConfig(threshold=0.04), (7, 7))(_chunk(frames))
    mask = out[S.KEEP_MASK][0]
    idx = out[S.FRAME_INDEX][0]
    assert int(out[S.FRAMES_IN][0]) == 20
    assert int(out[S.PATCHES_TOTAL][0]) == 20 * 49
    # frame 0 whole, the square appearing (10) and leaving (13): only the corner patch each time
    assert list(idx) == [0, 10, 13]
    assert mask[0].all()
    assert mask[1].sum() == 1 and mask[1][0, 0]
    assert mask[2].sum() == 1 and mask[2][0, 0]
    kept = int(out[S.PATCHES_KEPT][0])
    assert kept == 49 + 2
    assert 1 - kept / (20 * 49) >= 0.5
    assert out[S.FRAMES][0].shape == (3, 56, 56, 3)


def test_slow_drift_is_kept_against_last_kept_patch():
    # Brightness rises 0.01 per frame: each neighbour differs by less than the threshold, but drift adds up.
    frames = np.stack([np.full((14, 14, 3), 100 + int(2.55 * i), dtype=np.uint8) for i in range(20)])
    mask = diff_keep_mask(frames, (2, 2), threshold=0.04)
    kept = np.flatnonzero(mask.reshape(20, -1).any(1))
    assert kept[0] == 0
    assert 3 <= len(kept) <= 6, kept  # every ~5th frame, never just the first one
    steps = np.diff(kept)
    assert (steps >= 4).all() and (steps <= 6).all()


def test_pruned_time_stays_covered():
    frames = np.zeros((6, 14, 14, 3), dtype=np.uint8)
    frames[3:] = 200  # a cut at frame 3
    out = PruneFrames(PruneConfig(threshold=0.04), (2, 2))(_chunk(frames, fps=2.0, end=3.0))
    pts = out[S.PTS_S][0]
    span = out[S.SPAN_END_S][0]
    assert list(pts) == [0.0, 1.5]
    assert list(span) == [1.5, 3.0]  # [0, 1.5) covers frames 0-2, [1.5, 3.0) the rest up to the chunk end


def test_disabled_keeps_everything_and_empty_chunk_passes():
    frames = np.zeros((4, 14, 14, 3), dtype=np.uint8)
    out = PruneFrames(PruneConfig(enabled=False), (2, 2))(_chunk(frames))
    assert out[S.KEEP_MASK][0].all() and len(out[S.PTS_S][0]) == 4
    empty = PruneFrames(PruneConfig(), (2, 2))(_chunk(np.zeros((0, 14, 14, 3), dtype=np.uint8), end=float("nan")))
    assert len(empty[S.PTS_S][0]) == 0 and int(empty[S.PATCHES_TOTAL][0]) == 0


def test_missing_column_names_the_operator():
    with pytest.raises(S.SchemaError, match="PruneFrames"):
        PruneFrames(PruneConfig(), (2, 2))({S.FRAMES: np.array([])})


def test_any_size_frames_are_cut_into_their_own_grid():
    op = PruneFrames(PruneConfig(), (7, 7), patch_px=32)
    frames = np.zeros((3, 128, 320, 3), np.uint8)
    frames[2, :32, :32] = 255  # one patch changes in the last frame
    out = op(_chunk(frames))
    mask = out[S.KEEP_MASK][0]
    assert mask.shape == (2, 4, 10)  # frames 0 (whole) and 2 (one patch); frame 1 pruned
    assert mask[0].all() and mask[1].sum() == 1 and mask[1][0, 0]
