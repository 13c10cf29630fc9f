"""The v1 token store (ray-vlm 0.1): Parquet files on any fsspec filesystem, made visible by create-only manifests.

Stores are v2 (Lance, ``ray_vlm.store.token_store``) since schema version 2. This module stays to read v1 stores
for ``ray-vlm migrate`` and to write them for the scale benchmark's comparison; the index job never writes v1.

Layout under the store root (a local directory or ``s3://bucket/prefix``)::

    _manifests/v00000001.json      one immutable JSON snapshot per committed version
    data/frames/part-*.parquet     FRAMES_SCHEMA rows (one per kept frame), written by the write operator
    data/videos/part-*.parquet     VIDEOS_SCHEMA rows (one per input), written by ``V1Store.commit``

Commit protocol. Data files are written first under unique staging names (a uuid4 in every name, so a
retried task never overwrites a file that a manifest names). A version becomes visible only when its
manifest is created, create-only: locally by ``os.link`` of a fully written temp file (fails if the name
exists, atomic), on S3 by a PUT with ``If-None-Match: *`` (412 when the name exists). Readers trust only
manifests, so files written by a killed job are invisible orphans (``vacuum`` lists and deletes them).

A manifest is a full snapshot: every live file, and for each file the ``video_ids`` whose rows it *grants*
(optionally narrowed to some ``chunks`` of a video). Readers take only granted rows, which makes a file
that also holds rows of a replaced video, or a duplicate chunk written by a retried task, harmless.
The manifest also keeps a small per-video index (uri, size, mtime, status, config hash, the version that
committed it) so a rerun can skip committed inputs without opening a Parquet file.

Video semantics. A video_id has at most one live videos row. Committing a video_id that is already live
*replaces* its row and all its frame grants (what a retry of failed videos needs), unless another
committer committed that video_id after the version this commit is based on (``expected_version``): then
the first committer wins and the video is dropped from this commit (``CommitResult.dropped_video_ids``).

Vectors: ``ray_vlm.store.codec``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc

from ray_vlm.core import schema as S
from ray_vlm.core.files import arrow_filesystem, create_only, is_local, list_versions, put_bytes, s3_http_status
from ray_vlm.store.errors import CommitConflictError, StoreError
from ray_vlm.store.token_store import _arrow_value, _none_if_nan, _project, store_filesystem

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "ray-vlm/manifest/v1"
V1_SCHEMA_VERSION = 1
# The videos table of a v1 store: today's columns up to ``indexed_at`` (v2 added the progress columns).
V1_VIDEOS_SCHEMA = pa.schema(
    [f for f in S.VIDEOS_SCHEMA if f.name not in (S.CHUNKS_COMMITTED, S.RESUME_S, S.NEXT_FRAME_INDEX)],
    metadata={b"ray_vlm.schema_version": b"1", b"ray_vlm.table": b"videos"},
)
MANIFEST_DIR = "_manifests"
FRAMES_DIR = "data/frames"
VIDEOS_DIR = "data/videos"


_MANIFEST_CACHE = 8  # parsed manifests kept per V1Store




def _short_hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def staging_name(directory: str, key_parts: Sequence[Any]) -> str:
    """``<directory>/part-<hash(key_parts)>-<uuid4>.parquet`` (store-relative).

    The hash names the content (which chunks, which config) for humans and tools; the uuid makes every
    attempt's file distinct, so a retried task never overwrites a file some manifest already names.
    """
    return f"{directory}/part-{_short_hash(*key_parts)}-{uuid.uuid4().hex}.parquet"


def _clean_rel(path: str) -> str:
    p = posixpath.normpath(path.replace("\\", "/"))
    if p.startswith("/") or p == ".." or p.startswith("../") or "://" in p:
        raise StoreError(f"store file path {path!r} is not relative to the store root")
    return p


# ================================================================ store


@dataclasses.dataclass(frozen=True)
class CommitConflict:
    """One lost race for a manifest version (kept so callers and tests can see it happened)."""

    version: int
    http_status: int | None  # 412 on S3 (If-None-Match); None on local disks (os.link EEXIST)
    error: str


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """What ``V1Store.commit_detailed`` did."""

    version: int  # the version this commit created, or the latest version if nothing was left to commit
    committed_video_ids: tuple[str, ...]
    replaced_video_ids: tuple[str, ...]  # were live before and are replaced by this commit
    dropped_video_ids: tuple[str, ...]  # another committer committed them after the base version
    conflicts: tuple[CommitConflict, ...]
    created: bool  # False when every video was dropped (no manifest written)


class V1Store:
    """A versioned token store on a local directory or any fsspec URL (``s3://bucket/prefix``).

    Thread-safe for concurrent readers and committers (each commit is optimistic and retried); several
    processes or machines may commit to one store at once.

    Args:
        uri: store root.
        storage_options: passed to the filesystem (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
    """

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = store_filesystem(uri, self.storage_options)
        self.root = root.rstrip("/") or root
        self._manifests: dict[int, dict] = {}  # immutable once created: safe to cache (last few kept)
        self._pafs = None  # pyarrow view of self.fs, made on first read
        self._lock = threading.Lock()
        self.conflicts: list[CommitConflict] = []  # every lost race of this instance, oldest first
        self._before_create = None  # test hook: called with the version just before each create attempt

    def __repr__(self) -> str:
        return f"V1Store({self.uri!r})"

    # ---------------------------------------------------------------- paths
    def path(self, rel: str) -> str:
        """Filesystem path of a store-relative path."""
        return f"{self.root}/{_clean_rel(rel)}"

    def _manifest_path(self, version: int) -> str:
        return f"{self.root}/{MANIFEST_DIR}/v{version:08d}.json"

    # ---------------------------------------------------------------- versions
    def versions(self) -> list[int]:
        """All committed versions, ascending (lists ``_manifests/`` afresh every call)."""
        return list_versions(self.fs, f"{self.root}/{MANIFEST_DIR}")

    def latest_version(self) -> int:
        """The newest committed version (0 for an empty or missing store)."""
        v = self.versions()
        return v[-1] if v else 0

    def manifest(self, version: int | None = None) -> dict:
        """The manifest of ``version`` (default: latest). Version 0 is the empty store.

        Raises:
            StoreError: the version does not exist, or was written by a newer, unknown schema.
        """
        if version is None:
            version = self.latest_version()
        version = int(version)
        if version == 0:
            return _empty_manifest()
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        path = self._manifest_path(version)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(f"{self.uri}: version {version} does not exist") from None
        try:
            m = json.loads(raw)
        except ValueError as e:
            raise StoreError(f"{self.uri}: manifest v{version} is not valid JSON: {e}") from None
        _check_manifest(m, self.uri, version)
        self._remember(version, m)
        return m

    def _remember(self, version: int, m: dict) -> None:
        with self._lock:
            self._manifests[version] = m
            while len(self._manifests) > _MANIFEST_CACHE:
                self._manifests.pop(min(self._manifests))

    # ---------------------------------------------------------------- what is committed
    def committed_video_ids(self, statuses: Iterable[str] | None = None, config_hash: str | None = None,
                            version: int | None = None) -> set[str]:
        """Video ids live in a version, optionally only those with one of ``statuses`` / a config hash."""
        want = set(statuses) if statuses is not None else None
        vids = self.manifest(version)["videos"]
        return {
            vid for vid, rec in vids.items()
            if (want is None or rec["status"] in want) and (config_hash is None or rec["config_hash"] == config_hash)
        }

    def committed_inputs(self, version: int | None = None) -> dict[str, tuple[int | None, float | None, str]]:
        """``{uri: (size_bytes, mtime, video_id)}`` of every live video, from the manifest alone.

        A rerun compares a listed input's size and mtime with these to skip it without hashing it.
        Mtime is None where the filesystem gave none.
        """
        out: dict[str, tuple[int | None, float | None, str]] = {}
        best: dict[str, int] = {}
        for vid, rec in self.manifest(version)["videos"].items():
            uri = rec["uri"]
            if uri in out and best[uri] > rec["committed_version"]:
                continue
            out[uri] = (rec["size_bytes"], rec["mtime"], vid)
            best[uri] = rec["committed_version"]
        return out

    # ---------------------------------------------------------------- readers
    def read_videos(self, version: int | None = None, video_ids: Iterable[str] | None = None) -> pa.Table:
        """One VIDEOS_SCHEMA row per live video of ``version`` (default: latest)."""
        m = self.manifest(version)
        wanted = set(video_ids) if video_ids is not None else None
        tables = []
        for entry in m["videos_files"]:
            ids = entry["video_ids"] if wanted is None else [v for v in entry["video_ids"] if v in wanted]
            if ids:
                tables.append(self._read_granted(entry, ids, None, V1_VIDEOS_SCHEMA, None))
        table = _concat(tables, V1_VIDEOS_SCHEMA)
        if len(table) != len(pc.unique(table[S.VIDEO_ID])):
            raise StoreError(f"{self.uri} v{m['version']}: a video_id has more than one granted videos row")
        return table.sort_by(S.VIDEO_ID)

    def read_frames(self, version: int | None = None, video_ids: Iterable[str] | None = None,
                    columns: Sequence[str] | None = None) -> pa.Table:
        """Frame rows of ``version`` that its manifest grants, sorted by (video_id, frame_index).

        Args:
            version: default latest.
            video_ids: only these videos (only files granting them are opened).
            columns: FRAMES_SCHEMA column names (default all).

        Returns:
            A table with FRAMES_SCHEMA's fields (the requested ones), its metadata included.
        """
        from concurrent.futures import ThreadPoolExecutor

        schema = _project(S.FRAMES_SCHEMA, columns)
        jobs = list(self._frame_reads(version, video_ids))
        if len(jobs) <= 1:
            tables = [self._read_granted(e, ids, e.get("chunks"), S.FRAMES_SCHEMA, columns) for e, ids in jobs]
        else:  # files are independent: overlap their I/O (object stores are latency-bound)
            with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
                tables = list(pool.map(
                    lambda job: self._read_granted(job[0], job[1], job[0].get("chunks"), S.FRAMES_SCHEMA, columns),
                    jobs))
        table = _concat(tables, schema)
        keys = [(k, "ascending") for k in (S.VIDEO_ID, S.FRAME_INDEX) if k in schema.names]
        return table.sort_by(keys) if keys and len(table) else table

    def iter_frames(self, version: int | None = None, video_ids: Iterable[str] | None = None,
                    columns: Sequence[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Granted frame rows as record batches, file by file (bounded memory for big stores; no order)."""
        schema = _project(S.FRAMES_SCHEMA, columns)
        for entry, ids in self._frame_reads(version, video_ids):
            table = self._read_granted(entry, ids, entry.get("chunks"), S.FRAMES_SCHEMA, columns)
            for batch in table.to_batches(max_chunksize=batch_size):
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)

    def _frame_reads(self, version, video_ids) -> Iterator[tuple[dict, list[str]]]:
        """(manifest entry, granted ids to read from it) for every frames file that has any."""
        m = self.manifest(version)
        wanted = set(video_ids) if video_ids is not None else None
        for entry in m["frames_files"]:
            ids = entry["video_ids"] if wanted is None else [v for v in entry["video_ids"] if v in wanted]
            if ids:
                yield entry, ids

    def _read_granted(self, entry: dict, ids: list[str], chunks: dict | None, schema: pa.Schema,
                      columns: Sequence[str] | None) -> pa.Table:
        """The rows of one manifest entry's file that the entry grants for ``ids``."""
        import pyarrow.dataset as ds

        path = self.path(entry["path"])
        if self._pafs is None:
            self._pafs = arrow_filesystem(self.fs)
        dataset = ds.dataset(path, format="parquet", filesystem=self._pafs)
        _check_file_schema(dataset.schema, path)
        chunks = chunks or {}
        whole = [v for v in ids if v not in chunks]
        expr = ds.field(S.VIDEO_ID).isin(whole) if whole else None
        for vid in ids:
            if vid in chunks:
                part = (ds.field(S.VIDEO_ID) == vid) & ds.field(S.CHUNK_INDEX).isin(list(chunks[vid]))
                expr = part if expr is None else (expr | part)
        proj = _project(schema, columns)
        table = dataset.to_table(columns=proj.names, filter=expr)
        return table.cast(proj)

    # ---------------------------------------------------------------- commit
    def commit(self, frames_files: Sequence[dict], video_rows: Sequence[dict], expected_version: int | None = None,
               max_retries: int = 32) -> int:
        """Commit video rows and the frames files holding their frames as a new version.

        Args:
            frames_files: ``[{"path", "video_ids", "rows", "bytes"[, "chunks"]}]``: store-relative (or
                absolute, under the root) paths of frames files already written; ``video_ids`` this file
                grants; optional ``chunks`` ``{video_id: [chunk_index, ...]}`` narrowing a grant to some
                chunks (used when a retried task wrote a chunk twice). ``bytes`` is looked up if absent.
            video_rows: VIDEOS_SCHEMA rows as dicts, one per video (failed videos included).
            expected_version: the version the caller's view is based on (default: latest at call time).
                Videos committed by another committer after it are dropped (first committer wins);
                videos live at or before it are replaced.
            max_retries: lost races tolerated before CommitConflictError.

        Returns:
            The version created (or the latest one, when every video was dropped).
        """
        return self.commit_detailed(frames_files, video_rows, expected_version, max_retries).version

    def commit_detailed(self, frames_files: Sequence[dict], video_rows: Sequence[dict],
                        expected_version: int | None = None, max_retries: int = 32) -> CommitResult:
        """``commit`` returning what happened (replaced / dropped ids, lost races)."""
        rows = [dict(r) for r in video_rows]
        ours = cast("list[str]", [r.get(S.VIDEO_ID) for r in rows])  # checked just below
        if any(not isinstance(v, str) or not v for v in ours):
            raise StoreError("commit: every video row needs a non-empty string video_id")
        if len(set(ours)) != len(ours):
            dup = sorted({v for v in ours if ours.count(v) > 1})
            raise StoreError(f"commit: video_ids repeated in one commit: {dup[:5]}")
        our_set = set(ours)
        new_frames = self._check_frames_entries(frames_files, our_set)
        latest = self.latest_version()
        base = latest if expected_version is None else int(expected_version)
        if base > latest or base < 0:
            raise StoreError(f"commit: expected_version {base} but the store's latest is {latest}")
        if not rows:
            return CommitResult(latest, (), (), (), (), False)

        # Stage the videos file once; a rebase narrows its grant instead of rewriting it.
        commit_id = uuid.uuid4().hex
        videos_entry = self._write_videos_file(rows, commit_id)
        recs = {r[S.VIDEO_ID]: _video_record(r) for r in rows}
        conflicts: list[CommitConflict] = []
        attempts = 0
        while True:
            current = self.manifest(latest)
            live = current["videos"]
            dropped = sorted(v for v in our_set if v in live and live[v]["committed_version"] > base)
            keep = our_set.difference(dropped)
            if not keep:
                log.info("%s: nothing left to commit: all %d videos were committed by others", self.uri, len(ours))
                return CommitResult(latest, (), (), tuple(dropped), tuple(conflicts), False)
            replaced = sorted(v for v in keep if v in live)
            version = latest + 1
            m = _next_manifest(current, version, commit_id, keep, replaced, dropped, new_frames, videos_entry, recs)
            data = json.dumps(m, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
            if self._before_create is not None:
                self._before_create(version)
            try:
                create_only(self.fs, self._manifest_path(version), data)
            except FileExistsError as e:
                if self._is_ours(version, commit_id):  # our PUT landed but its reply was lost; s3fs retried
                    break
                c = CommitConflict(version, s3_http_status(e), f"{type(e).__name__}: {e}")
                conflicts.append(c)
                with self._lock:
                    self.conflicts.append(c)
                attempts += 1
                log.info("%s: lost the race for v%d (%s); rebasing", self.uri, version, c.error)
                if attempts > max_retries:
                    raise CommitConflictError(
                        f"{self.uri}: commit lost {attempts} races for a manifest version; giving up"
                    ) from e
                latest = max(self.latest_version(), version)
                continue
            self._remember(version, m)
            break
        return CommitResult(version, tuple(sorted(keep)), tuple(replaced), tuple(dropped), tuple(conflicts), True)

    def _is_ours(self, version: int, commit_id: str) -> bool:
        try:
            return self.manifest(version).get("commit_id") == commit_id
        except StoreError:
            return False

    def _check_frames_entries(self, frames_files: Sequence[dict], our_set: set[str]) -> list[dict]:
        """Normalise frames-file entries of a commit (relative paths, grants within the commit, sizes)."""
        merged: dict[str, dict] = {}
        for e in frames_files:
            path = self._relative(e["path"])
            ids = [str(v) for v in e.get("video_ids", [])]
            stray = set(ids) - our_set
            if stray:
                raise StoreError(f"commit: frames file {path} grants video_ids with no video row: {sorted(stray)[:5]}")
            if not ids:
                continue
            chunks = {str(k): sorted(int(c) for c in v) for k, v in (e.get("chunks") or {}).items()}
            size = e.get("bytes")
            if size is None:
                try:
                    size = int(self.fs.info(self.path(path))["size"])
                except FileNotFoundError:
                    raise StoreError(f"commit: frames file {path} does not exist") from None
            cur = merged.setdefault(path, {"path": path, "rows": int(e.get("rows", 0) or 0), "bytes": int(size),
                                          "video_ids": [], "chunks": {}})
            cur["video_ids"] = sorted(set(cur["video_ids"]) | set(ids))
            for vid, cs in chunks.items():
                cur["chunks"][vid] = sorted(set(cur["chunks"].get(vid, [])) | set(cs))
        return list(merged.values())

    def _relative(self, path: str) -> str:
        p = str(path)
        for prefix in (self.uri.rstrip("/") + "/", self.root + "/"):
            if p.startswith(prefix):
                p = p[len(prefix):]
                break
        return _clean_rel(p)

    def _write_videos_file(self, rows: list[dict], commit_id: str) -> dict:
        table = videos_table(rows)
        rel = staging_name(VIDEOS_DIR, [sorted(r[S.VIDEO_ID] for r in rows), commit_id])
        data = parquet_bytes(table)
        put_bytes(self.fs, self.path(rel), data)
        return {"path": rel, "rows": len(table), "bytes": len(data), "video_ids": sorted(table[S.VIDEO_ID].to_pylist())}

    # ---------------------------------------------------------------- maintenance
    def live_files(self, version: int | None = None) -> set[str]:
        """Store-relative paths of the data files a version names."""
        m = self.manifest(version)
        return {e["path"] for e in m["frames_files"]} | {e["path"] for e in m["videos_files"]}

    def vacuum(self, dry_run: bool = True, min_age_s: float = 3600.0) -> list[str]:
        """Data files that no manifest (of any version) names: orphans of killed or retried tasks.

        Args:
            dry_run: only list them (default); False deletes them.
            min_age_s: skip files younger than this: they may belong to a job still writing and about
                to commit.

        Returns:
            Store-relative paths of the orphans found (deleted unless ``dry_run``).
        """
        named: set[str] = set()
        for v in self.versions():
            named |= self.live_files(v)
        now = time.time()
        orphans = []
        for directory in (FRAMES_DIR, VIDEOS_DIR):
            base = self.path(directory)
            try:
                self.fs.invalidate_cache(base)
                infos = self.fs.ls(base, detail=True)
            except FileNotFoundError:
                continue
            for info in infos:
                if info.get("type") != "file":
                    continue
                rel = f"{directory}/{posixpath.basename(info['name'].rstrip('/'))}"
                if rel in named:
                    continue
                if min_age_s > 0 and now - _mtime(info) < min_age_s:
                    continue
                orphans.append(rel)
        if is_local(self.fs):  # temp files of a local manifest create that died before os.link
            mdir = self.path(MANIFEST_DIR)
            if os.path.isdir(mdir):
                for name in os.listdir(mdir):
                    full = os.path.join(mdir, name)
                    if name.startswith(".tmp-") and (min_age_s <= 0 or now - os.path.getmtime(full) >= min_age_s):
                        orphans.append(f"{MANIFEST_DIR}/{name}")
        orphans.sort()
        if not dry_run:
            for rel in orphans:
                self.fs.rm_file(self.path(rel))
        return orphans

    # ---------------------------------------------------------------- stats
    def stats(self, version: int | None = None) -> dict:
        """Counts from the manifest alone: videos by status, frames, files, data bytes."""
        m = self.manifest(version)
        return {
            "version": m["version"],
            **m["counts"],
        }

# ================================================================ manifest building


def _empty_manifest() -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": V1_SCHEMA_VERSION,
        "version": 0,
        "parent_version": None,
        "commit_id": None,
        "created_at": None,
        "frames_files": [],
        "videos_files": [],
        "videos": {},
        "counts": _counts([], [], {}),
        "added_video_ids": [],
        "replaced_video_ids": [],
        "dropped_video_ids": [],
    }


def _check_manifest(m: dict, uri: str, version: int) -> None:
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise StoreError(f"{uri}: manifest v{version} has an unknown format {found!r}")
    sv = m.get("schema_version")
    if not isinstance(sv, int) or sv > V1_SCHEMA_VERSION:
        raise StoreError(
            f"{uri}: manifest v{version} was written with store schema version {sv}; this ray-vlm reads "
            f"up to {V1_SCHEMA_VERSION}: upgrade ray-vlm to read it"
        )
    if m.get("version") != version:
        raise StoreError(f"{uri}: manifest file v{version} says it is version {m.get('version')}")
    for e in m["frames_files"] + m["videos_files"]:
        _clean_rel(e["path"])


def _check_file_schema(schema: pa.Schema, path: str) -> None:
    meta = schema.metadata or {}
    raw = meta.get(b"ray_vlm.schema_version")
    if raw is not None and int(raw) > V1_SCHEMA_VERSION:
        raise StoreError(f"{path}: written with store schema version {int(raw)}; this ray-vlm reads up to "
                         f"{V1_SCHEMA_VERSION}")


def _video_record(row: dict) -> dict:
    """The manifest's per-video index entry (enough to skip an input without reading Parquet)."""
    return {
        "uri": row.get(S.URI),
        "size_bytes": _none_if_nan(row.get(S.SIZE_BYTES)),
        "mtime": _none_if_nan(row.get(S.MTIME)),
        "status": row.get(S.STATUS),
        "error_type": row.get(S.ERROR_TYPE),
        "config_hash": row.get(S.CONFIG_HASH),
        "frames_kept": int(_none_if_nan(row.get(S.FRAMES_KEPT)) or 0),
        "duration_s": _none_if_nan(row.get(S.DURATION_S)),
    }


def _remove_grants(entries: list[dict], ids: set[str]) -> list[dict]:
    """Entries with ``ids`` removed from their grants; entries left granting nothing are dropped."""
    out = []
    for e in entries:
        keep = [v for v in e["video_ids"] if v not in ids]
        if not keep:
            continue
        e = dict(e, video_ids=keep)
        if e.get("chunks"):
            e["chunks"] = {k: v for k, v in e["chunks"].items() if k not in ids}
        if not e.get("chunks"):
            e.pop("chunks", None)
        out.append(e)
    return out


def _next_manifest(current: dict, version: int, commit_id: str, keep: set[str], replaced: list[str],
                   dropped: list[str], new_frames: list[dict], videos_entry: dict, recs: dict) -> dict:
    """The snapshot that follows ``current``: its files minus replaced grants, plus this commit's."""
    frames = _remove_grants(current["frames_files"], set(replaced))
    videos_files = _remove_grants(current["videos_files"], set(replaced))
    by_path = {e["path"]: i for i, e in enumerate(frames)}
    for e in new_frames:
        ids = [v for v in e["video_ids"] if v in keep]
        if not ids:
            continue
        chunks = {k: v for k, v in e.get("chunks", {}).items() if k in keep}
        if e["path"] in by_path:  # a file already granting other videos (they completed earlier)
            old = frames[by_path[e["path"]]]
            merged = dict(old, video_ids=sorted(set(old["video_ids"]) | set(ids)))
            ch = dict(old.get("chunks", {}))
            ch.update(chunks)
            if ch:
                merged["chunks"] = ch
            frames[by_path[e["path"]]] = merged
        else:
            new = {"path": e["path"], "rows": e["rows"], "bytes": e["bytes"], "video_ids": sorted(ids)}
            if chunks:
                new["chunks"] = chunks
            by_path[e["path"]] = len(frames)
            frames.append(new)
    ventry = dict(videos_entry, video_ids=sorted(v for v in videos_entry["video_ids"] if v in keep))
    videos_files.append(ventry)
    videos = dict(current["videos"])
    for vid in keep:
        videos[vid] = dict(recs[vid], committed_version=version)
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": V1_SCHEMA_VERSION,
        "version": version,
        "parent_version": current["version"],
        "commit_id": commit_id,
        "created_at": time.time(),
        "frames_files": frames,
        "videos_files": videos_files,
        "videos": videos,
        "counts": _counts(frames, videos_files, videos),
        "added_video_ids": sorted(keep),
        "replaced_video_ids": list(replaced),
        "dropped_video_ids": list(dropped),
    }


def _counts(frames: list[dict], videos_files: list[dict], videos: dict) -> dict:
    by_status: dict[str, int] = {}
    for rec in videos.values():
        by_status[rec["status"]] = by_status.get(rec["status"], 0) + 1
    return {
        "videos": len(videos),
        "by_status": dict(sorted(by_status.items())),
        "frames": int(sum(rec.get("frames_kept") or 0 for rec in videos.values())),
        "duration_s": float(sum(rec.get("duration_s") or 0.0 for rec in videos.values())),
        "frames_files": len(frames),
        "videos_files": len(videos_files),
        "data_bytes": int(sum(e["bytes"] for e in frames) + sum(e["bytes"] for e in videos_files)),
    }


# ================================================================ tables


def videos_table(rows: Sequence[dict]) -> pa.Table:
    """VIDEOS_SCHEMA table from row dicts (NaN mtime etc. allowed); StoreError on a missing required value."""
    cols = {}
    for f in V1_VIDEOS_SCHEMA:
        vals = [_arrow_value(r.get(f.name), f.type) for r in rows]
        if not f.nullable and any(v is None for v in vals):
            raise StoreError(f"video rows: column {f.name!r} is required but missing in some rows")
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.Table.from_pydict(cols, schema=V1_VIDEOS_SCHEMA)


def parquet_bytes(table: pa.Table, dictionary_columns: Sequence[str] | None = None) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, compression="zstd",
        use_dictionary=list(dictionary_columns) if dictionary_columns is not None else True,
        write_statistics=True,
    )
    return sink.getvalue().to_pybytes()


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).replace_schema_metadata(schema.metadata)


def _mtime(info: dict) -> float:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return 0.0
