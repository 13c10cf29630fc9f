"""The command line as a user runs it: index (JSON summary), videos, query, bad input, a hanging decoder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_vlm.samples import sample_videos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run_cli(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, RAY_VLM_QUIET="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "ray_vlm.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A library of two real clips, a text file named .mp4, a zero-byte file; indexed once by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    lib = root / "lib"
    lib.mkdir()
    for p in sample_videos(("bikes.mp4", "carphone_pristine.mp4")):
        shutil.copy(p, lib / p.name)
    (lib / "readme.mp4").write_text("not a video\n")
    (lib / "zero.mp4").write_bytes(b"")
    store = root / "store"
    res = run_cli("index", str(lib), "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return lib, store, json.loads(res.stdout.strip().splitlines()[-1])


def test_index_json_summary(indexed):
    _, _, s = indexed
    assert (s["inputs"], s["videos_ok"], s["videos_partial"], s["videos_failed"]) == (4, 2, 0, 2)
    fails = {Path(f["uri"]).name: f for f in s["failures"]}
    assert set(fails) == {"readme.mp4", "zero.mp4"}
    assert fails["zero.mp4"]["error_type"] == "empty"
    assert fails["readme.mp4"]["error_type"] in ("not_video", "policy") and fails["readme.mp4"]["message"]
    assert s["frames_sampled"] == 10 + 5  # bikes 10 s: 0..9 s; carphone 4.004 s: 0..4 s (last frame 3.97 s)
    assert 0 < s["frames_kept"] <= s["frames_sampled"]
    assert s["bytes_per_video_hour"] > 0 and s["video_hours"] == pytest.approx(14.0 / 3600, rel=0.02)


def test_videos_lists_every_row(indexed):
    _, store, _ = indexed
    res = run_cli("videos", "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr
    rows = {Path(r["uri"]).name: r for r in json.loads(res.stdout)}
    assert set(rows) == {"bikes.mp4", "carphone_pristine.mp4", "readme.mp4", "zero.mp4"}
    assert rows["bikes.mp4"]["status"] == "ok" and rows["bikes.mp4"]["frames"] == 10
    assert rows["bikes.mp4"]["duration_s"] == pytest.approx(10.0, abs=0.05)
    assert rows["zero.mp4"]["status"] == "failed" and rows["zero.mp4"]["error"]
    assert all(len(r["video_id"]) == 16 for r in rows.values())


def test_query_finds_the_cyclists(indexed):
    _, store, _ = indexed
    res = run_cli("query", "a person riding a bicycle", "--store", str(store), "--json", "--top-k", "3")
    assert res.returncode == 0, res.stderr
    moments = json.loads(res.stdout)
    assert moments and Path(moments[0]["uri"]).name == "bikes.mp4"
    for m in moments:
        assert 0 <= m["start_s"] < m["end_s"] and {"video_id", "uri", "score"} <= set(m)
    one = run_cli("query", "a bicycle", "--store", str(store), "--json", "--video", "carphone_pristine")
    assert {Path(m["uri"]).name for m in json.loads(one.stdout)} == {"carphone_pristine.mp4"}


def test_user_errors_exit_2_with_a_clear_line(indexed, tmp_path):
    lib, store, _ = indexed
    res = run_cli("query", "   ", "--store", str(store))
    assert res.returncode == 2 and "empty" in res.stderr
    res = run_cli("index", str(tmp_path / "nothing-here"), "--store", str(tmp_path / "s"))
    assert res.returncode == 2 and "error" in res.stderr.lower()
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode: {target_fsp: 2}\n")
    res = run_cli("index", str(lib), "--store", str(tmp_path / "s2"), "--config", str(bad))
    assert res.returncode == 2 and "target_fsp" in res.stderr
    other = tmp_path / "other.yaml"
    other.write_text("decode: {target_fps: 2}\n")
    res = run_cli("index", str(lib), "--store", str(store), "--config", str(other))
    assert res.returncode == 2 and "another configuration" in res.stderr


def test_a_hanging_decoder_costs_only_its_video(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for p in sample_videos(("bikes.mp4", "carphone_pristine.mp4")):
        shutil.copy(p, lib / p.name)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode: {stall_timeout_s: 3}\n")
    res = run_cli("index", str(lib), "--store", str(tmp_path / "store"), "--config", str(cfg), "--json",
                  env={"RAY_VLM_DECODE_FAULT": "hang:carphone"})
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["videos_ok"] == 1 and s["videos_failed"] + s["videos_partial"] == 1
    (f,) = s["failures"]
    assert Path(f["uri"]).name == "carphone_pristine.mp4" and f["error_type"] == "timeout"
    # the failure is retryable: a rerun without the fault indexes it
    res = run_cli("index", str(lib), "--store", str(tmp_path / "store"), "--config", str(cfg), "--json")
    s2 = json.loads(res.stdout.strip().splitlines()[-1])
    assert s2["videos_ok"] == 1 and s2["videos_skipped"] == 1
