"""The token store: three Lance datasets under one root, committed a chunk of a source at a time.

Layout under the store root (a local directory or ``s3://bucket/prefix``)::

    ray_vlm_store.json   what the root holds: {"format": "ray-vlm/store", "schema_version": 2} (created once)
    sources.lance/       one row per input (VIDEOS_SCHEMA + lineage columns); its version is the store's version
    frames.lance/        the visual tokens: FRAMES_SCHEMA rows (one per kept frame) + generation, write_id
    segments.lance/      the second kind of track: SEGMENTS_SCHEMA rows (time-ranged items) + generation, write_id

Lance gives each dataset versioned manifests of fragments, commits that are atomic (on S3 through conditional
writes), compaction, cleanup of old versions and time travel; this module adds the rules that tie the three
datasets into one store.

Visibility. Frame and segment rows are written first (workers write Lance fragments; the driver appends them in
one commit), then one merge-insert into ``sources`` makes them visible. A row is visible only when its source's row,
in the sources version read, names it: the row's ``generations`` maps chunk ranges to the job attempt
(*generation*) that wrote them, and only chunks below ``chunks_committed`` count. So readers only ever see whole
chunks, rows appended by a job killed before its sources commit stay invisible (``compact`` removes them), and a
replaced or failed video's old rows vanish in the same commit that replaces it.

Time-ranged commits. A source is committed a prefix of chunks at a time: its row says ``partial`` with
``chunks_committed``, ``resume_s`` (where the next chunk starts) and ``next_frame_index`` until its last chunk lands
(``ok``) or it fails (``failed``: no frames visible, as a retry replaces it whole). A rerun resumes a partial
source from its next chunk.

Concurrency. Commits are optimistic per source row: each row carries a random ``revision``; an update names the
revision it read (``base_revision``) and Lance applies it only if the row still has it. Two committers inserting
the same new video_id at once may both land (Lance merges concurrent inserts); the row created first wins,
readers ignore the other, and its committer deletes it and reports the video as dropped.

Faults. On S3, Lance's client retries 5xx answers (503 SlowDown, 500), throttling and dropped connections itself
(``lance_storage_options`` sets how often). What outlasts those retries, or what the client must not retry because
the request may have taken effect (a reset or timed-out conditional PUT of a manifest), reaches the commit steps,
which try again a few times (``_IO_ATTEMPTS``) where that is safe: an append first leaves out fragments the dataset
already holds; before a failed sources merge is planned again, the rows' revisions of every earlier try are looked
for, so a try whose answer was lost, or whose write landed after the client gave up on it, counts once, as this
commit's. A commit that still fails raises StoreError with the cause; every step is one atomic Lance commit and
nothing is visible before the sources commit, so the store reads as before (or, should a timed-out write land
later, with the whole commit), and running the same commit again adds no duplicate.

The store's version is the ``sources`` dataset's version; ``committed_version`` of a video is the version that last
changed its row (Lance's ``_row_last_updated_at_version``). Vectors: ``ray_vlm.store.codec``; v1 stores (Parquet +
JSON manifests): ``ray_vlm.store.v1`` and ``migrate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_vlm.core import schema as S
from ray_vlm.core.files import create_only, is_local
from ray_vlm.store.codec import SCALE_DTYPE
from ray_vlm.store.errors import CommitConflictError, StoreError

log = logging.getLogger(__name__)

STORE_FORMAT = "ray-vlm/store"
DESCRIPTOR = "ray_vlm_store.json"
SOURCES, FRAMES, SEGMENTS = "sources", "frames", "segments"
V1_MARKER = "_manifests"  # a v1 store's manifest directory

# Lineage columns of the stored tables (not part of what readers get).
GENERATION = "generation"  # frames / segments: the job attempt that wrote the row
WRITE_ID = "write_id"  # frames / segments: one id per fragment write (duplicate copies of a chunk are told apart)
WRITTEN_AT = "written_at"  # frames / segments: unix seconds of the write (compaction keeps young invisible rows)
GENERATIONS = "generations"  # sources: JSON [[first_chunk, generation], ...], ascending first_chunk
REVISION = "revision"  # sources: random id of this row's content
BASE_REVISION = "base_revision"  # sources: the revision this row replaced (0: none)
_CREATED = "_row_created_at_version"
# The sources dataset's version 1 is its creation (empty); store version v is sources version v + _V0, so the first
# commit is version 1 and 0 means "nothing committed".
_V0 = 1
_UPDATED = "_row_last_updated_at_version"

_LINEAGE = [pa.field(GENERATION, pa.string(), nullable=False), pa.field(WRITE_ID, pa.string(), nullable=False),
            pa.field(WRITTEN_AT, pa.float64(), nullable=False)]
SOURCES_SCHEMA = pa.schema(
    list(S.VIDEOS_SCHEMA) + [pa.field(GENERATIONS, pa.string(), nullable=False),
                             pa.field(REVISION, pa.int64(), nullable=False),
                             pa.field(BASE_REVISION, pa.int64(), nullable=False)],
    metadata=S.VIDEOS_SCHEMA.metadata)
STORED_FRAMES_SCHEMA = pa.schema(list(S.FRAMES_SCHEMA) + _LINEAGE, metadata=S.FRAMES_SCHEMA.metadata)
STORED_SEGMENTS_SCHEMA = pa.schema(list(S.SEGMENTS_SCHEMA) + _LINEAGE, metadata=S.SEGMENTS_SCHEMA.metadata)
_SCHEMAS = {SOURCES: SOURCES_SCHEMA, FRAMES: STORED_FRAMES_SCHEMA, SEGMENTS: STORED_SEGMENTS_SCHEMA}

# Columns of the rows the write operator returns (one per input chunk) and ChunkLedger reads.
FRAMES_FILE = S.FRAMES_FILE  # JSON list of the Lance fragments (metadata) holding the chunk's frames
SEGMENTS_FILE = S.SEGMENTS_FILE  # the same for the chunk's segment rows (speech, words, sounds, on-screen text)
FRAMES_FILE_ROWS = S.FRAMES_FILE_ROWS
FRAMES_FILE_BYTES = S.FRAMES_FILE_BYTES
CHUNK_ERROR = S.CHUNK_ERROR
CHUNK_END_S = S.CHUNK_END_S
# Video-row columns the write operator copies from each chunk (the ledger uses the newest chunk's).
VIDEO_ROW_COLUMNS = tuple(f.name for f in S.VIDEOS_SCHEMA)
_COUNTS = (S.FRAMES_KEPT, S.PATCHES_TOTAL, S.PATCHES_KEPT, S.TOKENS, S.STORED_BYTES)

# Compaction: fragments grow to about this many bytes; rows invisible for longer than the grace are removed.
TARGET_FRAGMENT_BYTES = 64 * 2**20
# Lance file format of new datasets. 2.1 reads one video's rows (a filtered scan on the video_id index, every
# token column) about 6x faster than 2.2, pylance 14's default, on this store's columns (``bench store-scale``);
# a dataset keeps the format it was created with, and its fragments are written in it.
DATA_STORAGE_VERSION: Final = "2.1"
DEFAULT_RETENTION_S = 3600.0
_IN_LIST_MAX = 2000  # a video_id filter longer than this is applied after reading instead of pushed down
_READER_REUSE_S = 30.0  # a point read reuses its dataset handle this long (well inside any retention)


# Retries of Lance's S3 client (object_store): 5xx answers, 429 and dropped connections, with exponential backoff
# from 0.1 s up to 15 s a wait; timeouts too for GETs and plain PUTs (not for conditional manifest PUTs, which the
# commit steps handle). pylance 14 asks for 3 retries, given up within a second: too few to ride out S3 throttling
# (503 SlowDown). These are object_store's own defaults.
S3_RETRY_OPTIONS = {"client_max_retries": "10", "client_retry_timeout": "180"}


def store_filesystem(uri: str, storage_options: dict | None = None):
    """(fs, root path) for a store URI, through the project's one resolver (URL policy included)."""
    from ray_vlm.core.fs import resolve

    return resolve(uri, storage_options=storage_options)


def lance_storage_options(uri: str, storage_options: dict | None) -> dict[str, str] | None:
    """Lance's (object_store's) options for a store URI, from the fsspec-style options the project takes.

    ``{"client_kwargs": {"endpoint_url", "region_name"}, "key", "secret", "token", "anon"}`` and the environment
    (``$RAY_VLM_S3_ENDPOINT_URL``, ``$AWS_*``) map to ``aws_endpoint``, credentials and region; an ``http://``
    endpoint allows plain HTTP and path-style requests (what S3-compatible servers on a LAN expect). The S3
    client retries failed requests up to ``client_max_retries`` times within ``client_retry_timeout`` seconds (see
    ``S3_RETRY_OPTIONS``). Anything under ``"lance"`` is passed on verbatim and wins over all of these.
    """
    from ray_vlm.core.fs import S3_ENDPOINT_ENV, protocol_of

    if protocol_of(uri) != "s3":
        return None
    so = dict(storage_options or {})
    ck = dict(so.get("client_kwargs") or {})
    out: dict[str, str] = {}
    endpoint = so.get("endpoint_url") or ck.get("endpoint_url") or os.environ.get(S3_ENDPOINT_ENV)
    if endpoint:
        out["aws_endpoint"] = str(endpoint)
        out["virtual_hosted_style_request"] = "false"
        if str(endpoint).startswith("http://"):
            out["allow_http"] = "true"
    for ours, theirs in (("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"),
                         ("token", "aws_session_token")):
        if so.get(ours):
            out[theirs] = str(so[ours])
    region = ck.get("region_name") or so.get("region") or os.environ.get("AWS_REGION") \
        or os.environ.get("AWS_DEFAULT_REGION")
    out["aws_region"] = str(region or "us-east-1")
    if so.get("anon"):
        out["aws_skip_signature"] = "true"
    out.update(S3_RETRY_OPTIONS)
    for k, v in (so.get("lance") or {}).items():  # anything else object_store takes, verbatim
        out[str(k)] = str(v)
    return out


def new_generation() -> str:
    """A fresh generation id (one per job attempt)."""
    return uuid.uuid4().hex


def _revision() -> int:
    return secrets.randbits(62) + 1


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _in_filter(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(_sql_str(v) for v in values)})"


def _none_if_nan(x):
    if x is None:
        return None
    if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        return None
    if isinstance(x, np.generic):
        return x.item()
    return x


def parse_generations(raw: str | None) -> list[tuple[int, str]]:
    """``[(first_chunk, generation), ...]`` of a sources row's ``generations`` JSON."""
    if not raw:
        return []
    if raw.startswith('[[0, "') and raw.endswith('"]]') and raw.count('"') == 2:  # one generation (most rows)
        return [(0, raw[6:-3])]
    try:
        return [(int(a), str(g)) for a, g in json.loads(raw)]
    except (ValueError, TypeError) as e:
        raise StoreError(f"bad generations value {raw!r}: {e}") from None


def visible_ranges(generations: Sequence[tuple[int, str]], chunks_committed: int | None,
                   status: str | None) -> list[tuple[str, int, int]]:
    """``[(generation, first_chunk, end_chunk), ...]`` a source row makes visible (none for a failed source)."""
    if status == S.STATUS_FAILED or not generations:
        return []
    end = int(chunks_committed) if chunks_committed is not None else 2**31 - 1
    out = []
    for i, (first, gen) in enumerate(generations):
        stop = generations[i + 1][0] if i + 1 < len(generations) else end
        stop = min(stop, end)
        if stop > first:
            out.append((gen, first, stop))
    return out


def _in_video_frame_order(table: pa.Table) -> bool:
    """Whether the rows are sorted by (video_id, frame_index), frame indexes unique within a video."""
    vd = pc.dictionary_encode(table.column(S.VIDEO_ID).combine_chunks())
    idx = vd.indices.to_numpy(zero_copy_only=False)  # first-seen order: a video in one run ascends by one
    names = vd.dictionary.to_pylist()
    if names != sorted(names):
        return False
    step = np.diff(idx.astype(np.int64))
    fi = table.column(S.FRAME_INDEX).to_numpy().astype(np.int64)
    return bool(np.all((step == 1) | ((step == 0) & (np.diff(fi) > 0))))


def _visible_rows(batch: pa.RecordBatch, ranges: Mapping[str, list[tuple[str, int, int]]]) -> np.ndarray | None:
    """Mask of the rows of ``batch`` whose (video, generation, chunk) ``ranges`` make visible; None if none is.

    Videos and generations are dictionary-encoded: a batch holds few distinct ones, so the ranges are looked up
    per distinct (video, generation) pair and the rows are compared as integers."""
    if not batch.num_rows:
        return None
    vd = pc.dictionary_encode(batch.column(S.VIDEO_ID))
    gd = pc.dictionary_encode(batch.column(GENERATION))
    vnames, gnames = vd.dictionary.to_pylist(), gd.dictionary.to_pylist()
    ng = len(gnames)
    gpos = {g: i for i, g in enumerate(gnames)}
    lo = np.zeros(len(vnames) * ng, np.int64)
    hi = np.zeros(len(vnames) * ng, np.int64)  # lo = hi: nothing visible
    more = []  # a second run of one (video, generation): never written by the job, still read right
    for vi, v in enumerate(vnames):
        for gen, a, b in ranges.get(v, ()):
            gi = gpos.get(gen)
            if gi is None:
                continue
            if hi[vi * ng + gi] > lo[vi * ng + gi]:
                more.append((vi * ng + gi, a, b))
            else:
                lo[vi * ng + gi], hi[vi * ng + gi] = a, b
    pair = (vd.indices.to_numpy(zero_copy_only=False).astype(np.int64) * ng
            + gd.indices.to_numpy(zero_copy_only=False).astype(np.int64))
    chunk = batch.column(S.CHUNK_INDEX).to_numpy(zero_copy_only=False).astype(np.int64)
    ok = (chunk >= lo[pair]) & (chunk < hi[pair])
    for p, a, b in more:
        ok |= (pair == p) & (chunk >= a) & (chunk < b)
    return ok if ok.any() else None


# ================================================================ results


@dataclasses.dataclass(frozen=True)
class CommitConflict:
    """One video lost to another committer (kept so callers and tests can see it happened)."""

    video_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """What ``TokenStore.commit_detailed`` did."""

    version: int  # the store version this commit created, or the latest version if nothing was committed
    committed_video_ids: tuple[str, ...]
    replaced_video_ids: tuple[str, ...]  # were live before and are replaced by this commit
    dropped_video_ids: tuple[str, ...]  # another committer changed them after the version this commit read
    conflicts: tuple[CommitConflict, ...]
    created: bool  # False when nothing was committed (no sources version written)


@dataclasses.dataclass
class _Plan:
    rows: list[dict]
    dropped: list[str]
    replaced: list[str]
    conflicts: list[CommitConflict]


class _Incompatible(Exception):
    """Lance refused a sources commit because a concurrent one touched the same fragments (plan again)."""


class _IOFailure(StoreError):
    """An I/O error that outlasted the S3 client's own retries (a write may have taken effect all the same)."""


_SOURCES_RETRIES = 16
_IO_ATTEMPTS = 4  # tries of a commit step that fails with an I/O error (each after the client's own retries)


def _io_error(e: BaseException) -> bool:
    """An I/O failure that outlasted the S3 client's retries (Lance raises OSError, or ValueError naming it)."""
    return isinstance(e, (_IOFailure, OSError)) or "LanceError(IO)" in str(e)


def _backoff(attempt: int, first_s: float = 0.05) -> float:
    return min(2.0, first_s * 2**attempt) * (0.5 + secrets.randbelow(1000) / 1000)

# ================================================================ the store


class TokenStore:
    """A versioned token store on a local directory or ``s3://bucket/prefix`` (Lance datasets).

    Thread-safe for concurrent readers and committers; several processes or machines may commit to one store.

    Args:
        uri: store root.
        storage_options: fsspec-style options (``{"client_kwargs": {"endpoint_url": ...}, "key", "secret"}``);
            mapped to Lance's by ``lance_storage_options``.
    """

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = store_filesystem(uri, self.storage_options)
        self.root = root.rstrip("/") or root
        self.lance_options = lance_storage_options(uri, self.storage_options)
        self._lock = threading.Lock()
        self._manifests: dict[int, dict] = {}
        self._checked = False
        self._created = False  # create() has seen the descriptor and every dataset
        self._readers: dict[str, tuple[Any, int, float]] = {}  # name -> (dataset, store version, opened at)
        self._formats: dict[str, str] = {}  # Lance file format of each dataset (its fragments are written in it)
        self.conflicts: list[CommitConflict] = []  # every lost video of this instance, oldest first
        self._before_sources_commit = None  # test hook: called with the base version just before the sources commit

    def __repr__(self) -> str:
        return f"TokenStore({self.uri!r})"

    # ---------------------------------------------------------------- paths and datasets
    def dataset_uri(self, name: str) -> str:
        """The URI Lance opens for dataset ``name`` (sources, frames or segments)."""
        if is_local(self.fs):
            return os.path.join(self.root, f"{name}.lance")
        from ray_vlm.core.fs import protocol_of

        return f"{protocol_of(self.uri)}://{self.root}/{name}.lance"

    def _check_format(self) -> bool:
        """True when the root holds a v2 store; False when it holds nothing yet. StoreError otherwise."""
        if self._checked:
            return True
        path = f"{self.root}/{DESCRIPTOR}"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            if self.fs.exists(f"{self.root}/{V1_MARKER}"):
                raise StoreError(
                    f"{self.uri} is a v1 token store (Parquet + JSON manifests, ray-vlm 0.1); convert it with "
                    f"`ray-vlm migrate {self.uri} NEW_STORE` and use the new one") from None
            return False
        try:
            desc = json.loads(raw)
        except ValueError as e:
            raise StoreError(f"{self.uri}: {DESCRIPTOR} is not valid JSON: {e}") from None
        if not isinstance(desc, dict) or desc.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.uri}: {DESCRIPTOR} names an unknown format "
                             f"{desc.get('format') if isinstance(desc, dict) else desc!r}")
        sv = desc.get("schema_version")
        if not isinstance(sv, int) or sv > S.SCHEMA_VERSION:
            raise StoreError(f"{self.uri} was written with store schema version {sv}; this ray-vlm reads up to "
                             f"{S.SCHEMA_VERSION}: upgrade ray-vlm to read it")
        if sv < S.SCHEMA_VERSION:
            raise StoreError(f"{self.uri} has store schema version {sv}; convert it with `ray-vlm migrate`")
        self._checked = True
        return True

    def create(self, wait_s: float = 60.0) -> None:
        """Create the store (descriptor and empty datasets) if it does not exist; idempotent and race-safe.

        The writer whose create-only write of the descriptor succeeds creates the datasets; others wait for them
        (up to ``wait_s``, then create what is still missing: the first creator died). Once it has seen the store
        whole, an instance does not look again (datasets are never removed).
        """
        if self._created:
            return
        won = False
        if not self._check_format():
            desc = json.dumps({"format": STORE_FORMAT, "schema_version": S.SCHEMA_VERSION,
                               "created_at": time.time()}, sort_keys=True).encode()
            try:
                if not is_local(self.fs):
                    self.fs.makedirs(self.root, exist_ok=True)
                create_only(self.fs, f"{self.root}/{DESCRIPTOR}", desc)
                won = True
            except FileExistsError:  # another creator, or our own write whose answer was lost and was retried
                won = self.fs.cat_file(f"{self.root}/{DESCRIPTOR}") == desc
            self._check_format()
        deadline = time.monotonic() + (0.0 if won else wait_s)
        for name in _SCHEMAS:
            while self._dataset(name) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._dataset(name) is None:
                self._create_dataset(name)
        self._created = True

    def _create_dataset(self, name: str) -> None:
        import lance

        def attempt() -> None:
            try:
                ds = lance.write_dataset(_SCHEMAS[name].empty_table(), self.dataset_uri(name),
                                         schema=_SCHEMAS[name], mode="create", storage_options=self.lance_options,
                                         enable_stable_row_ids=(name == SOURCES),
                                         data_storage_version=DATA_STORAGE_VERSION)
            except (OSError, ValueError) as e:
                if self._dataset(name) is None:  # not a lost creation race: a real failure
                    raise (_IOFailure if _io_error(e) else StoreError)(
                        f"{self.uri}: cannot create {name}.lance: {e}") from e
                return
            if name != SOURCES:  # (the sources dataset's version 1 is its creation: its index comes with compaction)
                _ensure_video_index(ds)

        self._retry(f"creating {name}.lance", attempt)

    def _dataset(self, name: str, version: int | None = None):
        """The Lance dataset ``name`` (latest or at ``version``), or None while it does not exist."""
        import lance

        try:
            return lance.dataset(self.dataset_uri(name), version=version, storage_options=self.lance_options)
        except (ValueError, FileNotFoundError, OSError) as e:
            if "not found" not in str(e).lower() and "does not exist" not in str(e).lower():
                # an I/O failure (after the client's retries) says nothing about existence: never "empty"
                raise (_IOFailure if _io_error(e) else StoreError)(
                    f"{self.uri}: cannot open {name}.lance{'' if version is None else f' v{version}'}: {e}") from e
            if version is not None:
                raise StoreError(f"{self.uri}: version {version - (_V0 if name == SOURCES else 0)} does not "
                                 "exist") from None
            return None

    def _sources(self, version: int | None):
        if not self._check_format():
            if version not in (None, 0):
                raise StoreError(f"{self.uri}: version {version} does not exist")
            return None
        if version == 0:
            return None
        ds = self._dataset(SOURCES, None if version is None else int(version) + _V0)
        if ds is None and version is not None:
            raise StoreError(f"{self.uri}: version {version} does not exist")
        return ds

    # ---------------------------------------------------------------- versions
    def versions(self) -> list[int]:
        """All versions still kept (older ones go with ``compact``'s retention), ascending."""
        ds = self._sources(None)
        return [int(v["version"]) - _V0 for v in ds.versions() if int(v["version"]) > _V0] if ds is not None else []

    def latest_version(self) -> int:
        """The newest committed version (0 for an empty or missing store)."""
        ds = self._sources(None)
        return int(ds.version) - _V0 if ds is not None else 0

    def manifest(self, version: int | None = None) -> dict:
        """What version ``version`` (default: latest) holds, per video, from the sources dataset alone.

        Returns:
            ``{"format", "schema_version", "version", "videos": {video_id: {uri, size_bytes, mtime, status,
            error_type, config_hash, frames_kept, duration_s, chunks_committed, resume_s, next_frame_index,
            generations, committed_version}}, "counts": {...}}``.

        Raises:
            StoreError: the version does not exist, or the store was written by a newer, unknown schema.
        """
        if version is not None:
            with self._lock:
                known = self._manifests.get(int(version))
            if known is not None:  # a version never changes: no need to open it again
                return known
        ds = self._sources(version)
        if ds is None:
            return _manifest(0, {})
        v = int(ds.version) - _V0
        with self._lock:
            cached = self._manifests.get(v)
            older = max((x for x in self._manifests if x < v), default=None)
            base = self._manifests.get(older) if older is not None else None
        if cached is not None:
            return cached
        if base is not None:  # a refresh: only the rows changed since the newest version read before
            videos = dict(base["videos"])
            table = ds.to_table(columns=_MANIFEST_COLUMNS, filter=f"{_UPDATED} > {base['version'] + _V0}")
        else:
            videos = {}
            table = ds.to_table(columns=_MANIFEST_COLUMNS)
        counts = dict(base["counts"], by_status=dict(base["counts"]["by_status"])) if base is not None else None
        for rec in _records(_winners(table)):
            vid = rec.pop("video_id")
            old = videos.get(vid)
            if old is not None and old["created_version"] < rec["created_version"]:
                continue  # a later duplicate never wins
            if counts is not None:
                if old is not None:
                    _count(counts, old, -1)
                _count(counts, rec, +1)
            videos[vid] = rec
        m = _manifest(v, videos, counts)
        with self._lock:
            self._manifests[v] = m
            while len(self._manifests) > 8:
                self._manifests.pop(min(self._manifests))
        return m

    # ---------------------------------------------------------------- what is committed
    def committed_video_ids(self, statuses: Iterable[str] | None = None, config_hash: str | None = None,
                            version: int | None = None) -> set[str]:
        """Video ids live in a version, optionally only those with one of ``statuses`` / a config hash."""
        want = set(statuses) if statuses is not None else None
        return {vid for vid, rec in self.manifest(version)["videos"].items()
                if (want is None or rec["status"] in want)
                and (config_hash is None or rec["config_hash"] == config_hash)}

    def committed_inputs(self, version: int | None = None) -> dict[str, tuple[int | None, float | None, str]]:
        """``{uri: (size_bytes, mtime, video_id)}`` of every live video (the newest row per uri)."""
        out: dict[str, tuple[int | None, float | None, str]] = {}
        best: dict[str, int] = {}
        for vid, rec in self.manifest(version)["videos"].items():
            uri = rec["uri"]
            if uri in out and best[uri] > rec["committed_version"]:
                continue
            out[uri] = (rec["size_bytes"], rec["mtime"], vid)
            best[uri] = rec["committed_version"]
        return out

    def changed_video_ids(self, since: int, version: int | None = None) -> list[str]:
        """Video ids whose row changed after version ``since``, up to ``version`` (default latest)."""
        ds = self._sources(version)
        if ds is None:
            return []
        table = ds.to_table(columns=[S.VIDEO_ID], filter=f"{_UPDATED} > {int(since) + _V0}")
        return sorted(set(table.column(S.VIDEO_ID).to_pylist()))

    # ---------------------------------------------------------------- readers
    def read_videos(self, version: int | None = None, video_ids: Iterable[str] | None = None) -> pa.Table:
        """One VIDEOS_SCHEMA row per live video of ``version`` (default: latest), sorted by video_id."""
        ds = self._sources(version)
        if ds is None:
            return S.VIDEOS_SCHEMA.empty_table()
        wanted = sorted(set(video_ids)) if video_ids is not None else None
        if wanted is not None and not wanted:
            return S.VIDEOS_SCHEMA.empty_table()
        flt = _in_filter(S.VIDEO_ID, wanted) if wanted is not None and len(wanted) <= _IN_LIST_MAX else None
        table = ds.to_table(columns=list(S.VIDEOS_SCHEMA.names) + [_CREATED], filter=flt)
        if wanted is not None and flt is None:
            table = table.filter(pc.is_in(table[S.VIDEO_ID], pa.array(wanted)))
        table = _winners(table).select(S.VIDEOS_SCHEMA.names).cast(S.VIDEOS_SCHEMA)
        return table.sort_by(S.VIDEO_ID)

    def read_frames(self, version: int | None = None, video_ids: Iterable[str] | None = None,
                    columns: Sequence[str] | None = None) -> pa.Table:
        """Visible frame rows of ``version``, sorted by (video_id, frame_index).

        Args:
            version: store version (default latest).
            video_ids: only these videos (pushed down to Lance).
            columns: FRAMES_SCHEMA column names (default all).

        Returns:
            A table with FRAMES_SCHEMA's fields (the requested ones), its metadata included.
        """
        schema = _project(S.FRAMES_SCHEMA, columns)
        batches = list(self._scan(FRAMES, version, video_ids, schema))
        table = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
        keys = [(k, "ascending") for k in (S.VIDEO_ID, S.FRAME_INDEX) if k in schema.names]
        if not keys or not len(table) or (len(keys) == 2 and _in_video_frame_order(table)):
            return table  # (compacted fragments hold each video's rows in order: sorting is the exception)
        return table.sort_by(keys)

    def iter_frames(self, version: int | None = None, video_ids: Iterable[str] | None = None,
                    columns: Sequence[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Visible frame rows as record batches (bounded memory for big stores; no order)."""
        schema = _project(S.FRAMES_SCHEMA, columns)
        yield from self._scan(FRAMES, version, video_ids, schema, batch_size)

    def read_segments(self, version: int | None = None, video_ids: Iterable[str] | None = None,
                      track: str | None = None) -> pa.Table:
        """Visible SEGMENTS_SCHEMA rows of ``version`` (optionally one track), sorted by (video_id, start_s)."""
        extra = f"{S.TRACK} = {_sql_str(track)}" if track is not None else None
        batches = list(self._scan(SEGMENTS, version, video_ids, S.SEGMENTS_SCHEMA, extra_filter=extra))
        table = pa.Table.from_batches(batches, schema=S.SEGMENTS_SCHEMA) if batches \
            else S.SEGMENTS_SCHEMA.empty_table()
        return table.sort_by([(S.VIDEO_ID, "ascending"), (S.START_S, "ascending"), (S.TRACK, "ascending")]) \
            if len(table) else table

    def _scan(self, name: str, version: int | None, video_ids: Iterable[str] | None, schema: pa.Schema,
              batch_size: int = 65536, extra_filter: str | None = None) -> Iterator[pa.RecordBatch]:
        """Rows of ``name`` visible in ``version``, projected to ``schema``."""
        m = self.manifest(version)
        recs = m["videos"] if video_ids is None else {v: m["videos"][v] for v in set(video_ids) if v in m["videos"]}
        ranges = {vid: r for vid, rec in recs.items()
                  if (r := visible_ranges(rec["generations"], rec["chunks_committed"], rec["status"]))}
        if not ranges:
            return
        flt = _in_filter(S.VIDEO_ID, sorted(ranges)) if len(ranges) <= _IN_LIST_MAX and (
            video_ids is not None or len(ranges) < len(m["videos"])) else None
        if extra_filter:
            flt = f"({flt}) AND ({extra_filter})" if flt else extra_filter
        need = list(dict.fromkeys(list(schema.names) + [S.VIDEO_ID, GENERATION, S.CHUNK_INDEX]))
        point = video_ids is not None  # a few videos' rows (a query's candidates): the dataset handle is reused
        for attempt in (0, 1):
            ds = self._read_dataset(name, m["version"]) if point and not attempt else self._dataset(name)
            if ds is None:
                return
            sent = False
            try:
                for batch in ds.to_batches(columns=need, filter=flt, batch_size=batch_size):
                    ok = _visible_rows(batch, ranges)
                    if ok is None:
                        continue
                    sel = batch.filter(pa.array(ok)) if not ok.all() else batch
                    sent = True
                    yield pa.RecordBatch.from_arrays([sel.column(f.name).cast(f.type) for f in schema],
                                                     schema=schema)
                return
            except (OSError, ValueError):
                # a reused handle whose files a compaction with a short retention removed: open the latest once
                if not point or attempt or sent:
                    raise
                with self._lock:
                    self._readers.pop(name, None)

    def _read_dataset(self, name: str, version: int):
        """A handle on ``name`` holding every row store version ``version`` makes visible, reused for up to
        ``_READER_REUSE_S`` (opening a dataset costs a manifest read: a few ms locally, a request on S3).

        Rows are appended before the sources commit that names them, so a handle opened after the manifest of
        ``version`` was read holds all of them; a later version needs a newer handle."""
        now = time.monotonic()
        with self._lock:
            hit = self._readers.get(name)
        if hit is not None and hit[1] >= version and now - hit[2] < _READER_REUSE_S:
            return hit[0]
        ds = self._dataset(name)
        if ds is not None:
            with self._lock:
                self._readers[name] = (ds, version, now)
        return ds

    # ---------------------------------------------------------------- commit
    def commit(self, fragments: Sequence[Any], video_rows: Sequence[dict], expected_version: int | None = None,
               **kw) -> int:
        """``commit_detailed``, returning only the version."""
        return self.commit_detailed(fragments, video_rows, expected_version, **kw).version

    def commit_detailed(self, fragments: Sequence[Any], video_rows: Sequence[dict],
                        expected_version: int | None = None, *, segment_fragments: Sequence[Any] = (),
                        drop_chunks: Sequence[tuple[str, str, int]] = ()) -> CommitResult:
        """Make written rows visible: append their fragments, then merge the sources rows in one commit.

        Args:
            fragments: Lance fragments of ``frames`` written by ``write_frames`` / the write operator
                (``FragmentMetadata``, its JSON, or JSON lists of them).
            video_rows: VIDEOS_SCHEMA rows as dicts, one per source, cumulative over every chunk committed so far,
                plus ``generation`` (who wrote this commit's chunks) and ``first_chunk`` (the first chunk this
                commit adds; 0, the default, starts or replaces the source). ``chunks_committed`` defaults to
                every chunk of the generation.
            expected_version: the version the caller's view is based on (default: latest at call time). A source
                starting from chunk 0 that another committer changed after it is dropped (first committer wins);
                one changed at or before it is replaced.
            segment_fragments: Lance fragments of ``segments`` to append with the same visibility rules.
            drop_chunks: ``(write_id, video_id, chunk_index)`` rows to delete before the sources commit (second
                copies of a chunk a retried task wrote twice).

        Returns:
            What happened: the version created, committed / replaced / dropped video ids.
        """
        # Long: one commit's steps in order (check, append, the sources merge with its retries and the look for a
        # try that landed after all); each step needs what the one before established.
        rows = [dict(r) for r in video_rows]
        ours = [str(r.get(S.VIDEO_ID) or "") for r in rows]
        if any(not v for v in ours):
            raise StoreError("commit: every video row needs a non-empty string video_id")
        if len(set(ours)) != len(ours):
            dup = sorted({v for v in ours if ours.count(v) > 1})
            raise StoreError(f"commit: video_ids repeated in one commit: {dup[:5]}")
        frags = _fragments(fragments, "frames")
        seg_frags = _fragments(segment_fragments, "segments")
        self.create()
        latest = self.latest_version()
        base = latest if expected_version is None else int(expected_version)
        if base > latest or base < 0:
            raise StoreError(f"commit: expected_version {base} but the store's latest is {latest}")
        self._append(FRAMES, frags)
        self._append(SEGMENTS, seg_frags)
        if drop_chunks:
            self._drop_chunks(drop_chunks)
        if not rows:
            return CommitResult(latest, (), (), (), (), False)
        failures = 0
        tried: list[_Plan] = []  # plans whose merge failed with an I/O error (one may have landed)
        for attempt in range(_SOURCES_RETRIES + 1):
            merging = None
            try:
                if attempt:
                    latest = self.latest_version()
                if tried and (landed := self._landed(tried)) is not None:
                    return landed
                plan = self._plan([dict(r) for r in rows], self._live(latest, [r[S.VIDEO_ID] for r in rows]), base)
                if not plan.rows:
                    self._note(plan.conflicts)
                    return CommitResult(latest, (), (), tuple(sorted(plan.dropped)), tuple(plan.conflicts), False)
                if self._before_sources_commit is not None:
                    self._before_sources_commit(latest)
                merging = plan
                return self._merge_sources(plan, tried)
            except _Incompatible as e:  # a concurrent commit touched the same rows' fragments: plan again
                if attempt == _SOURCES_RETRIES:
                    raise CommitConflictError(f"{self.uri}: the sources commit lost {attempt + 1} races; "
                                              f"giving up: {e}") from e
                log.info("%s: sources commit raced (%s); planning again", self.uri, e)
            except (_IOFailure, OSError, ValueError) as e:  # an I/O failure: see whether it landed, else again
                if not _io_error(e):
                    raise
                if merging is not None:
                    tried.append(merging)
                failures += 1
                if failures >= _IO_ATTEMPTS or attempt == _SOURCES_RETRIES:
                    try:
                        landed = self._landed(tried) if tried else None
                    except (_IOFailure, OSError, ValueError) as e2:
                        raise StoreError(f"{self.uri}: the sources commit failed {failures} times, and whether "
                                         f"it landed cannot be read ({e2}): {type(e).__name__}: {e}") from e
                    if landed is not None:
                        return landed
                    raise StoreError(f"{self.uri}: the sources commit failed {failures} times: "
                                     f"{type(e).__name__}: {e}") from e
                log.warning("%s: sources commit failed (%s); trying again", self.uri, e)
                time.sleep(_backoff(failures, 0.1))
                continue
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def _live(self, version: int, video_ids: Sequence[str]) -> dict[str, dict]:
        """The manifest records of ``video_ids`` in ``version`` (read for those ids only: a commit's cost does
        not grow with the store)."""
        with self._lock:
            cached = self._manifests.get(version)
        if cached is not None:
            return {v: cached["videos"][v] for v in video_ids if v in cached["videos"]}
        ds = self._sources(version)
        if ds is None:
            return {}
        out: dict[str, dict] = {}
        ids = sorted(set(video_ids))
        for i in range(0, len(ids), _IN_LIST_MAX):
            table = ds.to_table(columns=_MANIFEST_COLUMNS, filter=_in_filter(S.VIDEO_ID, ids[i:i + _IN_LIST_MAX]))
            out.update((rec.pop("video_id"), rec) for rec in _records(_winners(table)))
        return out

    def _landed(self, tried: list[_Plan]) -> CommitResult | None:
        """The result of a tried sources merge that landed after all (its answer lost, or its write done after the
        client gave up on it), found by its rows' revisions (random: nobody else writes them); None if none did."""
        ds = self._dataset(SOURCES)
        for plan in tried:
            mine = {r[S.VIDEO_ID]: r[REVISION] for r in plan.rows}
            if ds.count_rows(f"{REVISION} IN ({', '.join(str(x) for x in mine.values())})"):
                log.info("%s: a sources commit whose answer was lost had landed", self.uri)
                return self._settle(plan, ds, mine, {r[REVISION] for p in tried for r in p.rows})
        return None

    def _plan(self, rows: list[dict], live: Mapping[str, dict], base: int) -> _Plan:
        """The sources rows to merge (with lineage and revisions), and the videos dropped as stale."""
        plan = _Plan([], [], [], [])
        for r in rows:
            vid = r[S.VIDEO_ID]
            cur = live.get(vid)
            first = int(r.pop("first_chunk", 0) or 0)
            gen = str(r.pop("generation", "") or new_generation())
            why = _stale(cur, first, base)
            if why:
                plan.dropped.append(vid)
                plan.conflicts.append(CommitConflict(vid, why))
                continue
            if cur is not None and first == 0:
                plan.replaced.append(vid)
            gens = list(cur["generations"]) if cur is not None and first > 0 else []
            if not gens or gens[-1][1] != gen:
                gens.append((first, gen))
            r[GENERATIONS] = json.dumps([[a, g] for a, g in gens])
            r[REVISION] = _revision()
            r[BASE_REVISION] = int(cur["revision"]) if cur is not None else 0
            plan.rows.append(r)
        return plan

    def _merge_sources(self, plan: _Plan, tried: Sequence[_Plan] = ()) -> CommitResult:
        """One merge-insert of the planned rows (an update applies only over the revision it read), then which won:
        an update whose base revision was gone did nothing; a concurrent insert of the same video_id may have landed
        twice (the row created first wins; ours is deleted). ``tried``: earlier tries of this commit (a row one of
        them wrote is ours too)."""
        import lance

        table = sources_table(plan.rows)
        ds = self._dataset(SOURCES)
        mine = {r[S.VIDEO_ID]: r[REVISION] for r in plan.rows}
        try:
            txn, _stats = (ds.merge_insert(S.VIDEO_ID)
                           .when_matched_update_all(condition=f"target.{REVISION} = source.{BASE_REVISION}")
                           .when_not_matched_insert_all()
                           .execute_uncommitted(table))
            after = lance.LanceDataset.commit(self.dataset_uri(SOURCES), txn, read_version=ds.version,
                                              storage_options=self.lance_options)
        except (OSError, ValueError, RuntimeError) as e:
            if "conflict" in str(e).lower() or "incompatible" in str(e).lower():
                raise _Incompatible(str(e)) from e
            if not _io_error(e):
                raise StoreError(f"{self.uri}: the sources commit failed: {type(e).__name__}: {e}") from e
            raise _IOFailure(f"{type(e).__name__}: {e}") from e  # it may have landed: the caller looks
        try:  # it landed: what follows is tried again on I/O errors, never planned again
            return self._settle(plan, after, mine, {r[REVISION] for p in tried for r in p.rows})
        except (OSError, ValueError, StoreError) as e:
            raise StoreError(f"{self.uri}: the sources commit landed, but checking its rows failed: {e}") from e

    def _settle(self, plan: _Plan, after, mine: dict[str, int], earlier: Collection[int] = ()) -> CommitResult:
        """Which of a landed sources commit's rows won (losing duplicate inserts deleted), as a CommitResult; a row
        written by an ``earlier`` try of the same commit (its revision) counts as ours."""
        got = self._retry("reading the committed sources rows", lambda: after.to_table(
            columns=[S.VIDEO_ID, REVISION, _CREATED, _UPDATED], filter=_in_filter(S.VIDEO_ID, sorted(mine))))
        revs = set(mine.values()) | set(earlier)  # every try's rows are ours
        won = _winners(got)
        winners = dict(zip(*(won.column(c).to_pylist() for c in (S.VIDEO_ID, REVISION))))
        lost = sorted(v for v in mine if winners.get(v) not in revs)
        losers = sorted((set(got.column(REVISION).to_pylist()) & revs) - set(winners.values()))  # our duplicates
        ours = [u for r, u in zip(won.column(REVISION).to_pylist(), won.column(_UPDATED).to_pylist()) if r in revs]
        version = (max(ours) if ours else int(after.version)) - _V0  # the version our commit created
        if losers:
            self._retry("deleting duplicate sources rows", lambda: self._dataset(SOURCES).delete(
                f"{REVISION} IN ({', '.join(str(x) for x in losers)})"))
        conflicts = plan.conflicts + [CommitConflict(v, "another committer changed this video first") for v in lost]
        self._note(conflicts)
        committed = tuple(sorted(set(mine) - set(lost)))
        dropped = tuple(sorted(plan.dropped + lost))
        if not committed:
            return CommitResult(self.latest_version(), (), (), dropped, tuple(conflicts), False)
        return CommitResult(version, committed, tuple(sorted(set(plan.replaced) - set(lost))), dropped,
                            tuple(conflicts), True)

    def _note(self, conflicts: list[CommitConflict]) -> None:
        if conflicts:
            with self._lock:
                self.conflicts.extend(conflicts)
            log.info("%s: %d videos lost to other committers", self.uri, len(conflicts))

    def _retry(self, what: str, step):
        """``step()``, tried again after an I/O error (one that outlasted the client's own retries) up to
        ``_IO_ATTEMPTS`` times in all; then StoreError naming what failed and why. Only for steps safe to repeat."""
        for attempt in range(_IO_ATTEMPTS):
            try:
                return step()
            except (_IOFailure, OSError, ValueError) as e:
                if not _io_error(e):
                    raise
                if attempt == _IO_ATTEMPTS - 1:
                    raise StoreError(f"{self.uri}: {what} failed {attempt + 1} times: {type(e).__name__}: {e}") \
                        from e
                log.warning("%s: %s failed (%s); trying again", self.uri, what, e)
                time.sleep(_backoff(attempt + 1, 0.1))
        raise AssertionError("unreachable")

    def _append(self, name: str, frags: list) -> None:
        """Append fragments in one commit, once: those whose data files the dataset holds already (an earlier try
        of this commit landed) are left out, so the step is safe to repeat."""
        if not frags:
            return
        import lance

        def attempt() -> None:
            ds = self._dataset(name)
            have = {f.path for frag in ds.get_fragments() for f in frag.metadata.files}
            todo = [f for f in frags if not any(d.path in have for d in f.files)]
            if todo:
                lance.LanceDataset.commit(self.dataset_uri(name), lance.LanceOperation.Append(todo),
                                          read_version=ds.version, storage_options=self.lance_options)

        self._retry(f"appending to {name}.lance", attempt)

    def _drop_chunks(self, drops: Sequence[tuple[str, str, int]]) -> None:
        preds = [f"({WRITE_ID} = {_sql_str(w)} AND {S.VIDEO_ID} = {_sql_str(v)} AND {S.CHUNK_INDEX} = {int(c)})"
                 for w, v, c in drops]
        for name in (FRAMES, SEGMENTS):
            for i in range(0, len(preds), 200):  # deleting is idempotent: safe to repeat
                self._retry("deleting second copies of chunks",
                            lambda i=i, name=name: self._dataset(name).delete(" OR ".join(preds[i:i + 200])))

    def add_videos(self, frames: pa.Table | None, video_rows: Sequence[dict], *, segments: pa.Table | None = None,
                   expected_version: int | None = None) -> CommitResult:
        """Write whole videos and commit them in one call (one new generation; every chunk of it visible).

        Args:
            frames: FRAMES_SCHEMA rows of the videos (None or empty: none).
            video_rows: one VIDEOS_SCHEMA row per video.
            segments: SEGMENTS_SCHEMA rows of the videos, if any.
            expected_version: as for ``commit_detailed``.
        """
        generation = new_generation()
        frags = self.write_frames(frames, generation) if frames is not None and frames.num_rows else []
        seg = self.write_segments(segments, generation) if segments is not None and segments.num_rows else []
        rows = [{**r, "generation": generation, "first_chunk": 0} for r in video_rows]
        return self.commit_detailed(frags, rows, expected_version, segment_fragments=seg)

    # ---------------------------------------------------------------- writing rows (for the write operator)
    def write_frames(self, table: pa.Table, generation: str, write_id: str | None = None) -> list[dict]:
        """Write FRAMES_SCHEMA rows as new Lance fragments (invisible until a commit names their chunks).

        Returns:
            The fragments' metadata (JSON-able dicts), for ``commit``.
        """
        return self._write(FRAMES, table, generation, write_id)

    def write_segments(self, table: pa.Table, generation: str, write_id: str | None = None) -> list[dict]:
        """Write SEGMENTS_SCHEMA rows as new Lance fragments (for ``commit(..., segment_fragments=...)``)."""
        return self._write(SEGMENTS, table, generation, write_id)

    def _write(self, name: str, table: pa.Table, generation: str, write_id: str | None) -> list[dict]:
        from lance.fragment import write_fragments

        self.create()
        base = S.FRAMES_SCHEMA if name == FRAMES else S.SEGMENTS_SCHEMA
        n = table.num_rows
        table = table.select(base.names).cast(base)
        table = table.append_column(GENERATION, pa.array([generation] * n, pa.string()))
        table = table.append_column(WRITE_ID, pa.array([write_id or uuid.uuid4().hex] * n, pa.string()))
        table = table.append_column(WRITTEN_AT, pa.array([time.time()] * n, pa.float64()))
        table = table.cast(_SCHEMAS[name])
        fmt = self._formats.get(name)
        if fmt is None:  # the dataset's own format (a store created by an older release keeps its own)
            ds = self._dataset(name)
            fmt = self._formats[name] = ds.data_storage_version if ds is not None else DATA_STORAGE_VERSION
        frags = self._retry(f"writing {name} rows", lambda: write_fragments(  # new files each try: safe to repeat
            table, self.dataset_uri(name), schema=_SCHEMAS[name], mode="append", storage_options=self.lance_options,
            max_bytes_per_file=TARGET_FRAGMENT_BYTES, data_storage_version=fmt))
        return [f.to_json() for f in frags]

    # ---------------------------------------------------------------- maintenance
    def compact(self, retention_s: float = DEFAULT_RETENTION_S, target_bytes: int = TARGET_FRAGMENT_BYTES,
                grace_s: float | None = None) -> dict:
        """Remove invisible rows, merge small fragments, bring the ``video_id`` indexes up to date, and clean up
        versions older than ``retention_s``.

        Readers keep working: compaction commits new versions holding the same visible rows, and the files of
        older versions stay until they are older than the retention.

        Args:
            retention_s: versions (and their files) older than this are deleted; 0 keeps only the latest.
            target_bytes: fragments are merged up to about this size.
            grace_s: invisible rows younger than this are kept (a job may be about to commit them); default
                ``retention_s``.

        Returns:
            ``{"removed_rows", "fragments_before", "fragments_after", "versions_removed", "bytes_removed"}``.
        """
        from datetime import timedelta

        if not self._check_format():
            return {"removed_rows": 0, "fragments_before": 0, "fragments_after": 0, "versions_removed": 0,
                    "bytes_removed": 0}
        grace = retention_s if grace_s is None else grace_s
        out = {"removed_rows": 0, "fragments_before": 0, "fragments_after": 0, "versions_removed": 0,
               "bytes_removed": 0}
        m = self.manifest()
        for name in (FRAMES, SEGMENTS):
            ds = self._dataset(name)
            if ds is None:
                continue
            out["removed_rows"] += self._remove_invisible(name, ds, m, grace)
        for name in (SOURCES, FRAMES, SEGMENTS):
            ds = self._dataset(name)
            if ds is None:
                continue
            sizes = fragment_bytes(ds)
            out["fragments_before"] += len(sizes)
            row_bytes = max(1, sum(sizes) // max(ds.count_rows(), 1))
            ds.optimize.compact_files(target_rows_per_fragment=max(1024, target_bytes // row_bytes),
                                      max_bytes_per_file=int(target_bytes * 2), materialize_deletions=True,
                                      materialize_deletions_threshold=0.05)
            ds = self._dataset(name)
            _ensure_video_index(ds)
            ds = self._dataset(name)
            out["fragments_after"] += len(ds.get_fragments())
            stats = ds.cleanup_old_versions(older_than=timedelta(seconds=max(0.0, retention_s)))
            out["versions_removed"] += int(getattr(stats, "old_versions", 0) or 0)
            out["bytes_removed"] += int(getattr(stats, "bytes_removed", 0) or 0)
        return out

    def maybe_compact(self, retention_s: float = DEFAULT_RETENTION_S, max_small: int = 64) -> dict | None:
        """The automatic policy: ``compact`` when ``frames`` holds more than ``max_small`` fragments beyond what its
        size needs (at ``TARGET_FRAGMENT_BYTES`` each); returns what ``compact`` did, or None when not needed."""
        ds = self._dataset(FRAMES) if self._check_format() else None
        if ds is None:
            return None
        sizes = fragment_bytes(ds)
        if len(sizes) <= sum(sizes) // TARGET_FRAGMENT_BYTES + 1 + max_small:
            return None
        return self.compact(retention_s=retention_s)

    def _remove_invisible(self, name: str, ds, m: dict, grace_s: float) -> int:
        """Delete rows of ``ds`` no source row makes visible and older than ``grace_s``."""
        vis: dict[str, list[tuple[str, int, int]]] = {}
        for vid, rec in m["videos"].items():
            vis[vid] = visible_ranges(rec["generations"], rec["chunks_committed"], rec["status"])
        now = time.time()
        doomed: set[tuple[str, str]] = set()  # (write_id, video_id) groups holding invisible rows
        cols = [S.VIDEO_ID, GENERATION, S.CHUNK_INDEX, WRITE_ID, WRITTEN_AT]
        for b in ds.to_batches(columns=cols, filter=f"{WRITTEN_AT} < {now - grace_s!r}"):
            d = b.to_pydict()
            for vid, gen, ci, wid in zip(d[S.VIDEO_ID], d[GENERATION], d[S.CHUNK_INDEX], d[WRITE_ID]):
                if not any(g == gen and a <= ci < e for g, a, e in vis.get(vid, ())):
                    doomed.add((wid, vid))
        if not doomed:
            return 0
        before = ds.count_rows()
        keep_pred = []
        for vid in sorted({v for _, v in doomed}):
            keep = " OR ".join(f"({GENERATION} = {_sql_str(g)} AND {S.CHUNK_INDEX} >= {a} AND {S.CHUNK_INDEX} < {e})"
                               for g, a, e in vis.get(vid, ())) or "false"
            wids = sorted(w for w, v in doomed if v == vid)
            keep_pred.append(f"({S.VIDEO_ID} = {_sql_str(vid)} AND {_in_filter(WRITE_ID, wids)} "
                             f"AND {WRITTEN_AT} < {now - grace_s!r} AND NOT ({keep}))")
        for i in range(0, len(keep_pred), 100):
            ds.delete(" OR ".join(keep_pred[i:i + 100]))
        return before - self._dataset(name).count_rows()

    def file_count(self) -> int:
        """Files under the store root (data, deletion, manifest and transaction files of all datasets)."""
        if is_local(self.fs):
            return sum(len(files) for _, _, files in os.walk(self.root))
        return len(self.fs.find(self.root))

    # ---------------------------------------------------------------- stats
    def stats(self, version: int | None = None) -> dict:
        """Counts from the sources dataset alone: videos by status, frames, duration, fragments."""
        m = self.manifest(version)
        out = {"version": m["version"], **m["counts"]}
        ds = self._dataset(FRAMES)
        out["frames_fragments"] = len(ds.get_fragments()) if ds is not None else 0
        return out

    def payload_stats(self, version: int | None = None) -> dict[str, dict]:
        """Token payload bytes per video-hour, per layout (reads the token columns; for benchmarks).

        Returns:
            ``{layout: {"videos", "frames", "hours", "global_bytes", "grid_bytes", "patch_bytes",
            "payload_bytes", "bytes_per_hour", "global_bytes_per_hour"}}``. ``global_bytes`` counts the
            global tokens and their scales; hours are the videos' decoded ``duration_s``.
        """
        cols = [S.VIDEO_ID, S.LAYOUT, S.GLOBAL_TOKEN, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_INDEX,
                S.PATCH_TOKENS, S.PATCH_SCALES]
        frames = self.read_frames(version, columns=cols)
        videos = self.read_videos(version)
        dur = dict(zip(videos[S.VIDEO_ID].to_pylist(), videos[S.DURATION_S].to_pylist()))
        out: dict[str, dict] = {}
        if not len(frames):
            return out

        def nbytes(col):
            return pc.fill_null(pc.binary_length(frames[col]), 0).to_numpy().astype(np.int64)

        g = nbytes(S.GLOBAL_TOKEN) + SCALE_DTYPE.itemsize
        grid = nbytes(S.GRID_TOKENS) + nbytes(S.GRID_SCALES)
        patch = nbytes(S.PATCH_INDEX) + nbytes(S.PATCH_TOKENS) + nbytes(S.PATCH_SCALES)
        layouts = np.asarray(frames[S.LAYOUT].to_pylist(), dtype=object)
        vids = np.asarray(frames[S.VIDEO_ID].to_pylist(), dtype=object)
        for layout in sorted(set(layouts)):
            sel = layouts == layout
            these = set(vids[sel])
            hours = sum(float(dur.get(v) or 0.0) for v in these) / 3600.0
            total = int(g[sel].sum() + grid[sel].sum() + patch[sel].sum())
            out[layout] = {
                "videos": len(these),
                "frames": int(sel.sum()),
                "hours": hours,
                "global_bytes": int(g[sel].sum()),
                "grid_bytes": int(grid[sel].sum()),
                "patch_bytes": int(patch[sel].sum()),
                "payload_bytes": total,
                "bytes_per_hour": total / hours if hours > 0 else float("nan"),
                "global_bytes_per_hour": int(g[sel].sum()) / hours if hours > 0 else float("nan"),
            }
        return out


# ================================================================ helpers


def _manifest(version: int, videos: dict, counts: dict | None = None) -> dict:
    if counts is None:
        counts = {"videos": 0, "by_status": {}, "frames": 0, "duration_s": 0.0}
        for rec in videos.values():
            _count(counts, rec, +1)
    counts["by_status"] = {k: n for k, n in sorted(counts["by_status"].items()) if n}
    return {"format": STORE_FORMAT, "schema_version": S.SCHEMA_VERSION, "version": version, "videos": videos,
            "counts": counts}


def _count(counts: dict, rec: dict, sign: int) -> None:
    """Add (``sign`` = 1) or remove (-1) a video record's share of a manifest's counts."""
    counts["videos"] += sign
    counts["by_status"][rec["status"]] = counts["by_status"].get(rec["status"], 0) + sign
    counts["frames"] += sign * int(rec.get("frames_kept") or 0)
    counts["duration_s"] += sign * float(rec.get("duration_s") or 0.0)


_MANIFEST_COLUMNS = [S.VIDEO_ID, S.URI, S.SIZE_BYTES, S.MTIME, S.STATUS, S.ERROR_TYPE, S.CONFIG_HASH, S.FRAMES_KEPT,
                     S.DURATION_S, S.CHUNKS_COMMITTED, S.RESUME_S, S.NEXT_FRAME_INDEX, GENERATIONS, REVISION,
                     _CREATED, _UPDATED]


def _records(table: pa.Table) -> Iterator[dict]:
    """Per-video records of sources rows (the manifest's entries), column by column."""
    cols = {c: table.column(c).to_pylist() for c in _MANIFEST_COLUMNS}
    for i, vid in enumerate(cols[S.VIDEO_ID]):
        yield {
            "video_id": vid,
            "uri": cols[S.URI][i],
            "size_bytes": _none_if_nan(cols[S.SIZE_BYTES][i]),
            "mtime": _none_if_nan(cols[S.MTIME][i]),
            "status": cols[S.STATUS][i],
            "error_type": cols[S.ERROR_TYPE][i],
            "config_hash": cols[S.CONFIG_HASH][i],
            "frames_kept": int(cols[S.FRAMES_KEPT][i] or 0),
            "duration_s": _none_if_nan(cols[S.DURATION_S][i]),
            "chunks_committed": cols[S.CHUNKS_COMMITTED][i],
            "resume_s": _none_if_nan(cols[S.RESUME_S][i]),
            "next_frame_index": cols[S.NEXT_FRAME_INDEX][i],
            "generations": parse_generations(cols[GENERATIONS][i]),
            "revision": int(cols[REVISION][i]),
            "committed_version": int(cols[_UPDATED][i]) - _V0,
            "created_version": int(cols[_CREATED][i]) - _V0,
        }


def _stale(cur: dict | None, first: int, base: int) -> str | None:
    """Why a row starting at chunk ``first`` may not be committed over ``cur`` (None: it may)."""
    if first == 0:
        if cur is not None and cur["committed_version"] > base:
            return f"committed by another committer at v{cur['committed_version']}, after v{base}"
        return None
    if cur is None:
        return f"continues from chunk {first}, but the store has no row for it"
    if cur["status"] != S.STATUS_PARTIAL or int(cur["chunks_committed"] or 0) != first:
        return (f"continues from chunk {first}, but the store's row is {cur['status']} with "
                f"{cur['chunks_committed']} chunks")
    return None


def _winners(table: pa.Table) -> pa.Table:
    """One row per video_id: the one created first (a concurrent duplicate insert loses)."""
    if table.num_rows < 2:
        return table
    vids = table.column(S.VIDEO_ID)
    if len(pc.unique(vids)) == table.num_rows:
        return table
    order = pc.sort_indices(table, sort_keys=[(S.VIDEO_ID, "ascending"), (_CREATED, "ascending")])
    table = table.take(order)
    v = table.column(S.VIDEO_ID).to_pylist()
    first = [i for i in range(len(v)) if i == 0 or v[i] != v[i - 1]]
    return table.take(pa.array(first, pa.int64()))


def _fragments(items: Sequence[Any], what: str) -> list:
    """FragmentMetadata objects from objects, JSON strings or JSON lists of them."""
    from lance.fragment import FragmentMetadata

    out = []
    for it in items or ():
        if it is None or it == "":
            continue
        if isinstance(it, FragmentMetadata):
            out.append(it)
            continue
        s = it if isinstance(it, str) else json.dumps(it)
        try:
            parsed = json.loads(s)
        except ValueError as e:
            raise StoreError(f"commit: a {what} fragment is not JSON: {e}") from None
        for one in parsed if isinstance(parsed, list) else [parsed]:
            out.append(FragmentMetadata.from_json(one if isinstance(one, str) else json.dumps(one)))
    return out


def _ensure_video_index(ds) -> None:
    """A BTREE index on ``video_id`` (created when missing, else extended over the fragments added since): a
    reader's ``video_id IN (...)`` filter reads the rows it wants instead of scanning the dataset."""
    if any(ix.get("fields") == [S.VIDEO_ID] for ix in ds.list_indices()):
        ds.optimize.optimize_indices()
    else:
        ds.create_scalar_index(S.VIDEO_ID, "BTREE")


def fragment_bytes(ds) -> list[int]:
    """Bytes of each fragment's data files (from the dataset's manifest; nothing is read)."""
    return [sum(int(f.get("file_size_bytes") or 0) for f in frag.metadata.to_json().get("files", []))
            for frag in ds.get_fragments()]


def sources_table(rows: Sequence[dict]) -> pa.Table:
    """SOURCES_SCHEMA table from row dicts (NaN mtime etc. allowed); StoreError on a missing required value."""
    cols = {}
    for f in SOURCES_SCHEMA:
        vals = [_arrow_value(r.get(f.name), f.type) for r in rows]
        if not f.nullable and any(v is None for v in vals):
            raise StoreError(f"video rows: column {f.name!r} is required but missing in some rows")
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.Table.from_pydict(cols, schema=SOURCES_SCHEMA)


def videos_table(rows: Sequence[dict]) -> pa.Table:
    """VIDEOS_SCHEMA table from row dicts (what readers get)."""
    return sources_table([{**r, GENERATIONS: "[]", REVISION: 0, BASE_REVISION: 0} for r in rows]) \
        .select(S.VIDEOS_SCHEMA.names).cast(S.VIDEOS_SCHEMA)


def _arrow_value(v, typ: pa.DataType):
    v = _none_if_nan(v) if not isinstance(v, (str, bytes)) else v
    if v is None:
        return None
    if pa.types.is_integer(typ):
        return int(v)
    if pa.types.is_floating(typ):
        return float(v)
    if pa.types.is_string(typ):
        return str(v)
    return v


def _project(schema: pa.Schema, columns: Sequence[str] | None) -> pa.Schema:
    if columns is None:
        return schema
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise StoreError(f"unknown column(s) {unknown}; the table has {schema.names}")
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


# ================================================================ driver-side ledger


class ChunkLedger:
    """Driver-side aggregation of the write operator's per-chunk rows into time-ranged commits.

    The write operator returns one small row per chunk (its fragments, per-chunk counts, the video columns). Each
    ``commit`` commits, per source, the chunks that continue its committed prefix without a gap: ``partial`` rows
    while the last chunk has not arrived, the final ``ok`` / ``failed`` row once it has. A chunk seen twice (a
    retried task) counts once; the other copy is deleted before the commit. Not thread-safe: one driver loop feeds
    it.

    Args:
        base: ``{video_id: manifest record}`` of partial sources this job resumes (their committed chunks, counts
            and where they stopped); others start at chunk 0.
    """

    def __init__(self, base: Mapping[str, dict] | None = None) -> None:
        self._chunks: dict[str, dict[int, dict]] = {}  # vid -> chunk_index -> row (first copy wins)
        self._last: dict[str, int] = {}  # vid -> index of its last chunk
        self._next: dict[str, int] = {}  # vid -> first chunk not yet committed
        self._totals: dict[str, dict] = {}  # vid -> counts and progress committed so far
        self._fragments: dict[str, list[str]] = {}  # write_id -> fragments not yet appended
        self._segment_fragments: dict[str, list[str]] = {}  # write_id -> segments fragments not yet appended
        self._drops: list[tuple[str, str, int]] = []  # second copies of chunks, to delete
        self._done: set[str] = set()  # finished by this ledger: late duplicates are ignored
        self.duplicates = 0
        for vid, rec in (base or {}).items():
            self._next[vid] = int(rec.get("chunks_committed") or 0)
            self._totals[vid] = {k: int(rec.get(k) or 0) for k in _COUNTS if k in rec}
            self._totals[vid][S.NEXT_FRAME_INDEX] = int(rec.get("next_frame_index") or 0)

    def add(self, rows) -> None:
        """Add write-operator output: a numpy-format batch, a pa.Table, or an iterable of row dicts."""
        for r in _iter_rows(rows):
            vid = str(r[S.VIDEO_ID])
            wid = str(r.get(WRITE_ID) or "")
            ci = int(_none_if_nan(r.get(S.CHUNK_INDEX)) or 0)
            if wid and r.get(FRAMES_FILE) and wid not in self._fragments:
                self._fragments[wid] = [r[FRAMES_FILE]]
            if wid and r.get(SEGMENTS_FILE) and wid not in self._segment_fragments:
                self._segment_fragments[wid] = [r[SEGMENTS_FILE]]
            if vid in self._done or ci < self._next.get(vid, 0) or ci in self._chunks.get(vid, {}):
                self.duplicates += 1
                if wid and (r.get(FRAMES_FILE) or r.get(SEGMENTS_FILE)):
                    self._drops.append((wid, vid, ci))
                continue
            self._chunks.setdefault(vid, {})[ci] = r
            if bool(r.get(S.IS_LAST)):
                self._last[vid] = ci

    def complete_video_ids(self) -> list[str]:
        """Videos whose every chunk up to the last has arrived."""
        return sorted(v for v, last in self._last.items()
                      if all(i in self._chunks[v] for i in range(self._next.get(v, 0), last + 1)))

    def pending(self) -> dict[str, list[int] | None]:
        """Unfinished videos: missing chunk indices, or None while the last chunk is unknown."""
        out: dict[str, list[int] | None] = {}
        for vid, chunks in self._chunks.items():
            last = self._last.get(vid)
            if last is None:
                out[vid] = None
            else:
                missing = [i for i in range(self._next.get(vid, 0), last + 1) if i not in chunks]
                if missing:
                    out[vid] = missing
        return out

    def take_ready(self, indexed_at: float | None = None) -> tuple[list[str], list[dict], list[tuple], list[str]]:
        """Remove what can be committed now; return ``(fragments, video_rows, drop_chunks, segment_fragments)``
        for ``commit``."""
        indexed_at = time.time() if indexed_at is None else indexed_at
        rows = []
        for vid in sorted(self._chunks):
            row = self._take(vid, indexed_at)
            if row is not None:
                rows.append(row)
        frags = [f for fs in self._fragments.values() for f in fs]
        seg_frags = [f for fs in self._segment_fragments.values() for f in fs]
        self._fragments, self._segment_fragments = {}, {}
        drops, self._drops = self._drops, []
        return frags, rows, drops, seg_frags

    def _take(self, vid: str, indexed_at: float) -> dict | None:
        # Long: one source's next commit: the gap-free run of chunks after its committed prefix, its counts added to
        # what was committed before, and the status that run gives the source.
        chunks = self._chunks[vid]
        first = self._next.get(vid, 0)
        run: list[dict] = []
        while first + len(run) in chunks:
            run.append(chunks[first + len(run)])
        if not run:
            return None
        last = self._last.get(vid)
        final = last is not None and first + len(run) - 1 == last
        newest = run[-1]
        row = {name: _none_if_nan(newest.get(name)) for name in VIDEO_ROW_COLUMNS}
        row[S.VIDEO_ID] = vid
        totals = self._totals.setdefault(vid, {})
        for c in run:
            for k in (*_COUNTS, S.FRAMES_IN):
                totals[k] = totals.get(k, 0) + int(_none_if_nan(c.get(k)) or 0)
            for k in (S.ENCODER, S.ENCODER_REVISION, S.SPACE):
                if row.get(k) is None and c.get(k):
                    row[k] = c.get(k)
        totals[S.NEXT_FRAME_INDEX] = totals.get(S.NEXT_FRAME_INDEX, 0) + sum(
            int(_none_if_nan(c.get(S.FRAMES_IN)) or 0) for c in run)
        errors = [(int(c[S.CHUNK_INDEX]), c.get(CHUNK_ERROR)) for c in run if c.get(CHUNK_ERROR)]
        if errors and row.get(S.STATUS) != S.STATUS_FAILED:
            row[S.STATUS] = S.STATUS_FAILED
            row[S.ERROR_TYPE] = S.ERR_INTERNAL
            row[S.ERROR] = f"chunk {errors[0][0]}: {errors[0][1]}"
            final = True
        failed = row.get(S.STATUS) == S.STATUS_FAILED
        for k in _COUNTS:
            row[k] = totals.get(k, 0)
        if failed:  # a failed video grants no frames: it is not indexed (a retry replaces it whole)
            row[S.FRAMES_KEPT] = row[S.TOKENS] = row[S.STORED_BYTES] = 0
        elif not final:
            row[S.STATUS] = S.STATUS_PARTIAL
            row[S.ERROR_TYPE] = row[S.ERROR] = None
        end = first + len(run)
        row[S.CHUNKS_COMMITTED] = 0 if failed else end
        row[S.RESUME_S] = _none_if_nan(newest.get(CHUNK_END_S))
        row[S.NEXT_FRAME_INDEX] = totals[S.NEXT_FRAME_INDEX]
        if not final:
            row[S.DURATION_S] = row[S.RESUME_S]
            row[S.FRAMES_SAMPLED] = totals[S.NEXT_FRAME_INDEX]
        row[S.INDEXED_AT] = float(indexed_at)
        row["first_chunk"] = first
        row["generation"] = str(newest.get(GENERATION) or "")
        for i in range(first, end):
            del chunks[i]
        self._next[vid] = end
        if final:
            self._chunks.pop(vid, None)
            self._last.pop(vid, None)
            self._done.add(vid)
        return row

    def commit(self, store: TokenStore, expected_version: int | None = None) -> CommitResult | None:
        """Commit what is ready; None when nothing is. On failure everything stays in the ledger."""
        snapshot = ({v: dict(c) for v, c in self._chunks.items()}, dict(self._last), dict(self._next),
                    {v: dict(t) for v, t in self._totals.items()}, dict(self._fragments),
                    dict(self._segment_fragments), list(self._drops), set(self._done))
        frags, rows, drops, seg_frags = self.take_ready()
        if not rows and not frags and not drops and not seg_frags:
            return None
        try:
            result = store.commit_detailed(frags, rows, expected_version=expected_version, drop_chunks=drops,
                                           segment_fragments=seg_frags)
        except BaseException:
            (self._chunks, self._last, self._next, self._totals, self._fragments, self._segment_fragments,
             self._drops, self._done) = snapshot
            raise
        for vid in result.dropped_video_ids:  # another committer owns it now: stop feeding it
            self._chunks.pop(vid, None)
            self._last.pop(vid, None)
            self._done.add(vid)
        return result if rows else None


def _iter_rows(rows) -> Iterator[dict]:
    if isinstance(rows, pa.Table):
        yield from rows.to_pylist()
    elif isinstance(rows, dict):
        n = len(next(iter(rows.values()))) if rows else 0
        for i in range(n):
            yield {k: _none_if_nan(v[i]) if not isinstance(v[i], (str, bytes)) else v[i] for k, v in rows.items()}
    else:
        yield from (dict(r) for r in rows)
