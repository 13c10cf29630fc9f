"""Object-store primitives every writer shares: durable whole-object writes, create-only writes (the commit point
of a store or an index version), the HTTP status behind an S3 error, and pyarrow filesystems over fsspec ones."""

from __future__ import annotations

import os
import posixpath
import re
import uuid

_VERSION_RE = re.compile(r"^v(\d{8})\.json$")


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def put_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole object. Local: written and fsync'ed (a manifest may name it next); else one PUT."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        fs.pipe_file(path, data)


def create_only(fs, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` iff it does not exist; FileExistsError otherwise.

    Local: temp file + ``os.link`` (atomic, fails on an existing name). S3: PUT with ``If-None-Match: *``
    (s3fs ``mode="create"``; a 412 becomes FileExistsError). Other fsspec backends: their own
    ``mode="create"``, whose atomicity is the backend's (memory: atomic within one process).
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        try:  # make the new name durable
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return
    fs.pipe_file(path, data, mode="create")


def s3_http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an s3fs error (botocore ClientError cause), if any."""
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status is not None:
                return int(status)
    return None


def arrow_filesystem(fs):
    """A pyarrow filesystem for ``fs`` (native for local disks, FSSpecHandler otherwise)."""
    import pyarrow.fs as pafs

    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def arrow_resolve(uri: str, storage_options: dict | None = None):
    """(pyarrow FileSystem, path) for ``uri``, through the project's one resolver (URL policy included)."""
    from ray_vlm.core.fs import resolve

    fs, path = resolve(str(uri), storage_options=storage_options)
    return arrow_filesystem(fs), path


def list_versions(fs, directory: str) -> list[int]:
    """Versions of the ``vNNNNNNNN.json`` manifests in ``directory``, ascending (listed afresh every call)."""
    try:
        fs.invalidate_cache(directory)
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for name in names
                  if (m := _VERSION_RE.match(posixpath.basename(str(name).rstrip("/")))))
