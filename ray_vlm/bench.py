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


def _start_ray() -> None:
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for h in logging.getLogger("ray.data").handlers:
        if not hasattr(h, "baseFilename"):
            h.setLevel(logging.ERROR)


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


# ------------------------------------------------------------------------------------------ decode


def decode_bench(out: Path, seconds: float = 60.0, clips: int = 2, repeats: int = 3, read_videos: bool = True) -> dict:
    """Sampled decode, same 1080p H.264 files (2 s GOPs), same cores, one run.

    Through Ray Data (``ray.data.read_videos(fps=1)`` vs this project's decode operator) and in-process
    (bare PyAV loops vs the operator's sampler, CPU time) for the overhead ratio.
    """
    import ray

    from ray_vlm.config import DecodeConfig, GuardConfig
    from ray_vlm.operators.decode import DecodeVideos, bare_pyav_sample, sample_video

    paths = [str(p) for p in bench_clips(clips, seconds)]
    size = (224, 224)
    fps_cfg = DecodeConfig(mode="fps", target_fps=1.0, isolate=True)
    key_cfg = DecodeConfig(mode="keyframes", target_fps=1.0, isolate=True)
    _start_ray()
    ncpu = int(ray.cluster_resources()["CPU"])

    def ours_ray(cfg: DecodeConfig):
        def run():
            rows = [{"uri": p, "video_id": f"b{i}", "size_bytes": os.path.getsize(p), "mtime": 0.0,
                     "status": "ok", "error_type": "", "error": "", "container": "", "codec": "",
                     "width": 1920, "height": 1080, "rotation_deg": 0, "declared_duration_s": seconds}
                    for i, p in enumerate(paths)]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                DecodeVideos, batch_size=1, concurrency=min(ncpu, len(rows)), num_cpus=1,
                fn_constructor_kwargs=dict(decode=cfg, guards=GuardConfig(), frame_size=size))
            pts = []
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for p in b["pts_s"]:
                    pts.extend(np.asarray(p).tolist())
            return pts
        return run

    def theirs_ray():
        ds = ray.data.read_videos(paths, fps=1, resize=size, include_timestamps=True)
        # decord gives (start, end) per frame; the start is the sample's time
        return [float(np.asarray(t).ravel()[0])
                for b in ds.iter_batches(batch_size=None, batch_format="numpy") for t in b["frame_timestamp"]]

    def in_process(fn):
        def run():
            return [t for p in paths for t in fn(p)]
        return run

    def ours_local(cfg):
        return in_process(lambda p: [t for t, _ in sample_video(p, cfg.model_copy(update={"isolate": False}), size)])

    def bare_full_decode(p):
        import av

        with av.open(p) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            return [0.0 for _ in c.decode(s)]

    methods = {}
    if read_videos:
        methods["ray.data.read_videos(fps=1)"] = theirs_ray
    methods["ray-vlm decode, exact 1 fps (Ray)"] = ours_ray(fps_cfg)
    methods["ray-vlm decode, keyframes (Ray)"] = ours_ray(key_cfg)
    methods["bare PyAV, every frame decoded (in-process)"] = in_process(bare_full_decode)
    methods["bare PyAV, 1 fps sampling (in-process)"] = in_process(lambda p: bare_pyav_sample(p, 1.0, frame_size=size)[0])
    methods["ray-vlm sampler, 1 fps (in-process)"] = ours_local(fps_cfg)
    methods["bare PyAV, keyframes (in-process)"] = in_process(
        lambda p: bare_pyav_sample(p, None, keyframes=True, frame_size=size)[0])
    methods["ray-vlm sampler, keyframes (in-process)"] = ours_local(key_cfg)

    res = {}
    for name, fn in methods.items():
        fn()  # warm-up: page cache, imports, actor images
        m = _measure(fn, repeats)
        pts = m.pop("result")
        res[name] = {**m, "frames": len(pts)}
        if "1 fps" in name and "ray-vlm" in name:
            # every sample within one source frame period (1/25 s) of its requested time k / 1 fps
            err = max((abs(t - round(t)) for t in pts), default=0.0)
            res[name]["max_sample_error_s"] = err
    base = res.get("ray.data.read_videos(fps=1)")
    rows = []
    for name, r in res.items():
        speedup = base["wall_s"] / r["wall_s"] if base else float("nan")
        rows.append([name, r["frames"], r["wall_s"], r["cpu_s"], speedup])
    ratios = {
        "exact_1fps_speedup_vs_read_videos": (base["wall_s"] / res["ray-vlm decode, exact 1 fps (Ray)"]["wall_s"]) if base else None,
        "keyframes_speedup_vs_read_videos": (base["wall_s"] / res["ray-vlm decode, keyframes (Ray)"]["wall_s"]) if base else None,
        "overhead_1fps_cpu_vs_bare_pyav": res["ray-vlm sampler, 1 fps (in-process)"]["cpu_s"] / res["bare PyAV, 1 fps sampling (in-process)"]["cpu_s"],
        "overhead_keyframes_cpu_vs_bare_pyav": res["ray-vlm sampler, keyframes (in-process)"]["cpu_s"] / res["bare PyAV, keyframes (in-process)"]["cpu_s"],
    }
    _table(f"decode: {clips} x {seconds:.0f} s 1080p H.264 (2 s GOP), {ncpu} CPUs, median of {repeats}",
           ["method", "frames", "wall s", "cpu s", "speed-up vs read_videos"], rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}" if v is not None else f"{k}: -")
    data = {"machine": machine(), "clips": paths, "seconds": seconds, "repeats": repeats, "cpus": ncpu,
            "results": res, "ratios": ratios}
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ pruning


def make_static_camera_clip(path: Path, seconds: float = 120.0, *, fps: int = 25, noise: float = 2.0) -> Path:
    """A fixed camera on a real photograph (scikit-learn's china.jpg, 640x360) with per-pixel sensor noise
    (Gaussian, sigma ``noise`` grey levels, new every frame) and a dark figure (24x60 px) that walks across
    the scene from 20 % to 50 % of the clip; libx264 crf 23, 2 s GOP."""
    import av
    from PIL import Image

    if path.exists():
        return path
    from sklearn.datasets import load_sample_images

    photo = np.asarray(Image.fromarray(load_sample_images().images[0]).resize((640, 360)), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    out = av.open(str(tmp), "w")
    st = out.add_stream("libx264", rate=fps)
    st.width, st.height, st.pix_fmt = 640, 360, "yuv420p"
    st.options = {"preset": "veryfast", "crf": "23", "g": str(2 * fps), "sc_threshold": "0"}
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    for i in range(n):
        img = photo + rng.normal(0, noise, photo.shape).astype(np.float32)
        u = i / n
        if 0.2 <= u < 0.5:
            x = int((u - 0.2) / 0.3 * (640 - 24))
            img[250:310, x : x + 24] = (30, 30, 40)
        f = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
        f.pts = i
        f.time_base = Fraction(1, fps)
        for p in st.encode(f):
            out.mux(p)
    for p in st.encode():
        out.mux(p)
    out.close()
    tmp.rename(path)
    return path


def prune_bench(out: Path, thresholds: tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.06, 0.08)) -> dict:
    """Share of patch tokens pruned per threshold: static-camera footage and the real sample clips."""
    from ray_vlm.config import DecodeConfig, PruneConfig
    from ray_vlm.models import get_spec
    from ray_vlm.operators.decode import sample_video
    from ray_vlm.operators.prune import diff_keep_mask
    from ray_vlm.samples import sample_videos

    spec = get_spec("bundled:effnet-lite0-minilm")
    clips = {"static camera, 120 s": make_static_camera_clip(CACHE / "static-120s.mp4")}
    for p in sample_videos():
        clips[p.name] = p
    dec = DecodeConfig(target_fps=1.0, isolate=False)
    chunk = dec.chunk_frames
    res: dict = {}
    for name, p in clips.items():
        frames = np.stack([rgb for _, rgb in sample_video(str(p), dec, tuple(spec.input_size))])
        res[name] = {"frames": len(frames)}
        for th in thresholds:
            kept = total = 0
            for i in range(0, len(frames), chunk):
                m = diff_keep_mask(frames[i : i + chunk], tuple(spec.patch_grid), th)
                kept += int(m.sum())
                total += m.size
            res[name][str(th)] = 1 - kept / total
    default = PruneConfig().threshold
    _table(f"share of patch tokens pruned at 1 fps, {spec.patch_grid[0]}x{spec.patch_grid[1]} patches (default threshold {default})",
           ["clip", "frames", *[f"th={t}" for t in thresholds]],
           [[k, v["frames"], *[v[str(t)] for t in thresholds]] for k, v in res.items()])
    data = {"machine": machine(), "default_threshold": default, "results": res}
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ store size


def store_bench(out: Path) -> dict:
    """Token payload and Parquet bytes per video-hour for each token layout, on the sample clips."""
    import tempfile

    from ray_vlm.config import IndexConfig
    from ray_vlm.pipelines.archive_index import index_archive
    from ray_vlm.samples import sample_videos
    from ray_vlm.store import TokenStore

    layouts = [
        {"grid": 0, "patches": False, "dtype": "int8"},
        {"grid": 0, "patches": False, "dtype": "fp16"},
        {"grid": 2, "patches": False, "dtype": "fp16"},
        {"grid": 2, "patches": True, "dtype": "fp16"},
        {"grid": 2, "patches": True, "dtype": "int8"},
    ]
    clips = [str(p) for p in sample_videos()]
    res = {}
    for lay in layouts:
        cfg = IndexConfig.model_validate({"compress": lay})
        with tempfile.TemporaryDirectory() as d:
            s = index_archive(clips, f"{d}/store", cfg)
            files = [f for f in Path(d, "store").rglob("*.parquet") if "frames" in str(f)]
            parquet = sum(f.stat().st_size for f in files)
            hours = s.video_hours
            res[cfg.compress.layout] = {
                "video_hours": hours, "frames_kept": s.frames_kept, "tokens": s.tokens,
                "tokens_per_frame": s.tokens / max(1, s.frames_kept),
                "payload_bytes_per_hour": s.stored_bytes / hours,
                "parquet_bytes_per_hour": parquet / hours,
                "payload_stats": TokenStore(f"{d}/store").payload_stats(),
            }
    _table("token store size per video-hour (1 fps, bundled encoder, D=384, pruning on)",
           ["layout", "tokens/frame", "payload MB/h", "parquet MB/h"],
           [[k, v["tokens_per_frame"], v["payload_bytes_per_hour"] / 1e6, v["parquet_bytes_per_hour"] / 1e6]
            for k, v in res.items()])
    data = {"machine": machine(), "clips": clips, "results": res}
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ index throughput


class _NaiveFrameEmbedder:
    """The naive pipeline's model stage: the same bundled encoder, one frame per call."""

    def __init__(self):
        from ray_vlm.models import load_encoder

        self.enc = load_encoder("bundled:effnet-lite0-minilm")

    def __call__(self, batch):
        g, _ = self.enc.encode_frames(np.stack(list(batch["frame"])))
        return {"frame_index": batch["frame_index"], "emb": g.astype(np.float16)}


def index_bench(out: Path, seconds: float = 60.0, clips: int = 2, repeats: int = 1) -> dict:
    """End-to-end index throughput through Ray on this machine's cores: this project's job vs a naive Ray
    pipeline (``read_videos(fps=1)`` + the same encoder one frame per call + ``write_parquet``)."""
    import tempfile

    import ray

    from ray_vlm.pipelines.archive_index import index_archive

    paths = [str(p) for p in bench_clips(clips, seconds)]
    video_s = clips * seconds
    _start_ray()

    def ours():
        with tempfile.TemporaryDirectory() as d:
            return index_archive(paths, f"{d}/store").frames_kept

    def naive():
        with tempfile.TemporaryDirectory() as d:
            ds = ray.data.read_videos(paths, fps=1, resize=(224, 224)).map_batches(
                _NaiveFrameEmbedder, batch_size=1, concurrency=1, batch_format="numpy")
            ds.write_parquet(f"{d}/naive")
            return sum(1 for _ in Path(d, "naive").glob("*.parquet"))

    res = {}
    for name, fn in (("naive: read_videos + per-frame model", naive), ("ray-vlm index", ours)):
        m = _measure(fn, repeats)
        m.pop("result")
        res[name] = {**m, "video_s_per_wall_s": video_s / m["wall_s"]}
    ratio = res["ray-vlm index"]["video_s_per_wall_s"] / res["naive: read_videos + per-frame model"]["video_s_per_wall_s"]
    _table(f"index throughput: {clips} x {seconds:.0f} s 1080p H.264, {os.cpu_count()} CPUs",
           ["pipeline", "wall s", "video-s per wall-s"],
           [[k, v["wall_s"], v["video_s_per_wall_s"]] for k, v in res.items()])
    print(f"ray-vlm / naive throughput: {ratio:.2f}x")
    data = {"machine": machine(), "clips": paths, "results": res, "speedup_vs_naive": ratio}
    _write(out, data)
    return data
