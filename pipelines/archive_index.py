"""The archive indexing job: a Ray Data DAG from input URIs to a committed token store.

    inputs ─► probe (tasks) ─► decode (tasks, isolated decoder process) ─► prune (tasks)
           ─► encode (actor pool; GPU when asked) ─► compress + write shards (tasks) ─► driver commits

``build_stages`` lists the stages: each an operator (``operators/``, Ray-free) with its arguments and the
config's resources; ``pipelines/stages.py`` turns each into its ``map_batches`` call. The driver streams the
write results back, groups them per video and commits each video's chunks as they arrive (time-ranged Lance
commits) every ``commit_interval_s``. A job killed at any moment leaves only rows no commit names; the next run
skips every finished video, resumes a partly committed one from its last committed chunk and redoes the rest,
so nothing is lost and nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray_vlm.core import schema as S
from ray_vlm.core._proc import StopRequested, start_ray
from ray_vlm.core.config import IndexConfig
from ray_vlm.core.errors import RayVlmError
from ray_vlm.pipelines.stages import Stage, map_stages, stage_cpu_totals

# Failure classes worth another attempt on a rerun; every other failure is a property of the file.
RETRYABLE_ERRORS = frozenset({S.ERR_TIMEOUT, S.ERR_CRASHED, S.ERR_INTERNAL, S.ERR_ENCODE})


@dataclass
class Failure:
    uri: str
    error_type: str
    message: str


@dataclass
class IndexSummary:
    """What one indexing run did (the CLI prints it; ``--json`` prints ``to_dict()``)."""

    store: str
    inputs: int = 0
    videos_skipped: int = 0  # already committed by an earlier run
    videos_ok: int = 0
    videos_partial: int = 0
    videos_failed: int = 0
    videos_resumed: int = 0  # partial videos an earlier run committed in part, decoded on from where it stopped
    chunks_decoded: int = 0  # chunks this run decoded and wrote (a resumed video's committed chunks are not redone)
    failures: list[Failure] = field(default_factory=list)
    video_seconds: float = 0.0
    frames_sampled: int = 0
    frames_kept: int = 0
    patches_total: int = 0
    patches_kept: int = 0
    tokens: int = 0
    stored_bytes: int = 0
    wall_s: float = 0.0
    store_version: int = 0
    layout: str = ""
    encoder: str = ""
    interrupted: str = ""  # the signal that stopped the run early ("SIGTERM"); a rerun resumes
    # CPU seconds each stage's calls cost (worker processes, their threads and the children they drive; Ray's
    # own processes and the driver not included), of the results that reached this run.
    stage_cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def video_hours(self) -> float:
        return self.video_seconds / 3600.0

    def to_dict(self) -> dict:
        hours = self.video_hours
        return {
            "store": self.store,
            "store_version": self.store_version,
            "inputs": self.inputs,
            "videos_skipped": self.videos_skipped,
            "videos_ok": self.videos_ok,
            "videos_partial": self.videos_partial,
            "videos_failed": self.videos_failed,
            "videos_resumed": self.videos_resumed,
            "chunks_decoded": self.chunks_decoded,
            "failures": [f.__dict__ for f in self.failures],
            "video_hours": round(hours, 6),
            "frames_sampled": self.frames_sampled,
            "frames_kept": self.frames_kept,
            "patches_total": self.patches_total,
            "patches_kept": self.patches_kept,
            "patch_kept_fraction": (self.patches_kept / self.patches_total) if self.patches_total else None,
            "tokens": self.tokens,
            "stored_bytes": self.stored_bytes,
            "bytes_per_video_hour": (self.stored_bytes / hours) if hours > 0 else None,
            "wall_s": round(self.wall_s, 3),
            "video_seconds_per_wall_second": (self.video_seconds / self.wall_s) if self.wall_s > 0 else None,
            "layout": self.layout,
            "encoder": self.encoder,
            "interrupted": self.interrupted or None,
            "stage_cpu_s": {k: round(v, 3) for k, v in self.stage_cpu_s.items()},
        }


class IndexError_(RayVlmError, RuntimeError):
    """The job as a whole cannot run (bad store, mismatched config); per-video problems never raise."""

    code = "index_job_failed"


# ------------------------------------------------------------------------------------------ stage functions
# Stateless stages run as Ray tasks; they are module-level so Ray can pickle them by reference. Each runs the
# operator named as its Stage's ``declared_by``, whose contract (columns, default resources) it keeps.


def _probe_stage(batch, *, guards, source, storage_options, skip_video_ids, audio=None):
    from ray_vlm.operators.probe import ProbeVideos

    return ProbeVideos(guards, source, storage_options, skip_video_ids, audio=audio)(batch)


def _speech_stage_class():
    """TranscribeSpeech that hands freed memory back after every batch (defined lazily: models load on workers)."""
    from ray_vlm.core._memory import trim
    from ray_vlm.operators.speech import TranscribeSpeech

    class SpeechStage(TranscribeSpeech):
        def __call__(self, batch):
            out = super().__call__(batch)
            trim()
            return out

    return SpeechStage


def _ocr_stage_class():
    """ReadScreenText that hands freed memory back after every batch (defined lazily: models load on workers)."""
    from ray_vlm.core._memory import trim
    from ray_vlm.operators.ocr import ReadScreenText

    class OcrStage(ReadScreenText):
        def __call__(self, batch):
            out = super().__call__(batch)
            trim()
            return out

    return OcrStage


def _prune_stage(batch, *, prune, patch_grid, patch_px=0):
    from ray_vlm.core._memory import trim
    from ray_vlm.operators.prune import PruneFrames

    out = PruneFrames(prune, patch_grid, patch_px)(batch)
    trim()
    return out


def _compress_write_stage(batch, *, compress, store_uri, config_hash, storage_options, generation):
    from ray_vlm.core._memory import trim
    from ray_vlm.operators.compress import CompressTokens
    from ray_vlm.operators.write import WriteShards

    out = WriteShards(store_uri, config_hash, storage_options, generation)(CompressTokens(compress)(batch))
    trim()
    return out


def _encode_stage_class():
    """EncodeFrames that hands freed memory back after every batch (defined lazily: torch loads on workers)."""
    from ray_vlm.core._memory import trim
    from ray_vlm.operators.encode import EncodeFrames

    class EncodeStage(EncodeFrames):
        def __call__(self, batch):
            out = super().__call__(batch)
            trim()
            return out

    return EncodeStage


def local_ray_options(object_store_mb: int | None = None) -> dict[str, Any]:
    """``ray.init`` options for the local Ray a job starts for itself.

    Ray keeps at most one idle worker process per CPU and kills the others after a second. The job's task stages
    reserve fractions of a CPU (probe, prune and write a quarter each, beside one decoder per CPU), so on a small
    machine a stage's worker was killed between its calls and the next call paid a new process and its imports
    (about 1.5 s of CPU each; over a third of a ten-clip job's CPU on 2 cores). Up to four idle workers per CPU
    are kept instead; they exist only as the stages need them.
    """
    cpus = os.cpu_count() or 1
    options: dict[str, Any] = {"_system_config": {"num_workers_soft_limit": max(8, 4 * cpus)}}
    if object_store_mb:
        options["object_store_memory"] = object_store_mb * 2**20
    return options


# A running job checks the automatic compaction policy this often (and once more at its end).
_COMPACT_CHECK_S = 600.0

# Task workers are recycled after this many batches: a bound on whatever a long job leaves in their heaps.
_TASK_MAX_CALLS = 64


# ------------------------------------------------------------------------------------------ the DAG


def build_stages(*, store_uri: str, config: IndexConfig, spec, config_hash: str, storage_options: dict | None,
                 skip_video_ids: frozenset[str], generation: str | None = None,
                 resume: Mapping[str, tuple[int, float, int]] | None = None) -> list[Stage]:
    """The job's stages in order, each an operator with its arguments and the config's resources.

    ``generation`` tags every frame the job writes (one per run; new by default); ``resume`` maps partially
    committed videos to ``(first_chunk, start_s, first_frame_index)``, where their decoding goes on.

    Decode runs as tasks (``decode_videos_task``): a warm task worker keeps its decoder child between jobs,
    where an actor would start a new process per job. Prune and write workers are recycled every
    ``_TASK_MAX_CALLS`` batches; decode's are not (that would stop their decoder children).
    """
    from ray_vlm.operators.compress import CompressTokens
    from ray_vlm.operators.decode import DecodeVideos, decode_videos_task
    from ray_vlm.operators.probe import ProbeVideos
    from ray_vlm.operators.prune import PruneFrames
    from ray_vlm.operators.stage import contract_of
    from ray_vlm.operators.write import WriteShards
    from ray_vlm.store.token_store import new_generation

    generation = generation or new_generation()
    res = config.resources
    decode_res = res.decode.over(DecodeVideos.resources)
    if decode_res.concurrency is None:
        decode_res = decode_res.model_copy(update={"concurrency": _default_decoders(config)})
    keep = config.encoder.aspect == "keep" and spec.patch_px > 0
    any_resolution = (spec.patch_px, config.encoder.max_patches or spec.num_patches) if keep else None
    patch_px = spec.patch_px if keep else 0
    audio = config.audio if config.speech_on else None
    speech = [Stage(_speech_stage_class(), dict(speech=config.speech), res.speech, name="speech")] if audio else []
    ocr = [Stage(_ocr_stage_class(), dict(ocr=config.ocr, storage_options=storage_options), res.ocr, name="ocr")
           ] if config.ocr.enabled else []
    return [
        Stage(_probe_stage, dict(guards=config.guards, source=config.source, storage_options=storage_options,
                                 skip_video_ids=skip_video_ids, audio=audio), res.probe,
              declared_by=ProbeVideos, name="probe"),
        Stage(decode_videos_task, dict(decode=config.decode, guards=config.guards,
                                       frame_size=tuple(spec.input_size), storage_options=storage_options,
                                       resume=dict(resume or {}), any_resolution=any_resolution, audio=audio),
              decode_res, declared_by=DecodeVideos, name="decode"),
        *speech,
        Stage(_prune_stage, dict(prune=config.prune, patch_grid=tuple(spec.patch_grid), patch_px=patch_px), res.prune,
              declared_by=PruneFrames, max_calls=_TASK_MAX_CALLS, name="prune"),
        *ocr,
        Stage(_encode_stage_class(), dict(encoder=config.encoder), res.encode, name="encode"),
        Stage(_compress_write_stage, dict(compress=config.compress, store_uri=store_uri, config_hash=config_hash,
                                          storage_options=storage_options, generation=generation), res.write,
              declared_by=contract_of(CompressTokens).then(WriteShards), max_calls=_TASK_MAX_CALLS,
              name="compress+write"),
    ]


def build_dataset(inputs, *, store_uri: str, config: IndexConfig, spec, config_hash: str,
                  storage_options: dict | None, skip_video_ids: frozenset[str], generation: str | None = None,
                  resume: Mapping[str, tuple[int, float, int]] | None = None):
    """The Ray Data DAG for ``inputs`` (a list of ``InputFile``). Lazy: nothing runs until consumed."""
    import ray.data

    rows = [
        {S.URI: f.uri, S.SIZE_BYTES: int(f.size_bytes), S.MTIME: float(f.mtime), S.REFUSED: f.refused or ""}
        for f in inputs
    ]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000)))
    stages = build_stages(store_uri=store_uri, config=config, spec=spec, config_hash=config_hash,
                          storage_options=storage_options, skip_video_ids=skip_video_ids, generation=generation,
                          resume=resume)
    # Metered: every batch carries what each stage's calls cost in CPU seconds (the job's ``stage_cpu_s``).
    return map_stages(ds, stages, max_retries=config.resources.max_task_retries, meter=True)


def _default_decoders(config: IndexConfig) -> int:
    """Concurrent decode tasks: the CPUs left after the encode (and speech) actors and 0.5 CPU for the task stages.

    Decoders that reserve no CPU (``num_cpus: 0``) are counted as one CPU each: each still keeps one busy.
    """
    import ray

    from ray_vlm.operators.decode import DecodeVideos
    from ray_vlm.operators.encode import EncodeFrames

    res = config.resources
    encode = res.encode.over(EncodeFrames.resources)
    decode = res.decode.over(DecodeVideos.resources)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    encode_cpus = (encode.num_cpus or 0.0) * (encode.concurrency if encode.concurrency is not None else 1)
    if config.speech_on:  # the speech actors hold their CPUs too
        encode_cpus += (res.speech.num_cpus or 0.0) * (res.speech.concurrency or 1)
    per_decoder = decode.num_cpus or 1.0
    return max(1, int((cpus - encode_cpus - 0.5) // per_decoder))


# ------------------------------------------------------------------------------------------ driver


def _count(summary: IndexSummary, video: dict) -> None:
    """Add one committed video row to the run's summary."""
    s = summary
    status = video[S.STATUS]
    if status == S.STATUS_OK:
        s.videos_ok += 1
    elif status == S.STATUS_PARTIAL:
        s.videos_partial += 1
    else:
        s.videos_failed += 1
    if status != S.STATUS_OK:
        s.failures.append(Failure(video[S.URI], video.get(S.ERROR_TYPE) or "", video.get(S.ERROR) or ""))
    dur = video.get(S.DURATION_S)
    if dur is not None and math.isfinite(dur):
        s.video_seconds += float(dur)
    s.frames_sampled += max(0, int(video.get(S.FRAMES_SAMPLED) or 0))
    for attr, col in (("frames_kept", S.FRAMES_KEPT), ("patches_total", S.PATCHES_TOTAL),
                      ("patches_kept", S.PATCHES_KEPT), ("tokens", S.TOKENS), ("stored_bytes", S.STORED_BYTES)):
        setattr(s, attr, getattr(s, attr) + int(video.get(col) or 0))


def index_archive(
    sources: Sequence[str] | str,
    store: str,
    config: IndexConfig | None = None,
    *,
    storage_options: dict | None = None,
    on_progress: Callable[[IndexSummary, int], None] | None = None,
    root: str | None = None,
    stop=None,
    verbose: bool = False,
    address: str | None = None,
) -> IndexSummary:
    """Index videos into a token store; returns what was done.

    Args:
        sources: files, directories, globs or manifest files, local or on any allowed fsspec filesystem.
        store: the token store's URI (a local directory or ``s3://bucket/prefix``).
        config: the job's config (defaults: 1 fps, bundled offline encoder, pruning on).
        storage_options: passed to fsspec for both sources and store (e.g. an S3 endpoint).
        on_progress: called as ``on_progress(summary, videos_to_do)`` after each committed increment and
            whenever results arrive.
        root: when set, inputs resolving outside it are refused (for manifests from untrusted places).
        stop: a ``ray_vlm.core._proc.GracefulStop`` (the CLI's): once it is requested, no more results are taken, the
            complete videos are committed, and the summary says ``interrupted``; the run returns normally and a
            rerun resumes.
        verbose: when this call starts Ray, let Ray log at INFO and forward its workers' output to the driver.
        address: a running Ray to connect to (``auto``, ``host:port``, ``ray://host:10001``) when Ray is not
            initialised yet; None: ``RAY_ADDRESS`` if set, else a local Ray started for the job.

    Ray is started locally if it is not running. Per-video failures are rows in the store, never exceptions.
    """
    # Long: the job's life in order: inputs, skip, start Ray, run and commit, stop on a signal, summary; each step
    # feeds the next.
    import ray

    from ray_vlm.core.fs import expand_sources, resolve
    from ray_vlm.models import get_spec
    from ray_vlm.store.token_store import ChunkLedger, TokenStore, new_generation

    config = config or IndexConfig()
    if isinstance(sources, str):
        sources = [sources]
    t0 = time.perf_counter()
    resolve(store, storage_options)  # the store URI obeys the same policy as inputs
    spec = get_spec(config.encoder.id)
    config_hash = config.output_hash(spec.revision)
    token_store = TokenStore(store, storage_options)
    summary = IndexSummary(store=store, layout=config.compress.layout, encoder=spec.id)

    manifest = token_store.manifest()
    hashes = {rec["config_hash"] for rec in manifest["videos"].values()}
    if hashes - {config_hash}:
        raise IndexError_(
            f"store {store} was built with another configuration (config hash {sorted(hashes)}, this run "
            f"{config_hash}: encoder, sampling, pruning, token layout, speech or OCR settings differ); index into a "
            "new store"
        )

    inputs = expand_sources(list(sources), config.source, storage_options, root=root)
    summary.inputs = len(inputs)
    done = {  # committed videos a rerun does not redo: all but failures worth another attempt, and partial ones
        vid: rec for vid, rec in manifest["videos"].items()
        if not (rec["status"] == S.STATUS_FAILED and rec.get("error_type") in RETRYABLE_ERRORS)
        and not _resumable(rec)
    }
    partial = {vid: rec for vid, rec in manifest["videos"].items() if _resumable(rec)}
    resume = {vid: (int(rec["chunks_committed"]), float(rec["resume_s"]), int(rec["next_frame_index"] or 0))
              for vid, rec in partial.items()}
    fast = {(rec["uri"], rec["size_bytes"], _mt(rec["mtime"])) for rec in done.values()}
    todo = [f for f in inputs if (f.uri, f.size_bytes, _mt(f.mtime)) not in fast]
    skip_ids = frozenset(done)
    summary.videos_skipped = len(inputs) - len(todo)
    partial_uris = {rec["uri"] for rec in partial.values()}
    summary.videos_resumed = sum(1 for f in todo if f.uri in partial_uris)

    if todo and stop is not None and stop.requested:
        summary.interrupted = stop.signal_name
        todo = []
    if todo and not ray.is_initialized():
        store_mb = config.resources.local_object_store_mb
        init_kwargs: dict[str, Any] = dict(
            logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose)
        if address is not None:
            init_kwargs["address"] = address  # a running cluster sizes its own object store and worker pool
        else:
            init_kwargs.update(local_ray_options(store_mb))
        if stop is None:
            ray.init(**init_kwargs)
        else:
            try:
                start_ray(stop, **init_kwargs)  # ray.init's own SIGTERM handlers replaced by the stop's
            except StopRequested:
                summary.interrupted = stop.signal_name
                todo = []
    if todo:
        logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = verbose
        if config.resources.object_store_memory_mb:
            ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
                object_store_memory=config.resources.object_store_memory_mb * 2**20)
        if config.resources.object_store_pressure_fraction:
            ctx.object_store_memory_pressure_fraction = config.resources.object_store_pressure_fraction
        if config.resources.max_block_mb:
            ctx.target_max_block_size = config.resources.max_block_mb * 2**20
        token_store.create()
        ds = build_dataset(
            todo, store_uri=store, config=config, spec=spec, config_hash=config_hash,
            storage_options=storage_options, skip_video_ids=skip_ids, generation=new_generation(), resume=resume,
        )
        ledger = ChunkLedger(partial)
        seen: set[str] = set()

        def commit() -> None:
            result = ledger.commit(token_store)
            if result is None:
                return
            committed = set(result.committed_video_ids)
            for row in token_store.read_videos(result.version, video_ids=committed).to_pylist():
                seen.add(row[S.URI])
                if row[S.STATUS] != S.STATUS_PARTIAL or row.get(S.ERROR_TYPE):
                    _count(summary, row)  # a finished video (a partial one counts once it is done)
            summary.store_version = result.version

        lock = threading.Lock()  # the ledger and the summary: this loop adds, the committer thread commits
        last_compact = time.monotonic()

        def every_interval() -> None:
            nonlocal last_compact
            with lock:
                commit()
                if config.auto_compact and time.monotonic() - last_compact >= _COMPACT_CHECK_S:
                    token_store.maybe_compact(config.compact_retention_s)  # a long job's small fragments
                    last_compact = time.monotonic()
                summary.wall_s = time.perf_counter() - t0
                if on_progress:
                    on_progress(summary, len(todo))

        # Commits run on their own clock: chunks that arrived are committed within commit_interval_s even while
        # the pipeline has nothing more to hand over (a decoder stuck on its next chunk holds back no earlier one).
        committer = _Every(config.commit_interval_s, every_interval)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
        try:
            while True:
                committer.raise_error()
                try:
                    with stop.interruptible() if stop is not None else contextlib.nullcontext():
                        batch = next(batches, None)  # a stop request leaves this wait at once
                except StopRequested:
                    batch = None
                if batch is not None:
                    with lock:
                        ledger.add(batch)  # results that arrived are kept: committed as gap-free runs of chunks
                        summary.chunks_decoded += len(batch[S.VIDEO_ID])
                        for stage, cpu_s in stage_cpu_totals(batch).items():
                            summary.stage_cpu_s[stage] = summary.stage_cpu_s.get(stage, 0.0) + cpu_s
                if stop is not None and stop.requested:
                    summary.interrupted = stop.signal_name
                    break
                if batch is None:
                    break
        finally:
            committer.stop()  # a commit under way finishes first
            if summary.interrupted:  # stop Ray Data's executor now; complete videos are still committed below
                close = getattr(batches, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
            commit()
        committer.raise_error()
        if ledger.pending() and not summary.interrupted:
            raise IndexError_(f"internal: chunks of {sorted(ledger.pending())} never completed")
        # Inputs that the probe found committed already (same content under another name) count as skipped.
        if not summary.interrupted:
            summary.videos_skipped += sum(1 for f in todo if f.uri not in seen)
        if config.auto_compact and not summary.interrupted:
            token_store.maybe_compact(config.compact_retention_s)
    summary.wall_s = time.perf_counter() - t0
    summary.store_version = token_store.latest_version()
    if on_progress:
        on_progress(summary, len(todo))
    return summary


class _Every:
    """Calls ``fn`` every ``interval_s`` on a daemon thread until ``stop``; the first exception ends the calls and
    is raised again by ``raise_error`` (on the caller's thread)."""

    def __init__(self, interval_s: float, fn: Callable[[], None]) -> None:
        self._interval, self._fn = max(float(interval_s), 0.05), fn
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ray-vlm-committer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
                return

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _resumable(rec: dict) -> bool:
    """A partial source whose committed chunks a rerun goes on from (not a video that ended partial)."""
    return (rec["status"] == S.STATUS_PARTIAL and not rec.get("error_type") and bool(rec.get("chunks_committed"))
            and rec.get("resume_s") is not None)


def _mt(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return round(x, 3) if math.isfinite(x) else None


