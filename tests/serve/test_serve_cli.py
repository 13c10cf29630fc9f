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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_end_to_end(serve_store, tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_VLM_TOKEN": "cli-t0ken"}  # the token through the environment, not argv
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "--store", str(serve_store), "--port", str(port),
                             "--num-cpus", "0.1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        body = {"query": "a person riding a bicycle", "top_k": 3}
        assert requests.post(f"{base}/v1/search", json=body, timeout=60).status_code == 401
        r = requests.post(f"{base}/v1/search", json=body, headers={"Authorization": "Bearer cli-t0ken"}, timeout=60)
        assert r.status_code == 200 and r.json()["moments"][0]["uri"].endswith("bikes.mp4")
        assert "cli-t0ken" not in (tmp_path / "serve.log").read_text()  # the token is never logged
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(requests.RequestException):
            requests.get(f"{base}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
