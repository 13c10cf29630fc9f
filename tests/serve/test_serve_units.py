"""Pieces of the Serve app that need no running Ray: args, range parsing, error mapping, the QA deployment's
evidence stream, the cluster serve config YAML, and the ``serve`` command's refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from ray_vlm.query.searcher import Moment, QueryError
from ray_vlm.serve.app import QA, ServeArgs, _http_error, _parse_range, build_app
from ray_vlm.serve.cli import serve

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def test_parse_range():
    """RFC 9110 14.2: one bytes range -> (start, end); unsatisfiable -> (); anything else is ignored (None)."""
    assert _parse_range("bytes=0-99", 1000) == (0, 99)
    assert _parse_range("Bytes=0-99", 1000) == (0, 99) == _parse_range("BYTES = 0-99", 1000)  # unit: any case
    assert _parse_range("bytes=900-", 1000) == (900, 999)
    assert _parse_range("bytes=900-5000", 1000) == (900, 999)
    assert _parse_range("bytes=-100", 1000) == (900, 999)
    assert _parse_range("bytes=-5000", 1000) == (0, 999)
    assert _parse_range("bytes=1000-", 1000) == ()
    assert _parse_range("bytes=-0", 1000) == ()
    for ignored in ("bytes=5-1", "bytes=10-20, 30-40", "bytes=-", "items=0-1", "bytes=a-b", "0-10", "",
                    "bytes=0-1\n"):
        assert _parse_range(ignored, 1000) is None, ignored


def test_serve_args(monkeypatch):
    a = ServeArgs(store="/tmp/store", token="s3cret")
    assert a.resolved_token() == "s3cret" and "s3cret" not in repr(a) and "s3cret" not in str(a.model_dump())
    monkeypatch.setenv("RAY_VLM_TOKEN", "from-env")
    assert ServeArgs(store="/tmp/store").resolved_token() == "from-env"
    assert ServeArgs(store="/tmp/store", token_env=None).resolved_token() is None
    monkeypatch.delenv("RAY_VLM_TOKEN")
    assert ServeArgs(store="/tmp/store").resolved_token() is None
    assert ServeArgs(store="s3://b/p", storage_options={"k": 1}).media_options() == {"k": 1}
    for bad in ({"store": " "}, {"store": "x", "max_queued_requests": -1}, {"store": "x", "typo": 1},
                {"store": "x", "num_cpus": -1}, {}):
        with pytest.raises(ValidationError):
            ServeArgs.model_validate(bad)


def test_http_error_mapping():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from ray_vlm.media.frames import MediaNotFoundError

    assert _http_error(TimeoutError()).status_code == 408
    assert _http_error(TimeoutError()).status_code == 408
    e = _http_error(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    assert e.status_code == 503 and e.headers["Retry-After"] == "1"
    assert _http_error(RayActorError()).status_code == 503
    assert (_http_error(QueryError("the query is empty")).status_code,
            _http_error(QueryError("the query is empty")).detail) == (400, "the query is empty")
    assert _http_error(MediaNotFoundError("gone")).status_code == 404
    assert _http_error(RuntimeError("a bug")).status_code == 500  # only for our own bugs
    assert _http_error(RuntimeError("a bug")).detail == "internal error"  # no internals leak


def test_qa_deployment_streams_grounded_evidence_without_a_model():
    qa = QA.func_or_class(ServeArgs(store="/unused"))
    ms = [Moment("v1", "/archive/bikes.mp4", 4.5, 5.5, 0.8, 5.0), Moment("v2", "/x/bunny.mp4", 0.0, 5.25, 0.4, 2.0)]

    async def collect(moments):
        return [c async for c in qa.answer("when does a bike pass?", moments)]

    chunks = asyncio.run(collect(ms))
    text = "".join(chunks)
    assert asyncio.run(qa.name()) == "evidence" and len(chunks) == 3
    assert "No answering model is configured" in text and '"when does a bike pass?"' in text
    assert "bikes.mp4 4.5–5.5 s (score 0.80)" in text and "bunny.mp4 0.0–5.2 s" in text
    none = "".join(asyncio.run(collect([])))
    assert "no moments were found" in none


def test_cluster_serve_config_yaml_builds_the_app():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "clusters" / "serve-app.yaml").read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    (app,) = cfg.applications
    assert app.import_path == "ray_vlm.serve.app:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.require_token and args.token is None and args.token_env == "RAY_VLM_TOKEN"
    assert {d.name for d in app.deployments} <= {"Ingress", "QueryEncoder", "Retriever", "Grounder", "QA"}
    assert cfg.http_options.request_timeout_s > 0
    built = build_app(app.args)  # a plain dict, as Serve passes it
    assert type(built).__name__ == "Application"


def _cli():
    app = typer.Typer()
    app.command()(serve)
    return app


def test_serve_command_refuses_what_it_cannot_do_safely(tmp_path):
    r = CliRunner().invoke(_cli(), [])
    assert r.exit_code == 2 and "exactly one of --store" in r.output
    r = CliRunner().invoke(_cli(), ["--store", str(tmp_path), "--config", "x.yaml"])
    assert r.exit_code == 2
    r = CliRunner().invoke(_cli(), ["--store", str(tmp_path), "--host", "0.0.0.0"], env={"RAY_VLM_TOKEN": ""})
    assert r.exit_code == 2 and "without a token" in r.output
    r = CliRunner().invoke(_cli(), ["--store", str(tmp_path / "nothing")], env={"RAY_VLM_TOKEN": ""})
    assert r.exit_code == 2 and "no committed version" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x}]\n")
    r = CliRunner().invoke(_cli(), ["--config", str(bad)])
    assert r.exit_code == 2 and "bad serve config" in r.output
    r = CliRunner().invoke(_cli(), ["--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output


def test_guard_serves_only_loopback_clients_when_there_is_no_token():
    """No token: a client from any other address is refused (403) before the app runs; loopback is served.

    The tests only reach the real server over loopback, so the address check is driven here through the ASGI
    interface itself, with the client address a proxy on another host would put in the scope."""
    import asyncio

    from ray_vlm.serve import guard

    def run(client: str, token: str | None) -> tuple[int, bool]:
        reached = []

        async def app(scope, receive, send):
            reached.append(scope["client"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/videos", "root_path": "", "client": (client, 50000),
                 "headers": [(b"host", b"127.0.0.1:8000")]
                 + ([(b"authorization", f"Bearer {token}".encode())] if token else [])}
        asyncio.run(guard.Guard(app)(scope, receive, send))
        return sent[0]["status"], bool(reached)

    before = guard._config
    try:
        guard.configure(guard.GuardConfig(None, 65536, guard.default_allowed_hosts("127.0.0.1")))
        assert run("127.0.0.1", None) == (200, True)
        assert run("::1", None) == (200, True)
        assert run("10.1.2.3", None) == (403, False)
        assert run("192.168.0.7", None) == (403, False)
        guard.configure(guard.GuardConfig("s3cret+/=", 65536, guard.default_allowed_hosts("127.0.0.1")))
        assert run("10.1.2.3", "s3cret+/=") == (200, True)  # with a token, any client that has it
        assert run("10.1.2.3", "wrong") == (401, False)
    finally:
        guard._config = before


def _asgi(app, path: str, headers: list[tuple[bytes, bytes]] = (), client: str = "127.0.0.1"
          ) -> tuple[int, dict[bytes, bytes], dict]:
    """One GET through an ASGI app, as a server would drive it: (status, headers, JSON body)."""
    import json

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000"), *headers], "client": (client, 50000),
             "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(body)


def test_error_bodies_carry_the_stable_code():
    """The app's exception handler adds ``code`` to the body of every error ``_http_error`` makes; the status is
    the code's (``ray_vlm.core.errors.HTTP_STATUS``); a 500 names no internals; a plain HTTPException is as
    FastAPI answers it."""
    from fastapi import FastAPI, HTTPException
    from ray.serve.exceptions import BackPressureError

    from ray_vlm.media.frames import MediaNotFoundError
    from ray_vlm.serve import app as A

    assert A.api.exception_handlers[HTTPException] is A._coded_body  # the served app answers with it
    errors = {
        "query": QueryError("the query is empty"),
        "media": MediaNotFoundError("gone.mp4"),
        "bug": RuntimeError("/secret/path/of/the/store"),
        "timeout": TimeoutError(),
        "busy": BackPressureError(num_queued_requests=9, max_queued_requests=8),
        "auth": A.CodedHTTPException("unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}),
        "plain": HTTPException(404, "no such file"),
    }
    demo = FastAPI()
    demo.add_exception_handler(HTTPException, A._coded_body)

    @demo.get("/{name}")
    async def fail(name: str):
        raise A._http_error(errors[name])

    assert _asgi(demo, "/query")[::2] == (400, {"detail": "the query is empty", "code": "query_invalid"})
    assert _asgi(demo, "/media")[::2] == (404, {"detail": "the video file is not available: gone.mp4",
                                                "code": "media_not_found"})
    status, _, body = _asgi(demo, "/bug")
    assert (status, body) == (500, {"detail": "internal error", "code": "internal"})
    status, headers, body = _asgi(demo, "/timeout")
    assert (status, body["code"]) == (408, "timeout")
    status, headers, body = _asgi(demo, "/busy")
    assert (status, body["code"], headers[b"retry-after"]) == (503, "overloaded", b"1")
    status, headers, body = _asgi(demo, "/auth")
    assert (status, body["code"], headers[b"www-authenticate"]) == (401, "unauthorized", b"Bearer")
    assert _asgi(demo, "/plain")[::2] == (404, {"detail": "no such file"})


def test_guard_answers_carry_the_stable_code():
    """The front door's own answers name their code too (and still never echo the request)."""
    from ray_vlm.serve import guard

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the guard let the request through")

    before = guard._config
    try:
        guard.configure(guard.GuardConfig("s3cret", 65536, guard.default_allowed_hosts("127.0.0.1")))
        status, headers, body = _asgi(guard.Guard(app), "/v1/videos", [(b"authorization", b"Bearer wrong")])
        assert (status, body) == (401, {"detail": "missing or wrong bearer token", "code": "unauthorized"})
        assert headers[b"www-authenticate"] == b"Bearer"
        guard.configure(guard.GuardConfig(None, 65536, guard.default_allowed_hosts("127.0.0.1")))
        status, _, body = _asgi(guard.Guard(app), "/v1/videos", client="10.1.2.3")
        assert (status, body["code"]) == (403, "client_refused")
    finally:
        guard._config = before
