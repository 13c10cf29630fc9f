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


# ------------------------------------------------------------------------------------------ bad audio


def _wav(path, rate: int, declared_bytes: int, data: bytes):
    """A PCM s16 mono WAV whose header declares ``rate`` Hz and ``declared_bytes`` of data, holding ``data``."""
    import struct

    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + declared_bytes) + b"WAVE" + b"fmt " + fmt + b"data"
                     + struct.pack("<I", declared_bytes) + data)
    return path


def _probe(path):
    from ray_vlm.operators.probe import ProbeVideos

    out = ProbeVideos(audio=AudioConfig())({S.URI: np.array([str(path)], dtype=object),
                                           S.SIZE_BYTES: np.array([-1]), S.MTIME: np.array([np.nan])})
    return {k: out[k][0] for k in (S.STATUS, S.ERROR_TYPE, S.ERROR)}


def test_audio_bomb_and_absurd_rates_are_refused_at_once(tmp_path):
    import time

    bomb = _wav(tmp_path / "bomb.wav", 384_000, 0xFFFFFF00, b"\x00\x01" * 512)  # 1 KB declaring hours
    slow = _wav(tmp_path / "slow.wav", 1, 2000, b"\x00\x01" * 1000)  # 2 KB at 1 Hz: 1000 s once resampled
    for path, err in ((bomb, S.ERR_TOO_LARGE), (slow, S.ERR_POLICY)):
        t0 = time.monotonic()
        events = _chunks(path)
        assert time.monotonic() - t0 < 5
        assert len(events) == 1 and events[0].audio.size == 0
        assert events[0].info["error_type"] == err and "Hz" in events[0].info["error"]
        assert _probe(path)[S.ERROR_TYPE] == err
    ok = _wav(tmp_path / "ok.wav", 16_000, 32_000, (np.sin(np.arange(16_000) * 0.1) * 3000).astype("<i2").tobytes())
    assert _probe(ok)[S.STATUS] == S.STATUS_OK
    events = _chunks(ok)
    assert events[-1].info["error_type"] is None and sum(ev.audio.size for ev in events) == 16_000


def _mp4_with_audio_streams(path, n_streams: int, seconds: float, default: int | None = None):
    """A short H.264 video with ``n_streams`` AAC tracks (track i: a tone of 200 * (i + 1) Hz; seconds=0: the
    tracks hold no packet at all)."""
    import av

    c = av.open(str(path), "w")
    vs = c.add_stream("libx264", rate=10)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    tracks = []
    for _ in range(n_streams):
        a = c.add_stream("aac", rate=SAMPLE_RATE)
        a.layout = "mono"
        tracks.append(a)
    if default is not None:
        from av.stream import Disposition

        for i, a in enumerate(tracks):
            a.disposition = Disposition.default if i == default else Disposition(0)
    for i in range(20):
        rgb = np.full((48, 64, 3), 10 * i, np.uint8)
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        f.pts, f.time_base = i, Fraction(1, 10)
        for p in vs.encode(f):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    n = int(seconds * SAMPLE_RATE)
    for k, a in enumerate(tracks):
        for start in range(0, n, 1024):
            t = (start + np.arange(1024)) / SAMPLE_RATE
            af = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 200 * (k + 1) * t)).astype(np.float32)[None],
                                            format="fltp", layout="mono")
            af.sample_rate, af.pts, af.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            for p in a.encode(af):
                c.mux(p)
        if n:
            for p in a.encode():
                c.mux(p)
    c.close()
    return path


def test_zero_length_audio_stream_is_a_video_without_audio(tmp_path):
    p = _mp4_with_audio_streams(tmp_path / "empty_audio.mp4", 1, 0.0)
    events = _chunks(p)
    assert events[-1].info["error_type"] is None and len(np.concatenate([e.pts_s for e in events])) == 2
    assert sum(ev.audio.size for ev in events) == 0


def test_eight_audio_streams_decode_one(tmp_path):
    p = _mp4_with_audio_streams(tmp_path / "eight.mp4", 8, 2.0, default=3)
    events = _chunks(p)
    info = events[-1].info
    assert info["error_type"] is None and info["audio_streams"] == 8
    a = np.concatenate([ev.audio for ev in events])
    assert a.size == pytest.approx(2 * SAMPLE_RATE, abs=2048)  # one track's worth, not eight
    spectrum = np.abs(np.fft.rfft(a[: SAMPLE_RATE]))
    assert np.argmax(spectrum) == pytest.approx(800, abs=3)  # the default track (the 4th: 800 Hz) was taken
