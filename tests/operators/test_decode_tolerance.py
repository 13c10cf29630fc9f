"""fps mode with ``sample_tolerance_frames`` (opt-in): each request takes the cheapest frame within that
many source frame periods; samples stay one per request, within tolerance, with the pixels of a full
decode at their pts; fewer frames are decoded than for the nearest frame.

Expected values come from the fixtures' timecode bars and plain PyAV loops written here.
"""

from __future__ import annotations

import av
import numpy as np
import pytest

from fixtures import videos as V
from ray_vlm.core.config import DecodeConfig
from ray_vlm.operators._sampler import SAMPLE_TOLERANCE_FRAMES, scaler_interpolation
from ray_vlm.operators.decode import sample_video

pytestmark = pytest.mark.timeout(120)

FPS = 25.0
SIZE = (90, 160)  # native: no resampling blur, timecodes read exactly


class _Tolerant(DecodeConfig):
    """The knob as a config attribute (``DecodeConfig`` does not declare it yet)."""

    sample_tolerance_frames: float = 1.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """6 s of 25 fps H.264 with 2 s GOPs and B-frames (x264 veryfast: B-pyramid), like the benchmark's."""
    return V.make_video(tmp_path_factory.mktemp("tol") / "gop2.mp4", fps=FPS, duration_s=6.0, gop_s=2.0)


def _full_decode(path) -> dict[float, np.ndarray]:
    """Every frame, plain PyAV, by time, converted like the sampler converts."""
    out = {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for f in c.decode(s):
            t = float((f.pts - s.start_time) * s.time_base)
            out[round(t, 6)] = f.reformat(SIZE[1], SIZE[0], format="rgb24",
                                          interpolation=scaler_interpolation()).to_ndarray()
    return out


def test_knob_name_matches_the_config_attribute():
    assert _Tolerant().model_dump()[SAMPLE_TOLERANCE_FRAMES] == 1.0


def test_tolerance_one_frame_decodes_less_and_stays_within_one_period(clip):
    nearest = sample_video(str(clip), DecodeConfig(target_fps=1.0, isolate=False), SIZE)
    near = list(nearest)
    tolerant = sample_video(str(clip), _Tolerant(target_fps=1.0, isolate=False), SIZE)
    got = list(tolerant)
    assert nearest.stats.planned and tolerant.stats.planned
    assert [t for t, _ in near] == pytest.approx(np.arange(6.0), abs=1e-9)  # nearest: exact here
    times = np.array([t for t, _ in got])
    assert len(times) == 6 and np.all(np.diff(times) > 0)  # one sample per request, in order
    assert np.all(np.abs(times - np.arange(6.0)) <= 1.0 / FPS + 1e-6)
    assert not np.allclose(times, np.arange(6.0))  # mid-GOP requests moved to a cheaper neighbour
    assert tolerant.stats.frames_decoded < nearest.stats.frames_decoded
    full = _full_decode(clip)
    for t, rgb in got:
        np.testing.assert_array_equal(rgb, full[round(t, 6)])  # the pixels of that very frame
        assert V.read_timecode(rgb) == round(t * FPS)


def test_requests_on_keyframes_take_the_keyframe(clip):
    got = list(sample_video(str(clip), _Tolerant(target_fps=0.5, isolate=False), SIZE))
    assert [t for t, _ in got] == pytest.approx([0.0, 2.0, 4.0], abs=1e-9)  # keyframes: nothing cheaper


def test_zero_tolerance_is_the_nearest_frame(clip):
    a = list(sample_video(str(clip), DecodeConfig(target_fps=3.0, isolate=False), SIZE))
    b = list(sample_video(str(clip), _Tolerant(target_fps=3.0, isolate=False, sample_tolerance_frames=0.0), SIZE))
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y)
