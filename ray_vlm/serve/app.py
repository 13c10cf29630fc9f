"""The Ray Serve application: ingress (FastAPI) -> Grounder (or QueryEncoder -> Retriever -> Grounder) -> QA.

``build_app(args)`` is the ``import_path`` target of a serve config YAML (``clusters/serve-app.yaml``)::

    ray_vlm.serve.app:build_app      args: {store: s3://bucket/store, token_env: RAY_VLM_TOKEN, ...}

Deployments (one ``ray_vlm.query.searcher.Searcher`` of the store in each that needs one):

- ``QueryEncoder``: query text -> embedding (the store's own text encoder), micro-batched with ``@serve.batch``.
- ``Retriever``: embedding -> ``Candidates`` (spans of videos of one committed store version). A background
  thread polls the store's latest version every ``refresh_interval_s`` and swaps to a newer committed version without
  a restart: newly indexed videos appear, searches in flight finish on the version they started on.
- ``Grounder``: (embedding, candidates) -> ranked moments, ``@serve.batch``-ed, GPU replicas when
  ``grounder_num_gpus`` > 0. Candidates name their store version, so a grounder serves any version. It also
  keeps its own copy of the store's index (polled like the Retriever's), so with ``fused_search`` (the
  default) a search is one handle call: the Grounder encodes, retrieves and grounds a whole ``@serve.batch``
  of queries in its replica. Each handle call costs a few milliseconds of Serve routing, which is most of
  what HTTP adds to a search; ``fused_search=False`` makes the three calls instead (encoder and retriever
  replicas then scale apart from the grounder's).
- ``QA``: question + the best moments (+ their frames when a VLM is configured) -> streamed answer text
  (``ray_vlm.query.qa``). With no VLM it streams the grounded evidence only, labelled as such; it never invents.
- ``Ingress``: the HTTP API (see ``Ingress``), bearer-token auth, the web page under ``/``.

Overload and faults: every deployment has bounded queues (``max_ongoing_requests``, ``max_queued_requests``).
A full ingress queue is answered 503 by Serve's proxy; a full downstream queue raises ``BackPressureError`` in
the ingress, answered 503 as well; a downstream call slower than ``timeout_s`` is answered 408; a replica that
died (killed, failed health check) is answered 503 until Serve has replaced it. A user's mistake is a 4xx with
a message, never a 500.

Errors: an error's status comes from one table, ``ray_vlm.core.errors.HTTP_STATUS``, by the stable code of the
condition (a ``RayVlmError``'s ``code``, or one of the service's own: ``timeout``, ``overloaded``...);
``_http_error`` is the one mapping of exceptions, and the JSON error body carries the code:
``{"detail": ..., "code": ...}``. (Not coded: a missing page asset, 404, and an unsatisfiable range, 416.)
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures of the Serve ingress class at
# runtime, and string annotations lose the names they refer to there.
import asyncio
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any, cast

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictInt, StrictStr, field_validator
from ray import serve

from ray_vlm.core.errors import INTERNAL, RayVlmError, http_status
from ray_vlm.media.frames import MediaError
from ray_vlm.query.searcher import (
    MAX_QUERY_CHARS,
    Candidates,
    Moment,
    QueryError,
    Searcher,
    check_query,
    parse_tracks,
)
from ray_vlm.query.tracks import TRACK_VISUAL
from ray_vlm.serve import guard as _guard  # imported by name in the replica (its state is per process)

log = logging.getLogger("ray_vlm.serve")

APP_NAME = "ray-vlm"
MAX_BODY_BYTES = 64 << 10  # a request body's default limit (a search body is well under 1 KiB)
MAX_TOP_K = 100
MAX_RANGE_BYTES = 4 << 20  # bytes per 206 response at most (browsers ask again for the rest)
_FILE_CHUNK_BYTES = 1 << 20
_STATIC = ("index.html", "app.js", "style.css")
_VIDEO_ID_RE = r"^[A-Za-z0-9._-]{1,128}$"


# ================================================================ typed args


class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` block of a serve config YAML).

    Attributes:
        store: token store URI (a directory or ``s3://bucket/prefix``).
        storage_options: fsspec options of the store (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        media_storage_options: fsspec options for the source videos (thumbnails, file, QA frames); default: the
            store's.
        token: bearer token the API requires (never logged). When unset, ``token_env`` names an environment
            variable read by the ingress replica (how a cluster passes a secret: ``runtime_env`` or a
            Kubernetes secret). Neither set: no auth (keep the service on 127.0.0.1 then).
        token_env: environment variable holding the token.
        require_token: refuse to start without a token (set it for anything reachable from a network).
        qa_model: VLM for ``/v1/ask`` (Hugging Face id in the local cache, or a local path); None answers with
            the grounded evidence only.
        qa_options: keyword arguments of ``ray_vlm.query.qa.load_answerer`` (``max_new_tokens``, ``device``...).
        qa_frames_per_moment: frames read per moment for the VLM (spread from its start to its end).
        num_cpus: CPUs reserved per replica of each deployment (fractions are fine).
        grounder_num_gpus / qa_num_gpus: GPUs per grounder / QA replica (0: CPU).
        *_replicas: replica counts.
        max_ongoing_requests: concurrent requests per ingress replica; downstream deployments get the same.
        max_queued_requests: requests waiting per deployment beyond that; more are answered 503.
        timeout_s: limit of each downstream call made by the ingress (408 when exceeded).
        refresh_interval_s: how often the retriever and grounder poll the store for a newer committed version.
        grounder_batch_size / grounder_batch_wait_s: ``@serve.batch`` of the grounder (also ``user_config``).
            A wait of 0 batches opportunistically: a lone request goes at once, and requests that arrive while a
            batch is being grounded form the next batch (no added latency at low load).
        health_check_period_s: Serve health-check period of every deployment.
        graceful_shutdown_timeout_s: how long a stopping replica waits for its in-flight requests.
        fused_search: a search is one call to the Grounder, which encodes, retrieves and grounds in its replica;
            False: the ingress calls QueryEncoder, Retriever and Grounder in turn (three handle calls).
        access_log: Serve's per-request log line in every replica (method, path, status, latency; never headers).
        max_top_k: largest ``top_k`` accepted.
        max_body_bytes: largest request body (413 beyond it, before the body is parsed; see ``guard``).
        host: the address Serve's proxy binds (it is allow-listed as a ``Host``).
        allowed_hosts: the ``Host`` names accepted (421 otherwise); None: ``host``, ``localhost``, 127.0.0.1 and
            ::1. Behind a reverse proxy or on a cluster, list the names clients use; ``["*"]`` accepts any.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str
    storage_options: dict[str, Any] | None = None
    media_storage_options: dict[str, Any] | None = None
    token: SecretStr | None = None
    token_env: str | None = "RAY_VLM_TOKEN"
    require_token: bool = False
    qa_model: str | None = None
    qa_options: dict[str, Any] = Field(default_factory=dict)
    qa_frames_per_moment: int = Field(2, ge=1, le=16)
    num_cpus: float = Field(0.25, ge=0)
    grounder_num_gpus: float = Field(0.0, ge=0)
    qa_num_gpus: float = Field(0.0, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    encoder_replicas: int = Field(1, ge=1)
    retriever_replicas: int = Field(1, ge=1)
    grounder_replicas: int = Field(1, ge=1)
    qa_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(32, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    refresh_interval_s: float = Field(2.0, gt=0)
    grounder_batch_size: int = Field(8, ge=1)
    grounder_batch_wait_s: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(5.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    fused_search: bool = True
    access_log: bool = True
    max_top_k: int = Field(MAX_TOP_K, ge=1, le=1000)
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, le=1 << 30)
    host: str = "127.0.0.1"
    allowed_hosts: list[str] | None = None

    @field_validator("store")
    @classmethod
    def _store_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must name a token store URI")
        return v

    def resolved_token(self) -> str | None:
        """The token the API requires: ``token``, else the ``token_env`` variable, else None (no auth)."""
        if self.token is not None and self.token.get_secret_value():
            return self.token.get_secret_value()
        if self.token_env:
            return os.environ.get(self.token_env) or None
        return None

    def guard_config(self) -> "_guard.GuardConfig":
        hosts = (frozenset(h.strip().lower().strip("[]") for h in self.allowed_hosts) if self.allowed_hosts
                 else _guard.default_allowed_hosts(self.host))
        return _guard.GuardConfig(token=self.resolved_token(), max_body_bytes=self.max_body_bytes,
                                  allowed_hosts=hosts)

    def media_options(self) -> dict | None:
        return self.media_storage_options if self.media_storage_options is not None else self.storage_options


# ================================================================ HTTP models (they make the OpenAPI spec)


class SearchRequest(BaseModel):
    """``POST /v1/search``: when does ``query`` happen (in the library, or in one ``video``)?"""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(min_length=1, max_length=MAX_QUERY_CHARS, examples=["a person riding a bicycle"])
    top_k: StrictInt = Field(5, ge=1, le=MAX_TOP_K)
    video: StrictStr | None = Field(None, max_length=512, description="a video_id or a file name stem")
    tracks: StrictStr = Field("all", max_length=64, description="all, or visual, speech, text (comma-separated)")


class GroundRequest(BaseModel):
    """``POST /v1/videos/{video_id}/ground``: when does ``query`` happen in this video?"""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    top_k: StrictInt = Field(5, ge=1, le=MAX_TOP_K)


class AskRequest(BaseModel):
    """``POST /v1/ask``: a question answered from the best moments of the library (streamed)."""

    model_config = ConfigDict(extra="forbid")
    question: StrictStr = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    top_k: StrictInt = Field(4, ge=1, le=20, description="moments given to the answerer as evidence")
    video: StrictStr | None = Field(None, max_length=512)


class EvidenceOut(BaseModel):
    """What a text track found at a moment: the words spoken (``speech``) or the text on screen (``text``)."""

    track: str
    start_s: float
    end_s: float
    text: str


class MomentOut(BaseModel):
    """One moment, the fields of ``ray-vlm query --json``: ``[start_s, end_s)`` of a video, calibrated score."""

    video_id: str
    uri: str
    start_s: float
    end_s: float
    score: float
    peak_s: float
    z: float = 0.0
    tracks: list[str] = ["visual"]
    evidence: list[EvidenceOut] = []


class SearchResponse(BaseModel):
    query: str
    store_version: int
    moments: list[MomentOut]


class VideoOut(BaseModel):
    video_id: str
    uri: str
    status: str
    duration_s: float | None = None
    frames: int | None = None


class VideosResponse(BaseModel):
    store_version: int
    videos: list[VideoOut]


class Health(BaseModel):
    status: str
    store_version: int | None = None
    videos: int | None = None
    detail: str | None = None


class ErrorOut(BaseModel):
    detail: str
    code: str | None = Field(None, description="the stable code of the condition (see the README's table)")


# OpenAPI ``responses`` of the routes
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
    408: {"model": ErrorOut, "description": "timed out"},
    503: {"model": ErrorOut, "description": "overloaded or a replica is restarting; retry later"}}
_BAD_INPUT: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "a query the service cannot answer as asked"},
    422: {"description": "the request does not match the schema"}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "no such video"}}


# ================================================================ deployments


def _searcher(args: ServeArgs) -> Searcher:
    return Searcher(args.store, storage_options=args.storage_options)


class _Poller:
    """Calls ``searcher.refresh()`` every ``interval_s`` in a daemon thread; remembers the last error."""

    def __init__(self, searcher: Searcher, interval_s: float):
        self.searcher = searcher
        self.interval_s = float(interval_s)
        self.error: str | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> bool:
        try:
            changed = self.searcher.refresh()
        except Exception as e:  # noqa: BLE001 - the store is unreachable or a version unreadable: keep serving the old version
            self.failures += 1
            self.error = f"{type(e).__name__}: {e}"
            log.warning("store refresh failed (%d in a row): %s", self.failures, self.error)
            return False
        self.failures, self.error = 0, None
        if changed:
            log.info("now serving store version %d", self.searcher.version)
        return changed

    def stop(self) -> None:
        self._stop.set()


@serve.deployment
class QueryEncoder:
    """Query text -> float32 (D,) embedding with the store's own text encoder (micro-batched)."""

    def __init__(self, args: ServeArgs):
        self._searcher = _searcher(args)
        if self._searcher.encoder_id:
            _ = self._searcher.encoder  # load the model now: the replica is ready only once it can answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # opportunistic: see grounder_batch_wait_s
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Texts (already checked by the ingress) -> one (D,) float32 vector each."""
        if not self._searcher.encoder_id:
            await asyncio.to_thread(self._searcher.refresh)
        vecs = await asyncio.to_thread(self._searcher.encode, list(texts))
        return list(vecs)


@serve.deployment
class Retriever:
    """Embedding -> ``Candidates``; serves the newest committed store version (polled, no restart)."""

    def __init__(self, args: ServeArgs):
        self._searcher = _searcher(args)
        self._poller = _Poller(self._searcher, args.refresh_interval_s)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``refresh_interval_s`` (float)."""
        if "refresh_interval_s" in user_config:
            self._poller.interval_s = float(user_config["refresh_interval_s"])

    def check_health(self) -> None:
        # An unreadable store for a while is unhealthy: Serve replaces the replica (and keeps answering 503
        # while a new one cannot start), instead of serving a stale version forever without saying so.
        if self._poller.failures >= 5:
            raise RuntimeError(f"the store has been unreadable for {self._poller.failures} polls: "
                               f"{self._poller.error}")

    async def retrieve(self, query: np.ndarray, top_k: int, video: str | None = None) -> Candidates:
        """Candidates of one (D,) query (``video``: only that video, whole; the ingress resolved it)."""
        q = np.asarray(query, dtype=np.float32)[None]
        got = await asyncio.to_thread(self._searcher.retrieve, q, top_k=int(top_k), video=video)
        return got[0]

    async def resolve(self, video: str) -> list[str]:
        """Video ids matching an id or file name stem ([] when none: a user's mistake, not a replica error)."""
        try:
            return self._searcher.resolve_video(video)
        except QueryError:
            return []

    async def videos(self) -> dict:
        return {"store_version": self._searcher.version, "videos": self._searcher.videos()}

    async def video(self, video_id: str) -> dict | None:
        """The video row of ``video_id`` (an exact id), or None."""
        for r in self._searcher.videos():
            if r["video_id"] == video_id:
                return r
        return None

    async def status(self) -> dict:
        return {"store_version": self._searcher.version, "videos": self._searcher.num_videos,
                "refresh_error": self._poller.error}

    async def refresh(self) -> bool:
        """Poll the store now (tests and operators; the poller does it every ``refresh_interval_s``)."""
        return await asyncio.to_thread(self._poller.poll)

    def __del__(self):
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.stop()


@serve.deployment
class Grounder:
    """(embedding, candidates, top_k) -> ranked moments; requests are grounded in batches (``@serve.batch``)."""

    def __init__(self, args: ServeArgs):
        self._searcher = _searcher(args)
        if self._searcher.encoder_id:
            _ = self._searcher.encoder  # calibration embeds the reference queries once
        self._poller = _Poller(self._searcher, args.refresh_interval_s)
        batched: tuple[Any, ...] = (self.ground, self.search)  # @serve.batch methods: set_max_batch_size ...
        for method in batched:
            method.set_max_batch_size(args.grounder_batch_size)
            method.set_batch_wait_timeout_s(args.grounder_batch_wait_s)
        self.batch_sizes: list[int] = []

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``max_batch_size`` (int), ``batch_wait_timeout_s`` (float), ``refresh_interval_s``."""
        batched: tuple[Any, ...] = (self.ground, self.search)  # @serve.batch methods: set_max_batch_size ...
        for method in batched:
            if "max_batch_size" in user_config:
                method.set_max_batch_size(int(user_config["max_batch_size"]))
            if "batch_wait_timeout_s" in user_config:
                method.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "refresh_interval_s" in user_config:
            self._poller.interval_s = float(user_config["refresh_interval_s"])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def search(self, items: list[tuple[str, int, str | None, str]]) -> list[tuple[int, list[Moment]]]:
        """Each item: (query text, top_k, video_id or None, tracks) -> (store version, up to top_k moments best
        first: the visual moments fused with the speech and on-screen text tracks').

        The fused path: the batch is encoded, retrieved and grounded here, in one handle call from the ingress
        (which checked the texts and resolved the video already).
        """
        self.batch_sizes = (self.batch_sizes + [len(items)])[-1000:]
        return await asyncio.to_thread(self._search_batch, items)

    def _search_batch(self, items) -> list[tuple[int, list[Moment]]]:
        s = self._searcher
        if not s.encoder_id:
            s.refresh()  # started on an empty store: a first commit may have landed since the last poll
        out: list[tuple[int, list[Moment]]] = [(s.version, []) for _ in items]
        if not s.videos():  # as Searcher.search: no videos is an error
            raise QueryError(f"the store {s.store} holds no videos (v{s.version})")
        visual = [i for i, it in enumerate(items) if s.encoder_id and TRACK_VISUAL in parse_tracks(it[3])]
        if visual:  # videos but no frames (audio only): no visual moments
            vecs = s.encode([items[i][0] for i in visual])
            groups: dict[tuple[int, str | None], list[int]] = {}
            for j, i in enumerate(visual):
                groups.setdefault((int(items[i][1]), items[i][2]), []).append(j)
            for (k, video), rows in groups.items():
                q = vecs[rows]
                cands = s.retrieve(q, top_k=k, video=video)
                got = s.ground(q, cands, top_k=k)
                for j, c, ms in zip(rows, cands, got):
                    out[visual[j]] = (c.version, ms)
        return [(version, s.with_tracks(text, ms, top_k=int(k), video=video, tracks=tracks, version=version))
                for (version, ms), (text, k, video, tracks) in zip(out, items)]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def ground(self, items: list[tuple[np.ndarray, Candidates, int]]) -> list[list[Moment]]:
        """Each item: (query (D,), its candidates, top_k) -> up to top_k moments best first."""
        self.batch_sizes = (self.batch_sizes + [len(items)])[-1000:]
        return await asyncio.to_thread(self._ground_batch, items)

    def _ground_batch(self, items) -> list[list[Moment]]:
        out: list[list[Moment]] = [[] for _ in items]
        by_k: dict[int, list[int]] = {}
        for i, (_, _, k) in enumerate(items):
            by_k.setdefault(int(k), []).append(i)
        for k, rows in by_k.items():  # top_k changes extraction limits: one ground call per distinct top_k
            q = np.stack([np.asarray(items[i][0], np.float32) for i in rows])
            got = self._searcher.ground(q, [items[i][1] for i in rows], top_k=k)
            for i, ms in zip(rows, got):
                out[i] = ms
        return out

    async def tracks(self, item: tuple) -> tuple[int, list[Moment]]:
        """(text, top_k, video, tracks, store version or None, visual moments) -> (the version, those moments fused
        with the text tracks')."""
        text, k, video, tracks, version, moments = item
        version = self._searcher.version if version is None else int(version)
        fused = await asyncio.to_thread(self._searcher.with_tracks, text, moments, top_k=int(k), video=video,
                                        tracks=tracks, version=version)
        return version, fused

    async def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes)}

    def __del__(self):
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.stop()


_END = object()


@serve.deployment
class QA:
    """Question + moments -> answer text, streamed chunk by chunk (``ray_vlm.query.qa``)."""

    def __init__(self, args: ServeArgs):
        from ray_vlm.query.qa import load_answerer

        self._args = args
        self._answerer = load_answerer(args.qa_model, **args.qa_options)
        self._frames_per_moment = args.qa_frames_per_moment

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``frames_per_moment`` (int)."""
        if "frames_per_moment" in user_config:
            self._frames_per_moment = max(1, int(user_config["frames_per_moment"]))

    async def name(self) -> str:
        return str(getattr(self._answerer, "name", type(self._answerer).__name__))

    def _evidence(self, moments: list[Moment]) -> list:
        from ray_vlm.query.qa import Evidence

        if self._args.qa_model is None:  # the evidence answerer reads only the moments
            return [Evidence(m, []) for m in moments]
        from ray_vlm.media.frames import read_frames_at

        out = []
        for m in moments:
            n = self._frames_per_moment
            times = [m.peak_s] if n == 1 else list(np.linspace(m.start_s, max(m.start_s, m.end_s - 1e-3), n))
            try:
                frames = read_frames_at(m.uri, [float(t) for t in times],
                                        storage_options=self._args.media_options())
            except Exception:
                if "visual" in m.tracks:
                    raise
                frames = []
            out.append(Evidence(m, frames))
        return out

    async def answer(self, question: str, moments: list[Moment]):
        """Async generator of answer text chunks (generation runs in a worker thread)."""
        evidence = await asyncio.to_thread(self._evidence, list(moments))
        it = iter(self._answerer.stream(question, evidence))
        try:
            while True:
                chunk = await asyncio.to_thread(next, it, _END)
                if chunk is _END:
                    return
                if chunk:
                    yield str(chunk)
        finally:  # a client that went away stops generation (the VLM checks between tokens)
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except ValueError:  # still running in the worker thread: it stops at its next token
                    pass


# ================================================================ the ingress

api = FastAPI(
    title="ray-vlm",
    version="1",
    summary="When does X happen? Moments in a video archive, over HTTP.",
    docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,  # no third-party scripts; the spec stays
    description=("Search a committed token store for the moments where a text query happens, ground a query "
                 "inside one video, ask a question answered from the best moments (streamed), list videos, "
                 "fetch thumbnails and the video file (HTTP range requests). Every /v1 endpoint needs "
                 "`Authorization: Bearer <token>` when the service has a token; /healthz and the page do not."),
)
api.add_middleware(_guard.Guard)
api.add_exception_handler(RequestValidationError, _guard.validation_error)
_bearer = HTTPBearer(auto_error=False, description="the service token (`ray-vlm serve --token`)")
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
VideoId = Annotated[str, Path(pattern=_VIDEO_ID_RE, description="a video_id (or file name stem)")]


def _unwrap(e: BaseException) -> BaseException:
    """The user exception inside a Ray task error (a replica's exception arrives wrapped)."""
    from ray.exceptions import RayTaskError

    seen = 0
    while isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None and seen < 4:
        e, seen = e.cause, seen + 1
    return e


class CodedHTTPException(HTTPException):
    """An HTTP error named by its stable code (``ray_vlm.core.errors``): the status is the code's, and the JSON
    body carries both, ``{"detail": ..., "code": ...}`` (see ``_coded_body``)."""

    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(http_status(code), detail, headers=headers)
        self.code = code


async def _coded_body(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTPException (the only class it is registered for), with ``code`` added to the body
    when the exception has one.

    (Keyed by attribute, not class: the ingress class is pickled by value, so a class it raises need not be
    the one this module defines.)"""
    http_exc = cast(HTTPException, exc)
    code = getattr(http_exc, "code", None)
    if not isinstance(code, str):
        return await http_exception_handler(request, http_exc)
    return JSONResponse({"detail": http_exc.detail, "code": code}, status_code=http_exc.status_code,
                        headers=http_exc.headers)


api.add_exception_handler(HTTPException, _coded_body)


def _http_error(e: BaseException) -> HTTPException:
    """Map an exception of a downstream call to the HTTP answer a client can act on (the one mapping).

    A ``RayVlmError`` whose code the table maps to a 4xx says why (a media error: the video file the store names
    cannot be read); anything else that is not Ray's timeout, overload or restart is a 500 that leaks nothing.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    e = _unwrap(e)
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, RayVlmError) and http_status(e.code) < 500:  # the client can act on it: say why
        detail = f"the video file is not available: {e}" if isinstance(e, MediaError) else str(e)
        return CodedHTTPException(e.code, detail)
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return CodedHTTPException("timeout", "the request timed out; try again or ask for fewer moments")
    if isinstance(e, BackPressureError):
        return CodedHTTPException("overloaded", "the service is overloaded; retry later", {"Retry-After": "1"})
    if isinstance(e, (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError)):
        return CodedHTTPException("unavailable", "a replica is restarting; retry later", {"Retry-After": "1"})
    log.error("internal error: %s: %s", type(e).__name__, e)
    return CodedHTTPException(INTERNAL, "internal error")


def _sse(event: str, data: Any) -> bytes:
    """One server-sent event; ``data`` is JSON (so text with newlines stays one ``data:`` line)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _parse_range(header: str, total: int) -> tuple[int, int] | tuple[()] | None:
    """A ``Range`` header per RFC 9110 14.2 -> inclusive ``(start, end)``; ``()`` when unsatisfiable (416);
    None when the header is to be ignored (200, the whole file).

    One range of unit ``bytes`` (any case): ``a-b``, ``a-``, ``-n``. Ignored: another unit, a multi-range (the
    server may ignore Range, and one 200 is cheaper than a multipart body), a syntactically invalid spec such as
    ``bytes=5-1``.
    """
    m = re.fullmatch(r"[ \t]*bytes[ \t]*=[ \t]*(\d*)-(\d*)[ \t]*", header, flags=re.IGNORECASE)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        if n == 0 or total == 0:
            return ()
        return max(0, total - n), total - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else None
    if end is not None and end < start:
        return None  # invalid range-spec: ignore the header
    if start >= total:
        return ()
    return start, total - 1 if end is None else min(end, total - 1)


async def _next_chunk(gen) -> tuple[bool, Any]:
    """``(True, item)``: the next item of an async generator; ``(False, None)`` at its end.

    (No sentinel object: the ingress class is pickled by value, so a module-level sentinel would not be the
    same object inside it.)
    """
    try:
        return True, await gen.__anext__()
    except StopAsyncIteration:
        return False, None


# Everything the ingress class uses must be defined above it: Serve pickles the class by value.
@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP API over the deployments (see the module docstring and ``/docs``)."""

    def __init__(self, args: ServeArgs, encoder, retriever, grounder, qa):
        self._args = args
        self._token = args.resolved_token()
        if self._token is None and args.require_token:
            raise ValueError(f"require_token is set but no token was given (set args.token or the "
                             f"{args.token_env or 'token_env'} environment variable)")
        _guard.configure(args.guard_config())  # the middleware in front of the routes (see guard.py)
        self._encoder, self._retriever, self._grounder, self._qa = encoder, retriever, grounder, qa
        self._timeout_s = args.timeout_s
        self._fused = args.fused_search
        self._max_top_k = args.max_top_k
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._static = {n: (resources.files("ray_vlm.serve") / "static" / n).read_bytes() for n in _STATIC}

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``timeout_s`` (float), ``max_top_k`` (int)."""
        if "timeout_s" in user_config:
            self._timeout_s = float(user_config["timeout_s"])
        if "max_top_k" in user_config:
            self._max_top_k = int(user_config["max_top_k"])

    # ---------------------------------------------------------------- helpers
    def _auth(self, request: Request, creds: HTTPAuthorizationCredentials | None, cookie_ok: bool = False) -> None:
        if self._token is None:
            return
        # (the guard middleware checked the same before the body was read; this keeps each route honest alone)
        if creds is not None and _guard.token_ok(creds.credentials, self._token):
            return
        if cookie_ok and creds is None:
            name = _guard.session_cookie_name(request.headers.get("host"))
            if _guard.token_ok(request.cookies.get(name), _guard.session_value(self._token)):
                return
        raise CodedHTTPException("unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def _call(self, response, timeout_s: float | None = None, *, cancel=None):
        """Await a DeploymentResponse (or a coroutine) within the timeout; errors become HTTPExceptions.

        On timeout the downstream request is cancelled (``response`` itself, or ``cancel``: e.g. a stream), so
        its replica slot is freed.
        """
        async def wait():
            return await response
        try:
            return await asyncio.wait_for(wait(), timeout_s or self._timeout_s)
        except TimeoutError:
            target = cancel if cancel is not None else response
            if hasattr(target, "cancel"):
                target.cancel()
            raise _http_error(TimeoutError()) from None
        except Exception as e:  # noqa: BLE001 - every error becomes its HTTP answer (_http_error)
            raise _http_error(e) from None

    def _check(self, text: str, top_k: int) -> str:
        try:
            text = check_query(text)
        except QueryError as e:
            raise _http_error(e) from None
        if top_k > self._max_top_k:
            raise _http_error(QueryError(f"top_k is {top_k}; at most {self._max_top_k} moments are returned"))
        return text

    async def _moments(self, text: str, top_k: int, video: str | None, tracks: str = "all"
                       ) -> tuple[int, list[Moment]]:
        try:
            want = parse_tracks(tracks)
        except QueryError as e:
            raise _http_error(e) from None
        if video is not None and not await self._call(self._retriever.resolve.remote(video)):
            raise CodedHTTPException("video_not_found",
                                     f"no video {video!r} in the store (give a video_id or a file name stem)")
        if self._fused:
            return await self._call(self._grounder.search.remote((text, top_k, video, tracks)))
        version, visual = None, []
        if TRACK_VISUAL in want:
            q = await self._call(self._encoder.encode.remote(text))
            cands = await self._call(self._retriever.retrieve.remote(q, top_k, video))
            version = cands.version
            if len(cands):
                visual = await self._call(self._grounder.ground.remote((q, cands, top_k)))
        return await self._call(self._grounder.tracks.remote((text, top_k, video, tracks, version, visual)))

    async def _video(self, video_id: str) -> dict:
        """The video row of a video_id or file name stem (404 when none, or when a stem names several)."""
        row = await self._call(self._retriever.video.remote(video_id))
        if row is not None:
            return row
        ids = await self._call(self._retriever.resolve.remote(video_id))
        if len(ids) != 1:
            raise (CodedHTTPException("video_not_found", f"no video {video_id!r} in the store") if not ids else
                   CodedHTTPException("video_ambiguous", f"{video_id!r} names {len(ids)} videos; give a video_id"))
        row = await self._call(self._retriever.video.remote(ids[0]))
        if row is None:
            raise CodedHTTPException("video_not_found", f"no video {video_id!r} in the store")
        return row

    # ---------------------------------------------------------------- open: page, health
    @api.get("/", response_class=HTMLResponse, summary="The web page (asks for the token, or takes #token=)")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._static["index.html"], headers={"Cache-Control": "no-store"})

    @api.get("/static/{name}", summary="The page's script and style sheet",
             responses={200: {"content": {"text/javascript": {}, "text/css": {}}}, 404: {"model": ErrorOut}})
    async def static(self, name: Annotated[str, Path(pattern=r"^[a-z]+\.(js|css)$")]) -> Response:
        if name not in self._static:
            raise HTTPException(404, "no such file")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(self._static[name], media_type=kind, headers={"Cache-Control": "no-cache"})

    @api.get("/healthz", response_model=Health, summary="Liveness: the ingress and the retriever answer (open)",
             responses={503: {"model": Health}})
    async def healthz(self):
        try:
            st = await self._call(self._retriever.status.remote(), timeout_s=min(self._timeout_s, 5.0))
        except HTTPException as e:
            return JSONResponse(Health(status="unavailable", detail=str(e.detail)).model_dump(), status_code=503)
        return Health(status="ok", store_version=st["store_version"], videos=st["videos"],
                      detail=st["refresh_error"])

    @api.post("/v1/session", status_code=204, response_class=Response, responses=_ERRORS,
              summary="Exchange the bearer token for the page's session cookie (HttpOnly, SameSite=Strict)")
    async def session(self, request: Request, creds: Creds) -> Response:
        """The page's <img> and <video> requests send no header: they authenticate with this cookie (GET only).
        Its value is derived from the token, never the token itself; its name carries the port."""
        self._auth(request, creds)
        out = Response(status_code=204, headers={"Cache-Control": "no-store"})
        if self._token is not None:
            out.set_cookie(_guard.session_cookie_name(request.headers.get("host")),
                           _guard.session_value(self._token), httponly=True, samesite="strict", path="/")
        return out

    # ---------------------------------------------------------------- the API
    @api.post("/v1/search", response_model=SearchResponse, summary="When does a query happen? Ranked moments",
              responses={**_ERRORS, **_BAD_INPUT, **_NOT_FOUND})
    async def search(self, body: SearchRequest, request: Request, creds: Creds) -> SearchResponse:
        self._auth(request, creds)
        text = self._check(body.query, body.top_k)
        version, moments = await self._moments(text, body.top_k, body.video, body.tracks)
        return SearchResponse(query=text, store_version=version, moments=[asdict(m) for m in moments])

    @api.post("/v1/videos/{video_id}/ground", response_model=SearchResponse,
              summary="When does a query happen in this video?", responses={**_ERRORS, **_BAD_INPUT, **_NOT_FOUND})
    async def ground(self, video_id: VideoId, body: GroundRequest, request: Request, creds: Creds
                     ) -> SearchResponse:
        self._auth(request, creds)
        text = self._check(body.query, body.top_k)
        row = await self._video(video_id)
        version, moments = await self._moments(text, body.top_k, row["video_id"])
        return SearchResponse(query=text, store_version=version, moments=[asdict(m) for m in moments])

    @api.post("/v1/ask", summary="Ask a question; the answer streams as server-sent events",
              responses={**_ERRORS, **_BAD_INPUT, 200: {
                  "content": {"text/event-stream": {}},
                  "description": ("Events: `moments` (JSON: the evidence moments), then `token` (JSON string: "
                                  "the next piece of the answer) any number of times, then `done` (JSON: "
                                  "`{answerer}`) or `error` (JSON: `{status, detail, code}`).")}})
    async def ask(self, body: AskRequest, request: Request, creds: Creds) -> StreamingResponse:
        self._auth(request, creds)
        text = self._check(body.question, body.top_k)
        version, moments = await self._moments(text, body.top_k, body.video)
        name = await self._call(self._qa.name.remote())
        gen = self._qa.options(stream=True).answer.remote(text, moments)
        first = await self._call(_next_chunk(gen), cancel=gen)  # overload / failure before any byte: a status
        timeout_s = self._timeout_s

        async def events():
            yield _sse("moments", {"store_version": version, "moments": [asdict(m) for m in moments]})
            more, chunk = first
            try:
                while more:
                    yield _sse("token", chunk)
                    more, chunk = await asyncio.wait_for(_next_chunk(gen), timeout_s)
                yield _sse("done", {"answerer": name})
            except Exception as e:  # noqa: BLE001 - the status line is sent already: report in-band
                err = _http_error(e)
                yield _sse("error", {"status": err.status_code, "detail": err.detail,
                                     "code": getattr(err, "code", None)})
            finally:  # an error, a timeout or a client that went away: stop the generation, free the QA slot
                if more:
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @api.get("/v1/videos", response_model=VideosResponse, summary="Every video of the served store version",
             responses=_ERRORS)
    async def videos(self, request: Request, creds: Creds) -> VideosResponse:
        self._auth(request, creds, cookie_ok=True)
        return VideosResponse(**await self._call(self._retriever.videos.remote()))

    @api.get("/v1/videos/{video_id}/thumbnail", summary="A JPEG of the video at time t",
             response_class=Response, responses={**_ERRORS, **_NOT_FOUND, 200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(self, video_id: VideoId, request: Request, creds: Creds,
                        t: Annotated[float, Query(ge=0, le=1e7, description="seconds")] = 0.0,
                        width: Annotated[int, Query(ge=16, le=1280)] = 320) -> Response:
        self._auth(request, creds, cookie_ok=True)
        row = await self._video(video_id)
        key = (row["video_id"], round(float(t), 1), int(width))
        jpeg = self._thumbs.get(key)
        if jpeg is None:
            from ray_vlm.media.frames import thumbnail_jpeg

            try:
                jpeg = await asyncio.wait_for(asyncio.to_thread(
                    thumbnail_jpeg, row["uri"], key[1], width=key[2],
                    storage_options=self._args.media_options()), self._timeout_s)
            except Exception as e:  # noqa: BLE001 - every error becomes its HTTP answer (_http_error)
                raise _http_error(e) from None
            self._thumbs[key] = jpeg
            while len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/v1/videos/{video_id}/file", summary="The video file; honours HTTP Range (206) so players seek",
             response_class=Response,
             responses={**_ERRORS, **_NOT_FOUND, 200: {"content": {"video/mp4": {}}},
                        206: {"description": "the requested byte range (Content-Range)"},
                        416: {"description": "range not satisfiable"}})
    async def file(self, video_id: VideoId, request: Request, creds: Creds,
                   range_header: Annotated[str | None, Header(alias="range", max_length=200)] = None
                   ) -> Response:
        self._auth(request, creds, cookie_ok=True)
        from ray_vlm.media.frames import media_type, open_range

        row = await self._video(video_id)
        uri, opts = row["uri"], self._args.media_options()
        try:
            _, total = await asyncio.to_thread(open_range, uri, 0, 0, storage_options=opts)
        except Exception as e:  # noqa: BLE001 - every error becomes its HTTP answer (_http_error)
            raise _http_error(e) from None
        kind = media_type(uri)
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
        async def body():
            for start in range(0, total, _FILE_CHUNK_BYTES):
                end = min(total, start + _FILE_CHUNK_BYTES) - 1
                data, _ = await asyncio.to_thread(open_range, uri, start, end, storage_options=opts)
                yield data

        if range_header is None:
            return StreamingResponse(body(), media_type=kind, headers={**headers, "Content-Length": str(total)})
        span = _parse_range(range_header, total)
        if span is None:  # RFC 9110 14.2: an invalid or unsupported Range is ignored: the whole file
            return StreamingResponse(body(), media_type=kind, headers={**headers, "Content-Length": str(total)})
        if span == ():
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{total}"})
        first, last = span  # type: ignore[misc]  # a (start, end) pair here: () returned above
        start, end = first, min(last, first + MAX_RANGE_BYTES - 1)
        try:
            data, total = await asyncio.to_thread(open_range, uri, start, end, storage_options=opts)
        except Exception as e:  # noqa: BLE001 - every error becomes its HTTP answer (_http_error)
            raise _http_error(e) from None
        return Response(data, status_code=206, media_type=kind,
                        headers={**headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"})


# ================================================================ build_app


def build_app(args: ServeArgs | dict) -> serve.Application:
    """The application: ``Ingress`` bound to the four deployments, sized and bounded by ``args``.

    The ``import_path`` target of a serve config YAML (``ray_vlm.serve.app:build_app``); Serve validates the
    YAML ``args:`` block against ``ServeArgs``. Deployment options in the YAML (``deployments:``) override the
    ones set here; ``user_config`` there reaches each deployment's ``reconfigure``.
    """
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)

    def opts(replicas: int, num_gpus: float = 0.0, **kw) -> dict:
        actor = {"num_cpus": a.num_cpus}
        if num_gpus:
            actor["num_gpus"] = num_gpus
        return dict(num_replicas=replicas, ray_actor_options=actor, max_ongoing_requests=a.max_ongoing_requests,
                    max_queued_requests=a.max_queued_requests, health_check_period_s=a.health_check_period_s,
                    health_check_timeout_s=max(10.0, 2 * a.health_check_period_s),
                    graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
                    logging_config={"enable_access_log": a.access_log}, **kw)

    # @serve.deployment makes each class a Deployment (which has .options); the checker sees the class
    deployments: dict[str, Any] = {"encoder": QueryEncoder, "retriever": Retriever, "grounder": Grounder, "qa": QA,
                                   "ingress": Ingress}
    encoder = deployments["encoder"].options(**opts(a.encoder_replicas)).bind(a)
    retriever = deployments["retriever"].options(**opts(a.retriever_replicas)).bind(a)
    grounder = deployments["grounder"].options(**opts(a.grounder_replicas, a.grounder_num_gpus)).bind(a)
    qa = deployments["qa"].options(**opts(a.qa_replicas, a.qa_num_gpus)).bind(a)
    return deployments["ingress"].options(**opts(a.ingress_replicas)).bind(a, encoder, retriever, grounder, qa)
