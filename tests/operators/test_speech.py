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


def test_silence_rows_continue_across_contiguous_pieces_only():
    """Back-to-back pieces: one silence row; pieces 2 s apart: two rows; a click inside silence splits it."""
    op = TranscribeSpeech()
    z = np.zeros(5 * RATE, np.float32)

    def rows(audio, spans):
        t = S.segment_items_table(S.segment_items_bytes(op.chunk_items(audio, np.asarray(spans, np.float64))))
        return [(r[S.TEXT], r[S.START_S], r[S.END_S]) for r in t.to_pylist()]

    n = z.size
    one = rows(np.concatenate([z, z]), [[0.0, n], [5.0, n]])
    assert len(one) == 1 and one[0][0] == "silence" and one[0][1] == 0.0 and one[0][2] == pytest.approx(10.0, abs=0.1)
    two = rows(np.concatenate([z, z]), [[0.0, n], [7.0, n]])
    assert [r[0] for r in two] == ["silence", "silence"] and two[1][1] == pytest.approx(7.0)
    clicked = z.copy()
    clicked[int(2.5 * RATE): int(2.5 * RATE) + 512] = 0.5  # one loud 32 ms window
    split = rows(clicked, [[0.0, n]])
    assert [r[0] for r in split] == ["silence", "silence"] and split[0][2] <= 2.55 <= split[1][1] + 0.05
    assert (op._vad is not None, op._asr, op._text) == (True, None, None)  # the click reached the VAD only


_SILENT_CHILD = r"""
import json, sys
import numpy as np
from ray_vlm.core import schema as S
from ray_vlm.core.config import AudioConfig, DecodeConfig, GuardConfig
from ray_vlm.operators._decode_job import AudioSettings, GuardSettings, SamplerSettings
from ray_vlm.operators._sampler import sample_chunks
from ray_vlm.operators.speech import TranscribeSpeech

def peak_rss_mb():  # this process's own high-water mark (getrusage's would include the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


op = TranscribeSpeech()
chunks, samples, biggest, rows = 0, 0, 0, []
for ev in sample_chunks(("path", sys.argv[1]), SamplerSettings.of(DecodeConfig()), GuardSettings.of(GuardConfig()),
                        (64, 64), audio=AudioSettings.of(AudioConfig())):
    chunks += 1
    samples += ev.audio.size
    biggest = max(biggest, ev.audio.size)
    table = S.segment_items_table(S.segment_items_bytes(op.chunk_items(ev.audio, ev.audio_spans)))
    rows += [(r[S.TRACK], r[S.TEXT], r[S.START_S], r[S.END_S]) for r in table.to_pylist()]
print(json.dumps({"chunks": chunks, "samples": samples, "biggest": biggest, "rows": rows,
                  "models": [m is not None for m in (op._vad, op._asr, op._text)],
                  "max_rss_mb": peak_rss_mb()}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_six_hour_silent_track_in_bounded_memory_without_models(tmp_path):
    """Six hours of silence: decoded in 30 s chunks, one silence row per chunk, no model loaded, memory bounded
    (the whole track as 16 kHz float32 would be 1.4 GB; the process stays under 600 MB, imports included)."""
    import json
    import subprocess
    import sys

    from fixtures.videos import make_silent_flac

    path = make_silent_flac(tmp_path / "silence.flac", hours=6)
    out = subprocess.run([sys.executable, "-c", _SILENT_CHILD, str(path)], capture_output=True, text=True,
                         timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["samples"] == pytest.approx(6 * 3600 * RATE, abs=RATE)
    # chunks of about 30 s (each cut a little after 30 s, at the decoder's frame size): ~720 of them
    assert got["biggest"] <= 31 * RATE and 700 <= got["chunks"] <= 721
    assert got["models"] == [False, False, False]
    rows = got["rows"]
    assert {(t, x) for t, x, _, _ in rows} == {("sound", "silence")}
    assert got["chunks"] - 1 <= len(rows) <= got["chunks"]  # one per chunk (a last chunk under 2 s has none)
    covered = sum(e - s for _, _, s, e in rows)
    assert covered >= 0.99 * 6 * 3600
    assert got["max_rss_mb"] < 600, got["max_rss_mb"]
