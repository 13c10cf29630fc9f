"""PyAV sampling core of the decode stage, and the decoder child process that runs it.

Contract: ``VideoSampler`` yields ``(pts_s, rgb uint8 (H, W, 3))`` for one video, times from pts
(``(pts - stream.start_time) * time_base``), never from the average rate; ``sample_chunks`` groups them into
``ChunkEvent``s and never raises for a bad video (the outcome travels in the last event).
``operators/decode.py`` turns the events into chunk rows; its docstring holds the operator's contract.

Which frames:

- ``mode="fps"``: request ``k`` at ``k / target_fps`` takes the frame whose pts is *nearest* (ties go to the
  earlier); a frame is never emitted twice, and requests past the last frame's display time are not made.
  For H.264, HEVC and VP9 the choice is made from packet timestamps before decoding (``_plan.PacketPlan``),
  and only each target's keyframe and reference chain are decoded (``skip_frame="NONREF"`` for the rest);
  a frame that breaks the plan's assumptions restarts the video frame by frame, skipping what was already
  yielded. Other codecs, and streams without pts, are decoded frame by frame (``_FrameLoop``): nearest
  frame as frames come out, non-reference frames skipped while the next request is far, seeks through the
  index checked where they land. Opt-in ``sample_tolerance_frames``: any frame within that many frame
  periods, the cheapest to decode.
- ``mode="keyframes"``: only keyframe packets reach the decoder; one sample per keyframe, at least
  ``1 / target_fps`` apart. Opt-in ``keyframes_skip_loop_filter``.

A stream without pts gets times from the previous frame's time plus its duration (``stats.synthesized_pts``)
and every frame is decoded, since a skipped frame would shift every later time.

Pictures: converted to RGB and resized (squashed, not cropped) in FFmpeg's scaler (``SCALER_FLAGS``);
display rotation (clockwise; given, or read from the first frame's display matrix when 0) is applied after
the scaler, whose output size is swapped for 90/270 so the rotated picture has ``frame_size``.

Truncation: a decoded end (last frame's or demuxed packet's pts + duration) below ``truncation_tolerance`` x
the declared duration is ``truncated``; so is an MPEG-TS file whose size is not a whole number of transport
packets (TS declares no duration).

The child (``python -m ray_vlm.operators._sampler FD``, see ``child_main``) isolates FFmpeg from the parent:
a hang or crash costs one video. It imports only the standard library, numpy and PyAV (no pyarrow, no
pydantic), so it starts fast; local files are opened with ``open()`` (the parent already applied the URL
policy), other URIs through ``ray_vlm.core.fs.open_input``, imported only then. Test hook:
``RAY_VLM_DECODE_FAULT`` holds comma-separated ``kind[@N]:substring`` entries, kind ``hang`` (sleep
forever) or ``crash`` (SIGSEGV), fired for a URI containing ``substring`` before decoding (N = 0) or once N
sampled frames were sent.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_vlm.core.errors import RayVlmError
from ray_vlm.core.status import (
    ERR_DECODE,
    ERR_EMPTY,
    ERR_INTERNAL,
    ERR_NO_FRAMES,
    ERR_NO_VIDEO_STREAM,
    ERR_NOT_FOUND,
    ERR_NOT_VIDEO,
    ERR_POLICY,
    ERR_TOO_LARGE,
    ERR_TOO_LONG,
    ERR_TRUNCATED,
)
from ray_vlm.operators._audio import SAMPLE_RATE, AudioTrack, empty_audio, pick_audio_stream
from ray_vlm.operators._decode_job import ChildInit, DecodeJob
from ray_vlm.operators._plan import (
    NOT_TARGET,
    TARGET,
    TIE_S,
    UNDECIDED,
    PacketPlan,
    PlanAbandoned,
    PlannedPacket,
)
from ray_vlm.operators._values import as_float

__all__ = [
    "ERR_DECODE", "ERR_EMPTY", "ERR_INTERNAL", "ERR_NO_FRAMES", "ERR_NO_VIDEO_STREAM", "ERR_NOT_FOUND",
    "ERR_NOT_VIDEO", "ERR_POLICY", "ERR_TOO_LARGE", "ERR_TOO_LONG", "ERR_TRUNCATED", "FAULT_ENV",
    "INTERPOLATION", "KEYFRAMES_SKIP_LOOP_FILTER", "SAMPLE_TOLERANCE_FRAMES", "SCALER", "SCALER_FLAGS",
    "ChunkEvent", "DecodeStats", "PlanAbandoned", "VideoDecodeError", "VideoSampler", "child_main", "open_error",
    "open_source", "sample_chunks", "scaler_interpolation",
]

FAULT_ENV = "RAY_VLM_DECODE_FAULT"
# The scaler (colour conversion + resize), by ``DecodeConfig.scaler``. "exact" (default): area averaging with
# FFmpeg's BITEXACT | ACCURATE_RND flags, the same pixels on every CPU (checked in the tests against the
# scaler with all of FFmpeg's SIMD switched off), at FAST_BILINEAR's cost. "fast": FAST_BILINEAR, the scaler
# of stores made before this knob; its SIMD paths differ from its C path, so its pixels depend on the CPU.
SCALER = "scaler"
SCALER_FLAGS = {"exact": ("AREA", "BITEXACT", "ACCURATE_RND"), "fast": ("FAST_BILINEAR",)}
INTERPOLATION = "AREA"  # the default scaler's filter (see ``SCALER_FLAGS``)


def scaler_interpolation(name: str = "exact") -> Any:
    """PyAV ``Interpolation`` flags for a ``DecodeConfig.scaler`` name ("exact" | "fast")."""
    from av.video.reformatter import Interpolation

    try:
        flags = SCALER_FLAGS[name]
    except KeyError:
        raise ValueError(f"unknown scaler {name!r}; one of {sorted(SCALER_FLAGS)}") from None
    out = Interpolation[flags[0]]
    for f in flags[1:]:
        out |= Interpolation[f]
    return out


# Opt-in knob (a ``DecodeConfig`` attribute, read with getattr; 0 when absent): in fps mode with the packet
# plan, a request may take any frame up to this many source frame periods from it (1.0: "within one frame
# period", boundary included up to float rounding), the one that is cheapest to decode (see ``_plan``).
# 0 (the default): the nearest frame.
SAMPLE_TOLERANCE_FRAMES = "sample_tolerance_frames"
# Opt-in knob (a ``DecodeConfig`` attribute, read with getattr; False when absent): keyframes mode decodes
# keyframes without FFmpeg's in-loop deblocking filter (``skip_loop_filter=all``). Keyframes are intra
# frames and no emitted frame refers to another, so nothing drifts: each sample is the keyframe minus
# deblocking, for less CPU and a small pixel difference.
KEYFRAMES_SKIP_LOOP_FILTER = "keyframes_skip_loop_filter"

# Codecs whose decoded frames carry their packet's pts and whose NONREF skipping drops only frames
# nothing refers to (checked pixel for pixel against full decodes in the tests): these get the packet plan.
_PLANNED_CODECS = frozenset({"h264", "hevc", "vp9"})
# Seek (plan) when the needed keyframe is at least this far ahead of what was demuxed.
_SEEK_AHEAD_S = 0.5
# Frame-by-frame loop: non-reference frames are skipped while the next request is further away than
# this many frame periods (plus one per decoder thread, and at least _NONREF_MARGIN_S): the decoder's
# delay (B-frame reordering plus frame threads) stays below it.
_NONREF_MARGIN_FRAMES = 8
_NONREF_MARGIN_S = 0.5
# Frame-by-frame loop: seek only when it skips at least this many frames; without an index, only when
# the next request is more than this many observed GOPs away.
_SEEK_MIN_FRAMES = 3
_SEEK_GOPS_NO_INDEX = 2.0
_TS_PACKET_SIZES = (188, 192, 204)
# Decode errors in a row after which the rest of a video is given up (FFmpeg usually resyncs at the
# next keyframe; a truncated file errors once at its end).
_MAX_ERRORS_IN_ROW = 16


class VideoDecodeError(RayVlmError):
    """One video cannot be decoded; ``error_type`` is one of the ``ERR_*`` classes."""

    code = "video_undecodable"

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class DecodeStats:
    """What one ``VideoSampler`` pass saw; read after iterating. Times are seconds from the stream's start."""

    container: str = ""
    codec: str = ""
    width: int = 0  # coded size (before rotation)
    height: int = 0
    rotation_deg: int = 0  # clockwise rotation that was applied
    declared_duration_s: float = math.nan
    decoded_end_s: float = 0.0  # end of the last decoded frame or demuxed packet (pts + duration)
    frames_decoded: int = 0  # frames that came out of the decoder (skipped frames not counted)
    frames_sampled: int = 0
    packets: int = 0  # packets demuxed
    seeks: int = 0
    planned: bool = False  # frames were chosen from packet timestamps (see the module docstring)
    synthesized_pts: bool = False  # the stream had no pts: times come from frame durations
    error_type: str | None = None  # decoding stopped early (decode error, guard) or the video is cut short
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # gcd of the byte positions of the demuxed packets: in MPEG-TS every packet starts on a transport packet,
    # so this is a multiple of the transport packet size (188, 192 or 204 bytes) that the file uses
    positions_gcd: int = 0

    def note_position(self, pos: int | None) -> None:
        if pos is not None and pos > 0:
            self.positions_gcd = math.gcd(self.positions_gcd, pos)


class _GuardStop(Exception):
    """A decoded frame broke a guard; decoding stops (the reason is in the stats)."""


# ------------------------------------------------------------------------------------------- opening


def open_error(exc: BaseException) -> VideoDecodeError:
    """Map an exception raised while opening a video to an error class."""
    import av

    name = type(exc).__name__
    if isinstance(exc, VideoDecodeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return VideoDecodeError(ERR_NOT_FOUND, f"not found: {exc}")
    if isinstance(exc, PermissionError) or "Policy" in name:
        return VideoDecodeError(ERR_POLICY, f"refused: {exc}")
    if isinstance(exc, av.error.InvalidDataError):
        return VideoDecodeError(
            ERR_NOT_VIDEO, f"FFmpeg cannot read a media container (not a video, or cut before its index): {exc}"
        )
    if isinstance(exc, av.error.FFmpegError) and getattr(exc, "errno", None) == 22:  # EINVAL
        # EINVAL from avformat_open_input with format_whitelist set: the demuxer is not allowed.
        return VideoDecodeError(ERR_POLICY, f"container format is not in guards.allowed_containers: {exc}")
    if isinstance(exc, av.error.DecoderNotFoundError):
        return VideoDecodeError(ERR_DECODE, f"no decoder for the video stream: {exc}")
    if isinstance(exc, (av.error.FFmpegError, EOFError, OSError)):
        return VideoDecodeError(ERR_DECODE, f"cannot read the container ({name}): {exc}")
    return VideoDecodeError(ERR_INTERNAL, f"{name}: {exc}")


def open_source(source: tuple, size_bytes: int | None = None):
    """Open ``("path", abs_path)`` with ``open()``, or ``("uri", uri, storage_options)`` through the resolver."""
    if source[0] == "path":
        return open(source[1], "rb")
    from ray_vlm.core.fs import open_input  # fsspec: only for remote inputs

    return open_input(source[1], storage_options=source[2], size_bytes=size_bytes)


def _size_of(fileobj) -> int | None:
    try:
        pos = fileobj.tell()
        size = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(pos)
        return int(size)
    except Exception:  # noqa: BLE001 - a stream without size: unknown
        return None


# ------------------------------------------------------------------------------------------- sampling


class VideoSampler:
    """Sampled frames of one video, as an iterable of ``(pts_s, rgb)``.

    ``rgb`` is uint8 (H, W, 3) with (H, W) = ``frame_size``, upright (rotation applied). Iterate once;
    ``stats`` then holds what was decoded. Opening or guard failures raise ``VideoDecodeError``; a
    decode error after the container opened ends the iteration and is recorded in ``stats.error_type``
    / ``stats.error`` (frames already yielded stay valid).

    Args:
        source: a path or a seekable binary file object.
        decode: sampling mode, target_fps, decoder threads (``DecodeConfig`` or the same attributes).
        frame_size: (height, width) of the output frames.
        rotation_deg: clockwise display rotation to apply (0/90/180/270); 0 means "read it from the
            stream's display matrix".
        guards: dimension / duration / container guards (``GuardConfig`` or the same attributes).
        declared_duration_s: duration the probe read; NaN to read it from the container.
        progress: called after each demuxed packet (heartbeats for a watchdog).
        size_bytes: file size if known (for the MPEG-TS cut check); read from ``source`` otherwise.
        start_s: resume point: frames before it are not yielded, and fps mode seeks towards it (frame by frame,
            which picks the same frames as the packet plan).
        audio: ``AudioSettings`` (or the same attributes): also decode one audio stream in the same demux
            (``self.audio``, an ``AudioTrack``, holds it; seeking is then off, since a seek skips audio packets).
            A file with audio and no video is then sampled as audio only: iteration yields ``(t, None)`` ticks
            whenever ``audio_chunk_s`` of audio is held. None: video only.
    """

    def __init__(
        self,
        source,
        decode,
        frame_size: tuple[int, int],
        rotation_deg: int = 0,
        *,
        guards=None,
        declared_duration_s: float = math.nan,
        progress: Callable[[], None] | None = None,
        size_bytes: int | None = None,
        start_s: float = 0.0,
        audio=None,
    ):
        self.source = source
        self.audio_settings = audio if audio is not None and getattr(audio, "enabled", True) else None
        self.audio: AudioTrack | None = None
        self.audio_streams = 0
        self.audio_only = False
        self.start_s = max(0.0, float(start_s or 0.0))
        self.decode = decode
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.rotation_deg = int(rotation_deg) % 360
        self.guards = guards
        self.progress = progress
        self.size_bytes = size_bytes
        self.stats = DecodeStats(declared_duration_s=as_float(declared_duration_s))
        self._used = False

    # -------------------------------------------------------------- set-up

    def _open_container(self):
        import av

        options = {}
        if self.guards is not None:
            # The demuxer allow-list is enforced by FFmpeg itself, before any header is parsed, so a
            # playlist/concat/image2 demuxer never gets to open nested URLs.
            options["format_whitelist"] = ",".join(self.guards.allowed_containers)
        if isinstance(self.source, (str, os.PathLike)):
            if os.path.exists(self.source) and os.path.getsize(self.source) == 0:
                raise VideoDecodeError(ERR_EMPTY, "the file is empty (0 bytes)")
            if self.size_bytes is None and os.path.exists(self.source):
                self.size_bytes = os.path.getsize(self.source)
            source = str(self.source)
        else:
            size = _size_of(self.source)
            if size == 0:
                raise VideoDecodeError(ERR_EMPTY, "the file is empty (0 bytes)")
            if self.size_bytes is None:
                self.size_bytes = size
            source = self.source
        try:
            return av.open(source, mode="r", options=options, metadata_errors="ignore")
        except Exception as exc:
            raise open_error(exc) from exc

    def _check_container(self, container) -> Any:
        st = self.stats
        st.container = container.format.name
        if self.guards is not None and st.container not in self.guards.allowed_containers:
            raise VideoDecodeError(ERR_POLICY, f"container {st.container!r} is not in guards.allowed_containers")
        from av.stream import Disposition

        # Cover art in audio files is a one-picture "video" stream: not a video.
        videos = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
        if self.audio_settings is not None:
            audio_stream, self.audio_streams = pick_audio_stream(container)
            if audio_stream is not None:
                self.audio = AudioTrack(audio_stream, self.start_s, self.audio_settings.max_sample_rate,
                                        self.audio_settings.min_sample_rate)
        if not videos:
            kinds = sorted({s.type for s in container.streams})
            if self.audio is None:
                raise VideoDecodeError(ERR_NO_VIDEO_STREAM, f"no video stream (streams: {kinds or 'none'})")
            if not self.audio.active:
                raise VideoDecodeError(ERR_TOO_LARGE if "over" in self.audio.refused else ERR_POLICY,
                                       self.audio.refused)
            self.audio_only = True
            st.codec = self.audio.codec
            if not math.isfinite(st.declared_duration_s):
                st.declared_duration_s = _declared_duration_s(container, self.audio.stream)
            self._check_declared_duration()
            return None
        stream = videos[0]
        cc = stream.codec_context
        if cc is None:
            raise VideoDecodeError(ERR_DECODE, "FFmpeg has no decoder for the video stream (damaged header?)")
        st.codec = cc.name
        st.width, st.height = int(cc.width or 0), int(cc.height or 0)
        g = self.guards
        if g is not None and st.width and st.height:
            fits = (st.width <= g.max_width and st.height <= g.max_height) or (
                st.height <= g.max_width and st.width <= g.max_height
            )
            if not fits or st.width * st.height > g.max_pixels:
                raise VideoDecodeError(
                    ERR_TOO_LARGE,
                    f"frame {st.width}x{st.height} exceeds the guard "
                    f"({g.max_width}x{g.max_height}, {g.max_pixels} pixels)",
                )
        if not math.isfinite(st.declared_duration_s):
            st.declared_duration_s = _declared_duration_s(container, stream)
        self._check_declared_duration()
        return stream

    def _check_declared_duration(self) -> None:
        st, g = self.stats, self.guards
        if g is not None and math.isfinite(st.declared_duration_s) and st.declared_duration_s > g.max_duration_s:
            raise VideoDecodeError(
                ERR_TOO_LONG, f"declares {st.declared_duration_s:.1f} s, over the guard of {g.max_duration_s:.0f} s"
            )

    def _demux(self, container, stream) -> Any:
        """Packets of the video stream, and of the audio stream when its audio is decoded too."""
        if self.audio is not None and self.audio.active:
            return container.demux(stream, self.audio.stream)
        return container.demux(stream)

    @property
    def can_seek(self) -> bool:
        """Seeking skips packets: not while audio is decoded in the same pass."""
        return self.audio is None or not self.audio.active

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[float, np.ndarray | None]]:
        from av.video.reformatter import VideoReformatter

        if self._used:
            raise RuntimeError("a VideoSampler can be iterated only once")
        self._used = True
        container = self._open_container()
        try:
            stream = self._check_container(container)
            if stream is None:  # audio only
                yield from self._audio_only(container)
                return
            cc = stream.codec_context
            if self.decode.threads == 1:
                cc.thread_count = 1
            else:
                cc.thread_type = "AUTO"
                cc.thread_count = self.decode.threads
            if self.decode.mode == "keyframes" and getattr(self.decode, KEYFRAMES_SKIP_LOOP_FILTER, False):
                # before the codec opens (its first packet): FFmpeg reads the option at avcodec_open2
                cc.options = {**cc.options, "skip_loop_filter": "all"}
            st = self.stats
            reformatter = VideoReformatter()
            interp = scaler_interpolation(getattr(self.decode, SCALER, "exact"))
            out_h, out_w = self.frame_size
            rotation = self.rotation_deg
            rotation_known = rotation != 0
            st.rotation_deg = rotation
            for t, frame in self._frames(container, stream):
                if not rotation_known:
                    rotation, rotation_known = _frame_rotation_cw(frame), True
                    st.rotation_deg = rotation
                w, h = (out_h, out_w) if rotation in (90, 270) else (out_w, out_h)
                rgb: np.ndarray = reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                                       interpolation=interp).to_ndarray()
                if rotation:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90)))  # k > 0 turns counter-clockwise
                st.frames_sampled += 1
                yield t, rgb
            if self.audio is not None:
                self.audio.finish()
            self._check_truncation()
        finally:
            container.close()

    def _audio_only(self, container) -> Iterator[tuple[float, None]]:
        """Demux the audio stream alone; a ``(t, None)`` tick each time ``audio_chunk_s`` of audio is held."""
        assert self.audio is not None
        st, track = self.stats, self.audio
        chunk_s = float(getattr(self.audio_settings, "audio_chunk_s", 30.0))
        for packet in _PacketReader(self, container.demux(track.stream)):
            if packet.pts is not None and track.tb is not None and packet.size:
                t = (packet.pts - (track.origin or 0) + (packet.duration or 0)) * track.tb
                st.decoded_end_s = max(st.decoded_end_s, t)
                if self._over_duration(t):
                    break
            if track.held_s() >= chunk_s:
                yield track.end_s(), None
        track.finish()
        st.decoded_end_s = max(st.decoded_end_s, track.end_s())
        self._check_truncation()

    def _frames(self, container, stream) -> Iterator[tuple[float, Any]]:
        """Sampled ``(t, av.VideoFrame)`` in time order: the packet plan where it applies, else frame by frame."""
        st = self.stats
        if self.start_s > 0:  # a resumed video: frame by frame from the keyframe before start_s
            yield from self._run_frames(container, stream, self._demux(container, stream),
                                        suppress_until=math.nextafter(self.start_s, -math.inf), start_s=self.start_s)
            return
        planned = (
            self.decode.mode == "fps"
            and st.codec in _PLANNED_CODECS
            and stream.start_time is not None
            and bool(stream.time_base)
        )
        if not planned:
            yield from self._run_frames(container, stream, self._demux(container, stream))
            return
        st.planned = True
        demux = self._demux(container, stream)
        last_t = -math.inf
        try:
            for t, frame in self._run_planned(container, stream, demux):
                last_t = t
                yield t, frame
            return
        except PlanAbandoned as fb:
            st.planned = False
            st.notes.append(f"packet plan abandoned ({fb.reason}): decoding frame by frame")
            stream.codec_context.skip_frame = "DEFAULT"
            if fb.replay is not None:  # nothing decoded yet: go on with the packets already read
                packets: Iterable = _chain(fb.replay, demux)
            else:
                try:
                    container.seek(stream.start_time, stream=stream, backward=True)  # also flushes the decoder
                except Exception as exc:  # noqa: BLE001
                    self._stopped(ERR_DECODE, f"cannot restart decoding ({type(exc).__name__}: {exc})")
                    return
                st.seeks += 1
                packets = self._demux(container, stream)
        yield from self._run_frames(container, stream, packets, suppress_until=last_t)

    # -------------------------------------------------------------- shared by both loops

    def _over_size(self, frame: Any, t: float) -> bool:
        """A decoded frame over the pixel guard (recorded as the outcome)."""
        max_px = self.guards.max_pixels if self.guards is not None else None
        if max_px is not None and frame.width * frame.height > max_px:
            self._stopped(ERR_TOO_LARGE, f"a frame at {t:.2f} s is {frame.width}x{frame.height}, over the guard")
            return True
        return False

    def _over_duration(self, t: float) -> bool:
        """Time ``t`` (s) past the duration guard (recorded as the outcome)."""
        max_t = self.guards.max_duration_s if self.guards is not None else math.inf
        if t > max_t:
            self._stopped(ERR_TOO_LONG, f"still decoding at {t:.0f} s, over the guard of {max_t:.0f} s")
            return True
        return False

    def _decode_failed(self, near_s: float, exc: BaseException) -> None:
        self._stopped(ERR_DECODE, f"decoding failed near {near_s:.2f} s: {type(exc).__name__}: {exc}")

    # -------------------------------------------------------------- the packet plan (fps mode)

    def _run_planned(self, container, stream, demux: Iterator) -> Iterator[tuple[float, Any]]:
        """Choose targets from packet pts (``PacketPlan``), then decode only their keyframes and reference chains.

        Raises ``PlanAbandoned`` when the stream breaks the plan's assumptions (the caller decodes frame by frame).
        """
        st = self.stats
        dec = _PlanDecoder(self, container, stream)
        plan = dec.plan
        landing: tuple[float, float] | None = None  # after a seek: (demuxed end before it, keyframe time)
        seeked_for = math.nan
        try:
            for packet in _PacketReader(self, demux):
                if not packet.size:
                    continue
                if packet.pts is None:
                    if not dec.touched and not st.seeks and len(plan.window) + 1 == st.packets:
                        raise PlanAbandoned("packets without pts", replay=[e.packet for e in plan.window] + [packet])
                    raise PlanAbandoned("a packet without pts")
                pts = packet.pts
                t = (pts - dec.origin) * dec.tb
                key = bool(packet.is_keyframe)
                if landing is not None:
                    before, expected = landing
                    if not key or not (before < t <= expected + 1e-9):
                        raise PlanAbandoned(f"a seek landed at {t:.3f} s instead of {expected:.3f} s")
                    landing = None
                dec.index.note(packet)
                dur = (packet.duration or 0) * dec.tb
                plan.observe(t, dur)
                st.decoded_end_s = max(st.decoded_end_s, t + dur)
                if self._over_duration(t):
                    break
                plan.add(packet, pts, t, key, packet.size, st.packets, discard=bool(packet.is_discard))
                r = plan.pending_request_s
                if r is not None and r != seeked_for:  # sparse requests: seek through the index
                    seeked_for = r
                    landing = dec.seek_ahead(r)
                dec.release()
                while dec.ready:
                    yield dec.ready.popleft()
                if dec.gave_up:
                    break
            plan.finish()  # every target was sent when it was decided
            dec.restart()
        except _GuardStop:  # a frame over the guard: decoding stops (recorded in stats)
            plan.done = True
        finally:
            if dec.skip != "DEFAULT":
                dec.cc.skip_frame = "DEFAULT"
        dec.release()
        while dec.ready:
            yield dec.ready.popleft()

    # -------------------------------------------------------------- frame by frame (other codecs, keyframes)

    def _run_frames(
        self, container, stream, packets: Iterable, suppress_until: float = -math.inf, start_s: float = 0.0
    ) -> Iterator[tuple[float, Any]]:
        """Demux -> decode -> time -> select, frame by frame; yields ``(t, av.VideoFrame)``.

        Frames at or before ``suppress_until`` are chosen as usual but not yielded (a restart after the
        packet plan gave up, or a resumed video); ``start_s`` makes fps mode start at the requests near it.
        """
        return _FrameLoop(self, container, stream, packets, suppress_until, start_s).run()

    # -------------------------------------------------------------- outcome

    def _stopped(self, error_type: str, message: str) -> None:
        if self.stats.error_type is None:
            self.stats.error_type, self.stats.error = error_type, message

    def _check_truncation(self) -> None:
        st = self.stats
        if st.error_type is not None or (st.frames_decoded == 0 and not self.audio_only):
            return
        declared = st.declared_duration_s
        if math.isfinite(declared) and declared > 0:
            if st.decoded_end_s < self.decode.truncation_tolerance * declared:
                st.error_type = ERR_TRUNCATED
                st.error = f"decoded {st.decoded_end_s:.1f} s of declared {declared:.1f} s"
                return
        if st.container == "mpegts" and self.size_bytes and self._ends_inside_a_ts_packet():
            st.error_type = ERR_TRUNCATED
            st.error = (
                f"MPEG-TS file of {self.size_bytes} bytes ends inside a transport packet "
                f"(decoded {st.decoded_end_s:.1f} s): it was cut short"
            )

    def _ends_inside_a_ts_packet(self) -> bool:
        """The file size is not a whole number of transport packets (of the size its packets' positions show)."""
        size = self.size_bytes or 0
        sizes = [n for n in _TS_PACKET_SIZES if self.stats.positions_gcd and self.stats.positions_gcd % n == 0]
        if len(sizes) == 1:
            return size % sizes[0] != 0
        return all(size % n for n in _TS_PACKET_SIZES)  # packet size unknown: a size no packet size divides


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


# ------------------------------------------------------------------------------------------- decode loops


class _PacketReader:
    """Demuxed packets, counted in the stats and reported to ``progress``; a demuxer error ends them.

    ``failed`` tells the two ends apart: PyAV ends a stream with an empty packet that flushes the decoder,
    a demuxer error does not (the frame loop then flushes it).
    """

    def __init__(self, sampler: VideoSampler, demux: Iterable):
        self.sampler = sampler
        self.demux = iter(demux)
        self.failed = False
        track = sampler.audio
        # audio packets go to the audio track; in audio-only mode they are the packets this reader yields
        self.audio = track if track is not None and track.active and not sampler.audio_only else None
        self.audio_index = self.audio.stream.index if self.audio is not None else -1

    def __iter__(self) -> Iterator[Any]:
        st = self.sampler.stats
        while True:
            try:
                packet = next(self.demux)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - demuxer error: keep what was decoded
                self.failed = True
                self.sampler._stopped(ERR_DECODE, f"reading the container failed near {st.decoded_end_s:.2f} s: "
                                      f"{type(exc).__name__}: {exc}")
                return
            st.packets += 1
            st.note_position(packet.pos)
            if self.sampler.progress is not None:
                self.sampler.progress()
            if self.audio is not None and packet.stream.index == self.audio_index:
                self.audio.feed(packet)
                continue
            if self.sampler.audio_only:
                self.sampler.audio.feed(packet)  # type: ignore[union-attr]  # audio_only: the track exists
            yield packet


class _KeyIndex:
    """The container's keyframe index (mp4/mov: complete; matroska: once cues are read), in pts.

    Index entries carry dts, seeking takes pts: ``shift`` is the largest pts - dts of the keyframe packets seen.
    """

    def __init__(self, stream: Any):
        self.stream = stream
        self.shift = 0

    def note(self, packet: Any) -> None:
        """A demuxed packet with a pts."""
        if packet.is_keyframe and packet.dts is not None:
            self.shift = max(self.shift, packet.pts - packet.dts)

    def usable(self) -> bool:
        try:
            return len(self.stream.index_entries) > 1
        except Exception:  # noqa: BLE001 - no index
            return False

    def keyframe_at_or_before(self, ts: int) -> int | None:
        """pts of the last indexed keyframe at or before stream timestamp ``ts``; None if none or no index."""
        try:
            entries = self.stream.index_entries
            if len(entries) < 2:
                return None
            i = entries.search_timestamp(ts - self.shift, backward=True)
            return None if i < 0 else entries[i].timestamp + self.shift
        except Exception:  # noqa: BLE001 - no index
            return None


class _ErrorRun:
    """Decode errors in a row: FFmpeg usually resyncs at the next keyframe, so only a long run gives up."""

    def __init__(self) -> None:
        self.count = 0

    def clear(self) -> None:
        self.count = 0

    def failed(self) -> bool:
        """One more error; True once the run reaches ``_MAX_ERRORS_IN_ROW``."""
        self.count += 1
        return self.count >= _MAX_ERRORS_IN_ROW


class _PlanDecoder:
    """The decoder side of the packet plan (its ``PacketSink``): decodes what the plan sends, matches decoded
    frames to sent packets by pts, and queues the targets' frames in time order (``ready``)."""

    def __init__(self, sampler: VideoSampler, container: Any, stream: Any):
        self.sampler = sampler
        self.container = container
        self.stream = stream
        self.cc = stream.codec_context
        self.tb = float(stream.time_base)
        self.origin = int(stream.start_time)
        self.index = _KeyIndex(stream)
        self.plan = PacketPlan(sampler.decode.target_fps, self,
                               getattr(sampler.decode, SAMPLE_TOLERANCE_FRAMES, 0.0))
        self.sent: dict[int, PlannedPacket] = {}  # pts -> sent packet whose frame has not come out yet
        self.outq: deque[tuple[PlannedPacket, Any]] = deque()  # decoded, packet undecided (display order)
        self.ready: deque[tuple[float, Any]] = deque()  # (t, frame) to yield, in time order
        self.yielded_t = -math.inf
        self.fresh = True  # nothing was sent since the decoder was (re)started
        self.gap = False  # packets were dropped after the decoder was fed: restart before the next send
        self.skip = "DEFAULT"  # the codec's skip_frame
        self.errors = _ErrorRun()
        self.decode_errors = False  # a packet failed to decode: frames may be lost from then on
        self.gave_up = False
        self.touched = False  # a packet was sent

    # ---- PacketSink

    def send(self, e: PlannedPacket, packet: Any) -> None:
        if self.gave_up:
            return
        if self.gap:
            self.restart()
        want = "NONREF" if self.plan.state_of(e) == NOT_TARGET else "DEFAULT"
        if want != self.skip:
            self.cc.skip_frame = self.skip = want
        self.sent[e.pts] = e
        self.fresh = False
        self.touched = True
        try:
            frames = self.cc.decode(packet)
            self.errors.clear()
        except Exception as exc:  # noqa: BLE001 - corrupt data: FFmpeg resyncs at the next keyframe
            self.sampler._decode_failed(e.t, exc)
            self.decode_errors = True
            if self.errors.failed():
                self.restart()
                self.gave_up = True
            return
        for frame in frames:
            self._came_out(frame)

    def dropped(self) -> None:
        self.gap = self.gap or not self.fresh

    def target_lost(self, e: PlannedPacket) -> None:
        if not self.decode_errors:  # after corrupt data, a missing frame is error concealment
            raise PlanAbandoned(f"the frame at {e.t:.3f} s did not come out of the decoder")

    # ---- the decoder

    def restart(self) -> None:
        """Drain the decoder (its delayed frames come out), then reset it for a new keyframe."""
        if not self.fresh:
            try:
                frames = self.cc.decode(None)
            except Exception as exc:  # noqa: BLE001
                self.sampler._stopped(ERR_DECODE, f"flushing the decoder failed: {type(exc).__name__}: {exc}")
                self.decode_errors = True
                frames = []
            for frame in frames:
                self._came_out(frame)
            self._forget(list(self.sent.values()))
            self.cc.flush_buffers()
        self.fresh, self.gap = True, False

    def seek_ahead(self, r: float) -> tuple[float, float] | None:
        """Seek when the indexed keyframe request ``r`` needs is well ahead of what was demuxed; every packet
        demuxed so far is farther from that request than the keyframe. Returns (demuxed end, keyframe time):
        where the next packet must land, or None when no seek was made."""
        if not self.sampler.can_seek:
            return None
        ts = self.index.keyframe_at_or_before(self.origin + int(math.floor(r / self.tb)))
        end_t = self.plan.end_t
        if ts is None or not (ts - self.origin) * self.tb - end_t > _SEEK_AHEAD_S:
            return None
        self.restart()
        try:
            self.container.seek(ts, stream=self.stream, backward=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a non-seekable input
            self.sampler.stats.notes.append(f"seeking failed ({type(exc).__name__}: {exc})")
            return None
        self.sampler.stats.seeks += 1
        self.plan.clear()
        return end_t, (ts - self.origin) * self.tb

    def release(self) -> None:
        """Move decided frames from the head of ``outq`` to ``ready`` (targets) or away."""
        while self.outq:
            state = self.plan.state_of(self.outq[0][0])
            if state == UNDECIDED:
                return
            e, frame = self.outq.popleft()
            if state == TARGET:
                if e.t <= self.yielded_t:
                    raise PlanAbandoned(f"frames came out of order ({e.t:.3f} s after {self.yielded_t:.3f} s)")
                self.yielded_t = e.t
                self.ready.append((e.t, frame))

    def _forget(self, gone: list[PlannedPacket]) -> None:
        """Sent packets whose frames will not come out: a target among them is a miss."""
        for e in gone:
            self.sent.pop(e.pts, None)
            if e.state == TARGET:
                self.target_lost(e)
            e.lost = True

    def _came_out(self, frame: Any) -> None:
        self.sampler.stats.frames_decoded += 1
        e = self.sent.pop(frame.pts, None) if frame.pts is not None else None
        if e is None:
            if self.decode_errors:
                return  # error concealment after corrupt data
            raise PlanAbandoned(f"a decoded frame has pts {frame.pts}, which no sent packet had")
        if self.sampler._over_size(frame, e.t):
            raise _GuardStop
        if self.plan.state_of(e) != NOT_TARGET:
            self.outq.append((e, frame))
        if len(self.sent) > 512:  # frames come out in time order: what is older than this one never will
            self._forget([x for x in self.sent.values() if x.t < e.t])


@dataclass
class _Held:
    """The frame loop's latest decoded frame before the pending request (``frame`` None once emitted)."""

    frame: Any
    t: float
    dur: float
    emitted: bool


class _FrameLoop:
    """Demux -> decode -> time -> select, frame by frame (codecs without the plan, keyframes mode, no pts).

    fps mode takes the nearest frame per request as frames come out, skips non-reference frames while the
    next request is far, and seeks through the index when the keyframe before the next request is ahead,
    checking where the seek landed.
    """

    def __init__(self, sampler: VideoSampler, container: Any, stream: Any, packets: Iterable,
                 suppress_until: float, start_s: float = 0.0):
        dec = sampler.decode
        self.sampler = sampler
        self.stats = sampler.stats
        self.container = container
        self.stream = stream
        self.cc = stream.codec_context
        self.tb = float(stream.time_base) if stream.time_base else 0.0
        self.keyframes = dec.mode == "keyframes"
        self.fps = dec.target_fps
        self.period = 1.0 / dec.target_fps
        self.suppress_until = suppress_until
        self.reader = _PacketReader(sampler, packets)
        self.index = _KeyIndex(stream)
        # frames between a packet entering the decoder and its picture coming out: reordering plus one
        # per frame thread; skipping stops this many frames (and more) before the next request
        threads = dec.threads if dec.threads > 0 else (os.cpu_count() or 8)
        self.nonref_margin_frames = _NONREF_MARGIN_FRAMES + (threads if threads > 1 else 0)
        # timing
        self.origin_ts: int | None = stream.start_time  # None: the first frame's pts is the origin
        self.no_pts: bool | None = None  # decided at the first packet with data
        self.epoch = 0  # bumped by every seek: frames decoded before it are dropped
        self.last_t = -math.inf  # time and duration of the last decoded frame
        self.last_dur = 0.0
        self.key_times: list[float] = []  # the last two keyframe times seen (GOP estimate without an index)
        # selection
        self.k = 0  # index of the next request; its time is t_req = k * period
        self.t_req = 0.0
        self.cand: _Held | None = None
        self.last_emitted_t = -math.inf
        self.skipping = False  # skip_frame is NONREF
        self.landing_limit: float | None = None  # after a seek: the first frame must not be later than this
        self.resume_ts: int | None = None  # where to go back to when a seek lands too late
        self.can_seek = not self.keyframes and sampler.can_seek
        self.seeked_for = math.nan  # the request the last seek aimed at (one seek per request)
        if start_s > 0 and not self.keyframes:  # resume: one request before start_s (its frame is suppressed)
            self.k = max(0, int(math.floor(start_s * self.fps)) - 1)
            self.t_req = self.k * self.period

    def run(self) -> Iterator[tuple[float, Any]]:
        st = self.stats
        for frame in self._decoded():
            st.frames_decoded += 1
            t, dur = self._time_of(frame)
            if self.sampler._over_size(frame, t) or self.sampler._over_duration(t):
                break
            st.decoded_end_s = max(st.decoded_end_s, t + dur)
            if frame.key_frame and (not self.key_times or t > self.key_times[-1]):
                self.key_times.append(t)
                del self.key_times[:-2]
            if self.landing_limit is not None:
                limit, self.landing_limit = self.landing_limit, None
                if t > limit + 0.5 * (dur or self._frame_period()) and self.resume_ts is not None:
                    st.notes.append(f"a seek landed at {t:.3f} s, past {limit:.3f} s: decoding straight through")
                    self.can_seek = False
                    if not self._seek(self.resume_ts):
                        self.sampler._stopped(
                            ERR_DECODE, f"cannot seek back to {self.last_emitted_t:.2f} s after a bad seek")
                        break
                    continue
            if t <= self.last_emitted_t:
                continue  # already covered (after a seek back, or pts going backwards)
            if self.keyframes:
                if frame.key_frame and (self.last_emitted_t == -math.inf
                                        or t - self.last_emitted_t >= self.period * (1 - 1e-6)):
                    self.last_emitted_t = t
                    if t > self.suppress_until:
                        yield t, frame
                continue
            yield from self._take_nearest(t, frame, dur)
            if not self._seek_ahead(t) and not self.no_pts:
                # skip non-reference frames while the next request is far away
                far = self.t_req - t > max(_NONREF_MARGIN_S, self.nonref_margin_frames * self._frame_period())
                if far != self.skipping:
                    self.cc.skip_frame, self.skipping = ("NONREF" if far else "DEFAULT"), far
        # end of stream: the last candidate counts if the pending request falls inside its display time
        cand = self.cand
        if not self.keyframes and cand is not None and not cand.emitted and cand.frame is not None:
            if self.t_req < cand.t + (cand.dur or self._frame_period()) - 1e-6 and cand.t > self.suppress_until:
                yield cand.t, cand.frame
        if self.skipping:
            self.cc.skip_frame = "DEFAULT"

    def _take_nearest(self, t: float, frame: Any, dur: float) -> Iterator[tuple[float, Any]]:
        """fps mode: each request ``t_req`` <= ``t`` takes the nearest of (candidate, this frame); ties go to
        the candidate. The frame becomes the candidate of the next request unless it was emitted."""
        emitted_now = False
        while t >= self.t_req:
            cand = self.cand
            if cand is not None and (self.t_req - cand.t) <= (t - self.t_req) + TIE_S:
                if not cand.emitted:
                    self.last_emitted_t = cand.t
                    if cand.t > self.suppress_until:
                        yield cand.t, cand.frame
                    cand = self.cand = _Held(None, cand.t, cand.dur, True)
                # every request up to the midpoint between cand and this frame is nearest to cand
                self.k = max(self.k + 1, int(math.floor(0.5 * (cand.t + t) * self.fps)) + 1)
                self.t_req = self.k * self.period
            else:
                self.last_emitted_t = t
                if t > self.suppress_until:
                    yield t, frame
                emitted_now = True
                self.k = max(self.k + 1, int(math.floor(t * self.fps)) + 1)
                while self.k * self.period <= t:
                    self.k += 1
                self.t_req = self.k * self.period
        self.cand = _Held(None if emitted_now else frame, t, dur, emitted_now)

    def _seek_ahead(self, t: float) -> bool:
        """Seek when the keyframe before the next request lies ahead of the decoder; True if it did."""
        t_req = self.t_req
        if not (self.can_seek and t_req != self.seeked_for and t_req - t > _SEEK_MIN_FRAMES * self._frame_period()):
            return False
        ts = self._want_seek(t, t_req)
        if ts is None:
            return False
        self.seeked_for = t_req
        self.resume_ts = (self.origin_ts or 0) + int(math.floor(t / self.tb))  # known once _want_seek answers
        if self.skipping:
            self.cc.skip_frame, self.skipping = "DEFAULT", False
        if self._seek(ts):
            self.stats.seeks += 1
            self.landing_limit = t_req
            return True
        self.can_seek = False  # this input cannot seek: decode straight through
        return False

    def _decoded(self) -> Iterator[Any]:
        """Decoded frames; demux and decode errors are recorded, then what the decoder holds is flushed."""
        errors = _ErrorRun()
        packets = iter(self.reader)
        while True:
            packet = next(packets, None)
            if packet is None and not self.reader.failed:
                return
            if packet is not None and not self._admit(packet):
                continue  # keyframes mode: other packets never reach the decoder
            try:
                frames = packet.decode() if packet is not None else self.cc.decode(None)
                errors.clear()
            except Exception as exc:  # noqa: BLE001 - corrupt data: FFmpeg resyncs at the next keyframe
                self.sampler._decode_failed(max(self.last_t, 0.0), exc)
                give_up = errors.failed()
                if packet is not None and not give_up:
                    continue
                try:
                    frames = self.cc.decode(None)  # give up: flush what the decoder holds
                except Exception:  # noqa: BLE001
                    return
                packet = None
            epoch = self.epoch
            for frame in frames:
                if self.epoch != epoch:
                    break  # a seek happened while this packet's frames were being used
                yield frame
            if packet is None:
                return

    def _admit(self, packet: Any) -> bool:
        """Note a demuxed packet (pts or not, keyframe shift, demuxed end); False: it is not decoded."""
        if not packet.size:
            return True  # PyAV's flush packet at the end
        st = self.stats
        if self.no_pts is None:
            self.no_pts = packet.pts is None
            if self.no_pts:
                st.synthesized_pts = True
                st.notes.append("stream has no pts: times are the running sum of frame durations; "
                                "every frame is decoded")
            elif self.keyframes:
                self.cc.skip_frame = "NONKEY"
        if packet.pts is not None:
            self.index.note(packet)
            if self.origin_ts is not None and self.tb > 0:
                pend = (packet.pts - self.origin_ts + (packet.duration or 0)) * self.tb
                st.decoded_end_s = max(st.decoded_end_s, pend)
        return not (self.keyframes and not self.no_pts and not packet.is_keyframe)

    def _time_of(self, frame: Any) -> tuple[float, float]:
        """(t, duration) of a decoded frame in seconds from the stream's start."""
        ftb = float(frame.time_base) if frame.time_base else self.tb
        dur = (frame.duration or 0) * ftb
        if frame.pts is not None and not self.no_pts:
            if self.origin_ts is None:
                self.origin_ts = frame.pts
            t = (frame.pts - self.origin_ts) * ftb
        else:
            t = 0.0 if self.last_t == -math.inf else self.last_t + (self.last_dur or dur)
        if dur <= 0:
            last_t = self.last_t
            dur = self.last_dur if self.last_dur > 0 else (t - last_t if -math.inf < last_t < t else 0.0)
        self.last_t, self.last_dur = t, dur
        return t, dur

    def _frame_period(self) -> float:
        return self.last_dur if self.last_dur > 0 else 1.0 / 30.0

    def _want_seek(self, t_now: float, target: float) -> int | None:
        """Stream timestamp (pts) to seek to for ``target`` when that skips decoding, else None."""
        origin, tb = self.origin_ts, self.tb
        if origin is None or tb <= 0 or self.no_pts:
            return None
        if self.index.usable():
            kf_ts = self.index.keyframe_at_or_before(origin + int(math.floor(target / tb)))
            if kf_ts is not None and (kf_ts - origin) * tb - t_now > _SEEK_MIN_FRAMES * self._frame_period():
                return kf_ts
            return None
        if len(self.key_times) >= 2:
            # no index: demuxers such as mpegts land on the first keyframe *after* the target, so aim one
            # observed GOP early; the landing check catches irregular GOPs
            gop = self.key_times[-1] - self.key_times[-2]
            if gop > 0 and target - t_now > _SEEK_GOPS_NO_INDEX * gop:
                return origin + int(math.floor((target - gop) / tb))
        return None

    def _seek(self, ts: int) -> bool:
        """Seek the demuxer to the keyframe at or before stream timestamp ``ts``; drop frames in flight."""
        try:
            self.container.seek(ts, stream=self.stream, backward=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a non-seekable input
            self.stats.notes.append(f"seeking failed ({type(exc).__name__}: {exc})")
            return False
        self.epoch += 1
        return True


# ------------------------------------------------------------------------------------------- chunks


@dataclass
class ChunkEvent:
    """One chunk of sampled frames of a video, as plain values (the child sends these over its pipe).

    ``frames`` uint8 (T, H, W, 3), ``pts_s`` float64 (T,); ``first_index`` is the video-wide index of
    the first frame; ``chunk_end_s`` is the next sample's pts (or the decoded end on the last chunk).
    ``info``: ``rotation_deg`` / ``declared_duration_s`` as decoding used them (None when the video
    could not be opened), and on the last chunk ``error_type``, ``error``, ``frames_sampled`` (and the audio
    track's counters, ``audio_*``, when audio was decoded). ``audio`` float32 (N,) 16 kHz mono and ``audio_spans``
    float64 (k, 2) ``(start_s, n_samples)``: the audio taken at this chunk (``_audio.AudioTrack.take``).
    """

    frames: np.ndarray
    pts_s: np.ndarray
    first_index: int
    chunk_end_s: float
    last: bool
    info: dict
    audio: np.ndarray = field(default_factory=lambda: empty_audio()[0])
    audio_spans: np.ndarray = field(default_factory=lambda: empty_audio()[1])


class _ChunkBuffer:
    """The sampled frames of the chunk being filled: one uint8 (n, H, W, 3) buffer, handed over when full."""

    def __init__(self, chunk_frames: int, frame_size: tuple[int, int]):
        self.n = chunk_frames
        self.h, self.w = frame_size
        self.buf: np.ndarray | None = None
        self.pts: list[float] = []
        self.sampled = 0  # frames sampled in the whole video

    def add(self, t: float, rgb: np.ndarray, info: Callable[[], dict]) -> ChunkEvent | None:
        """Hold one frame; returns the previous chunk when this frame starts a new one (its end is ``t``)."""
        ev = None
        if len(self.pts) == self.n:
            assert self.buf is not None  # n frames are held in it
            ev = ChunkEvent(self.buf, np.asarray(self.pts, dtype=np.float64), self.sampled - self.n, t, False, info())
            self.buf, self.pts = None, []
        if self.buf is None:
            self.buf = np.empty((self.n, self.h, self.w, 3), dtype=np.uint8)
        self.buf[len(self.pts)] = rgb
        self.pts.append(t)
        self.sampled += 1
        return ev

    def audio_only(self, end_s: float, info: dict) -> ChunkEvent:
        """A chunk of audio only (no frame held), ending at ``end_s``."""
        frames = np.zeros((0, self.h, self.w, 3), dtype=np.uint8)
        return ChunkEvent(frames, np.zeros(0, dtype=np.float64), self.sampled, end_s, False, info)

    def last(self, end_s: float, info: dict) -> ChunkEvent:
        """The video's last chunk: what is held (maybe nothing), ending at ``end_s``."""
        if not self.pts or self.buf is None:
            frames = np.zeros((0, self.h, self.w, 3), dtype=np.uint8)
        else:
            frames = self.buf[: len(self.pts)].copy() if len(self.pts) < self.n else self.buf
        pts = np.asarray(self.pts, dtype=np.float64)
        return ChunkEvent(frames, pts, self.sampled - len(self.pts), end_s, True, info)


def _failure(exc: BaseException, opened: bool) -> VideoDecodeError:
    """The error class of an exception that ended a video: an opening error until decoding started."""
    if isinstance(exc, VideoDecodeError):
        return exc
    if not opened:
        return open_error(exc)
    return VideoDecodeError(ERR_INTERNAL, f"{type(exc).__name__}: {exc}")


def sample_chunks(
    source: tuple,
    decode,
    guards,
    frame_size: tuple[int, int],
    *,
    rotation_deg: int = 0,
    declared_duration_s: float = math.nan,
    size_bytes: int | None = None,
    progress: Callable[[], None] | None = None,
    opener: Callable[[tuple, int | None], Any] = open_source,
    start_s: float = 0.0,
    first_index: int = 0,
    audio=None,
) -> Iterator[ChunkEvent]:
    """Decode one video into chunks of ``decode.chunk_frames`` frames; never raises for a bad video.

    A chunk is held until the first frame of the next one is sampled, so its ``chunk_end_s`` is the
    next sample's pts and the last chunk carries the outcome; at most ``chunk_frames + 1`` frames are
    in memory. The last event has ``last=True`` and may hold zero frames (nothing sampled). A resumed video
    (``start_s`` > 0) sends only frames from ``start_s`` on, numbered from ``first_index``.

    ``audio`` (``AudioSettings``): each chunk also carries the audio decoded up to about its end (a quiet place
    at most ``_audio.CUT_SEARCH_S`` before it); a file with audio only becomes chunks of ``audio_chunk_s`` seconds
    of audio and no frames, and is ``ok`` when its audio decodes.
    """
    # Long: one video from opening to its last chunk; every way it can end (an exception, audio only, nothing
    # decoded, a normal end) yields the last chunk with that outcome, so the endings stay side by side.
    chunks = _ChunkBuffer(decode.chunk_frames, frame_size)
    chunks.sampled = int(first_index)
    sampler = None
    fileobj = None

    def info(**more) -> dict:
        st = sampler.stats if sampler is not None else None
        return {
            "rotation_deg": st.rotation_deg if st is not None else None,
            "declared_duration_s": st.declared_duration_s if st is not None else None,
            **more,
        }

    def with_audio(ev: ChunkEvent, until_s: float | None) -> ChunkEvent:
        track = sampler.audio if sampler is not None else None
        if track is not None and track.active:
            ev.audio, ev.audio_spans = track.take(until_s)
            if until_s is None or ev.last:
                ev.info.update(track.stats(), audio_streams=sampler.audio_streams)
        return ev

    try:
        fileobj = opener(source, size_bytes)
        sampler = VideoSampler(
            fileobj, decode, frame_size, rotation_deg, guards=guards,
            declared_duration_s=declared_duration_s, progress=progress, size_bytes=size_bytes, start_s=start_s,
            audio=audio,
        )
        for t, rgb in sampler:
            if rgb is None:  # audio only: cut a chunk of audio
                tick = with_audio(chunks.audio_only(t, info()), t)
                if len(tick.audio_spans):
                    tick.chunk_end_s = float(tick.audio_spans[-1, 0] + tick.audio_spans[-1, 1] / SAMPLE_RATE)
                yield tick
                continue
            ev = chunks.add(t, rgb, info)
            if ev is not None:
                yield with_audio(ev, ev.chunk_end_s)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the video's outcome
        err = _failure(exc, opened=sampler is not None and sampler._used)
        decoded_end = sampler.stats.decoded_end_s if sampler is not None else 0.0
        end = max(chunks.pts[-1], decoded_end) if chunks.pts else 0.0
        yield with_audio(chunks.last(end, info(error_type=err.error_type, error=err.message,
                                               frames_sampled=chunks.sampled)), None)
        return
    finally:
        if fileobj is not None:
            try:
                fileobj.close()
            except Exception:  # noqa: BLE001
                pass

    st = sampler.stats
    if sampler.audio_only:
        end = max(st.decoded_end_s, float(start_s))
        yield with_audio(chunks.last(end, info(error_type=st.error_type, error=st.error, frames_sampled=0,
                                               audio_only=True)), None)
        return
    if not chunks.pts and chunks.sampled == 0:
        yield chunks.last(0.0, info(
            error_type=st.error_type or ERR_NO_FRAMES,
            error=st.error or f"the container opened but no frame was decoded ({st.packets} packets read)",
            frames_sampled=0))
        return
    end = max(st.decoded_end_s, chunks.pts[-1] if chunks.pts else float(start_s))
    yield with_audio(chunks.last(end, info(error_type=st.error_type, error=st.error, frames_sampled=chunks.sampled)),
                     None)


# ------------------------------------------------------------------------------------------- helpers


def _declared_duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000.0  # AV_TIME_BASE
    return math.nan


def _frame_rotation_cw(frame) -> int:
    """Clockwise display rotation (0/90/180/270) of a decoded frame's display matrix."""
    try:
        ccw = frame.rotation  # counter-clockwise degrees in [-180, 180]
    except Exception:  # noqa: BLE001 - no display matrix
        return 0
    return int(round(-float(ccw or 0) / 90.0)) % 4 * 90


# ------------------------------------------------------------------------------------------- the child process


@dataclass(frozen=True)
class _Fault:
    kind: str  # "hang" | "crash"
    after_frames: int
    substring: str


def _parse_faults(spec: str) -> list[_Fault]:
    """``RAY_VLM_DECODE_FAULT`` -> faults; entries ``kind[@N]:substring``, comma-separated."""
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        head, _, substring = item.partition(":")
        kind, _, after = head.partition("@")
        if kind in ("hang", "crash") and substring:
            faults.append(_Fault(kind, int(after or 0), substring))
    return faults


def _fire(fault: _Fault) -> None:
    if fault.kind == "hang":
        while True:
            time.sleep(3600)
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the simulated segfault
    os.kill(os.getpid(), signal.SIGSEGV)


def _exit_with_parent(ppid: int) -> None:
    """Exit when the parent process is gone, even while a decode hangs (a watcher thread; FFmpeg calls
    release the GIL). The closed socket already ends an idle child."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(0)

    threading.Thread(target=watch, name="ray-vlm-decode-parent-watch", daemon=True).start()


def child_main(fd: int) -> None:
    """Entry point of the decoder process: decode the videos the parent sends, stream chunks back.

    Protocol (``multiprocessing.connection.Connection`` on socket ``fd``), parent -> child: a ``ChildInit``,
    then a ``DecodeJob`` per video, and None to stop. Child -> parent: ``("ready", pid)``; per chunk
    ``("ev", job_id, pts_s, first_index, chunk_end_s, last, info, nbytes, audio_spans, audio_nbytes)`` followed by
    ``nbytes`` raw frame bytes (uint8 (T, H, W, 3), C order: no pickling of arrays), then ``audio_nbytes`` raw
    audio bytes (float32 (N,)) when there are any; ``("alive",)`` heartbeats at most
    every ``min(1, stall_timeout_s / 4)`` seconds while packets are demuxed.
    """
    from multiprocessing.connection import Connection

    _exit_with_parent(os.getppid())
    import av  # imported before "ready", while the parent is still being set up
    import av.video.reformatter  # noqa: F401

    conn = Connection(fd)
    try:
        init: ChildInit = conn.recv()
        decode, guards = init.decode, init.guards
        frame_size = (int(init.frame_size[0]), int(init.frame_size[1]))
        faults = _parse_faults(os.environ.get(FAULT_ENV, ""))
        interval_s = min(1.0, decode.stall_timeout_s / 4.0)
        last_beat = time.monotonic()

        def heartbeat() -> None:
            nonlocal last_beat
            now = time.monotonic()
            if now - last_beat >= interval_s:
                conn.send(("alive",))
                last_beat = now

        conn.send(("ready", os.getpid()))
        while True:
            job: DecodeJob | None = conn.recv()
            if job is None:
                return
            fault = next((f for f in faults if f.substring in str(job.source[1])), None)
            if fault is not None and fault.after_frames <= 0:
                _fire(fault)
            sent = 0
            size = (int(job.frame_size[0]), int(job.frame_size[1])) if job.frame_size else frame_size
            for ev in sample_chunks(job.source, decode, guards, size, progress=heartbeat, audio=init.audio,
                                    **job.params()):
                frames = np.ascontiguousarray(ev.frames)
                audio = np.ascontiguousarray(ev.audio, dtype=np.float32)
                conn.send(("ev", job.job, ev.pts_s, ev.first_index, ev.chunk_end_s, ev.last, ev.info, frames.nbytes,
                           ev.audio_spans, audio.nbytes))
                if frames.nbytes:
                    conn.send_bytes(memoryview(frames).cast("B"))  # type: ignore[arg-type]  # ndarray is a buffer
                if audio.nbytes:
                    conn.send_bytes(memoryview(audio).cast("B"))  # type: ignore[arg-type]
                last_beat = time.monotonic()
                sent += len(ev.pts_s)
                if fault is not None and not ev.last and sent >= fault.after_frames:
                    _fire(fault)
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the parent went away


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
