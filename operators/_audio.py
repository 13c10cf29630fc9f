"""The audio side of the decode pass: one audio stream, resampled to 16 kHz mono float32, in bounded pieces.

Runs inside the decoder child (standard library, numpy and PyAV only). The video sampler demuxes the video stream
and one audio stream together and hands every audio packet to :class:`AudioTrack`, so a file is read once.

Contract:

- Packets are decoded one by one: a packet FFmpeg cannot decode costs that packet (counted in ``bad_packets``),
  never the rest of the track. No helper that turns a failure into empty audio is used.
- FFmpeg's resampler converts to float32 mono at :data:`SAMPLE_RATE` (``flt``, ``mono``). Times come from each
  decoded frame's pts (``(pts - start_time) * time_base``); within a run of contiguous frames the output is
  placed sample by sample after the run's first time. A gap in pts up to :data:`GAP_S` (a packet that could not
  be decoded) is filled with silence, so later audio keeps its time; a longer jump, or one backwards, starts a
  new *piece* at the new time; a change of input format (rate, layout) starts a new resampler, continuing the
  same piece.
- Audio is taken at chunk boundaries (:meth:`AudioTrack.take`): everything up to the quietest 20 ms in the last
  :data:`CUT_SEARCH_S` seconds before the boundary (so a word is rarely cut in two), the rest stays for the next
  chunk. A taken chunk is ``(samples float32 (N,), spans float64 (k, 2))``, each span ``(start_s, n_samples)`` of
  one contiguous piece, the pieces concatenated in ``samples``.
- Frames before ``start_s`` (a resumed video) and frames already decoded (a decoder restart that demuxes again
  from the start) are dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
JITTER_S = 0.01  # pts this close to where the previous frame ended are contiguous (timestamp rounding)
GAP_S = 1.0  # a gap up to this long (a lost packet) is filled with silence; a longer one starts a new piece
CUT_SEARCH_S = 2.0  # where take() looks for a quiet place to cut, before the boundary
_CUT_WIN = SAMPLE_RATE // 50  # 20 ms windows for the quiet-place search


def empty_audio() -> tuple[np.ndarray, np.ndarray]:
    """No audio: zero samples, zero spans."""
    return np.zeros(0, dtype=np.float32), np.zeros((0, 2), dtype=np.float64)


class AudioTrack:
    """Decodes and resamples one audio stream as its packets arrive; hands out bounded pieces.

    Args:
        stream: the PyAV audio stream being demuxed.
        start_s: drop audio before this time (a resumed video).
        max_sample_rate, min_sample_rate: a stream declaring a rate outside these is not decoded (``refused`` says
            why).
    """

    def __init__(self, stream: Any, start_s: float = 0.0, max_sample_rate: int = 192_000,
                 min_sample_rate: int = 4_000):
        self.stream = stream
        self.cc = stream.codec_context
        self.tb = float(stream.time_base) if stream.time_base else None
        self.origin = stream.start_time if stream.start_time is not None else None
        self.start_s = max(0.0, float(start_s or 0.0))
        self.codec = self.cc.name if self.cc is not None else ""
        rate = int(self.cc.sample_rate or 0) if self.cc is not None else 0
        self.refused = ""
        if self.cc is None:
            self.refused = "no decoder for the audio stream"
        elif rate > max_sample_rate:
            self.refused = f"audio declares {rate} Hz, over the guard of {max_sample_rate} Hz"
        elif rate < min_sample_rate:
            self.refused = f"audio declares {rate} Hz, under the guard of {min_sample_rate} Hz"
        self.packets = 0
        self.bad_packets = 0
        self.first_error = ""
        self.decoded_s = 0.0  # seconds of audio handed on or held
        self._resampler: Any = None
        self._pieces: list[list[Any]] = []  # [start_s, [arrays], n_samples]
        self._next_t: float | None = None  # where the next input frame is expected (input time)
        self._out_t = 0.0  # time of the next resampled sample of the current run
        self._fed_to = -math.inf  # input time fed to the resampler so far: a restart's repeated frames are dropped

    # -------------------------------------------------------------- input

    @property
    def active(self) -> bool:
        return not self.refused

    def feed(self, packet: Any) -> None:
        """One demuxed packet of this stream (an empty packet flushes the decoder)."""
        if not self.active:
            return
        self.packets += 1
        try:
            frames = self.cc.decode(packet if packet.size else None)
        except Exception as exc:  # noqa: BLE001 - a corrupt packet costs that packet
            self.bad_packets += 1
            if not self.first_error:
                self.first_error = f"{type(exc).__name__}: {exc}"
            return
        for frame in frames:
            self._frame(frame)

    def finish(self) -> None:
        """End of the stream: flush the decoder and the resampler."""
        if not self.active:
            return
        try:
            frames = self.cc.decode(None)
        except Exception:  # noqa: BLE001 - nothing more to get
            frames = []
        for frame in frames:
            self._frame(frame)
        self._flush_resampler()

    def _frame(self, frame: Any) -> None:
        rate = int(frame.sample_rate or 0)
        if rate <= 0 or frame.samples <= 0:
            return
        if frame.pts is not None and self.tb is not None:
            t = (frame.pts - (self.origin or 0)) * self.tb
        elif self._next_t is not None:
            t = self._next_t
        else:
            t = 0.0
        dur = frame.samples / rate
        if t + dur <= max(self.start_s, self._fed_to) + 1e-6:
            self._next_t = t + dur
            return  # before the resume point, or already decoded (a restart demuxes again from the start)
        gap = math.inf if self._next_t is None else t - self._next_t
        if JITTER_S < gap <= GAP_S:  # a lost packet: silence in its place keeps later audio at its time
            self._flush_resampler()
            n = int(round((t - self._out_t) * SAMPLE_RATE))
            if n > 0 and self._pieces:
                self._append_samples(np.zeros(n, dtype=np.float32))
        elif abs(gap) > JITTER_S:
            self._flush_resampler()
            self._pieces.append([t, [], 0])
            self._out_t = t
        self._next_t = t + dur
        self._fed_to = max(self._fed_to, t + dur)
        self._resample(frame)

    def _resample(self, frame: Any) -> None:
        import av

        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            out = self._resampler.resample(frame)
        except ValueError:  # the input format changed: a new resampler continues the piece
            self._flush_resampler()
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            out = self._resampler.resample(frame)
        self._append(out)

    def _flush_resampler(self) -> None:
        if self._resampler is None:
            return
        try:
            out = self._resampler.resample(None)
        except Exception:  # noqa: BLE001 - nothing buffered
            out = []
        self._resampler = None
        self._append(out)

    def _append(self, frames: list) -> None:
        for f in frames:
            a = f.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if a.size:
                self._append_samples(a)

    def _append_samples(self, a: np.ndarray) -> None:
        if not self._pieces:  # everything held was taken: the run goes on in a new piece
            self._pieces.append([self._out_t, [], 0])
        piece = self._pieces[-1]
        piece[1].append(a)
        piece[2] += a.size
        self._out_t += a.size / SAMPLE_RATE
        self.decoded_s += a.size / SAMPLE_RATE

    # -------------------------------------------------------------- output

    def held_s(self) -> float:
        """Seconds of audio held (not yet taken)."""
        return sum(p[2] for p in self._pieces) / SAMPLE_RATE

    def end_s(self) -> float:
        """Time the held audio reaches (the last piece's end), or -inf when nothing is held."""
        if not self._pieces:
            return -math.inf
        p = self._pieces[-1]
        return p[0] + p[2] / SAMPLE_RATE

    def take(self, until_s: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The held audio up to about ``until_s`` (None: all of it, the end of the track), as (samples, spans).

        The cut is the quietest 20 ms window within :data:`CUT_SEARCH_S` before ``until_s``; what follows it stays.
        """
        if until_s is None:
            self._flush_resampler()
        taken: list[tuple[float, np.ndarray]] = []
        keep: list[list[Any]] = []
        for i, (start, arrays, n) in enumerate(self._pieces):
            if n == 0:
                continue
            samples = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            end = start + n / SAMPLE_RATE
            if until_s is None or end < until_s:
                taken.append((start, samples))
                continue
            if start >= until_s:
                keep.append([start, [samples], n])
                continue
            cut = _quiet_cut(samples, start, until_s)
            if cut > 0:
                taken.append((start, samples[:cut]))
            rest = samples[cut:]
            keep.append([start + cut / SAMPLE_RATE, [rest], rest.size])
            keep.extend(self._pieces[i + 1:])
            break
        self._pieces = keep
        if not taken:
            return empty_audio()
        samples = np.concatenate([a for _, a in taken]).astype(np.float32, copy=False)
        spans = np.asarray([(s, a.size) for s, a in taken], dtype=np.float64).reshape(-1, 2)
        return samples, spans

    def stats(self) -> dict[str, Any]:
        return {"audio_codec": self.codec, "audio_packets": self.packets, "audio_bad_packets": self.bad_packets,
                "audio_s": round(self.decoded_s, 3), "audio_refused": self.refused,
                "audio_error": self.first_error}


def _quiet_cut(samples: np.ndarray, start_s: float, until_s: float) -> int:
    """Sample offset to cut ``samples`` (starting at ``start_s``) near ``until_s``: the quietest 20 ms before it."""
    hi = int(round((until_s - start_s) * SAMPLE_RATE))
    hi = max(0, min(hi, samples.size))
    lo = max(0, hi - int(CUT_SEARCH_S * SAMPLE_RATE))
    n = (hi - lo) // _CUT_WIN
    if n < 2:
        return hi
    seg = samples[hi - n * _CUT_WIN: hi].reshape(n, _CUT_WIN)
    energy = np.einsum("ij,ij->i", seg, seg)
    k = int(np.argmin(energy[::-1]))  # the latest of equally quiet windows
    k = n - 1 - k
    return hi - n * _CUT_WIN + k * _CUT_WIN + _CUT_WIN // 2


def pick_audio_stream(container: Any) -> tuple[Any, int]:
    """The audio stream to decode (the default one, else the first) and how many audio streams there are."""
    streams = list(container.streams.audio)
    if not streams:
        return None, 0
    from av.stream import Disposition

    default = [s for s in streams if s.disposition & Disposition.default]
    return (default or streams)[0], len(streams)
