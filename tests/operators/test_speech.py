"""The speech stage on spoken sentences (espeak-ng): words with their times, utterances, sound labels."""

import numpy as np
import pytest

from benchmarks.speechgen import RATE, speech_track
from ray_vlm.core import schema as S
from ray_vlm.operators.speech import TranscribeSpeech
from ray_vlm.query.tracks import terms

SENTENCES = [(3.0, "The quarterly budget was approved by the committee on Tuesday."),
             (12.0, "Tomatoes need at least six hours of sunlight.")]


@pytest.fixture(scope="module")
def op():
    return TranscribeSpeech()


@pytest.fixture(scope="module")
def talk():
    tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(4 * RATE) / RATE)
    bed = np.zeros(24 * RATE, np.float32)
    bed[19 * RATE: 23 * RATE] = tone  # music-like: a steady tone, no speech
    return speech_track(24.0, SENTENCES, bed=bed)


def test_words_utterances_and_sounds_with_their_times(op, talk):
    audio, truth = talk
    offset = 100.0  # the chunk's audio starts 100 s into its source
    items = S.segment_items_table(S.segment_items_bytes(op.chunk_items(audio, np.array([[offset, audio.size]]))))
    rows = items.to_pylist()
    speech = [r for r in rows if r[S.TRACK] == "speech"]
    words = [r for r in rows if r[S.TRACK] == "word"]
    sounds = [r for r in rows if r[S.TRACK] == "sound"]
    assert len(speech) == 2
    for said, u in zip(truth, speech):
        # the key words are recognised (recognition of synthetic speech is not perfect: most, not all)
        got = set(terms(u[S.TEXT]))
        want = set(terms(said.text))
        assert len(got & want) >= 0.6 * len(want), (u[S.TEXT], said.text)
        # utterance times from the word times, within 0.3 s of where the voice is
        assert u[S.START_S] == pytest.approx(offset + said.start_s, abs=0.3)
        assert u[S.END_S] == pytest.approx(offset + said.end_s, abs=0.3)
        assert len(u[S.EMBEDDING]) == 384 and 0 < u[S.CONFIDENCE] <= 1
        inside = [w for w in words if u[S.START_S] - 1e-6 <= w[S.START_S] <= u[S.END_S] + 1e-6]
        assert len(inside) >= 5 and all(w[S.END_S] >= w[S.START_S] for w in inside)
        assert all(w[S.EMBEDDING] is None and 0 <= w[S.CONFIDENCE] <= 1 for w in inside)
    labels = {r[S.TEXT] for r in sounds}
    assert "silence" in labels
    music = [r for r in sounds if r[S.TEXT] == "music"]
    assert len(music) == 1 and music[0][S.START_S] == pytest.approx(offset + 19, abs=0.3)


def test_operator_replaces_audio_with_segment_items(op, talk):
    audio, _ = talk
    batch = {S.VIDEO_ID: np.array(["a", "b", "c"], dtype=object), S.CHUNK_INDEX: np.array([0, 0, 0]),
             S.STATUS: np.array([S.STATUS_OK, S.STATUS_OK, S.STATUS_FAILED], dtype=object),
             S.AUDIO: S.object_column([audio, np.zeros(0, np.float32), audio]),
             S.AUDIO_SPANS: S.object_column([np.array([[0.0, audio.size]]), np.zeros((0, 2)),
                                              np.array([[0.0, audio.size]])])}
    out = op(batch)
    assert S.AUDIO not in out and S.AUDIO_SPANS not in out
    blobs = list(out[S.SEGMENT_ITEMS])
    assert len(blobs[0]) > 0 and blobs[1] == b"" and blobs[2] == b""  # no audio; failed upstream
    assert S.segment_items_table(blobs[0]).num_rows > 10
    assert list(out[S.CHUNK_ERROR]) == [None, None, None]
