"""The ``ray-vlm`` command line: ``index``, ``videos``, ``query``, ``demo``, ``bench``.

Errors a user can fix (bad paths, bad config, mismatched store) print one clear line and exit 2;
per-video problems never abort a job: they are rows in the store and lines in the summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make video archives searchable by time on Ray.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
app.add_typer(bench_app, name="bench")


def _err(msg: str, code: int = 2) -> None:
    typer.echo(f"ray-vlm: error: {msg}", err=True)
    raise typer.Exit(code)


def _storage_options(endpoint: str | None) -> dict | None:
    endpoint = endpoint or os.environ.get("RAY_VLM_S3_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


def _load_config(path: Optional[Path]):
    from pydantic import ValidationError

    from ray_vlm.config import IndexConfig

    if path is None:
        return IndexConfig()
    try:
        return IndexConfig.from_yaml(path)
    except FileNotFoundError:
        _err(f"config file not found: {path}")
    except (ValidationError, ValueError) as e:
        _err(f"bad config {path}: {e}")


@app.command()
def index(
    sources: Annotated[list[str], typer.Argument(help="Video files, directories, globs or manifest files (local or s3://).")],
    store: Annotated[str, typer.Option(help="Token store URI: a directory or s3://bucket/prefix.")],
    config: Annotated[Optional[Path], typer.Option(help="YAML config (see pipelines/configs/default.yaml).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    s3_endpoint: Annotated[Optional[str], typer.Option(help="S3 endpoint URL (MinIO, moto); or RAY_VLM_S3_ENDPOINT_URL.")] = None,
) -> None:
    """Index videos into a committed token store (reruns skip what is already there)."""
    from ray_vlm.fs import PolicyError, SourceError
    from ray_vlm.pipelines.archive_index import IndexError_, index_archive

    cfg = _load_config(config)
    _quiet_ray_console()
    progress = _Progress(enabled=not as_json and sys.stderr.isatty())
    try:
        summary = index_archive(sources, store, cfg, storage_options=_storage_options(s3_endpoint),
                                on_progress=progress.update)
    except (PolicyError, SourceError, IndexError_) as e:
        _err(str(e))
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        _print_summary(summary.to_dict())


def _quiet_ray_console() -> None:
    """The CLI shows its own progress: keep Ray Data's console chatter (not its log file) to errors."""
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for h in logging.getLogger("ray.data").handlers:
        if not hasattr(h, "baseFilename"):
            h.setLevel(logging.ERROR)


class _Progress:
    """A live line on stderr: videos done / to do, video-hours, frames, throughput."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._live = None
        self._last = ""

    def update(self, s, todo: int) -> None:
        done = s.videos_ok + s.videos_partial + s.videos_failed
        line = (
            f"indexed {done}/{todo} videos  ok {s.videos_ok}  partial {s.videos_partial}  failed {s.videos_failed}"
            f"  {s.video_seconds / 3600:.3f} video-h  {s.frames_kept}/{s.frames_sampled} frames kept"
            f"  {s.video_seconds / max(s.wall_s, 1e-9):.1f} video-s/s"
        )
        if self.enabled:
            if self._live is None:
                from rich.console import Console
                from rich.live import Live

                self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
                self._live.start()
            self._live.update(line)
        elif line != self._last and not self._quiet():
            # Not a terminal: one line per committed increment keeps logs readable.
            print(line, file=sys.stderr, flush=True)
        self._last = line

    def _quiet(self) -> bool:
        return os.environ.get("RAY_VLM_QUIET") == "1"

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def _print_summary(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"ray-vlm index → {d['store']} (version {d['store_version']})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    bph = d["bytes_per_video_hour"]
    kept = d["patch_kept_fraction"]
    rows = [
        ("inputs", d["inputs"]),
        ("skipped (already indexed)", d["videos_skipped"]),
        ("ok / partial / failed", f"{d['videos_ok']} / {d['videos_partial']} / {d['videos_failed']}"),
        ("video-hours", f"{d['video_hours']:.4f}"),
        ("frames sampled / kept", f"{d['frames_sampled']} / {d['frames_kept']}"),
        ("patches kept", "-" if kept is None else f"{100 * kept:.1f} %"),
        ("tokens", d["tokens"]),
        ("stored bytes", d["stored_bytes"]),
        ("bytes per video-hour", "-" if bph is None else f"{bph / 1e6:.2f} MB"),
        ("throughput", "-" if not d["video_seconds_per_wall_second"] else f"{d['video_seconds_per_wall_second']:.1f} video-s per s"),
        ("layout / encoder", f"{d['layout']} / {d['encoder']}"),
        ("wall time", f"{d['wall_s']:.1f} s"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    con.print(t)
    if d["failures"]:
        ft = Table(title="not ok")
        for c in ("uri", "error_type", "message"):
            ft.add_column(c)
        for f in d["failures"]:
            ft.add_row(f["uri"], f["error_type"], f["message"][:200])
        con.print(ft)


@app.command()
def videos(
    store: Annotated[str, typer.Option(help="Token store URI.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    s3_endpoint: Annotated[Optional[str], typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """List every video row of a store (ok, partial and failed)."""
    from ray_vlm import schema as S
    from ray_vlm.store import StoreError, TokenStore

    try:
        table = TokenStore(store, _storage_options(s3_endpoint)).read_videos()
    except StoreError as e:
        _err(str(e))
    cols = [S.VIDEO_ID, S.URI, S.STATUS, S.ERROR_TYPE, S.ERROR, S.DURATION_S, S.FRAMES_SAMPLED, S.FRAMES_KEPT,
            S.WIDTH, S.HEIGHT]
    rows = table.select(cols).to_pylist()
    for r in rows:
        r["frames"] = r.pop(S.FRAMES_SAMPLED)
    rows.sort(key=lambda r: r[S.URI])
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(rows)} videos in {store}")
    for c in ("video_id", "uri", "status", "duration_s", "frames", "error"):
        t.add_column(c)
    for r in rows:
        dur = r[S.DURATION_S]
        t.add_row(r[S.VIDEO_ID], r[S.URI], r[S.STATUS], "-" if dur is None else f"{dur:.1f}", str(r["frames"]),
                  (r[S.ERROR] or "")[:80])
    Console().print(t)


@app.command()
def query(
    text: Annotated[str, typer.Argument(help='What to find, e.g. "a person riding a bicycle".')],
    store: Annotated[str, typer.Option(help="Token store URI.")],
    top_k: Annotated[int, typer.Option(help="How many moments.")] = 5,
    video: Annotated[Optional[str], typer.Option(help="Only this video (video_id or file name stem).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of moments.")] = False,
    s3_endpoint: Annotated[Optional[str], typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """When does TEXT happen? Ranked moments with start/end times across the store."""
    from ray_vlm.search import QueryError, search
    from ray_vlm.store import StoreError

    try:
        moments = search(store, text, top_k=top_k, video=video, storage_options=_storage_options(s3_endpoint))
    except (QueryError, StoreError) as e:
        _err(str(e))
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in moments]))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"when does “{text}” happen?")
    for c in ("#", "video", "start_s", "end_s", "score"):
        t.add_column(c)
    for i, m in enumerate(moments, 1):
        t.add_row(str(i), Path(m.uri).name or m.video_id, f"{m.start_s:.1f}", f"{m.end_s:.1f}", f"{m.score:.3f}")
    Console().print(t)


@app.command()
def demo(
    store: Annotated[str, typer.Option(help="Where to put the demo store.")] = "demo_store",
    text: Annotated[str, typer.Option(help="The question to ask after indexing.")] = "a person riding a bicycle",
) -> None:
    """Index the sample clips that ship offline, then ask when TEXT happens."""
    from ray_vlm.samples import sample_videos

    clips = sample_videos()
    typer.echo(f"indexing {len(clips)} sample clips: {', '.join(Path(c).name for c in clips)}")
    index(sources=[str(c) for c in clips], store=store, config=None, as_json=False, s3_endpoint=None)
    query(text=text, store=store, top_k=5, video=None, as_json=False, s3_endpoint=None)


@bench_app.command("decode")
def bench_decode(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-decode.json"),
    seconds: Annotated[float, typer.Option(help="Length of each generated 1080p clip.")] = 60.0,
    clips: Annotated[int, typer.Option(help="How many clips.")] = 1,
    repeats: Annotated[int, typer.Option(help="Runs per method (median reported).")] = 3,
    read_videos: Annotated[bool, typer.Option(help="Include ray.data.read_videos(fps=1).")] = True,
) -> None:
    """Sampled decode vs ray.data.read_videos(fps=1) and vs bare PyAV, same files, same run."""
    from ray_vlm.bench import decode_bench

    decode_bench(out=out, seconds=seconds, clips=clips, repeats=repeats, read_videos=read_videos)


@bench_app.command("index")
def bench_index(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-index.json"),
    seconds: Annotated[float, typer.Option(help="Length of each generated 1080p clip.")] = 60.0,
    clips: Annotated[int, typer.Option(help="How many clips.")] = 2,
) -> None:
    """End-to-end index throughput vs a naive Ray pipeline (read_videos + per-frame model)."""
    from ray_vlm.bench import index_bench

    index_bench(out=out, seconds=seconds, clips=clips)


@bench_app.command("prune")
def bench_prune(out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-prune.json")) -> None:
    """Share of patch tokens pruned per threshold on static-camera footage and the sample clips."""
    from ray_vlm.bench import prune_bench

    prune_bench(out=out)


@bench_app.command("store")
def bench_store(out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-store.json")) -> None:
    """Bytes per video-hour for each token layout."""
    from ray_vlm.bench import store_bench

    store_bench(out=out)


@bench_app.command("memory")
def bench_memory(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-memory.json"),
    short_s: Annotated[float, typer.Option(help="Short video length.")] = 600.0,
    long_s: Annotated[float, typer.Option(help="Long video length.")] = 7200.0,
) -> None:
    """Peak memory indexing a short vs a long low-resolution video."""
    from ray_vlm.bench import memory_bench

    memory_bench(out=out, short_s=short_s, long_s=long_s)


@bench_app.command("query")
def bench_query(
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("bench-query.json"),
    hours: Annotated[float, typer.Option(help="Synthetic library size in video-hours (1 fps).")] = 1000.0,
    queries: Annotated[int, typer.Option(help="Queries timed.")] = 500,
    k_windows: Annotated[int, typer.Option(help="ANN candidate windows per query.")] = 128,
    quantization: Annotated[str, typer.Option(help="HNSW vector storage: i8 | f16 | f32.")] = "i8",
    brute_force_queries: Annotated[int, typer.Option(help="Queries timed for the brute-force baseline.")] = 10,
) -> None:
    """Query latency over a 1,000-video-hour window index vs brute force, in one run."""
    from ray_vlm.bench_query import query_bench

    query_bench(out=out, hours=hours, queries=queries, k_windows=k_windows, quantization=quantization,
                brute_force_queries=brute_force_queries)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
