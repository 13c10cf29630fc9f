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
