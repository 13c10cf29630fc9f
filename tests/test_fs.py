"""Tests for ray_vlm.core.fs: URL policy, resolver, source expansion, fingerprints, opening inputs.

Fixture files are written by the tests themselves (bytes only: no video is needed here).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import threading
import urllib.request

import pytest

from ray_vlm.core.config import SourceConfig
from ray_vlm.core.fs import (
    FINGERPRINT_CHUNK_BYTES,
    InputFile,
    PolicyError,
    SourceError,
    check_uri,
    expand_sources,
    fingerprint,
    open_input,
    resolve,
    to_uri,
    uri_id,
)

pytestmark = pytest.mark.timeout(120)

WITH_HTTP = SourceConfig().allowed_protocols + ("http", "https")


def _write(path, data: bytes = b"\x00video\x00") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------------------------------ loopback canary
class _Canary:
    """An HTTP server on loopback that counts every request it receives."""

    def __init__(self):
        self.hits = 0
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                canary.hits += 1
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"#EXTM3U\n")

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def canary():
    c = _Canary()
    yield c
    c.close()


# ------------------------------------------------------------------------------------------ check_uri
def test_check_uri_normalises_local_and_remote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_uri("clip.mp4") == str(tmp_path / "clip.mp4")
    assert check_uri("./a/../clip.mp4") == str(tmp_path / "clip.mp4")
    assert check_uri("file:///data/x.mp4") == "/data/x.mp4"
    assert check_uri("file://localhost/data/x.mp4") == "/data/x.mp4"
    assert check_uri("s3a://bucket/dir/x.mp4") == "s3://bucket/dir/x.mp4"
    assert check_uri("S3://bucket/x.mp4") == "s3://bucket/x.mp4"
    assert check_uri("gcs://bucket/x.mp4") == "gs://bucket/x.mp4"
    assert check_uri("memory://v/x.mp4") == "memory:///v/x.mp4"
    assert check_uri("memory:///v/x.mp4") == "memory:///v/x.mp4"
    # A public https URL passes only when https is allowed (no I/O either way).
    assert check_uri("https://example.com/v.mp4", WITH_HTTP) == "https://example.com/v.mp4"
    with pytest.raises(PolicyError, match="allow-list"):
        check_uri("https://example.com/v.mp4")


@pytest.mark.parametrize(
    "uri",
    [
        "subfile:,,start,0,end,100,,:/etc/passwd",
        "subfile,,start,0,end,100,,:/etc/passwd",
        "concat:/a.mp4|/b.mp4",
        "concat:/etc/passwd",
        "pipe:0",
        "data:video/mp4;base64,AAAA",
        "tcp://example.com:80",
        "udp://example.com:1234",
        "rtmp://example.com/live",
        "ffrtmphttp://example.com/live",
        "crypto+file:///etc/passwd",
        "hls+https://example.com/a.m3u8",
        "async:file:/etc/passwd",
        "cache:/etc/passwd",
        "simplecache::s3://bucket/key.mp4",
        "/tmp/a.mp4|/tmp/b.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://metadata.google.internal./computeMetadata/v1/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://127.0.0.1:8080/x.mp4",
        "http://localhost/x.mp4",
        "http://api.localhost/x.mp4",
        "http://10.1.2.3/x.mp4",
        "http://192.168.0.1/x.mp4",
        "http://[::1]/x.mp4",
        "http://0.0.0.0/x.mp4",
        "http://2130706433/x.mp4",
        "http://0x7f.1/x.mp4",
        "http://127.1/x.mp4",
        "https://user:secret@example.com/x.mp4",
        "ftp://example.com/x.mp4",
        "/tmp/a\x00.mp4",
        "/tmp/a\nb.mp4",
        "s3://bucket/a\rb.mp4",
        "s3://bucket/../other/x.mp4",
        "s3:///x.mp4",
        "file://evil.example.com/etc/passwd",
        "weird:thing.mp4",
        "",
        "/" + "a" * 5000,
    ],
)
def test_check_uri_refuses(uri):
    with pytest.raises(PolicyError):
        check_uri(uri, WITH_HTTP)


def test_check_uri_refuses_non_strings():
    with pytest.raises(PolicyError, match="string"):
        check_uri(b"/tmp/x.mp4")  # type: ignore[arg-type]


def test_local_paths_need_file_protocol():
    with pytest.raises(PolicyError, match="'file' not in the allow-list"):
        check_uri("/tmp/x.mp4", ("s3",))
    assert check_uri("s3://b/k.mp4", ("s3",)) == "s3://b/k.mp4"


def test_loopback_canary_sees_no_request(canary, tmp_path):
    """http(s) allowed, a loopback URL is still refused by every entry point before any I/O."""
    url = f"http://127.0.0.1:{canary.port}/v.mp4"
    # The canary is live: a direct request reaches it.
    urllib.request.urlopen(url, timeout=10).read()
    assert canary.hits == 1
    source = SourceConfig(allowed_protocols=WITH_HTTP)
    with pytest.raises(PolicyError):
        check_uri(url, WITH_HTTP)
    with pytest.raises(PolicyError):
        resolve(url, allowed_protocols=WITH_HTTP)
    with pytest.raises(PolicyError):
        open_input(url, allowed_protocols=WITH_HTTP)
    with pytest.raises(PolicyError):
        expand_sources([url], source)
    manifest = _write(tmp_path / "m.txt", f"{url}\n{url.replace('127.0.0.1', 'localhost')}\n".encode())
    _write(tmp_path / "ok.mp4")
    inputs = expand_sources([manifest, str(tmp_path / "ok.mp4")], source)
    refused = [f for f in inputs if f.refused]
    assert len(refused) == 2 and all("loopback" in f.refused for f in refused)
    assert canary.hits == 1


# ------------------------------------------------------------------------------------------ resolve / to_uri
def test_resolve_caches_per_options_and_round_trips(tmp_path):
    fs, path = resolve(str(tmp_path / "x.mp4"))
    assert path == str(tmp_path / "x.mp4")
    assert to_uri(fs, path) == path

    mem, mpath = resolve("memory://rv/x.mp4")
    assert mpath == "/rv/x.mp4"
    assert to_uri(mem, mpath) == "memory:///rv/x.mp4"
    assert check_uri(to_uri(mem, mpath)) == to_uri(mem, mpath)

    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "key": "k", "secret": "s"}
    s3a, key = resolve("s3://bucket/dir/x.mp4", dict(opts))
    s3b, _ = resolve("s3a://bucket/y.mp4", {"secret": "s", "key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    s3c, _ = resolve("s3://bucket/x.mp4", dict(opts, key="other"))
    assert key == "bucket/dir/x.mp4"
    assert s3a is s3b and s3a is not s3c
    assert to_uri(s3a, key) == "s3://bucket/dir/x.mp4"


def test_s3_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("RAY_VLM_S3_ENDPOINT_URL", "http://127.0.0.1:9999")
    fs, _ = resolve("s3://bucket/x.mp4", {"key": "k", "secret": "s"})
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9999"
    # An explicit endpoint wins over the environment.
    fs2, _ = resolve("s3://bucket/x.mp4", {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
    assert fs2.client_kwargs["endpoint_url"] == "http://127.0.0.1:1"


# ------------------------------------------------------------------------------------------ expand_sources
@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "root"
    files = {
        "a.mp4": b"\x00" * 10,
        "B.MOV": b"\x00" * 11,
        "sub/c.MkV": b"\x00" * 12,
        "sub/deeper/d.webm": b"\x00" * 13,
        "sub/notes.txt": b"not a video",
        "sub/e.jpg": b"\xff\xd8",
        ".hidden.mp4": b"\x00",
        ".cache/x.mp4": b"\x00",
        "sub/.git/y.mp4": b"\x00",
    }
    for rel, data in files.items():
        _write(root / rel, data)
    return root


def test_directory_expansion_filters_hidden_and_extensions(tree):
    inputs = expand_sources([str(tree)])
    assert [f.uri for f in inputs] == sorted(
        str(tree / p) for p in ("a.mp4", "B.MOV", "sub/c.MkV", "sub/deeper/d.webm")
    )
    for f in inputs:
        st = os.stat(f.uri)
        assert f.size_bytes == st.st_size and f.mtime == pytest.approx(st.st_mtime)
        assert f.refused is None and f.exists
    assert [f.size_bytes for f in inputs] == [11, 10, 12, 13]


def test_single_file_taken_whatever_its_extension_and_dedup(tree, monkeypatch):
    odd = _write(tree / "clip.bin", b"\x00" * 7)
    monkeypatch.chdir(tree)
    inputs = expand_sources([odd, "clip.bin", f"file://{odd}", str(tree / "a.mp4")])
    assert [(f.uri, f.size_bytes) for f in inputs] == [(str(tree / "a.mp4"), 10), (odd, 7)]


def test_glob(tree):
    inputs = expand_sources([str(tree / "*.mp4"), str(tree / "sub" / "*")])
    # "*.mp4" matches a.mp4 (not the hidden one); "sub/*" keeps the video file and walks sub/deeper.
    assert [f.uri for f in inputs] == [str(tree / "a.mp4"), str(tree / "sub/c.MkV"), str(tree / "sub/deeper/d.webm")]
    with pytest.raises(SourceError, match="no input matched"):
        expand_sources([str(tree / "*.avi")])


def test_missing_sources(tree):
    missing = str(tree / "nope.mp4")
    inputs = expand_sources([missing, str(tree / "a.mp4")])
    assert inputs[1] == InputFile(missing, -1, inputs[1].mtime)
    assert math.isnan(inputs[1].mtime) and not inputs[1].exists
    with pytest.raises(SourceError, match="no input matched"):
        expand_sources([missing])
    with pytest.raises(SourceError, match="no sources"):
        expand_sources([])


def test_txt_manifest_relative_entries_and_refusals_under_root(tree, tmp_path):
    outside = _write(tmp_path / "outside.mp4")
    manifest = _write(
        tree / "lists" / "m.txt",
        "\n".join(
            [
                "# a comment",
                "../a.mp4",  # relative to the manifest's directory
                "",
                str(tree / "sub/c.MkV"),
                "../sub/notes.txt",  # taken: manifest entries are explicit, whatever the extension
                "../../outside.mp4",  # escapes root
                "file:///etc/passwd",  # absolute elsewhere
                "missing.mp4",
                "subfile:,,start,0,end,0,,:/etc/passwd",
                "../a.mp4",  # duplicate
            ]
        ).encode(),
    )
    inputs = expand_sources([manifest], root=str(tree))
    by_uri = {f.uri: f for f in inputs}
    assert by_uri[str(tree / "a.mp4")].size_bytes == 10
    assert by_uri[str(tree / "sub/c.MkV")].size_bytes == 12
    assert by_uri[str(tree / "sub/notes.txt")].size_bytes == len(b"not a video")
    assert by_uri[str(tree / "lists/missing.mp4")].size_bytes == -1
    assert by_uri[str(tree / "lists/missing.mp4")].refused is None
    assert "outside the root" in by_uri[outside].refused
    assert "outside the root" in by_uri["/etc/passwd"].refused
    assert "subfile" in by_uri["subfile:,,start,0,end,0,,:/etc/passwd"].refused
    assert len(inputs) == 7
    assert [f.uri for f in inputs] == sorted(f.uri for f in inputs)


def test_jsonl_and_csv_manifests(tree):
    jsonl = _write(
        tree / "m.jsonl",
        b'{"uri": "a.mp4", "label": 1}\nnot json\n{"path": "x.mp4"}\n\n{"uri": "sub/c.MkV"}\n',
    )
    inputs = expand_sources([jsonl])
    assert [f.uri for f in inputs if f.exists] == [str(tree / "a.mp4"), str(tree / "sub/c.MkV")]
    refused = sorted((f.uri, f.refused) for f in inputs if f.refused)
    assert refused[0][0].endswith("m.jsonl#L2") and "not JSON" in refused[0][1]
    assert refused[1][0].endswith("m.jsonl#L3") and "'uri'" in refused[1][1]

    csv_ok = _write(tree / "m.csv", b"label,uri\n1,a.mp4\n2,B.MOV\n3,\n")
    assert [f.uri for f in expand_sources([csv_ok])] == [str(tree / "B.MOV"), str(tree / "a.mp4")]
    csv_bad = _write(tree / "bad.csv", b"label,path\n1,a.mp4\n")
    with pytest.raises(SourceError, match="'uri' column"):
        expand_sources([csv_bad])


def test_root_refuses_sources_outside(tree, tmp_path):
    _write(tmp_path / "secret.mp4")
    with pytest.raises(PolicyError, match="outside the root"):
        expand_sources([str(tree / ".." / "secret.mp4")], root=str(tree))
    with pytest.raises(PolicyError, match="outside the root"):
        expand_sources(["file:///etc/passwd"], root=str(tree))
    with pytest.raises(PolicyError, match="outside the root"):
        expand_sources([str(tmp_path / "*.mp4")], root=str(tree))
    assert len(expand_sources([str(tree)], root=str(tree))) == 4


def test_symlink_escapes(tree, tmp_path):
    secret = _write(tmp_path / "secret" / "s.mp4", b"\x00" * 99)
    os.symlink(secret, tree / "link.mp4")
    os.symlink(tmp_path / "secret", tree / "linkdir")
    os.symlink(tree / "a.mp4", tree / "inside_link.mp4")

    # As a top-level source: refused outright.
    with pytest.raises(PolicyError, match="symlink"):
        expand_sources([str(tree / "link.mp4")], root=str(tree))
    # Inside a directory: refused rows, the rest of the tree still expands.
    inputs = {f.uri: f for f in expand_sources([str(tree)], root=str(tree))}
    assert "symlink" in inputs[str(tree / "link.mp4")].refused
    assert "directory not walked" in inputs[str(tree / "linkdir")].refused
    assert str(tree / "linkdir/s.mp4") not in inputs
    assert inputs[str(tree / "inside_link.mp4")].size_bytes == 10  # a link staying inside root is fine
    # Allowed by configuration: the target's size is listed.
    follow = SourceConfig(follow_symlinks_outside_root=True)
    inputs = {f.uri: f for f in expand_sources([str(tree)], follow, root=str(tree))}
    assert inputs[str(tree / "link.mp4")].size_bytes == 99 and inputs[str(tree / "link.mp4")].refused is None
    assert inputs[str(tree / "linkdir/s.mp4")].size_bytes == 99
    # Without a root, symlinks are simply followed.
    assert expand_sources([str(tree / "link.mp4")])[0].size_bytes == 99


def test_memory_filesystem_directory():
    fs = resolve("memory:///")[0]
    fs.pipe("/expand/v/one.mp4", b"\x00" * 5)
    fs.pipe("/expand/v/.two.mp4", b"\x00" * 5)
    fs.pipe("/expand/v/x/three.TS", b"\x00" * 6)
    fs.pipe("/expand/v/readme.md", b"#")
    try:
        inputs = expand_sources(["memory://expand/v"])
        assert [(f.uri, f.size_bytes) for f in inputs] == [
            ("memory:///expand/v/one.mp4", 5),
            ("memory:///expand/v/x/three.TS", 6),
        ]
    finally:
        fs.rm("/expand", recursive=True)


# ------------------------------------------------------------------------------------------ fingerprint / open
def test_fingerprint_small_file_hashes_everything(tmp_path):
    data = os.urandom(1000)
    path = _write(tmp_path / "v.mp4", data)
    fs, p = resolve(path)
    expected = hashlib.sha256(b"ray-vlm/fingerprint/v1\0" + (1000).to_bytes(8, "little") + data).hexdigest()[:16]
    assert fingerprint(fs, p, 1000) == expected
    other = _write(tmp_path / "w.mp4", data[:-1] + bytes([data[-1] ^ 1]))
    assert fingerprint(fs, other, 1000) != expected
    # Same content elsewhere: same id (a content hash, not a path hash).
    copy = _write(tmp_path / "copy" / "v.mp4", data)
    assert fingerprint(fs, copy, 1000) == expected


def test_fingerprint_large_file_reads_three_windows(monkeypatch):
    fs = resolve("memory:///")[0]
    size = 20 * 1024 * 1024
    data = bytearray(os.urandom(size))
    fs.pipe("/fp/big.mp4", bytes(data))
    try:
        reads = []
        real = fs.cat_file

        def spy(path, start=None, end=None, **kw):
            out = real(path, start=start, end=end, **kw)
            reads.append(len(out))
            return out

        monkeypatch.setattr(fs, "cat_file", spy)
        base = fingerprint(fs, "/fp/big.mp4", size)
        assert reads == [FINGERPRINT_CHUNK_BYTES] * 3 and sum(reads) <= 12 * 1024 * 1024
        # A byte in the middle window changes the id; one between windows does not (documented).
        data[size // 2] ^= 0xFF
        fs.pipe("/fp/big.mp4", bytes(data))
        mid_changed = fingerprint(fs, "/fp/big.mp4", size)
        assert mid_changed != base
        data[5 * 1024 * 1024] ^= 0xFF
        fs.pipe("/fp/big.mp4", bytes(data))
        assert fingerprint(fs, "/fp/big.mp4", size) == mid_changed
    finally:
        fs.rm("/fp", recursive=True)


def test_uri_id():
    a, b = uri_id("/x/a.mp4"), uri_id("/x/b.mp4")
    assert a.startswith("u") and len(a) == 16 and a != b and a == uri_id("/x/a.mp4")
    assert all(c in "0123456789abcdef" for c in a[1:])


def test_open_input_local_and_memory(tmp_path):
    data = os.urandom(70_000)
    path = _write(tmp_path / "v.mp4", data)
    with open_input(f"file://{path}") as f:
        assert f.seekable()
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(100)
        assert f.read(5) == data[100:105]
    fs = resolve("memory:///")[0]
    fs.pipe("/oi/v.mp4", data)
    try:
        with open_input("memory://oi/v.mp4") as f:
            f.seek(69_990)
            assert f.read() == data[-10:]
    finally:
        fs.rm("/oi", recursive=True)
    with pytest.raises(FileNotFoundError):
        open_input(str(tmp_path / "missing.mp4"))
    with pytest.raises(PolicyError):
        open_input("concat:" + path)


# ------------------------------------------------------------------------------------------ S3 (moto)
@pytest.mark.s3
def test_s3_expand_fingerprint_open(s3_bucket, tmp_path, monkeypatch):
    import boto3

    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    small = os.urandom(3000)
    big = os.urandom(13 * 1024 * 1024 + 7)  # over 12 MiB: the ranged-read path
    objects = {
        "videos/a.mp4": small,
        "videos/sub/B.MKV": big,
        "videos/.hidden.mp4": small,
        "videos/notes.txt": b"hello",
        "lists/m.txt": b"../videos/a.mp4\nmissing.mp4\n../../elsewhere/x.mp4\n",
    }
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)

    inputs = expand_sources([f"s3://{bucket}/videos/"], storage_options=opts)
    assert [(f.uri, f.size_bytes) for f in inputs] == [
        (f"s3://{bucket}/videos/a.mp4", len(small)),
        (f"s3://{bucket}/videos/sub/B.MKV", len(big)),
    ]
    assert all(not math.isnan(f.mtime) and f.mtime > 1.6e9 for f in inputs)

    inputs = expand_sources([f"s3a://{bucket}/lists/m.txt"], storage_options=opts, root=f"s3://{bucket}/")
    by_uri = {f.uri: f for f in inputs}
    assert by_uri[f"s3://{bucket}/videos/a.mp4"].size_bytes == len(small)
    assert by_uri[f"s3://{bucket}/lists/missing.mp4"].size_bytes == -1
    assert "'..'" in by_uri["../../elsewhere/x.mp4"].refused

    # Content ids do not depend on where the bytes live.
    local_big = _write(tmp_path / "big.mp4", big)
    lfs, lpath = resolve(local_big)
    fs, key = resolve(f"s3://{bucket}/videos/sub/B.MKV", opts)
    assert fingerprint(fs, key, len(big)) == fingerprint(lfs, lpath, len(big))

    with open_input(f"s3://{bucket}/videos/sub/B.MKV", opts, size_bytes=len(big)) as f:
        f.seek(len(big) - 100)
        assert f.read() == big[-100:]
        f.seek(9 * 1024 * 1024)
        assert f.read(1000) == big[9 * 1024 * 1024 : 9 * 1024 * 1024 + 1000]

    # The endpoint can also come from the environment (credentials from the AWS_* variables).
    monkeypatch.setenv("RAY_VLM_S3_ENDPOINT_URL", endpoint)
    assert [f.uri for f in expand_sources([f"s3://{bucket}/videos/*.mp4"])] == [f"s3://{bucket}/videos/a.mp4"]


def test_manifest_jsonl_written_by_json_dumps(tree):
    # Entries with spaces and unicode survive the round trip.
    name = tree / "sub" / "ünï code.mp4"
    _write(name, b"\x00" * 3)
    manifest = _write(tree / "m2.jsonl", (json.dumps({"uri": str(name)}) + "\n").encode())
    assert expand_sources([manifest]) == [InputFile(str(name), 3, os.stat(name).st_mtime)]
