"""The one place that resolves local paths, ``s3://`` and other fsspec URIs, under a URL policy.

Nothing else in ray-vlm imports fsspec or s3fs. Every URI that reaches I/O goes through
:func:`check_uri` first, which refuses, *before any I/O*:

* protocols outside the allow-list (``SourceConfig.allowed_protocols``; http(s) is off by default),
* FFmpeg pseudo-protocols and nested URLs (``subfile:``, ``concat:``, ``pipe:``, ``data:``, ``tcp:``,
  ``crypto+file://``, ``rtmp...``), ``|`` chaining and fsspec ``::`` chaining,
* cloud metadata, loopback, private and link-local hosts even when http(s) is allowed, numeric host
  spellings (``http://2130706433/``), credentials inside URLs,
* NUL bytes and other control characters, over-long URIs.

Normalised URI forms (what lands in the ``uri`` column): local files are absolute paths (a ``file://``
prefix is stripped), S3 is ``s3://bucket/key`` (``s3a://`` becomes ``s3://``), GCS is ``gs://``,
the in-memory filesystem is ``memory:///path``.

:func:`expand_sources` turns the user's sources (files, directories, globs, manifests) into a sorted,
de-duplicated list of :class:`InputFile`; :func:`fingerprint` gives the content id (``video_id``);
:func:`open_input` gives the seekable binary file object the decoder reads through.

Known gap: check_uri does no DNS lookups, so a public hostname that *resolves* to a private address
(DNS rebinding) is not caught here; keep http(s) off the allow-list where that matters.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
import math
import os
import posixpath
import re
import threading
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import fsspec

from ray_vlm.core.config import SourceConfig
from ray_vlm.core.errors import RayVlmError
from ray_vlm.core.files import is_local

DEFAULT_ALLOWED_PROTOCOLS: tuple[str, ...] = SourceConfig().allowed_protocols

# Environment variable giving a default S3 endpoint (MinIO, moto, on-prem S3).
S3_ENDPOINT_ENV = "RAY_VLM_S3_ENDPOINT_URL"

MAX_URI_CHARS = 4096
MANIFEST_SUFFIXES = (".txt", ".lst", ".list", ".jsonl", ".csv")

# Fingerprint: size + 4 MiB at the head, the middle and the tail (at most 12 MiB read).
FINGERPRINT_CHUNK_BYTES = 4 * 1024 * 1024
# Read-ahead unit for remote inputs, and how many such blocks one open file may cache.
DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024
DEFAULT_MAX_BLOCKS = 4

# FFmpeg protocols (and fsspec wrappers) that are never allowed, whatever the allow-list says:
# they read other files, run programs, open sockets, or nest a second URL inside the first.
_DENIED_PROTOCOLS = frozenset(
    {
        "subfile", "concat", "concatf", "pipe", "fd", "data", "tcp", "udp", "udplite", "unix", "rtp",
        "srtp", "rtsp", "rtsps", "sctp", "srt", "tls", "crypto", "async", "cache", "gopher", "gophers",
        "hls", "httpproxy", "icecast", "md5", "mmsh", "mmst", "prompeg", "tee", "zmq", "ipfs", "ipns",
        "bluray", "librist", "libssh", "libsmbclient", "android_content", "dir", "reference",
        "simplecache", "filecache", "blockcache", "dask", "libarchive", "jlab", "jupyter",
    }
)
_DENIED_PREFIXES = ("rtmp", "ffrtmp", "librtmp")

# Protocols whose authority part is a network host (checked against the host policy).
_HOST_PROTOCOLS = frozenset({"http", "https", "ftp", "sftp", "ssh", "smb", "webdav", "webhdfs", "hdfs", "ws", "wss"})
_METADATA_HOSTS = frozenset(
    {
        "localhost", "ip6-localhost", "ip6-loopback", "metadata", "metadata.google.internal",
        "metadata.goog", "instance-data", "instance-data.ec2.internal", "metadata.azure.internal",
    }
)
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_CANONICAL = {"s3a": "s3", "gcs": "gs", "local": "file"}
_GLOB_CHARS = frozenset("*?[")


class PolicyError(RayVlmError, ValueError):
    """A URI or path was refused by the URL policy (before any I/O was done with it)."""

    code = "uri_refused"


class SourceError(RayVlmError, ValueError):
    """The sources given to a job are unusable as a whole (nothing matched, malformed manifest)."""

    code = "sources_unusable"


# ------------------------------------------------------------------------------------------ policy
def _canonical_protocol(scheme: str) -> str:
    scheme = scheme.lower()
    return _CANONICAL.get(scheme, scheme)


def _protocol_allowed(protocol: str, allowed_protocols: Iterable[str]) -> bool:
    allowed = {_canonical_protocol(p) for p in allowed_protocols}
    return protocol in allowed


def _check_host(uri: str, parts) -> None:
    """Refuse metadata / loopback / private hosts and credentials in the authority."""
    if parts.username is not None or parts.password is not None:
        raise PolicyError(f"credentials inside a URL are refused; use storage_options: {_show(uri)}")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise PolicyError(f"URL has no host: {_show(uri)}")
    if host in _METADATA_HOSTS or host.endswith(".localhost"):
        raise PolicyError(f"host {host!r} is a loopback or cloud-metadata host: {_show(uri)}")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if _NUMERIC_HOST.match(host):
            # 2130706433, 0x7f.1, 127.1 ...: FFmpeg/curl accept these spellings of an address.
            raise PolicyError(f"non-canonical numeric host {host!r} refused: {_show(uri)}") from None
        return
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_unspecified
        or addr.is_multicast
        or addr.is_reserved
        or not addr.is_global
    ):
        raise PolicyError(f"host {host} is loopback, private or link-local: {_show(uri)}")


def _show(uri: str, limit: int = 200) -> str:
    """A printable, bounded rendering of an untrusted URI for error messages."""
    text = uri.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def check_uri(uri: str, allowed_protocols: Iterable[str] = DEFAULT_ALLOWED_PROTOCOLS) -> str:
    """Apply the URL policy to ``uri`` and return its normalised form. Does no I/O.

    Args:
        uri: a local path (relative paths are made absolute against the working directory),
            ``file://`` URI, or fsspec URI such as ``s3://bucket/key``.
        allowed_protocols: fsspec protocols accepted (``SourceConfig.allowed_protocols``). Local
            paths need ``"file"`` (or ``"local"``) in the list.

    Returns:
        The normalised URI: an absolute local path, or ``protocol://rest`` with a canonical protocol.

    Raises:
        PolicyError: the URI is refused (the message says why).
    """
    # Long: the URL policy as one ordered checklist, each refusal next to the rule it applies.
    if not isinstance(uri, str):
        raise PolicyError(f"URI must be a string, got {type(uri).__name__}")
    if not uri:
        raise PolicyError("empty URI")
    if len(uri) > MAX_URI_CHARS:
        raise PolicyError(f"URI longer than {MAX_URI_CHARS} characters refused")
    if any(unicodedata.category(ch) == "Cc" for ch in uri):
        raise PolicyError(f"control characters (NUL, newline, ...) in URI refused: {_show(uri)}")
    if "|" in uri:
        raise PolicyError(f"'|' (FFmpeg URL chaining) refused: {_show(uri)}")
    if "::" in uri:
        raise PolicyError(f"'::' (fsspec URL chaining) refused: {_show(uri)}")

    options_form = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*),", uri)
    if options_form and options_form.group(1).lower() in _DENIED_PROTOCOLS:  # "subfile,,start,0,...:"
        raise PolicyError(f"FFmpeg pseudo-protocol {options_form.group(1)!r} refused: {_show(uri)}")

    match = _SCHEME.match(uri)
    if match is None:  # a plain local path
        protocol, path = "file", uri
    else:
        scheme = match.group(1).lower()
        if "+" in scheme or scheme in _DENIED_PROTOCOLS or scheme.startswith(_DENIED_PREFIXES):
            raise PolicyError(f"protocol {scheme!r} (FFmpeg pseudo-protocol or nested URL) refused: {_show(uri)}")
        protocol = _canonical_protocol(scheme)
        rest = uri[match.end():]
        if protocol == "file":
            if rest.startswith("//"):
                host, slash, tail = rest[2:].partition("/")
                if host not in ("", "localhost"):
                    raise PolicyError(f"file URI with a remote host {host!r} refused: {_show(uri)}")
                path = slash + tail
            else:
                path = rest
            if not path:
                raise PolicyError(f"file URI without a path: {_show(uri)}")
        elif not rest.startswith("//"):
            # "name:..." without "//" is FFmpeg's pseudo-protocol syntax, not an fsspec URL.
            raise PolicyError(
                f"{scheme!r}: looks like a pseudo-protocol (no '//'); write local paths as ./{uri}: {_show(uri)}"
            )
        else:
            path = rest[2:]

    if not _protocol_allowed(protocol, allowed_protocols):
        raise PolicyError(
            f"protocol {protocol!r} not in the allow-list {tuple(allowed_protocols)}: {_show(uri)}"
        )
    if protocol == "file":
        return os.path.abspath(path)

    if protocol in _HOST_PROTOCOLS:
        _check_host(uri, urlsplit(f"{protocol}://{path}"))
        return f"{protocol}://{path}"
    if protocol == "memory":
        return "memory:///" + path.lstrip("/")
    bucket, _, key = path.partition("/")
    if not bucket:
        raise PolicyError(f"{protocol} URI without a bucket/container: {_show(uri)}")
    if ".." in key.split("/"):
        # Object stores treat '..' literally; refusing it keeps root containment unambiguous.
        raise PolicyError(f"'..' path segment in an object-store URI refused: {_show(uri)}")
    return f"{protocol}://{path}"


def protocol_of(uri: str) -> str:
    """The canonical protocol of an already normalised URI ("file" for local paths)."""
    match = _SCHEME.match(uri)
    return "file" if match is None else _canonical_protocol(match.group(1))


# ------------------------------------------------------------------------------------------ resolve
_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
_FS_CACHE_LOCK = threading.Lock()


def _freeze(obj: Any) -> Any:
    """A hashable, order-independent key for (nested) storage options."""
    if isinstance(obj, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return frozenset(_freeze(v) for v in obj)
    try:
        hash(obj)
    except TypeError:
        return repr(obj)
    return obj


def _storage_options_for(protocol: str, storage_options: dict | None) -> dict:
    opts = dict(storage_options or {})
    opts.pop("lance", None)  # the token store's options for Lance's own S3 client, not fsspec's
    if protocol == "s3":
        endpoint = os.environ.get(S3_ENDPOINT_ENV)
        client_kwargs = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
            client_kwargs["endpoint_url"] = endpoint
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
    return opts


def get_filesystem(protocol: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """A cached filesystem instance per (process, protocol, storage options)."""
    protocol = _canonical_protocol(protocol)
    opts = _storage_options_for(protocol, storage_options) if protocol != "file" else {}
    key = (os.getpid(), protocol, _freeze(opts))
    with _FS_CACHE_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = fsspec.filesystem(protocol, **opts)
            _FS_CACHE[key] = fs
    return fs


def resolve(
    uri: str,
    storage_options: dict | None = None,
    allowed_protocols: Iterable[str] = DEFAULT_ALLOWED_PROTOCOLS,
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Check ``uri`` against the policy and return ``(filesystem, path within it)``.

    For S3, ``storage_options`` go to s3fs (e.g. ``{"client_kwargs": {"endpoint_url": ...},
    "key": ..., "secret": ...}``); without an endpoint, ``$RAY_VLM_S3_ENDPOINT_URL`` is used if set.

    Raises:
        PolicyError: the URI is refused.
    """
    norm = check_uri(uri, allowed_protocols)
    protocol = protocol_of(norm)
    fs = get_filesystem(protocol, storage_options)
    if protocol == "file":
        return fs, norm
    return fs, fs._strip_protocol(norm)


def _fs_protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return _canonical_protocol(proto)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full normalised URI of ``path`` on ``fs`` ("s3://b/k", "memory:///p" or an absolute path)."""
    protocol = _fs_protocol(fs)
    if protocol == "file":
        return os.path.abspath(path)
    path = fs._strip_protocol(path)
    if protocol == "memory":
        return "memory:///" + path.lstrip("/")
    return f"{protocol}://{path}"


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class InputFile:
    """One input of a job.

    Attributes:
        uri: normalised URI (or, for a refused manifest entry, a printable rendering of it).
        size_bytes: size from the listing; -1 when the input does not exist (or was refused).
        mtime: modification time, float unix seconds; NaN when the filesystem gives none.
        refused: why the policy refused this input (a failed row ``policy``), else None.
    """

    uri: str
    size_bytes: int
    mtime: float
    refused: str | None = None

    @property
    def exists(self) -> bool:
        return self.size_bytes >= 0 and self.refused is None


def mtime_of(info: dict) -> float:
    """Float unix seconds from an fsspec info dict (local mtime, S3 LastModified, ...); NaN if none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return math.nan


def _is_hidden(rel_path: str) -> bool:
    return any(part.startswith(".") for part in rel_path.split("/") if part)


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return any(name.endswith(ext.lower()) for ext in extensions)


def _is_glob(path: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in path)


def _is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_SUFFIXES)


class _Root:
    """Containment checks against an optional root (lexical, plus symlink targets for local files)."""

    def __init__(self, root: str | None, source: SourceConfig):
        self.uri = None if root is None else check_uri(root, source.allowed_protocols).rstrip("/") or "/"
        self.follow_outside = source.follow_symlinks_outside_root
        self.local = self.uri is not None and protocol_of(self.uri) == "file"
        self.real = os.path.realpath(self.uri) if self.local and self.uri is not None else None

    @staticmethod
    def _under(path: str, root: str) -> bool:
        return path == root or path.startswith(root if root.endswith("/") else root + "/")

    def violation(self, uri: str) -> str | None:
        """Why ``uri`` (normalised) is outside the root, or None if it is inside (or no root)."""
        if self.uri is None:
            return None
        if not self._under(uri, self.uri):
            return f"{_show(uri)} is outside the root {self.uri}"
        if self.local and not self.follow_outside:
            real = os.path.realpath(uri)
            assert self.real is not None  # set whenever the root is local
            if not self._under(real, self.real):
                return f"{_show(uri)} resolves (symlink) to {_show(real)}, outside the root {self.uri}"
        return None


def _local_walk(top: str, source: SourceConfig, root: _Root, out: list[InputFile]) -> None:
    """Recursive local listing: skips hidden entries, follows symlinked dirs once (loop-safe)."""
    seen: set[str] = set()
    stack = [top]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(directory))
        except OSError:  # unreadable directory: surfaces as a failed row rather than vanishing
            out.append(InputFile(directory, -1, math.nan))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(directory, entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                reason = root.violation(path) if entry.is_symlink() else None
                if reason is not None:  # a symlinked directory leading out of root: not walked
                    out.append(InputFile(path, -1, math.nan, refused=f"directory not walked: {reason}"))
                    continue
                stack.append(path)
                continue
            if not _has_extension(entry.name, source.extensions):
                continue
            reason = root.violation(path)
            if reason is not None:
                out.append(InputFile(path, -1, math.nan, refused=reason))
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:  # dangling symlink
                out.append(InputFile(path, -1, math.nan))
                continue
            out.append(InputFile(path, int(st.st_size), float(st.st_mtime)))


def _remote_find(fs, path: str, source: SourceConfig, out: list[InputFile]) -> None:
    base = path.rstrip("/")
    for name, info in sorted(fs.find(path, detail=True, withdirs=False).items()):
        rel = name[len(base):] if name.startswith(base) else name
        if info.get("type") != "file" or _is_hidden(rel) or not _has_extension(name, source.extensions):
            continue
        out.append(InputFile(to_uri(fs, name), int(info.get("size") or 0), mtime_of(info)))


def _entry_from_info(fs, path: str, info: dict) -> InputFile:
    return InputFile(to_uri(fs, path), int(info.get("size") or 0), mtime_of(info))


def _read_manifest(fs, path: str, manifest_uri: str) -> list[tuple[str, str | None]]:
    """Parse a manifest into ``(entry, problem)`` pairs; a problem makes a refused row."""
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"manifest {manifest_uri} is not UTF-8 text: {e}") from e
    lower = path.lower()
    entries: list[tuple[str, str | None]] = []
    if lower.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{manifest_uri}#L{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                entries.append((where, f"manifest line is not JSON: {e}"))
                continue
            uri = obj.get("uri") if isinstance(obj, dict) else None
            if not isinstance(uri, str) or not uri:
                entries.append((where, "manifest line has no string 'uri'"))
                continue
            entries.append((uri.strip(), None))
    elif lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "uri" not in [h.strip() for h in reader.fieldnames]:
            raise SourceError(f"manifest {manifest_uri} has no 'uri' column (columns: {reader.fieldnames})")
        key = next(h for h in reader.fieldnames if h.strip() == "uri")
        for row in reader:
            value = (row.get(key) or "").strip()
            if value:
                entries.append((value, None))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, None))
    return entries


def _join_manifest_entry(entry: str, manifest_uri: str) -> str:
    """Resolve a relative manifest entry against the manifest's directory."""
    if _SCHEME.match(entry) or entry.startswith("/"):
        return entry
    if protocol_of(manifest_uri) == "file":
        return os.path.join(os.path.dirname(manifest_uri), entry)
    proto, _, rest = manifest_uri.partition("://")
    bucket, _, key = rest.partition("/")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), entry))
    if joined == ".." or joined.startswith("../"):
        joined = entry  # escapes the bucket: keep '..' so check_uri refuses it
    return f"{proto}://{bucket}/{joined}"


def _expand_manifest(
    fs, path: str, manifest_uri: str, source: SourceConfig, root: _Root, storage_options, out: list[InputFile]
) -> None:
    entries = _read_manifest(fs, path, manifest_uri)
    checked: list[tuple[str, Any, str]] = []
    for entry, problem in entries:
        if problem is not None:
            out.append(InputFile(_show(entry), -1, math.nan, refused=problem))
            continue
        try:
            uri = check_uri(_join_manifest_entry(entry, manifest_uri), source.allowed_protocols)
        except PolicyError as e:
            out.append(InputFile(_show(entry), -1, math.nan, refused=str(e)))
            continue
        reason = root.violation(uri)
        if reason is not None:
            out.append(InputFile(uri, -1, math.nan, refused=reason))
            continue
        entry_fs, entry_path = resolve(uri, storage_options, source.allowed_protocols)
        checked.append((uri, entry_fs, entry_path))

    # Sizes: one listing per parent directory when several entries share it, else one info each.
    by_parent: dict[tuple[int, str], list[tuple[str, Any, str]]] = {}
    for item in checked:
        by_parent.setdefault((id(item[1]), posixpath.dirname(item[2])), []).append(item)
    for (_, parent), items in by_parent.items():
        entry_fs = items[0][1]
        listing: dict[str, dict] | None = None
        if len(items) > 4 and not is_local(entry_fs):
            try:
                listing = {
                    entry_fs._strip_protocol(i["name"]): i for i in entry_fs.ls(parent, detail=True)
                }
            except (FileNotFoundError, NotADirectoryError):
                listing = {}
        for uri, _, entry_path in items:
            info = listing.get(entry_path) if listing is not None else None
            if info is None and listing is None:
                try:
                    info = entry_fs.info(entry_path)
                except (FileNotFoundError, NotADirectoryError, PermissionError):
                    info = None
            if info is None or info.get("type") != "file":
                out.append(InputFile(uri, -1, math.nan))
            else:
                out.append(_entry_from_info(entry_fs, entry_path, info))


def expand_sources(
    sources: list[str],
    source: SourceConfig | None = None,
    storage_options: dict | None = None,
    root: str | None = None,
) -> list[InputFile]:
    """Expand files, directories, globs and manifests into the job's inputs.

    * a file is taken whatever its extension (unless its suffix marks it as a manifest);
    * a directory is listed recursively, keeping files whose suffix is in ``source.extensions``
      (case-insensitive) and skipping hidden (dot-prefixed) files and directories;
    * a glob (``*``, ``?``, ``[``) keeps matching files with a video suffix (matched directories are
      expanded as above);
    * a manifest (``.txt``/``.lst``/``.list``: one URI per line, ``#`` comments; ``.jsonl``: objects
      with ``"uri"``; ``.csv``: a ``uri`` column) lists inputs; relative entries resolve against the
      manifest's directory. Bad entries become refused rows instead of failing the job.

    Sizes and mtimes come from the listings. A source that does not exist is returned with
    ``size_bytes=-1`` so that it becomes a failed ``not_found`` row.

    Args:
        sources: paths / URIs / globs / manifests.
        source: the source policy (extensions, allowed protocols, symlink rule).
        storage_options: fsspec options for remote filesystems (see :func:`resolve`).
        root: if set, every input must resolve inside it (symlink targets included, unless
            ``source.follow_symlinks_outside_root``).

    Returns:
        Inputs sorted by URI, one per URI.

    Raises:
        PolicyError: a *source* (not a manifest entry) is refused or lies outside ``root``.
        SourceError: no sources, nothing matched at all, or a malformed manifest.
    """
    # Long: one pass over the sources, so each refusal, miss and listing keeps its place in the output order.
    source = source or SourceConfig()
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise SourceError("no sources given")
    root_ = _Root(root, source)
    out: list[InputFile] = []
    for raw in sources:
        uri = check_uri(raw, source.allowed_protocols)
        reason = root_.violation(uri) if not _is_glob(uri) else (
            None
            if root_.uri is None or _Root._under(uri, root_.uri)
            else f"{_show(uri)} is outside the root {root_.uri}"
        )
        if reason is not None:
            raise PolicyError(reason)
        fs, path = resolve(uri, storage_options, source.allowed_protocols)
        local = is_local(fs)

        if _is_glob(path):
            matches = fs.glob(path, detail=True)
            prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
            for name, info in sorted(matches.items()):
                rel = name[len(prefix):] if name.startswith(prefix) else name
                if _is_hidden(rel):
                    continue
                is_dir = os.path.isdir(name) if local else info.get("type") == "directory"
                if is_dir:
                    if local:
                        if root_.violation(name) is None:
                            _local_walk(name, source, root_, out)
                    else:
                        _remote_find(fs, name, source, out)
                    continue
                if not _has_extension(name, source.extensions):
                    continue
                item_uri = to_uri(fs, name)
                why = root_.violation(item_uri)
                if why is not None:
                    out.append(InputFile(item_uri, -1, math.nan, refused=why))
                elif local:
                    try:
                        st = os.stat(name)
                    except OSError:
                        out.append(InputFile(item_uri, -1, math.nan))
                        continue
                    out.append(InputFile(item_uri, int(st.st_size), float(st.st_mtime)))
                else:
                    out.append(_entry_from_info(fs, name, info))
            continue

        if local:
            try:
                st = os.stat(path)
            except OSError:
                out.append(InputFile(uri, -1, math.nan))
                continue
            if os.path.isdir(path):
                _local_walk(path, source, root_, out)
            elif _is_manifest(path):
                _expand_manifest(fs, path, uri, source, root_, storage_options, out)
            else:
                out.append(InputFile(uri, int(st.st_size), float(st.st_mtime)))
            continue

        try:
            info = fs.info(path)
        except FileNotFoundError:
            out.append(InputFile(uri, -1, math.nan))
            continue
        if info.get("type") == "directory":
            _remote_find(fs, path, source, out)
        elif _is_manifest(path):
            _expand_manifest(fs, path, uri, source, root_, storage_options, out)
        else:
            out.append(_entry_from_info(fs, path, info))

    # One row per URI: a found entry beats a missing one, which beats a refused one.
    best: dict[str, InputFile] = {}
    rank = lambda f: (f.refused is None, f.size_bytes >= 0)  # noqa: E731
    for item in out:
        prev = best.get(item.uri)
        if prev is None or rank(item) > rank(prev):
            best[item.uri] = item
    result = [best[u] for u in sorted(best)]
    if not result or all(f.size_bytes < 0 and f.refused is None for f in result):
        shown = ", ".join(_show(s, 80) for s in list(sources)[:5])
        raise SourceError(f"no input matched the sources [{shown}{', ...' if len(sources) > 5 else ''}]")
    return result


# ------------------------------------------------------------------------------------------ identity + open
def fingerprint(fs: fsspec.AbstractFileSystem, path: str, size_bytes: int) -> str:
    """Content id of a file (the ``video_id``): 16 hex chars of sha256.

    Hashes a version tag, the size (8 bytes little-endian), and the content: the whole file when it is
    at most 12 MiB, else 4 MiB at the head, 4 MiB centred on the middle and the last 4 MiB. So it reads
    at most 12 MiB whatever the file's length (three ranged reads on object stores), and two files
    differing only outside those windows (with equal sizes) share an id.

    Raises:
        OSError (FileNotFoundError, PermissionError, ...): the file cannot be read.
    """
    h = hashlib.sha256(b"ray-vlm/fingerprint/v1\0")
    h.update(int(size_bytes).to_bytes(8, "little", signed=True))
    chunk = FINGERPRINT_CHUNK_BYTES
    if size_bytes <= 3 * chunk:
        h.update(fs.cat_file(path))
    else:
        mid = size_bytes // 2 - chunk // 2
        for start in (0, mid, size_bytes - chunk):
            h.update(fs.cat_file(path, start=start, end=start + chunk))
    return h.hexdigest()[:16]


def uri_id(uri: str) -> str:
    """Id for an input whose content cannot be read: "u" + 15 hex chars of sha256(uri)."""
    return "u" + hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()[:15]


def open_input(
    uri: str,
    storage_options: dict | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allowed_protocols: Iterable[str] = DEFAULT_ALLOWED_PROTOCOLS,
    size_bytes: int | None = None,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
):
    """Open an input for reading: a seekable binary file object suitable for ``av.open(fileobj)``.

    Local files are plain buffered files. Remote files read in ``block_size`` ranged requests and keep
    up to ``max_blocks`` blocks (LRU), which suits demuxers that jump between an index at one end of the
    file and the media data (memory per open file: ``block_size * max_blocks``).

    Args:
        size_bytes: the size if known (saves a HEAD request on object stores).

    Raises:
        PolicyError: the URI is refused. OSError: it cannot be opened (FileNotFoundError if missing).
    """
    fs, path = resolve(uri, storage_options, allowed_protocols)
    protocol = _fs_protocol(fs)
    if protocol == "file":
        return open(path, "rb")
    if protocol == "memory":
        return fs.open(path, "rb")
    kwargs: dict[str, Any] = {
        "block_size": block_size,
        "cache_type": "blockcache",
        "cache_options": {"maxblocks": max_blocks},
    }
    if size_bytes is not None and size_bytes >= 0:
        kwargs["size"] = size_bytes
    try:
        return fs.open(path, "rb", **kwargs)
    except TypeError:  # a filesystem whose open() takes no cache arguments
        return fs.open(path, "rb")


def read_small_file(uri: str, storage_options: dict | None = None, *, what: str = "file",
                    error: type[Exception] = ValueError) -> bytes:
    """Whole contents of a small file (queries, annotations) through the URL policy.

    Raises:
        ``error`` ("<what> not found: URI" or "cannot read <what> URI: why"): missing, refused, unreadable.
    """
    try:
        fs, path = resolve(str(uri), storage_options)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{what} not found: {uri}") from None
    except (OSError, PolicyError) as e:
        raise error(f"cannot read {what} {uri}: {e}") from None
