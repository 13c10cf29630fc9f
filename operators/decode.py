"""Decode stage: PyAV turns each probed video into chunks of sampled, resized RGB frames.

Reads the probe's video rows (``schema.VIDEO_META_COLUMNS``, one row per video) and yields one row per
*chunk* of up to ``DecodeConfig.chunk_frames`` sampled frames, so memory stays bounded for any video
length. The last chunk of a video (``is_last``) carries its final ``status / error_type / error``,
``duration_s`` (decoded coverage) and ``frames_sampled``. Every input ends with exactly one ``is_last``
row; a row the probe already failed passes through as that one row, with zero frames.

How frames are chosen (``VideoSampler``):

- ``mode="fps"``: requests at ``t_k = k / target_fps`` (k = 0, 1, ...; t = 0 is the stream's start);
  each request takes the decoded frame whose pts is *nearest* (ties go to the earlier frame), so a
  sampled frame is at most half a source frame period from its request on constant-rate video (taking
  the first frame at/after a request could be a whole period late). A frame is never emitted twice: when
  the source is sparser than ``target_fps`` the requests that would repeat a frame are dropped.
  Decoding is kept to what the requests need: frames that are not kept are never converted; when the
  keyframe that precedes the next request lies ahead of the decoder (by more than ``_SEEK_MIN_FRAMES``
  frames), the demuxer *seeks* to it instead of decoding through (the container's index says where
  keyframes are; without an index, e.g. MPEG-TS, seeking starts when the next request is more than two
  observed GOPs away); otherwise, while the next request is more than ``_NONREF_MARGIN_FRAMES`` frames
  (and 0.5 s) away, non-reference frames are not decoded at all (``skip_frame="NONREF"``). After every
  seek the first decoded frame is checked to be no later than the request, or the seek is undone and the
  video is decoded straight through. Measured on a 20 s 1080p H.264 clip (25 fps, 2 s GOP, B-frames, one
  core), exact 1 fps: decoding every frame 2.2-2.5 s CPU; NONREF skipping alone 1.9 s; seeking alone
  1.46 s; both 1.15 s (200 of 500 frames decoded); at 0.25 fps both 0.29 s. The "seek only past two
  GOPs" rule would never seek at 1 fps with 2 s GOPs, so the index-driven rule is used where an index
  exists.
- ``mode="keyframes"``: only keyframe packets reach the decoder, which also runs with
  ``skip_frame="NONKEY"`` (VP9 ignores that flag, hence the packet filter); one sample per keyframe,
  thinned so samples are at least ``1 / target_fps`` apart (0.21 s CPU on the clip above). Coverage
  for the truncation check comes from the demuxed packets, which are all read.

Times are always ``(frame.pts - stream.start_time) * time_base``, never derived from the average rate.
A stream without pts (raw Annex-B H.264) gets times from the previous frame's time plus its duration
(``VideoSampler.stats.synthesized_pts`` says so); such a stream is decoded frame by frame (no seeking,
no skipping), since a skipped frame would shift every later time.

Pictures: converted to RGB and resized (squashed, not cropped) in FFmpeg's scaler with the
FAST_BILINEAR interpolation (about 3x cheaper than swscale's default BILINEAR for 1080p -> 224x224 on
these machines, 0.53 vs 1.57 ms). Display rotation (``rotation_deg``, clockwise; from the probe row, or
read from the first frame's display matrix when the row says 0) is applied with ``np.rot90`` after the
scaler; the scaler's output size is swapped for 90/270 so the *rotated* picture has ``frame_size``.

Truncation: the decoded end (last frame's or demuxed packet's pts + duration) below
``truncation_tolerance`` x the declared duration makes the video ``partial`` ("decoded 1.0 s of declared
4.0 s"); an MPEG-TS file whose size is not a whole number of TS packets was cut mid-packet and is
``partial`` too (TS declares no duration, so this is the only sign of a cut). A decode error after some
frames -> ``partial`` with the error; no frame at all -> ``failed``.

Isolation: with ``DecodeConfig.isolate`` every video is decoded in a persistent child process (spawned
lazily, reused across videos); chunks come back over a pipe. A watchdog kills the child when it sends
nothing (no chunk, no heartbeat: heartbeats follow demuxed packets) for ``stall_timeout_s`` ->
``error_type="timeout"``; a child that dies -> ``"crashed"``; either way the next video gets a fresh child.

Test hook (children only, never in-process): the environment variable ``RAY_VLM_DECODE_FAULT`` holds
comma-separated ``kind[@N]:substring`` entries, kind ``hang`` (sleep forever) or ``crash`` (SIGSEGV);
the fault fires for any URI containing ``substring``, before decoding (N = 0) or once N sampled frames
have been sent back. It exists so tests can prove one bad video costs only itself.

The child is started with multiprocessing's "spawn", which re-imports the parent's ``__main__``
module: scripts that use ``DecodeVideos(isolate=True)`` directly need an ``if __name__ == "__main__":``
guard (Ray workers and pytest have one). Overhead measured on the clip above: in-process 1.01-1.03x
and isolated 1.01x the wall time of ``sample_video`` alone; the plain decode-everything loop
(``bare_pyav_sample``) takes 1.9-2.1x.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_vlm import schema as S
from ray_vlm.config import DecodeConfig, GuardConfig

OPERATOR = "DecodeVideos"
# Error class for a video that decoded cleanly but ended early (not yet a schema constant).
ERR_TRUNCATED = S.ERR_TRUNCATED
FAULT_ENV = "RAY_VLM_DECODE_FAULT"
INTERPOLATION = "FAST_BILINEAR"

# Non-reference frames are skipped while the next request is further away than this many frame
# periods (plus one per decoder thread, and at least _NONREF_MARGIN_S): the decoder's delay (B-frame
# reordering, at most 4 frames in practice, plus frame threads) stays below it, so every frame that
# could be the nearest to a request is decoded.
_NONREF_MARGIN_FRAMES = 8
_NONREF_MARGIN_S = 0.5
# Seek only when it skips at least this many frames (a seek flushes the decoder and re-reads a block).
_SEEK_MIN_FRAMES = 3
# Without a container index: seek when the next request is more than this many observed GOPs away.
_SEEK_GOPS_NO_INDEX = 2.0
_TS_PACKET_SIZES = (188, 192, 204)
# Decode errors in a row after which the rest of a video is given up (FFmpeg usually resyncs at the
# next keyframe; a truncated file errors once at its end).
_MAX_ERRORS_IN_ROW = 16


class VideoDecodeError(Exception):
    """One video cannot be decoded; ``error_type`` is one of the ``schema.ERR_*`` classes."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class DecodeStats:
    """What one ``VideoSampler`` pass saw; read after iterating.

    Times are seconds from the stream's start.
    """

    container: str = ""
    codec: str = ""
    width: int = 0  # coded size (before rotation)
    height: int = 0
    rotation_deg: int = 0  # clockwise rotation that was applied
    declared_duration_s: float = math.nan
    decoded_end_s: float = 0.0  # end of the last decoded frame or demuxed packet (pts + duration)
    frames_decoded: int = 0
    frames_sampled: int = 0
    packets: int = 0
    seeks: int = 0
    synthesized_pts: bool = False  # the stream had no pts: times come from frame durations
    error_type: str | None = None  # decoding stopped early (decode error, guard) or the video is cut short
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- opening


def _open(uri: str, storage_options: dict | None = None, size_bytes: int | None = None):
    """Open ``uri`` as a seekable binary file object through the project's one filesystem resolver."""
    try:
        from ray_vlm.fs import open_input
    except ImportError:  # resolver not importable: plain fsspec (no URL policy)
        import fsspec

        return fsspec.open(uri, "rb", **(storage_options or {})).open()
    return open_input(uri, storage_options=storage_options, size_bytes=size_bytes)


def _size_of(fileobj) -> int | None:
    try:
        pos = fileobj.tell()
        size = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(pos)
        return int(size)
    except Exception:  # noqa: BLE001 - a stream without size: unknown
        return None


def _open_error(exc: BaseException) -> VideoDecodeError:
    """Map an exception raised while opening to an error class."""
    import av

    name = type(exc).__name__
    if isinstance(exc, VideoDecodeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return VideoDecodeError(S.ERR_NOT_FOUND, f"not found: {exc}")
    if isinstance(exc, PermissionError) or "Policy" in name:
        return VideoDecodeError(S.ERR_POLICY, f"refused: {exc}")
    if isinstance(exc, av.error.InvalidDataError):
        return VideoDecodeError(
            S.ERR_NOT_VIDEO, f"FFmpeg cannot read a media container (not a video, or cut before its index): {exc}"
        )
    if isinstance(exc, av.error.FFmpegError) and getattr(exc, "errno", None) == errno.EINVAL:
        # EINVAL from avformat_open_input with format_whitelist set: the demuxer is not allowed.
        return VideoDecodeError(S.ERR_POLICY, f"container format is not in guards.allowed_containers: {exc}")
    if isinstance(exc, av.error.DecoderNotFoundError):
        return VideoDecodeError(S.ERR_DECODE, f"no decoder for the video stream: {exc}")
    if isinstance(exc, (av.error.FFmpegError, EOFError, OSError)):
        return VideoDecodeError(S.ERR_DECODE, f"cannot read the container ({name}): {exc}")
    return VideoDecodeError(S.ERR_INTERNAL, f"{name}: {exc}")


# ------------------------------------------------------------------------------------------- sampling


class VideoSampler:
    """Sampled frames of one video, as an iterable of ``(pts_s, rgb)``.

    ``rgb`` is uint8 (H, W, 3) with (H, W) = ``frame_size``, upright (rotation applied). Iterate once;
    ``stats`` then holds what was decoded. Opening or guard failures raise ``VideoDecodeError``; a
    decode error after the container opened ends the iteration and is recorded in ``stats.error_type``
    / ``stats.error`` (frames already yielded stay valid).

    Args:
        source: a path or a seekable binary file object.
        decode: sampling mode, target_fps, decoder threads.
        frame_size: (height, width) of the output frames.
        rotation_deg: clockwise display rotation to apply (0/90/180/270); 0 means "read it from the
            stream's display matrix".
        guards: dimension / duration / container guards checked before and while decoding.
        declared_duration_s: duration the probe read; NaN to read it from the container.
        progress: called after each demuxed packet (heartbeats for a watchdog).
        size_bytes: file size if known (for the MPEG-TS cut check); read from ``source`` otherwise.
    """

    def __init__(
        self,
        source,
        decode: DecodeConfig,
        frame_size: tuple[int, int],
        rotation_deg: int = 0,
        *,
        guards: GuardConfig | None = None,
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
                raise VideoDecodeError(S.ERR_EMPTY, "the file is empty (0 bytes)")
            if self.size_bytes is None and os.path.exists(self.source):
                self.size_bytes = os.path.getsize(self.source)
            source = str(self.source)
        else:
            size = _size_of(self.source)
            if size == 0:
                raise VideoDecodeError(S.ERR_EMPTY, "the file is empty (0 bytes)")
            if self.size_bytes is None:
                self.size_bytes = size
            source = self.source
        try:
            container = av.open(source, mode="r", options=options, metadata_errors="ignore")
        except Exception as exc:  # noqa: BLE001 - mapped to an error class
            raise _open_error(exc) from exc
        return container

    def _check_container(self, container) -> Any:
        st = self.stats
        st.container = container.format.name
        if self.guards is not None and st.container not in self.guards.allowed_containers:
            raise VideoDecodeError(S.ERR_POLICY, f"container {st.container!r} is not in guards.allowed_containers")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoDecodeError(S.ERR_NO_VIDEO_STREAM, f"no video stream (streams: {kinds or 'none'})")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc is None:
            raise VideoDecodeError(S.ERR_DECODE, "FFmpeg has no decoder for the video stream (damaged header?)")
        st.codec = cc.name
        st.width, st.height = int(cc.width or 0), int(cc.height or 0)
        g = self.guards
        if g is not None and st.width and st.height:
            fits = (st.width <= g.max_width and st.height <= g.max_height) or (
                st.height <= g.max_width and st.width <= g.max_height
            )
            if not fits or st.width * st.height > g.max_pixels:
                raise VideoDecodeError(
                    S.ERR_TOO_LARGE,
                    f"frame {st.width}x{st.height} exceeds the guard "
                    f"({g.max_width}x{g.max_height}, {g.max_pixels} pixels)",
                )
        if not math.isfinite(st.declared_duration_s):
            st.declared_duration_s = _declared_duration_s(container, stream)
        if g is not None and math.isfinite(st.declared_duration_s) and st.declared_duration_s > g.max_duration_s:
            raise VideoDecodeError(
                S.ERR_TOO_LONG, f"declares {st.declared_duration_s:.1f} s, over the guard of {g.max_duration_s:.0f} s"
            )
        return stream

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
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
            yield from self._run(container, stream)
            self._check_truncation()
        finally:
            container.close()

    def _run(self, container, stream) -> Iterator[tuple[float, np.ndarray]]:
        """The decode loop shared by both modes: demux -> decode -> time -> select -> convert."""
        from av.video.reformatter import Interpolation, VideoReformatter

        st = self.stats
        st.rotation_deg = self.rotation_deg
        dec = self.decode
        cc = stream.codec_context
        tb = float(stream.time_base) if stream.time_base else 0.0
        keyframes = dec.mode == "keyframes"
        period = 1.0 / dec.target_fps
        max_t = self.guards.max_duration_s if self.guards is not None else math.inf
        max_px = self.guards.max_pixels if self.guards is not None else None
        reformatter = VideoReformatter()
        interp = Interpolation[INTERPOLATION]
        out_h, out_w = self.frame_size

        origin_ts = stream.start_time  # None: the first frame's pts is the origin
        kf_shift = 0  # pts - dts of keyframe packets (index entries carry dts, seeking takes pts)
        no_pts: bool | None = None  # decided at the first packet with data
        epoch = 0  # bumped by every seek: frames decoded before it are dropped
        last_t = -math.inf  # time and duration of the last decoded frame
        last_dur = 0.0
        rotation = self.rotation_deg
        rotation_known = rotation != 0
        key_times: list[float] = []  # the last two keyframe times seen (GOP estimate without an index)

        # ---- helpers (closures over the state above)

        def decoded() -> Iterator[Any]:
            """Decoded frames; demux and decode errors are recorded, then what the decoder holds is flushed."""
            nonlocal kf_shift, no_pts
            demux = container.demux(stream)
            errors_in_row = 0
            while True:
                packet = None
                try:
                    packet = next(demux)
                except StopIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - demuxer error: keep what was decoded
                    self._stopped(S.ERR_DECODE, f"reading the container failed near {st.decoded_end_s:.2f} s: "
                                  f"{type(exc).__name__}: {exc}")
                if packet is not None:
                    st.packets += 1
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
                    self._stopped(S.ERR_DECODE, f"decoding failed near {max(last_t, 0.0):.2f} s: "
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

        def to_rgb(frame) -> np.ndarray:
            w, h = (out_h, out_w) if rotation in (90, 270) else (out_w, out_h)
            rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation=interp).to_ndarray()
            if rotation:
                rgb = np.rot90(rgb, k=-(rotation // 90))  # np.rot90 turns counter-clockwise for k > 0
            return np.ascontiguousarray(rgb)

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
                self._stopped(S.ERR_TOO_LARGE, f"a frame at {t:.2f} s is {frame.width}x{frame.height}, over the guard")
                break
            if t > max_t:
                self._stopped(S.ERR_TOO_LONG, f"still decoding at {t:.0f} s, over the guard of {max_t:.0f} s")
                break
            st.decoded_end_s = max(st.decoded_end_s, t + dur)
            if frame.key_frame and (not key_times or t > key_times[-1]):
                key_times.append(t)
                del key_times[:-2]
            if not rotation_known:
                rotation, rotation_known = _frame_rotation_cw(frame), True
            st.rotation_deg = rotation
            if landing_limit is not None:
                limit, landing_limit = landing_limit, None
                if t > limit + 0.5 * (dur or frame_period()) and resume_ts is not None:
                    st.notes.append(f"a seek landed at {t:.3f} s, past {limit:.3f} s: decoding straight through")
                    can_seek = False
                    if not seek(resume_ts):
                        self._stopped(S.ERR_DECODE, f"cannot seek back to {last_emitted_t:.2f} s after a bad seek")
                        break
                    continue
            if t <= last_emitted_t:
                continue  # already covered (after a seek back, or pts going backwards)

            if keyframes:
                if frame.key_frame and (last_emitted_t == -math.inf or t - last_emitted_t >= period * (1 - 1e-6)):
                    last_emitted_t = t
                    st.frames_sampled += 1
                    yield t, to_rgb(frame)
                continue

            # fps mode: each request t_req takes the nearest of (cand, this frame); ties go to cand
            emitted_now = False
            while t >= t_req:
                if cand is not None and (t_req - cand[1]) <= (t - t_req):
                    if not cand[3]:
                        last_emitted_t = cand[1]
                        st.frames_sampled += 1
                        yield cand[1], to_rgb(cand[0])
                        cand = [None, cand[1], cand[2], True]
                    # every request up to the midpoint between cand and this frame is nearest to cand
                    k = max(k + 1, int(math.floor(0.5 * (cand[1] + t) * dec.target_fps)) + 1)
                    t_req = k * period
                else:
                    last_emitted_t = t
                    st.frames_sampled += 1
                    yield t, to_rgb(frame)
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
            if t_req < cand[1] + (cand[2] or frame_period()) - 1e-6:
                st.frames_sampled += 1
                yield cand[1], to_rgb(cand[0])
        st.rotation_deg = rotation

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
        if st.container == "mpegts" and self.size_bytes and all(self.size_bytes % n for n in _TS_PACKET_SIZES):
            st.error_type = ERR_TRUNCATED
            st.error = (
                f"MPEG-TS file of {self.size_bytes} bytes ends inside a transport packet "
                f"(decoded {st.decoded_end_s:.1f} s): it was cut short"
            )


def sample_video(
    source,
    decode: DecodeConfig,
    frame_size: tuple[int, int],
    rotation_deg: int = 0,
    **kwargs,
) -> VideoSampler:
    """Sampled frames of one video: iterate for ``(pts_s, rgb uint8 (H, W, 3))``; see ``VideoSampler``."""
    return VideoSampler(source, decode, frame_size, rotation_deg, **kwargs)


def bare_pyav_sample(
    path: str,
    target_fps: float | None = 1.0,
    *,
    keyframes: bool = False,
    frame_size: tuple[int, int] = (224, 224),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Reference for the overhead benchmark: the plainest PyAV loop doing the same sampling.

    Decodes every frame (or, with ``keyframes``, only keyframes via ``skip_frame="NONKEY"``), takes the
    first frame at or after each request ``k / target_fps`` (keyframes: every keyframe), and converts
    only those with the same FAST_BILINEAR scaler. No seeking, no reference-frame skipping, no chunks,
    no isolation, no guards.

    Returns:
        (pts_s float64 (T,), list of T uint8 (H, W, 3)).
    """
    import av
    from av.video.reformatter import Interpolation

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
                rgb = frame.reformat(w, h, format="rgb24", interpolation=Interpolation.FAST_BILINEAR).to_ndarray()
                pts.append(t)
                frames.append(rgb)
                if not keyframes:
                    next_t = (math.floor(t * target_fps) + 1) / target_fps
    return np.asarray(pts, dtype=np.float64), frames


# ------------------------------------------------------------------------------------------- chunks

# Columns decode adds to the video metadata; each row of its output is one chunk.
DECODE_COLUMNS = (
    S.CHUNK_INDEX,
    S.IS_LAST,
    S.FRAMES,
    S.PTS_S,
    S.FRAME_INDEX,
    S.CHUNK_END_S,
    S.DURATION_S,
    S.FRAMES_SAMPLED,
)


def _payload(
    meta: dict,
    chunk_index: int,
    frames: np.ndarray,
    pts_s: np.ndarray,
    first_index: int,
    chunk_end_s: float,
    *,
    last: bool,
    duration_s: float = math.nan,
    frames_sampled: int = -1,
    status: str | None = None,
    error_type: str | None = None,
    error: str | None = None,
    rotation_deg: int | None = None,
    declared_duration_s: float | None = None,
) -> dict[str, Any]:
    """One chunk as plain values: the decode columns plus the metadata columns decode may update."""
    return {
        S.CHUNK_INDEX: int(chunk_index),
        S.IS_LAST: bool(last),
        S.FRAMES: frames,
        S.PTS_S: np.asarray(pts_s, dtype=np.float64),
        S.FRAME_INDEX: np.arange(first_index, first_index + len(pts_s), dtype=np.int32),
        S.CHUNK_END_S: float(chunk_end_s),
        S.DURATION_S: float(duration_s),
        S.FRAMES_SAMPLED: int(frames_sampled),
        S.STATUS: meta.get(S.STATUS) if status is None else status,
        S.ERROR_TYPE: meta.get(S.ERROR_TYPE) if status is None else error_type,
        S.ERROR: meta.get(S.ERROR) if status is None else error,
        S.ROTATION_DEG: rotation_deg,
        S.DECLARED_DURATION_S: declared_duration_s,
    }


def _terminal(
    meta: dict,
    frame_size: tuple[int, int],
    *,
    chunk_index: int,
    frames_sampled: int,
    covered_s: float,
    error_type: str,
    error: str,
    rotation_deg: int | None = None,
    declared_duration_s: float | None = None,
) -> dict[str, Any]:
    """A last row with zero frames: ``failed`` when nothing was sampled, else ``partial``."""
    h, w = frame_size
    status = S.STATUS_PARTIAL if frames_sampled > 0 else S.STATUS_FAILED
    return _payload(
        meta,
        chunk_index,
        np.zeros((0, h, w, 3), dtype=np.uint8),
        np.zeros(0, dtype=np.float64),
        frames_sampled,
        covered_s,
        last=True,
        duration_s=covered_s,
        frames_sampled=frames_sampled,
        status=status,
        error_type=error_type,
        error=error,
        rotation_deg=rotation_deg,
        declared_duration_s=declared_duration_s,
    )


def decode_video_chunks(
    meta: dict,
    decode: DecodeConfig,
    guards: GuardConfig,
    frame_size: tuple[int, int],
    storage_options: dict | None = None,
    progress: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decode one video (a probe row as a dict) into chunk payloads; never raises for a bad video.

    A chunk is held until the first frame of the next one is sampled, so its ``chunk_end_s`` is the
    next sample's pts and the last chunk can carry ``is_last`` and the final status; at most
    ``chunk_frames + 1`` frames are in memory.

    Yields:
        dicts with the ``DECODE_COLUMNS`` plus ``status, error_type, error, rotation_deg,
        declared_duration_s`` (None where the probe's value stands). ``frames`` is uint8
        (T, H, W, 3), ``pts_s`` float64 (T,), ``frame_index`` int32 (T,).
    """
    h, w = frame_size
    n = decode.chunk_frames
    rot = _as_float(meta.get(S.ROTATION_DEG))
    rotation = int(rot) if math.isfinite(rot) else 0
    size = meta.get(S.SIZE_BYTES)
    size = int(size) if _finite(size) and int(size) > 0 else None
    sampler = None
    chunk_index = 0
    sampled = 0
    pts: list[float] = []
    buf = None
    last_end = 0.0
    fileobj = None

    def updates() -> dict:
        st = sampler.stats if sampler is not None else None
        return {
            "rotation_deg": st.rotation_deg if st is not None else None,
            "declared_duration_s": st.declared_duration_s if st is not None else None,
        }

    try:
        fileobj = _open(str(meta[S.URI]), storage_options, size)
        sampler = VideoSampler(
            fileobj,
            decode,
            frame_size,
            rotation,
            guards=guards,
            declared_duration_s=_as_float(meta.get(S.DECLARED_DURATION_S)),
            progress=progress,
            size_bytes=size,
        )
        for pts_s, rgb in sampler:
            if len(pts) == n:
                yield _payload(meta, chunk_index, buf, pts, sampled - n, pts_s, last=False, **updates())
                last_end = pts_s
                chunk_index += 1
                buf, pts = None, []
            if buf is None:
                buf = np.empty((n, h, w, 3), dtype=np.uint8)
            buf[len(pts)] = rgb
            pts.append(pts_s)
            sampled += 1
    except Exception as exc:  # noqa: BLE001 - every failure becomes the video's status
        err = exc if isinstance(exc, VideoDecodeError) else _open_error(exc) if sampler is None else None
        if err is None:
            err = VideoDecodeError(S.ERR_INTERNAL, f"{type(exc).__name__}: {exc}")
        if pts:  # keep what was sampled
            frames = buf[: len(pts)].copy() if len(pts) < n else buf
            end = max(pts[-1], sampler.stats.decoded_end_s if sampler is not None else 0.0)
            yield _payload(
                meta, chunk_index, frames, pts, sampled - len(pts), end, last=True, duration_s=end,
                frames_sampled=sampled, status=S.STATUS_PARTIAL, error_type=err.error_type,
                error=err.message, **updates(),
            )
        else:
            yield _terminal(
                meta, frame_size, chunk_index=chunk_index, frames_sampled=sampled, covered_s=last_end,
                error_type=err.error_type, error=err.message, **updates(),
            )
        return
    finally:
        if fileobj is not None:
            try:
                fileobj.close()
            except Exception:  # noqa: BLE001
                pass

    st = sampler.stats
    if not pts:
        kind = st.error_type or S.ERR_NO_FRAMES
        msg = st.error or f"the container opened but no frame was decoded ({st.packets} packets read)"
        yield _terminal(
            meta, frame_size, chunk_index=chunk_index, frames_sampled=sampled, covered_s=last_end,
            error_type=kind, error=msg, **updates(),
        )
        return
    status = S.STATUS_OK if st.error_type is None else S.STATUS_PARTIAL
    end = max(st.decoded_end_s, pts[-1])
    frames = buf[: len(pts)].copy() if len(pts) < n else buf
    yield _payload(
        meta, chunk_index, frames, pts, sampled - len(pts), end, last=True, duration_s=end,
        frames_sampled=sampled, status=status, error_type=st.error_type, error=st.error, **updates(),
    )


# ------------------------------------------------------------------------------------------- the operator


class DecodeVideos:
    """Ray Data operator: probe rows in, chunks of sampled RGB frames out (see the module docstring).

    Reads ``schema.VIDEO_META_COLUMNS`` (one row per video). Yields one batch per chunk, each a dict of
    1-row columns: every input column (metadata travels with each chunk; ``rotation_deg`` and
    ``declared_duration_s`` are set to what decoding used), plus ``chunk_index, is_last, frames
    (object: uint8 (T, H, W, 3)), pts_s (object: float64 (T,)), frame_index (object: int32 (T,)),
    chunk_end_s, duration_s, frames_sampled``. ``status / error_type / error`` are final on the
    ``is_last`` row; ``duration_s`` and ``frames_sampled`` are NaN / -1 before it.

    Args:
        decode: sampling, chunking and isolation settings.
        guards: limits re-checked on what the container declares, and while decoding.
        frame_size: (height, width) the encoder takes; frames are squashed to it (no crop).
        storage_options: passed to the filesystem resolver (e.g. an S3 endpoint).
    """

    reads = S.VIDEO_META_COLUMNS
    adds = DECODE_COLUMNS

    def __init__(
        self,
        decode: DecodeConfig,
        guards: GuardConfig,
        frame_size: tuple[int, int],
        storage_options: dict | None = None,
    ):
        h, w = (int(x) for x in frame_size)
        if h < 1 or w < 1:
            raise ValueError(f"{OPERATOR}: frame_size must be positive (height, width), got {frame_size}")
        self.decode = decode
        self.guards = guards
        self.frame_size = (h, w)
        self.storage_options = storage_options
        self._child: _DecoderChild | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        S.require_columns(batch, S.VIDEO_META_COLUMNS, OPERATOR)
        for i in range(len(batch[S.URI])):
            meta = {c: _scalar(batch[c][i]) for c in S.VIDEO_META_COLUMNS}
            if meta[S.STATUS] == S.STATUS_FAILED:
                payloads = _once(_terminal(
                    meta, self.frame_size, chunk_index=0, frames_sampled=0, covered_s=0.0,
                    error_type=meta[S.ERROR_TYPE], error=meta[S.ERROR],
                ))
            elif self.decode.isolate:
                payloads = self._decode_isolated(meta)
            else:
                payloads = decode_video_chunks(meta, self.decode, self.guards, self.frame_size, self.storage_options)
            try:
                for payload in payloads:
                    yield _to_batch(batch, i, payload)
            finally:
                payloads.close()  # a consumer that stops early ends the video (and its busy child) now

    def close(self) -> None:
        """Stop the decoder child process, if one is running."""
        if self._child is not None:
            self._child.stop()
            self._child = None

    def __del__(self):  # best effort: the child also exits when its pipe closes
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -------------------------------------------------------------- isolation

    def _decode_isolated(self, meta: dict) -> Iterator[dict[str, Any]]:
        """Decode one video in the child process, with a watchdog; yields payloads like decode_video_chunks."""
        chunk_index, sampled, covered = 0, 0, 0.0
        done = False
        try:
            if self._child is None or not self._child.alive():
                if self._child is not None:
                    self._child.kill()
                self._child = _DecoderChild(self.decode, self.guards, self.frame_size, self.storage_options)
            child = self._child
            outcome = child.start_job(meta)
            while outcome is None:
                kind, payload = child.next_message(self.decode.stall_timeout_s)
                if kind == "row":
                    yield payload
                    chunk_index = payload[S.CHUNK_INDEX] + 1
                    sampled += len(payload[S.PTS_S])
                    covered = payload[S.CHUNK_END_S]
                    if payload[S.IS_LAST]:
                        done = True
                        return
                elif kind in ("timeout", "crashed"):
                    outcome = (kind, payload)
            kind, detail = outcome
        except Exception as exc:  # noqa: BLE001 - the child could not even be started
            kind, detail = "internal", f"{type(exc).__name__}: {exc}"
        finally:
            if not done and self._child is not None and (not self._child.alive() or self._child.busy):
                # a video abandoned half way (timeout, crash, or the consumer stopped): its child goes
                self._child.kill()
                self._child = None
        error_type = {"timeout": S.ERR_TIMEOUT, "crashed": S.ERR_CRASHED}.get(kind, S.ERR_INTERNAL)
        done = True
        yield _terminal(
            meta, self.frame_size, chunk_index=chunk_index, frames_sampled=sampled, covered_s=covered,
            error_type=error_type, error=detail,
        )


class _DecoderChild:
    """A persistent decoder process (multiprocessing "spawn"), one video at a time over a Pipe."""

    def __init__(self, decode: DecodeConfig, guards: GuardConfig, frame_size, storage_options):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_child_main,
            args=(child_conn, decode.model_dump(), guards.model_dump(), tuple(frame_size), storage_options),
            name="ray-vlm-decode",
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        self.busy = False
        self._ready = False
        self._start_timeout_s = max(60.0, decode.stall_timeout_s)
        self._job = 0

    def alive(self) -> bool:
        return self.proc.is_alive()

    def start_job(self, meta: dict) -> tuple[str, str] | None:
        """Send one video; returns None, or (kind, detail) if the child is already gone."""
        if not self._ready:
            kind, detail = self._recv(self._start_timeout_s)
            if kind != "ready":
                return (kind, detail) if kind in ("timeout", "crashed") else ("crashed", f"unexpected {kind!r}")
            self._ready = True
        self._job += 1
        self.busy = True
        try:
            self.conn.send(("job", self._job, meta))
        except (BrokenPipeError, OSError):
            return "crashed", self._death()
        return None

    def next_message(self, stall_timeout_s: float) -> tuple[str, Any]:
        """The next row of the current job, skipping heartbeats: ("row", payload) | ("timeout"|"crashed", detail)."""
        while True:
            kind, payload = self._recv(stall_timeout_s)
            if kind == "alive":
                continue
            if kind == "row":
                job, row = payload
                if job != self._job:
                    continue
                if row[S.IS_LAST]:
                    self.busy = False
                return "row", row
            return kind, payload

    def _recv(self, timeout_s: float) -> tuple[str, Any]:
        if not self.conn.poll(timeout_s):
            self.kill()
            return "timeout", f"the decoder made no progress for {timeout_s:g} s and was killed"
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            return "crashed", self._death()
        if msg[0] == "row":
            return "row", (msg[1], msg[2])
        return msg[0], msg[1:] if len(msg) > 1 else None

    def _death(self) -> str:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code is None:
            self.kill()
            return "the decoder process stopped answering"
        if code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"the decoder process died (signal {name})"
        return f"the decoder process died (exit code {code})"

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        try:
            self.conn.close()
        except OSError:
            pass

    def stop(self) -> None:
        try:
            if self.proc.is_alive() and not self.busy:
                self.conn.send(("stop",))
                self.proc.join(timeout=2)
        except (BrokenPipeError, OSError):
            pass
        self.kill()


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


def _child_main(conn, decode_dict: dict, guards_dict: dict, frame_size, storage_options) -> None:
    """Entry point of the decoder process: decode the videos the parent sends, stream rows back."""
    decode = DecodeConfig(**decode_dict)
    guards = GuardConfig(**guards_dict)
    faults = _parse_faults(os.environ.get(FAULT_ENV, ""))
    interval_s = min(1.0, decode.stall_timeout_s / 4.0)
    last_beat = [time.monotonic()]

    def heartbeat() -> None:
        now = time.monotonic()
        if now - last_beat[0] >= interval_s:
            conn.send(("alive",))
            last_beat[0] = now

    try:
        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            _, job, meta = msg
            fault = next((f for f in faults if f.substring in str(meta[S.URI])), None)
            if fault is not None and fault.after_frames <= 0:
                _fire(fault)
            sent = 0
            for payload in decode_video_chunks(meta, decode, guards, tuple(frame_size), storage_options, heartbeat):
                conn.send(("row", job, payload))
                last_beat[0] = time.monotonic()
                sent += len(payload[S.PTS_S])
                if fault is not None and not payload[S.IS_LAST] and sent >= fault.after_frames:
                    _fire(fault)
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the parent went away


def _to_batch(batch: dict[str, np.ndarray], i: int, payload: dict[str, Any]) -> dict[str, np.ndarray]:
    """A 1-row batch: row ``i`` of every input column, updated by ``payload``, plus the decode columns."""
    out: dict[str, np.ndarray] = {}
    for name, col in batch.items():
        out[name] = col[i : i + 1].copy()
    for name in (S.STATUS, S.ERROR_TYPE, S.ERROR):
        out[name] = _object_col(payload[name])
    for name in (S.ROTATION_DEG, S.DECLARED_DURATION_S):
        value = payload[name]
        if value is not None:
            col = out[name]
            out[name] = np.array([value], dtype=col.dtype if col.dtype.kind in "iuf" else np.float64)
    out[S.CHUNK_INDEX] = np.array([payload[S.CHUNK_INDEX]], dtype=np.int32)
    out[S.IS_LAST] = np.array([payload[S.IS_LAST]], dtype=bool)
    out[S.FRAMES] = _object_col(payload[S.FRAMES])
    out[S.PTS_S] = _object_col(payload[S.PTS_S])
    out[S.FRAME_INDEX] = _object_col(payload[S.FRAME_INDEX])
    out[S.CHUNK_END_S] = np.array([payload[S.CHUNK_END_S]], dtype=np.float64)
    out[S.DURATION_S] = np.array([payload[S.DURATION_S]], dtype=np.float64)
    out[S.FRAMES_SAMPLED] = np.array([payload[S.FRAMES_SAMPLED]], dtype=np.int64)
    return out


def _once(payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield payload


def _object_col(value) -> np.ndarray:
    col = np.empty(1, dtype=object)
    col[0] = value
    return col


def _scalar(x):
    """A numpy scalar as a plain Python value (strings stay strings, NaN stays NaN)."""
    return x.item() if isinstance(x, np.generic) else x


def _finite(x) -> bool:
    v = _as_float(x)
    return math.isfinite(v)


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
