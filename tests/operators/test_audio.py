"""Audio in the decode pass: one demux, 16 kHz mono pieces with pts times, audio-only sources, lost packets."""

from fractions import Fraction

import numpy as np
import pytest

from fixtures.videos import make_audio_only, make_video
from ray_vlm.core import schema as S
from ray_vlm.core.config import AudioConfig, DecodeConfig, GuardConfig
from ray_vlm.operators._audio import SAMPLE_RATE
from ray_vlm.operators._decode_job import AudioSettings, GuardSettings, SamplerSettings
from ray_vlm.operators._sampler import sample_chunks
from ray_vlm.operators.decode import DecodeVideos


def _chunks(path, audio=True, **decode):
    return list(sample_chunks(("path", str(path)), SamplerSettings.of(DecodeConfig(**decode)),
                              GuardSettings.of(GuardConfig()), (64, 64),
                              audio=AudioSettings.of(AudioConfig()) if audio else None))


def _check_contiguous(events, total_s, tol_s=0.1):
    """The chunks' audio pieces follow each other without gap or overlap and cover the whole track."""
    spans = np.concatenate([ev.audio_spans for ev in events if len(ev.audio_spans)])
    assert sum(ev.audio.size for ev in events) == int(spans[:, 1].sum())
    ends = spans[:, 0] + spans[:, 1] / SAMPLE_RATE
    assert spans[0, 0] == pytest.approx(0.0, abs=tol_s)
    np.testing.assert_allclose(spans[1:, 0], ends[:-1], atol=1e-6)  # cut pieces continue exactly
    assert ends[-1] == pytest.approx(total_s, abs=tol_s)


def test_video_chunks_carry_their_audio(tmp_path):
    p = make_video(tmp_path / "v.mp4", duration_s=70, fps=5, audio=True)
    events = _chunks(p)
    assert [len(ev.pts_s) for ev in events] == [32, 32, 6]
    _check_contiguous(events, 70.0)
    for ev in events[:-1]:  # each chunk's audio stops at most 2 s before the chunk's end, never after it
        end = ev.audio_spans[-1, 0] + ev.audio_spans[-1, 1] / SAMPLE_RATE
        assert ev.chunk_end_s - 2.0 - 1e-6 <= end <= ev.chunk_end_s + 1e-6
    info = events[-1].info
    assert info["audio_codec"] == "aac" and info["audio_bad_packets"] == 0 and info["audio_streams"] == 1
    # the 440 Hz tone at amplitude 0.2 comes back as such (AAC is lossy: loose bounds)
    a = np.concatenate([ev.audio for ev in events])
    assert 0.12 < float(np.sqrt(np.mean(a[SAMPLE_RATE:-SAMPLE_RATE] ** 2))) < 0.16
    spectrum = np.abs(np.fft.rfft(a[SAMPLE_RATE: 3 * SAMPLE_RATE]))
    assert np.argmax(spectrum) * SAMPLE_RATE / (2 * SAMPLE_RATE) == pytest.approx(440, abs=2)


def test_audio_off_and_video_without_audio_give_no_audio(tmp_path):
    with_audio = make_video(tmp_path / "a.mp4", duration_s=3, audio=True)
    silent = make_video(tmp_path / "s.mp4", duration_s=3)
    for events in (_chunks(with_audio, audio=False), _chunks(silent)):
        assert all(ev.audio.size == 0 and ev.audio_spans.shape == (0, 2) for ev in events)
        assert events[-1].info["error_type"] is None


def test_audio_only_file_is_a_source_of_audio_chunks(tmp_path):
    p = make_audio_only(tmp_path / "pod.m4a", duration_s=75)
    events = _chunks(p)
    assert len(events) >= 3 and all(len(ev.pts_s) == 0 for ev in events)
    _check_contiguous(events, 75.0)
    for ev in events[:-1]:
        assert 28.0 <= ev.audio.size / SAMPLE_RATE <= AudioConfig().audio_chunk_s + 0.5
    assert events[-1].info["audio_only"] and events[-1].info["error_type"] is None
    # without audio decoding the same file is not a video
    assert _chunks(p, audio=False)[-1].info["error_type"] == S.ERR_NO_VIDEO_STREAM


def test_decode_operator_marks_audio_only_ok(tmp_path):
    p = make_audio_only(tmp_path / "pod.m4a", duration_s=40)
    meta = {c: None for c in S.VIDEO_META_COLUMNS}
    meta.update({S.URI: str(p), S.VIDEO_ID: "v", S.STATUS: S.STATUS_OK, S.DECLARED_DURATION_S: float("nan")})
    batch = {k: np.array([v], dtype=object) for k, v in meta.items()}
    op = DecodeVideos(DecodeConfig(), GuardConfig(), (64, 64), audio=AudioConfig())
    try:
        rows = list(op(batch))
    finally:
        op.close()
    last = rows[-1]
    assert last[S.IS_LAST][0] and last[S.STATUS][0] == S.STATUS_OK, last[S.ERROR][0]
    assert last[S.DURATION_S][0] == pytest.approx(40.0, abs=0.2)
    total = sum(r[S.AUDIO][0].size for r in rows) / SAMPLE_RATE
    assert total == pytest.approx(40.0, abs=0.2)


def _aac_with_garbage(path, duration_s: float, bad: set[int]):
    """AAC 16 kHz mono sine in .m4a whose packets ``bad`` hold random bytes instead of audio."""
    import av

    rng = np.random.default_rng(0)
    c = av.open(str(path), "w")
    st = c.add_stream("aac", rate=SAMPLE_RATE)
    st.layout = "mono"
    packets, n = [], int(duration_s * SAMPLE_RATE)
    for start in range(0, n, 1024):
        t = (start + np.arange(1024)) / SAMPLE_RATE
        f = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp",
                                       layout="mono")
        f.sample_rate, f.pts, f.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
        packets += st.encode(f)
    packets += st.encode()
    for i, p in enumerate(packets):
        if i in bad:
            q = av.Packet(rng.integers(0, 256, p.size, dtype=np.uint8).tobytes())
            q.pts, q.dts, q.time_base, q.stream = p.pts, p.dts, p.time_base, p.stream
            p = q
        c.mux(p)
    c.close()
    return path


def test_a_corrupt_audio_packet_costs_that_packet_only(tmp_path):
    p = _aac_with_garbage(tmp_path / "bad.m4a", 20.0, bad={100, 101, 200})
    events = _chunks(p)
    info = events[-1].info
    assert info["error_type"] is None
    # every later packet still decoded, and later audio keeps its time (a lost packet becomes silence)
    _check_contiguous(events, 20.0)
    a = np.concatenate([ev.audio for ev in events])
    loud = np.sqrt(np.mean(a[: a.size // 1024 * 1024].reshape(-1, 1024) ** 2, axis=1)) > 0.05
    assert loud.mean() > 0.9
    assert info["audio_packets"] >= 300 and info["audio_bad_packets"] >= 1 and info["audio_error"]
