"""``ray-vlm bench serve`` on a tiny budget: both search paths deployed, timed in one loop, all answered 200.

Timings are never asserted (the machine may be busy); only that every side was measured and reported.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_serve_times_the_fused_and_split_paths(ray_local, serve_store, tmp_path):
    from benchmarks.bench_serve import bench_serve

    out = tmp_path / "serve.json"
    r = bench_serve(out, store=str(serve_store), requests_per_side=4, concurrency=2, duration_s=1.0)
    saved = json.loads(out.read_text())
    assert saved["overhead_ms"] == r["overhead_ms"] and saved["overhead_split_ms"] == r["overhead_split_ms"]
    for side in ("direct", "http", "http_split", "healthz", "static"):
        assert r[side]["n"] == 4 and r[side]["p50_ms"] > 0, side
    assert r["overhead_ms"]["p50"] == pytest.approx(r["http"]["p50_ms"] - r["direct"]["p50_ms"])
    for phase in ("throughput", "throughput_split"):
        t = r[phase]
        assert set(t["status_counts"]) == {200} and t["requests_per_s"] > 0, t
        assert sum(int(k) * v for k, v in t["grounder_batch_sizes"].items()) >= t["status_counts"][200]
    assert r["target_overhead_p50_ms"] == 3.0 and r["videos"] >= 2
