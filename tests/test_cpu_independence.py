"""The same bytes and pixels on every CPU: checked against FFmpeg and x264 with all their SIMD code off.

FFmpeg and x264 pick SIMD code for the CPU they run on (SSE4, AVX2, AVX-512, ...), and not every path
gives the same output as the plain C code: swscale's FAST_BILINEAR differs from its C version by up to
200 levels, and libx264's AVX-512 code even gives different bytes from one run to the next unless
``cpu-independent=1``. What must not depend on the CPU:

- the decoder's pictures (``DecodeConfig.scaler="exact"``, the default), so a store holds the same
  frames whichever machine indexed it;
- the synthetic test videos (``tests/fixtures/videos.py``) and the grounding benchmark's videos
  (``benchmarks.benchgen``), so a test asserts what every machine produces.

Each test computes the result in this process (the CPU's own SIMD code) and in a child process where
``av_force_cpu_flags(0)`` switches FFmpeg to C and x264 gets ``asm=0``, then compares bit for bit. On a
CPU with AVX-512 this compares the two extremes; H.264, HEVC and VP9 decoding are bit-exact by their
specifications, so the scaler and the encoders are what this guards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fixtures import videos as V

TESTS = Path(__file__).resolve().parent

# Runs in the child: every FFmpeg SIMD path off (libavutil's cpu flags are read when a scaler or codec is set
# up), and libx264 told not to use its assembly. libavutil is found among the loaded libraries, wherever the
# PyAV wheel put it.
_PLAIN_C = """
import ctypes, av
import av.video.reformatter
libs = [line.split()[-1] for line in open("/proc/self/maps") if "libavutil" in line]
ctypes.CDLL(libs[0]).av_force_cpu_flags(0)
assert ctypes.CDLL(libs[0]).av_get_cpu_flags() == 0
from fixtures import videos as V
_options = V._codec_options
V._codec_options = lambda codec, gop: (
    {**_options(codec, gop), "x264-params": _options(codec, gop)["x264-params"] + ":asm=0"}
    if codec == "libx264" else _options(codec, gop))
"""


def _in_plain_c(body: str, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_PLAIN_C + textwrap.dedent(body))
    # the tests' fixtures, and the checkout's benchmarks/ (run from a checkout, not installed)
    paths = [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_fixture_videos_are_the_same_bytes_with_and_without_simd(tmp_path):
    specs = {"h264.mp4": {}, "h264.ts": {"duration_s": 4.0}, "rot90.mp4": {"rotation_deg": 90},
             "static.mp4": {"static": True, "seed": 3}}
    mine = {name: _sha(V.make_video(tmp_path / "simd" / name, **kw)) for name, kw in specs.items()}
    again = {name: _sha(V.make_video(tmp_path / "again" / name, **kw)) for name, kw in specs.items()}
    assert mine == again  # one machine, two runs
    _in_plain_c(f"""
        import hashlib, json
        specs = {specs!r}
        out = {{n: hashlib.sha256(V.make_video("c/" + n, **kw).read_bytes()).hexdigest() for n, kw in specs.items()}}
        open("c.json", "w").write(json.dumps(out))
    """, tmp_path)
    assert json.loads((tmp_path / "c.json").read_text()) == mine
    # the rotated video is its unrotated twin with a display matrix: the same coded pictures
    import av

    def packets(p):
        with av.open(str(p)) as c:
            return [bytes(x) for x in c.demux(video=0) if x.size]

    assert packets(tmp_path / "simd" / "rot90.mp4") == packets(tmp_path / "simd" / "h264.mp4")


@pytest.mark.slow
def test_benchgen_videos_are_the_same_bytes_with_and_without_simd(tmp_path):
    from benchmarks import benchgen as B

    kw = {"n_videos": 1, "seconds": 6.0, "size": (160, 120), "events_per_video": 1}
    videos, _ = B.generate(tmp_path / "simd", seed=5, **kw)
    mine = [_sha(p) for p in videos]
    _in_plain_c(f"""
        import hashlib, json
        from benchmarks import benchgen as B
        B.X264_REPRODUCIBLE += ":asm=0"
        videos, _ = B.generate("c", seed=5, **{kw!r})
        open("c.json", "w").write(json.dumps([hashlib.sha256(p.read_bytes()).hexdigest() for p in videos]))
    """, tmp_path)
    assert json.loads((tmp_path / "c.json").read_text()) == mine


def test_decoded_pictures_are_the_same_with_and_without_simd(tmp_path):
    """The exact scaler on real 720p footage and on 8-bit H.264, 10-bit HEVC and VP9, downscaled and not."""
    from ray_vlm.core.config import DecodeConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.operators.decode import sample_video

    paths = {"bbb": str(next(p for p in sample_videos() if p.name == "bigbuckbunny.mp4")),
             "h264": str(V.make_video(tmp_path / "h264.mp4")),
             "vp9": str(V.make_video(tmp_path / "vp9.webm", codec="libvpx-vp9"))}
    if V.has_encoder("libx265"):
        paths["hevc10"] = str(V.make_video(tmp_path / "hevc10.mp4", codec="libx265", pix_fmt="yuv420p10le"))
    sizes = [(224, 224), (90, 160), (216, 384)]
    cfg = dict(target_fps=2.0, isolate=False)

    def decode_all():
        return {f"{name}_{h}x{w}": np.stack([rgb for _, rgb in sample_video(p, DecodeConfig(**cfg), (h, w))])
                for name, p in paths.items() for h, w in sizes}

    mine = decode_all()
    _in_plain_c(f"""
        import numpy as np
        from ray_vlm.core.config import DecodeConfig
        from ray_vlm.operators.decode import sample_video
        paths, sizes, cfg = {paths!r}, {sizes!r}, {cfg!r}
        out = {{f"{{name}}_{{h}}x{{w}}": np.stack([rgb for _, rgb in sample_video(p, DecodeConfig(**cfg), (h, w))])
               for name, p in paths.items() for h, w in sizes}}
        np.savez("c.npz", **out)
    """, tmp_path)
    theirs = np.load(tmp_path / "c.npz")
    assert sorted(theirs.files) == sorted(mine)
    for key, frames in mine.items():
        assert frames.shape[0] >= 4, key
        np.testing.assert_array_equal(theirs[key], frames, err_msg=key)
