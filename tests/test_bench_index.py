"""``bench index``, ``bench gpu`` and ``bench encode`` run end to end on small inputs (what they report, never how
fast: timings are not asserted)."""

from __future__ import annotations

import json

import pytest

import benchmarks.bench as B

STATS = """\
Operator 1 ReadVideos->SplitBlocks(2): 4 tasks executed, 8 blocks produced in 3.1s
* Remote wall time: 1.2s min, 2.1s max, 1.6s mean, 6.4s total
* Remote cpu time: 900.5ms min, 1.9s max, 1.3s mean, 5.25s total
Operator 2 MapBatches(_BatchedEffNet): 8 tasks executed, 8 blocks produced in 4.2s
* Remote cpu time: 5.52ms min, 47.45ms max, 26.23ms mean, 209.87ms total
Operator 3 Write: 8 tasks executed, 8 blocks produced in 0.4s
* Remote cpu time: 4.91us min, 17.82us max, 9.92us mean, 79.33us total
"""


def test_ray_data_stats_are_read_per_operator():
    got = B._ray_data_cpu_s(STATS)
    assert got == pytest.approx({"ReadVideos->SplitBlocks(2)": 5.25, "MapBatches(_BatchedEffNet)": 0.20987,
                                 "Write": 79.33e-6})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_index_bench_compares_with_the_batched_baseline(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CACHE", tmp_path / "cache")
    data = B.index_bench(tmp_path / "index.json", seconds=3.0, clips=2, size=(160, 120))
    assert json.loads((tmp_path / "index.json").read_text())["clips"] == data["clips"]
    res = data["results"]
    base = next(k for k in res if k.startswith("batched baseline"))
    assert set(res) == {base, "ray-vlm index", "ray-vlm index, memory budget lifted"}
    assert res[base]["frames"] == 2 * 3  # read_videos(fps=1): one frame per second of each clip
    assert res["ray-vlm index"]["frames"] == 2 * 3
    assert set(res["ray-vlm index"]["stage_cpu_s"]) == {"probe", "decode", "speech", "prune", "encode",
                                                               "compress+write"}
    assert {"model", "decode (read_videos)"} <= set(res[base]["stage_cpu_s"])
    assert res[base]["speedup_vs_baseline"] == 1.0
    fixed = data["fixed_costs"]
    assert set(fixed) == {"ray_start_s", "actor_start_s", "model_load_cold_s", "model_load_warm_s",
                          "model_load_torch_s"}
    assert all(v >= 0 for v in fixed.values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_bench_runs_on_cpu(ray_local, tmp_path, monkeypatch):
    import benchmarks.bench_gpu as G

    monkeypatch.setattr(G, "CACHE", tmp_path / "cache")
    data = G.gpu_bench(tmp_path / "gpu.json", device="cpu", preset="tiny", batch_size=8, clips=1, seconds=3.0,
                       size=(160, 96), tower_seconds=0.5)
    assert data["device"] == "cpu" and data["dtype"] == "float32"  # half precision is CUDA-only
    assert data["tower_alone"]["frames"] >= 8 and data["tower_alone"]["frames_per_s"] > 0
    job = data["index"]
    assert job["videos_ok"] == 1 and job["frames"] == 3
    assert job["video_hours_per_gpu_hour"] == pytest.approx(job["video_s"] / job["wall_s"])
    assert "encode" in job["stage_cpu_s"]
    assert json.loads((tmp_path / "gpu.json").read_text())["preset"] == "tiny"
