"""Shared fixtures: one local Ray per test session, one loopback S3 server (moto) per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# The checkout's benchmarks/ (run from a checkout, never installed) are importable whatever the working directory.
_CHECKOUT = str(Path(__file__).resolve().parents[1])
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)

# Tests never reach a hub; the bundled encoder needs nothing from one (forced: a user's shell may say otherwise).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every server a test starts is on loopback: never through a proxy from the user's environment.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    x for x in ("127.0.0.1", "localhost", "::1", os.environ.get("NO_PROXY", "")) if x)
# The tests start their own local Ray; an address from the environment would send them (and the CLIs they
# run) to another cluster.
os.environ.pop("RAY_ADDRESS", None)
# Derived model caches (class-name embeddings, ONNX exports) stay inside the checkout (gitignored), for the
# test process and the Ray workers it starts.
os.environ.setdefault("RAY_VLM_CACHE_DIR", str(Path(__file__).resolve().parent / ".fixtures" / "model_cache"))
# The same CPU kernels on every x86-64 machine of this kind, AVX2 or AVX-512: torch's own vectorised code,
# oneDNN and MKL would otherwise pick code for the CPU, whose float results differ in the last bits (a
# model's ranking of near-equal scores could then differ between machines). Set before torch is imported;
# subprocesses and Ray workers inherit them. Tests that need CUDA are marked gpu and say so themselves.
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
os.environ["MKL_CBWR"] = "AVX2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that needs one (started once: it costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real S3 protocol endpoint); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the kernel picks a free port
    server.start()
    _, port = server.get_host_and_port()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback server; yields (bucket_name, storage_options)."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    yield name, opts
