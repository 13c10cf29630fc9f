"""Media access for the online side: frames at given times, thumbnails, byte ranges of the video file.

Serve (thumbnails, the QA adapter's evidence frames, the ``<video>`` element's HTTP range requests) reads
videos through here, never through the indexing operators. Every URI goes through :mod:`ray_vlm.core.fs`
(URL policy, ``s3://`` and other fsspec filesystems), and containers are opened with the indexer's
hardened options (:func:`ray_vlm.media.container.open_container`: demuxer allow-list, no nested opens,
decoder pixel bound).

Times are stream times as the store records them: ``(pts - stream.start_time) * time_base`` seconds.
:func:`read_frames_at` seeks to the keyframe before each requested time and decodes forward only as far
as the nearest frame (consecutive requests less than :data:`CONTINUE_WITHIN_S` apart share one decode
run), so a handful of frames from an hour-long video costs a handful of GOPs, not the whole file.
Display rotation is applied (frames are upright).

Errors are typed (:class:`MediaError` and subclasses), each with its stable code; the HTTP status of each
code is in :data:`ray_vlm.core.errors.HTTP_STATUS` (the service answers every media error 404: the store names
a file it cannot read).
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Sequence

import numpy as np

from ray_vlm.core.errors import RayVlmError

# Requests this close after the previous frame decoded continue decoding instead of seeking
# (one GOP of typical footage; a seek costs a keyframe decode anyway).
CONTINUE_WITHIN_S = 2.0
# Largest byte range one open_range call returns (a browser asks again for the rest; the
# Content-Range header built from the returned length tells it where this part ended).
MAX_RANGE_BYTES = 8 * 1024 * 1024
# Seeks that land after the requested time (B-frame reordering, sparse indexes) retry this much earlier.
_SEEK_BACKOFF_S = (0.0, 1.0, 4.0, 16.0)
JPEG_QUALITY = 85

_MEDIA_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".qt": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".ts": "video/mp2t",
    ".m2ts": "video/mp2t",
    ".mts": "video/mp2t",
    ".avi": "video/x-msvideo",
    ".3gp": "video/3gpp",
    ".3g2": "video/3gpp2",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".ogv": "video/ogg",
    ".flv": "video/x-flv",
    ".wmv": "video/x-ms-wmv",
}


class MediaError(RayVlmError):
    """A video could not be read as asked (base class; the message says why)."""

    code = "media_unavailable"


class MediaNotFoundError(MediaError, FileNotFoundError):
    """The file does not exist."""

    code = "media_not_found"


class MediaPolicyError(MediaError, PermissionError):
    """The URI was refused by the URL policy before any I/O."""

    code = "media_refused"


class MediaDecodeError(MediaError):
    """The file is not a decodable video, or its container is not on the allow-list."""

    code = "media_undecodable"


class MediaRangeError(MediaError):
    """A byte range lies outside the file."""

    code = "media_range_invalid"


class MediaTimeError(MediaError, ValueError):
    """A requested time is not a finite number of seconds."""

    code = "media_time_invalid"


# ------------------------------------------------------------------------------------------ helpers
def media_type(uri: str) -> str:
    """MIME type of a video from its file name suffix ("video/mp4", ...); "application/octet-stream" if unknown."""
    name = posixpath.basename(str(uri).split("?", 1)[0]).lower()
    dot = name.rfind(".")
    return _MEDIA_TYPES.get(name[dot:], "application/octet-stream") if dot >= 0 else "application/octet-stream"


def _open(uri: str, storage_options: dict | None):
    """Open ``uri`` through the one resolver, mapping its errors onto MediaError subclasses."""
    from ray_vlm.core.fs import PolicyError, open_input

    try:
        return open_input(uri, storage_options)
    except PolicyError as e:
        raise MediaPolicyError(str(e)) from e
    except FileNotFoundError as e:
        raise MediaNotFoundError(f"video not found: {uri}") from e
    except IsADirectoryError as e:
        raise MediaNotFoundError(f"not a file: {uri}") from e
    except OSError as e:
        raise MediaError(f"cannot open {uri}: {type(e).__name__}: {e}") from e


def _check_times(times_s: Sequence[float]) -> list[float]:
    out = []
    for t in times_s:
        try:
            value = float(t)
        except (TypeError, ValueError) as e:
            raise MediaTimeError(f"time {t!r} is not a number of seconds") from e
        if not math.isfinite(value):
            raise MediaTimeError(f"time {t!r} is not finite")
        out.append(value)
    return out


def _rotation_cw(frame) -> int:
    """Clockwise display rotation (0/90/180/270) of a decoded frame (its display matrix is counter-clockwise)."""
    try:
        ccw = frame.rotation
    except Exception:  # noqa: BLE001 - no display matrix
        return 0
    return int(round(-float(ccw or 0) / 90.0)) % 4 * 90


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longest side is at most ``max_side`` (never upscaled), each at least 1 pixel."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def _to_rgb(frame, size_fn) -> np.ndarray:
    """Decoded frame -> upright uint8 (H, W, 3) RGB at the size ``size_fn(upright_w, upright_h)`` gives."""
    rotation = _rotation_cw(frame)
    upright_w, upright_h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
    out_w, out_h = size_fn(upright_w, upright_h)
    coded_w, coded_h = (out_h, out_w) if rotation in (90, 270) else (out_w, out_h)
    rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24").to_ndarray()
    if rotation:
        rgb = np.rot90(rgb, k=-(rotation // 90))  # k > 0 turns counter-clockwise
    return np.ascontiguousarray(rgb)


class _Reader:
    """Frames nearest to sorted times from one open container, seeking only when it pays."""

    def __init__(self, container, stream):
        self.container = container
        self.stream = stream
        self.tb = float(stream.time_base)
        self.origin = int(stream.start_time) if stream.start_time is not None else None
        self.duration_s = self._duration_s()
        self._it = None  # the current decode run
        self._prev = None  # (t, frame): last frame decoded before the current one
        self._cur = None  # (t, frame): the frame the run stands on
        self._exhausted = False

    def _duration_s(self) -> float:
        s = self.stream
        if s.duration is not None and s.duration > 0:
            return float(s.duration) * self.tb
        if self.container.duration is not None and self.container.duration > 0:
            return float(self.container.duration) / 1_000_000
        return math.inf  # unknown: clamp at 0 only; the last decoded frame answers late times

    def _time(self, frame) -> float:
        if frame.pts is None:
            raise MediaDecodeError("frames without timestamps (raw elementary stream) cannot be addressed by time")
        if self.origin is None:
            self.origin = int(frame.pts)
        return float((frame.pts - self.origin) * frame.time_base)

    def _next(self):
        try:
            frame = next(self._it)
        except StopIteration:
            self._exhausted = True
            return None
        t = self._time(frame)
        self._prev, self._cur = self._cur, (t, frame)
        return self._cur

    def _start(self, target_s: float) -> None:
        """Seek so that the run starts at a frame at or before ``target_s`` (or at the first frame)."""
        import av

        for back_s in _SEEK_BACKOFF_S:
            seek_s = max(0.0, target_s - back_s)
            ts: int | None = int(math.floor(seek_s / self.tb)) + (self.origin or 0)
            try:
                self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
            except av.FFmpegError:
                ts = None
            if ts is None:  # unseekable input: decode from the start
                self._restart_from_zero()
                return
            self._it = self.container.decode(self.stream)
            self._prev = self._cur = None
            self._exhausted = False
            first = self._next()
            if first is None or first[0] <= target_s + 1e-6 or seek_s == 0.0:
                return
        self._restart_from_zero()

    def _restart_from_zero(self) -> None:
        import av

        try:
            self.container.seek(self.origin or 0, stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError:
            pass
        self._it = self.container.decode(self.stream)
        self._prev = self._cur = None
        self._exhausted = False
        self._next()

    def nearest(self, target_s: float):
        """(t, frame) of the frame whose time is nearest ``target_s``."""
        cur_t = self._cur[0] if self._cur is not None else None
        resume = (
            self._it is not None
            and cur_t is not None
            and (self._prev is None or self._prev[0] <= target_s)
            and target_s - cur_t <= CONTINUE_WITHIN_S
        )
        if not resume:
            self._start(target_s)
        while self._cur is not None and self._cur[0] < target_s and not self._exhausted:
            if self._next() is None:
                break
        if self._cur is None:
            raise MediaDecodeError("no frame could be decoded")
        if self._exhausted:  # past the last frame: the last one decoded is the nearest
            last = self._cur
            self._it = None
            return last
        cur, prev = self._cur, self._prev
        if prev is not None and abs(prev[0] - target_s) <= abs(cur[0] - target_s):
            return prev
        return cur


def _read(uri: str, times_s: Sequence[float], size_fn, storage_options: dict | None) -> list[tuple[float, np.ndarray]]:
    """Shared body of read_frames_at / thumbnail_jpeg: results in the order of ``times_s``."""
    import av

    from ray_vlm.core.config import GuardConfig
    from ray_vlm.media.container import open_container

    times = _check_times(times_s)
    if not times:
        return []
    fileobj = _open(uri, storage_options)
    try:
        try:
            container = open_container(fileobj, GuardConfig(), decode=True)
        except (av.FFmpegError, PermissionError, ValueError, EOFError) as e:
            raise MediaDecodeError(f"not a decodable video: {uri} ({type(e).__name__}: {e})") from e
        try:
            if not container.streams.video:
                raise MediaDecodeError(f"no video stream in {uri}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            reader = _Reader(container, stream)
            clamped = [min(max(t, 0.0), reader.duration_s) for t in times]
            out: list[tuple[float, np.ndarray] | None] = [None] * len(times)
            cache: dict[float, tuple[float, np.ndarray]] = {}
            try:
                for i in sorted(range(len(clamped)), key=clamped.__getitem__):
                    t = clamped[i]
                    if t not in cache:
                        pts_s, frame = reader.nearest(t)
                        cache[t] = (pts_s, _to_rgb(frame, size_fn))
                    out[i] = cache[t]
            except av.FFmpegError as e:
                raise MediaDecodeError(f"decoding {uri} failed: {type(e).__name__}: {e}") from e
            return out  # type: ignore[return-value]
        finally:
            container.close()
    finally:
        fileobj.close()


# ------------------------------------------------------------------------------------------ public API
def read_frames_at(
    uri: str,
    times_s: Sequence[float],
    *,
    max_side: int = 448,
    storage_options: dict | None = None,
) -> list[tuple[float, np.ndarray]]:
    """The frame nearest to each requested time, seeking rather than decoding the whole video.

    Args:
        uri: local path, ``file://``, ``s3://bucket/key`` or another allowed fsspec URI.
        times_s: requested times in seconds (stream time, as the store's ``pts_s``), any order;
            times outside ``[0, duration]`` are clamped into it.
        max_side: the longest side of each returned frame is at most this many pixels (never upscaled).
        storage_options: fsspec options for remote filesystems (see :func:`ray_vlm.core.fs.resolve`).

    Returns:
        One ``(pts_s, rgb)`` per requested time, in the order asked: ``pts_s`` is the actual time of the
        frame returned, ``rgb`` uint8 (H, W, 3), upright (display rotation applied).

    Raises:
        MediaNotFoundError, MediaPolicyError, MediaDecodeError, MediaTimeError (a non-finite time),
        MediaError (other I/O failures).
    """
    if int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    side = int(max_side)
    return _read(uri, times_s, lambda w, h: _fit(w, h, side), storage_options)


def thumbnail_jpeg(uri: str, t_s: float, *, width: int = 320, storage_options: dict | None = None) -> bytes:
    """A JPEG of the frame nearest ``t_s`` (clamped into the video), ``width`` pixels wide, aspect kept.

    Raises:
        The errors of :func:`read_frames_at`; ValueError for a width below 1 or above 4096.
    """
    from PIL import Image

    width = int(width)
    if not 1 <= width <= 4096:
        raise ValueError(f"thumbnail width must be in [1, 4096], got {width}")

    def size(w: int, h: int) -> tuple[int, int]:
        return width, max(1, int(round(h * width / w)))

    (_, rgb), = _read(uri, [t_s], size, storage_options)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def open_range(
    uri: str,
    start: int,
    end: int | None,
    *,
    storage_options: dict | None = None,
) -> tuple[bytes, int]:
    """Bytes ``[start, end]`` (inclusive, as in an HTTP ``Range: bytes=start-end`` header) of a file.

    ``end`` beyond the file, or None (``bytes=start-``), means "to the end"; at most
    :data:`MAX_RANGE_BYTES` are returned at once, so the part returned ends at ``start + len(data) - 1``
    (put that in ``Content-Range``).

    Returns:
        ``(data, total_size_bytes)``.

    Raises:
        MediaRangeError: ``start`` is negative or not below the file size, or ``end < start``.
        MediaNotFoundError, MediaPolicyError, MediaError: as for :func:`read_frames_at`.
    """
    start = int(start)
    if start < 0:
        raise MediaRangeError(f"range start {start} is negative")
    if end is not None and int(end) < start:
        raise MediaRangeError(f"range end {end} is before its start {start}")
    f = _open(uri, storage_options)
    try:
        try:
            size = int(f.seek(0, io.SEEK_END))
            if start >= size:
                raise MediaRangeError(f"range start {start} is not below the file size {size}")
            stop = size if end is None else min(int(end) + 1, size)  # exclusive
            stop = min(stop, start + MAX_RANGE_BYTES)
            f.seek(start)
            chunks: list[bytes] = []
            remaining = stop - start
            while remaining > 0:
                block = f.read(remaining)
                if not block:
                    break
                chunks.append(block)
                remaining -= len(block)
        except MediaError:
            raise
        except OSError as e:
            raise MediaError(f"reading {uri} failed: {type(e).__name__}: {e}") from e
        data = b"".join(chunks)
        if len(data) != stop - start:
            raise MediaError(f"{uri} changed while reading: expected {stop - start} bytes, got {len(data)}")
        return data, size
    finally:
        f.close()
