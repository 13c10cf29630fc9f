"""Batch grounding as a Ray Data job: many queries over a whole library, moments written as Parquet.

    queries (rows) ─► GroundQueries (actor pool: each actor holds a loaded Searcher of one store version)
                   ─► one row per (query, moment) ─► Parquet (local directory or s3://)

Use it to tag an archive with a list of events (``ray-vlm ground-batch QUERIES.txt --store DST --out RESULTS``)
or compose it from Python: ``ground_batch(queries, store)`` returns a lazy ``ray.data.Dataset`` of result rows
that can feed further ``map_batches`` / ``filter`` / ``write_*`` stages; give ``out`` to write Parquet too.

Every query ends as at least one row: its moments (``rank`` 1..top_k), or one row with ``error_type`` set (a
query the service cannot answer: empty, oversized; ``no_moments`` when nothing was found). A bad query never
fails the job. Every actor answers from the same store version (pinned on the driver), so a store that is
being indexed meanwhile gives a consistent answer set; ``store_version`` says which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from ray_vlm.core import schema as S
from ray_vlm.core.config import StageResources
from ray_vlm.core.errors import RayVlmError
from ray_vlm.core.schema import (  # the result columns and error codes
    END_S,
    ERR_BAD_QUERY,
    ERR_NO_MOMENTS,
    PEAK_S,
    QUERY,
    QUERY_ID,
    RANK,
    SCORE,
    START_S,
    STORE_VERSION,
)
from ray_vlm.core.schema import GROUND_RESULTS_SCHEMA as RESULTS_SCHEMA
from ray_vlm.pipelines.stages import Stage, map_stage


class GroundBatchError(RayVlmError, ValueError):
    """The job cannot run as asked (no queries, unreadable query file, empty store, existing output)."""

    code = "ground_batch_invalid"


# ------------------------------------------------------------------------------------------ queries


def parse_queries(text: str) -> list[tuple[int, str]]:
    """``(line number, query)`` of a queries file: one query per line; blank lines and ``#`` comments skipped.

    The query text is kept as written (stripped); validating it is the grounding stage's job, so a bad query
    becomes an error row with its line number instead of stopping the job.
    """
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append((n, s))
    return out


def read_queries(uri: str, storage_options: dict | None = None) -> list[tuple[int, str]]:
    """Read and parse a queries file (local path or any URI ``ray_vlm.core.fs`` allows).

    Raises:
        GroundBatchError: missing, unreadable or not UTF-8 text.
    """
    from ray_vlm.core.fs import read_small_file

    raw = read_small_file(uri, storage_options, what="queries file", error=GroundBatchError)
    try:
        return parse_queries(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise GroundBatchError(f"queries file {uri} is not UTF-8 text ({e.reason} at byte {e.start})") from None


# ------------------------------------------------------------------------------------------ the stage


class GroundQueries:
    """Ray Data stage (actor class): a batch of queries in, their ranked moments out.

    Holds one loaded ``Searcher`` (encoder, decoded tokens, calibration, window index) for its lifetime, so
    every batch costs only encoding and grounding.

    Input columns: ``query`` (str) and optionally ``query_id`` (int). Output: a pyarrow Table in
    ``RESULTS_SCHEMA``, rows in input order, ``top_k`` rows per query at most (one row for a query that failed).
    """

    reads = (QUERY,)
    adds = tuple(RESULTS_SCHEMA.names)
    # one actor holds the Searcher (encoder, cached tokens); queries of a batch are encoded together
    resources = StageResources(num_cpus=1.0, num_gpus=0.0, concurrency=1, batch_size=32)

    def __init__(self, store: str, *, version: int | None = None, storage_options: dict | None = None,
                 top_k: int = 5, video: str | None = None, method: str = "fused", params=None, retrieval=None,
                 encoder=None):
        from ray_vlm.query.searcher import Searcher, method_params

        gp = method_params(method, params)
        if gp is None:
            raise GroundBatchError(f"method {method!r} is a baseline, not a grounding method")
        self.searcher = Searcher(store, storage_options=storage_options, params=gp, retrieval=retrieval,
                                 version=version, encoder=encoder)
        self.top_k = int(top_k)
        self.video = video

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from ray_vlm.query.searcher import QueryError, check_query

        S.require_columns(batch, self.reads, "GroundQueries")

        texts = [str(x) for x in batch[QUERY]]
        raw_ids = batch.get(QUERY_ID)
        ids = [None if raw_ids is None or raw_ids[i] is None else int(raw_ids[i]) for i in range(len(texts))]
        rows: list[list[dict]] = [[] for _ in texts]
        good: list[int] = []
        cleaned: list[str] = []
        for i, t in enumerate(texts):
            try:
                cleaned.append(check_query(t))
                good.append(i)
            except QueryError as e:
                rows[i] = [self._error_row(ids[i], t, ERR_BAD_QUERY, str(e))]
        if good:
            answers: Sequence[list | Exception]
            try:
                answers = self._answer(cleaned)
            except Exception:  # noqa: BLE001  (isolate: one query at a time finds the one that fails)
                isolated: list[list | Exception] = []
                for c in cleaned:
                    try:
                        isolated.append(self._answer([c])[0])
                    except QueryError as e:
                        isolated.append(e)
                    except Exception as e:  # noqa: BLE001  (an error is a row, never a failed job)
                        isolated.append(RuntimeError(f"{type(e).__name__}: {e}"))
                answers = isolated
            for i, ans in zip(good, answers):
                if isinstance(ans, QueryError):
                    rows[i] = [self._error_row(ids[i], texts[i], ERR_BAD_QUERY, str(ans))]
                elif isinstance(ans, Exception):
                    rows[i] = [self._error_row(ids[i], texts[i], S.ERR_INTERNAL, str(ans))]
                elif not ans:
                    rows[i] = [self._error_row(ids[i], texts[i], ERR_NO_MOMENTS,
                                               "no moment found (no indexed frames to ground in)")]
                else:
                    rows[i] = [self._moment_row(ids[i], texts[i], r, m) for r, m in enumerate(ans, start=1)]
        return pa.Table.from_pylist([r for rs in rows for r in rs], schema=RESULTS_SCHEMA)

    def _answer(self, texts: list[str]) -> list[list]:
        s = self.searcher
        if self.video is not None:
            s.resolve_video(self.video)
        if not s.encoder_id:  # a store whose videos all failed: no frames, no encoder to query with
            return [[] for _ in texts]
        return s.search_vectors(s.encode(texts), top_k=self.top_k, video=self.video)

    def _moment_row(self, qid, text, rank: int, m) -> dict:
        return {QUERY_ID: qid, QUERY: text, RANK: rank, S.VIDEO_ID: m.video_id, S.URI: m.uri,
                START_S: float(m.start_s), END_S: float(m.end_s), SCORE: float(m.score), PEAK_S: float(m.peak_s),
                STORE_VERSION: self.searcher.version, S.ERROR_TYPE: None, S.ERROR: None}

    def _error_row(self, qid, text, error_type: str, message: str) -> dict:
        return {QUERY_ID: qid, QUERY: text, RANK: None, S.VIDEO_ID: None, S.URI: None, START_S: None,
                END_S: None, SCORE: None, PEAK_S: None, STORE_VERSION: self.searcher.version,
                S.ERROR_TYPE: error_type, S.ERROR: message[:500]}


# ------------------------------------------------------------------------------------------ the job


def ground_batch(queries, store: str, out: str | None = None, *, top_k: int = 5, video: str | None = None,
                 method: str = "fused", storage_options: dict | None = None, concurrency: int = 1,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, batch_size: int = 32, overwrite: bool = False,
                 params=None, retrieval=None, encoder=None):
    """Ground many queries over a store as a Ray Data job.

    Args:
        queries: query texts (``query_id`` = position, from 0), ``(query_id, text)`` pairs, or a
            ``ray.data.Dataset`` with a ``query`` column (and optionally ``query_id``).
        store: token store URI.
        out: write the result rows as Parquet files into this directory (local or ``s3://``); the returned
            Dataset is then the materialized result (written once, read back free).
        top_k: moments per query (library-wide ranking).
        video: only this video (video_id or file name stem).
        method: grounding channels: "fused" (default), "content", "global" or "context".
        storage_options: fsspec options of the store and of ``out``.
        concurrency: actors in the pool (each loads the encoder and caches the store's tokens).
        num_cpus, num_gpus: per actor.
        batch_size: queries per batch (encoded together).
        overwrite: replace an existing non-empty ``out``.
        params, retrieval: ``GroundingParams`` / ``RetrievalParams`` of the Searchers.
        encoder: a loaded query encoder of the store's space, shipped to every actor (default: each actor loads
            the store's own encoder).

    Returns:
        A Dataset of rows in ``RESULTS_SCHEMA`` (lazy when ``out`` is None).

    Raises:
        GroundBatchError: no queries, empty or unreadable store, bad method, ``out`` exists (without overwrite).
    """
    import ray
    import ray.data

    from ray_vlm.query.searcher import QueryError, Searcher, method_params

    if int(top_k) < 1:
        raise GroundBatchError("top_k must be at least 1")
    try:
        if method_params(method, params) is None:
            raise GroundBatchError(f"method {method!r} is a baseline; use fused, content, global or context")
        pinned = Searcher(store, storage_options=storage_options)  # reads the manifest only
        if not pinned.videos():
            raise GroundBatchError(f"the store {store} holds no videos (v{pinned.version})")
        if video is not None:
            pinned.resolve_video(video)
    except QueryError as e:
        raise GroundBatchError(str(e)) from None
    version = pinned.version
    if out is not None:
        _check_out(out, storage_options, overwrite)

    if not ray.is_initialized():
        ray.init(logging_level=logging.ERROR, log_to_driver=False)
    if isinstance(queries, ray.data.Dataset):
        ds = queries
    else:
        items = []
        for i, q in enumerate(queries):
            qid, text = q if isinstance(q, tuple) else (i, q)
            items.append({QUERY_ID: int(qid), QUERY: str(text)})
        if not items:
            raise GroundBatchError("no queries to ground")
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(batch_size, 1) + 1, 64)))
    ds = map_stage(ds, Stage(
        GroundQueries,
        kwargs=dict(store=store, version=version, storage_options=storage_options, top_k=top_k, video=video,
                    method=method, params=params, retrieval=retrieval, encoder=encoder),
        resources=StageResources(concurrency=max(1, int(concurrency)), num_cpus=num_cpus, num_gpus=num_gpus or 0.0,
                                 batch_size=batch_size)))
    if out is None:
        return ds
    ds = ds.materialize()
    from ray_vlm.core.files import arrow_resolve

    fs, path = arrow_resolve(out, storage_options)
    from ray.data import SaveMode

    ds.write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE if overwrite else SaveMode.APPEND)
    return ds


def _check_out(out: str, storage_options: dict | None, overwrite: bool) -> None:
    from ray_vlm.core.fs import PolicyError, resolve

    try:
        fs, path = resolve(str(out), storage_options)
    except PolicyError as e:
        raise GroundBatchError(str(e)) from None
    try:
        exists = fs.exists(path)
        if exists and not fs.isdir(path):
            raise GroundBatchError(f"--out {out} is a file; give a directory")
        if exists and fs.ls(path) and not overwrite:
            raise GroundBatchError(f"--out {out} exists and is not empty; give a new directory or --overwrite")
    except OSError as e:
        raise GroundBatchError(f"cannot use --out {out}: {e}") from None


# ------------------------------------------------------------------------------------------ summary


@dataclass
class BatchSummary:
    """What a batch-grounding run produced (the CLI prints it; ``--json`` prints ``to_dict()``)."""

    store: str
    out: str | None
    store_version: int = 0
    queries: int = 0
    queries_answered: int = 0
    queries_failed: int = 0
    rows: int = 0
    videos_hit: int = 0
    wall_s: float = 0.0
    failures: list[dict] = field(default_factory=list)  # {query_id, query, error_type, error}

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(table: pa.Table, *, store: str, out: str | None, wall_s: float = 0.0) -> BatchSummary:
    """Summary of a result table (``RESULTS_SCHEMA`` rows of one run)."""
    d = table.select([QUERY_ID, QUERY, RANK, S.VIDEO_ID, STORE_VERSION, S.ERROR_TYPE, S.ERROR]).to_pylist()
    s = BatchSummary(store=store, out=out, wall_s=round(wall_s, 3), rows=sum(1 for r in d if r[RANK] is not None))
    answered, failed = set(), {}
    for r in d:
        key = (r[QUERY_ID], r[QUERY])
        if r[S.ERROR_TYPE] is None:
            answered.add(key)
        else:
            failed[key] = r
    s.queries = len(answered | set(failed))
    s.queries_answered = len(answered)
    s.queries_failed = len(failed)
    s.videos_hit = len({r[S.VIDEO_ID] for r in d if r[S.VIDEO_ID] is not None})
    s.store_version = max((r[STORE_VERSION] or 0 for r in d), default=0)
    s.failures = sorted(({"query_id": r[QUERY_ID], "query": r[QUERY], "error_type": r[S.ERROR_TYPE],
                          "error": r[S.ERROR]} for r in failed.values()),
                        key=lambda f: (f["query_id"] is None, f["query_id"] or 0))
    return s


def run(queries_uri: str, store: str, out: str, **kwargs) -> BatchSummary:
    """Read a queries file, ground every query, write Parquet to ``out``; the run's summary."""
    storage_options = kwargs.get("storage_options")
    t0 = time.perf_counter()
    queries = read_queries(queries_uri, storage_options)
    if not queries:
        raise GroundBatchError(f"{queries_uri} holds no query (blank lines and # comments are skipped)")
    ds = ground_batch(queries, store, out, **kwargs)
    table = pa.concat_tables(ray_tables(ds)) if ds is not None else RESULTS_SCHEMA.empty_table()
    return summarize(table, store=store, out=out, wall_s=time.perf_counter() - t0)


def ray_tables(ds) -> list[pa.Table]:
    """The Dataset's blocks as pyarrow Tables in ``RESULTS_SCHEMA`` (an empty table when there are none)."""
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
              for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    tables = [t.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA) for t in tables if t.num_rows]
    return tables or [RESULTS_SCHEMA.empty_table()]
