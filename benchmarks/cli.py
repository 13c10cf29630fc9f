"""``python -m benchmarks <name>`` (or ``ray-vlm bench <name>`` from a checkout): print a table, write JSON.

Every benchmark compares ray-vlm with a named baseline in the same run, on the same files and cores; the JSON
results the README quotes are in ``benchmarks/results/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ray_vlm.cli import json_safe, quiet_ray_console
from ray_vlm.query.methods import BASELINES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks: print a table and write JSON.")


@app.command("decode")
def bench_decode(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-decode.json"),
    seconds: Annotated[float, typer.Option(help="Length of each generated 1080p clip.")] = 60.0,
    clips: Annotated[int, typer.Option(help="How many clips.")] = 2,
    repeats: Annotated[int, typer.Option(help="Runs per method (median reported).")] = 3,
    read_videos: Annotated[bool, typer.Option(help="Include ray.data.read_videos(fps=1).")] = True,
) -> None:
    """Sampled decode vs ray.data.read_videos(fps=1) and vs bare PyAV, same files, same run."""
    from benchmarks.bench import decode_bench

    decode_bench(out=out, seconds=seconds, clips=clips, repeats=repeats, read_videos=read_videos)


@app.command("index")
def bench_index(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-index.json"),
    seconds: Annotated[float, typer.Option(help="Length of each generated clip.")] = 68.0,
    clips: Annotated[int, typer.Option(help="How many clips.")] = 10,
    width: Annotated[int, typer.Option(help="Frame width of the generated clips.")] = 640,
    height: Annotated[int, typer.Option(help="Frame height of the generated clips.")] = 480,
    repeats: Annotated[int, typer.Option(help="Runs of each pipeline (medians reported).")] = 1,
    address: Annotated[str | None, typer.Option(help="A running Ray to use instead of starting one.")] = None,
) -> None:
    """End-to-end index throughput vs the batched pipeline a Ray user writes (read_videos + batched
    EfficientNet-Lite0 + write_parquet), per-stage CPU seconds and fixed costs, in one run."""
    from benchmarks.bench import index_bench

    index_bench(out=out, seconds=seconds, clips=clips, repeats=repeats, size=(width, height), address=address)


@app.command("encode")
def bench_encode(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-encode.json"),
    batch_size: Annotated[int, typer.Option(help="Frames per call.")] = 16,
) -> None:
    """The bundled encoder on torch, ONNX Runtime float32 and int8: CPU ms per frame and closeness to torch."""
    from benchmarks.bench import encode_bench

    encode_bench(out, batch_size=batch_size)


@app.command("gpu")
def bench_gpu(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-gpu.json"),
    device: Annotated[str, typer.Option(help="cuda, cuda:N, or cpu (to check the script without a GPU).")] = "cuda",
    preset: Annotated[str, typer.Option(help="Image tower shape: vit-b16, vit-b32 or tiny.")] = "vit-b16",
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32 (float32 on CPU).")] = "bfloat16",
    batch_size: Annotated[int, typer.Option(help="Frames per forward pass.")] = 256,
    clips: Annotated[int, typer.Option(help="Generated clips indexed end to end.")] = 16,
    seconds: Annotated[float, typer.Option(help="Length of each clip.")] = 120.0,
    tower_seconds: Annotated[float, typer.Option(help="How long the tower alone is timed.")] = 20.0,
) -> None:
    """A random-weight CLIP image tower (built from its config) on a GPU: frames/s alone, and video-hours per
    GPU-hour, CPU per stage and GPU utilisation inside ray-vlm index."""
    from benchmarks.bench_gpu import gpu_bench

    gpu_bench(out, device=device, preset=preset, dtype=dtype, batch_size=batch_size, clips=clips, seconds=seconds,
              tower_seconds=tower_seconds)


@app.command("prune")
def bench_prune(out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-prune.json")) -> None:
    """Share of patch tokens pruned per threshold on static-camera footage and the sample clips."""
    from benchmarks.bench import prune_bench

    prune_bench(out=out)


@app.command("store")
def bench_store(out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-store.json")) -> None:
    """Bytes per video-hour for each token layout."""
    from benchmarks.bench import store_bench

    store_bench(out=out)


@app.command("memory")
def bench_memory(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-memory.json"),
    short_s: Annotated[float, typer.Option(help="Short video length.")] = 600.0,
    long_s: Annotated[float, typer.Option(help="Long video length.")] = 7200.0,
    media: Annotated[str, typer.Option(help="video (low resolution, no audio) or audio (speech, audio only).")]
    = "video",
) -> None:
    """Peak memory indexing a short vs a long source: a low-resolution video, or an audio track of speech."""
    from benchmarks.bench import memory_bench

    memory_bench(out=out, short_s=short_s, long_s=long_s, media=media)


@app.command("query")
def bench_query(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-query.json"),
    hours: Annotated[float, typer.Option(help="Synthetic library size in video-hours (1 fps).")] = 1000.0,
    queries: Annotated[int, typer.Option(help="Queries timed.")] = 500,
    k_windows: Annotated[int, typer.Option(help="ANN candidate windows per query.")] = 128,
    quantization: Annotated[str, typer.Option(help="HNSW vector storage: i8 | f16 | f32.")] = "i8",
    brute_force_queries: Annotated[int, typer.Option(help="Queries timed for the brute-force baseline.")] = 10,
    lance_ann: Annotated[bool, typer.Option(help="Also Lance's vector index over the same windows.")] = True,
) -> None:
    """Query latency over a 1,000-video-hour window index vs brute force (and Lance's vector index), in one run.

    Lance's compute threads are set to one (``LANCE_CPU_THREADS=1`` unless set), as usearch's search is: one
    query, one thread."""
    import os

    os.environ.setdefault("LANCE_CPU_THREADS", "1")  # read when Lance first starts its runtime
    from benchmarks.bench_query import query_bench

    query_bench(out=out, hours=hours, queries=queries, k_windows=k_windows, quantization=quantization,
                brute_force_queries=brute_force_queries, lance_ann=lance_ann)


@app.command("store-scale")
def bench_store_scale(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-store-scale.json"),
    sizes: Annotated[str, typer.Option(help="Store sizes in video-hours, comma-separated.")] =
        "100,1000,10000,100000",
    dim: Annotated[int, typer.Option(help="Global token width (fp16).")] = 32,
    repeats: Annotated[int, typer.Option(help="Timed commits of one more video-hour and reader opens.")] = 5,
    queries: Annotated[int, typer.Option(help="Queries timed per store (0: none).")] = 200,
    query_max_hours: Annotated[float, typer.Option(help="Time queries only up to this size.")] = 1000.0,
    sparse_fps: Annotated[float, typer.Option(help="Build fps of the sizes from --sparse-from-hours.")] = 0.1,
    sparse_from_hours: Annotated[float, typer.Option(help="Sizes built at --sparse-fps from here.")] = 100000.0,
    build_commits: Annotated[int, typer.Option(help="Commits of each store's build.")] = 10,
    stores: Annotated[str, typer.Option(help="Store formats: v1,v2 | v1 | v2.")] = "v1,v2",
    work_dir: Annotated[Path | None, typer.Option(
        help="Where stores are built (default: a temporary directory, deleted).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the built stores.")] = False,
) -> None:
    """Commit, refresh, files per video-hour and query latency from 100 to 100,000 video-hours, v1 vs v2."""
    from benchmarks.bench_store_scale import format_table, store_scale_bench

    report = store_scale_bench(
        out, sizes=[float(s) for s in sizes.split(",") if s.strip()], dim=dim, repeats=repeats, queries=queries,
        query_max_hours=query_max_hours, sparse_fps=sparse_fps, sparse_from_hours=sparse_from_hours,
        build_commits=build_commits, stores=[s.strip() for s in stores.split(",") if s.strip()],
        work_dir=work_dir, keep=keep, echo=typer.echo)
    typer.echo(format_table(report))
    typer.echo(f"results written to {out}")


@app.command("serve")
def bench_serve(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-serve.json"),
    store: Annotated[str | None, typer.Option(help="Store to serve (default: the sample clips, indexed).")] = None,
    requests: Annotated[int, typer.Option(help="Sequential searches timed per side (direct, HTTP).")] = 200,
    concurrency: Annotated[int, typer.Option(help="Client threads of the throughput phase.")] = 8,
    access_log: Annotated[bool, typer.Option(help="Serve's per-request access log.")] = True,
    split: Annotated[bool, typer.Option(
        help="Also time the three-call search path (QueryEncoder -> Retriever -> Grounder) in the same run.")] = True,
) -> None:
    """HTTP search overhead vs a direct Searcher call (p50/p99) and requests/s per replica."""
    from benchmarks.bench_serve import bench_serve as run

    run(out, store=store, requests_per_side=requests, concurrency=concurrency, access_log=access_log, split=split)


@app.command("speech")
def bench_speech(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-speech.json"),
    talks: Annotated[int, typer.Option(help="Generated talks (video + speech + slides).")] = 4,
    podcasts: Annotated[int, typer.Option(help="Generated podcasts (audio only).")] = 2,
    seconds: Annotated[float, typer.Option(help="Length of each generated file.")] = 90.0,
    seed: Annotated[int, typer.Option(help="Seed of the generated benchmark.")] = 7,
    work_dir: Annotated[Path | None, typer.Option(help="Files and store (reused when present).")] = None,
) -> None:
    """Speech and on-screen text: R1@0.5 of quoted, paraphrased and on-screen-text queries (per video and
    library-wide) and the quoted phrases' boundary error, on files generated with exact ground truth."""
    import tempfile

    from benchmarks.bench_speech import format_table, run

    quiet_ray_console()
    wd = work_dir or Path(tempfile.gettempdir()) / f"ray-vlm-bench-speech-{talks}-{podcasts}-{int(seconds)}-{seed}"
    report = run(out, work_dir=wd, n_talks=talks, n_podcasts=podcasts, seconds=seconds, seed=seed)
    typer.echo(format_table(report))
    typer.echo(f"results written to {out}")


@app.command("asr")
def bench_asr(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-asr.json"),
    seconds: Annotated[float, typer.Option(help="Seconds of speech.")] = 60.0,
    threads: Annotated[int, typer.Option(help="CPU threads of the recogniser.")] = 1,
) -> None:
    """CPU seconds per second of audio of the bundled speech recogniser (Whisper tiny.en, int8)."""
    from benchmarks.bench_speech import asr_rtf

    res = asr_rtf(seconds, threads)
    out.write_text(json.dumps(res, indent=1))
    typer.echo(json.dumps(res))


@app.command("grounding")
def bench_grounding(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-grounding.json"),
    seed: Annotated[int, typer.Option(help="Seed of the generated benchmark.")] = 7,
    videos: Annotated[int, typer.Option(help="Generated videos.")] = 12,
    seconds: Annotated[float, typer.Option(help="Length of each generated video.")] = 60.0,
    top_k: Annotated[int, typer.Option(help="Predictions per query.")] = 10,
    work_dir: Annotated[Path | None, typer.Option(
        help="Videos and stores (reused when present); default: a folder in the system's temp dir.")] = None,
    samples: Annotated[bool, typer.Option(help="Also evaluate the annotated real sample clips.")] = True,
    runtime: Annotated[str, typer.Option(help="How frames are encoded: auto, torch, onnx or onnx-int8.")] = "auto",
    aspect: Annotated[str, typer.Option(help="Frames squashed to the encoder's size, or 'keep' their aspect.")
                      ] = "squash",
    max_patches: Annotated[int | None, typer.Option(help="With --aspect keep: patch tokens per frame at most.")
                           ] = None,
    width: Annotated[int, typer.Option(help="Width of the generated videos.")] = 320,
    height: Annotated[int, typer.Option(help="Height of the generated videos.")] = 240,
) -> None:
    """Grounding accuracy against baselines, with and without pruning: one table, JSON to --out.

    Real photographs are composited into real footage at known times and indexed with pruning on and off;
    random window, whole video, content tokens, context tokens and fused are scored per video and library-wide
    (R1@0.3/0.5/0.7, mIoU, mAP, top1_overlap)."""
    quiet_ray_console()
    report = grounding_bench(out=out, seed=seed, n_videos=videos, seconds=seconds, top_k=top_k, work_dir=work_dir,
                             samples=samples, runtime=runtime, aspect=aspect, size=(width, height),
                             max_patches=max_patches)
    typer.echo(format_grounding_table(report))
    typer.echo(f"results written to {out}")


# the baselines, then every grounding method but "global" (a part of "content")
GROUNDING_BENCH_METHODS = BASELINES + ("content", "context", "fused")
_BENCH_METRICS = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP", "top1_overlap")


def grounding_bench(out: Path, *, seed: int = 7, n_videos: int = 12, seconds: float = 60.0, top_k: int = 10,
                    work_dir: Path | None = None, samples: bool = True,
                    methods: tuple[str, ...] = GROUNDING_BENCH_METHODS, runtime: str = "auto",
                    aspect: str = "squash", size: tuple[int, int] = (320, 240),
                    max_patches: int | None = None) -> dict:
    """Generate + index the benchmark (``benchgen.run_grounding_benchmark``: pruning on and off, grounding cost),
    then evaluate every method on every store with the full metric set; write JSON to ``out``.

    Returns:
        ``{"setup", "index", "cost_one_video_hour_s", "results": [{"set", "prune", "method", "num_queries",
        "per_video": {metric: %}, "library": {metric: %}, "eval_s"}]}``. ``prune`` is None for the baselines
        that do not read tokens (random window, whole video).
    """
    import time

    from benchmarks.benchgen import run_grounding_benchmark
    from ray_vlm.eval.run import evaluate_store

    out = Path(out)
    if work_dir is None:  # generated videos and stores, reused by the next run with the same setup
        import tempfile

        suffix = (("" if runtime == "auto" else f"-{runtime}") + ("" if aspect == "squash" else f"-{aspect}")
                  + ("" if size == (320, 240) else f"-{size[0]}x{size[1]}")
                  + ("" if max_patches is None else f"-max{max_patches}"))
        work_dir = Path(tempfile.gettempdir()) / f"ray-vlm-bench-grounding-s{seed}-{n_videos}x{seconds:g}s{suffix}"
    work = Path(work_dir)
    from ray_vlm.core.config import IndexConfig

    config = IndexConfig.model_validate({"encoder": {"runtime": runtime, "aspect": aspect,
                                                     "max_patches": max_patches}})
    rep = run_grounding_benchmark(work, n_videos=n_videos, seconds=seconds, seed=seed, methods=(), top_k=top_k,
                                  samples=samples, verbose=False, config=config, size=size)
    rep["setup"]["runtime"] = runtime
    rep["setup"]["aspect"] = aspect
    rep["setup"]["size"] = list(size)
    rep["setup"]["max_patches"] = max_patches
    generated = work / "videos" / "annotations.jsonl"
    sets = [("generated", generated, "generated")]
    # Small objects: the queries whose photo is only ever shown in a corner, a ninth of the frame.
    small = work / "small_objects.jsonl"
    if generated.is_file():
        rows = [json.loads(line) for line in generated.read_text().splitlines() if line.strip()]
        corner = [r for r in rows if set(r.get("layouts") or []) == {"corner"}]
        if corner:
            small.write_text("".join(json.dumps(r) + "\n" for r in corner))
            sets.append(("small_objects", small, "generated"))
    if samples:
        sets.append(("sample_clips", work / "sample_clips.jsonl", "sample_clips"))
    results = []
    for set_name, ann, store_set in sets:
        if not ann.is_file():
            raise FileNotFoundError(f"the benchmark run left no annotation file {ann}")
        for prune in (True, False):
            store = work / f"store-{store_set}-{'prune' if prune else 'noprune'}"
            for method in methods:
                token_free = method in ("random", "whole")
                if token_free and not prune:
                    continue  # the same numbers: these baselines never read the tokens
                t0 = time.perf_counter()
                r = evaluate_store(str(store), str(ann), top_k=top_k, method=method, seed=seed)
                results.append({"set": set_name, "prune": None if token_free else prune, "method": method,
                                "num_queries": r["num_queries"], "num_library_queries": r["num_library_queries"],
                                "per_video": r["per_video"], "library": r["library"],
                                "eval_s": round(time.perf_counter() - t0, 3)})
    report = {"setup": rep["setup"], "index": rep["index"], "cost_one_video_hour_s": rep["cost_one_video_hour_s"],
              "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=1))
    return report


def format_grounding_table(report: dict) -> str:
    """The grounding benchmark as one plain-text table (percentages)."""
    m = _BENCH_METRICS
    w = {k: max(6, len(k)) for k in m}
    head = (f"{'set':12s} {'prune':5s} {'method':7s} {'n':>3s} | per video: " + " ".join(f"{k:>{w[k]}s}" for k in m)
            + " | library-wide: " + " ".join(f"{k:>{w[k]}s}" for k in m))
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        prune = "-" if r["prune"] is None else ("on" if r["prune"] else "off")
        lines.append(f"{r['set']:12s} {prune:5s} {r['method']:7s} {r['num_queries']:3d} | {'':10s}"
                     + " ".join(f"{r['per_video'][k]:{w[k]}.1f}" for k in m) + f" | {'':14s}"
                     + " ".join(f"{r['library'][k]:{w[k]}.1f}" for k in m))
    c = report.get("cost_one_video_hour_s")
    if c:
        lines.append(f"grounding one query in one video-hour ({c['frames']} frames, {c['kept_fraction']:.2f} of "
                     f"patches kept): content {c['content'] * 1e3:.1f} ms, context {c['context_top8'] * 1e3:.1f} ms "
                     f"(all patches {c['context'] * 1e3:.1f} ms), fused {c['fused'] * 1e3:.1f} ms")
    s = report.get("setup") or {}
    if s:
        lines.append(f"setup: {s.get('n_videos')} generated videos x {s.get('seconds')} s, seed {s.get('seed')}, "
                     f"photos {', '.join(s.get('photos', []))}, encoder {s.get('encoder')}, "
                     f"{s.get('target_fps')} fps, top_k {s.get('top_k')}")
    return "\n".join(lines)
