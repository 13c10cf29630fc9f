"""Probe stage: one metadata row per input, refusing what must not be decoded.

Reads the columns ``uri, size_bytes, mtime`` (and optionally ``refused``, a policy reason from
source expansion, '' when none) and writes ``schema.VIDEO_META_COLUMNS + (avg_fps,)``, one row per
input (``ProbeVideos.reads`` / ``.adds``, the operator contract of ``operators/stage.py``). ``status``
is ``ok`` for inputs that may go on to decode, else ``failed`` with an ``error_type`` from
``schema.ERR_*``. Rows whose ``video_id`` is in ``skip_video_ids`` (already committed) are dropped.

Checks, cheapest first, each before anything riskier runs:

1. URL policy (:func:`ray_vlm.core.fs.check_uri`), existence, zero size;
2. content id (:func:`ray_vlm.core.fs.fingerprint`, at most 12 MiB read);
3. sniffing the first 4 KiB: HLS/DASH playlists, ffconcat scripts, SDP and other text are refused
   before FFmpeg sees a byte (they name further URLs FFmpeg would follow);
4. FFmpeg opens the bytes through a Python file object (never a path or URL string), with nested
   opens refused, a demuxer whitelist, bounded probing and ``skip_frame=all`` (no frame is decoded,
   so a header claiming 8K allocates nothing);
5. guards on what the container declares: demuxer name, a video stream, dimensions, duration.

String columns hold '' when a value is absent (error fields of ok rows, container of failed rows);
width/height are 0 and declared_duration_s/avg_fps NaN when unknown; rotation_deg is the display
rotation to apply, *clockwise*, in degrees (0/90/180/270): the legacy ``rotate`` tag's sense, i.e.
``-VideoFrame.rotation`` (FFmpeg's display matrix angle is counter-clockwise), as the decoder uses it.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.config import PROBE_RESOURCES, GuardConfig, SourceConfig
from ray_vlm.core.fs import InputFile, PolicyError, check_uri, fingerprint, mtime_of, open_input, resolve, uri_id
from ray_vlm.media.container import OPEN_TIMEOUT_S, open_container

REFUSED = S.REFUSED

SNIFF_BYTES = 4096

_STR_COLUMNS = (S.URI, S.VIDEO_ID, S.STATUS, S.ERROR_TYPE, S.ERROR, S.CONTAINER, S.CODEC)
_DTYPES = {
    S.SIZE_BYTES: np.int64,
    S.MTIME: np.float64,
    S.WIDTH: np.int32,
    S.HEIGHT: np.int32,
    S.ROTATION_DEG: np.int16,
    S.DECLARED_DURATION_S: np.float64,
    S.AVG_FPS: np.float64,
}


# ------------------------------------------------------------------------------------------ sniffing
_POLICY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"#EXTM3U", "HLS playlist (names further URLs) refused"),
    (b"#EXT-X-", "HLS playlist (names further URLs) refused"),
    (b"#EXTINF", "M3U playlist (names further URLs) refused"),
    (b"ffconcat version", "ffconcat script (names further files) refused"),
    (b"[playlist]", "PLS playlist (names further URLs) refused"),
    (b"v=0\r\n", "SDP session description (opens network streams) refused"),
    (b"v=0\n", "SDP session description (opens network streams) refused"),
)


def sniff(head: bytes) -> tuple[str, str] | None:
    """Classify the first bytes of an input before FFmpeg sees them.

    Args:
        head: the first bytes of the file (up to ``SNIFF_BYTES``).

    Returns:
        ``(error_type, message)`` when the input must be refused, None when it may be a container.
    """
    text = head.lstrip(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    for signature, message in _POLICY_SIGNATURES:
        if text.startswith(signature):
            return S.ERR_POLICY, message
    lowered = text[:512].lower()
    if lowered.startswith(b"<?xml") or lowered.startswith(b"<mpd"):
        if b"<mpd" in head.lower():
            return S.ERR_POLICY, "DASH manifest (names further URLs) refused"
    if not head or b"\x00" in head:
        return None  # binary: every supported container has NUL bytes in its first KiB
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the window
            return None
        decoded = head[: e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n\f" for ch in decoded)
    if printable >= 0.95 * max(len(decoded), 1):
        if "://" in decoded or re.search(r"^\s*(file|https?|concat|subfile|pipe):", decoded, re.M):
            return S.ERR_POLICY, "text file naming URLs (a playlist or script) refused"
        return S.ERR_NOT_VIDEO, "text file, not a video container"
    return None


_ROTATION_RE = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees")
_LOG_LEVEL_LOCK = threading.Lock()


def declared_rotation_deg(container, stream) -> int:
    """Display rotation of ``stream`` without decoding: 0/90/180/270, clockwise.

    PyAV 18 exposes the display matrix only on decoded frames (``VideoFrame.rotation``), so this
    reads FFmpeg's own stream summary (``av_dump_format``, which prints the display matrix side data
    as a counter-clockwise angle; it logs at INFO, hence the brief log-level switch), falling back to
    the legacy ``rotate`` tag (already clockwise). Equals ``-frame.rotation`` modulo 360.
    """
    import av.logging

    text = ""
    with _LOG_LEVEL_LOCK:
        previous = av.logging.get_level()
        try:
            av.logging.set_level(av.logging.INFO)
            text = container.dumps_format()
        except Exception:  # noqa: BLE001 - rotation is best effort
            text = ""
        finally:
            av.logging.set_level(previous)
    ccw: float | None = None
    blocks = re.split(r"(?m)^\s*Stream #", text)
    for block in blocks[1:]:
        if re.match(rf"\d+:{stream.index}\b", block):
            m = _ROTATION_RE.search(block)
            if m:
                ccw = float(m.group(1))
            break
    if ccw is None:
        tag = (stream.metadata or {}).get("rotate")
        try:
            ccw = -float(tag) if tag is not None else 0.0
        except ValueError:
            ccw = 0.0
    return int(round(-ccw / 90.0)) % 4 * 90


def _ffmpeg_message(e: BaseException) -> str:
    strerror = getattr(e, "strerror", None)
    return f"FFmpeg: {strerror}" if strerror else f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------ operator
def source_columns(inputs: list[InputFile]) -> dict[str, np.ndarray]:
    """Turn :func:`ray_vlm.core.fs.expand_sources` output into the probe's input columns."""
    return {
        S.URI: np.array([f.uri for f in inputs], dtype=object),
        S.SIZE_BYTES: np.array([f.size_bytes for f in inputs], dtype=np.int64),
        S.MTIME: np.array([f.mtime for f in inputs], dtype=np.float64),
        REFUSED: np.array([f.refused or "" for f in inputs], dtype=object),
    }


class ProbeVideos:
    """Ray Data operator: probe each input and decide whether it may be decoded.

    Reads ``uri, size_bytes, mtime`` (+ optional ``refused``); returns only the columns it adds.
    Never raises for one bad input: every failure is a ``failed`` row.
    """

    reads = (S.URI, S.SIZE_BYTES, S.MTIME)
    adds = S.VIDEO_META_COLUMNS + (S.AVG_FPS,)
    resources = PROBE_RESOURCES  # many small reads and one FFmpeg open per input: little CPU, a few per call

    def __init__(
        self,
        guards: GuardConfig | None = None,
        source: SourceConfig | None = None,
        storage_options: dict | None = None,
        skip_video_ids: frozenset[str] = frozenset(),
        open_timeout_s: float = OPEN_TIMEOUT_S,
        audio=None,
    ):
        # audio: an AudioConfig (or True: its defaults): files with audio and no picture are sources too
        if audio is True:
            from ray_vlm.core.config import AudioConfig

            audio = AudioConfig()
        self.audio = audio if audio and getattr(audio, "enabled", True) else None
        self.guards = guards or GuardConfig()
        self.source = source or SourceConfig()
        self.storage_options = storage_options
        self.skip_video_ids = frozenset(skip_video_ids)
        self.open_timeout_s = open_timeout_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        S.require_columns(batch, self.reads, "ProbeVideos")
        n = len(batch[S.URI])
        refused = batch.get(REFUSED)
        rows = []
        for i in range(n):
            reason = refused[i] if refused is not None else ""
            row = self.probe_one(
                str(batch[S.URI][i]),
                int(batch[S.SIZE_BYTES][i]),
                float(batch[S.MTIME][i]),
                str(reason) if reason is not None else "",
            )
            if row[S.VIDEO_ID] not in self.skip_video_ids:
                rows.append(row)
        out: dict[str, np.ndarray] = {}
        for col in self.adds:
            values = [r[col] for r in rows]
            if col in _STR_COLUMNS:
                arr = np.empty(len(values), dtype=object)
                arr[:] = values
                out[col] = arr
            else:
                out[col] = np.array(values, dtype=_DTYPES[col])
        return out

    # -------------------------------------------------------------------------------------- one input
    def probe_one(self, uri: str, size_bytes: int, mtime: float, refused: str = "") -> dict[str, Any]:
        """Probe one input; returns its output row (never raises)."""
        row: dict[str, Any] = {
            S.URI: uri,
            S.VIDEO_ID: uri_id(uri),
            S.SIZE_BYTES: size_bytes,
            S.MTIME: mtime,
            S.STATUS: S.STATUS_FAILED,
            S.ERROR_TYPE: "",
            S.ERROR: "",
            S.CONTAINER: "",
            S.CODEC: "",
            S.WIDTH: 0,
            S.HEIGHT: 0,
            S.ROTATION_DEG: 0,
            S.DECLARED_DURATION_S: math.nan,
            S.AVG_FPS: math.nan,
        }

        def fail(error_type: str, message: str) -> dict[str, Any]:
            row[S.STATUS] = S.STATUS_FAILED
            row[S.ERROR_TYPE] = error_type
            row[S.ERROR] = message[:2000]
            return row

        try:
            return self._probe(row, uri, size_bytes, refused, fail)
        except Exception as e:  # noqa: BLE001 - one input must never fail the batch
            return fail(S.ERR_INTERNAL, f"probe: {type(e).__name__}: {e}")

    def _probe(self, row, uri: str, size_bytes: int, refused: str, fail) -> dict[str, Any]:
        import av

        if refused:
            return fail(S.ERR_POLICY, refused)
        try:
            uri = check_uri(uri, self.source.allowed_protocols)
            fs, path = resolve(uri, self.storage_options, self.source.allowed_protocols)
        except PolicyError as e:
            return fail(S.ERR_POLICY, str(e))
        row[S.URI] = uri
        row[S.VIDEO_ID] = uri_id(uri)

        if size_bytes < 0:  # not found at listing time, or listed without sizes: ask once more
            try:
                info = fs.info(path)
            except (FileNotFoundError, NotADirectoryError):
                return fail(S.ERR_NOT_FOUND, f"no such file: {uri}")
            except PermissionError as e:
                return fail(S.ERR_NOT_FOUND, f"cannot be opened: {e}")
            if info.get("type") != "file":
                return fail(S.ERR_NOT_FOUND, f"not a file ({info.get('type')}): {uri}")
            size_bytes = int(info.get("size") or 0)
            row[S.SIZE_BYTES] = size_bytes
            if math.isnan(row[S.MTIME]):
                row[S.MTIME] = mtime_of(info)
        if size_bytes == 0:
            return fail(S.ERR_EMPTY, "zero-byte file")

        try:
            row[S.VIDEO_ID] = fingerprint(fs, path, size_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return fail(S.ERR_NOT_FOUND, f"no such file: {uri}")
        except PermissionError as e:
            return fail(S.ERR_NOT_FOUND, f"cannot be opened: {e}")
        if row[S.VIDEO_ID] in self.skip_video_ids:
            return row  # dropped by the caller; no need to open it

        with open_input(uri, self.storage_options, allowed_protocols=self.source.allowed_protocols,
                        size_bytes=size_bytes) as f:
            head = f.read(SNIFF_BYTES)
            verdict = sniff(head)
            if verdict is not None:
                return fail(*verdict)
            f.seek(0)
            try:
                container = open_container(f, self.guards, open_timeout_s=self.open_timeout_s)
            except av.ArgumentError as e:
                return fail(S.ERR_POLICY, f"container format not on the allow-list ({_ffmpeg_message(e)})")
            except PermissionError as e:
                return fail(S.ERR_POLICY, str(e))
            except av.FFmpegError as e:
                return fail(S.ERR_NOT_VIDEO, _ffmpeg_message(e))
            try:
                return self._inspect(row, container, fail)
            finally:
                container.close()

    def _inspect(self, row, container, fail) -> dict[str, Any]:
        g = self.guards
        fmt = container.format.name
        row[S.CONTAINER] = fmt
        if fmt not in g.allowed_containers:
            return fail(S.ERR_POLICY, f"container format {fmt!r} not in the allow-list")
        from av.stream import Disposition

        # Cover art in audio files is a one-picture "video" stream: not a video.
        streams = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
        if not streams and self.audio is not None and container.streams.audio:
            return self._inspect_audio(row, container, fail)
        if not streams:
            kinds = sorted({s.type for s in container.streams})
            return fail(S.ERR_NO_VIDEO_STREAM, f"no video stream (streams: {kinds or 'none'})")
        v = streams[0]
        ctx = v.codec_context
        if ctx is None:
            return fail(S.ERR_DECODE, "no decoder available for the video stream's codec")
        row[S.CODEC] = ctx.codec.canonical_name
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        row[S.WIDTH], row[S.HEIGHT] = width, height

        if v.duration is not None and v.time_base is not None and v.duration > 0:
            row[S.DECLARED_DURATION_S] = float(v.duration * v.time_base)
        elif container.duration is not None and container.duration > 0:
            row[S.DECLARED_DURATION_S] = container.duration / 1_000_000
        rate = v.average_rate or v.guessed_rate
        if rate:
            row[S.AVG_FPS] = float(rate)
        row[S.ROTATION_DEG] = declared_rotation_deg(container, v)

        if width <= 0 or height <= 0:
            return fail(S.ERR_NOT_VIDEO, "video stream declares no frame size")
        if width > g.max_width or height > g.max_height or width * height > g.max_pixels:
            return fail(
                S.ERR_TOO_LARGE,
                f"{width}x{height} over the guard (max {g.max_width}x{g.max_height}, {g.max_pixels} pixels)",
            )
        duration_s = row[S.DECLARED_DURATION_S]
        if not math.isnan(duration_s) and duration_s > g.max_duration_s:
            return fail(S.ERR_TOO_LONG,
                        f"declared duration {duration_s:.0f} s over the guard ({g.max_duration_s:.0f} s)")
        row[S.STATUS] = S.STATUS_OK
        return row

    def _inspect_audio(self, row, container, fail) -> dict[str, Any]:
        """A file with audio and no picture: a source with an audio track only (no size, no frames)."""
        from ray_vlm.operators._audio import pick_audio_stream

        a, _ = pick_audio_stream(container)
        ctx = a.codec_context
        if ctx is None:
            return fail(S.ERR_DECODE, "no decoder available for the audio stream's codec")
        row[S.CODEC] = ctx.codec.canonical_name
        row[S.WIDTH], row[S.HEIGHT] = 0, 0
        audio = self.audio
        assert audio is not None  # only called when audio-only files are accepted
        rate, hi, lo = int(ctx.sample_rate or 0), int(audio.max_sample_rate), int(audio.min_sample_rate)
        if rate > hi:
            return fail(S.ERR_TOO_LARGE, f"audio declares {rate} Hz, over the guard of {hi} Hz")
        if rate < lo:
            return fail(S.ERR_POLICY, f"audio declares {rate} Hz, under the guard of {lo} Hz")
        row[S.ROTATION_DEG] = 0
        if a.duration is not None and a.time_base is not None and a.duration > 0:
            row[S.DECLARED_DURATION_S] = float(a.duration * a.time_base)
        elif container.duration is not None and container.duration > 0:
            row[S.DECLARED_DURATION_S] = container.duration / 1_000_000
        duration_s = row[S.DECLARED_DURATION_S]
        if not math.isnan(duration_s) and duration_s > self.guards.max_duration_s:
            return fail(S.ERR_TOO_LONG,
                        f"declared duration {duration_s:.0f} s over the guard ({self.guards.max_duration_s:.0f} s)")
        row[S.STATUS] = S.STATUS_OK
        return row
