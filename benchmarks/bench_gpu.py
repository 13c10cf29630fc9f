"""``python -m benchmarks gpu``: an image tower's throughput on a GPU, alone and inside ``ray-vlm index``.

A CLIP with a ViT-B/16 image tower is built from its config with random weights (throughput depends on the
shape, not the weights; nothing is downloaded) and used as ``hf:<dir>``. Reported, in one run:

* the tower alone: frames per second at ``--batch-size`` in ``--dtype``, uint8 frames copied from host memory
  each batch (what the encode stage does), and the GPU's utilisation while it runs;
* end to end: ``ray-vlm index`` over generated clips with the encode stage on the GPU: video-hours per
  GPU-hour (video duration / wall time of the job, one GPU), frames per second, CPU seconds per stage, and the
  GPU's utilisation over the job (the encode stage is the only one on the GPU; the others are CPU stages).

Utilisation is sampled from ``nvidia-smi`` every 100 ms. ``--device cpu`` runs the same code on the CPU (with
``--preset tiny`` it is a quick check of the script itself).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import CACHE, _table, _write, machine, make_clip
from benchmarks.hfmodels import PRESETS, build_random_clip


class _GpuSampler:
    """GPU utilisation (%) and memory (MiB) from ``nvidia-smi``, sampled every ``interval_ms`` while running."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[tuple[float, float]] = []
        self._cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     f"-lms={interval_ms}", "--id=0"]
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return {"util_mean_pct": statistics.fmean(util), "util_p50_pct": statistics.median(util),
                "memory_max_mib": max(m for _, m in self.samples), "samples": len(util)}


def _tower_alone(encoder, batch_size: int, seconds: float) -> dict:
    """Frames per second of ``encode_frames`` on random uint8 frames at the encoder's input size."""
    import torch

    h, w = encoder.spec.input_size
    frames = np.random.default_rng(0).integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)
    cuda = encoder.device != "cpu"
    for _ in range(3):  # warm-up: kernels chosen, memory pooled
        encoder.encode_frames(frames)
    if cuda:
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    with _GpuSampler() as gpu:
        while time.perf_counter() - t0 < seconds:
            encoder.encode_frames(frames)  # returns host arrays: the copy back synchronises
            n += batch_size
    wall = time.perf_counter() - t0
    return {"frames": n, "wall_s": wall, "frames_per_s": n / wall, "gpu": gpu.summary()}


def gpu_bench(out: Path, *, device: str = "cuda", preset: str = "vit-b16", dtype: str = "bfloat16",
              batch_size: int = 256, clips: int = 16, seconds: float = 120.0, size: tuple[int, int] = (640, 360),
              tower_seconds: float = 20.0) -> dict:
    """Run both measurements and write the JSON (see the module docstring)."""
    from ray_vlm.core.config import IndexConfig
    from ray_vlm.models import load_encoder
    from ray_vlm.pipelines.archive_index import index_archive

    if device == "cpu" and dtype != "float32":
        dtype = "float32"  # half precision is CUDA-only
    model_dir = build_random_clip(CACHE / f"random-clip-{preset}", preset)
    encoder_id = f"hf:{model_dir}"
    runtime = "torch" if device != "cpu" else "auto"
    encoder = load_encoder(encoder_id, device=device, dtype=dtype, runtime=runtime)
    tower = _tower_alone(encoder, batch_size, tower_seconds)
    del encoder
    if device != "cpu":
        import torch

        torch.cuda.empty_cache()

    paths = [str(make_clip(CACHE / f"bbb{size[0]}x{size[1]}-{int(seconds)}s-{i}.mp4", seconds, size=size, seed=i))
             for i in range(clips)]
    config = IndexConfig.model_validate({
        "encoder": {"id": encoder_id, "device": device, "dtype": dtype, "batch_size": batch_size,
                    "runtime": runtime},
        "resources": {"encode": {"num_gpus": 1 if device != "cpu" else 0, "concurrency": 1}},
    })
    with tempfile.TemporaryDirectory() as d, _GpuSampler() as gpu:
        t0 = time.perf_counter()
        summary = index_archive(paths, f"{d}/store", config)
        wall = time.perf_counter() - t0
    video_s = summary.video_seconds
    job = {"wall_s": wall, "video_s": video_s, "frames": summary.frames_sampled,
           "frames_per_s": summary.frames_sampled / wall, "video_hours_per_gpu_hour": video_s / wall,
           "stage_cpu_s": summary.stage_cpu_s, "gpu": gpu.summary(), "videos_ok": summary.videos_ok}
    _table(f"{preset} image tower ({dtype}, batch {batch_size}) on {device}",
           ["measurement", "frames/s", "GPU util % (mean)", "video-h per GPU-h", "CPU s per stage"],
           [["tower alone", tower["frames_per_s"], (tower["gpu"] or {}).get("util_mean_pct", "-"), "-", "-"],
            [f"ray-vlm index, {clips} x {seconds:.0f} s {size[0]}x{size[1]}", job["frames_per_s"],
             (job["gpu"] or {}).get("util_mean_pct", "-"), job["video_hours_per_gpu_hour"],
             ", ".join(f"{k} {v:.1f}" for k, v in job["stage_cpu_s"].items())]])
    data = {"machine": machine(), "device": device, "gpu_name": _gpu_name(), "cpus": os.cpu_count(),
            "preset": preset, "vision_config": PRESETS[preset], "dtype": dtype, "batch_size": batch_size,
            "tower_alone": tower, "index": job}
    _write(out, data)
    return data


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    run = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"],
                         capture_output=True, text=True, check=False)
    return run.stdout.strip() or None
