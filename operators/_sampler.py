"""PyAV sampling core of the decode stage, and the decoder child process that runs it.

This module imports only the standard library, numpy and (lazily) PyAV, never ``ray_vlm.core.schema``
(pyarrow) or ``ray_vlm.core.config`` (pydantic): ``python -m ray_vlm.operators._sampler FD`` is the
decoder child of ``DecodeVideos(isolate=True)``, and it starts in about 0.15 s of CPU instead of 0.4 s.
Configs arrive as anything with the ``DecodeConfig`` / ``GuardConfig`` attributes (the pydantic
models in-process, ``SimpleNamespace`` of their ``model_dump()`` in the child). ``operators/decode.py``
turns what this module yields into chunk rows; read its docstring for the operator's contract.

How frames are chosen (``VideoSampler``), all times from pts (``(pts - stream.start_time) *
time_base``, never from the average rate):

- ``mode="fps"``: requests at ``t_k = k / target_fps``; each request takes the frame whose pts is
  *nearest* (ties go to the earlier frame; at most half a source frame period away on constant-rate
  video). A frame is never emitted twice: requests that would repeat a frame are dropped. Requests
  past the end of the last frame's display time are not made.

  For H.264, HEVC and VP9 the choice is made from *packet* timestamps, before anything is decoded
  (``_run_planned``): packets are demuxed up to 17 packets past a request (no codec reorders more
  than 16 frames, so no later packet can be nearer), the nearest packet becomes the request's
  *target*, and then the decoder gets exactly what the targets need: every packet from the target's
  keyframe (the last keyframe before it in decode order that is not displayed after it) up to the
  target in decode order, with ``skip_frame="NONREF"`` for every packet that is not a target, so
  only reference frames and targets are decoded. Packets after the last target of a GOP are never
  sent: the decoder is drained and flushed and starts again at the next needed keyframe. When the
  container's index (mp4/mov, matroska cues) shows the next needed keyframe more than half a second
  ahead, the demuxer seeks there instead of reading through. A decoded frame whose pts is not a sent
  packet's, or a target that never comes out (without a decode error), makes the sampler start the
  video again with the frame-by-frame loop below, skipping what it already yielded.

  Measured on 60 s of 1080p H.264 (25 fps, 2 s GOP, B-pyramid, one core): decoding every frame
  7.2-7.6 s CPU; the previous frame-by-frame loop with NONREF skipping and seeking 3.5-3.8 s
  (572 frames decoded); the packet plan 2.7-2.9 s (466 frames: the keyframe and the reference chain
  up to each target, which is the least any exact decoder can do). Pixels are identical to a full
  decode (tests compare them).

  Opt-in ``sample_tolerance_frames`` (e.g. 1.0): a request takes, among the packets within that many
  frame periods of it, the one whose decoding starts at the latest keyframe and then the earliest in
  decode order, instead of the nearest: on the same clip 388 frames decoded instead of 466 (-12 % CPU);
  samples are then up to one frame period (40 ms at 25 fps) off their request.

  Other codecs (and streams without pts) use the frame-by-frame loop (``_run_frames``): decode in
  order, pick the nearest frame as frames come out, skip non-reference frames while the next
  request is far (``_NONREF_MARGIN_FRAMES`` frames and 0.5 s), and seek through the index when
  the keyframe before the next request is ahead, checking where the seek landed.
- ``mode="keyframes"``: only keyframe packets reach the decoder (which also runs with
  ``skip_frame="NONKEY"``; VP9 ignores that flag, hence the packet filter); one sample per keyframe,
  thinned so samples are at least ``1 / target_fps`` apart. Coverage for the truncation check comes
  from the demuxed packets, which are all read (demuxing a 60 s 1080p mp4 costs 0.03 s of CPU against
  0.6 s for decoding its 30 keyframes). Opt-in: ``keyframes_skip_loop_filter`` (see the constant).

A stream without pts (raw Annex-B H.264) gets times from the previous frame's time plus its duration
(``stats.synthesized_pts``) and is decoded frame by frame, since a skipped frame would shift every
later time.

Pictures: converted to RGB and resized (squashed, not cropped) in FFmpeg's scaler, by default with area
averaging and the BITEXACT | ACCURATE_RND flags: the same pixels on every CPU, at the cost of
FAST_BILINEAR (see ``SCALER_FLAGS``). Display rotation (clockwise; given, or read from the first frame's
display matrix when 0) is applied with ``np.rot90`` after the scaler, whose output size is swapped for
90/270 so the *rotated* picture has ``frame_size``.

Truncation: the decoded end (last frame's or demuxed packet's pts + duration) below
``truncation_tolerance`` x the declared duration is ``truncated`` ("decoded 1.0 s of declared
4.0 s"); an MPEG-TS file whose size is not a whole number of TS packets was cut mid-packet (TS
declares no duration, so this is the only sign of a cut).

The child process (``child_main``): reads jobs from a ``multiprocessing.connection.Connection`` on
the socket fd given as its argument and answers with ``("ev", ...)`` headers, each followed by the
chunk's frames as one raw uint8 buffer (no pickling of arrays), and ``("alive",)`` heartbeats at
most every ``min(1, stall_timeout_s / 4)`` seconds while packets are demuxed. Local files are opened
with ``open()`` (the parent already applied the URL policy); other URIs go through
``ray_vlm.core.fs.open_input``, imported only then. Test hook: ``RAY_VLM_DECODE_FAULT`` holds
comma-separated ``kind[@N]:substring`` entries, kind ``hang`` (sleep forever) or ``crash``
(SIGSEGV), fired for a URI containing ``substring`` before decoding (N = 0) or once N sampled frames
were sent; it exists so tests can prove one bad video costs only itself.
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

# Error classes: the same strings as ``ray_vlm.core.schema.ERR_*`` (schema imports pyarrow, which the
# decoder child must not pay for); tests/operators/test_decode.py checks that they agree.
ERR_NOT_FOUND = "not_found"
ERR_POLICY = "policy"
ERR_EMPTY = "empty"
ERR_NOT_VIDEO = "not_video"
ERR_NO_VIDEO_STREAM = "no_video_stream"
ERR_TOO_LARGE = "too_large"
ERR_TOO_LONG = "too_long"
ERR_DECODE = "decode_error"
ERR_NO_FRAMES = "no_frames"
ERR_TRUNCATED = "truncated"
ERR_INTERNAL = "internal_error"

FAULT_ENV = "RAY_VLM_DECODE_FAULT"
# The scaler (colour conversion + resize), by ``DecodeConfig.scaler``. "exact" (default): area averaging with
# FFmpeg's BITEXACT | ACCURATE_RND flags, the same pixels on every CPU (checked in the tests against the
# scaler with all of FFmpeg's SIMD switched off), and the same cost as FAST_BILINEAR (1080p -> 224 x 224:
# 0.97 vs 0.95 ms). "fast": FAST_BILINEAR, the scaler of stores made before this knob; its SIMD paths differ
# from its C path by up to 200 levels, so its pixels depend on the CPU.
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
# period", boundary included up to float rounding), and takes the one that is cheapest to decode: the one
# whose decoding starts at the latest keyframe, then the earliest in decode order (which needs no more
# reference frames than any other). 0 (the default): the nearest frame. Measured on 60 s of 1080p H.264
# (25 fps, 2 s GOP, B-pyramid): 388 instead of 466 frames decoded, 2.75 instead of 3.15 s CPU.
SAMPLE_TOLERANCE_FRAMES = "sample_tolerance_frames"
# Opt-in knob (a ``DecodeConfig`` attribute, read with getattr; False when absent): keyframes mode decodes
# keyframes without FFmpeg's in-loop deblocking filter (``skip_loop_filter=all``). Keyframes are intra
# frames and no emitted frame refers to another, so nothing drifts: each sample is the keyframe minus
# deblocking, about 10 % less CPU on 1080p H.264 (0.60 vs 0.67 s for 30 keyframes) for a mean absolute
# difference of at most 0.7 / 255 per frame at 224 x 224 (FAST_BILINEAR), 0.8 / 255 at full size.
KEYFRAMES_SKIP_LOOP_FILTER = "keyframes_skip_loop_filter"

# Codecs whose decoded frames carry their packet's pts and whose NONREF skipping drops only frames
# nothing refers to (checked pixel for pixel against full decodes in the tests): these get the packet plan.
_PLANNED_CODECS = frozenset({"h264", "hevc", "vp9"})
# No H.264/HEVC stream reorders more than 16 frames (DPB size); VP9 does not reorder. Once 17 packets
# at or past ``request + distance`` were demuxed, no later packet can be nearer to the request.
_MAX_REORDER = 16
# The plan holds at most this many bytes of demuxed packets before it starts feeding the decoder.
_MAX_HELD_BYTES = 64 * 2**20
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
# Two distances to a request closer than this are a tie (which goes to the earlier frame): times are
# float seconds, and a frame exactly halfway between two others must not go either way by rounding.
_TIE_S = 1e-9
# Decode errors in a row after which the rest of a video is given up (FFmpeg usually resyncs at the
# next keyframe; a truncated file errors once at its end).
_MAX_ERRORS_IN_ROW = 16


class VideoDecodeError(Exception):
    """One video cannot be decoded; ``error_type`` is one of the ``ERR_*`` classes."""

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


class _Fallback(Exception):
    """The packet plan cannot go on for this stream; decode frame by frame instead."""

    def __init__(self, reason: str, replay: list | None = None):
        super().__init__(reason)
        self.reason = reason
        self.replay = replay  # packets demuxed but never sent (only when nothing was decoded yet)


# ------------------------------------------------------------------------------------------- opening


def open_error(exc: BaseException) -> VideoDecodeError:
    """Map an exception raised while opening a video to an error class."""
    import av  # imported before "ready", while the parent is still being set up

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


class _Entry:
    """One demuxed packet in the plan: ``state`` 0 undecided, 1 not a target, 2 target."""

    __slots__ = ("packet", "pts", "t", "key", "state", "size", "lost", "seq", "kf")

    def __init__(self, packet, pts: int, t: float, key: bool, seq: int = 0, kf: int = -1):
        self.packet = packet
        self.pts = pts
        self.t = t
        self.key = key
        self.seq = seq  # demux (= decode) order
        self.kf = kf  # seq of the keyframe its decoding starts at (-1: none seen)
        self.state = 0
        self.size = packet.size
        self.lost = False  # sent in full while undecided, and its frame never came out


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
    ):
        self.source = source
        self.decode = decode
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.rotation_deg = int(rotation_deg) % 360
        self.guards = guards
        self.progress = progress
        self.size_bytes = size_bytes
        self.stats = DecodeStats(declared_duration_s=_as_float(declared_duration_s))
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
        except Exception as exc:  # noqa: BLE001 - mapped to an error class
            raise open_error(exc) from exc

    def _check_container(self, container) -> Any:
        st = self.stats
        st.container = container.format.name
        if self.guards is not None and st.container not in self.guards.allowed_containers:
            raise VideoDecodeError(ERR_POLICY, f"container {st.container!r} is not in guards.allowed_containers")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoDecodeError(ERR_NO_VIDEO_STREAM, f"no video stream (streams: {kinds or 'none'})")
        stream = container.streams.video[0]
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
        if g is not None and math.isfinite(st.declared_duration_s) and st.declared_duration_s > g.max_duration_s:
            raise VideoDecodeError(
                ERR_TOO_LONG, f"declares {st.declared_duration_s:.1f} s, over the guard of {g.max_duration_s:.0f} s"
            )
        return stream

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        from av.video.reformatter import VideoReformatter

        if self._used:
            raise RuntimeError("a VideoSampler can be iterated only once")
        self._used = True
        container = self._open_container()
        try:
            stream = self._check_container(container)
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
                rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation=interp).to_ndarray()
                if rotation:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90)))  # k > 0 turns counter-clockwise
                st.frames_sampled += 1
                yield t, rgb
            self._check_truncation()
        finally:
            container.close()

    def _frames(self, container, stream) -> Iterator[tuple[float, Any]]:
        """Sampled ``(t, av.VideoFrame)`` in time order: the packet plan where it applies, else frame by frame."""
        st = self.stats
        planned = (
            self.decode.mode == "fps"
            and st.codec in _PLANNED_CODECS
            and stream.start_time is not None
            and bool(stream.time_base)
        )
        if not planned:
            yield from self._run_frames(container, stream, container.demux(stream))
            return
        st.planned = True
        demux = container.demux(stream)
        last_t = [-math.inf]
        try:
            for t, frame in self._run_planned(container, stream, demux):
                last_t[0] = t
                yield t, frame
            return
        except _Fallback as fb:
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
                packets = container.demux(stream)
        yield from self._run_frames(container, stream, packets, suppress_until=last_t[0])

    # -------------------------------------------------------------- the packet plan (fps mode)

    def _run_planned(self, container, stream, demux: Iterator) -> Iterator[tuple[float, Any]]:
        """Choose targets from packet pts, then decode only their keyframes and reference chains.

        Invariants: requests are decided in order; a decided target is sent at once, together with every
        held packet before it (from its keyframe on); packets are dropped only when no pending request
        can need them, and only whole runs before a keyframe, so the decoder always restarts at one.
        """
        from bisect import bisect_left, bisect_right, insort

        st = self.stats
        dec = self.decode
        cc = stream.codec_context
        tb = float(stream.time_base)
        origin = int(stream.start_time)
        period = 1.0 / dec.target_fps
        max_t = self.guards.max_duration_s if self.guards is not None else math.inf
        max_px = self.guards.max_pixels if self.guards is not None else None
        tol_frames = max(0.0, float(getattr(dec, SAMPLE_TOLERANCE_FRAMES, 0.0) or 0.0))
        tol_s = [0.0]  # tol_frames x the source frame period (packet durations), once one is known
        recent_keys: deque[tuple[int, float]] = deque(maxlen=4)  # (seq, t) of the last keyframe packets

        win: deque[_Entry] = deque()  # demuxed, not yet sent to the decoder (decode order)
        held = [0]  # bytes of the packets in win
        cand_ts: list[float] = []  # sorted times of packets that may still be a request's nearest
        cand_at: dict[float, _Entry] = {}
        sent: dict[int, _Entry] = {}  # pts -> sent packet whose frame has not come out yet
        outq: deque = deque()  # decoded (entry, frame) waiting for the entry to be decided, display order
        ready: deque = deque()  # (t, frame) to yield, in time order
        s = dict(  # mutable state shared with the helpers below
            k=0, r=0.0, best=None, low=-math.inf, n_past=0, done=False, last_target_t=-math.inf,
            yielded_t=-math.inf, fresh=True, gap=False, skip="DEFAULT", errors_in_row=0, gave_up=False,
            decode_errors=False, touched=False,
        )

        def entry_state(e: _Entry) -> int:
            """2 target, 1 not a target (for good), 0 undecided."""
            if e.state:
                return e.state
            if s["done"] or e.t <= s["last_target_t"] or e.t < s["low"]:
                return 1
            return 0

        def rescan() -> None:
            """Best candidate of the pending request r, the lowest time a target can still have, and
            how many packets lie at or past r + |best - r| (none of them can be nearer)."""
            r = s["r"]
            i = bisect_left(cand_ts, r)
            best_t = None
            if i < len(cand_ts):
                best_t = cand_ts[i]
            if i > 0 and (best_t is None or r - cand_ts[i - 1] <= best_t - r + _TIE_S):  # ties: the earlier
                best_t = cand_ts[i - 1]
            if best_t is None:
                s["best"], s["low"], s["n_past"] = None, s["last_target_t"], 0
                return
            d = abs(best_t - r)
            tol = tol_s[0]
            if tol > 0 and d <= tol + _TIE_S:
                # any frame within the tolerance will do: the one whose decoding starts at the latest
                # keyframe, then the earliest in decode order (it needs the fewest reference frames)
                lo = bisect_left(cand_ts, r - tol - _TIE_S)
                hi = bisect_right(cand_ts, r + tol + _TIE_S)
                s["best"] = min((cand_at[t] for t in cand_ts[lo:hi]), key=lambda e: (-e.kf, e.seq))
                s["low"] = r - tol - _TIE_S
                s["n_past"] = len(cand_ts) - bisect_left(cand_ts, r + tol - _TIE_S)
                return
            s["best"], s["low"] = cand_at[best_t], r - d - _TIE_S
            s["n_past"] = len(cand_ts) - bisect_left(cand_ts, r + d - _TIE_S)

        def decide(eof: bool, end_s: float = math.inf) -> None:
            """Fix the target of every request that no later packet can change."""
            while not s["done"] and s["best"] is not None:
                if eof:
                    if not s["r"] < end_s - 1e-6:
                        break
                elif s["n_past"] <= _MAX_REORDER:
                    return
                best = s["best"]
                if best.t > s["last_target_t"]:  # else the request repeats the last target: dropped
                    if best.lost and not s["decode_errors"]:
                        raise _Fallback(f"the frame at {best.t:.3f} s did not come out of the decoder")
                    best.state = 2
                    s["last_target_t"] = best.t
                    i = bisect_left(cand_ts, best.t)
                    for t in cand_ts[:i]:
                        del cand_at[t]
                    del cand_ts[:i]
                    send_through(best)
                s["k"] += 1
                s["r"] = s["k"] * period
                rescan()
            if eof:
                s["done"] = True

        def drop(n: int) -> None:
            for _ in range(n):
                held[0] -= win.popleft().size
            s["gap"] = s["gap"] or not s["fresh"]

        def send_through(target: _Entry) -> None:
            """Send the packets the target needs; those before its keyframe go when nothing needs them."""
            if target.packet is None:
                return  # already sent (undecided then, so decoded in full)
            i = win.index(target)
            j = i
            while j >= 0 and not (win[j].key and win[j].t <= target.t):
                j -= 1
            if j > 0 and all(entry_state(win[m]) == 1 for m in range(j)):
                drop(j)
                i -= j
            for _ in range(i + 1):
                send(win.popleft())

        def send(e: _Entry) -> None:
            held[0] -= e.size
            packet, e.packet = e.packet, None
            if s["gave_up"]:
                return
            if s["gap"]:
                restart()
            want = "NONREF" if entry_state(e) == 1 else "DEFAULT"
            if want != s["skip"]:
                cc.skip_frame = s["skip"] = want
            sent[e.pts] = e
            s["fresh"] = False
            s["touched"] = True
            try:
                frames = cc.decode(packet)
                s["errors_in_row"] = 0
            except Exception as exc:  # noqa: BLE001 - corrupt data: FFmpeg resyncs at the next keyframe
                self._stopped(ERR_DECODE, f"decoding failed near {e.t:.2f} s: {type(exc).__name__}: {exc}")
                s["decode_errors"] = True
                s["errors_in_row"] += 1
                if s["errors_in_row"] >= _MAX_ERRORS_IN_ROW:
                    restart()
                    s["gave_up"] = True
                return
            for frame in frames:
                came_out(frame)

        def restart() -> None:
            """Drain the decoder (its delayed frames come out), then reset it for a new keyframe."""
            if not s["fresh"]:
                try:
                    frames = cc.decode(None)
                except Exception as exc:  # noqa: BLE001
                    self._stopped(ERR_DECODE, f"flushing the decoder failed: {type(exc).__name__}: {exc}")
                    s["decode_errors"] = True
                    frames = []
                for frame in frames:
                    came_out(frame)
                forget(list(sent.values()))
                cc.flush_buffers()
            s["fresh"], s["gap"] = True, False

        def forget(gone: list[_Entry]) -> None:
            """Sent packets whose frames will not come out: a target among them is a miss."""
            for e in gone:
                sent.pop(e.pts, None)
                if e.state == 2 and not s["decode_errors"]:
                    raise _Fallback(f"the frame at {e.t:.3f} s did not come out of the decoder")
                e.lost = True

        def came_out(frame) -> None:
            st.frames_decoded += 1
            e = sent.pop(frame.pts, None) if frame.pts is not None else None
            if e is None:
                if s["decode_errors"]:
                    return  # error concealment after corrupt data
                raise _Fallback(f"a decoded frame has pts {frame.pts}, which no sent packet had")
            if max_px is not None and frame.width * frame.height > max_px:
                self._stopped(ERR_TOO_LARGE, f"a frame at {e.t:.2f} s is {frame.width}x{frame.height}, over the guard")
                raise _GuardStop
            if entry_state(e) != 1:
                outq.append((e, frame))
            if len(sent) > 512:  # frames come out in time order: what is older than this one never will
                forget([x for x in sent.values() if x.t < e.t])

        def release() -> None:
            """Move decided frames from the head of ``outq`` to ``ready`` (targets) or away."""
            while outq:
                state = entry_state(outq[0][0])
                if state == 0:
                    return
                e, frame = outq.popleft()
                if state == 2:
                    if e.t <= s["yielded_t"]:
                        raise _Fallback(f"frames came out of order ({e.t:.3f} s after {s['yielded_t']:.3f} s)")
                    s["yielded_t"] = e.t
                    ready.append((e.t, frame))

        def index_keyframe(r: float) -> int | None:
            """Stream timestamp (pts) of the last indexed keyframe at or before time ``r``, if any."""
            try:  # the container's keyframe index (mp4/mov: complete; matroska: once cues are read)
                entries = stream.index_entries
                if len(entries) < 2:
                    return None
                i = entries.search_timestamp(origin + int(math.floor(r / tb)) - kf_shift, backward=True)
                return None if i < 0 else entries[i].timestamp + kf_shift
            except Exception:  # noqa: BLE001 - no index
                return None

        # ---- the loop: demux, plan, decode
        end_t = -math.inf  # largest packet time demuxed
        end_s = 0.0  # ... plus that frame's duration: requests at or past it are not made
        last_dur = 0.0
        kf_shift = 0  # pts - dts of keyframe packets (index entries carry dts)
        landing: tuple[float, float] | None = None  # after a seek: (demuxed end before it, keyframe time)
        seeked_for = math.nan
        try:
            while True:
                try:
                    packet = next(demux)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - demuxer error: keep what was decoded
                    self._stopped(ERR_DECODE, f"reading the container failed near {st.decoded_end_s:.2f} s: "
                                  f"{type(exc).__name__}: {exc}")
                    break
                st.packets += 1
                st.note_position(packet.pos)
                if self.progress is not None:
                    self.progress()
                if not packet.size:
                    continue
                if packet.pts is None:
                    if not s["touched"] and not st.seeks and len(win) + 1 == st.packets:
                        raise _Fallback("packets without pts", replay=[e.packet for e in win] + [packet])
                    raise _Fallback("a packet without pts")
                pts = packet.pts
                t = (pts - origin) * tb
                key = bool(packet.is_keyframe)
                if landing is not None:
                    before, expected = landing
                    if not key or not (before < t <= expected + 1e-9):
                        raise _Fallback(f"a seek landed at {t:.3f} s instead of {expected:.3f} s")
                    landing = None
                if key and packet.dts is not None:
                    kf_shift = max(kf_shift, pts - packet.dts)
                dur = (packet.duration or 0) * tb
                if dur > 0:
                    last_dur = dur
                    tol_s[0] = tol_frames * dur + 1e-6 if tol_frames > 0 else 0.0  # boundary included
                if t > end_t:
                    prev, end_t = end_t, t
                    end_s = t + (dur if dur > 0 else last_dur if last_dur > 0 else
                                 (t - prev if math.isfinite(prev) else 0.0))
                st.decoded_end_s = max(st.decoded_end_s, t + dur)
                if t > max_t:
                    self._stopped(ERR_TOO_LONG, f"still decoding at {t:.0f} s, over the guard of {max_t:.0f} s")
                    break
                if key:
                    recent_keys.append((st.packets, t))
                kf = next((q for q, kt in reversed(recent_keys) if kt <= t), -1)
                e = _Entry(packet, pts, t, key, st.packets, kf)
                win.append(e)
                held[0] += e.size
                # a packet the demuxer marks "discard" (before an edit list's start) is decoded, never shown
                if not s["done"] and t >= s["last_target_t"] and t not in cand_at and not packet.is_discard:
                    insort(cand_ts, t)
                    cand_at[t] = e
                    rescan()
                    if len(cand_ts) > 1024:  # sparse requests: forget packets no request can take
                        i = bisect_left(cand_ts, s["low"])
                        for x in cand_ts[:i]:
                            del cand_at[x]
                        del cand_ts[:i]
                decide(eof=False)
                if key and len(win) > 1 and (s["done"] or t <= s["low"]):
                    # a new GOP: the packets before it go when no pending request can need them
                    j = len(win) - 1
                    if all(entry_state(win[m]) == 1 for m in range(j)):
                        drop(j)
                while held[0] > _MAX_HELD_BYTES and win:
                    send(win.popleft())
                # sparse requests: seek through the index when the keyframe the next request needs is
                # well ahead; every packet demuxed so far is farther from that request than the keyframe
                if not s["done"] and s["r"] != seeked_for:
                    seeked_for = s["r"]
                    ts = index_keyframe(s["r"])
                    if ts is not None and (ts - origin) * tb - end_t > _SEEK_AHEAD_S:
                        restart()
                        try:
                            container.seek(ts, stream=stream, backward=True)
                        except Exception as exc:  # noqa: BLE001 - e.g. a non-seekable input
                            st.notes.append(f"seeking failed ({type(exc).__name__}: {exc})")
                        else:
                            st.seeks += 1
                            held[0] = 0
                            win.clear()
                            landing = (end_t, (ts - origin) * tb)
                release()
                while ready:
                    yield ready.popleft()
                if s["gave_up"]:
                    break
            decide(eof=True, end_s=end_s)
            win.clear()  # every target was sent when it was decided
            restart()
        except _GuardStop:  # a frame over the guard: decoding stops (recorded in stats)
            s["done"] = True
        finally:
            if s["skip"] != "DEFAULT":
                cc.skip_frame = "DEFAULT"
        release()
        while ready:
            yield ready.popleft()

    # -------------------------------------------------------------- frame by frame (other codecs, keyframes)

    def _run_frames(
        self, container, stream, packets: Iterable, suppress_until: float = -math.inf
    ) -> Iterator[tuple[float, Any]]:
        """Demux -> decode -> time -> select, frame by frame; yields ``(t, av.VideoFrame)``.

        Frames at or before ``suppress_until`` are chosen as usual but not yielded (a restart after the
        packet plan gave up).
        """
        st = self.stats
        dec = self.decode
        cc = stream.codec_context
        tb = float(stream.time_base) if stream.time_base else 0.0
        keyframes = dec.mode == "keyframes"
        period = 1.0 / dec.target_fps
        max_t = self.guards.max_duration_s if self.guards is not None else math.inf
        max_px = self.guards.max_pixels if self.guards is not None else None

        origin_ts = stream.start_time  # None: the first frame's pts is the origin
        kf_shift = 0  # pts - dts of keyframe packets (index entries carry dts, seeking takes pts)
        no_pts: bool | None = None  # decided at the first packet with data
        epoch = 0  # bumped by every seek: frames decoded before it are dropped
        last_t = -math.inf  # time and duration of the last decoded frame
        last_dur = 0.0
        key_times: list[float] = []  # the last two keyframe times seen (GOP estimate without an index)
        demux = iter(packets)

        def decoded() -> Iterator[Any]:
            """Decoded frames; demux and decode errors are recorded, then what the decoder holds is flushed."""
            nonlocal kf_shift, no_pts
            errors_in_row = 0
            while True:
                packet = None
                try:
                    packet = next(demux)
                except StopIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - demuxer error: keep what was decoded
                    self._stopped(ERR_DECODE, f"reading the container failed near {st.decoded_end_s:.2f} s: "
                                  f"{type(exc).__name__}: {exc}")
                if packet is not None:
                    st.packets += 1
                    st.note_position(packet.pos)
                    if self.progress is not None:
                        self.progress()
                    if packet.size:
                        if no_pts is None:
                            no_pts = packet.pts is None
                            if no_pts:
                                st.synthesized_pts = True
                                st.notes.append("stream has no pts: times are the running sum of frame durations; "
                                                "every frame is decoded")
                            elif keyframes:
                                cc.skip_frame = "NONKEY"
                        if packet.pts is not None:
                            if packet.is_keyframe and packet.dts is not None:
                                kf_shift = max(kf_shift, packet.pts - packet.dts)
                            if origin_ts is not None and tb > 0:
                                pend = (packet.pts - origin_ts + (packet.duration or 0)) * tb
                                st.decoded_end_s = max(st.decoded_end_s, pend)
                        if keyframes and not no_pts and not packet.is_keyframe:
                            continue  # keyframes mode: other packets never reach the decoder
                try:
                    frames = packet.decode() if packet is not None else cc.decode(None)
                    errors_in_row = 0
                except Exception as exc:  # noqa: BLE001 - corrupt data: FFmpeg resyncs at the next keyframe
                    self._stopped(ERR_DECODE, f"decoding failed near {max(last_t, 0.0):.2f} s: "
                                  f"{type(exc).__name__}: {exc}")
                    errors_in_row += 1
                    if packet is not None and errors_in_row < _MAX_ERRORS_IN_ROW:
                        continue
                    try:
                        frames = cc.decode(None)  # give up: flush what the decoder holds
                    except Exception:  # noqa: BLE001
                        return
                    packet = None
                my_epoch = epoch
                for frame in frames:
                    if epoch != my_epoch:
                        break  # a seek happened while this packet's frames were being used
                    yield frame
                if packet is None:
                    return

        def time_of(frame) -> tuple[float, float]:
            """(t, duration) of a decoded frame in seconds from the stream's start."""
            nonlocal origin_ts, last_t, last_dur
            ftb = float(frame.time_base) if frame.time_base else tb
            dur = (frame.duration or 0) * ftb
            if frame.pts is not None and not no_pts:
                if origin_ts is None:
                    origin_ts = frame.pts
                t = (frame.pts - origin_ts) * ftb
            else:
                t = 0.0 if last_t == -math.inf else last_t + (last_dur or dur)
            if dur <= 0:
                dur = last_dur if last_dur > 0 else (t - last_t if -math.inf < last_t < t else 0.0)
            last_t, last_dur = t, dur
            return t, dur

        def frame_period() -> float:
            return last_dur if last_dur > 0 else 1.0 / 30.0

        def want_seek(t_now: float, target: float) -> int | None:
            """Stream timestamp (pts) to seek to for ``target`` when that skips decoding, else None."""
            if origin_ts is None or tb <= 0 or no_pts:
                return None
            try:  # the container's keyframe index (mp4/mov: complete; matroska: once cues are read)
                entries = stream.index_entries
                n_entries = len(entries)
            except Exception:  # noqa: BLE001 - no index
                n_entries = 0
            if n_entries > 1:
                i = entries.search_timestamp(origin_ts + int(math.floor(target / tb)) - kf_shift, backward=True)
                if i < 0:
                    return None
                kf_ts = entries[i].timestamp + kf_shift
                if (kf_ts - origin_ts) * tb - t_now > _SEEK_MIN_FRAMES * frame_period():
                    return kf_ts
                return None
            if len(key_times) >= 2:
                # no index: demuxers such as mpegts land on the first keyframe *after* the target, so
                # aim one observed GOP early; the landing check catches irregular GOPs
                gop = key_times[-1] - key_times[-2]
                if gop > 0 and target - t_now > _SEEK_GOPS_NO_INDEX * gop:
                    return origin_ts + int(math.floor((target - gop) / tb))
            return None

        def seek(ts: int) -> bool:
            """Seek the demuxer to the keyframe at or before stream timestamp ``ts``; drop frames in flight."""
            nonlocal epoch
            try:
                container.seek(ts, stream=stream, backward=True)
            except Exception as exc:  # noqa: BLE001 - e.g. a non-seekable input
                st.notes.append(f"seeking failed ({type(exc).__name__}: {exc})")
                return False
            epoch += 1
            return True

        # frames between a packet entering the decoder and its picture coming out: reordering plus one
        # per frame thread; skipping stops this many frames (and more) before the next request
        threads = dec.threads if dec.threads > 0 else (os.cpu_count() or 8)
        nonref_margin_frames = _NONREF_MARGIN_FRAMES + (threads if threads > 1 else 0)

        # ---- the loop
        k = 0  # index of the next request; its time is t_req = k * period
        t_req = 0.0
        cand = None  # latest decoded frame before t_req: [frame or None, t, duration, emitted]
        last_emitted_t = -math.inf
        skipping = False  # skip_frame is NONREF
        landing_limit: float | None = None  # after a seek: the first frame must not be later than this
        resume_ts: int | None = None  # where to go back to when a seek lands too late
        can_seek = not keyframes
        seeked_for = math.nan  # the request the last seek aimed at (one seek per request)

        for frame in decoded():
            st.frames_decoded += 1
            t, dur = time_of(frame)
            if max_px is not None and frame.width * frame.height > max_px:
                self._stopped(ERR_TOO_LARGE, f"a frame at {t:.2f} s is {frame.width}x{frame.height}, over the guard")
                break
            if t > max_t:
                self._stopped(ERR_TOO_LONG, f"still decoding at {t:.0f} s, over the guard of {max_t:.0f} s")
                break
            st.decoded_end_s = max(st.decoded_end_s, t + dur)
            if frame.key_frame and (not key_times or t > key_times[-1]):
                key_times.append(t)
                del key_times[:-2]
            if landing_limit is not None:
                limit, landing_limit = landing_limit, None
                if t > limit + 0.5 * (dur or frame_period()) and resume_ts is not None:
                    st.notes.append(f"a seek landed at {t:.3f} s, past {limit:.3f} s: decoding straight through")
                    can_seek = False
                    if not seek(resume_ts):
                        self._stopped(ERR_DECODE, f"cannot seek back to {last_emitted_t:.2f} s after a bad seek")
                        break
                    continue
            if t <= last_emitted_t:
                continue  # already covered (after a seek back, or pts going backwards)

            if keyframes:
                if frame.key_frame and (last_emitted_t == -math.inf or t - last_emitted_t >= period * (1 - 1e-6)):
                    last_emitted_t = t
                    if t > suppress_until:
                        yield t, frame
                continue

            # fps mode: each request t_req takes the nearest of (cand, this frame); ties go to cand
            emitted_now = False
            while t >= t_req:
                if cand is not None and (t_req - cand[1]) <= (t - t_req) + _TIE_S:
                    if not cand[3]:
                        last_emitted_t = cand[1]
                        if cand[1] > suppress_until:
                            yield cand[1], cand[0]
                        cand = [None, cand[1], cand[2], True]
                    # every request up to the midpoint between cand and this frame is nearest to cand
                    k = max(k + 1, int(math.floor(0.5 * (cand[1] + t) * dec.target_fps)) + 1)
                    t_req = k * period
                else:
                    last_emitted_t = t
                    if t > suppress_until:
                        yield t, frame
                    emitted_now = True
                    k = max(k + 1, int(math.floor(t * dec.target_fps)) + 1)
                    while k * period <= t:
                        k += 1
                    t_req = k * period
            cand = [None if emitted_now else frame, t, dur, emitted_now]

            # seek when the keyframe before the next request lies ahead of the decoder
            if can_seek and t_req != seeked_for and t_req - t > _SEEK_MIN_FRAMES * frame_period():
                ts = want_seek(t, t_req)
                if ts is not None:
                    seeked_for = t_req
                    resume_ts = origin_ts + int(math.floor(t / tb))
                    if skipping:
                        cc.skip_frame, skipping = "DEFAULT", False
                    if seek(ts):
                        st.seeks += 1
                        landing_limit = t_req
                        continue
                    can_seek = False  # this input cannot seek: decode straight through
            # otherwise skip non-reference frames while the next request is far away
            if not no_pts:
                far = t_req - t > max(_NONREF_MARGIN_S, nonref_margin_frames * frame_period())
                if far != skipping:
                    cc.skip_frame, skipping = ("NONREF" if far else "DEFAULT"), far

        # end of stream: the last candidate counts if the pending request falls inside its display time
        if not keyframes and cand is not None and not cand[3] and cand[0] is not None:
            if t_req < cand[1] + (cand[2] or frame_period()) - 1e-6 and cand[1] > suppress_until:
                yield cand[1], cand[0]
        if skipping:
            cc.skip_frame = "DEFAULT"

    # -------------------------------------------------------------- outcome

    def _stopped(self, error_type: str, message: str) -> None:
        if self.stats.error_type is None:
            self.stats.error_type, self.stats.error = error_type, message

    def _check_truncation(self) -> None:
        st = self.stats
        if st.error_type is not None or st.frames_decoded == 0:
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


# ------------------------------------------------------------------------------------------- chunks


@dataclass
class ChunkEvent:
    """One chunk of sampled frames of a video, as plain values (the child sends these over its pipe).

    ``frames`` uint8 (T, H, W, 3), ``pts_s`` float64 (T,); ``first_index`` is the video-wide index of
    the first frame; ``chunk_end_s`` is the next sample's pts (or the decoded end on the last chunk).
    ``info``: ``rotation_deg`` / ``declared_duration_s`` as decoding used them (None when the video
    could not be opened), and on the last chunk ``error_type``, ``error``, ``frames_sampled``.
    """

    frames: np.ndarray
    pts_s: np.ndarray
    first_index: int
    chunk_end_s: float
    last: bool
    info: dict


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
) -> Iterator[ChunkEvent]:
    """Decode one video into chunks of ``decode.chunk_frames`` frames; never raises for a bad video.

    A chunk is held until the first frame of the next one is sampled, so its ``chunk_end_s`` is the
    next sample's pts and the last chunk carries the outcome; at most ``chunk_frames + 1`` frames are
    in memory. The last event has ``last=True`` and may hold zero frames (nothing sampled).
    """
    h, w = frame_size
    n = decode.chunk_frames
    sampler = None
    sampled = 0
    pts: list[float] = []
    buf = None
    fileobj = None

    def info(**more) -> dict:
        st = sampler.stats if sampler is not None else None
        return {
            "rotation_deg": st.rotation_deg if st is not None else None,
            "declared_duration_s": st.declared_duration_s if st is not None else None,
            **more,
        }

    def held() -> np.ndarray:
        if not pts:
            return np.zeros((0, h, w, 3), dtype=np.uint8)
        return buf[: len(pts)].copy() if len(pts) < n else buf

    try:
        fileobj = opener(source, size_bytes)
        sampler = VideoSampler(
            fileobj, decode, frame_size, rotation_deg, guards=guards,
            declared_duration_s=declared_duration_s, progress=progress, size_bytes=size_bytes,
        )
        for t, rgb in sampler:
            if len(pts) == n:
                yield ChunkEvent(buf, np.asarray(pts, dtype=np.float64), sampled - n, t, False, info())
                buf, pts = None, []
            if buf is None:
                buf = np.empty((n, h, w, 3), dtype=np.uint8)
            buf[len(pts)] = rgb
            pts.append(t)
            sampled += 1
    except Exception as exc:  # noqa: BLE001 - every failure becomes the video's outcome
        if isinstance(exc, VideoDecodeError):
            err = exc
        elif sampler is None or not sampler._used:
            err = open_error(exc)
        else:
            err = VideoDecodeError(ERR_INTERNAL, f"{type(exc).__name__}: {exc}")
        decoded_end = sampler.stats.decoded_end_s if sampler is not None else 0.0
        end = max(pts[-1], decoded_end) if pts else 0.0
        yield ChunkEvent(held(), np.asarray(pts, dtype=np.float64), sampled - len(pts), end, True,
                         info(error_type=err.error_type, error=err.message, frames_sampled=sampled))
        return
    finally:
        if fileobj is not None:
            try:
                fileobj.close()
            except Exception:  # noqa: BLE001
                pass

    st = sampler.stats
    if not pts:
        yield ChunkEvent(held(), np.zeros(0), 0, 0.0, True, info(
            error_type=st.error_type or ERR_NO_FRAMES,
            error=st.error or f"the container opened but no frame was decoded ({st.packets} packets read)",
            frames_sampled=0))
        return
    end = max(st.decoded_end_s, pts[-1])
    yield ChunkEvent(held(), np.asarray(pts, dtype=np.float64), sampled - len(pts), end, True,
                     info(error_type=st.error_type, error=st.error, frames_sampled=sampled))


def bare_pyav_sample(
    path: str,
    target_fps: float | None = 1.0,
    *,
    keyframes: bool = False,
    frame_size: tuple[int, int] = (224, 224),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Reference for the overhead benchmark: the plainest PyAV loop doing 1 fps sampling.

    Decodes every frame (or, with ``keyframes``, only keyframes via ``skip_frame="NONKEY"``), takes the
    first frame at or after each request ``k / target_fps`` (keyframes: every keyframe), and converts
    only those with the same scaler as the sampler's default ("exact"). No plan, no seeking, no
    reference-frame skipping, no chunks, no isolation, no guards.

    Returns:
        (pts_s float64 (T,), list of T uint8 (H, W, 3)).
    """
    import av

    interp = scaler_interpolation()
    h, w = frame_size
    pts, frames = [], []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if keyframes:
            stream.codec_context.skip_frame = "NONKEY"
        start = stream.start_time or 0
        next_t = 0.0
        for frame in container.decode(stream):
            t = float((frame.pts - start) * frame.time_base)
            if keyframes or t >= next_t:
                rgb = frame.reformat(w, h, format="rgb24", interpolation=interp).to_ndarray()
                pts.append(t)
                frames.append(rgb)
                if not keyframes:
                    next_t = (math.floor(t * target_fps) + 1) / target_fps
    return np.asarray(pts, dtype=np.float64), frames


# ------------------------------------------------------------------------------------------- helpers


def _as_float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


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

    Protocol (``multiprocessing.connection.Connection`` on socket ``fd``), parent -> child:
    ``("init", decode: dict, guards: dict, frame_size)``, then ``("job", job_id, source, params)`` per
    video and ``("stop",)``. Child -> parent: ``("ready", pid)``; per chunk ``("ev", job_id,
    pts_s, first_index, chunk_end_s, last, info, nbytes)`` followed by ``nbytes`` raw frame bytes
    (uint8 (T, H, W, 3), C order); ``("alive",)`` heartbeats.
    """
    from multiprocessing.connection import Connection
    from types import SimpleNamespace

    _exit_with_parent(os.getppid())
    import av
    import av.video.reformatter  # noqa: F401

    conn = Connection(fd)
    try:
        _, decode_d, guards_d, frame_size = conn.recv()
        decode = SimpleNamespace(**decode_d)
        guards = SimpleNamespace(**guards_d)
        frame_size = (int(frame_size[0]), int(frame_size[1]))
        faults = _parse_faults(os.environ.get(FAULT_ENV, ""))
        interval_s = min(1.0, decode.stall_timeout_s / 4.0)
        last_beat = [time.monotonic()]

        def heartbeat() -> None:
            now = time.monotonic()
            if now - last_beat[0] >= interval_s:
                conn.send(("alive",))
                last_beat[0] = now

        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            _, job, source, params = msg
            fault = next((f for f in faults if f.substring in str(source[1])), None)
            if fault is not None and fault.after_frames <= 0:
                _fire(fault)
            sent = 0
            for ev in sample_chunks(source, decode, guards, frame_size, progress=heartbeat, **params):
                frames = np.ascontiguousarray(ev.frames)
                conn.send(("ev", job, ev.pts_s, ev.first_index, ev.chunk_end_s, ev.last, ev.info, frames.nbytes))
                if frames.nbytes:
                    conn.send_bytes(memoryview(frames).cast("B"))
                last_beat[0] = time.monotonic()
                sent += len(ev.pts_s)
                if fault is not None and not ev.last and sent >= fault.after_frames:
                    _fire(fault)
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the parent went away


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
