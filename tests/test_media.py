"""ray_vlm.media.frames: frames at times (checked against a full decode), thumbnails, byte ranges, errors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from ray_vlm.core.samples import sample_videos
from ray_vlm.media import frames as media
from ray_vlm.media.frames import (
    MediaDecodeError,
    MediaNotFoundError,
    MediaPolicyError,
    MediaRangeError,
    MediaTimeError,
    media_type,
    open_range,
    read_frames_at,
    thumbnail_jpeg,
)

pytestmark = pytest.mark.timeout(180)

CLIPS = {p.name: p for p in sample_videos(("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"))}


def _full_decode(path) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Every frame of a clip by plain PyAV: (pts_s sorted, rgb per frame, frame period s)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pairs = [(float((f.pts - s.start_time) * f.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(s)]
        period = 1.0 / float(s.average_rate)
    pairs.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pairs]), [p[1] for p in pairs], period


@pytest.fixture(scope="module")
def references():
    return {name: _full_decode(path) for name, path in CLIPS.items() if name != "bigbuckbunny.mp4"}


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_frames_are_nearest_to_requested_times(name):
    path = CLIPS[name]
    times, _, period = _full_decode(path) if name != "bigbuckbunny.mp4" else (None, None, 1 / 25)
    asked = [3.3, 0.0, 1.71, 0.52, 3.31, 2.0, 0.27]  # unsorted, near-duplicates
    got = read_frames_at(str(path), asked, max_side=160)
    assert len(got) == len(asked)
    for t, (pts_s, rgb) in zip(asked, got):
        assert abs(pts_s - t) <= period + 1e-6, (t, pts_s)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert max(rgb.shape[:2]) <= 160
        if times is not None:  # it is *the* nearest frame, not merely a close one
            assert abs(pts_s - t) <= np.abs(times - t).min() + 1e-6
            assert np.isclose(times, pts_s, atol=1e-6).any()


def test_pixels_match_a_full_decode(references):
    for name, (times, frames, _) in references.items():
        asked = [0.0, 2.6, 1.2, 3.9]
        got = read_frames_at(str(CLIPS[name]), asked, max_side=10_000)  # no resize
        for pts_s, rgb in got:
            i = int(np.argmin(np.abs(times - pts_s)))
            assert rgb.shape == frames[i].shape
            assert np.array_equal(rgb, frames[i]), (name, pts_s)


def test_aspect_kept_and_never_upscaled():
    (_, big), = read_frames_at(str(CLIPS["bikes.mp4"]), [1.0], max_side=320)  # 640x272 source
    assert big.shape == (136, 320, 3)
    (_, small), = read_frames_at(str(CLIPS["carphone_pristine.mp4"]), [1.0], max_side=448)  # 176x144 source
    assert small.shape == (144, 176, 3)


def test_times_are_clamped_into_the_video(references):
    times, frames, _ = references["carphone_pristine.mp4"]
    got = read_frames_at(str(CLIPS["carphone_pristine.mp4"]), [-5.0, 1e6])
    assert got[0][0] == pytest.approx(times[0])
    assert got[1][0] == pytest.approx(times[-1])
    assert np.array_equal(got[1][1], frames[-1])


def test_empty_and_bad_times():
    assert read_frames_at(str(CLIPS["bikes.mp4"]), []) == []
    for bad in (math.nan, math.inf, "soon"):
        with pytest.raises(MediaTimeError):
            read_frames_at(str(CLIPS["bikes.mp4"]), [1.0, bad])


def test_rotation_is_applied(tmp_path):
    from fixtures.videos import make_video

    path = make_video(tmp_path / "rot90.mp4", width=160, height=96, duration_s=1.0, rotation_deg=90)
    (_, rgb), = read_frames_at(str(path), [0.5], max_side=1000)
    assert rgb.shape == (160, 96, 3)  # upright: portrait
    # the red marker of the coded top-left corner is shown at the top-right after a clockwise turn
    top_right = rgb[2:10, -10:-2].reshape(-1, 3).mean(axis=0)
    top_left = rgb[2:10, 2:10].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[1] < 60 and top_right[2] < 60
    assert not (top_left[0] > 200 and top_left[1] < 60)


def test_errors_are_typed(tmp_path):
    with pytest.raises(MediaNotFoundError):
        read_frames_at(str(tmp_path / "missing.mp4"), [0.0])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    with pytest.raises(MediaDecodeError):
        read_frames_at(str(text), [0.0])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaDecodeError):
        thumbnail_jpeg(str(empty), 0.0)
    with pytest.raises(MediaPolicyError):
        read_frames_at("concat:/etc/passwd|/etc/hosts", [0.0])
    with pytest.raises(MediaPolicyError):
        open_range("http://169.254.169.254/latest/meta-data", 0, 10)
    with pytest.raises(MediaNotFoundError):
        open_range(str(tmp_path / "missing.mp4"), 0, 10)


def test_thumbnail_is_a_jpeg_of_the_requested_width():
    from PIL import Image

    data = thumbnail_jpeg(str(CLIPS["bikes.mp4"]), 2.0, width=320)
    assert data[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (320, 136)  # 640x272 halved
    # it shows the frame at 2.0 s: close to that frame shrunk the same way (JPEG loss only)
    (_, ref), = read_frames_at(str(CLIPS["bikes.mp4"]), [2.0], max_side=320)
    diff = np.abs(np.asarray(img.convert("RGB"), dtype=np.int16) - ref.astype(np.int16)).mean()
    (_, other), = read_frames_at(str(CLIPS["bikes.mp4"]), [8.0], max_side=320)
    far = np.abs(np.asarray(img.convert("RGB"), dtype=np.int16) - other.astype(np.int16)).mean()
    assert diff < 6 < far
    small = Image.open(io.BytesIO(thumbnail_jpeg(str(CLIPS["carphone_pristine.mp4"]), 1.0, width=88)))
    assert small.size == (88, 72)
    with pytest.raises(ValueError):
        thumbnail_jpeg(str(CLIPS["bikes.mp4"]), 1.0, width=0)


def test_open_range_returns_exact_bytes(monkeypatch):
    path = CLIPS["carphone_pristine.mp4"]
    blob = path.read_bytes()
    size = len(blob)
    data, total = open_range(str(path), 0, 1)
    assert (data, total) == (blob[:2], size)
    data, total = open_range(str(path), 1000, 5999)
    assert data == blob[1000:6000] and total == size
    assert open_range(str(path), size - 10, None)[0] == blob[-10:]
    assert open_range(str(path), size - 10, size + 500)[0] == blob[-10:]  # end clamped
    assert open_range(str(path), size - 1, size - 1)[0] == blob[-1:]
    monkeypatch.setattr(media, "MAX_RANGE_BYTES", 4096)
    data, total = open_range(str(path), 100, None)
    assert data == blob[100:4196] and total == size  # a capped part; the caller reports its end
    for start, end in ((size, None), (size + 5, size + 9), (-1, 3), (50, 10)):
        with pytest.raises(MediaRangeError):
            open_range(str(path), start, end)


def test_media_type():
    assert media_type("/a/b/clip.MP4") == "video/mp4"
    assert media_type("s3://bucket/x/y.webm") == "video/webm"
    assert media_type("clip.mov") == "video/quicktime"
    assert media_type("clip.mkv") == "video/x-matroska"
    assert media_type("clip.ts") == "video/mp2t"
    assert media_type("README") == "application/octet-stream"
    assert media_type("weird.xyz") == "application/octet-stream"


@pytest.mark.s3
def test_s3_frames_thumbnail_and_range(s3_bucket):
    import boto3

    bucket, opts = s3_bucket
    path = CLIPS["carphone_pristine.mp4"]
    blob = path.read_bytes()
    endpoint = opts["client_kwargs"]["endpoint_url"]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key="v/carphone.mp4", Body=blob
    )
    uri = f"s3://{bucket}/v/carphone.mp4"
    local = read_frames_at(str(path), [0.4, 2.2])
    remote = read_frames_at(uri, [0.4, 2.2], storage_options=opts)
    for (ta, a), (tb, b) in zip(local, remote):
        assert ta == tb and np.array_equal(a, b)
    assert thumbnail_jpeg(uri, 1.0, width=64, storage_options=opts)[:3] == b"\xff\xd8\xff"
    data, total = open_range(uri, 10, 2009, storage_options=opts)
    assert data == blob[10:2010] and total == len(blob)
    with pytest.raises(MediaNotFoundError):
        read_frames_at(f"s3://{bucket}/v/missing.mp4", [0.0], storage_options=opts)
