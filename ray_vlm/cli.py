"""The ``ray-vlm`` command line: ``index``, ``videos``, ``query``, ``eval``, ``ground-batch``, ``demo``, ``serve``;
``bench`` launches the benchmarks of a source checkout (``benchmarks/``).

Errors a user can fix (bad paths, bad config, mismatched store) print one clear line and exit 2;
per-video problems never abort a job: they are rows in the store and lines in the summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ray_vlm.query.methods import GROUNDING_METHODS, METHODS

if TYPE_CHECKING:
    from rich.live import Live

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make video archives searchable by time on Ray.")


def _err(msg: str, code: int = 2) -> None:
    typer.echo(f"ray-vlm: error: {msg}", err=True)
    raise typer.Exit(code)


def _storage_options(endpoint: str | None) -> dict | None:
    endpoint = endpoint or os.environ.get("RAY_VLM_S3_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


def _load_config(path: Path | None):
    from pydantic import ValidationError

    from ray_vlm.core.config import IndexConfig

    if path is None:
        return IndexConfig()
    try:
        return IndexConfig.from_yaml(path)
    except FileNotFoundError:
        _err(f"config file not found: {path}")
    except (ValidationError, ValueError) as e:
        _err(f"bad config {path}: {e}")


def _with_tracks(cfg, *, speech: bool | None, ocr: bool | None):
    """``cfg`` with the speech / OCR tracks switched as the command line asks (None: as configured)."""
    if speech is not None:
        cfg = cfg.model_copy(update={"speech": cfg.speech.model_copy(update={"enabled": speech})})
        if speech and not cfg.audio.enabled:  # speech needs the audio decoded
            cfg = cfg.model_copy(update={"audio": cfg.audio.model_copy(update={"enabled": True})})
    if ocr is not None:
        cfg = cfg.model_copy(update={"ocr": cfg.ocr.model_copy(update={"enabled": ocr})})
    return cfg


@app.command()
def index(
    sources: Annotated[list[str], typer.Argument(help="Video files, directories, globs or manifest files (local or s3://).")],
    store: Annotated[str, typer.Option(help="Token store URI: a directory or s3://bucket/prefix.")],
    config: Annotated[Path | None, typer.Option(help="YAML config (see pipelines/configs/default.yaml).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    s3_endpoint: Annotated[
        str | None, typer.Option(help="S3 endpoint URL (MinIO, moto); or RAY_VLM_S3_ENDPOINT_URL.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own log lines (by default they go to "
                                                                  "a log file, named if the job fails).")] = False,
    address: Annotated[str | None, typer.Option(help="A running Ray to use ('auto', host:port or "
                                                     "ray://host:10001), left running afterwards; default: "
                                                     "RAY_ADDRESS, else a local Ray for this job.")] = None,
    speech: Annotated[bool | None, typer.Option("--speech/--no-speech", help="Transcribe speech and label "
                                                "sounds (default: the config's speech.enabled, on).")] = None,
    ocr: Annotated[bool | None, typer.Option("--ocr/--no-ocr", help="Read text on screen where the picture "
                                             "changes (default: the config's ocr.enabled, off: about 0.5 s of "
                                             "CPU per frame read).")] = None,
) -> None:
    """Index videos into a committed token store (reruns skip what is already there).

    SIGTERM or Ctrl-C: the complete videos are committed, Ray is shut down, exit 0; running it again resumes.
    A second signal stops at once (exit 128 + signal number)."""
    from ray_vlm.core._proc import GracefulStop, RayProcesses, log_path, ray_output
    from ray_vlm.core.fs import PolicyError, SourceError
    from ray_vlm.pipelines.archive_index import IndexError_, index_archive

    cfg = _with_tracks(_load_config(config), speech=speech, ocr=ocr)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    own_ray = address is None and not os.environ.get("RAY_ADDRESS") and not ray_was_up
    procs = RayProcesses() if own_ray else None  # what the job's local Ray starts: none of it outlives the job
    stop = GracefulStop(on_force=procs.kill_all if procs else None)
    stop.install()
    log = None if verbose else log_path("index")
    error = None
    try:
        with ray_output(log) as console:
            if not verbose:
                quiet_ray_console()
            progress = _Progress(enabled=not as_json and console.err.isatty(), stream=console.err)
            try:
                summary = index_archive(sources, store, cfg, storage_options=_storage_options(s3_endpoint),
                                        on_progress=progress.update, stop=stop, verbose=verbose, address=address)
            except (PolicyError, SourceError, IndexError_) as e:
                error = str(e)
            except Exception:
                console.err.write(f"ray-vlm: the job failed; Ray's log: {log}\n" if log else "")
                raise
            finally:
                progress.close()
                if procs is not None:
                    _shutdown_own_ray(procs, console.err)
                elif not ray_was_up and "ray" in sys.modules:
                    sys.modules["ray"].shutdown()  # disconnects from the running Ray, which keeps running
    finally:
        stop.restore()
    if error is not None:
        _err(error)
    d = summary.to_dict()
    if as_json:
        typer.echo(json.dumps(d))
    else:
        _print_summary(d)
    if summary.interrupted:
        left = d["inputs"] - d["videos_skipped"] - d["videos_ok"] - d["videos_partial"] - d["videos_failed"]
        typer.echo(f"ray-vlm: interrupted by {summary.interrupted}: {left} video(s) not indexed yet; run the same "
                   f"command again to resume", err=True)


def _shutdown_own_ray(procs, console) -> None:
    """Shut down the Ray this command started and make sure none of its processes is left."""
    ray = sys.modules.get("ray")
    procs.snapshot()
    if ray is not None:
        ray.shutdown()  # also after a start cut short (it stops the processes already started)
    killed = procs.reap(timeout_s=10.0)
    if killed:
        console.write(f"ray-vlm: killed {len(killed)} Ray process(es) left after shutdown: {', '.join(killed)}\n")


def quiet_ray_console() -> None:
    """The CLI shows its own progress: keep Ray Data's console chatter (not its log file) to errors."""
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for h in logging.getLogger("ray.data").handlers:
        if not hasattr(h, "baseFilename"):
            h.setLevel(logging.ERROR)


class _Progress:
    """A live line on stderr: videos done / to do, video-hours, frames, throughput."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream  # None: sys.stderr at the time of writing
        self._live: Live | None = None
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

                con = Console(file=self.stream) if self.stream is not None else Console(stderr=True)
                self._live = Live(console=con, refresh_per_second=4, transient=True)
                self._live.start()
            self._live.update(line)
        elif line != self._last and not self._quiet():
            # Not a terminal: one line per committed increment keeps logs readable.
            print(line, file=self.stream or sys.stderr, flush=True)
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
        ("resumed (from their last committed chunk)", d["videos_resumed"]),
        ("ok / partial / failed", f"{d['videos_ok']} / {d['videos_partial']} / {d['videos_failed']}"),
        ("video-hours", f"{d['video_hours']:.4f}"),
        ("frames sampled / kept", f"{d['frames_sampled']} / {d['frames_kept']}"),
        ("patches kept", "-" if kept is None else f"{100 * kept:.1f} %"),
        ("tokens", d["tokens"]),
        ("stored bytes", d["stored_bytes"]),
        ("bytes per video-hour", "-" if bph is None else f"{bph / 1e6:.2f} MB"),
        ("throughput", "-" if not d["video_seconds_per_wall_second"]
         else f"{d['video_seconds_per_wall_second']:.1f} video-s per s"),
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
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """List every video row of a store (ok, partial and failed)."""
    from ray_vlm.core import schema as S
    from ray_vlm.store.token_store import StoreError, TokenStore

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
def compact(
    store: Annotated[str, typer.Option(help="Token store URI.")],
    retention_s: Annotated[float, typer.Option(
        help="Versions (and their files) older than this many seconds are deleted; 0 keeps only the latest.")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was done as JSON.")] = False,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """Merge small fragments, drop rows no version shows, and delete versions older than the retention.

    Readers and servers keep working while it runs: they see the same rows before and after.
    """
    from ray_vlm.store.token_store import StoreError, TokenStore

    try:
        st = TokenStore(store, _storage_options(s3_endpoint))
        files_before = st.file_count()
        out = st.compact(retention_s=retention_s)
        out["files_before"], out["files_after"] = files_before, st.file_count()
    except StoreError as e:
        _err(str(e))
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"compacted {store}: fragments {out['fragments_before']} -> {out['fragments_after']}, "
               f"files {out['files_before']} -> {out['files_after']}, {out['removed_rows']} invisible rows removed, "
               f"{out['versions_removed']} old versions deleted")


@app.command()
def migrate(
    old: Annotated[str, typer.Argument(help="The v1 store (Parquet + JSON manifests, ray-vlm 0.1).")],
    new: Annotated[str, typer.Argument(help="Where to write the v2 store (must not exist yet).")],
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """Turn a v1 store into a v2 (Lance) store, losing nothing; the old store is only read."""
    from ray_vlm.store.errors import StoreError
    from ray_vlm.store.migrate import migrate as run

    def progress(done: int, total: int) -> None:
        typer.echo(f"  {done}/{total} videos copied", err=True)

    try:
        out = run(old, new, _storage_options(s3_endpoint), on_progress=progress)
    except StoreError as e:
        _err(str(e))
    typer.echo(f"migrated {out['videos']} videos and {out['frames']} frames of {old} (v{out['v1_version']}) "
               f"into {new} (version {out['version']})")


@app.command()
def query(
    text: Annotated[str, typer.Argument(help='What to find, e.g. "a person riding a bicycle".')],
    store: Annotated[str, typer.Option(help="Token store URI.")],
    top_k: Annotated[int, typer.Option(help="How many moments.")] = 5,
    video: Annotated[str | None, typer.Option(help="Only this video (video_id or file name stem).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of moments.")] = False,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Also draw the answer as a PNG: score curve per top video, moments shaded, a frame per moment.")] = None,
    track: Annotated[str, typer.Option(
        help='Which tracks: all, visual, speech or text (comma-separated for several). '
             'A phrase in double quotes must be said or written as such.')] = "all",
) -> None:
    """When does TEXT happen (on screen, said, or written)? Ranked moments with start/end times across the store."""
    from ray_vlm.query.searcher import QueryError, get_searcher
    from ray_vlm.store.token_store import StoreError

    so = _storage_options(s3_endpoint)
    try:
        searcher = get_searcher(store, so)
        moments = searcher.search(text, top_k=top_k, video=video, tracks=track)
    except (QueryError, StoreError) as e:
        _err(str(e))
    if plot is not None:
        _plot(searcher, text, moments, plot, so, quiet=as_json)
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in moments]))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"when does “{text}” happen?")
    for c in ("#", "video", "start_s", "end_s", "score", "tracks", "evidence"):
        t.add_column(c)
    for i, m in enumerate(moments, 1):
        evidence = " / ".join(f"[{e['track']}] {e['text']}" for e in m.evidence)
        t.add_row(str(i), Path(m.uri).name or m.video_id, f"{m.start_s:.1f}", f"{m.end_s:.1f}", f"{m.score:.3f}",
                  "+".join(m.tracks), evidence)
    Console().print(t)


def _plot(searcher, text: str, moments, path: Path, storage_options, quiet: bool) -> None:
    from ray_vlm.query.plot import PlotError, plot_answer

    try:
        plot_answer(searcher, text, moments, path, storage_options=storage_options)
    except PlotError as e:
        _err(str(e))
    if not quiet:
        typer.echo(f"plot written to {path}", err=True)


# ------------------------------------------------------------------------------------------ eval


_EVAL_TABLE_METRICS = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP", "mAP@0.5", "mAP@0.75", "top1_overlap")


def read_annotations(uri: str, storage_options: dict | None = None) -> list[dict]:
    """QVHighlights-format annotation records (``qid, query, vid, relevant_windows``), each checked.

    Raises:
        ValueError: unreadable file, or a line that is not such a record (the message names the line).
    """
    import math

    from ray_vlm.core.fs import read_small_file

    raw = read_small_file(uri, storage_options, what="annotation file")
    out: list[dict] = []
    seen: dict[int | str, int] = {}  # qid -> line
    for n, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{uri}, line {n}"
        if not line.strip():
            continue
        try:
            r = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
        missing = [k for k in ("qid", "query", "vid", "relevant_windows") if k not in r]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if not isinstance(r["qid"], (int, str)) or isinstance(r["qid"], bool):
            raise ValueError(f"{where}: qid must be an integer or a string")
        if r["qid"] in seen:
            raise ValueError(f"{where}: qid {r['qid']!r} repeats line {seen[r['qid']]}")
        seen[r["qid"]] = n
        if not isinstance(r["query"], str) or not r["query"].strip():
            raise ValueError(f"{where}: query must be a non-empty string")
        if not isinstance(r["vid"], (str, int)) or isinstance(r["vid"], bool) or not str(r["vid"]):
            raise ValueError(f"{where}: vid must be a video file name stem or a video_id")
        w = r["relevant_windows"]
        ok = isinstance(w, list) and w and all(
            isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in x) and x[0] < x[1]
            for x in w)
        if not ok:
            raise ValueError(f"{where}: relevant_windows must be a non-empty list of [start_s, end_s] with "
                             f"start_s < end_s")
        out.append(r)
    if not out:
        raise ValueError(f"{uri} holds no annotation")
    return out


def evaluate_annotations(store: str, records: list[dict], *, top_k: int = 10, method: str = "fused",
                         storage_options: dict | None = None, seed: int = 0) -> dict:
    """``search.evaluate_store`` over the records whose ``vid`` names a video of the store; records naming no
    video of the store count as misses (IoU 0, AP 0) and are listed in ``unmatched_vids``.

    Per video, the misses are exact (an annotated query without predictions). Library-wide, a query text whose
    every record names an unknown video is a miss; windows in unknown videos of a text that also has records in
    known videos are left out of that text's ground truth (their video cannot be searched).
    """
    from ray_vlm.eval.metrics import LENGTH_BUCKETS_S, evaluate
    from ray_vlm.eval.run import evaluate_store
    from ray_vlm.query.searcher import QueryError, Searcher

    searcher = Searcher(store, storage_options=storage_options)
    if not searcher.videos():
        raise QueryError(f"the store {store} holds no videos (v{searcher.version})")
    unmatched: dict[str, int] = {}
    known = []
    for r in records:
        try:
            searcher.resolve_video(str(r["vid"]))
            known.append(r)
        except QueryError:
            unmatched[str(r["vid"])] = unmatched.get(str(r["vid"]), 0) + 1
    if known:
        res = evaluate_store(store, known, top_k=top_k, method=method, storage_options=storage_options, seed=seed,
                             return_predictions=bool(unmatched))
    else:
        res = None
    out = {"store": store, "method": method, "top_k": top_k, "num_queries": len(records),
           "num_library_queries": len({str(r["query"]) for r in records}),
           "unmatched_vids": sorted(unmatched), "num_unmatched_queries": sum(unmatched.values())}
    if res is not None and not unmatched:
        out["per_video"], out["library"] = res["per_video"], res["library"]
        return out
    # Per video: the known records' predictions against every record (the unknown ones have none: misses).
    per_ann = [{"qid": r["qid"], "vid": r["vid"], "relevant_windows": r["relevant_windows"]} for r in records]
    preds = res["predictions"]["per_video"] if res is not None else []
    out["per_video"] = evaluate(preds, per_ann)
    # Library: texts only annotated in unknown videos join the average as misses.
    known_texts = {str(r["query"]) for r in known}
    lost: dict[str, list] = {}
    for r in records:
        if str(r["query"]) not in known_texts:
            lost.setdefault(str(r["query"]), []).extend(r["relevant_windows"])
    n_known = len(known_texts)
    lib = dict(res["library"]) if res is not None else {}
    if res is None:  # nothing searchable: every text misses
        lib = evaluate([], [{"qid": t, "relevant_windows": w} for t, w in lost.items()])
    elif lost:
        n = n_known + len(lost)
        for k, v in list(lib.items()):
            if k.startswith("num_queries_") and k[len("num_queries_"):] in LENGTH_BUCKETS_S:
                continue
            if k.startswith(("R1@", "mAP@")) or k in ("mIoU", "top1_overlap", "mAP"):
                lib[k] = v * n_known / n
        for name, (lo, hi) in LENGTH_BUCKETS_S.items():
            extra = sum(1 for w in lost.values() if any(lo < b - a <= hi for a, b in w))
            had = int(lib.get(f"num_queries_{name}", 0) or 0)
            if extra:
                v = lib.get(f"mAP_{name}")
                # evaluate() writes mAP_<name> with num_queries_<name>: v is a float whenever had > 0
                lib[f"mAP_{name}"] = (v * had / (had + extra)) if had and v is not None and v == v else 0.0
                lib[f"num_queries_{name}"] = float(had + extra)
        lib["num_queries"] = float(n)
        lib["num_queries_without_predictions"] = float(lib.get("num_queries_without_predictions", 0) + len(lost))
    out["library"] = lib
    return out


def json_safe(x):
    import math

    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


@app.command("eval")
def eval_(
    annotations: Annotated[str, typer.Argument(help="QVHighlights-format JSONL: qid, query, vid, relevant_windows.")],
    store: Annotated[str, typer.Option(help="Token store URI.")],
    top_k: Annotated[int, typer.Option(help="Predictions per query (the metrics use at most 10).")] = 10,
    method: Annotated[str, typer.Option(help=" | ".join(METHODS) + ".")] = "fused",
    seed: Annotated[int, typer.Option(help="Seed of the random-window baseline.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """Moment-retrieval metrics against QVHighlights-format annotations: R1@0.3/0.5/0.7, mIoU, mAP, and
    top1_overlap (share of queries whose top moment overlaps an annotated window; not QVHighlights' HIT@1).

    Per video (grounding in the annotated video) and library-wide (the top moments of the whole library).
    `vid` is a video's file name stem or its video_id; annotations naming no video of the store count as
    misses and are listed as `unmatched_vids`."""
    from ray_vlm.eval.metrics import EvalDataError
    from ray_vlm.query.searcher import METHODS, QueryError
    from ray_vlm.store.token_store import StoreError

    if method not in METHODS:
        _err(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if top_k < 1:
        _err("--top-k must be at least 1")
    so = _storage_options(s3_endpoint)
    try:
        records = read_annotations(annotations, so)
        res = evaluate_annotations(store, records, top_k=top_k, method=method, storage_options=so, seed=seed)
    except (QueryError, StoreError, EvalDataError, ValueError) as e:
        _err(str(e))
    res["annotations"] = annotations
    if as_json:
        typer.echo(json.dumps(json_safe(res)))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ray-vlm eval: {res['num_queries']} queries ({res['num_library_queries']} distinct texts), "
                    f"method {method}, store {store}")
    t.add_column("metric (%)", style="bold")
    t.add_column("per video", justify="right")
    t.add_column("library-wide", justify="right")
    for k in _EVAL_TABLE_METRICS:
        t.add_row(k, f"{res['per_video'][k]:.2f}", f"{res['library'][k]:.2f}")
    con = Console()
    con.print(t)
    if res["unmatched_vids"]:
        shown = ", ".join(res["unmatched_vids"][:10]) + (" ..." if len(res["unmatched_vids"]) > 10 else "")
        con.print(f"[yellow]{res['num_unmatched_queries']} annotation(s) name {len(res['unmatched_vids'])} "
                  f"video(s) not in the store, counted as misses: {shown}[/yellow]")


# ------------------------------------------------------------------------------------------ ground-batch


@app.command("ground-batch")
def ground_batch_cmd(
    queries: Annotated[str, typer.Argument(help="Text file: one query per line; blank lines and # comments skipped.")],
    store: Annotated[str, typer.Option(help="Token store URI.")],
    out: Annotated[str, typer.Option(help="Results directory (Parquet), local or s3://.")],
    top_k: Annotated[int, typer.Option(help="Moments per query (library-wide ranking).")] = 5,
    video: Annotated[str | None, typer.Option(help="Only this video (video_id or file name stem).")] = None,
    method: Annotated[str, typer.Option(help=" | ".join(GROUNDING_METHODS) + ".")] = "fused",
    concurrency: Annotated[int, typer.Option(help="Grounding actors (each holds a loaded searcher).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Queries per batch.")] = 32,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """Ground many queries over the whole library as a Ray Data job, writing Parquet.

    One row per (query, moment): query_id (line number), query, rank, video_id, uri, start_s, end_s, score,
    peak_s, store_version; a query that cannot be answered gets one row with error_type and error."""
    from ray_vlm.pipelines.ground_batch import GroundBatchError, run

    if top_k < 1 or concurrency < 1 or batch_size < 1:
        _err("--top-k, --concurrency and --batch-size must be at least 1")
    quiet_ray_console()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = run(queries, store, out, top_k=top_k, video=video, method=method,
                      storage_options=_storage_options(s3_endpoint), concurrency=concurrency,
                      batch_size=batch_size, overwrite=overwrite)
    except GroundBatchError as e:
        _err(str(e))
    d = summary.to_dict()
    if as_json:
        typer.echo(json.dumps(d))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ray-vlm ground-batch → {out}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in (("store (version)", f"{store} (v{d['store_version']})"), ("queries", d["queries"]),
                 ("answered / failed", f"{d['queries_answered']} / {d['queries_failed']}"),
                 ("moment rows", d["rows"]), ("videos with a moment", d["videos_hit"]),
                 ("wall time", f"{d['wall_s']:.1f} s")):
        t.add_row(k, str(v))
    con = Console()
    con.print(t)
    if d["failures"]:
        ft = Table(title="queries not answered")
        for c in ("query_id", "query", "error_type", "error"):
            ft.add_column(c)
        for f in d["failures"]:
            ft.add_row(str(f["query_id"]), repr(f["query"])[:60], f["error_type"], (f["error"] or "")[:120])
        con.print(ft)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmarks (run from a checkout of the source: they live in its ``benchmarks/`` folder, not in the package).

    ``ray-vlm bench decode|index|prune|store|memory|query|serve|grounding [OPTIONS]`` is
    ``python -m benchmarks ...`` run from the checkout."""
    import subprocess

    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "cli.py").is_file():
        _err("the benchmarks run from a checkout of the source (git clone, then `make setup`); "
             "this installation has no benchmarks/ folder beside the package")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH"))
                                                       if p))
    raise typer.Exit(subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], env=env))


@app.command()
def demo(
    store: Annotated[str, typer.Option(help="Where to put the demo store.")] = "demo_store",
    text: Annotated[str, typer.Option(help="The question to ask after indexing.")] = "a person riding a bicycle",
) -> None:
    """Index the sample clips that ship offline, then ask when TEXT happens."""
    from ray_vlm.core.samples import sample_videos

    clips = sample_videos()
    typer.echo(f"indexing {len(clips)} sample clips: {', '.join(Path(c).name for c in clips)}")
    index(sources=[str(c) for c in clips], store=store, config=None, as_json=False, s3_endpoint=None)
    query(text=text, store=store, top_k=5, video=None, as_json=False, s3_endpoint=None)


# ------------------------------------------------------------------------------------------ more commands
from ray_vlm.serve.cli import serve as _serve  # noqa: E402 - light module: Ray Serve loads on first use

app.command("serve", help=(_serve.__doc__ or "").strip().split("\n")[0])(_serve)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
