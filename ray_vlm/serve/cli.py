"""``ray-vlm serve``: start the Serve application locally over a token store, or from a serve config YAML.

``serve`` is a plain function with typer ``Annotated`` parameters; ``ray_vlm.cli`` registers it as the
``serve`` command. Two forms:

- ``ray-vlm serve --store DST [--port P] [--host H] [--token T]``: a local Ray (or ``--address``), Serve's HTTP
  proxy on ``H:P`` (127.0.0.1 unless told otherwise), the app built by ``build_app``; Ctrl-C stops it.
- ``ray-vlm serve --config clusters/serve-app.yaml``: the cluster form, deployed as ``serve run`` does
  (the YAML's ``http_options`` and per-deployment overrides apply; ``--token`` reaches the app through the
  ``RAY_VLM_TOKEN`` environment variable of a local cluster).

User mistakes (no store, a store without versions, a public bind without a token, a bad YAML) print one line
and exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

TOKEN_ENV = "RAY_VLM_TOKEN"


def _err(msg: str, code: int = 2) -> None:
    typer.echo(f"ray-vlm: error: {msg}", err=True)
    raise typer.Exit(code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    store: Annotated[Optional[str], typer.Option(help="Token store URI: a directory or s3://bucket/prefix.")] = None,
    port: Annotated[int, typer.Option(help="HTTP port.", min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    token: Annotated[Optional[str], typer.Option(
        envvar=TOKEN_ENV, show_default=False,
        help=f"Bearer token every /v1 request must carry (or ${TOKEN_ENV}). Never logged.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="A Ray Serve config YAML (e.g. clusters/serve-app.yaml): the cluster form. --store, --port, --host "
             "and the other app options are taken from the YAML instead.")] = None,
    qa_model: Annotated[Optional[str], typer.Option(
        help="VLM answering /v1/ask: a Hugging Face id in the local cache or a local path (default: answer "
             "with the grounded evidence only).")] = None,
    grounder_gpus: Annotated[float, typer.Option(help="GPUs per grounder replica (0: CPU).", min=0)] = 0.0,
    qa_gpus: Annotated[float, typer.Option(help="GPUs per QA replica (0: CPU).", min=0)] = 0.0,
    num_cpus: Annotated[float, typer.Option(help="CPUs reserved per replica.", min=0)] = 0.25,
    max_queued_requests: Annotated[int, typer.Option(help="Queued requests per deployment beyond which the "
                                                           "service answers 503.", min=0)] = 32,
    request_timeout_s: Annotated[float, typer.Option(help="End-to-end HTTP timeout (408 after it).", min=1)] = 60.0,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    s3_endpoint: Annotated[Optional[str], typer.Option(help="S3 endpoint URL (MinIO, moto); or "
                                                            "RAY_VLM_S3_ENDPOINT_URL.")] = None,
    split_search: Annotated[bool, typer.Option(
        "--split-search", help="Search through QueryEncoder, Retriever and Grounder in turn (three handle calls) "
                               "instead of one call to the Grounder.")] = False,
    allow_public_without_token: Annotated[bool, typer.Option(
        "--allow-public-without-token", help="Bind a non-loopback address with no token (not recommended).")] = False,
) -> None:
    """Serve search, grounding and QA over HTTP, with a web page at / (Ctrl-C stops it)."""
    if (store is None) == (config is None):
        _err("give exactly one of --store (local form) or --config (a serve config YAML)")
    if config is not None:
        _serve_config(config, token=token, address=address)
        return
    if not _is_loopback(host) and not token and not allow_public_without_token:
        _err(f"binding {host} without a token would open the archive to the network; pass --token "
             f"(or ${TOKEN_ENV}), or bind 127.0.0.1")

    from pydantic import SecretStr, ValidationError

    from ray_vlm.serve.app import APP_NAME, ServeArgs, build_app
    from ray_vlm.store import StoreError, TokenStore

    endpoint = s3_endpoint or os.environ.get("RAY_VLM_S3_ENDPOINT_URL")
    storage_options = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None
    try:
        version = TokenStore(store, storage_options).latest_version()
    except (StoreError, ValueError, OSError) as e:
        _err(f"cannot open the store {store}: {e}")
    if not version:
        _err(f"the store {store} has no committed version yet: index videos into it first (ray-vlm index)")
    try:
        args = ServeArgs(store=store, storage_options=storage_options, token=SecretStr(token) if token else None,
                         token_env=None, qa_model=qa_model, grounder_num_gpus=grounder_gpus, qa_num_gpus=qa_gpus,
                         num_cpus=num_cpus, max_queued_requests=max_queued_requests,
                         timeout_s=max(1.0, request_timeout_s - 1.0), fused_search=not split_search)
    except ValidationError as e:
        _err(f"bad serve options: {e}")

    import ray
    from ray import serve as rserve

    def interrupt(signum, frame):  # SIGTERM (a container stop) ends the service like Ctrl-C does
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            rserve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
            rserve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
            shown = f"[{host}]" if ":" in host else host
            typer.echo(f"ray-vlm: serving {store} (version {version}) at http://{shown}:{port}/ "
                       f"({'token required' if token else 'no token'}); Ctrl-C stops")
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM, while starting or serving: a normal stop
            typer.echo("ray-vlm: stopping", err=True)
        finally:
            try:
                rserve.shutdown()
            finally:
                ray.shutdown()
    finally:
        signal.signal(signal.SIGTERM, old_term)


def _serve_config(config: Path, *, token: str | None, address: str | None) -> None:
    """Validate a serve config YAML, then run it the way ``serve run CONFIG`` does (blocking)."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(config.read_text())
    except FileNotFoundError:
        _err(f"config file not found: {config}")
    except yaml.YAMLError as e:
        _err(f"bad YAML {config}: {e}")
    try:
        ServeDeploySchema.model_validate(raw)
    except (ValidationError, TypeError, ValueError) as e:
        _err(f"bad serve config {config}: {e}")
    if token:
        os.environ[TOKEN_ENV] = token  # inherited by the workers of a local cluster
    from ray.serve.scripts import cli as serve_cli

    argv = ["run", str(config)] + (["--address", address] if address else [])
    sys.exit(serve_cli.main(args=argv, standalone_mode=False) or 0)
