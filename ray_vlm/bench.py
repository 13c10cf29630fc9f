"""Benchmarks behind ``ray-vlm bench ...``: each prints a table and writes JSON.

Speed is reported as ratios measured in the same run on the same files and cores (medians of repeats);
absolute times are printed for context only. Nothing here is asserted by tests.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("RAY_VLM_BENCH_CACHE", Path.home() / ".cache" / "ray-vlm" / "bench"))


# ------------------------------------------------------------------------------------------ fixtures


def make_1080p_clip(path: Path, seconds: float, *, fps: int = 25, gop_s: float = 2.0, seed: int = 0) -> Path:
    """Real footage at 1080p H.264 with a fixed GOP: the Big Buck Bunny sample (720p, 5.3 s) upscaled to
    1920x1080 and played forwards/backwards until ``seconds`` long, encoded with libx264 (preset veryfast,
    crf 23, keyframe every ``gop_s`` seconds, no scene-cut keyframes, yuv420p).
    """
    import av

    from ray_vlm.samples import sample_videos

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    src = av.open(str(sample_videos(("bigbuckbunny.mp4",))[0]))
    frames = [f.reformat(1920, 1080, format="yuv420p") for f in src.decode(video=0)]
    src.close()
    tmp = path.with_suffix(".tmp.mp4")
    out = av.open(str(tmp), "w")
    st = out.add_stream("libx264", rate=fps)
    st.width, st.height, st.pix_fmt = 1920, 1080, "yuv420p"
    gop = int(round(gop_s * fps))
    st.options = {"preset": "veryfast", "crf": "23", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
    n = int(round(seconds * fps))
    order = frames + frames[::-1]
    rng = np.random.default_rng(seed)
    offset = int(rng.integers(0, len(order)))
    for i in range(n):
        f = order[(i + offset) % len(order)]
        f.pts = i
        f.time_base = Fraction(1, fps)
        f.pict_type = av.video.frame.PictureType.NONE
        for p in st.encode(f):
            out.mux(p)
    for p in st.encode():
        out.mux(p)
    out.close()
    tmp.rename(path)
    return path


def bench_clips(n: int, seconds: float) -> list[Path]:
    return [make_1080p_clip(CACHE / f"bbb1080p-{int(seconds)}s-{i}.mp4", seconds, seed=i) for i in range(n)]


# ------------------------------------------------------------------------------------------ timing helpers


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _measure(fn: Callable[[], object], repeats: int) -> dict:
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = _cpu_s(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "walls": walls, "result": result}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def _table(title: str, header: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*[f"{x:.3f}" if isinstance(x, float) else str(x) for x in r])
    Console().print(t)


def _write(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------------ memory


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Ray's raylet, workers, decoder children)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid, rss_pages = int(parts[1]), int(parts[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = rss_pages * page
    total, stack = 0, [root_pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def make_long_lowres_clip(path: Path, seconds: float, *, fps: int = 5, size=(160, 120)) -> Path:
    """A long low-resolution H.264 clip (moving gradient + a square that crosses the frame every 30 s,
    keyframe every 10 s), for the memory-vs-length benchmark."""
    import av

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    out = av.open(str(tmp), "w")
    st = out.add_stream("libx264", rate=fps)
    w, h = size
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"preset": "ultrafast", "g": str(10 * fps), "sc_threshold": "0"}
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(int(seconds * fps)):
        t = i / fps
        img = np.empty((h, w, 3), dtype=np.uint8)
        img[..., 0] = (xx + 3 * t) % 256
        img[..., 1] = (yy + 2 * t) % 256
        img[..., 2] = 128
        x0 = int((t % 30) / 30 * (w - 20))
        img[40:60, x0 : x0 + 20] = 255
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts = i
        f.time_base = Fraction(1, fps)
        for p in st.encode(f):
            out.mux(p)
    for p in st.encode():
        out.mux(p)
    out.close()
    tmp.rename(path)
    return path


def memory_bench(out: Path, short_s: float = 600.0, long_s: float = 7200.0) -> dict:
    """Peak resident memory (driver + Ray + workers) indexing a short and a long low-resolution video,
    each in a fresh ``ray-vlm index`` process, sampling RSS every 0.2 s."""
    import subprocess
    import sys
    import tempfile

    results = {}
    for label, secs in (("short", short_s), ("long", long_s)):
        clip = make_long_lowres_clip(CACHE / f"lowres-{int(secs)}s.mp4", secs)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "ray_vlm.cli", "index", str(clip), "--store", f"{d}/store", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ, RAY_VLM_QUIET="1"),
            )
            peak = 0
            while proc.poll() is None:
                peak = max(peak, _tree_rss_bytes(proc.pid))
                time.sleep(0.2)
            summary = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
            results[label] = {
                "video_s": secs, "peak_rss_mb": peak / 2**20, "wall_s": time.perf_counter() - t0,
                "frames_sampled": summary["frames_sampled"], "status_ok": summary["videos_ok"],
            }
    ratio = results["long"]["peak_rss_mb"] / results["short"]["peak_rss_mb"]
    data = {"machine": machine(), "results": results, "long_over_short_peak_rss": ratio}
    _table("peak memory vs video length (whole process tree)", ["video", "length s", "frames", "peak RSS MB", "wall s"],
           [[k, v["video_s"], v["frames_sampled"], v["peak_rss_mb"], v["wall_s"]] for k, v in results.items()])
    print(f"long / short peak RSS: {ratio:.3f}")
    _write(out, data)
    return data
