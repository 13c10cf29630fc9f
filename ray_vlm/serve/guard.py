"""The ingress's front door: a pure ASGI middleware that answers before FastAPI parses anything.

In order, for every HTTP request that reaches the ingress replica:

0. At most ``MAX_HEADERS`` headers and ``MAX_HEADER_BYTES`` bytes of them (431 otherwise).
1. ``Host`` must be allow-listed (421 otherwise): a DNS-rebinding page cannot talk to a loopback service.
   With no token, only loopback clients are served (403 otherwise).
2. A declared ``Content-Length`` over ``max_body_bytes`` is 413 at once, token or not (nothing is read).
3. ``/v1/...`` needs the token, from the headers alone (``Authorization: Bearer``, or the page's session cookie
   on GET/HEAD): 401 before a byte of the body is read.
4. The body is read, counting bytes, and 413 as soon as it passes the limit (never more than the limit is
   held). The app then gets the body as if it had just arrived.
5. Every answer carries the security headers (CSP, ``nosniff``, ``X-Frame-Options``...).

It is configured per process by ``configure`` (the ingress replica calls it from its constructor): Serve freezes
the FastAPI app when the ingress class is defined, before the replica knows its token. This module is imported
by name in the replica (not pickled by value), so the middleware and the constructor see the same state.

``validation_error`` is the app's ``RequestValidationError`` handler: it never echoes the input (which can be
NaN, a lone surrogate or megabytes), only which field is wrong and why.

Every answer made here is ``{"detail": ..., "code": ...}``, its status the code's (``ray_vlm.core.errors``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass

from starlette.responses import JSONResponse

from ray_vlm.core.errors import http_status

# Request header limits (431 above them): a browser or client sends a dozen headers and a few KiB.
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024
SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
     b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
SESSION_COOKIE_PREFIX = "ray_vlm_session_"  # + the port the browser talks to: two servers on a host don't collide
_SESSION_SALT = b"ray-vlm browser session v1"


@dataclass(frozen=True)
class GuardConfig:
    """What the guard enforces.

    Attributes:
        token: the bearer token (None: no auth, loopback clients only).
        max_body_bytes: largest request body accepted.
        allowed_hosts: lower-case host names / addresses accepted in ``Host`` (no port); ``"*"`` accepts any.
    """

    token: str | None
    max_body_bytes: int
    allowed_hosts: frozenset[str]


_config: GuardConfig | None = None


def configure(config: GuardConfig) -> None:
    """Set this process's guard configuration (the ingress replica's constructor calls it)."""
    global _config
    _config = config


def session_value(token: str) -> str:
    """The session cookie's value: an HMAC of a fixed string under the token (the cookie never holds the token,
    and every ingress replica derives the same value, so no session store is needed)."""
    return hmac.new(token.encode("utf-8", "surrogatepass"), _SESSION_SALT, hashlib.sha256).hexdigest()


def session_cookie_name(host_header: str | None, default_port: int | None = None) -> str:
    """``ray_vlm_session_<port>`` from the ``Host`` the browser used (its port, or 80 / ``default_port``)."""
    _, port = split_host(host_header or "")
    return f"{SESSION_COOKIE_PREFIX}{port or default_port or 80}"


def token_ok(got: str | None, token: str) -> bool:
    """Constant-time comparison (bytes: ``compare_digest`` refuses non-ASCII str)."""
    if got is None:
        return False
    return hmac.compare_digest(got.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


def split_host(value: str) -> tuple[str, int | None]:
    """``"Example.com:8000"`` -> ``("example.com", 8000)``; ``"[::1]:80"`` -> ``("::1", 80)``."""
    value = value.strip().lower()
    port = None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        return host, port
    if value.count(":") == 1:
        host, _, p = value.partition(":")
        if p.isdigit():
            port = int(p)
        return host, port
    return value, None


def default_allowed_hosts(bound_host: str) -> frozenset[str]:
    """The bound address, ``localhost`` and the loopback addresses."""
    return frozenset({split_host(bound_host)[0] if bound_host.startswith("[") else bound_host.lower(),
                      "localhost", "127.0.0.1", "::1"})


def _is_loopback(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _headers(scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in scope.get("headers") or ():
        out.setdefault(k.lower(), v)  # the first one wins; a repeated Host is refused below
    return out


def _cookie(raw: bytes | None, name: str) -> str | None:
    if not raw:
        return None
    for part in raw.decode("latin-1").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class Guard:
    """Pure ASGI middleware (see the module docstring); wraps the FastAPI app of the ingress."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        # Long: the checks run in a fixed order on one request (limits, host, size, token, then the counted body).
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secure(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers") or ()}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": list(message.get("headers") or ()) + extra}
            await send(message)

        cfg = _config
        if cfg is None:  # the constructor has not run: refuse rather than serve unguarded
            await _answer(send_secure, "starting", "the service is starting; retry later")
            return
        raw_headers = scope.get("headers") or ()
        if len(raw_headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in raw_headers) > MAX_HEADER_BYTES:
            await _answer(send_secure, "headers_too_large",
                          f"over {MAX_HEADERS} headers or {MAX_HEADER_BYTES} bytes of them", close=True)
            return
        headers = _headers(scope)
        hosts = [v for k, v in raw_headers if k.lower() == b"host"]
        host, _ = split_host(hosts[0].decode("latin-1")) if len(hosts) == 1 else ("", None)
        if "*" not in cfg.allowed_hosts and host not in cfg.allowed_hosts:
            await _answer(send_secure, "host_refused",
                          "this server does not answer for that Host (see --allowed-hosts)")
            return
        if cfg.token is None and not _is_loopback((scope.get("client") or (None,))[0]):
            await _answer(send_secure, "client_refused",
                          "this service has no token, so it serves loopback clients only")
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix: its own paths
            path = path[len(root):]
        # ---- a declared body over the limit: 413 at once, token or not (nothing is read either way)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                await _answer(send_secure, "content_length_invalid", "malformed Content-Length")
                return
            if n > cfg.max_body_bytes:
                await _answer(send_secure, "body_too_large", f"the request body is over {cfg.max_body_bytes} bytes",
                              close=True)
                return
        if cfg.token is not None and (path == "/v1" or path.startswith("/v1/")):
            got = None
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, cred = auth.partition(" ")
            if scheme.lower() == "bearer" and token_ok(cred.strip(), cfg.token):
                got = True
            elif scope.get("method") in ("GET", "HEAD"):
                name = session_cookie_name(hosts[0].decode("latin-1") if hosts else None)
                got = token_ok(_cookie(headers.get(b"cookie"), name), session_value(cfg.token))
            if not got:
                await _answer(send_secure, "unauthorized", "missing or wrong bearer token",
                              [(b"www-authenticate", b"Bearer")])
                return
        # ---- the body: counted while reading (holding at most the limit); a declared length was checked above
        limit = cfg.max_body_bytes
        chunks, total, tail = [], 0, None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: hand it on, the app sees it
                tail = message
                break
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await _answer(send_secure, "body_too_large", f"the request body is over {limit} bytes", close=True)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def receive_replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                if tail is not None:
                    return tail
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, receive_replay, send_secure)


async def _answer(send, code: str, detail: str, extra=(), close: bool = False) -> None:
    """A JSON error answer, ``{"detail", "code"}``, with the status of ``code`` (``ray_vlm.core.errors``)."""
    status = http_status(code)
    body = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *extra]
    if close:  # the rest of an oversize body is never read: the client must not reuse the connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _printable(text, max_chars: int = 40) -> str:
    """A field name from the request, safe to print and to encode (surrogates and control characters replaced)."""
    s = str(text).encode("utf-8", "replace").decode("utf-8")
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= max_chars else s[:max_chars] + "…"


def _reason(err: dict) -> str:
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the body is not valid JSON"
    if kind == "string_unicode" or "surrogate" in str(err.get("msg", "")):
        return "the text is not valid Unicode"
    msg = err.get("msg", "invalid")
    return _printable(msg, 200)


async def validation_error(request, exc) -> JSONResponse:
    """422 naming each wrong field and why; never the input itself (see the module docstring)."""
    errors = []
    for err in exc.errors()[:20]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(_printable(p) for p in loc) if err.get("type") != "json_invalid" else "body"
        errors.append({"field": field or "body", "reason": _reason(err)})
    detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors) or "the request does not match the schema"
    return JSONResponse({"detail": detail, "code": "request_invalid", "errors": errors},
                        status_code=http_status("request_invalid"))
