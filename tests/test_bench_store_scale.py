"""``python -m benchmarks store-scale`` at toy sizes: the report's structure and what its numbers must satisfy (not
timings: those are the real run's, in ``benchmarks/results/store_scale.json``)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(300)


def test_store_scale_bench_builds_commits_compacts_and_queries_both_formats(tmp_path):
    from benchmarks.bench_store_scale import format_table, store_scale_bench

    out = tmp_path / "scale.json"
    rep = store_scale_bench(out, sizes=(0.5, 2.0), dim=8, repeats=1, queries=3, warmup=1, commit_fps=0.25,
                            sparse_from_hours=2.0, sparse_fps=0.5, work_dir=tmp_path / "work", keep=True,
                            echo=lambda *_: None)
    assert json.loads(out.read_text())["sizes"][1]["hours"] == 2.0
    assert str(tmp_path) not in out.read_text()  # no machine paths
    small, big = rep["sizes"]
    assert (small["build_fps"], big["build_fps"]) == (1.0, 0.5)  # the largest size built sparser, as asked
    assert (small["videos"], small["frames"]) == (1, 1800) and (big["videos"], big["frames"]) == (2, 3600)
    for size in (small, big):
        for kind in ("v1", "v2"):
            r = size[kind]
            c = r["commit_hour"]
            # one more hour at 0.25 fps: 900 frames in 29 chunks of 32, one chunk file each, then one commit
            assert (c["frames"], c["chunks"]) == (900, 29) and len(c["runs"]) == 1
            assert c["write_files_created"] == 29 and c["write_bytes"] > 900 * 16
            assert c["commit_files_created"] >= 1 and 0 < c["commit_bytes"] < c["write_bytes"]
            assert c["commit_s"] > 0 and c["write_s"] > 0 and c["readback_s"] > 0
            assert r["reader"]["open_s"] > 0 and r["reader"]["refresh_s"] > 0
            f = r["files"]
            # the built hours, the warm-up hour and the timed one, each a video of its own
            assert f["hours"] == pytest.approx(size["hours"] + 2) and f["videos"] == size["videos"] + 2
            assert f["frames"] == size["frames"] + 2 * 900
            assert f["per_video_hour"] == pytest.approx(f["after_compaction"] / f["hours"])
            q = r["query"]
            assert q["queries"] == 3 and 0 < q["p50_ms"] <= q["p99_ms"] and q["moments_per_query"] > 0
        # v2 compaction merges what the chunk writes left; v1 has none and keeps one file per chunk
        assert size["v2"]["files"]["after_compaction"] < size["v2"]["files"]["before_compaction"]
        assert size["v1"]["files"]["after_compaction"] == size["v1"]["files"]["before_compaction"]
        assert size["v1"]["files"]["job_layout_per_video_hour"] >= 29
        assert set(size["v2"]["commit_hour"]["commit_parts_s"]) >= {"manifest", "_merge_sources", "_append"}
        assert size["v2"]["reader"]["manifest_parts"]["sources_rows"] == size["videos"] + 2
        assert size["v1"]["commit_hour"]["manifest_bytes"] > 0
    # 0.5 h is below the Searcher's whole-library threshold (3,600 frames); 2 h goes through the window index
    assert small["v2"]["query"]["whole_library_grounded"] and not big["v2"]["query"]["whole_library_grounded"]
    assert big["v1"]["query"]["index_windows"] == big["v2"]["query"]["index_windows"] > 0
    assert set(rep["targets"]) == {"v1", "v2"} and rep["targets"]["v2"]["hours"] == [0.5, 2.0]
    table = format_table(rep)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "| 2 (0.5 fps) |" in table


def test_store_scale_cli_is_registered():
    from typer.testing import CliRunner

    from benchmarks.cli import app

    res = CliRunner().invoke(app, ["store-scale", "--help"])
    assert res.exit_code == 0 and "--sizes" in res.output
