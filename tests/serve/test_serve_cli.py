"""``serve`` as a command (wrapped in a typer app, as ``ray-vlm serve`` is): a real process with its own Ray,
curl-style requests with and without the token, Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WRAPPER = """
import typer
from ray_vlm.serve.cli import serve
app = typer.Typer()
app.command()(serve)
app()
"""


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt even when
    the test run itself was started in the background by a shell (which starts such jobs ignoring SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, base: str, log_path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError("the service never became healthy: " + log_path.read_text()[-3000:])


def _serve_search_and_stop(argv: list[str], env: dict, port: int, token: str, log_path) -> int:
    """Run the wrapped ``serve`` command with ``argv``; once healthy, a search without the token gets 401 and with it
    moments (bikes.mp4 first); then Ctrl-C stops it and the port closes. Returns the command's exit code."""
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_default_sigint)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log_path)
        body = {"query": "a person riding a bicycle", "top_k": 3}
        assert requests.post(f"{base}/v1/search", json=body, timeout=60).status_code == 401
        r = requests.post(f"{base}/v1/search", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200 and r.json()["moments"][0]["uri"].endswith("bikes.mp4")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        with pytest.raises(requests.RequestException):
            requests.get(f"{base}/healthz", timeout=5)
        return code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_serve_command_end_to_end(serve_store, tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_VLM_TOKEN": "cli-t0ken"}  # the token through the environment, not argv
    log_path = tmp_path / "serve.log"
    code = _serve_search_and_stop(["--store", str(serve_store), "--port", str(port), "--num-cpus", "0.1"], env,
                                  port, "cli-t0ken", log_path)
    assert code == 0
    assert "cli-t0ken" not in log_path.read_text()  # the token is never logged


def test_serve_config_yaml_deploys(serve_store, tmp_path):
    """The shipped cluster config, pointed at a local store and port, deploys through ``--config`` (``serve run``
    semantics): the token comes from ``--token``, searches answer, Ctrl-C stops it."""
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[2] / "clusters" / "serve-app.yaml").read_text())
    port = _free_port()
    cfg["http_options"].update(host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    app["args"].update(store=str(serve_store), grounder_num_gpus=0, num_cpus=0.1, max_ongoing_requests=4)
    path = tmp_path / "serve-app.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_VLM_TOKEN")}
    token_file = tmp_path / "token"  # not on the command line (ps shows argv to every user)
    token_file.write_text("yaml+t0ken/=\n")
    _serve_search_and_stop(["--config", str(path), "--token-file", str(token_file)], env, port, "yaml+t0ken/=",
                           tmp_path / "serve-config.log")


def test_token_file_mistakes_exit_2(tmp_path):
    """An empty or missing token file, or a token given twice, is a one-line error before anything starts."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_VLM_TOKEN"}
    for argv, want in ((["--token-file", str(empty)], "is empty"),
                       (["--token-file", str(tmp_path / "missing")], "cannot read the token file"),
                       (["--token-file", str(empty), "--token", "x"], "give one of")):
        r = subprocess.run([sys.executable, "-c", WRAPPER, "--store", str(tmp_path), *argv], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and want in r.stderr, (argv, r.returncode, r.stderr[-500:])
