"""Speech stage: each chunk's audio becomes time-ranged items of the speech and sound tracks.

Reads the audio decode took with each chunk (``audio``: 16 kHz mono float32, ``audio_spans``: its contiguous
pieces) and replaces it with ``segment_items``: the rows this chunk adds to the store's ``segments`` table, as
the bytes of an Arrow IPC stream (``schema.segment_items_bytes``). Per piece:

1. voice activity (Silero VAD, ``ray_vlm.models.speech.SileroVad``) gives speech regions (pauses under 0.4 s
   bridged, 0.2 s of padding, at most 28 s each);
2. each region is recognised with word times (faster-whisper; ``asr.id``, the bundled Whisper tiny.en by
   default): one ``speech`` row per utterance (text, confidence = exp(mean log-probability) x (1 - no-speech
   probability), its MiniLM embedding) and one ``word`` row per word (its own times and probability);
3. the sound track, from the same statistics: ``silence`` (every 32 ms window under -50 dBFS for 2 s or more),
   ``music`` (2 s or more of sound with no speech and a tonal spectrum) and ``sound`` (the same, not tonal); the
   sound rows' text is that label and their confidence the share of windows that agree.

Models load on the first chunk with audio, so a job over silent videos never loads them. A chunk whose speech
cannot be made fails its video (``chunk_error``), as an encode failure does: a video is never committed with a
hole in its speech.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.config import SPEECH_RESOURCES, SpeechConfig

OPERATOR = "TranscribeSpeech"
TRACK_SPEECH, TRACK_WORD, TRACK_SOUND = "speech", "word", "sound"
_MAX_ERROR_CHARS = 2000
_SILENCE_DB = -50.0
_MIN_SOUND_S = 2.0
_TONAL_FLATNESS = 0.3  # mean spectral flatness under this: tonal (music); noise is flat (near 1)


def empty_items() -> dict[str, list]:
    """No segment rows."""
    return {f: [] for f in S.SEGMENT_ITEM_FIELDS}


class TranscribeSpeech:
    """Ray Data operator: audio in, speech / word / sound segment rows out (see the module docstring).

    Args:
        speech: which recogniser, on which device, and the VAD threshold.
    """

    reads = (S.VIDEO_ID, S.CHUNK_INDEX, S.AUDIO, S.AUDIO_SPANS)
    adds = (S.SEGMENT_ITEMS,)
    resources = SPEECH_RESOURCES

    def __init__(self, speech: SpeechConfig | None = None):
        self.config = speech or SpeechConfig()
        self._vad: Any = None
        self._asr: Any = None
        self._text: Any = None

    # -------------------------------------------------------------- models (lazy)

    def _models(self):
        if self._asr is None:
            from ray_vlm.models.bundled import MiniLMText
            from ray_vlm.models.speech import SileroVad, SpeechRecognizer, cpu_threads

            c = self.config
            threads = cpu_threads()
            self._vad = SileroVad(threads=1)
            self._asr = SpeechRecognizer(c.id, device=c.device, compute_type=c.compute_type, threads=threads,
                                         language=c.language, beam_size=c.beam_size)
            self._text = MiniLMText()
        return self._vad, self._asr, self._text

    # -------------------------------------------------------------- the operator

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        S.require_columns(batch, self.reads, OPERATOR)
        n = len(batch[S.VIDEO_ID])
        status = np.array(batch[S.STATUS], dtype=object) if S.STATUS in batch else np.full(n, None, dtype=object)
        chunk_error = (np.array(batch[S.CHUNK_ERROR], dtype=object) if S.CHUNK_ERROR in batch
                       else np.full(n, None, dtype=object))
        error_type = np.array(batch[S.ERROR_TYPE], dtype=object) if S.ERROR_TYPE in batch else None
        error = np.array(batch[S.ERROR], dtype=object) if S.ERROR in batch else None
        items = []
        for r in range(n):
            audio = np.asarray(batch[S.AUDIO][r] if batch[S.AUDIO][r] is not None else [], dtype=np.float32)
            spans = np.asarray(batch[S.AUDIO_SPANS][r] if batch[S.AUDIO_SPANS][r] is not None else [],
                               dtype=np.float64).reshape(-1, 2)
            if audio.size == 0 or status[r] == S.STATUS_FAILED:
                items.append(b"")
                continue
            try:
                items.append(S.segment_items_bytes(self.chunk_items(audio, spans)))
            except Exception as e:  # noqa: BLE001 - a per-chunk failure is data
                msg = f"{OPERATOR}: {type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
                chunk_error[r] = msg
                status[r] = S.STATUS_FAILED
                if error_type is not None and error is not None:
                    error_type[r], error[r] = S.ERR_INTERNAL, msg
                items.append(b"")
        out = {k: v for k, v in batch.items() if k not in (S.AUDIO, S.AUDIO_SPANS)}
        if S.STATUS in batch:
            out[S.STATUS] = status
        if error_type is not None and error is not None:
            out[S.ERROR_TYPE], out[S.ERROR] = error_type, error
        out[S.CHUNK_ERROR] = chunk_error
        out[S.SEGMENT_ITEMS] = S.object_column(items)
        return out

    def chunk_items(self, audio: np.ndarray, spans: np.ndarray) -> dict[str, list]:
        """The segment rows of one chunk's audio (pieces ``spans``: ``(start_s, n_samples)`` each)."""
        from ray_vlm.models.speech import SAMPLE_RATE, WINDOW, describe, speech_regions

        vad, asr, text = self._models()
        items = empty_items()
        lineage = json.dumps({"model": describe(asr), "vad": "silero-vad-v6"})
        utterances = []
        off = 0
        for start_s, count in spans:
            count = int(count)
            piece = audio[off: off + count]
            off += count
            if piece.size < WINDOW:
                continue
            probs = vad.probs(piece)
            regions = speech_regions(probs, threshold=self.config.vad_threshold, total_s=piece.size / SAMPLE_RATE)
            for a, b in regions:
                seg = piece[int(a * SAMPLE_RATE): int(b * SAMPLE_RATE)]
                utterances.extend(asr.transcribe(seg, offset_s=float(start_s) + a))
            _sounds(items, piece, probs, float(start_s), self.config.vad_threshold)
        if utterances:
            emb = text.encode([u.text for u in utterances]).cpu().numpy().astype(np.float32)
            for u, e in zip(utterances, emb):
                _add(items, TRACK_SPEECH, u.start_s, u.end_s, u.text, e, u.confidence,
                     json.dumps({"model": describe(asr), "language": u.language}))
                for w in u.words:
                    _add(items, TRACK_WORD, w.start_s, w.end_s, w.text, None, w.confidence, None)
        for i, t in enumerate(items[S.TRACK]):
            if t == TRACK_SOUND:
                items[S.LINEAGE][i] = lineage
        return items


def _add(items: dict[str, list], track: str, start: float, end: float, text: str | None, emb, conf: float,
         lineage: str | None) -> None:
    items[S.TRACK].append(track)
    items[S.START_S].append(float(start))
    items[S.END_S].append(float(max(end, start)))
    items[S.TEXT].append(text)
    items[S.EMBEDDING].append(None if emb is None else np.asarray(emb, dtype=np.float32))
    items[S.CONFIDENCE].append(float(conf))
    items[S.LINEAGE].append(lineage)


def _sounds(items: dict[str, list], piece: np.ndarray, probs: np.ndarray, start_s: float, threshold: float) -> None:
    """Silence, music and other sound of one piece, from its window levels and speech probabilities."""
    from ray_vlm.models.speech import SAMPLE_RATE, WINDOW, window_db

    db = window_db(piece)
    n = min(len(db), len(probs))
    if n == 0:
        return
    win_s = WINDOW / SAMPLE_RATE
    label = np.where(db[:n] < _SILENCE_DB, 0, np.where(probs[:n] >= threshold, 1, 2))  # silence, speech, sound
    min_w = int(round(_MIN_SOUND_S / win_s))
    i = 0
    while i < n:
        j = i
        while j < n and label[j] == label[i]:
            j += 1
        if label[i] != 1 and j - i >= min_w:
            s, e = start_s + i * win_s, start_s + j * win_s
            if label[i] == 0:
                _add(items, TRACK_SOUND, s, e, "silence", None, 1.0, None)
            else:
                flat = _flatness(piece[i * WINDOW: j * WINDOW])
                _add(items, TRACK_SOUND, s, e, "music" if flat < _TONAL_FLATNESS else "sound", None,
                     float(1.0 - float(np.mean(probs[i:j]))), None)
        i = j


def _flatness(x: np.ndarray, n_fft: int = 1024) -> float:
    """Mean spectral flatness (geometric / arithmetic mean of the power spectrum) over frames of ``x``."""
    k = x.size // n_fft
    if k == 0:
        return 1.0
    frames = x[: k * n_fft].reshape(k, n_fft) * np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12
    flat = np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)
    return float(np.mean(flat))
