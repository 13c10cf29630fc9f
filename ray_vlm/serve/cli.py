"""``ray-vlm serve``: start the Serve application locally over a token store, or from a serve config YAML.

``serve`` is a plain function with typer ``Annotated`` parameters; ``ray_vlm.cli`` registers it as the
``serve`` command. Two forms:

- ``ray-vlm serve --store DST [--port P] [--host H] [--token T]``: a local Ray (or ``--address``), Serve's HTTP
  proxy on ``H:P`` (127.0.0.1 unless told otherwise), the app built by ``build_app``. SIGTERM or Ctrl-C stops it
  as a service manager expects: Serve stops (replicas finish in-flight requests within ``--grace-period-s``), the
  Ray it started shuts down, any process of that Ray still running is killed, exit 0; a second signal exits at
  once. Ray's and Serve's own log lines go to a log file (``--verbose``: to the console).
- ``ray-vlm serve --config clusters/serve-app.yaml``: the cluster form, deployed as ``serve run`` does
  (the YAML's ``http_options`` and per-deployment overrides apply; ``--token`` reaches the app through the
  ``RAY_VLM_TOKEN`` environment variable of a local cluster).

User mistakes (no store, a store without versions, a public bind without a token, a bad YAML) print one line
and exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Annotated

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
    store: Annotated[str | None, typer.Option(help="Token store URI: a directory or s3://bucket/prefix.")] = None,
    port: Annotated[int, typer.Option(help="HTTP port.", min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    token: Annotated[str | None, typer.Option(
        envvar=TOKEN_ENV, show_default=False,
        help=f"Bearer token every /v1 request must carry. Prefer ${TOKEN_ENV} or --token-file: a command line is "
             "visible to every user of the machine (ps). Never logged.")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="Read the bearer token from this file (its first line; keep it mode 600).")] = None,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Comma-separated Host names the server answers for (default: the bound address, localhost, "
             "127.0.0.1, ::1); others get 421. '*' accepts any (behind a proxy that checks Host).")] = None,
    max_body_bytes: Annotated[int, typer.Option(
        help="Largest request body; larger ones get 413 before they are read.", min=1024)] = 64 << 10,
    config: Annotated[Path | None, typer.Option(
        help="A Ray Serve config YAML (e.g. clusters/serve-app.yaml): the cluster form. --store, --port, --host "
             "and the other app options are taken from the YAML instead.")] = None,
    qa_model: Annotated[str | None, typer.Option(
        help="VLM answering /v1/ask: a Hugging Face id in the local cache or a local path (default: answer "
             "with the grounded evidence only).")] = None,
    grounder_gpus: Annotated[float, typer.Option(help="GPUs per grounder replica (0: CPU).", min=0)] = 0.0,
    qa_gpus: Annotated[float, typer.Option(help="GPUs per QA replica (0: CPU).", min=0)] = 0.0,
    num_cpus: Annotated[float, typer.Option(help="CPUs reserved per replica.", min=0)] = 0.25,
    max_queued_requests: Annotated[int, typer.Option(help="Queued requests per deployment beyond which the "
                                                           "service answers 503.", min=0)] = 32,
    request_timeout_s: Annotated[float, typer.Option(help="End-to-end HTTP timeout (408 after it).", min=1)] = 60.0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL (MinIO, moto); or "
                                                            "RAY_VLM_S3_ENDPOINT_URL.")] = None,
    split_search: Annotated[bool, typer.Option(
        "--split-search", help="Search through QueryEncoder, Retriever and Grounder in turn (three handle calls) "
                               "instead of one call to the Grounder.")] = False,
    allow_public_without_token: Annotated[bool, typer.Option(
        "--allow-public-without-token", help="Bind a non-loopback address with no token (not recommended).")] = False,
    grace_period_s: Annotated[float, typer.Option(
        help="On SIGTERM or Ctrl-C: seconds for in-flight requests to finish and Serve and Ray to stop; what is "
             "left then is killed.", min=1)] = 20.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and Serve's own log lines (by default "
                                                                  "they go to a log file).")] = False,
) -> None:
    """Serve search, grounding and QA over HTTP, with a web page at / (Ctrl-C or SIGTERM stops it, exit 0)."""
    if (store is None) == (config is None):
        _err("give exactly one of --store (local form) or --config (a serve config YAML)")
    if token_file is not None:
        if token:
            _err("give one of --token / $RAY_VLM_TOKEN and --token-file")
        try:
            token = token_file.read_text().splitlines()[0].strip() if token_file.read_text().strip() else ""
        except OSError as e:
            _err(f"cannot read the token file {token_file}: {e}")
        if not token:
            _err(f"the token file {token_file} is empty")
    if config is not None:
        _serve_config(config, token=token, address=address)
        return
    if not _is_loopback(host) and not token and not allow_public_without_token:
        _err(f"binding {host} without a token would open the archive to the network; pass --token "
             f"(or ${TOKEN_ENV}), or bind 127.0.0.1")

    from pydantic import SecretStr, ValidationError

    from ray_vlm.serve.app import ServeArgs
    from ray_vlm.store.token_store import StoreError, TokenStore

    assert store is not None  # exactly one of --store and --config, checked above
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
                         timeout_s=max(1.0, request_timeout_s - 1.0), fused_search=not split_search,
                         graceful_shutdown_timeout_s=max(0.0, grace_period_s - 5.0), host=host,
                         max_body_bytes=max_body_bytes,
                         allowed_hosts=[h.strip() for h in allowed_hosts.split(",") if h.strip()]
                         if allowed_hosts else None)
    except ValidationError as e:
        _err(f"bad serve options: {e}")

    from ray_vlm.core._proc import GracefulStop, RayProcesses, log_path, ray_output

    procs = RayProcesses() if address is None else None  # a local Ray: none of its processes outlives the command
    stop = GracefulStop(on_force=procs.kill_all if procs else None)
    stop.install()
    log = None if verbose else log_path("serve")
    try:
        with ray_output(log) as console:
            _run_until_stopped(args, stop, procs, console, log=log, host=host, port=port, address=address,
                               request_timeout_s=request_timeout_s, grace_period_s=grace_period_s, verbose=verbose,
                               banner=f"ray-vlm: serving {store} (version {version}) at http://"
                                      f"{f'[{host}]' if ':' in host else host}:{port}/ "
                                      f"({'token required' if token else 'no token'}); Ctrl-C or SIGTERM stops")
    finally:
        stop.restore()


def _run_until_stopped(args, stop, procs, console, *, log, host, port, address, request_timeout_s, grace_period_s,
                       verbose, banner) -> None:
    """Start Ray (unless ``address``), Serve and the app; wait for SIGTERM/SIGINT; then stop within the grace
    period: Serve first (replicas finish their in-flight requests, new ones are refused), then Ray, then whatever
    Ray left running is killed."""
    import logging

    import ray
    from ray import serve as rserve

    from ray_vlm.core._proc import StopRequested, start_ray
    from ray_vlm.serve.app import APP_NAME, build_app

    started = False
    try:
        # A signal while starting stops the start; ray.init's own SIGTERM handlers are replaced by the stop's.
        start_ray(stop, address=address, include_dashboard=False, configure_logging=verbose,
                  logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose)
        with stop.interruptible():
            started = True
            rserve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
            rserve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        console.out.write(banner + "\n")
        console.out.flush()
        while not stop.wait(5.0):
            if procs is not None:
                procs.snapshot()  # the workers started so far (re-parented ones are found as subreaper too)
    except StopRequested:
        pass
    except Exception:
        if log is not None:
            console.err.write(f"ray-vlm: serve failed; Ray's log: {log}\n")
        raise
    finally:
        deadline = time.monotonic() + grace_period_s
        if stop.requested:
            console.err.write(f"ray-vlm: {stop.signal_name}: stopping (grace period {grace_period_s:g} s)\n")
        if started:
            _stop_serve(max(1.0, deadline - time.monotonic()), console)
        if procs is not None:
            procs.snapshot()
        ray.shutdown()  # also after a start cut short (it stops the processes already started)
        if procs is not None:
            killed = procs.reap(timeout_s=max(2.0, deadline - time.monotonic()))
            if killed:
                console.err.write(f"ray-vlm: killed {len(killed)} Ray process(es) left after shutdown: "
                                  f"{', '.join(killed)}\n")
        if stop.requested:
            console.err.write("ray-vlm: stopped\n")


def _stop_serve(timeout_s: float, console) -> None:
    """``serve.shutdown()`` bounded by ``timeout_s``: apps deleted (each replica drains its in-flight requests for
    up to the deployments' ``graceful_shutdown_timeout_s``), proxies and controller stopped."""
    from ray import serve as rserve

    try:
        from ray.serve.context import _check_cached_client_alive, _disconnect

        client, _ = _check_cached_client_alive()
        if client is not None:
            client.shutdown(timeout_s=timeout_s)
        _disconnect()
    except ImportError:  # another Ray version: the public call (not bounded)
        rserve.shutdown()
    except Exception as e:  # noqa: BLE001 - a dead controller: Ray's shutdown below stops everything anyway
        console.err.write(f"ray-vlm: Serve did not stop cleanly ({type(e).__name__}: {e}); stopping Ray\n")


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
