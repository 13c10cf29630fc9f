"""The service's front door over real HTTP on loopback: hostile request values, oversize bodies, forged Host
headers, security headers, the page's session cookie.

Two apps on one Serve proxy: ``/`` with a token (one with ``+/=`` in it, as real generated tokens have), and
``/open`` without one (what ``ray-vlm serve`` on 127.0.0.1 with no token runs). No QA model: ``/v1/ask`` streams
the evidence, which is all these tests need.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "Zm9v+YmFy/YmF6=="  # base64-looking, with "+/="
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 64 << 10  # ServeArgs.max_body_bytes's default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port(ray_local, serve_store):
    from ray import serve

    from ray_vlm.serve.app import ServeArgs, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    common = dict(store=str(serve_store), token_env=None, num_cpus=0.1, refresh_interval_s=0.5,
                  health_check_period_s=2.0)
    serve.run(build_app(ServeArgs(token=TOKEN, **common)), name="guarded", route_prefix="/")
    serve.run(build_app(ServeArgs(**common)), name="open", route_prefix="/open")
    yield port
    serve.delete("guarded")
    serve.delete("open")
    serve.shutdown()


@pytest.fixture(scope="module")
def base(port):
    return f"http://127.0.0.1:{port}"


def _raw(port: int, head: str, body_chunks=(), timeout_s: float = 60.0) -> tuple[int, dict, bytes]:
    """Send a request over a plain socket (headers, then body chunks until the server answers or hangs up);
    return (status, headers, body) of the answer."""
    import select

    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head.encode("latin-1"))
        s.setblocking(False)
        answered = closed = False
        for chunk in body_chunks:  # send, reading whatever comes back meanwhile: stop once answered
            view = memoryview(chunk)
            while view and not (answered or closed):
                readable, writable, _ = select.select([s], [s], [], 5.0)
                if readable:
                    try:
                        part = s.recv(65536)
                    except ConnectionResetError:
                        part = b""
                    closed = not part
                    got += part
                    answered = b"\r\n\r\n" in got
                if writable and not (answered or closed):
                    try:
                        view = view[s.send(view):]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (ConnectionResetError, BrokenPipeError):
                        closed = True
            if answered or closed:
                break
        s.setblocking(True)
        deadline = time.monotonic() + timeout_s
        while not closed and time.monotonic() < deadline:
            head_end = got.find(b"\r\n\r\n")
            if head_end >= 0 and len(got) - head_end - 4 >= int(
                    _parse_headers(got[:head_end]).get("content-length", 1 << 60)):
                break
            try:
                part = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not part:
                break
            got += part
    head_end = got.find(b"\r\n\r\n")
    assert head_end > 0, got[:200]
    status = int(got.split(b" ", 2)[1])
    return status, _parse_headers(got[:head_end]), got[head_end + 4:]


def _parse_headers(raw: bytes) -> dict:
    out = {}
    for line in raw.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        out[k.strip().lower()] = v.strip()
    return out


# ---------------------------------------------------------------- (a) no 500 from any request value


HOSTILE = [  # raw JSON bodies: what a JSON library would refuse to produce, and wrong types
    b'{"query": "x", "top_k": NaN}', b'{"query": "x", "top_k": Infinity}', b'{"query": "x", "top_k": -Infinity}',
    b'{"query": "x", "top_k": 1e400}', b'{"query": "x", "top_k": [NaN]}', b'{"query": [NaN]}',
    b'{"query": "\\ud800"}', b'{"query": "a \\udfff rabbit", "top_k": 1, "\\ud800": 1}', b'{"query": NaN}',
    b'{"query": "x", "top_k": "5"}', b'{"query": "x", "top_k": true}', b'{"query": "x", "top_k": 5.0}',
    b'{"query": "x", "top_k": 99999999999999999999999999999}', b'{"query": "x", "video": NaN}',
    b'{"query": "x", "video": 7}', b'{"query": {"$gt": ""}}', b'{"query": null}', b"null", b"[]", b'"x"',
    b"NaN", b"\xff\xfe\x00", b'{"query": "\xff"}', b"[" * 20000 + b"]" * 20000, b'{"query": "x"' + b" " * 100,
]


ROUTES = ("/v1/search", "/v1/videos/bikes/ground", "/v1/ask")


def test_hostile_values_get_a_4xx_json_answer_and_the_service_is_unharmed(base):
    for path in ROUTES:
        for raw in HOSTILE:
            body = raw.replace(b'"query"', b'"question"') if path == "/v1/ask" else raw
            r = requests.post(f"{base}{path}", data=body, headers={**AUTH, "Content-Type": "application/json"},
                              timeout=60)
            assert 400 <= r.status_code < 500, (path, raw[:60], r.status_code, r.text[:300])
            detail = r.json()["detail"]  # a JSON body, naming the field and why
            assert isinstance(detail, str) and detail, (path, raw[:60])
            assert "nan" not in r.text.lower() and "infinity" not in r.text.lower(), r.text
            assert "\\ud800" not in r.text and "\\udfff" not in r.text, r.text  # the input is never echoed
        r = requests.post(f"{base}{path}", data=b'{"query": "x", "top_k": "5"}'.replace(
            b'"query"', b'"question"' if path == "/v1/ask" else b'"query"'),
            headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "top_k", r.text
    for query in ("t=nan", "t=inf", "t=-1", "width=1e400", "width=NaN", "t=%00"):
        r = requests.get(f"{base}/v1/videos/bikes/thumbnail?{query}", headers=AUTH, timeout=60)
        assert r.status_code == 422 and r.json()["detail"], (query, r.text)
    # control characters in a query are a space, not nothing
    r = requests.post(f"{base}/v1/search", json={"query": "a\x00rabbit\x1b", "top_k": 1}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["query"] == "a rabbit", r.text
    # the service still answers, and answers right
    r = requests.post(f"{base}/v1/search", json={"query": "a person riding a bicycle", "top_k": 3}, headers=AUTH,
                      timeout=60)
    assert r.status_code == 200 and r.json()["moments"][0]["uri"].endswith("bikes.mp4"), r.text


# ---------------------------------------------------------------- (b) body size, before the body is read


def _ours():
    """This session's processes (its Ray's workers included): another Ray on the machine is not measured."""
    import psutil

    return psutil.Process().children(recursive=True)


def _cmd(p) -> str:
    """A process's command line; "" for one that ended (or is a zombie) since it was listed."""
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _rss(p) -> int:
    import psutil

    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def _ingress_rss_bytes() -> int:
    """RSS of the ingress replicas (process title ``ray::ServeReplica:<app>:Ingress``; in the replica's id,
    ``SERVE_REPLICA::<app>#Ingress#...``)."""
    total, n = 0, 0
    for p in _ours():
        cmd = _cmd(p)
        if ("ServeReplica:" in cmd or "SERVE_REPLICA::" in cmd) and "Ingress" in cmd:
            total, n = total + _rss(p), n + 1
    assert n == 2, f"{n} ingress replica processes (want the two apps')"
    return total


def _proxy_rss_bytes() -> int:
    return sum(_rss(p) for p in _ours() if "ProxyActor" in _cmd(p))


def _head(path: str, port: int, extra: str = "") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{extra}\r\n")


def test_oversize_bodies_get_413_before_they_are_read(port, base):
    mib = 1 << 20
    chunk = b"%x\r\n%s\r\n" % (mib, b"x" * mib)
    for path in ("/open/v1/search", "/v1/search"):  # warm up: each replica's first requests allocate for good
        for _ in range(3):
            _raw(port, _head(path, port, f"Authorization: Bearer {TOKEN}\r\nContent-Length: {2 * LIMIT}\r\n"))
            _raw(port, _head(path, port, f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n"),
                 [chunk] * 2)
    rss0, proxy0 = _ingress_rss_bytes(), _proxy_rss_bytes()
    for size in (20 * mib, 100 * mib):
        # no token needed (the /open app): Content-Length alone is refused at once
        status, hdrs, body = _raw(port, _head("/open/v1/search", port, f"Content-Length: {size}\r\n"),
                                  [b"x" * mib] * (size // mib))
        assert status == 413 and json.loads(body)["detail"] == f"the request body is over {LIMIT} bytes"
        # chunked (no length): counted while read, refused as soon as it passes the limit
        status, _, body = _raw(port, _head("/open/v1/search", port, "Transfer-Encoding: chunked\r\n"),
                               [chunk] * (size // mib))
        assert status == 413 and b"x" * 64 not in body
        # the guarded app, no token: a declared oversize body is 413 at once; a chunked one is 401 from the headers
        # (the token is checked before a byte of any body is read)
        status, _, body = _raw(port, _head("/v1/search", port, f"Content-Length: {size}\r\n"),
                               [b"x" * mib] * (size // mib))
        assert status == 413 and json.loads(body)["detail"] == f"the request body is over {LIMIT} bytes"
        status, hdrs, _ = _raw(port, _head("/v1/search", port, "Transfer-Encoding: chunked\r\n"),
                               [chunk] * (size // mib))
        assert status == 401 and hdrs["www-authenticate"] == "Bearer"
        status, _, _ = _raw(port, _head("/v1/search", port, f"Authorization: Bearer {TOKEN}\r\n"
                                                            "Transfer-Encoding: chunked\r\n"),
                            [chunk] * (size // mib))
        assert status == 413
        print(f"after {size // mib} MiB: ingress +{(_ingress_rss_bytes() - rss0) / mib:.1f} MiB")
    grown = _ingress_rss_bytes() - rss0
    print(f"ingress replicas' RSS grew {grown / mib:.1f} MiB; the proxy's {(_proxy_rss_bytes() - proxy0) / mib:.1f}"
          " MiB")
    # Bound: 256 MiB for the two ingress replicas together, while 480 MiB were sent to them. Our middleware holds
    # at most the 64 KiB limit, but Ray Serve 2.60 drains every request body eagerly, into unbounded queues, in
    # the proxy (ProxyActor.proxy_asgi_receive) and in the replica (ASGIReceiveProxy.fetch_until_disconnect,
    # started before the app runs), until the answer is complete. So what an early 413 bounds is the time a
    # body keeps flowing, not its size in transit: a hard bound needs a reverse proxy in front (README). The
    # assertion is that bodies do not accumulate: RSS does not grow by what was sent.
    assert grown < 256 * mib, grown / mib
    # A body just under the limit is parsed as usual (a 422 for this one, not a 413), and searches still answer.
    r = requests.post(f"{base}/v1/search", json={"query": "a rabbit", "pad": "x" * (LIMIT - 100)}, headers=AUTH,
                      timeout=60)
    assert r.status_code == 422, r.text
    r = requests.post(f"{base}/v1/search", json={"query": "a rabbit", "top_k": 1}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["moments"][0]["uri"].endswith("bigbuckbunny.mp4")


def test_too_many_or_too_large_headers_get_431(port, base):
    from ray_vlm.serve.guard import MAX_HEADER_BYTES, MAX_HEADERS

    many = "".join(f"X-Junk-{i}: {i}\r\n" for i in range(MAX_HEADERS + 1))
    large = f"X-Junk: {'y' * MAX_HEADER_BYTES}\r\n"
    for extra, allowed in ((many, {431}), (large, {431, 400})):
        for path in ("/v1/search", "/open/v1/search"):
            status, _, body = _raw(port, _head(path, port, f"Authorization: Bearer {TOKEN}\r\n{extra}"
                                                           "Content-Length: 2\r\n") + "{}")
            # 431 from our front door; the proxy's HTTP parser may refuse an over-long line itself first (400)
            assert status in allowed, (path, status)
            assert b"y" * 64 not in body and b"X-Junk" not in body
    r = requests.post(f"{base}/v1/search", json={"query": "a rabbit", "top_k": 1}, headers=AUTH, timeout=60)
    assert r.status_code == 200


# ---------------------------------------------------------------- (c) Host allow-list


def test_forged_host_is_refused(port, base):
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example", ""):
        for path, kw in (("/", {}), ("/healthz", {}), ("/v1/videos", {"headers": AUTH}), ("/open/", {})):
            r = requests.get(f"{base}{path}", headers={**kw.get("headers", {}), "Host": host}, timeout=60)
            assert r.status_code == 421, (host, path, r.status_code)
            assert "see --allowed-hosts" in r.json()["detail"]
        status, _, _ = _raw(port, f"GET /open/healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
        assert status in (400, 421), host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert requests.get(f"{base}/open/healthz", headers={"Host": host}, timeout=60).status_code == 200, host


# ---------------------------------------------------------------- (d) security headers, no docs pages


def test_every_answer_carries_the_security_headers(base):
    answers = [requests.get(f"{base}/", timeout=60), requests.get(f"{base}/static/app.js", timeout=60),
               requests.get(f"{base}/healthz", timeout=60), requests.get(f"{base}/openapi.json", timeout=60),
               requests.post(f"{base}/v1/search", json={"query": "a rabbit"}, timeout=60),  # 401
               requests.post(f"{base}/v1/search", json={"query": 1}, headers=AUTH, timeout=60),  # 422
               requests.post(f"{base}/v1/search", json={"query": "a rabbit"}, headers=AUTH, timeout=60),  # 200
               requests.get(f"{base}/v1/videos/nope/file", headers=AUTH, timeout=60),  # 404
               requests.get(f"{base}/open/", timeout=60), requests.get(f"{base}/", headers={"Host": "x"}, timeout=60)]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 401, 422, 200, 404, 200, 421]
    for r in answers:
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/open/docs"):
        assert requests.get(f"{base}{path}", timeout=60).status_code == 404, path
    assert "/v1/search" in requests.get(f"{base}/openapi.json", timeout=60).json()["paths"]


# ---------------------------------------------------------------- (e) the page's session


def test_session_cookie_is_httponly_strict_named_by_port_and_not_the_token(port, base):
    r = requests.post(f"{base}/v1/session", headers=AUTH, timeout=60)
    assert r.status_code == 204
    raw = r.headers["set-cookie"]
    name = f"ray_vlm_session_{port}"
    assert raw.startswith(f"{name}=") and "HttpOnly" in raw and "SameSite=strict" in raw and "Path=/" in raw
    value = r.cookies[name]
    assert TOKEN not in raw and value != TOKEN
    assert requests.get(f"{base}/v1/videos", cookies={name: value}, timeout=60).status_code == 200
    # another port's cookie name (another server on this host) is not this server's session
    assert requests.get(f"{base}/v1/videos", cookies={f"ray_vlm_session_{port + 1}": value},
                        timeout=60).status_code == 401
    assert requests.get(f"{base}/v1/videos", cookies={name: value[:-1] + "0"}, timeout=60).status_code == 401
    # a wrong token, or the token with "+" turned into a space (what a URL query would do), gets no session
    for wrong in ("Bearer " + TOKEN.replace("+", " "), "Bearer " + TOKEN[:-1], "Basic " + TOKEN):
        assert requests.post(f"{base}/v1/session", headers={"Authorization": wrong}, timeout=60).status_code == 401
    page = requests.get(f"{base}/static/app.js", timeout=60).text
    assert "?token" not in page and "document.cookie" not in page and "#token=" in page
