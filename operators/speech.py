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

Each model loads when first needed: the VAD with the first audio over -60 dBFS, the recogniser
with the first speech region, MiniLM with the first utterance; a job over silent tracks loads none of them.
A chunk whose speech cannot be made fails its video (``chunk_error``), as an encode failure does: a video is
never committed with a hole in its speech.
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
VAD_LINEAGE = "silero-vad-v6"
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

    # -------------------------------------------------------------- models (lazy, each when first needed)

    def _vad_model(self):
        if self._vad is None:
            from ray_vlm.models.speech import SileroVad

            self._vad = SileroVad(threads=1)
        return self._vad

    def _asr_model(self):
        if self._asr is None:
            from ray_vlm.models.speech import SpeechRecognizer, cpu_threads

            c = self.config
            self._asr = SpeechRecognizer(c.id, device=c.device, compute_type=c.compute_type, threads=cpu_threads(),
                                         language=c.language, beam_size=c.beam_size)
        return self._asr

    def _text_model(self):
        if self._text is None:
            from ray_vlm.models.bundled import MiniLMText

            self._text = MiniLMText()
        return self._text

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
        from ray_vlm.models.speech import SAMPLE_RATE, SILENT_DB, WINDOW, describe, speech_regions, window_db

        items = empty_items()
        utterances = []
        off = 0
        for start_s, count in spans:
            count = int(count)
            piece = audio[off: off + count]
            off += count
            if piece.size < WINDOW:
                continue
            db = window_db(piece)
            if bool(np.any(db > SILENT_DB)):  # the VAD only sees audio with something in it
                probs = self._vad_model().probs(piece, db=db)
                regions = speech_regions(probs, threshold=self.config.vad_threshold,
                                         total_s=piece.size / SAMPLE_RATE)
            else:
                probs, regions = np.zeros(db.size, dtype=np.float32), []
            for a, b in regions:
                seg = piece[int(a * SAMPLE_RATE): int(b * SAMPLE_RATE)]
                utterances.extend(self._asr_model().transcribe(seg, offset_s=float(start_s) + a))
            _sounds(items, piece, db, probs, float(start_s), self.config.vad_threshold)
        if utterances:
            asr = self._asr_model()
            emb = self._text_model().encode([u.text for u in utterances]).cpu().numpy().astype(np.float32)
            for u, e in zip(utterances, emb):
                _add(items, TRACK_SPEECH, u.start_s, u.end_s, u.text, e, u.confidence,
                     json.dumps({"model": describe(asr), "language": u.language}))
                for w in u.words:
                    _add(items, TRACK_WORD, w.start_s, w.end_s, w.text, None, w.confidence, None)
        lineage = json.dumps({"vad": VAD_LINEAGE, "level": f"{_SILENCE_DB:g} dBFS"})
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


def _sounds(items: dict[str, list], piece: np.ndarray, db: np.ndarray, probs: np.ndarray, start_s: float,
            threshold: float) -> None:
    """Silence, music and other sound of one piece, from its window levels and speech probabilities.

    A piece's first run continues the previous piece's last row when both have the same label and the pieces
    are contiguous (the previous piece only dropped its last partial window): the row is extended instead of
    a second one added.
    """
    from ray_vlm.models.speech import SAMPLE_RATE, WINDOW

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
                text, conf = "silence", 1.0
            else:
                flat = _flatness(piece[i * WINDOW: j * WINDOW])
                text, conf = ("music" if flat < _TONAL_FLATNESS else "sound"), float(1.0 - float(np.mean(probs[i:j])))
            if not (i == 0 and _extend_last(items, text, s, e, conf)):  # a piece's first run may continue a row
                _add(items, TRACK_SOUND, s, e, text, None, conf, None)
        i = j


def _extend_last(items: dict[str, list], text: str, start: float, end: float, conf: float) -> bool:
    """Extend the last sound row to ``end`` if it has label ``text`` and ends within a window of ``start``."""
    from ray_vlm.models.speech import SAMPLE_RATE, WINDOW

    k = len(items[S.TRACK]) - 1
    if k < 0 or items[S.TRACK][k] != TRACK_SOUND or items[S.TEXT][k] != text:
        return False
    if abs(start - items[S.END_S][k]) > 1.5 * WINDOW / SAMPLE_RATE:  # pieces drop their last partial window
        return False
    a, b = items[S.START_S][k], items[S.END_S][k]
    w_old, w_new = b - a, end - start
    items[S.CONFIDENCE][k] = float((items[S.CONFIDENCE][k] * w_old + conf * w_new) / max(w_old + w_new, 1e-9))
    items[S.END_S][k] = float(end)
    return True


def _flatness(x: np.ndarray, n_fft: int = 1024) -> float:
    """Mean spectral flatness (geometric / arithmetic mean of the power spectrum) over frames of ``x``."""
    k = x.size // n_fft
    if k == 0:
        return 1.0
    frames = x[: k * n_fft].reshape(k, n_fft) * np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12
    flat = np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)
    return float(np.mean(flat))
