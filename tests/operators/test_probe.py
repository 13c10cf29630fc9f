"""Tests for the probe operator: one row per input, refusals before decoding, metadata from the container.

Every fixture is generated here with PyAV (see ``_encode_video`` / ``_encode_audio``), into a
module-scoped temporary directory, so the files exist only for the test run.
"""

from __future__ import annotations

import io
import math
import os

import av
import numpy as np
import pytest

from ray_vlm.core import schema as S
from ray_vlm.core.config import GuardConfig, SourceConfig
from ray_vlm.core.fs import expand_sources, fingerprint, resolve, uri_id
from ray_vlm.operators import probe as probe_mod
from ray_vlm.operators.probe import (
    REFUSED,
    ProbeVideos,
    open_container,
    sniff,
    source_columns,
)

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------ fixtures
def _encode_video(path, codec="mpeg4", width=64, height=48, seconds=2.0, fps=10, fmt=None, rotation=None):
    """Equivalent of ``ffmpeg -f lavfi -i testsrc=size=WxH:rate=FPS -t SECONDS -c:v CODEC PATH``.

    Frames are a moving gradient (so encoders produce real P-frames); libx264 uses preset ultrafast.
    ``rotation`` writes a display matrix (counter-clockwise degrees) into the container.
    """
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec == "libx264":
        stream.options = {"preset": "ultrafast"}
    if rotation is not None:
        stream.set_display_rotation(rotation)
    ramp = np.add.outer(np.arange(height), np.arange(width)).astype(np.uint8)
    for i in range(int(seconds * fps)):
        rgb = np.stack([ramp + 8 * i, ramp, 255 - ramp], axis=-1).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def _encode_black_frame(path, width, height):
    """One black frame at width x height, libx264 ultrafast in mp4 (8K: about 100 KB on disk)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=1)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast"}
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, value in zip(frame.planes, (16, 128, 128)):
        plane.update(bytes([value]) * plane.buffer_size)
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def _encode_audio(path, seconds=1.0, rate=16000):
    """Audio-only AAC in mp4: ``ffmpeg -f lavfi -i sine=f=440 -t 1 -c:a aac PATH``."""
    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=rate)
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    n = 1024
    for start in range(0, len(samples), n):
        chunk = np.stack([samples[start : start + n]] * 2)  # (channels, samples), planar
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_media")
    m = {
        "mp4": _encode_video(d / "good.mp4"),
        "mkv_h264": _encode_video(d / "h264.mkv", codec="libx264", width=96, height=64, seconds=1.5, fps=8),
        "ts": _encode_video(d / "clip.ts", codec="libx264", seconds=1.0, fmt="mpegts"),
        "rot90": _encode_video(d / "rot90.mp4", seconds=0.5, rotation=90),
        "rot270": _encode_video(d / "rot270.mp4", seconds=0.5, rotation=-90),
        "eight_k": _encode_black_frame(d / "eight_k.mp4", 7680, 4320),
        "audio": _encode_audio(d / "audio_only.m4a"),
        "text_mp4": _write(d / "notes.mp4", b"this is a text file pretending to be a video\n" * 20),
        "empty": _write(d / "empty.mp4", b""),
        "random": _write(d / "random.mp4", np.random.default_rng(0).bytes(50_000)),
        "hls": _write(d / "evil.m3u8", b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"),
        "hls_as_mp4": _write(d / "evil_playlist.mp4", b"\n#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n"),
        "ffconcat": _write(d / "list.mp4", b"ffconcat version 1.0\nfile '/etc/passwd'\n"),
        "sdp": _write(d / "cam.mp4", b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\nm=video 5004 RTP/AVP 96\r\n"),
        "png": _write(d / "image.mp4", _png_bytes()),
    }
    return m


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run(op: ProbeVideos, uris, refused=None):
    inputs = []
    for u in uris:
        size = os.path.getsize(u) if isinstance(u, str) and os.path.exists(u) else -1
        inputs.append((u, size))
    batch = {
        S.URI: np.array([u for u, _ in inputs], dtype=object),
        S.SIZE_BYTES: np.array([s for _, s in inputs], dtype=np.int64),
        S.MTIME: np.full(len(inputs), 1.7e9),
    }
    if refused is not None:
        batch[REFUSED] = np.array(refused, dtype=object)
    return op(batch)


def _rows(out) -> list[dict]:
    return [{k: out[k][i] for k in out} for i in range(len(out[S.URI]))]


@pytest.fixture()
def open_spy(monkeypatch):
    """Records every input FFmpeg is asked to open (through the probe's open_container)."""
    calls = []
    real = probe_mod.open_container

    def spy(fileobj, guards, **kw):
        fileobj.seek(0)
        calls.append(fileobj.read(64))
        fileobj.seek(0)
        return real(fileobj, guards, **kw)

    monkeypatch.setattr(probe_mod, "open_container", spy)
    return calls


# ------------------------------------------------------------------------------------------ good inputs
def test_good_videos_metadata(media):
    out = _run(ProbeVideos(), [media["mp4"], media["mkv_h264"], media["ts"]])
    assert tuple(out) == ProbeVideos.adds
    mp4, mkv, ts = _rows(out)
    assert [r[S.STATUS] for r in (mp4, mkv, ts)] == [S.STATUS_OK] * 3
    assert all(r[S.ERROR_TYPE] == "" and r[S.ERROR] == "" for r in (mp4, mkv, ts))

    assert mp4[S.CONTAINER] == "mov,mp4,m4a,3gp,3g2,mj2" and mp4[S.CODEC] == "mpeg4"
    assert (mp4[S.WIDTH], mp4[S.HEIGHT], mp4[S.ROTATION_DEG]) == (64, 48, 0)
    assert mp4[S.DECLARED_DURATION_S] == pytest.approx(2.0, abs=0.15)
    assert mp4[S.AVG_FPS] == pytest.approx(10.0)
    fs, path = resolve(media["mp4"])
    assert mp4[S.VIDEO_ID] == fingerprint(fs, path, os.path.getsize(media["mp4"]))
    assert mp4[S.SIZE_BYTES] == os.path.getsize(media["mp4"]) and mp4[S.MTIME] == 1.7e9

    assert mkv[S.CONTAINER] == "matroska,webm" and mkv[S.CODEC] == "h264"
    assert (mkv[S.WIDTH], mkv[S.HEIGHT]) == (96, 64)
    assert mkv[S.DECLARED_DURATION_S] == pytest.approx(1.5, abs=0.2)
    assert ts[S.CONTAINER] == "mpegts" and ts[S.CODEC] == "h264"
    assert ts[S.DECLARED_DURATION_S] == pytest.approx(1.0, abs=0.2)

    assert out[S.WIDTH].dtype == np.int32 and out[S.ROTATION_DEG].dtype == np.int16
    assert out[S.SIZE_BYTES].dtype == np.int64 and out[S.DECLARED_DURATION_S].dtype == np.float64
    assert out[S.URI].dtype == object and out[S.VIDEO_ID].dtype == object


def test_rotation_from_display_matrix(media):
    rot90, rot270, plain = _rows(_run(ProbeVideos(), [media["rot90"], media["rot270"], media["mp4"]]))
    # The fixtures' display matrices turn 90 and -90 degrees counter-clockwise (FFmpeg's sense);
    # rotation_deg is the clockwise rotation to apply: 270 and 90.
    assert (rot90[S.ROTATION_DEG], rot270[S.ROTATION_DEG], plain[S.ROTATION_DEG]) == (270, 90, 0)
    assert rot90[S.STATUS] == S.STATUS_OK
    # Consistent with what the decoder reads from frames: rotation_deg == -frame.rotation (mod 360).
    for key, row in (("rot90", rot90), ("rot270", rot270)):
        with av.open(media[key]) as c:
            assert (-next(c.decode(video=0)).rotation) % 360 == row[S.ROTATION_DEG]
    # The probe left PyAV's logging as it found it.
    assert av.logging.get_level() is None


def test_probe_does_not_decode(media, monkeypatch):
    """The probe never asks PyAV for frames (and its stream-info pass skips every frame)."""

    def boom(*a, **k):
        raise AssertionError("probe decoded")

    monkeypatch.setattr(av.container.InputContainer, "decode", boom, raising=False)
    out = _run(ProbeVideos(), [media["mp4"]])
    assert out[S.STATUS][0] == S.STATUS_OK


# ------------------------------------------------------------------------------------------ failures
def test_failure_matrix_one_row_each(media, tmp_path):
    missing = str(tmp_path / "missing.mp4")
    uris = [media[k] for k in ("text_mp4", "empty", "random", "audio", "png")] + [missing]
    rows = _rows(_run(ProbeVideos(), uris))
    assert [r[S.URI] for r in rows] == uris
    assert all(r[S.STATUS] == S.STATUS_FAILED for r in rows)
    assert [r[S.ERROR_TYPE] for r in rows] == [
        S.ERR_NOT_VIDEO,
        S.ERR_EMPTY,
        S.ERR_NOT_VIDEO,
        S.ERR_NO_VIDEO_STREAM,
        S.ERR_POLICY,
        S.ERR_NOT_FOUND,
    ]
    text, empty, rand, audio, png, miss = rows
    assert "text file" in text[S.ERROR]
    assert rand[S.ERROR].startswith("FFmpeg: ") and "Invalid data" in rand[S.ERROR]
    assert audio[S.CONTAINER] == "mov,mp4,m4a,3gp,3g2,mj2" and "audio" in audio[S.ERROR]
    assert "allow-list" in png[S.ERROR]  # image2/png_pipe demuxer is not on the whitelist
    # Ids: content hashes where content exists, uri ids for empty / missing inputs.
    assert empty[S.VIDEO_ID] == uri_id(media["empty"]) and miss[S.VIDEO_ID] == uri_id(missing)
    fs, p = resolve(media["random"])
    assert rand[S.VIDEO_ID] == fingerprint(fs, p, 50_000)
    assert miss[S.SIZE_BYTES] == -1


def test_playlists_and_scripts_never_reach_ffmpeg(media, open_spy):
    keys = ("hls", "hls_as_mp4", "ffconcat", "sdp")
    rows = _rows(_run(ProbeVideos(), [media[k] for k in keys] + [media["mp4"]]))
    assert [r[S.ERROR_TYPE] for r in rows[:4]] == [S.ERR_POLICY] * 4
    assert "HLS" in rows[0][S.ERROR] and "HLS" in rows[1][S.ERROR]
    assert "ffconcat" in rows[2][S.ERROR] and "SDP" in rows[3][S.ERROR]
    assert rows[4][S.STATUS] == S.STATUS_OK
    # FFmpeg was asked to open exactly one input: the real video (so the spy works).
    assert len(open_spy) == 1 and b"ftyp" in open_spy[0]


def test_ffmpeg_layer_refuses_playlists_even_unsniffed(media, monkeypatch):
    """Defence in depth: bypass the sniffer; FFmpeg still opens nothing the playlist names."""
    nested = []

    def record(url, flags, options):
        nested.append(url)
        raise PermissionError("refused")

    from ray_vlm.media import container as container_mod

    monkeypatch.setattr(container_mod, "_refuse_nested_open", record)
    with open(media["hls"], "rb") as f:
        with pytest.raises((av.FFmpegError, PermissionError)):
            open_container(f, GuardConfig())
    assert nested == []
    # The demuxer whitelist is enforced by FFmpeg itself.
    with open(media["mp4"], "rb") as f:
        with pytest.raises(av.ArgumentError):
            open_container(f, GuardConfig(allowed_containers=("matroska,webm",)))
    row = _rows(_run(ProbeVideos(GuardConfig(allowed_containers=("matroska,webm",))), [media["mp4"]]))[0]
    assert row[S.ERROR_TYPE] == S.ERR_POLICY and "allow-list" in row[S.ERROR]


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"#EXTM3U\n", S.ERR_POLICY),
        (b"\xef\xbb\xbf  #EXTM3U\n", S.ERR_POLICY),
        (b"ffconcat version 1.0\n", S.ERR_POLICY),
        (b"v=0\r\no=- 0 0 IN IP4 1.2.3.4\r\n", S.ERR_POLICY),
        (b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash">', S.ERR_POLICY),
        (b"[playlist]\nFile1=http://x/a.mp4\n", S.ERR_POLICY),
        (b"see http://example.com/a.mp4 for the video\n", S.ERR_POLICY),
        (b"just some notes\n", S.ERR_NOT_VIDEO),
        (b"\x00\x00\x00\x20ftypisom", None),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01", None),
        (b"G@\x11\x10\x00\x42\xf0", None),
        (b"", None),
    ],
)
def test_sniff(head, expected):
    verdict = sniff(head)
    assert (verdict[0] if verdict else None) == expected


def test_guards(media):
    small = ProbeVideos(GuardConfig(max_width=32))
    row = _rows(_run(small, [media["mp4"]]))[0]
    assert row[S.ERROR_TYPE] == S.ERR_TOO_LARGE and (row[S.WIDTH], row[S.HEIGHT]) == (64, 48)
    row = _rows(_run(ProbeVideos(GuardConfig(max_pixels=64 * 48 - 1)), [media["mp4"]]))[0]
    assert row[S.ERROR_TYPE] == S.ERR_TOO_LARGE
    row = _rows(_run(ProbeVideos(GuardConfig(max_duration_s=1.0)), [media["mp4"]]))[0]
    assert row[S.ERROR_TYPE] == S.ERR_TOO_LONG and "over the guard" in row[S.ERROR]
    assert row[S.DECLARED_DURATION_S] == pytest.approx(2.0, abs=0.15)


def test_eight_k_header_refused_and_decoder_bounded(media):
    """A ~100 KB file declaring 7680x4320: refused from the header; decoders cannot allocate it."""
    assert os.path.getsize(media["eight_k"]) < 300_000
    row = _rows(_run(ProbeVideos(), [media["eight_k"]]))[0]
    assert row[S.ERROR_TYPE] == S.ERR_TOO_LARGE
    assert (row[S.WIDTH], row[S.HEIGHT]) == (7680, 4320) and "7680x4320" in row[S.ERROR]
    # Even a caller that decodes through open_container gets no 8K frame: max_pixels binds the decoder.
    with open(media["eight_k"], "rb") as f:
        container = open_container(f, GuardConfig(), decode=True)
        try:
            frames = []
            with pytest.raises(av.FFmpegError, match="max_pixels"):
                for frame in container.decode(video=0):
                    frames.append(frame)
            assert frames == []
        finally:
            container.close()
    # Control: without the bound the same file decodes to an 8K frame (the fault is real).
    with av.open(media["eight_k"]) as c:
        frame = next(c.decode(video=0))
        assert (frame.width, frame.height) == (7680, 4320)


def test_open_container_decodes_normal_video(media):
    with open(media["mp4"], "rb") as f:
        container = open_container(f, GuardConfig(), decode=True)
        try:
            sizes = [(fr.width, fr.height) for fr in container.decode(video=0)]
        finally:
            container.close()
    assert sizes == [(64, 48)] * 20


_PEAK_RSS = """
import sys
def hwm_mb():  # peak resident set size since the last reset (Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import av, numpy
from ray_vlm.operators.probe import ProbeVideos
with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
    f.write("5")
before = hwm_mb()
if sys.argv[2] == "probe":
    row = ProbeVideos().probe_one(sys.argv[1], -1, float("nan"))
    assert row["error_type"] == "too_large", row
else:  # control: what decoding the header's claim costs
    with av.open(sys.argv[1]) as c:
        next(c.decode(video=0))
print(hwm_mb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_eight_k_probe_memory_stays_bounded(media):
    """Peak RSS growth while probing the 8K file vs decoding it (control shows the fault is real)."""
    import subprocess
    import sys

    def growth_mb(mode):
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, media["eight_k"], mode],
                             capture_output=True, text=True, timeout=60, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    probe_mb, decode_mb = growth_mb("probe"), growth_mb("decode")
    assert decode_mb > 45  # one 7680x4320 yuv420p frame alone is ~50 MB
    assert probe_mb < 20


# ------------------------------------------------------------------------------------------ policy + plumbing
def test_policy_refusals_and_refused_column(media, open_spy):
    uris = [
        "subfile:,,start,0,end,0,,:/etc/passwd",
        "concat:" + media["mp4"] + "|" + media["mp4"],
        "http://169.254.169.254/latest/meta-data/",
        media["mp4"],
        media["mp4"],
    ]
    refused = ["", "", "", "outside the root", ""]
    rows = _rows(_run(ProbeVideos(source=SourceConfig(allowed_protocols=("file", "http"))), uris, refused))
    assert [r[S.ERROR_TYPE] for r in rows] == [S.ERR_POLICY] * 4 + [""]
    assert "subfile" in rows[0][S.ERROR] and "|" in rows[1][S.ERROR] and "169.254" in rows[2][S.ERROR]
    assert rows[3][S.ERROR] == "outside the root" and rows[3][S.VIDEO_ID] == uri_id(media["mp4"])
    assert rows[4][S.STATUS] == S.STATUS_OK
    assert len(open_spy) == 1


def test_skip_video_ids_drops_rows(media, tmp_path):
    fs, path = resolve(media["mp4"])
    done = fingerprint(fs, path, os.path.getsize(media["mp4"]))
    missing = str(tmp_path / "gone.mp4")
    op = ProbeVideos(skip_video_ids=frozenset({done, uri_id(missing)}))
    out = _run(op, [media["mp4"], media["ts"], missing, media["random"]])
    assert list(out[S.URI]) == [media["ts"], media["random"]]
    assert all(len(v) == 2 for v in out.values())


def test_no_exception_escapes(media, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(probe_mod, "fingerprint", broken)
    rows = _rows(_run(ProbeVideos(), [media["mp4"], media["empty"]]))
    assert rows[0][S.ERROR_TYPE] == S.ERR_INTERNAL and "disk on fire" in rows[0][S.ERROR]
    assert rows[1][S.ERROR_TYPE] == S.ERR_EMPTY


def test_empty_batch_and_missing_columns():
    out = ProbeVideos()({S.URI: np.array([], dtype=object), S.SIZE_BYTES: np.array([], np.int64),
                         S.MTIME: np.array([], np.float64)})
    assert tuple(out) == ProbeVideos.adds and all(len(v) == 0 for v in out.values())
    with pytest.raises(S.SchemaError, match="ProbeVideos"):
        ProbeVideos()({S.URI: np.array(["/x.mp4"], dtype=object)})


def test_expand_then_probe_unknown_sizes_and_memory_fs(media, tmp_path):
    """Inputs from expand_sources (incl. a refused manifest entry) and a memory:// video."""
    good = _write(tmp_path / "good.mp4", open(media["mp4"], "rb").read())
    manifest = tmp_path / "lists" / "list.txt"
    manifest.parent.mkdir()
    manifest.write_text("../good.mp4\n../../../../../../etc/passwd\n../missing.mp4\n")
    inputs = expand_sources([str(manifest)], root=str(tmp_path))
    batch = source_columns(inputs)
    rows = {r[S.URI]: r for r in _rows(ProbeVideos()(batch))}
    assert len(rows) == 3
    assert rows[good][S.STATUS] == S.STATUS_OK
    assert rows["/etc/passwd"][S.ERROR_TYPE] == S.ERR_POLICY
    assert rows[str(tmp_path / "missing.mp4")][S.ERROR_TYPE] == S.ERR_NOT_FOUND

    mem = resolve("memory:///")[0]
    with open(media["mp4"], "rb") as f:
        mem.pipe("/probe/good.mp4", f.read())
    try:
        batch = {S.URI: np.array(["memory://probe/good.mp4"], dtype=object),
                 S.SIZE_BYTES: np.array([-1]), S.MTIME: np.array([math.nan])}
        row = _rows(ProbeVideos()(batch))[0]  # size unknown: the probe asks the filesystem
        assert row[S.STATUS] == S.STATUS_OK and row[S.URI] == "memory:///probe/good.mp4"
        assert row[S.SIZE_BYTES] == os.path.getsize(media["mp4"]) and not math.isnan(row[S.MTIME])
        assert row[S.VIDEO_ID] == _rows(_run(ProbeVideos(), [media["mp4"]]))[0][S.VIDEO_ID]
    finally:
        mem.rm("/probe", recursive=True)


@pytest.mark.s3
def test_probe_over_s3(media, s3_bucket):
    import boto3

    bucket, opts = s3_bucket
    client = boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], region_name="us-east-1")
    for key in ("mp4", "random", "hls"):
        with open(media[key], "rb") as f:
            client.put_object(Bucket=bucket, Key=f"in/{os.path.basename(media[key])}", Body=f.read())
    inputs = expand_sources([f"s3://{bucket}/in/"], storage_options=opts)
    # The .m3u8 is not a video extension: directory expansion leaves it out; name it explicitly.
    inputs += expand_sources([f"s3://{bucket}/in/evil.m3u8"], storage_options=opts)
    rows = {r[S.URI]: r for r in _rows(ProbeVideos(storage_options=opts)(source_columns(inputs)))}
    good = rows[f"s3://{bucket}/in/good.mp4"]
    assert good[S.STATUS] == S.STATUS_OK and (good[S.WIDTH], good[S.HEIGHT]) == (64, 48)
    assert good[S.VIDEO_ID] == _rows(_run(ProbeVideos(), [media["mp4"]]))[0][S.VIDEO_ID]
    assert good[S.MTIME] > 1.6e9
    assert rows[f"s3://{bucket}/in/random.mp4"][S.ERROR_TYPE] == S.ERR_NOT_VIDEO
    assert rows[f"s3://{bucket}/in/evil.m3u8"][S.ERROR_TYPE] == S.ERR_POLICY
