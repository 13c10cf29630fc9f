"""Keyframes mode without deblocking (``keyframes_skip_loop_filter``, opt-in): same samples, same times,
pixels exactly those of a plain PyAV keyframe decode with ``skip_loop_filter=all``, in-process and
through the isolated decoder child.

Expected values come from plain PyAV loops written here, never from the code under test.
"""

from __future__ import annotations

import av
import numpy as np
import pytest

from ray_vlm.core import schema as S
from ray_vlm.core.config import DecodeConfig, GuardConfig
from ray_vlm.core.samples import sample_videos
from ray_vlm.operators._sampler import KEYFRAMES_SKIP_LOOP_FILTER, scaler_interpolation
from ray_vlm.operators.decode import DecodeVideos, sample_video

pytestmark = pytest.mark.timeout(120)

SIZE = (136, 320)  # (height, width): half of bikes.mp4's 272 x 640


class _NoDeblocking(DecodeConfig):
    """The knob as a config attribute (``DecodeConfig`` does not declare it yet)."""

    keyframes_skip_loop_filter: bool = True


def _bikes() -> str:
    return str(sample_videos(("bikes.mp4",))[0])


def _plain_keyframes(path: str, skip_loop_filter: bool) -> tuple[list[float], list[np.ndarray]]:
    """Every keyframe of a file, plain PyAV, converted like the sampler converts."""
    times, frames = [], []
    with av.open(path) as c:
        s = c.streams.video[0]
        cc = s.codec_context
        cc.thread_count = 1
        if skip_loop_filter:
            cc.options = {"skip_loop_filter": "all"}
        for packet in c.demux(s):
            if packet.size and not packet.is_keyframe:
                continue
            for f in cc.decode(packet if packet.size else None):  # the empty packet at the end flushes
                times.append(float((f.pts - s.start_time) * s.time_base))
                frames.append(f.reformat(SIZE[1], SIZE[0], format="rgb24",
                                         interpolation=scaler_interpolation()).to_ndarray())
    return times, frames


def test_knob_name_matches_the_config_attribute():
    assert KEYFRAMES_SKIP_LOOP_FILTER == "keyframes_skip_loop_filter"
    assert _NoDeblocking(mode="keyframes").model_dump()[KEYFRAMES_SKIP_LOOP_FILTER] is True


def test_keyframes_without_deblocking_in_process():
    path = _bikes()
    ref_t, ref_f = _plain_keyframes(path, skip_loop_filter=True)
    full_t, full_f = _plain_keyframes(path, skip_loop_filter=False)
    assert ref_t == pytest.approx([0.0, 1.2, 3.04, 5.48, 7.48, 9.68])  # bikes.mp4's keyframes
    # the fixture is one where deblocking changes pixels, so the test can tell the knob was applied
    assert any(not np.array_equal(a, b) for a, b in zip(ref_f, full_f))

    fast = list(sample_video(path, _NoDeblocking(mode="keyframes", target_fps=1.0, isolate=False), SIZE))
    assert [t for t, _ in fast] == pytest.approx(ref_t)
    for (_, got), want in zip(fast, ref_f):
        np.testing.assert_array_equal(got, want)
    # small differences only: deblocking smooths block edges
    diffs = [np.abs(got.astype(np.int16) - want.astype(np.int16)).mean() for (_, got), want in zip(fast, full_f)]
    assert 0 < max(diffs) < 3.0

    default = list(sample_video(path, DecodeConfig(mode="keyframes", target_fps=1.0, isolate=False), SIZE))
    for (_, got), want in zip(default, full_f):
        np.testing.assert_array_equal(got, want)  # off by default: the exact keyframes


def test_knob_does_not_touch_fps_mode():
    path = _bikes()
    cfg = dict(mode="fps", target_fps=2.0, isolate=False)
    a = list(sample_video(path, DecodeConfig(**cfg), SIZE))
    b = list(sample_video(path, _NoDeblocking(**cfg), SIZE))
    assert len(a) == len(b) == 20  # 10 s at 2 fps
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_knob_travels_to_the_decoder_child():
    path = _bikes()
    ref_t, ref_f = _plain_keyframes(path, skip_loop_filter=True)
    op = DecodeVideos(_NoDeblocking(mode="keyframes", target_fps=1.0, isolate=True), GuardConfig(), SIZE)
    try:
        batch = {
            S.URI: np.array([path], dtype=object), S.VIDEO_ID: np.array(["v"], dtype=object),
            S.SIZE_BYTES: np.array([0], dtype=np.int64), S.MTIME: np.array([np.nan]),
            S.STATUS: np.array([S.STATUS_OK], dtype=object), S.ERROR_TYPE: np.array([None], dtype=object),
            S.ERROR: np.array([None], dtype=object), S.CONTAINER: np.array([""], dtype=object),
            S.CODEC: np.array([""], dtype=object), S.WIDTH: np.zeros(1, dtype=np.int32),
            S.HEIGHT: np.zeros(1, dtype=np.int32), S.ROTATION_DEG: np.zeros(1, dtype=np.int16),
            S.DECLARED_DURATION_S: np.array([np.nan]),
        }
        rows = list(op(batch))
    finally:
        op.close()
    assert rows[-1][S.STATUS][0] == S.STATUS_OK
    pts = np.concatenate([r[S.PTS_S][0] for r in rows])
    frames = np.concatenate([r[S.FRAMES][0] for r in rows])
    np.testing.assert_allclose(pts, ref_t, atol=1e-9)
    np.testing.assert_array_equal(frames, np.stack(ref_f))
