"""``bench_serve``: what HTTP + Serve adds to a search, and how many searches a replica set answers per second.

Measured on one machine, one replica per deployment:

- ``direct``: ``Searcher.search(text)`` in this process (encode + retrieve + ground), warm;
- ``http``: ``POST /v1/search`` on loopback through Serve's proxy, the ingress and one handle call to the
  Grounder (``fused_search``, the app's default), sequential, warm; ``overhead_ms`` = http p50 - direct p50
  (the target: <= 3 ms p50);
- ``http_split``: the same searches against a second app with ``fused_search=False`` (ingress -> QueryEncoder ->
  Retriever -> Grounder: three handle calls), deployed beside the first and timed in the same loop;
- ``static``: ``GET /static/style.css`` (proxy + ingress, no downstream hop): the floor of any request;
- ``healthz``: ``GET /healthz`` (proxy + ingress + one handle hop, no search work); ``hop_ms`` = healthz p50 -
  static p50, the cost of one DeploymentHandle call;
- ``throughput`` (and ``throughput_split``): ``concurrency`` client threads for ``duration_s``: requests/s
  answered 200 (and 503 counts); per replica = that / replicas of the busiest deployment (1 here); how many
  requests the grounder's ``@serve.batch`` grounded together (a histogram of batch sizes).

The four kinds of request are interleaved, so every side sees the same machine load.
Results go to a JSON file with the machine's load and core count (the numbers depend on both).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUERIES = ("a person riding a bicycle", "a rabbit", "a man talking on the phone in a car", "a street with cars",
           "an animated animal in a forest", "a bow tie")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def _sample_store(root: Path) -> str:
    from ray_vlm.core.config import IndexConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.pipelines.archive_index import index_archive

    store = root / "store"
    index_archive([str(p) for p in sample_videos()], str(store), IndexConfig.model_validate({"commit_interval_s": 1}))
    return str(store)


def bench_serve(out: Path, *, store: str | None = None, requests_per_side: int = 200, concurrency: int = 8,
                duration_s: float = 10.0, num_cpus: float = 0.1, access_log: bool = True,
                split: bool = True) -> dict:
    """Run the serve benchmark and write ``out`` (JSON); returns the same dict.

    Args:
        out: JSON results file.
        store: a token store to serve (default: the three sample clips indexed into a temporary store).
        requests_per_side: sequential searches timed on each side (direct, HTTP) after a warm-up.
        concurrency: client threads of the throughput phase.
        duration_s: length of each throughput phase.
        num_cpus: CPUs reserved per replica (both apps, ten replicas, must fit the machine; a reservation is not a
            pin: every replica runs on any core).
        access_log: Serve's per-request log lines (on by default in the app).
        split: also deploy and time the three-call search path (``fused_search=False``).
    """
    # Long: one benchmark run read top to bottom: the service started, each side timed, the table and the JSON.
    import ray
    import requests
    from ray import serve

    from ray_vlm.query.searcher import Searcher
    from ray_vlm.serve.app import APP_NAME, ServeArgs, build_app

    split_app = f"{APP_NAME}-split"
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    tmp = tempfile.TemporaryDirectory(prefix="ray-vlm-bench-serve-")
    try:
        if store is None:
            store = _sample_store(Path(tmp.name))
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        args = ServeArgs(store=store, token_env=None, num_cpus=num_cpus, max_ongoing_requests=32,
                         max_queued_requests=256, access_log=access_log)
        t0 = time.perf_counter()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        startup_s = time.perf_counter() - t0
        if split:
            serve.run(build_app(args.model_copy(update={"fused_search": False})), name=split_app,
                      route_prefix="/split")
        base = f"http://127.0.0.1:{port}"
        session = requests.Session()

        searcher = Searcher(store)
        qs = [QUERIES[i % len(QUERIES)] for i in range(requests_per_side)]
        for q in QUERIES:  # warm every side: models loaded, text embeddings and calibration cached
            searcher.search(q, top_k=5)
            session.post(f"{base}/v1/search", json={"query": q, "top_k": 5}).raise_for_status()
            if split:
                session.post(f"{base}/split/v1/search", json={"query": q, "top_k": 5}).raise_for_status()

        direct, http, http_split, health, static = [], [], [], [], []
        for q in qs:  # interleaved, so every side sees the same machine load
            t = time.perf_counter()
            searcher.search(q, top_k=5)
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = session.post(f"{base}/v1/search", json={"query": q, "top_k": 5})
            http.append(time.perf_counter() - t)
            r.raise_for_status()
            if split:
                t = time.perf_counter()
                r = session.post(f"{base}/split/v1/search", json={"query": q, "top_k": 5})
                http_split.append(time.perf_counter() - t)
                r.raise_for_status()
            t = time.perf_counter()
            session.get(f"{base}/healthz").raise_for_status()
            health.append(time.perf_counter() - t)
            t = time.perf_counter()
            session.get(f"{base}/static/style.css").raise_for_status()
            static.append(time.perf_counter() - t)

        def throughput(prefix: str, app: str) -> dict:
            codes: dict[int, int] = {}
            lock = threading.Lock()
            stop_at = time.perf_counter() + duration_s

            def client(i: int):
                s = requests.Session()
                k = i
                while time.perf_counter() < stop_at:
                    r = s.post(f"{base}{prefix}/v1/search", json={"query": QUERIES[k % len(QUERIES)], "top_k": 5})
                    k += 1
                    with lock:
                        codes[r.status_code] = codes.get(r.status_code, 0) + 1

            t = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            elapsed = time.perf_counter() - t
            ok_rps = codes.get(200, 0) / elapsed
            sizes = serve.get_deployment_handle("Grounder", app).stats.remote().result()["batch_sizes"]
            batches = {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))} if sizes else {}
            return {"concurrency": concurrency, "duration_s": elapsed, "status_counts": codes,
                    "requests_per_s": ok_rps, "requests_per_s_per_replica": ok_rps / 1,
                    "grounder_batch_sizes": batches}

        d, h = _stats_ms(direct), _stats_ms(http)
        result = {
            "benchmark": "serve",
            "store_version": searcher.version,
            "videos": len(searcher.videos()),
            "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
            "replicas": {"Ingress": 1, "QueryEncoder": 1, "Retriever": 1, "Grounder": 1, "QA": 1},
            "num_cpus_per_replica": num_cpus,
            "access_log": access_log,
            "startup_s": startup_s,
            "direct": d,
            "http": h,
            "healthz": _stats_ms(health),
            "static": _stats_ms(static),
            "hop_ms": _stats_ms(health)["p50_ms"] - _stats_ms(static)["p50_ms"],
            "overhead_ms": {"p50": h["p50_ms"] - d["p50_ms"], "p99": h["p99_ms"] - d["p99_ms"]},
            "target_overhead_p50_ms": 3.0,
            "throughput": throughput("", APP_NAME),
        }
        if split:
            hs = _stats_ms(http_split)
            result["http_split"] = hs
            result["overhead_split_ms"] = {"p50": hs["p50_ms"] - d["p50_ms"], "p99": hs["p99_ms"] - d["p99_ms"]}
            result["throughput_split"] = throughput("/split", split_app)
        result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
        Path(out).write_text(json.dumps(result, indent=2))
        return result
    finally:
        try:
            for app in (APP_NAME, split_app):
                serve.delete(app)
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
            tmp.cleanup()
