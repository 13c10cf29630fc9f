"""``ray-vlm bench query``'s grounding-cost part (the ANN part runs over 1,000 synthetic hours: not in CI)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


def test_ground_bench_times_every_stage_and_the_arithmetic_grounds():
    from benchmarks.bench_query import _synth_tokens, ground_bench
    from ray_vlm.query import grounding as G

    r = ground_bench(frames=240, queries=2, spans=3, span_s=24.0)
    assert r["frames"] == 240 and r["candidate_spans"] == 3 and r["queries"] == 2
    for name in ("fused", "content"):
        for stage in ("calibration", "whole_hour", "candidates"):
            assert 0 < r[name][stage]["p50_ms"] <= r[name][stage]["p99_ms"]
        assert r[name]["ms_per_video_hour"] == pytest.approx(r[name]["whole_hour"]["p50_ms"] * 15)
    # the synthetic tokens are what the Searcher grounds: a full grid of int8 patches per frame
    vt = _synth_tokens(np.random.default_rng(0), 50, 16, 2, 9, 0.3)
    assert vt.has_grid and vt.has_patches and vt.patch_src.shape == (50, 9) and (vt.patch_src >= 0).all()
    assert vt.grid_tokens.shape == (50, 4, 16) and np.allclose(np.linalg.norm(vt.global_tokens, axis=1), 1)
    assert G.frame_scores(vt, vt.global_tokens[:1])["global"][0, 0] == pytest.approx(1.0, abs=1e-5)


def test_query_bench_puts_lance_vector_index_rows_beside_usearch(tmp_path, monkeypatch):
    """The ANN comparison on a small library: usearch and Lance's IVF-HNSW-SQ (built over appends, the last one
    indexed incrementally) answer the same queries, each setting of the sweep with its recall and latency."""
    import benchmarks.bench_query as BQ

    monkeypatch.setattr(BQ, "CACHE", tmp_path / "cache")
    r = BQ.query_bench(tmp_path / "q.json", hours=0.5, dim=32, queries=20, brute_force_queries=2, encode=False,
                       pooling=False, ef_values=(128,), ground=False, lance_ann=True)
    la, ann = r["lance_ann"], r["ann_rescore"]
    assert la["index_type"] == "IVF_HNSW_SQ" and la["queries"] == 20 and la["vectors"] > 0
    assert [(s["nprobes"], s["ef"]) for s in la["sweep"]] == [(16, 256), (64, 1024), (256, 2048)]
    for row in [ann, *la["sweep"]]:
        assert 0.0 <= row["top1_window_recall"] <= 1.0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert la["p50_ms"] == la["sweep"][0]["p50_ms"] and la["incremental_append_and_index_s"] > 0
    assert (tmp_path / "q.json").exists()
