"""Decode operator: one status row per input, pts-exact sampling, rotation, truncation, chunking, isolation.

Expected values come from the fixtures' documented content (``fixtures/videos.py``: timecode bars, corner
markers, keyframe intervals) and from plain PyAV loops written here, never from the code under test.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest

from fixtures import videos as V
from ray_vlm.core import schema as S
from ray_vlm.core.config import DecodeConfig, GuardConfig
from ray_vlm.core.samples import sample_videos
from ray_vlm.operators import _sampler
from ray_vlm.operators.decode import ERR_TRUNCATED, DecodeVideos, sample_video

SRC_FPS = 30.0  # every synthetic fixture is 30 fps (VFR: at most)
NATIVE = (90, 160)  # the fixtures' coded (height, width)

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    return V.matrix(tmp_path_factory.mktemp("decode_matrix"))


def _rows(paths, **columns) -> dict[str, np.ndarray]:
    """Probe-like input rows: status ok, metadata unknown (decode reads it from the container)."""
    n = len(paths)
    batch = {
        S.URI: np.array([str(p) for p in paths], dtype=object),
        S.VIDEO_ID: np.array([f"{i:016x}" for i in range(n)], dtype=object),
        S.SIZE_BYTES: np.array([os.path.getsize(p) if os.path.exists(p) else 0 for p in paths], dtype=np.int64),
        S.MTIME: np.full(n, np.nan),
        S.STATUS: np.array([S.STATUS_OK] * n, dtype=object),
        S.ERROR_TYPE: np.array([None] * n, dtype=object),
        S.ERROR: np.array([None] * n, dtype=object),
        S.CONTAINER: np.array([""] * n, dtype=object),
        S.CODEC: np.array([""] * n, dtype=object),
        S.WIDTH: np.zeros(n, dtype=np.int32),
        S.HEIGHT: np.zeros(n, dtype=np.int32),
        S.ROTATION_DEG: np.zeros(n, dtype=np.int16),
        S.DECLARED_DURATION_S: np.full(n, np.nan),
    }
    for name, values in columns.items():
        batch[name] = np.asarray(values, dtype=batch[name].dtype)
    return batch


def _decode(paths, frame_size=NATIVE, guards=None, rows=None, **decode):
    """Run DecodeVideos; returns {uri: [chunk rows as dicts]} and checks the output contract on the way."""
    decode.setdefault("isolate", False)
    op = DecodeVideos(DecodeConfig(**decode), guards or GuardConfig(), frame_size)
    out: dict[str, list[dict]] = {}
    try:
        for batch in op(rows if rows is not None else _rows(paths)):
            assert all(len(col) == 1 for col in batch.values())
            row = {k: v[0] for k, v in batch.items()}
            out.setdefault(row[S.URI], []).append(row)
    finally:
        op.close()
    for uri, chunks in out.items():
        _check_chunks(uri, chunks, frame_size)
    return out


def _check_chunks(uri, chunks, frame_size):
    """Contract of one video's chunks: indices, last row, frame_index, chunk_end_s, shapes and dtypes."""
    assert [c[S.CHUNK_INDEX] for c in chunks] == list(range(len(chunks))), uri
    assert [bool(c[S.IS_LAST]) for c in chunks] == [False] * (len(chunks) - 1) + [True], uri
    n = 0
    for i, c in enumerate(chunks):
        frames, pts, idx = c[S.FRAMES], c[S.PTS_S], c[S.FRAME_INDEX]
        assert frames.dtype == np.uint8 and frames.shape[1:] == (*frame_size, 3), uri
        assert pts.dtype == np.float64 and idx.dtype == np.int32 and len(pts) == len(idx) == len(frames), uri
        assert list(idx) == list(range(n, n + len(idx))), uri
        n += len(idx)
        if not c[S.IS_LAST]:
            assert c[S.STATUS] == S.STATUS_OK and math.isnan(c[S.DURATION_S]) and c[S.FRAMES_SAMPLED] == -1
            nxt = chunks[i + 1]  # the next sample's pts (a watchdog's zero-frame last row repeats it)
            assert c[S.CHUNK_END_S] == (nxt[S.PTS_S][0] if len(nxt[S.PTS_S]) else nxt[S.CHUNK_END_S]), uri
            assert len(pts) > 0
    last = chunks[-1]
    assert last[S.FRAMES_SAMPLED] == n, uri
    assert last[S.STATUS] in S.STATUSES, uri
    if last[S.STATUS] == S.STATUS_OK:
        assert last[S.ERROR_TYPE] is None and last[S.ERROR] is None
    else:
        assert last[S.ERROR_TYPE] and last[S.ERROR], uri
    if last[S.STATUS] == S.STATUS_FAILED:
        assert n == 0, uri
    all_pts = np.concatenate([c[S.PTS_S] for c in chunks])
    assert np.all(np.diff(all_pts) > 0), uri  # strictly increasing, no frame twice
    if n:
        assert last[S.CHUNK_END_S] >= all_pts[-1] and last[S.DURATION_S] == last[S.CHUNK_END_S]


def _last(chunks):
    return chunks[-1]


def _all(chunks, col):
    return np.concatenate([c[col] for c in chunks])


def _frame_times(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times_s, durations_s, keyframe flags) of every frame, plain PyAV, relative to the stream start."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        start = s.start_time or 0
        t, d, k = [], [], []
        for f in c.decode(s):
            t.append(float((f.pts - start) * f.time_base))
            d.append(float(f.duration * f.time_base) if f.duration else 0.0)
            k.append(bool(f.key_frame))
    return np.array(t), np.array(d), np.array(k)


def _nearest_reference(times: np.ndarray, durs: np.ndarray, fps: float) -> np.ndarray:
    """Brute force: for every request k/fps inside the video, the nearest frame (ties: earlier), deduplicated."""
    end = times[-1] + (durs[-1] or np.median(np.diff(times)))
    picked = []
    k = 0
    while k / fps < end - 1e-6:
        r = k / fps
        j = int(np.argmin(np.abs(times - r) + (times > r) * 1e-9))  # ties go to the earlier frame
        if not picked or picked[-1] != j:
            picked.append(j)
        k += 1
    return times[picked]


# ------------------------------------------------------------------------------------------ the matrix

OK_VIDEOS = ("mp4_h264", "mp4_h264_audio", "mov_h264", "mkv_h264", "webm_vp9", "ts_h264", "vfr_mp4", "rot90_mp4",
             "hevc10_mp4", "raw_h264", "full_mp4", "full_mp4_faststart", "full_webm", "full_ts",
             "tscut_frame_ts", "tscut_midframe_ts")  # MPEG-TS cut on a packet boundary: see the README's promise
FAILED_VIDEOS = {
    "audio_only_mp4": S.ERR_NO_VIDEO_STREAM,
    "zero_byte_mp4": S.ERR_EMPTY,
    "random_bytes_mp4": S.ERR_NOT_VIDEO,
    "text_mp4": S.ERR_NOT_VIDEO,
    # mp4 with its index at the end: a cut file has no index, or a damaged one
    "trunc10_mp4": S.ERR_NOT_VIDEO,
    "trunc50_mp4": S.ERR_NOT_VIDEO,
}


def test_matrix_one_status_row_per_input_in_isolated_children(media):
    names = sorted(media)
    out = _decode([media[n] for n in names], isolate=True, target_fps=2.0, chunk_frames=3)
    assert sorted(out) == sorted(str(media[n]) for n in names)  # every input answered, nothing extra
    status = {n: _last(out[str(media[n])]) for n in names}
    for n in OK_VIDEOS:
        if n in media:
            assert status[n][S.STATUS] == S.STATUS_OK, (n, status[n][S.ERROR])
            assert status[n][S.FRAMES_SAMPLED] >= 4
    for n, err in FAILED_VIDEOS.items():
        assert (status[n][S.STATUS], status[n][S.ERROR_TYPE]) == (S.STATUS_FAILED, err), (n, status[n][S.ERROR])
        assert len(out[str(media[n])]) == 1
    assert "0 bytes" in status["zero_byte_mp4"][S.ERROR]
    assert "audio" in status["audio_only_mp4"][S.ERROR]
    for n in names:
        if n.startswith("trunc"):
            assert status[n][S.STATUS] in (S.STATUS_PARTIAL, S.STATUS_FAILED), (n, status[n][S.STATUS])
    # the declared duration was read from the container where the probe row had NaN
    assert status["full_mp4"][S.DECLARED_DURATION_S] == pytest.approx(4.0, abs=1e-3)
    assert status["full_mp4"][S.DURATION_S] == pytest.approx(4.0, abs=1e-3)


def test_probe_rows_flow_through_decode(media):
    """The probe's own rows (its statuses, rotation, declared durations) drive decode: one final row each."""
    from ray_vlm.operators.probe import ProbeVideos

    paths = [str(media[n]) for n in sorted(media)]
    probed = ProbeVideos()({
        S.URI: np.array(paths, dtype=object),
        S.SIZE_BYTES: np.array([os.path.getsize(p) for p in paths], dtype=np.int64),
        S.MTIME: np.array([os.path.getmtime(p) for p in paths]),
    })
    out = _decode(None, rows=probed, frame_size=(32, 32), target_fps=1.0)
    assert sorted(out) == sorted(paths)
    for i, uri in enumerate(probed[S.URI]):
        last = _last(out[uri])
        if probed[S.STATUS][i] == S.STATUS_FAILED:  # passed through with the probe's own error
            assert (last[S.STATUS], last[S.ERROR_TYPE]) == (S.STATUS_FAILED, probed[S.ERROR_TYPE][i])
        assert last[S.ROTATION_DEG] == probed[S.ROTATION_DEG][i]
    assert _last(out[str(media["rot90_mp4"])])[S.STATUS] == S.STATUS_OK


def test_isolated_and_in_process_decoding_agree(media):
    names = ["mp4_h264", "ts_h264", "webm_vp9", "trunc50_webm", "text_mp4"]
    paths = [media[n] for n in names]
    a = _decode(paths, isolate=True, target_fps=3.0, chunk_frames=4)
    b = _decode(paths, isolate=False, target_fps=3.0, chunk_frames=4)
    for p in paths:
        ca, cb = a[str(p)], b[str(p)]
        assert len(ca) == len(cb)
        for x, y in zip(ca, cb):
            assert np.array_equal(x[S.PTS_S], y[S.PTS_S]) and np.array_equal(x[S.FRAMES], y[S.FRAMES])
            assert (x[S.STATUS], x[S.ERROR_TYPE]) == (y[S.STATUS], y[S.ERROR_TYPE])


@pytest.mark.parametrize("target_fps", [1.0, 7.0, 0.4, 4.0])  # 4 fps on 30 fps: requests exactly between frames
def test_fps_sampling_takes_the_nearest_frame_by_pts(media, target_fps):
    """Same frames as a brute-force nearest search over every decoded pts, whatever seeking/skipping did."""
    names = ["full_mp4", "full_webm", "full_ts", "mkv_h264", "vfr_mp4"]
    names.append("hevc10_mp4" if "hevc10_mp4" in media else "mov_h264")
    out = _decode([media[n] for n in names], target_fps=target_fps)
    for n in names:
        chunks = out[str(media[n])]
        assert _last(chunks)[S.STATUS] == S.STATUS_OK, n
        pts = _all(chunks, S.PTS_S)
        times, durs, _ = _frame_times(media[n])
        np.testing.assert_allclose(pts, _nearest_reference(times, durs, target_fps), atol=1e-9, err_msg=n)
        # exactness: every sample within one (local) source frame period of a request
        j = np.searchsorted(times, pts)
        gaps = np.diff(times)
        local_period = np.maximum(gaps[np.clip(j - 1, 0, len(gaps) - 1)], gaps[np.clip(j, 0, len(gaps) - 1)])
        req = np.round(pts * target_fps) / target_fps
        assert np.all(np.abs(pts - req) <= local_period + 1e-9), n
        # the picture is the frame at that pts: its timecode is the frame's index
        frames = _all(chunks, S.FRAMES)
        expected_index = [int(np.argmin(np.abs(times - t))) for t in pts]
        assert [V.read_timecode(f) for f in frames] == expected_index, n


def _full_decode(path, frame_size=NATIVE) -> dict[float, np.ndarray]:
    """{time (rounded to 1 us): RGB} of every frame, plain PyAV, same scaler settings."""
    h, w = frame_size
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        start = s.start_time or 0
        return {
            round(float((f.pts - start) * f.time_base), 6):
            f.reformat(w, h, format="rgb24", interpolation=_sampler.scaler_interpolation()).to_ndarray()
            for f in c.decode(s)
        }


def test_sampled_pixels_equal_a_full_decode(media):
    """Seeking and reference-only decoding give bit-identical pictures to decoding every frame."""
    path = media["full_mp4"]
    s = sample_video(str(path), DecodeConfig(target_fps=0.5), NATIVE)
    got = list(s)
    assert s.stats.planned and s.stats.seeks >= 1 and s.stats.frames_decoded < 120  # the shortcuts really ran
    full = _full_decode(path)
    assert [t for t, _ in got] == [0.0, 2.0]
    for t, rgb in got:
        np.testing.assert_array_equal(rgb, full[round(t, 6)])


@pytest.mark.parametrize("target_fps", [0.4, 1.0, 3.0, 4.0, 7.0])
def test_packet_plan_is_pixel_exact_for_each_codec_and_container(media, target_fps):
    """The packet plan (targets from packet pts, NONREF skipping, drain/flush between GOPs, seeks) gives the
    nearest frames with the pixels a full decode gives, for H.264 in mp4/mkv/ts, VP9 in webm and HEVC."""
    names = ["full_mp4", "full_webm", "full_ts", "mkv_h264", "vfr_mp4", "full_mp4_faststart"]
    if "hevc10_mp4" in media:
        names.append("hevc10_mp4")
    for n in names:
        s = sample_video(str(media[n]), DecodeConfig(target_fps=target_fps), NATIVE)
        got = list(s)
        assert s.stats.planned and not s.stats.notes, (n, s.stats.notes)
        times, durs, _ = _frame_times(media[n])
        np.testing.assert_allclose([t for t, _ in got], _nearest_reference(times, durs, target_fps), atol=1e-9,
                                   err_msg=n)
        full = _full_decode(media[n])
        for t, rgb in got:
            np.testing.assert_array_equal(rgb, full[round(t, 6)], err_msg=f"{n} at {t}")
        if target_fps <= 1.0:  # sparse requests: far fewer frames went through the decoder
            assert s.stats.frames_decoded < 0.75 * len(times), (n, s.stats.frames_decoded, len(times))


def test_packet_plan_decodes_less_than_the_frame_loop_and_agrees_with_it(media, monkeypatch):
    path = str(media["full_mp4"])
    plan = sample_video(path, DecodeConfig(target_fps=1.0), NATIVE)
    got = list(plan)
    monkeypatch.setattr(_sampler, "_PLANNED_CODECS", frozenset())  # every codec takes the frame-by-frame loop
    loop = sample_video(path, DecodeConfig(target_fps=1.0), NATIVE)
    ref = list(loop)
    assert plan.stats.planned and not loop.stats.planned
    assert [t for t, _ in got] == [t for t, _ in ref] == [0.0, 1.0, 2.0, 3.0]
    for (_, a), (_, b) in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    # keyframe requests need only the keyframe; the frame loop decodes its approach to each request
    assert plan.stats.frames_decoded == 4 < loop.stats.frames_decoded


def test_abandoned_packet_plan_restarts_without_repeating_frames(media, monkeypatch):
    """If the plan gives up half way (a decoder that breaks its assumptions), the video is decoded again frame
    by frame from the start and only the frames after the last one yielded come out."""
    path = str(media["full_mp4"])
    expected = [(t, f.copy()) for t, f in sample_video(path, DecodeConfig(target_fps=3.0), NATIVE)]
    real = _sampler.VideoSampler._run_planned

    def breaks_after_five(self, container, stream, demux):
        for n, item in enumerate(real(self, container, stream, demux)):
            if n == 5:
                raise _sampler.PlanAbandoned("injected")
            yield item

    monkeypatch.setattr(_sampler.VideoSampler, "_run_planned", breaks_after_five)
    s = sample_video(path, DecodeConfig(target_fps=3.0), NATIVE)
    got = list(s)
    assert any("injected" in n for n in s.stats.notes) and s.stats.seeks >= 1
    assert [t for t, _ in got] == [t for t, _ in expected] and len(got) == 12
    for (_, a), (_, b) in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_vfr_times_come_from_pts(media):
    out = _decode([media["vfr_mp4"]], target_fps=30.0)
    chunks = out[str(media["vfr_mp4"])]
    pts = _all(chunks, S.PTS_S)
    expected = V.vfr_times(SRC_FPS, 3.0)
    # target 30 fps >= the source's highest rate: every frame once, at its own time
    np.testing.assert_allclose(pts, expected, atol=1e-3)
    assert [V.read_timecode(f) for f in _all(chunks, S.FRAMES)] == list(range(len(expected)))
    # the slow middle third really is 100 ms apart (an average-rate clock would say 1/23.3 s)
    assert np.diff(pts)[35] == pytest.approx(0.1, abs=1e-3)


def test_raw_h264_without_pts_gets_times_from_durations(media):
    path = media["raw_h264"]
    s = sample_video(str(path), DecodeConfig(target_fps=5.0), NATIVE)
    got = list(s)
    assert s.stats.synthesized_pts and any("no pts" in n for n in s.stats.notes)
    pts = np.array([t for t, _ in got])
    np.testing.assert_allclose(pts, np.arange(10) / 5.0, atol=1e-6)
    assert [V.read_timecode(f) for _, f in got] == [6 * i for i in range(10)]


def test_keyframes_mode_returns_only_keyframe_times(media):
    names = ["full_mp4", "full_webm", "full_ts", "hevc10_mp4" if "hevc10_mp4" in media else "mkv_h264"]
    out = _decode([media[n] for n in names], mode="keyframes", target_fps=30.0)
    for n in names:
        times, _, key = _frame_times(media[n])
        pts = _all(out[str(media[n])], S.PTS_S)
        np.testing.assert_allclose(pts, times[key], atol=1e-9, err_msg=n)
        assert len(pts) == (4 if n.startswith("full") else 2)  # a keyframe every second
    s = sample_video(str(media["full_mp4"]), DecodeConfig(mode="keyframes", target_fps=1.0), NATIVE)
    assert [t for t, _ in s] == [0.0, 1.0, 2.0, 3.0]
    assert s.stats.frames_decoded == 4  # only keyframes went through the decoder
    assert s.stats.decoded_end_s == pytest.approx(4.0)  # coverage from demuxed packets: not "truncated"


def test_keyframes_thinned_to_target_fps(tmp_path):
    path = V.make_video(tmp_path / "gop05.mp4", duration_s=3.0, gop_s=0.5, width=96, height=64)
    s = sample_video(str(path), DecodeConfig(mode="keyframes", target_fps=1.0), (64, 96))
    assert [t for t, _ in s] == [0.0, 1.0, 2.0]
    s = sample_video(str(path), DecodeConfig(mode="keyframes", target_fps=30.0), (64, 96))
    assert [t for t, _ in s] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


# ------------------------------------------------------------------------------------------ rotation


def test_rotation_90_gives_an_upright_portrait_picture(media):
    """The coded picture is 160x90 landscape with a display rotation of 90 degrees clockwise."""
    out = _decode([media["rot90_mp4"], media["mp4_h264"]], frame_size=(160, 90), target_fps=1.0)
    rot = out[str(media["rot90_mp4"])]
    assert _last(rot)[S.ROTATION_DEG] == 90
    frame = rot[0][S.FRAMES][0]
    assert frame.shape == (160, 90, 3)  # portrait
    m = V.marker_size(90)
    # the red marker (coded top-left) turned to the top-right; the green one (coded top-right) to bottom-right
    red = frame[2 : m - 2, 90 - m + 2 : 88].reshape(-1, 3).mean(0)
    green = frame[160 - m + 2 : 158, 90 - m + 2 : 88].reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    assert green[1] > 200 and green[0] < 60 and green[2] < 60, green
    # pixel for pixel: the unrotated twin decoded at its native size, turned clockwise
    plain = _decode([media["mp4_h264"]], frame_size=NATIVE, target_fps=1.0)[str(media["mp4_h264"])]
    np.testing.assert_array_equal(frame, np.rot90(plain[0][S.FRAMES][0], k=-1))


def test_rotation_from_the_probe_row_is_applied_and_resize_follows_it(media):
    path = media["mp4_h264"]  # no display matrix: the probe row says 270
    out = _decode([path], frame_size=(64, 48), rows=_rows([path], **{S.ROTATION_DEG: [270]}), target_fps=1.0)
    chunk = out[str(path)][0]
    assert chunk[S.ROTATION_DEG] == 270 and chunk[S.FRAMES].shape == (2, 64, 48, 3)
    f = chunk[S.FRAMES][0]
    # counter-clockwise quarter turn: coded top-left (red) ends bottom-left, top-right (green) top-left
    assert f[-6:-2, 2:6, 0].mean() > 200 and f[-6:-2, 2:6, 2].mean() < 60
    assert f[2:6, 2:6, 1].mean() > 200 and f[2:6, 2:6, 0].mean() < 60


# ------------------------------------------------------------------------------------------ truncation, guards


@pytest.mark.parametrize("src", V.TRUNCATION_SOURCES)
def test_truncated_files_are_never_ok(media, src):
    names = [f"trunc{int(f * 100)}_{src}" for f in V.TRUNCATION_FRACTIONS]
    out = _decode([media[n] for n in names] + [media[f"full_{src}"]], target_fps=4.0)
    assert _last(out[str(media[f"full_{src}"])])[S.STATUS] == S.STATUS_OK  # the uncut source is fine
    for n in names:
        last = _last(out[str(media[n])])
        assert last[S.STATUS] in (S.STATUS_PARTIAL, S.STATUS_FAILED), (n, last[S.STATUS])
        if last[S.STATUS] == S.STATUS_PARTIAL:
            assert last[S.FRAMES_SAMPLED] > 0 and last[S.DURATION_S] < 0.95 * 4.0
            assert last[S.ERROR_TYPE] in (ERR_TRUNCATED, S.ERR_DECODE)
    if src == "webm":  # matroska declares its duration: the shortfall is reported in seconds
        last = _last(out[str(media["trunc50_webm"])])
        assert last[S.ERROR_TYPE] == ERR_TRUNCATED and "of declared 4.0 s" in last[S.ERROR]
        assert 1.0 < last[S.DURATION_S] < 2.5


def test_mpegts_truncation_is_what_the_readme_promises(media):
    """MPEG-TS declares no duration, so its size is the only sign of a cut (README, "What a run produces").

    A file that ends inside a transport packet is never ``ok``; a file cut on a packet boundary is a valid,
    shorter stream and is ``ok`` with what it holds, whether the cut fell between two frames or inside one
    (FFmpeg conceals the lost tail of that frame). The status is a function of the file: two runs agree.
    """
    inside = [f"trunc{int(f * 100)}_ts" for f in V.TRUNCATION_FRACTIONS]
    boundary = ["tscut_frame_ts", "tscut_midframe_ts"]
    sizes = {n: media[n].stat().st_size for n in inside + boundary + ["full_ts"]}
    assert all(sizes[n] % 188 == 94 for n in inside) and all(sizes[n] % 188 == 0 for n in boundary)
    paths = [media[n] for n in inside + boundary]
    runs = [_decode(paths, target_fps=4.0, isolate=isolate) for isolate in (True, False)]
    finals = [{n: _last(out[str(media[n])]) for n in inside + boundary} for out in runs]
    for n in inside + boundary:
        assert len({(f[n][S.STATUS], f[n][S.ERROR_TYPE], f[n][S.FRAMES_SAMPLED]) for f in finals}) == 1, n
    final = finals[0]
    for n in inside:
        assert final[n][S.STATUS] in (S.STATUS_PARTIAL, S.STATUS_FAILED), (n, final[n][S.STATUS])
        if final[n][S.STATUS] == S.STATUS_PARTIAL:
            assert final[n][S.ERROR_TYPE] == ERR_TRUNCATED and "inside a transport packet" in final[n][S.ERROR]
    for n in boundary:
        assert final[n][S.STATUS] == S.STATUS_OK, (n, final[n][S.ERROR])
        # what it holds: frames from the first half of the 4-s source, each the frame its time says
        assert 1.0 < final[n][S.DURATION_S] < 0.95 * 4.0, n
    # between two frames: every frame it holds is whole, and is the frame its time says
    chunks = runs[0][str(media["tscut_frame_ts"])]
    frames, pts = _all(chunks, S.FRAMES), _all(chunks, S.PTS_S)
    assert [V.read_timecode(f) for f in frames] == [int(round(t * 30)) for t in pts]


def test_guards_refuse_before_decoding(media):
    path = str(media["mp4_h264"])
    cases = [
        (GuardConfig(max_width=128, max_height=128), S.ERR_TOO_LARGE),
        (GuardConfig(max_pixels=100 * 100), S.ERR_TOO_LARGE),
        (GuardConfig(max_duration_s=1.0), S.ERR_TOO_LONG),
        (GuardConfig(allowed_containers=("matroska,webm",)), S.ERR_POLICY),
    ]
    for guards, err in cases:
        last = _last(_decode([path], guards=guards)[path])
        assert (last[S.STATUS], last[S.ERROR_TYPE], last[S.FRAMES_SAMPLED]) == (S.STATUS_FAILED, err, 0), guards
    # a portrait-sized guard still admits the same picture turned sideways
    ok = _last(_decode([path], guards=GuardConfig(max_width=90, max_height=160))[path])
    assert ok[S.STATUS] == S.STATUS_OK


def test_failed_probe_rows_pass_through_untouched(tmp_path):
    missing = str(tmp_path / "gone.mp4")
    rows = _rows([missing, missing], **{
        S.STATUS: [S.STATUS_FAILED, S.STATUS_OK],
        S.ERROR_TYPE: [S.ERR_POLICY, None],
        S.ERROR: ["refused by the probe", None],
    })
    rows[S.VIDEO_ID] = np.array(["a", "b"], dtype=object)
    op = DecodeVideos(DecodeConfig(isolate=False), GuardConfig(), (32, 32))
    out = list(op(rows))
    assert len(out) == 2
    a, b = ({k: v[0] for k, v in batch.items()} for batch in out)
    assert (a[S.VIDEO_ID], a[S.STATUS], a[S.ERROR_TYPE]) == ("a", S.STATUS_FAILED, S.ERR_POLICY)
    assert a[S.ERROR] == "refused by the probe"
    assert a[S.IS_LAST] and a[S.FRAMES].shape == (0, 32, 32, 3) and a[S.FRAMES_SAMPLED] == 0
    assert (b[S.VIDEO_ID], b[S.STATUS], b[S.ERROR_TYPE]) == ("b", "failed", S.ERR_NOT_FOUND)


def test_missing_columns_name_the_operator():
    op = DecodeVideos(DecodeConfig(isolate=False), GuardConfig(), (32, 32))
    with pytest.raises(S.SchemaError, match="DecodeVideos"):
        list(op({S.URI: np.array(["x"], dtype=object)}))


# ------------------------------------------------------------------------------------------ chunks


def test_chunks_of_32_32_6_with_continuous_frame_index(tmp_path):
    path = V.make_video(tmp_path / "seventy.mp4", width=64, height=48, fps=10.0, duration_s=7.0, gop_s=2.0)
    out = _decode([path], frame_size=(48, 64), target_fps=10.0, chunk_frames=32)
    chunks = out[str(path)]
    assert [len(c[S.FRAME_INDEX]) for c in chunks] == [32, 32, 6]
    assert list(_all(chunks, S.FRAME_INDEX)) == list(range(70))
    np.testing.assert_allclose(_all(chunks, S.PTS_S), np.arange(70) / 10.0, atol=1e-9)
    assert [c[S.CHUNK_END_S] for c in chunks[:2]] == pytest.approx([3.2, 6.4])
    last = chunks[-1]
    assert last[S.CHUNK_END_S] == pytest.approx(7.0) and last[S.DURATION_S] == pytest.approx(7.0)
    assert last[S.FRAMES_SAMPLED] == 70 and last[S.STATUS] == S.STATUS_OK


# ------------------------------------------------------------------------------------------ isolation


def test_hang_and_crash_cost_only_their_video(media, tmp_path, monkeypatch):
    good = media["mp4_h264"]
    names = ["hang_first", "good_1", "crash_first", "good_2", "crash_mid", "good_3", "hang_mid", "good_4"]
    paths = []
    for n in names:
        p = tmp_path / f"{n}.mp4"
        shutil.copyfile(good, p)
        paths.append(p)
    # the documented test hook, read by the decoder child: faults before decoding and after 2 frames
    monkeypatch.setenv("RAY_VLM_DECODE_FAULT", "hang:hang_first,crash:crash_first,crash@2:crash_mid,hang@2:hang_mid")
    out = _decode(paths, isolate=True, stall_timeout_s=2.0, target_fps=4.0, chunk_frames=2)
    last = {n: _last(out[str(p)]) for n, p in zip(names, paths)}
    assert (last["hang_first"][S.STATUS], last["hang_first"][S.ERROR_TYPE]) == (S.STATUS_FAILED, S.ERR_TIMEOUT)
    assert (last["crash_first"][S.STATUS], last["crash_first"][S.ERROR_TYPE]) == (S.STATUS_FAILED, S.ERR_CRASHED)
    assert "SIGSEGV" in last["crash_first"][S.ERROR]
    # after a first chunk got out, the video is partial and keeps those frames
    for n, err in (("crash_mid", S.ERR_CRASHED), ("hang_mid", S.ERR_TIMEOUT)):
        chunks = out[str(paths[names.index(n)])]
        assert (last[n][S.STATUS], last[n][S.ERROR_TYPE]) == (S.STATUS_PARTIAL, err)
        assert last[n][S.FRAMES_SAMPLED] == 2 and len(chunks) == 2 and len(chunks[0][S.PTS_S]) == 2
        assert last[n][S.DURATION_S] == chunks[0][S.CHUNK_END_S] == pytest.approx(0.5)
    # every video after a fault decoded normally in a fresh child
    for n in ("good_1", "good_2", "good_3", "good_4"):
        assert last[n][S.STATUS] == S.STATUS_OK and last[n][S.FRAMES_SAMPLED] == 8, n


def test_abandoned_generator_kills_the_busy_child(media):
    op = DecodeVideos(DecodeConfig(isolate=True, target_fps=30.0, chunk_frames=1), GuardConfig(), NATIVE)
    gen = op(_rows([media["mp4_h264"], media["mkv_h264"]]))
    first = next(gen)
    assert first[S.CHUNK_INDEX][0] == 0
    child = op._child
    gen.close()  # the consumer stops half way through a video
    assert not child.alive() and op._child is None
    # the operator still works afterwards
    out = list(op(_rows([media["mkv_h264"]])))
    assert out[-1][S.STATUS][0] == S.STATUS_OK and out[-1][S.FRAMES_SAMPLED][0] == 60
    op.close()


def test_isolated_decoding_works_from_a_script_on_stdin(media, tmp_path):
    """The decoder child is its own program (``python -m ray_vlm.operators._sampler``): a script fed on stdin,
    without a main guard, can use isolate=True (multiprocessing's "spawn" would re-run it, or fail on '<stdin>')."""
    script = textwrap.dedent(f"""
        import numpy as np
        from ray_vlm.core import schema as S
        from ray_vlm.core.config import DecodeConfig, GuardConfig
        from ray_vlm.operators.decode import DecodeVideos
        print("script body ran")
        uri = {str(media["full_mp4"])!r}
        rows = {{c: np.array([None], dtype=object) for c in S.VIDEO_META_COLUMNS}}
        rows.update({{S.URI: np.array([uri], dtype=object), S.STATUS: np.array(["ok"], dtype=object),
                      S.ROTATION_DEG: np.zeros(1), S.DECLARED_DURATION_S: np.full(1, np.nan),
                      S.SIZE_BYTES: np.zeros(1)}})
        op = DecodeVideos(DecodeConfig(isolate=True, target_fps=1.0), GuardConfig(), (32, 32))
        last = list(op(rows))[-1]
        print("status", last[S.STATUS][0], "pts", last[S.PTS_S][0].tolist(), "child", op._child.proc.pid != 0)
        op.close()
    """)
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=90,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["script body ran", "status ok pts [0.0, 1.0, 2.0, 3.0] child True"]


def test_decoder_child_path_imports_no_pyarrow_pydantic_or_fsspec(media):
    """What the child runs for a local file (``sample_chunks`` on a path) pulls in numpy and PyAV only."""
    script = textwrap.dedent(f"""
        import sys, types
        from ray_vlm.operators._sampler import sample_chunks
        dec = types.SimpleNamespace(mode="fps", target_fps=1.0, threads=1, chunk_frames=8, truncation_tolerance=0.95)
        guards = types.SimpleNamespace(max_width=4096, max_height=4096, max_pixels=4096 * 2304,
                                       max_duration_s=3600.0, allowed_containers=("mov,mp4,m4a,3gp,3g2,mj2",))
        evs = list(sample_chunks(("path", {str(media["full_mp4"])!r}), dec, guards, (32, 32)))
        print(evs[-1].info["frames_sampled"], evs[-1].info["error_type"])
        print(sorted(m for m in ("pyarrow", "pydantic", "fsspec", "ray", "torch") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["4 None", "[]"]


def test_error_classes_of_the_sampler_are_the_schema_constants():
    names = [n for n in dir(_sampler) if n.startswith("ERR_")]
    assert len(names) >= 11
    for n in names:
        assert getattr(_sampler, n) == getattr(S, n), n


def test_operator_starts_its_child_eagerly_and_pickles_without_it(media):
    op = DecodeVideos(DecodeConfig(isolate=True, target_fps=1.0), GuardConfig(), NATIVE)
    try:
        assert op._child is not None and op._child.alive()  # started by the constructor
        pid = op._child.proc.pid
        copy = pickle.loads(pickle.dumps(op))
        assert copy._child is None
        out = list(copy(_rows([media["mp4_h264"]])))  # the copy starts its own child when it needs one
        assert out[-1][S.STATUS][0] == S.STATUS_OK and copy._child.proc.pid != pid
        copy.close()
        out = list(op(_rows([media["mp4_h264"]])))
        assert out[-1][S.FRAMES_SAMPLED][0] == 2 and op._child.proc.pid == pid  # reused, not restarted
    finally:
        op.close()


def test_task_function_keeps_one_operator_and_child_per_process(media, monkeypatch):
    """``decode_videos_task`` (for Ray Data tasks) reuses its operator and decoder child between calls with the
    same configuration, and replaces (closing) them when the configuration changes."""
    from ray_vlm.operators import decode as D

    monkeypatch.setattr(D, "_TASK_OPERATOR", [])
    kwargs = dict(decode=DecodeConfig(isolate=True, target_fps=1.0), guards=GuardConfig(), frame_size=(32, 32))
    try:
        first = list(D.decode_videos_task(_rows([media["mp4_h264"]]), **kwargs))
        op = D._TASK_OPERATOR[0][1]
        child = op._child
        second = list(D.decode_videos_task(_rows([media["mkv_h264"]]), **kwargs))
        assert D._TASK_OPERATOR[0][1] is op and op._child is child and child.alive()
        assert first[-1][S.FRAMES_SAMPLED][0] == second[-1][S.FRAMES_SAMPLED][0] == 2
        assert first[-1][S.FRAMES][0].shape == (2, 32, 32, 3)
        other = dict(kwargs, decode=DecodeConfig(isolate=True, target_fps=2.0))
        third = list(D.decode_videos_task(_rows([media["mp4_h264"]]), **other))
        assert third[-1][S.FRAMES_SAMPLED][0] == 4 and D._TASK_OPERATOR[0][1] is not op and not child.alive()
    finally:
        for _, op in D._TASK_OPERATOR:
            op.close()


def test_hung_child_exits_when_its_parent_dies(media, tmp_path):
    """A parent killed while its child hangs in a decode leaves no orphan behind (the child watches its parent)."""
    path = tmp_path / "hang_me.mp4"
    shutil.copyfile(media["mp4_h264"], path)
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        from ray_vlm.core import schema as S
        from ray_vlm.core.config import DecodeConfig, GuardConfig
        from ray_vlm.operators.decode import DecodeVideos
        rows = {{c: np.array([None], dtype=object) for c in S.VIDEO_META_COLUMNS}}
        rows.update({{S.URI: np.array([{str(path)!r}], dtype=object), S.STATUS: np.array(["ok"], dtype=object),
                      S.ROTATION_DEG: np.zeros(1), S.DECLARED_DURATION_S: np.full(1, np.nan),
                      S.SIZE_BYTES: np.zeros(1)}})
        op = DecodeVideos(DecodeConfig(isolate=True, stall_timeout_s=0.5), GuardConfig(), (32, 32))
        print(op._child.proc.pid, flush=True)
        op._child.start_job(1, ("path", {str(path)!r}), {{}})
        os._exit(0)  # no cleanup: the child is left hanging in its decode
    """)
    env = dict(os.environ, RAY_VLM_DECODE_FAULT="hang:hang_me")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    child_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _pid_alive(child_pid):
        time.sleep(0.1)
    assert not _pid_alive(child_pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ real clips


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4"])
def test_real_clips_sample_at_target_fps(name):
    (path,) = sample_videos((name,))
    target_fps = 2.0
    out = _decode([path], frame_size=(112, 112), target_fps=target_fps)
    chunks = out[str(path)]
    last = _last(chunks)
    assert last[S.STATUS] == S.STATUS_OK
    pts = _all(chunks, S.PTS_S)
    times, durs, _ = _frame_times(path)
    period = float(np.median(np.diff(times)))
    assert np.all(np.abs(np.diff(pts) - 1 / target_fps) <= period + 1e-9)  # spaced 1/target_fps within a frame
    np.testing.assert_allclose(pts, _nearest_reference(times, durs, target_fps), atol=1e-9)
    assert last[S.DURATION_S] == pytest.approx(times[-1] + period, abs=1e-3)
    # real pictures, not blank: frames differ from each other
    frames = _all(chunks, S.FRAMES)
    assert frames.std() > 10 and np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5


def test_bare_reference_loop_takes_first_frame_at_or_after_each_request(media):
    from benchmarks.bench import bare_pyav_sample

    pts, frames = bare_pyav_sample(str(media["full_mp4"]), 7.0, frame_size=(48, 64))
    times, _, _ = _frame_times(media["full_mp4"])
    expected = [times[times >= k / 7.0 - 1e-9][0] for k in range(28)]
    np.testing.assert_allclose(pts, expected, atol=1e-9)
    assert frames[0].shape == (48, 64, 3)
    kpts, _ = bare_pyav_sample(str(media["full_mp4"]), keyframes=True)
    assert list(kpts) == [0.0, 1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------ fixtures


def test_fixture_generators_make_what_they_say(media):
    times, _, key = _frame_times(media["full_mp4"])
    assert len(times) == 120 and list(times[key]) == [0.0, 1.0, 2.0, 3.0]  # gop_s=1 at 30 fps
    with av.open(str(media["full_mp4"])) as c:
        f = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert V.read_timecode(f) == 0 and f.shape == (90, 160, 3)
    with av.open(str(media["rot90_mp4"])) as c:
        assert next(c.decode(video=0)).rotation == -90  # FFmpeg's counter-clockwise sense
    with av.open(str(media["mp4_h264_audio"])) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
    sizes = {n: media[n].stat().st_size for n in ("full_mp4", "trunc50_mp4", "zero_byte_mp4")}
    assert sizes["trunc50_mp4"] == sizes["full_mp4"] // 2 and sizes["zero_byte_mp4"] == 0


def test_pasted_images_show_at_their_times(tmp_path):
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[..., 2] = 255  # pure blue
    path = V.make_video(tmp_path / "img.mp4", width=96, height=64, duration_s=3.0, images=[(img, 1.0, 2.0)])
    got = list(sample_video(str(path), DecodeConfig(target_fps=2.0), (64, 96)))
    blue = [t for t, f in got if f[..., 2].mean() > 200 and f[..., 0].mean() < 40]
    assert blue == [1.0, 1.5]


@pytest.mark.slow
def test_memory_does_not_grow_with_duration(tmp_path):
    """Peak traced memory while consuming chunks is about the same for a 10 s and a 40 s video."""
    import tracemalloc

    peaks = []
    for seconds in (10.0, 40.0):
        path = V.make_video(tmp_path / f"long{int(seconds)}.mp4", width=160, height=96, duration_s=seconds, gop_s=2.0)
        op = DecodeVideos(DecodeConfig(isolate=False, target_fps=10.0, chunk_frames=16), GuardConfig(), (224, 224))
        tracemalloc.start()
        n = 0
        for batch in op(_rows([path])):
            n += len(batch[S.PTS_S][0])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert n == int(seconds * 10)
    chunk_bytes = 16 * 224 * 224 * 3
    assert peaks[1] < peaks[0] + chunk_bytes  # 4x the video, not 4x the memory
    assert peaks[1] < 4 * chunk_bytes


def test_the_watchdog_does_not_count_time_a_decoder_waits_for_a_cpu():
    """A starved decoder is slow, not hung: time spent runnable but waiting for a CPU is not a stall.

    A busy process shares one CPU with two busy hogs, so it waits for the CPU at least 2/3 of the time
    (more under any other load). Nothing arrives on the connection; ``_poll(0.5)`` must wait until the
    process has had 0.5 s it could use: about 1.5 s of wall time or more, however loaded the machine is.
    """
    import types
    from multiprocessing.connection import Pipe

    from ray_vlm.operators.decode import _DecoderChild, _runqueue_wait_s

    if _runqueue_wait_s(os.getpid()) is None:
        pytest.skip("no /proc/<pid>/task/*/schedstat on this system")
    cpu = sorted(os.sched_getaffinity(0))[0]
    busy = f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE) for _ in range(3)]
    ours, _theirs = Pipe()
    try:
        for p in procs:
            p.stdout.readline()  # pinned, and busy from now on
        child = types.SimpleNamespace(proc=procs[0], conn=ours)
        t0 = time.monotonic()
        assert _DecoderChild._poll(child, 0.5) is False
        assert time.monotonic() - t0 >= 1.2  # 1.5 s with a fair 1/3 share; 0.5 s if waiting counted
        assert _runqueue_wait_s(procs[0].pid) > 0.5
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------ resuming a video


@pytest.mark.parametrize("isolate", [False, True])
def test_a_resumed_video_decodes_only_the_rest_and_matches_the_full_run(tmp_path, isolate):
    """A job killed after committing chunks 0..k-1 reruns from chunk k: the decoder seeks near ``resume_s``, sends
    only chunks k.. (counted), numbered on from k, with the same times, indices and pixels as the full run."""
    path = V.make_video(tmp_path / "long.mp4", width=64, height=48, fps=25.0, duration_s=40.0, gop_s=2.0)
    cfg = {"target_fps": 2.0, "chunk_frames": 8, "isolate": isolate}
    full = _decode([path], frame_size=(48, 64), **cfg)[str(path)]
    assert len(full) == 10
    k = 7  # chunks 0..6 are committed: 70 % of the video
    resume = (k, float(full[k - 1][S.CHUNK_END_S]), int(full[k][S.FRAME_INDEX][0]))
    op = DecodeVideos(DecodeConfig(**cfg), GuardConfig(), (48, 64), resume={"0000000000000000": resume})
    try:
        rest = [{c: v[0] for c, v in b.items()} for b in op(_rows([path]))]
    finally:
        op.close()
    assert [c[S.CHUNK_INDEX] for c in rest] == list(range(k, 10))  # only the rest was decoded and sent
    for a, b in zip(rest, full[k:]):
        assert list(a[S.FRAME_INDEX]) == list(b[S.FRAME_INDEX])
        np.testing.assert_allclose(a[S.PTS_S], b[S.PTS_S], atol=1e-9)
        assert a[S.CHUNK_END_S] == pytest.approx(b[S.CHUNK_END_S])
        # the same frames: decoding from the keyframe before resume_s gives the full run's pixels (a few levels
        # of tolerance for SIMD paths, which are the same within one process)
        assert np.abs(a[S.FRAMES].astype(np.int16) - b[S.FRAMES].astype(np.int16)).max() <= 2
    last = rest[-1]
    assert last[S.IS_LAST] and last[S.STATUS] == S.STATUS_OK and last[S.FRAMES_SAMPLED] == full[-1][S.FRAMES_SAMPLED]
    # the sampler itself decoded far less than the full run: it sought to the keyframe before resume_s
    s = sample_video(str(path), DecodeConfig(target_fps=2.0), (48, 64), start_s=resume[1])
    times = [t for t, _ in s]
    assert times[0] == pytest.approx(full[k][S.PTS_S][0]) and s.stats.seeks >= 1
    assert s.stats.frames_decoded < 0.5 * 40 * 25
