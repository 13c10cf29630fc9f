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
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from ray_vlm.core.config import DecodeConfig

CACHE = Path(os.environ.get("RAY_VLM_BENCH_CACHE", Path.home() / ".cache" / "ray-vlm" / "bench"))


# ------------------------------------------------------------------------------------------ fixtures


def _write_h264(path: Path, frames: Iterable, *, fps: int, size: tuple[int, int], options: dict[str, str]) -> Path:
    """Encode ``frames`` (``av.VideoFrame``, frame i at pts i / fps) with libx264 (yuv420p) into ``path``, written
    under a temporary name first so that an interrupted run never leaves a partial clip in the cache."""
    import av

    tmp = path.with_suffix(".tmp.mp4")
    out = av.open(str(tmp), "w")
    st = out.add_stream("libx264", rate=fps)
    st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
    st.options = options
    for i, f in enumerate(frames):
        f.pts = i
        f.time_base = Fraction(1, fps)
        for p in st.encode(f):
            out.mux(p)
    for p in st.encode():
        out.mux(p)
    out.close()
    tmp.rename(path)
    return path


def make_1080p_clip(path: Path, seconds: float, *, fps: int = 25, gop_s: float = 2.0, seed: int = 0) -> Path:
    """``make_clip`` at 1920x1080."""
    return make_clip(path, seconds, size=(1920, 1080), fps=fps, gop_s=gop_s, seed=seed)


def bench_clips(n: int, seconds: float) -> list[Path]:
    return [make_1080p_clip(CACHE / f"bbb1080p-{int(seconds)}s-{i}.mp4", seconds, seed=i) for i in range(n)]


# ------------------------------------------------------------------------------------------ timing helpers


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq; not idle, I/O wait or time
    stolen by the hypervisor): Ray's processes come and go during a job, so a process tree misses some of them."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


def _measure(fn: Callable[[], object], repeats: int) -> dict:
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        c0, t0 = _cpu_s(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "walls": walls, "result": result}


def _start_ray(address: str | None = None) -> None:
    import logging

    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:  # the Ray ``ray-vlm index`` starts for itself, for every pipeline measured
            from ray_vlm.pipelines.archive_index import local_ray_options

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False, **local_ray_options())
    ray.data.DataContext.get_current().enable_progress_bars = False
    for h in logging.getLogger("ray.data").handlers:
        if not hasattr(h, "baseFilename"):
            h.setLevel(logging.ERROR)


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, "
            f"{platform.python_implementation()} {platform.python_version()}")


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


def _tree_memory_bytes(root_pid: int, per_process: dict[str, int] | None = None) -> tuple[int, int]:
    """(PSS, RSS) of a process and all its descendants (Ray's raylet, workers, decoder children).

    PSS (proportional set size) counts a shared page once across the processes mapping it; summed RSS
    counts Ray's shared-memory object store once per process that touched it, so it overstates use.

    Args:
        root_pid: the tree's root.
        per_process: if given, filled with ``"pid name": PSS bytes`` for every process of the tree (the
            name is the start of its command line, e.g. ``ray::MapWorker(MapBatches(DecodeVideos))``).
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
        p_pss = 0
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        p_pss = int(line.split()[1]) * 1024
                        pss += p_pss
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
        if per_process is not None:
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:  # paths as their last part: no machine's paths in results
                    argv = f.read().decode(errors="replace").split("\0")
                name = " ".join(os.path.basename(a) if a.startswith("/") else a for a in argv).strip()[:60]
            except OSError:
                name = "?"
            per_process[f"{p} {name}"] = p_pss
    return pss, rss


def make_long_lowres_clip(path: Path, seconds: float, *, fps: int = 5, size=(160, 120)) -> Path:
    """A long low-resolution H.264 clip (moving gradient + a square that crosses the frame every 30 s,
    keyframe every 10 s), for the memory-vs-length benchmark."""
    import av

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]

    def drawn() -> Iterator:
        for i in range(int(seconds * fps)):
            t = i / fps
            img = np.empty((h, w, 3), dtype=np.uint8)
            img[..., 0] = (xx + 3 * t) % 256
            img[..., 1] = (yy + 2 * t) % 256
            img[..., 2] = 128
            x0 = int((t % 30) / 30 * (w - 20))
            img[40:60, x0 : x0 + 20] = 255
            yield av.VideoFrame.from_ndarray(img, format="rgb24")

    return _write_h264(path, drawn(), fps=fps, size=size,
                       options={"preset": "ultrafast", "g": str(10 * fps), "sc_threshold": "0"})


SPOKEN = (
    "Good morning and welcome to the weekly news summary.",
    "The city council voted to repair the old bridge next spring.",
    "Heavy rain is expected across the north on Thursday evening.",
    "Our guest today has spent twenty years studying honey bees.",
    "Ticket prices for the summer festival will stay the same.",
    "The library will open a new reading room for children in May.",
    "Scientists found a small planet orbiting a nearby star.",
    "That is all for this hour, thank you for listening.",
)


def make_long_speech_audio(path: Path, seconds: float, *, every_s: float = 12.0, seed: int = 0) -> Path:
    """An audio-only file (AAC 16 kHz mono, ``.m4a``) of ``seconds``: espeak-ng sentences, one every ``every_s``
    in turn (about a third of the time is speech), over faint noise (never digital silence, so the VAD reads
    every window), for the memory-vs-length benchmark of the speech track."""
    from benchmarks.speechgen import RATE, speak, write_media

    if path.exists():
        return path
    voices = [speak(t) for t in SPOKEN]
    rng = np.random.default_rng(seed)
    audio = (0.003 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
    for k, t in enumerate(np.arange(0.5, seconds - every_s, every_s)):
        v = voices[k % len(voices)]
        i = int(t * RATE)
        audio[i: i + v.size] += v[: audio.size - i]
    tmp = path.with_suffix(".part.m4a")
    write_media(tmp, np.clip(audio, -1, 1), duration_s=seconds, fps=0)
    tmp.rename(path)
    return path


def _segment_counts(store: Path) -> dict[str, int]:
    """Rows per track of a store's ``segments`` table."""
    import lance

    seg = store / "segments.lance"
    if not seg.exists():
        return {}
    tracks = lance.dataset(str(seg)).to_table(columns=["track"]).column("track").to_pylist()
    return {t: tracks.count(t) for t in sorted(set(tracks))}


def memory_bench(out: Path, short_s: float = 600.0, long_s: float = 7200.0, media: str = "video") -> dict:
    """Peak resident memory (driver + Ray + workers) indexing a short and a long source, each in a fresh
    ``ray-vlm index`` process, sampling the process tree every 0.2 s.

    ``media="video"``: a low-resolution video without audio; ``"audio"``: an audio-only file of speech (the
    speech track: decode, voice activity, recognition)."""
    import subprocess
    import sys
    import tempfile

    if media not in ("video", "audio"):
        raise ValueError(f"media must be 'video' or 'audio', not {media!r}")
    results = {}
    for label, secs in (("short", short_s), ("long", long_s)):
        if media == "audio":
            clip = make_long_speech_audio(CACHE / f"speech-{int(secs)}s.m4a", secs)
        else:
            clip = make_long_lowres_clip(CACHE / f"lowres-{int(secs)}s.mp4", secs)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "ray_vlm.cli", "index", str(clip), "--store", f"{d}/store", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ, RAY_VLM_QUIET="1"),
            )
            peak_pss = peak_rss = 0
            at_peak: dict[str, int] = {}
            while proc.poll() is None:
                procs: dict[str, int] = {}
                pss, rss = _tree_memory_bytes(proc.pid, procs)
                if pss > peak_pss:
                    at_peak = procs
                peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
                time.sleep(0.2)
            summary = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
            results[label] = {
                "video_s": secs, "peak_pss_mb": peak_pss / 2**20, "peak_rss_sum_mb": peak_rss / 2**20,
                "wall_s": time.perf_counter() - t0,
                "frames_sampled": summary["frames_sampled"], "status_ok": summary["videos_ok"],
                "media_s": round(summary["video_hours"] * 3600, 1), "segments": _segment_counts(Path(d) / "store"),
                # where the peak sits: the largest processes of the tree at that moment (PSS MB)
                "top_processes_at_peak_pss_mb": {
                    k: round(v / 2**20, 1) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])[:8]
                },
            }
    ratio = results["long"]["peak_pss_mb"] / results["short"]["peak_pss_mb"]
    ratio_rss = results["long"]["peak_rss_sum_mb"] / results["short"]["peak_rss_sum_mb"]
    data = {"machine": machine(), "media": media, "results": results, "long_over_short_peak_pss": ratio,
            "long_over_short_peak_rss_sum": ratio_rss}
    _table(f"peak memory vs {media} length (whole process tree, sampled every 0.2 s)",
           ["video", "length s", "frames", "peak PSS MB", "peak summed RSS MB", "wall s"],
           [[k, v["video_s"], v["frames_sampled"], v["peak_pss_mb"], v["peak_rss_sum_mb"], v["wall_s"]]
            for k, v in results.items()])
    print(f"long / short peak PSS: {ratio:.3f}   (summed RSS: {ratio_rss:.3f})")
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ decode


def bare_pyav_sample(
    path: str,
    target_fps: float | None = 1.0,
    *,
    keyframes: bool = False,
    frame_size: tuple[int, int] = (224, 224),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Reference for the overhead benchmark: the plainest PyAV loop doing 1 fps sampling.

    Decodes every frame (or, with ``keyframes``, only keyframes via ``skip_frame="NONKEY"``), takes the
    first frame at or after each request ``k / target_fps`` (keyframes: every keyframe), and converts
    only those with the same scaler as the sampler's default ("exact"). No plan, no seeking, no
    reference-frame skipping, no chunks, no isolation, no guards.

    Returns:
        (pts_s float64 (T,), list of T uint8 (H, W, 3)).
    """
    import av

    from ray_vlm.operators._sampler import scaler_interpolation

    interp = scaler_interpolation()
    h, w = frame_size
    pts, frames = [], []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if keyframes:
            stream.codec_context.skip_frame = "NONKEY"
        start = stream.start_time or 0
        next_t = 0.0
        for frame in container.decode(stream):
            t = float((frame.pts - start) * frame.time_base)
            if keyframes or t >= next_t:
                rgb = frame.reformat(w, h, format="rgb24", interpolation=interp).to_ndarray()
                pts.append(t)
                frames.append(rgb)
                if not keyframes:
                    next_t = (math.floor(t * target_fps) + 1) / target_fps
    return np.asarray(pts, dtype=np.float64), frames


def _bare_pyav_planned(path: str, target_fps: float, frame_size: tuple[int, int]) -> tuple[np.ndarray, list]:
    """Reference for the sampler's overhead: the same packet plan in its plainest PyAV form.

    Reads every packet into memory, picks for each request ``k / target_fps`` the packet with the nearest
    pts (ties: the earlier), then decodes from each target's keyframe up to the target with
    ``skip_frame="NONREF"`` for every other packet, draining and flushing the decoder between runs, and
    converts the targets with the sampler's default scaler. No lookahead bound, no seeking, no guards,
    no chunks, no fallbacks.

    Returns:
        (pts_s float64 (T,), list of T uint8 (H, W, 3)).
    """
    import av

    from ray_vlm.operators._sampler import scaler_interpolation

    interp = scaler_interpolation()
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
                    out[f.pts] = f.reformat(w, h, format="rgb24", interpolation=interp).to_ndarray()

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


def _decord_like_read_videos(path: str, target_fps: int, frame_size: tuple[int, int]) -> list[float]:
    """What each ``read_videos(fps=...)`` read task runs, in-process: decord decodes and resizes every
    frame (its scaler), keeps every ``round(avg_fps / fps)``-th. For the baseline's compute vs fixed cost."""
    from decord import VideoReader

    h, w = frame_size
    reader = VideoReader(path, height=h, width=w)
    stride = max(1, round(reader.get_avg_fps() / target_fps))
    times = []
    for i, frame in enumerate(reader):  # decodes and scales every frame, as the read task does
        if i % stride == 0:
            frame.asnumpy()
            times.append(float(reader.get_frame_timestamp(i)[0]))
    return times


def _phases(timelines: list[list[dict]]) -> dict[str, float]:
    """Median phase durations (s) of the Ray rows of ours, from per-video timestamps (one list per run).

    Each entry: ``t0`` (driver: dataset created), ``init0/init1`` (actor ``__init__`` start/end, actors
    only), ``call`` (the video's call started), ``first`` (its first chunk left the operator), ``last``
    (its last chunk left), ``end`` (driver: iteration done).
    """
    acc: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        acc.setdefault(k, []).append(v)

    for run in timelines:
        if not run:
            continue
        t0, end = run[0]["t0"], run[0]["end"]
        if math.isfinite(run[0]["init0"]):
            add("dataset_start_to_actor_init_s", min(v["init0"] for v in run) - t0)
            add("actor_init_s", statistics.median(v["init1"] - v["init0"] for v in run))
        add("dataset_start_to_first_call_s", min(v["call"] for v in run) - t0)
        add("call_to_first_chunk_s", statistics.median(v["first"] - v["call"] for v in run))
        add("video_decode_s", statistics.median(v["last"] - v["call"] for v in run))
        add("last_chunk_to_driver_done_s", end - max(v["last"] for v in run))
    return {k: statistics.median(v) for k, v in acc.items()}


def decode_bench(
    out: Path,
    seconds: float = 60.0,
    clips: int = 2,
    repeats: int = 3,
    read_videos: bool = True,
    *,
    full_decode_rows: bool = True,
    actor_rows: bool = True,
    warmup_seconds: float = 2.0,
) -> dict:
    """Sampled decode, same 1080p H.264 files (2 s GOPs), same cores, one run.

    Ray rows, each dataset fresh as a user would run it, Ray's start excluded for all: ``ray.data.
    read_videos(fps=1)`` (Ray Data read tasks) vs this project's decode operator as Ray Data tasks
    (``decode_videos_task``, the headline: the same execution model as ``read_videos``) and as an actor
    pool (``DecodeVideos``; actors start in new worker processes every dataset, which a long job pays once).
    Warm-up is identical for every Ray row and comes right before each timed run: the same method on ``clips`` short
    clips (``warmup_seconds``), so task workers have imported what they need (decord for ``read_videos``; our decoder
    child) and later rows do not inherit or evict another row's workers.

    In-process rows (one core, CPU time) give the compute each side needs: decord doing what a
    ``read_videos`` task does, bare PyAV loops, and our sampler. ``fixed_cost_s`` per Ray row = its
    wall time minus the in-process CPU of the largest share of clips one worker decodes (what Ray and
    process plumbing add; negative when a Ray row used idle cores better than one in-process core).
    ``full_decode_rows=False`` drops the two bare PyAV rows that decode every frame (long clips).
    ``phases`` break our Ray rows down from timestamps taken inside the workers (see ``_phases``).
    """
    # Long: one benchmark run read top to bottom: inputs, each method round-robin, the table and the JSON.
    import ray

    from ray_vlm.core.config import GuardConfig
    from ray_vlm.operators.decode import DecodeVideos, decode_videos_task, sample_video

    load_1m_at_start = os.getloadavg()[0]  # other work on the machine skews every row: reported
    paths = [str(p) for p in bench_clips(clips, seconds)]
    warm_paths = [str(p) for p in bench_clips(clips, warmup_seconds)]
    size = (224, 224)
    fps_cfg = DecodeConfig(mode="fps", target_fps=1.0, isolate=True)
    key_cfg = DecodeConfig(mode="keyframes", target_fps=1.0, isolate=True)
    key_nodeblock_cfg = key_cfg.model_copy(update={"keyframes_skip_loop_filter": True})
    tol_cfg = fps_cfg.model_copy(update={"sample_tolerance_frames": 1.0})
    _start_ray()
    ncpu = int(ray.cluster_resources()["CPU"])
    workers = min(ncpu, clips)
    per_worker = math.ceil(clips / workers)  # clips the busiest worker decodes
    # Ray Data reserves half of the cluster per operator by default: on 2 CPUs a task-based map then runs
    # one task at a time (two videos decode one after the other). Off for every row, read_videos included
    # (measured: 10.6 s with, 10.4 s without for read_videos here; actor pools are sized explicitly).
    ctx = ray.data.DataContext.get_current()
    reservation = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False

    class TimedDecodeVideos(DecodeVideos):  # shipped by value; adds a timeline to each video's last row
        def __init__(self, **kwargs):
            self._init0 = time.time()
            super().__init__(**kwargs)
            self._init1 = time.time()

        def __call__(self, batch):
            for row in _timed(super().__call__(batch)):
                row["bench_timeline"][0, 3:] = (self._init0, self._init1)
                yield row

    def timed_decode_task(batch, **kwargs):
        yield from _timed(decode_videos_task(batch, **kwargs))

    def _timed(rows):
        call, first = time.time(), None
        for row in rows:
            now = time.time()
            first = first or now
            row["bench_timeline"] = np.array([[call, first, now, np.nan, np.nan]])  # init0/init1: actors
            yield row

    timelines: dict[str, list[list[dict]]] = {}

    def ours_ray(name: str, cfg: DecodeConfig, tasks: bool):
        def run(clip_paths: list[str]):
            rows = [{"uri": p, "video_id": f"b{i}", "size_bytes": os.path.getsize(p), "mtime": 0.0,
                     "status": "ok", "error_type": "", "error": "", "container": "", "codec": "",
                     "width": 1920, "height": 1080, "rotation_deg": 0, "declared_duration_s": seconds}
                    for i, p in enumerate(clip_paths)]
            t0 = time.time()
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            kwargs = dict(decode=cfg, guards=GuardConfig(), frame_size=size)
            if tasks:
                ds = ds.map_batches(timed_decode_task, batch_size=1, num_cpus=1,
                                    concurrency=min(ncpu, len(rows)), fn_kwargs=kwargs)
            else:
                # one video per call, and one call in flight per actor: a second video waits for a free
                # actor instead of queueing behind the first on the same one (each call is seconds long)
                pool = ray.data.ActorPoolStrategy(size=min(ncpu, len(rows)), max_tasks_in_flight_per_actor=1)
                ds = ds.map_batches(TimedDecodeVideos, batch_size=1, compute=pool, num_cpus=1,
                                    fn_constructor_kwargs=kwargs)
            pts, tl = [], []
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for p, last, t in zip(b["pts_s"], b["is_last"], b["bench_timeline"]):
                    pts.extend(np.asarray(p).tolist())
                    if last:
                        tl.append(dict(zip(("call", "first", "last", "init0", "init1"), np.asarray(t).tolist())))
            end = time.time()
            if clip_paths is paths:
                timelines.setdefault(name, []).append([dict(t, t0=t0, end=end) for t in tl])
            return pts
        return run

    def theirs_ray(clip_paths: list[str]):
        ds = ray.data.read_videos(clip_paths, fps=1, resize=size, include_timestamps=True)
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

    ray_rows: dict[str, Callable] = {}
    if read_videos:
        ray_rows["ray.data.read_videos(fps=1)"] = theirs_ray
    ray_rows["ray-vlm decode, exact 1 fps (Ray tasks)"] = ours_ray("fps tasks", fps_cfg, tasks=True)
    ray_rows["ray-vlm decode, 1 fps within one frame period (Ray tasks)"] = ours_ray(
        "1 fps within one frame period tasks", tol_cfg, tasks=True)
    ray_rows["ray-vlm decode, keyframes (Ray tasks)"] = ours_ray("keyframes tasks", key_cfg, tasks=True)
    ray_rows["ray-vlm decode, keyframes without deblocking (Ray tasks)"] = ours_ray(
        "keyframes without deblocking tasks", key_nodeblock_cfg, tasks=True)
    if actor_rows:
        ray_rows["ray-vlm decode, exact 1 fps (Ray actor pool, cold actors)"] = ours_ray("fps actors", fps_cfg, False)
        ray_rows["ray-vlm decode, keyframes (Ray actor pool, cold actors)"] = ours_ray(
            "keyframes actors", key_cfg, False)
    inproc: dict[str, Callable] = {}
    if read_videos:
        inproc["decord as a read_videos(fps=1) task runs it (in-process)"] = in_process(
            lambda p: _decord_like_read_videos(p, 1, size))
    if full_decode_rows:
        inproc["bare PyAV, every frame decoded (in-process)"] = in_process(bare_full_decode)
        inproc["bare PyAV, 1 fps sampling (in-process)"] = in_process(
            lambda p: bare_pyav_sample(p, 1.0, frame_size=size)[0])
    inproc["bare PyAV, same strategy: packet plan 1 fps (in-process)"] = in_process(
        lambda p: _bare_pyav_planned(p, 1.0, size)[0])
    inproc["ray-vlm sampler, 1 fps (in-process)"] = ours_local(fps_cfg)
    inproc["ray-vlm sampler, 1 fps within one frame period (in-process)"] = ours_local(tol_cfg)
    inproc["bare PyAV, keyframes (in-process)"] = in_process(
        lambda p: bare_pyav_sample(p, None, keyframes=True, frame_size=size)[0])
    inproc["ray-vlm sampler, keyframes (in-process)"] = ours_local(key_cfg)
    inproc["ray-vlm sampler, keyframes without deblocking (in-process)"] = ours_local(key_nodeblock_cfg)
    # the scaler's price: "exact" (default, the same pixels on every CPU) against FAST_BILINEAR
    inproc["ray-vlm sampler, 1 fps, fast scaler (in-process)"] = ours_local(
        fps_cfg.model_copy(update={"scaler": "fast"}))
    inproc["ray-vlm sampler, keyframes, fast scaler (in-process)"] = ours_local(
        key_cfg.model_copy(update={"scaler": "fast"}))

    methods: dict[str, Callable[[], object]] = {}
    for name, fn in ray_rows.items():
        def timed(fn=fn):
            fn(warm_paths)  # identical warm-up right before every timed Ray run (not timed)
            c0, t0 = _cpu_s(), time.perf_counter()
            result = fn(paths)
            return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "result": result}
        methods[name] = timed
    for name, fn in inproc.items():
        methods[name] = lambda fn=fn: _measure(fn, 1)
    next(iter(inproc.values()))()  # page cache for the in-process rows (the Ray rows warm up themselves)

    # round-robin over the methods, so load from elsewhere on the machine drifts into all rows alike
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            runs[name].append(fn())
    ctx.op_resource_reservation_enabled = reservation

    expected_1fps = sum(math.ceil(seconds - 1e-9) for _ in paths)
    res = {}
    for name, ms in runs.items():
        walls = [m["wall_s"] for m in ms]
        pts = ms[-1]["result"]
        res[name] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(m["cpu_s"] for m in ms),
                     "walls": walls, "frames": len(pts)}
        if "1 fps" in name and ("ray-vlm" in name or "same strategy" in name):
            # every sample within one source frame period (1/25 s) of its requested time k / 1 fps
            res[name]["max_sample_error_s"] = max((abs(t - round(t)) for t in pts), default=0.0)
            res[name]["all_requests_sampled"] = len(pts) == expected_1fps
    cpu = {k: v["cpu_s"] for k, v in res.items()}

    def compute_s(inproc_name: str) -> float:
        return cpu[inproc_name] / clips * per_worker

    pairs = {  # Ray row -> in-process row doing the same work
        "ray.data.read_videos(fps=1)": "decord as a read_videos(fps=1) task runs it (in-process)",
        "ray-vlm decode, exact 1 fps (Ray tasks)": "ray-vlm sampler, 1 fps (in-process)",
        "ray-vlm decode, 1 fps within one frame period (Ray tasks)":
            "ray-vlm sampler, 1 fps within one frame period (in-process)",
        "ray-vlm decode, keyframes (Ray tasks)": "ray-vlm sampler, keyframes (in-process)",
        "ray-vlm decode, keyframes without deblocking (Ray tasks)":
            "ray-vlm sampler, keyframes without deblocking (in-process)",
        "ray-vlm decode, exact 1 fps (Ray actor pool, cold actors)": "ray-vlm sampler, 1 fps (in-process)",
        "ray-vlm decode, keyframes (Ray actor pool, cold actors)": "ray-vlm sampler, keyframes (in-process)",
    }
    for row, ref in pairs.items():
        if row in res and ref in res:
            res[row]["compute_s"] = compute_s(ref)
            res[row]["fixed_cost_s"] = res[row]["wall_s"] - compute_s(ref)

    base = res.get("ray.data.read_videos(fps=1)")

    def speedup(row: str) -> float | None:
        return base["wall_s"] / res[row]["wall_s"] if base and row in res else None

    def ratio(a: str, b: str) -> float | None:
        return cpu[a] / cpu[b] if a in cpu and b in cpu else None

    ratios = {
        "exact_1fps_speedup_vs_read_videos": speedup("ray-vlm decode, exact 1 fps (Ray tasks)"),
        "keyframes_speedup_vs_read_videos": speedup("ray-vlm decode, keyframes (Ray tasks)"),
        "within_one_period_1fps_speedup_vs_read_videos": speedup(
            "ray-vlm decode, 1 fps within one frame period (Ray tasks)"),
        "keyframes_without_deblocking_speedup_vs_read_videos": speedup(
            "ray-vlm decode, keyframes without deblocking (Ray tasks)"),
        "exact_1fps_speedup_vs_read_videos_actor_pool": speedup(
            "ray-vlm decode, exact 1 fps (Ray actor pool, cold actors)"),
        "keyframes_speedup_vs_read_videos_actor_pool": speedup(
            "ray-vlm decode, keyframes (Ray actor pool, cold actors)"),
        # compute only (in-process CPU, fixed costs left out on both sides): where the ratios tend for long clips
        "exact_1fps_compute_ratio_vs_read_videos": ratio(
            "decord as a read_videos(fps=1) task runs it (in-process)", "ray-vlm sampler, 1 fps (in-process)"),
        "within_one_period_1fps_compute_ratio_vs_read_videos": ratio(
            "decord as a read_videos(fps=1) task runs it (in-process)",
            "ray-vlm sampler, 1 fps within one frame period (in-process)"),
        "keyframes_compute_ratio_vs_read_videos": ratio(
            "decord as a read_videos(fps=1) task runs it (in-process)", "ray-vlm sampler, keyframes (in-process)"),
        "keyframes_without_deblocking_compute_ratio_vs_read_videos": ratio(
            "decord as a read_videos(fps=1) task runs it (in-process)",
            "ray-vlm sampler, keyframes without deblocking (in-process)"),
        "overhead_1fps_cpu_vs_bare_pyav": ratio(
            "ray-vlm sampler, 1 fps (in-process)", "bare PyAV, 1 fps sampling (in-process)"),
        "overhead_1fps_cpu_vs_bare_pyav_same_strategy": ratio(
            "ray-vlm sampler, 1 fps (in-process)", "bare PyAV, same strategy: packet plan 1 fps (in-process)"),
        "exact_scaler_cpu_vs_fast_1fps": ratio(
            "ray-vlm sampler, 1 fps (in-process)", "ray-vlm sampler, 1 fps, fast scaler (in-process)"),
        "exact_scaler_cpu_vs_fast_keyframes": ratio(
            "ray-vlm sampler, keyframes (in-process)", "ray-vlm sampler, keyframes, fast scaler (in-process)"),
        "overhead_keyframes_cpu_vs_bare_pyav": ratio(
            "ray-vlm sampler, keyframes (in-process)", "bare PyAV, keyframes (in-process)"),
    }
    if base:
        # per repeat (rows of one repeat ran minutes apart at most), then the median: less sensitive to load
        # drifting over the whole run than a ratio of medians
        for row in res:
            if row != "ray.data.read_videos(fps=1)" and row.startswith("ray-vlm decode"):
                per = [b / o for b, o in zip(base["walls"], res[row]["walls"])]
                res[row]["speedup_vs_read_videos_per_repeat"] = per
                res[row]["speedup_vs_read_videos_median_of_repeats"] = statistics.median(per)
    fixed = {row: res[row]["fixed_cost_s"] for row in pairs if row in res and "fixed_cost_s" in res[row]}
    phases = {name: _phases(tl) for name, tl in timelines.items()}

    rows = []
    for name, r in res.items():
        sp = speedup(name)
        rows.append([name, r["frames"], r["wall_s"], r["cpu_s"], r.get("fixed_cost_s", float("nan")),
                     sp if sp is not None else float("nan")])
    _table(f"decode: {clips} x {seconds:.0f} s 1080p H.264 (2 s GOP), {ncpu} CPUs, median of {repeats}",
           ["method", "frames", "wall s", "cpu s", "fixed s", "speed-up vs read_videos"], rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}" if v is not None else f"{k}: -")
    for name, ph in phases.items():
        print(f"phases, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    data = {"machine": machine(), "clips": [Path(p).name for p in paths], "seconds": seconds, "repeats": repeats,
            "cpus": ncpu,
            "warmup": f"same method on {clips} x {warmup_seconds:g} s clips right before each timed Ray run",
            "ray_data_op_resource_reservation": False,
            "load_avg_1m_at_start": load_1m_at_start, "load_avg_1m_at_end": os.getloadavg()[0],
            "results": res, "ratios": ratios, "fixed_cost_s": fixed, "phases_s": phases}
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
    rng = np.random.default_rng(0)
    n = int(seconds * fps)

    def filmed() -> Iterator:
        for i in range(n):
            img = photo + rng.normal(0, noise, photo.shape).astype(np.float32)
            u = i / n
            if 0.2 <= u < 0.5:
                x = int((u - 0.2) / 0.3 * (640 - 24))
                img[250:310, x : x + 24] = (30, 30, 40)
            yield av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")

    return _write_h264(path, filmed(), fps=fps, size=(640, 360),
                       options={"preset": "veryfast", "crf": "23", "g": str(2 * fps), "sc_threshold": "0"})


def prune_bench(out: Path, thresholds: tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.06, 0.08)) -> dict:
    """Share of patch tokens pruned per threshold: static-camera footage and the real sample clips."""
    from ray_vlm.core.config import DecodeConfig, PruneConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.models import get_spec
    from ray_vlm.operators.decode import sample_video
    from ray_vlm.operators.prune import diff_keep_mask

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
    _table(f"share of patch tokens pruned at 1 fps, {spec.patch_grid[0]}x{spec.patch_grid[1]} patches "
           f"(default threshold {default})",
           ["clip", "frames", *[f"th={t}" for t in thresholds]],
           [[k, v["frames"], *[v[str(t)] for t in thresholds]] for k, v in res.items()])
    data = {"machine": machine(), "default_threshold": default, "results": res}
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ store size


def store_bench(out: Path) -> dict:
    """Token payload and on-disk bytes per video-hour for each token layout, on the sample clips (the store's
    frames dataset after compaction: its data files alone, without versions' manifests)."""
    import tempfile

    from ray_vlm.core.config import IndexConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.pipelines.archive_index import index_archive
    from ray_vlm.store.token_store import TokenStore

    layouts = [
        {"grid": 0, "patches": False, "dtype": "int8"},
        {"grid": 0, "patches": False, "dtype": "fp16"},
        {"grid": 2, "patches": False, "dtype": "fp16"},
        {"grid": 2, "patches": True, "dtype": "fp16"},
        {"grid": 2, "patches": True, "dtype": "int8"},
    ]
    # Real footage long enough that per-file overhead is amortised: the two 60 s 1080p bench clips
    # (moving camera, so pruning keeps most patches) plus the three sample clips.
    clips = [str(p) for p in bench_clips(2, 60.0)] + [str(p) for p in sample_videos()]
    _start_ray()
    res = {}
    for lay in layouts:
        cfg = IndexConfig.model_validate({"compress": lay})
        with tempfile.TemporaryDirectory() as d:
            s = index_archive(clips, f"{d}/store", cfg)
            TokenStore(f"{d}/store").compact(retention_s=0)
            files = list(Path(d, "store", "frames.lance", "data").glob("*.lance"))
            on_disk = sum(f.stat().st_size for f in files)
            hours = s.video_hours
            res[cfg.compress.layout] = {
                "video_hours": hours, "frames_kept": s.frames_kept, "tokens": s.tokens,
                "tokens_per_frame": s.tokens / max(1, s.frames_kept),
                "payload_bytes_per_hour": s.stored_bytes / hours,
                "lance_bytes_per_hour": on_disk / hours, "frames_files": len(files),
                "payload_stats": TokenStore(f"{d}/store").payload_stats(),
            }
    _table("token store size per video-hour (1 fps, bundled encoder, D=384, pruning on)",
           ["layout", "tokens/frame", "payload MB/h", "on disk (Lance) MB/h"],
           [[k, v["tokens_per_frame"], v["payload_bytes_per_hour"] / 1e6, v["lance_bytes_per_hour"] / 1e6]
            for k, v in res.items()])
    data = {"machine": machine(), "clips": [Path(c).name for c in clips], "results": res}
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ index throughput


def make_clip(path: Path, seconds: float, *, size: tuple[int, int] = (1920, 1080), fps: int = 25,
              gop_s: float = 2.0, seed: int = 0) -> Path:
    """Real footage at ``size`` (width, height) H.264 with a fixed GOP: the Big Buck Bunny sample (720p, 5.3 s)
    scaled to ``size`` and played forwards/backwards from a seeded offset until ``seconds`` long, encoded with
    libx264 (preset veryfast, crf 23, keyframe every ``gop_s`` seconds, no scene-cut keyframes, yuv420p)."""
    import av

    from ray_vlm.core.samples import sample_videos

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    src = av.open(str(sample_videos(("bigbuckbunny.mp4",))[0]))
    frames = [f.reformat(size[0], size[1], format="yuv420p") for f in src.decode(video=0)]
    src.close()
    gop = int(round(gop_s * fps))
    n = int(round(seconds * fps))
    order = frames + frames[::-1]
    offset = int(np.random.default_rng(seed).integers(0, len(order)))

    def played() -> Iterator:
        for i in range(n):
            f = order[(i + offset) % len(order)]
            f.pict_type = av.video.frame.PictureType.NONE
            yield f

    return _write_h264(path, played(), fps=fps, size=size, options={
        "preset": "veryfast", "crf": "23", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})


class _BatchedEffNet:
    """The baseline's model stage, as a Ray user writes it: EfficientNet-Lite0 from the same pinned pretrained
    weights in torch, one batch per call (global embedding: the pooled features through the classifier and the
    same class-name bridge). It measures its own CPU seconds as ray-vlm's stages do (``cpu_s:model``)."""

    def __init__(self):
        from ray_vlm.models import load_encoder

        self.enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="torch")

    def __call__(self, batch):
        import torch

        from ray_vlm.core._proc import tree_cpu_s

        c0 = tree_cpu_s()
        graph = self.enc.graph
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(list(batch["frame"]))).permute(0, 3, 1, 2).float()
            x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
            pooled = graph.net.extract_features(x).mean((2, 3))
            g = graph.embed(pooled @ graph.fc_weight.T + graph.fc_bias).numpy()
        cost = np.zeros(len(g))
        cost[0] = tree_cpu_s() - c0
        return {"frame_index": batch["frame_index"], "emb": g.astype(np.float16), "cpu_s:model": cost}


_STAT_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _ray_data_cpu_s(stats: str) -> dict[str, float]:
    """{operator: total remote CPU seconds} from ``Dataset.stats()`` text (task operators only are reliable)."""
    import re

    out, op = {}, None
    for line in stats.splitlines():
        m = re.match(r"Operator \d+ (.+?):", line)
        if m:
            op = m.group(1)
            continue
        m = re.search(r"Remote cpu time: .*?([\d.]+)(us|ms|s) total", line)
        if m and op is not None:
            out[op] = float(m.group(1)) * _STAT_UNITS[m.group(2)]
    return out


def _fixed_costs(address: str | None) -> dict:
    """Ray start, an actor's start, and the encoder's load (cold: exported and quantised; warm: from the cache;
    and torch), each in a fresh process or actor."""
    import subprocess
    import sys
    import tempfile

    import ray

    t0 = time.perf_counter()
    _start_ray(address)
    ray_start = time.perf_counter() - t0

    @ray.remote(num_cpus=0)
    class _Probe:
        def ready(self) -> bool:
            return True

    t0 = time.perf_counter()
    actor = _Probe.remote()
    ray.get(actor.ready.remote())
    actor_start = time.perf_counter() - t0
    ray.kill(actor)

    code = ("import time, torch; t = time.perf_counter(); from ray_vlm.models import load_encoder; "
            "load_encoder('bundled:effnet-lite0-minilm', device='cpu', runtime='{rt}'); "
            "print(time.perf_counter() - t)")

    def load_s(runtime: str, cache: str | None = None) -> float:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if cache is not None:
            env["RAY_VLM_CACHE_DIR"] = cache
        run = subprocess.run([sys.executable, "-c", code.format(rt=runtime)], env=env, capture_output=True,
                             text=True, check=True)
        return float(run.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as d:
        cold = load_s("onnx-int8", d)  # the class-name embeddings, the export and the calibration, once
        warm = load_s("onnx-int8", d)
    return {"ray_start_s": ray_start, "actor_start_s": actor_start, "model_load_cold_s": cold,
            "model_load_warm_s": warm, "model_load_torch_s": load_s("torch")}


def index_bench(out: Path, seconds: float = 68.0, clips: int = 10, repeats: int = 1,
                size: tuple[int, int] = (640, 480), address: str | None = None) -> dict:
    """End-to-end index throughput through Ray on this machine's cores, in one run on the same files: ``ray-vlm
    index`` (the default config, and with its memory budget lifted) against the pipeline a Ray user writes
    without it: ``read_videos(fps=1, resize=224x224)`` + a batched EfficientNet-Lite0 from the same weights
    (batch 16, one actor per CPU given to the model stage) + ``write_parquet``."""
    # Long: one benchmark: fixed costs, three pipelines, their per-stage costs, and the table; splitting it would
    # only move the shared locals around.
    import tempfile

    import ray

    from ray_vlm.core.config import IndexConfig
    from ray_vlm.pipelines.archive_index import index_archive

    paths = [str(make_clip(CACHE / f"bbb{size[0]}x{size[1]}-{int(seconds)}s-{i}.mp4", seconds, size=size, seed=i))
             for i in range(clips)]
    video_s = clips * seconds
    fixed = _fixed_costs(address)
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    model_actors = max(1, cpus // 2)  # the other half decodes (read tasks need CPUs of their own)
    unbudgeted = IndexConfig.model_validate({"resources": {
        "object_store_memory_mb": None, "object_store_pressure_fraction": None, "max_block_mb": None}})

    def baseline(files: list[str] = paths) -> dict:
        with tempfile.TemporaryDirectory() as d:
            ds = ray.data.read_videos(files, fps=1, resize=(224, 224)).map_batches(
                _BatchedEffNet, batch_size=16, compute=ray.data.ActorPoolStrategy(size=model_actors), num_cpus=1,
                batch_format="numpy")
            ds.write_parquet(f"{d}/out")
            table = __import__("pyarrow.parquet", fromlist=["read_table"]).read_table(f"{d}/out")
            stages = {("decode (read_videos)" if k.startswith("ReadVideo") else "write" if k == "Write" else k): v
                      for k, v in _ray_data_cpu_s(ds.stats()).items() if "MapBatches" not in k}
            stages["model"] = float(sum(table.column("cpu_s:model").to_pylist()))
            return {"frames": table.num_rows, "stage_cpu_s": stages}

    def ours(config: IndexConfig | None = None, files: list[str] = paths) -> dict:
        with tempfile.TemporaryDirectory() as d:
            s = index_archive(files, f"{d}/store", config)
            return {"frames": s.frames_sampled, "frames_kept": s.frames_kept, "stage_cpu_s": s.stage_cpu_s}

    runs = {
        "batched baseline: read_videos + EfficientNet-Lite0 (torch, batch 16) + write_parquet": baseline,
        "ray-vlm index": ours,
        "ray-vlm index, memory budget lifted": lambda: ours(unbudgeted),
    }
    # Warm-up, untimed: both pipelines once on a short clip (imports in Ray's workers, the encoder's caches).
    warm = [str(make_clip(CACHE / f"bbb{size[0]}x{size[1]}-4s-warmup.mp4", 4.0, size=size, seed=99))]
    baseline(warm)
    ours(files=warm)
    res: dict[str, dict] = {name: {"walls": [], "cpus": []} for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            c0, t0 = _machine_cpu_s(), time.perf_counter()
            r = fn()
            res[name]["walls"].append(time.perf_counter() - t0)
            res[name]["cpus"].append(_machine_cpu_s() - c0)
            res[name].update(r)
    for v in res.values():
        v["wall_s"] = statistics.median(v["walls"])
        v["cpu_s"] = statistics.median(v["cpus"])
        v["video_s_per_wall_s"] = video_s / v["wall_s"]
    base = res[next(iter(runs))]["video_s_per_wall_s"]
    for v in res.values():
        v["speedup_vs_baseline"] = v["video_s_per_wall_s"] / base
    _table(f"index throughput: {clips} x {seconds:.0f} s {size[0]}x{size[1]} H.264 at 25 fps, 1 fps sampled, "
           f"{cpus} CPUs (Ray started once: {fixed['ray_start_s']:.1f} s)",
           ["pipeline", "wall s", "CPU s (machine)", "x baseline", "CPU s per stage"],
           [[k, v["wall_s"], v["cpu_s"], v["speedup_vs_baseline"],
             ", ".join(f"{s} {c:.1f}" for s, c in v["stage_cpu_s"].items())] for k, v in res.items()])
    print("fixed costs: " + ", ".join(f"{k} {v:.2f}" for k, v in fixed.items()))
    data = {"machine": machine(), "load_avg": os.getloadavg(), "clips": [Path(p).name for p in paths],
            "video_s": video_s, "cpus": cpus, "model_actors_baseline": model_actors, "fixed_costs": fixed,
            "results": res,
            "speedup_vs_baseline": res["ray-vlm index"]["speedup_vs_baseline"]}
    _write(out, data)
    return data


# ------------------------------------------------------------------------------------------ encoder runtimes


def _held_out_frames() -> np.ndarray:
    """uint8 (N, 224, 224, 3): the grounding benchmark's photographs (never used for int8 calibration), whole and
    as four crops each, squashed to 224x224 as the decoder squashes frames."""
    from PIL import Image

    from benchmarks.benchgen import available_photos, load_photo

    out = []
    for photo in available_photos():
        img = load_photo(photo)
        h, w = img.shape[:2]
        views = [img, img[: h // 2, : w // 2], img[: h // 2, w // 2:], img[h // 2:, : w // 2], img[h // 2:, w // 2:]]
        out.extend(np.asarray(Image.fromarray(np.ascontiguousarray(v)).resize((224, 224), Image.BILINEAR))
                   for v in views)
    return np.stack(out)


def encode_bench(out: Path, batch_size: int = 16, rounds: int = 3) -> dict:
    """The bundled encoder's runtimes in one process on the same frames: CPU and wall ms per frame at 1 and 2
    threads, and how close each stays to torch (cosine of global embeddings, per frame; of patch tokens, mean and
    1st percentile) on the sample clips' frames (which calibrate int8) and on held-out photographs. Also where
    torch's time goes: the EfficientNet trunk, the per-cell classifier, the class-name bridge."""
    # Long: one benchmark table; the runtimes share the frames, the reference outputs and the timing loop.
    import torch

    from ray_vlm.models import bundled, load_encoder

    frames = {"sample clips": bundled.calibration_frames(), "held-out photos": _held_out_frames()}
    every = np.concatenate(list(frames.values()))

    def timed(fn, threads: int) -> dict:
        torch.set_num_threads(threads)
        fn(every[:batch_size])
        best = None
        for _ in range(rounds):
            c0, t0 = _cpu_s(), time.perf_counter()
            for s in range(0, len(every), batch_size):
                fn(every[s : s + batch_size])
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            if best is None or cpu < best[1]:
                best = (wall, cpu)
        assert best is not None
        return {"wall_ms_per_frame": best[0] / len(every) * 1e3, "cpu_ms_per_frame": best[1] / len(every) * 1e3}

    torch_enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="torch")
    reference = {name: torch_enc.encode_frames(f) for name, f in frames.items()}
    graph = torch_enc.graph
    results: dict[str, dict] = {}

    def parts(x: np.ndarray) -> None:  # the trunk alone, for the breakdown below
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
        graph.net.extract_features(((t - 127.0) / 128.0).contiguous(memory_format=torch.channels_last))

    with torch.inference_mode():
        for threads in (1, 2):
            results[f"torch trunk only, {threads} thread(s)"] = timed(parts, threads)
    runtimes = [(f"torch (channels_last), {t} thread(s)", torch_enc, t) for t in (1, 2)]
    for rt in ("onnx", "onnx-int8"):
        runtimes += [(f"{rt}, {t} thread(s)", bundled.BundledEncoder(device="cpu", runtime=rt, threads=t), t)
                     for t in (1, 2)]
    for label, enc, threads in runtimes:
        row = timed(enc.encode_frames, threads)
        for set_name, f in frames.items():
            g, p = enc.encode_frames(f)
            g_ref, p_ref = reference[set_name]
            cg, cp = (g * g_ref).sum(-1), (p * p_ref).sum(-1)
            row[set_name] = {"global_cos_min": float(cg.min()), "patch_cos_mean": float(cp.mean()),
                             "patch_cos_p1": float(np.percentile(cp, 1))}
        results[label] = row
    torch.set_num_threads(os.cpu_count() or 1)
    _table(f"bundled encoder runtimes, batch {batch_size}, {len(every)} frames",
           ["runtime", "CPU ms/frame", "wall ms/frame", "global cos min (clips / photos)",
            "patch cos mean (clips / photos)"],
           [[k, v["cpu_ms_per_frame"], v["wall_ms_per_frame"],
             " / ".join(f"{v[s]['global_cos_min']:.4f}" for s in frames) if "sample clips" in v else "-",
             " / ".join(f"{v[s]['patch_cos_mean']:.4f}" for s in frames) if "sample clips" in v else "-"]
            for k, v in results.items()])
    data = {"machine": machine(), "load_avg": os.getloadavg(), "batch_size": batch_size,
            "frames": {k: len(v) for k, v in frames.items()}, "results": results}
    _write(out, data)
    return data
