"""Media with exact ground truth for the speech and text tracks, generated offline.

Sentences are spoken by espeak-ng (Debian's package; ``make`` installs it) and mixed into an audio track at known
times; the video track is a moving synthetic picture (or the frames given), with text drawn onto frames at
known times in Pillow's bundled font. Each sentence's ground truth is where its voice actually is: the first and
last 10 ms above -40 dBFS of espeak's output, placed at its time.

Used by the speech benchmark (``python -m benchmarks speech``) and by the tests.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

RATE = 16_000


class SpeechGenError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True)
class Said:
    """A sentence placed in a track: its text and where its voice is, in seconds."""

    text: str
    start_s: float
    end_s: float


def speak(text: str, *, voice: str = "en-us", wpm: int = 150) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 mono at 16 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechGenError("espeak-ng is not installed (make installs it: apt-get install espeak-ng)")
    try:
        wav = subprocess.run([exe, "-v", voice, "-s", str(int(wpm)), "--stdout", text], check=True,
                             capture_output=True, timeout=60).stdout
    except (subprocess.SubprocessError, OSError) as e:
        raise SpeechGenError(f"espeak-ng failed: {e}") from e
    import av

    with av.open(io.BytesIO(wav)) as c:
        r = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        parts = [f.to_ndarray().reshape(-1) for fr in c.decode(audio=0) for f in r.resample(fr)]
        parts += [f.to_ndarray().reshape(-1) for f in r.resample(None)]
    return np.concatenate(parts).astype(np.float32)


def voiced_span(samples: np.ndarray, db: float = -40.0) -> tuple[float, float]:
    """(first, last) second of ``samples`` whose 10 ms windows are above ``db`` dBFS."""
    win = RATE // 100
    n = samples.size // win
    if n == 0:
        return 0.0, 0.0
    w = samples[: n * win].reshape(n, win)
    level = 10 * np.log10(np.maximum(np.mean(w * w, axis=1), 1e-12))
    on = np.flatnonzero(level > db)
    if on.size == 0:
        return 0.0, 0.0
    return on[0] * win / RATE, (on[-1] + 1) * win / RATE


def speech_track(duration_s: float, sentences: Sequence[tuple[float, str]], *, bed: np.ndarray | None = None,
                 voice: str = "en-us", wpm: int = 150) -> tuple[np.ndarray, list[Said]]:
    """An audio track of ``duration_s`` with each ``(time_s, text)`` spoken from ``time_s`` (mixed over ``bed``)."""
    audio = np.zeros(int(round(duration_s * RATE)), dtype=np.float32)
    if bed is not None:
        b = np.asarray(bed, dtype=np.float32).reshape(-1)[: audio.size]
        audio[: b.size] += b
    truth = []
    for t, text in sentences:
        v = speak(text, voice=voice, wpm=wpm)
        i = int(round(t * RATE))
        n = max(0, min(v.size, audio.size - i))
        audio[i: i + n] += v[:n]
        a, b = voiced_span(v[:n])
        truth.append(Said(text, t + a, t + b))
    return np.clip(audio, -1.0, 1.0), truth


def draw_text(rgb: np.ndarray, text: str, *, size: int = 28, xy: tuple[int, int] | None = None,
              color=(255, 255, 255), box=(0, 0, 0)) -> np.ndarray:
    """``rgb`` with ``text`` drawn in Pillow's bundled font (on a box, centred unless ``xy`` is given)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(rgb))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    if xy is None:
        xy = ((img.width - w) // 2, (img.height - h) // 2)
    pad = max(2, size // 5)
    if box is not None:
        d.rectangle([xy[0] - pad, xy[1] - pad + y0, xy[0] + w + pad, xy[1] + y0 + h + pad], fill=box)
    d.text(xy, text, font=font, fill=color)
    return np.asarray(img)


def write_media(path: str | Path, audio: np.ndarray | None, *, duration_s: float, fps: float = 10.0,
                width: int = 320, height: int = 180,
                frame: Callable[[int, float], np.ndarray] | None = None) -> Path:
    """Write ``path``: H.264 video (``frame(i, t)`` RGB, or a moving gradient) and AAC 16 kHz mono ``audio``
    (None: no audio stream), packets interleaved by time. ``fps=0``: audio only (use an ``.m4a`` suffix)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video = fps > 0
    c = av.open(str(path), "w")
    try:
        vs = None
        if video:
            vs = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.codec_context.gop_size = max(1, int(round(2 * fps)))
            vs.codec_context.thread_count = 1
        ast = None
        if audio is not None:
            ast = c.add_stream("aac", rate=RATE)
            ast.layout = "mono"
        n_frames = int(round(duration_s * fps)) if video else 0
        a = np.zeros(0, np.float32) if audio is None else np.asarray(audio, dtype=np.float32).reshape(-1)
        fs, pos, vi = 1024, 0, 0
        while vi < n_frames or (ast is not None and pos < a.size):
            a_t = pos / RATE if ast is not None and pos < a.size else np.inf
            if vi < n_frames and vi / fps <= a_t:
                t = vi / fps
                rgb = frame(vi, t) if frame is not None else _gradient(vi, width, height)
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
                vf.pts, vf.time_base = vi, 1 / Fraction(fps).limit_denominator(1001)
                vf.pict_type = av.video.frame.PictureType.NONE
                for p in vs.encode(vf):  # type: ignore[union-attr]
                    c.mux(p)
                vi += 1
            else:
                s = a[pos: pos + fs]
                if s.size < fs:
                    s = np.pad(s, (0, fs - s.size))
                af = av.AudioFrame.from_ndarray(s[None, :], format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = RATE, pos, Fraction(1, RATE)
                for p in ast.encode(af):  # type: ignore[union-attr]
                    c.mux(p)
                pos += fs
        for st in (vs, ast):
            if st is not None:
                for p in st.encode():
                    c.mux(p)
    finally:
        c.close()
    return path


def _gradient(i: int, w: int, h: int) -> np.ndarray:
    x = (np.arange(w)[None, :] + 3 * i) % 256
    y = np.arange(h)[:, None] % 256
    return np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)),
                     np.full((h, w), (40 * i) % 256)], axis=-1).astype(np.uint8)
