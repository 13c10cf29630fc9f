"""Benchmarks behind ``ray-vlm bench ...``: each prints a table and writes JSON.

Speed is reported as ratios measured in the same run on the same files and cores (medians of repeats);
absolute times are printed for context only. Nothing here is asserted by tests.
"""

from __future__ import annotations

import json
import math
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


def _tree_memory_bytes(root_pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process and all its descendants (Ray's raylet, workers, decoder children).

    PSS (proportional set size) counts a shared page once across the processes mapping it; summed RSS
    counts Ray's shared-memory object store once per process that touched it, so it overstates use.
    """
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    pss = rss = 0
    stack = [root_pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


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
            peak_pss = peak_rss = 0
            while proc.poll() is None:
                pss, rss = _tree_memory_bytes(proc.pid)
                peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
                time.sleep(0.2)
            summary = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
            results[label] = {
                "video_s": secs, "peak_pss_mb": peak_pss / 2**20, "peak_rss_sum_mb": peak_rss / 2**20,
                "wall_s": time.perf_counter() - t0,
                "frames_sampled": summary["frames_sampled"], "status_ok": summary["videos_ok"],
            }
    ratio = results["long"]["peak_pss_mb"] / results["short"]["peak_pss_mb"]
    ratio_rss = results["long"]["peak_rss_sum_mb"] / results["short"]["peak_rss_sum_mb"]
    data = {"machine": machine(), "results": results, "long_over_short_peak_pss": ratio,
            "long_over_short_peak_rss_sum": ratio_rss}
    _table("peak memory vs video length (whole process tree, sampled every 0.2 s)",
           ["video", "length s", "frames", "peak PSS MB", "peak summed RSS MB", "wall s"],
           [[k, v["video_s"], v["frames_sampled"], v["peak_pss_mb"], v["peak_rss_sum_mb"], v["wall_s"]]
            for k, v in results.items()])
    print(f"long / short peak PSS: {ratio:.3f}   (summed RSS: {ratio_rss:.3f})")
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ decode


def _bare_pyav_planned(path: str, target_fps: float, frame_size: tuple[int, int]) -> tuple[np.ndarray, list]:
    """Reference for the sampler's overhead: the same packet plan in its plainest PyAV form.

    Reads every packet into memory, picks for each request ``k / target_fps`` the packet with the nearest
    pts (ties: the earlier), then decodes from each target's keyframe up to the target with
    ``skip_frame="NONREF"`` for every other packet, draining and flushing the decoder between runs, and
    converts the targets with the same FAST_BILINEAR scaler. No lookahead bound, no seeking, no guards,
    no chunks, no fallbacks.

    Returns:
        (pts_s float64 (T,), list of T uint8 (H, W, 3)).
    """
    import av
    from av.video.reformatter import Interpolation

    h, w = frame_size
    with av.open(path) as c:
        s = c.streams.video[0]
        cc = s.codec_context
        cc.thread_count = 1
        start, tb = s.start_time or 0, float(s.time_base)
        packets = [p for p in c.demux(s) if p.size]
        times = np.array([(p.pts - start) * tb for p in packets])
        order = np.argsort(times, kind="stable")
        sorted_t = times[order]
        end = sorted_t[-1] + (packets[order[-1]].duration or 0) * tb
        targets: set[int] = set()
        k = 0
        while k / target_fps < end - 1e-6:
            r = k / target_fps
            i = int(np.searchsorted(sorted_t, r))
            j = min((j for j in (i - 1, i) if 0 <= j < len(sorted_t)), key=lambda j: (abs(sorted_t[j] - r), j))
            targets.add(int(order[j]))
            k += 1
        need = np.zeros(len(packets), dtype=bool)
        for i in targets:
            j = i
            while j > 0 and not (packets[j].is_keyframe and times[j] <= times[i]):
                j -= 1
            need[j : i + 1] = True
        want = {packets[i].pts for i in targets}
        out: dict[int, np.ndarray] = {}

        def take(frames) -> None:
            for f in frames:
                if f.pts in want:
                    out[f.pts] = f.reformat(w, h, format="rgb24", interpolation=Interpolation.FAST_BILINEAR).to_ndarray()

        prev = None
        for i, p in enumerate(packets):
            if not need[i]:
                continue
            if prev is not None and prev != i - 1:
                take(cc.decode(None))
                cc.flush_buffers()
            prev = i
            cc.skip_frame = "DEFAULT" if i in targets else "NONREF"
            take(cc.decode(p))
        take(cc.decode(None))
    keys = sorted(out)
    return np.array([(p - start) * tb for p in keys], dtype=np.float64), [out[p] for p in keys]


def decode_bench(out: Path, seconds: float = 60.0, clips: int = 2, repeats: int = 3, read_videos: bool = True) -> dict:
    """Sampled decode, same 1080p H.264 files (2 s GOPs), same cores, one run.

    Through Ray Data, each dataset fresh as a user would run it: ``ray.data.read_videos(fps=1)`` (tasks)
    vs this project's decode operator as an actor pool (one actor per core; actors always start in new
    worker processes) and as tasks (``decode_videos_task``: Ray reuses idle task workers between datasets,
    as it does for ``read_videos``, and each keeps its decoder child). In-process (bare PyAV loops vs the
    operator's sampler, CPU time) for the overhead ratios: against a bare loop that decodes every frame,
    and against a bare loop doing the sampler's own strategy (the packet plan).
    """
    import ray

    from ray_vlm.config import DecodeConfig, GuardConfig
    from ray_vlm.operators.decode import DecodeVideos, bare_pyav_sample, decode_videos_task, sample_video

    load_1m_at_start = os.getloadavg()[0]  # other work on the machine skews every row: reported
    paths = [str(p) for p in bench_clips(clips, seconds)]
    size = (224, 224)
    fps_cfg = DecodeConfig(mode="fps", target_fps=1.0, isolate=True)
    key_cfg = DecodeConfig(mode="keyframes", target_fps=1.0, isolate=True)
    _start_ray()
    ncpu = int(ray.cluster_resources()["CPU"])
    # Ray Data reserves half of the cluster per operator by default: on 2 CPUs a task-based map then runs
    # one task at a time (two videos decode one after the other). Off for every row, read_videos included
    # (measured: 10.6 s with, 10.4 s without for read_videos here; actor pools are sized explicitly).
    ctx = ray.data.DataContext.get_current()
    reservation = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False

    def ours_ray(cfg: DecodeConfig, tasks: bool = False):
        def run():
            rows = [{"uri": p, "video_id": f"b{i}", "size_bytes": os.path.getsize(p), "mtime": 0.0,
                     "status": "ok", "error_type": "", "error": "", "container": "", "codec": "",
                     "width": 1920, "height": 1080, "rotation_deg": 0, "declared_duration_s": seconds}
                    for i, p in enumerate(paths)]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            kwargs = dict(decode=cfg, guards=GuardConfig(), frame_size=size)
            if tasks:
                ds = ds.map_batches(decode_videos_task, batch_size=1, num_cpus=1,
                                    concurrency=min(ncpu, len(rows)), fn_kwargs=kwargs)
            else:
                # one video per call, and one call in flight per actor: a second video waits for a free
                # actor instead of queueing behind the first on the same one (each call is seconds long)
                pool = ray.data.ActorPoolStrategy(size=min(ncpu, len(rows)), max_tasks_in_flight_per_actor=1)
                ds = ds.map_batches(DecodeVideos, batch_size=1, compute=pool, num_cpus=1,
                                    fn_constructor_kwargs=kwargs)
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

    methods = {}  # name -> (run, warm-up first)
    if read_videos:
        methods["ray.data.read_videos(fps=1)"] = (theirs_ray, True)
    methods["ray-vlm decode, exact 1 fps (Ray)"] = (ours_ray(fps_cfg), True)
    methods["ray-vlm decode, exact 1 fps (Ray tasks, warm workers)"] = (ours_ray(fps_cfg, tasks=True), True)
    methods["ray-vlm decode, keyframes (Ray)"] = (ours_ray(key_cfg), True)
    methods["ray-vlm decode, keyframes (Ray tasks, warm workers)"] = (ours_ray(key_cfg, tasks=True), True)
    inproc = {}
    inproc["bare PyAV, every frame decoded (in-process)"] = in_process(bare_full_decode)
    inproc["bare PyAV, 1 fps sampling (in-process)"] = in_process(lambda p: bare_pyav_sample(p, 1.0, frame_size=size)[0])
    inproc["bare PyAV, same strategy: packet plan 1 fps (in-process)"] = in_process(
        lambda p: _bare_pyav_planned(p, 1.0, size)[0])
    inproc["ray-vlm sampler, 1 fps (in-process)"] = ours_local(fps_cfg)
    inproc["bare PyAV, keyframes (in-process)"] = in_process(
        lambda p: bare_pyav_sample(p, None, keyframes=True, frame_size=size)[0])
    inproc["ray-vlm sampler, keyframes (in-process)"] = ours_local(key_cfg)
    for i, (name, fn) in enumerate(inproc.items()):
        methods[name] = (fn, i == 0)  # one warm-up (page cache) serves every in-process row

    for fn, warm_up in methods.values():
        if warm_up:
            fn()  # page cache, imports, worker processes
    # round-robin over the methods, so load from elsewhere on the machine drifts into all rows alike
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (fn, _) in methods.items():
            runs[name].append(_measure(fn, 1))
    res = {}
    for name, ms in runs.items():
        walls = [m["wall_s"] for m in ms]
        pts = ms[-1]["result"]
        res[name] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(m["cpu_s"] for m in ms),
                     "walls": walls, "frames": len(pts)}
        if "1 fps" in name and ("ray-vlm" in name or "same strategy" in name):
            # every sample within one source frame period (1/25 s) of its requested time k / 1 fps
            err = max((abs(t - round(t)) for t in pts), default=0.0)
            res[name]["max_sample_error_s"] = err
    ctx.op_resource_reservation_enabled = reservation
    base = res.get("ray.data.read_videos(fps=1)")
    rows = []
    for name, r in res.items():
        speedup = base["wall_s"] / r["wall_s"] if base else float("nan")
        rows.append([name, r["frames"], r["wall_s"], r["cpu_s"], speedup])
    ours_1fps = res["ray-vlm sampler, 1 fps (in-process)"]["cpu_s"]
    ratios = {
        "exact_1fps_speedup_vs_read_videos": (base["wall_s"] / res["ray-vlm decode, exact 1 fps (Ray)"]["wall_s"]) if base else None,
        "keyframes_speedup_vs_read_videos": (base["wall_s"] / res["ray-vlm decode, keyframes (Ray)"]["wall_s"]) if base else None,
        "overhead_1fps_cpu_vs_bare_pyav": ours_1fps / res["bare PyAV, 1 fps sampling (in-process)"]["cpu_s"],
        "overhead_1fps_cpu_vs_bare_pyav_same_strategy":
            ours_1fps / res["bare PyAV, same strategy: packet plan 1 fps (in-process)"]["cpu_s"],
        "overhead_keyframes_cpu_vs_bare_pyav": res["ray-vlm sampler, keyframes (in-process)"]["cpu_s"] / res["bare PyAV, keyframes (in-process)"]["cpu_s"],
        # what Ray adds on top of decoding: wall through Ray minus the in-process CPU of the larger share
        # of clips one actor decodes (clips are spread evenly over the actors)
        "ray_fixed_overhead_1fps_s": res["ray-vlm decode, exact 1 fps (Ray)"]["wall_s"]
        - ours_1fps * math.ceil(clips / min(ncpu, clips)) / clips,
        "ray_fixed_overhead_keyframes_s": res["ray-vlm decode, keyframes (Ray)"]["wall_s"]
        - res["ray-vlm sampler, keyframes (in-process)"]["cpu_s"] * math.ceil(clips / min(ncpu, clips)) / clips,
    }
    if base:
        for mode, key in (("exact 1 fps", "exact_1fps"), ("keyframes", "keyframes")):
            ratios[f"{key}_speedup_vs_read_videos_tasks_warm_workers"] = (
                base["wall_s"] / res[f"ray-vlm decode, {mode} (Ray tasks, warm workers)"]["wall_s"])
    _table(f"decode: {clips} x {seconds:.0f} s 1080p H.264 (2 s GOP), {ncpu} CPUs, median of {repeats}",
           ["method", "frames", "wall s", "cpu s", "speed-up vs read_videos"], rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}" if v is not None else f"{k}: -")
    data = {"machine": machine(), "clips": paths, "seconds": seconds, "repeats": repeats, "cpus": ncpu,
            "ray_data_op_resource_reservation": False,
            "load_avg_1m_at_start": load_1m_at_start, "load_avg_1m_at_end": os.getloadavg()[0], "results": res, "ratios": ratios}
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
    # Real footage long enough that per-file Parquet overhead is amortised: the two 60 s 1080p bench clips
    # (moving camera, so pruning keeps most patches) plus the three sample clips.
    clips = [str(p) for p in bench_clips(2, 60.0)] + [str(p) for p in sample_videos()]
    _start_ray()
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
