"""The command line as a user runs it: index (JSON summary), videos, query, compact, migrate, bad input, a hanging
decoder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_vlm.core.samples import sample_videos

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
    # Where the CPU went, per stage (each did some work: 15 frames decoded, encoded, written).
    assert set(s["stage_cpu_s"]) == {"probe", "decode", "speech", "prune", "encode", "compress+write"}
    assert s["stage_cpu_s"]["decode"] > 0 and s["stage_cpu_s"]["encode"] > 0


def test_index_switches_the_speech_and_text_tracks(indexed, tmp_path):
    """--no-speech drops the speech stage, --ocr adds the on-screen text stage; the same switches again skip
    what is indexed; other switches are another configuration, refused for that store."""
    lib, _, _ = indexed
    clip = str(lib / "carphone_pristine.mp4")
    store = str(tmp_path / "store")
    res = run_cli("index", clip, "--store", store, "--no-speech", "--ocr", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["videos_ok"] == 1 and "ocr" in s["stage_cpu_s"] and "speech" not in s["stage_cpu_s"]
    again = json.loads(run_cli("index", clip, "--store", store, "--no-speech", "--ocr", "--json")
                       .stdout.strip().splitlines()[-1])
    assert again["videos_skipped"] == 1
    other = run_cli("index", clip, "--store", store)
    assert other.returncode == 2 and "speech or OCR settings differ" in other.stderr, other.stderr[-2000:]


def test_track_switches_override_the_config():
    from ray_vlm.cli import _with_tracks
    from ray_vlm.core.config import IndexConfig

    base = IndexConfig.model_validate({"audio": {"enabled": False}, "speech": {"enabled": False}})
    assert not base.speech_on
    on = _with_tracks(base, speech=True, ocr=True)
    assert on.speech_on and on.ocr.enabled and on.output_hash() != base.output_hash()
    assert _with_tracks(base, speech=None, ocr=None) == base
    off = _with_tracks(IndexConfig(), speech=False, ocr=False)
    assert not off.speech_on and not off.ocr.enabled


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


def test_compact_keeps_answers_and_migrate_converts_a_v1_store(indexed, tmp_path):
    _, store, _ = indexed
    ask = ("query", "a person riding a bicycle", "--store", str(store), "--json", "--top-k", "3")
    before = json.loads(run_cli(*ask).stdout)
    res = run_cli("compact", "--store", str(store), "--retention-s", "0", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["files_after"] <= out["files_before"] and out["versions_removed"] >= 1
    assert json.loads(run_cli(*ask).stdout) == before
    # a v1 store: refused with what to do, converted by `migrate`, then queried
    v1 = Path(__file__).parent / "data" / "store_v1"
    res = run_cli("query", "a rabbit", "--store", str(v1))
    assert res.returncode == 2 and "ray-vlm migrate" in res.stderr
    res = run_cli("migrate", str(v1), str(tmp_path / "v2"))
    assert res.returncode == 0 and "migrated 5 videos and 26 frames" in res.stdout, res.stderr
    moments = json.loads(run_cli("query", "a rabbit", "--store", str(tmp_path / "v2"), "--json").stdout)
    assert Path(moments[0]["uri"]).name == "bigbuckbunny.mp4"
    res = run_cli("migrate", str(v1), str(tmp_path / "v2"))
    assert res.returncode == 2 and "not empty" in res.stderr


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


# ------------------------------------------------------------------------------------------ eval


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sample_annotations(vids=("bikes", "carphone_pristine")):
    from benchmarks.benchgen import SAMPLE_CLIP_ANNOTATIONS

    return [dict(r) for r in SAMPLE_CLIP_ANNOTATIONS if r["vid"] in vids]


HEADLINE = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "top1_overlap", "mAP", "mAP@0.5", "mAP@0.75")


def test_eval_agrees_with_the_api_and_counts_unknown_videos_as_misses(indexed, tmp_path):
    from ray_vlm.eval.run import evaluate_store

    _, store, _ = indexed
    known = _sample_annotations()
    assert len(known) == 6
    a_path = _write_jsonl(tmp_path / "known.jsonl", known)
    b_path = _write_jsonl(tmp_path / "all.jsonl", known + [
        {"qid": 99, "query": "a unicorn", "vid": "nope", "relevant_windows": [[0, 1]]}])
    res = run_cli("eval", str(a_path), "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads(res.stdout)
    res = run_cli("eval", str(b_path), "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    b = json.loads(res.stdout)
    assert (a["num_queries"], a["unmatched_vids"], a["method"]) == (6, [], "fused")
    assert (b["num_queries"], b["unmatched_vids"], b["num_unmatched_queries"]) == (7, ["nope"], 1)
    api = evaluate_store(str(store), known)
    for k in HEADLINE:
        assert a["per_video"][k] == pytest.approx(api["per_video"][k]) and 0 <= a["per_video"][k] <= 100
        assert a["library"][k] == pytest.approx(api["library"][k])
        # one more query that can only miss: every mean shrinks by 6/7
        assert b["per_video"][k] == pytest.approx(a["per_video"][k] * 6 / 7)
        assert b["library"][k] == pytest.approx(a["library"][k] * 6 / 7)
    assert a["per_video"]["top1_overlap"] > 0  # the grounder finds some of the hand-annotated events


def test_eval_whole_video_baseline_by_hand(indexed, tmp_path):
    """The whole-video baseline predicts [0, duration]: its IoU with each annotation is computable by hand."""
    _, store, _ = indexed
    path = _write_jsonl(tmp_path / "a.jsonl", _sample_annotations())
    res = run_cli("eval", str(path), "--store", str(store), "--method", "whole", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout)["per_video"]
    # bikes (10 s): best windows 1.36, 0.6, 2.0, 2.52, 1.84 s; carphone: its annotation is the whole clip
    ious = [1.36 / 10, 0.6 / 10, 2.0 / 10, 2.52 / 10, 1.84 / 10, 1.0]
    assert r["mIoU"] == pytest.approx(100 * sum(ious) / 6, abs=0.5)
    assert r["R1@0.5"] == pytest.approx(100 / 6) and r["top1_overlap"] == 100.0
    table = run_cli("eval", str(path), "--store", str(store), "--method", "whole")
    assert table.returncode == 0 and "per video" in table.stdout and "library-wide" in table.stdout
    line = next(x for x in table.stdout.splitlines() if "R1@0.5" in x)
    assert f"{100 / 6:.2f}" in line


def test_eval_user_errors_name_the_problem(indexed, tmp_path):
    _, store, _ = indexed
    res = run_cli("eval", str(tmp_path / "missing.jsonl"), "--store", str(store))
    assert res.returncode == 2 and "not found" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_sample_annotations()[0]) + "\n{not json\n")
    res = run_cli("eval", str(bad), "--store", str(store))
    assert res.returncode == 2 and "line 2" in res.stderr and "JSON" in res.stderr
    bad.write_text('{"qid": 1, "query": "a cat", "vid": "bikes"}\n')
    res = run_cli("eval", str(bad), "--store", str(store))
    assert res.returncode == 2 and "line 1" in res.stderr and "relevant_windows" in res.stderr
    bad.write_text('{"qid": 1, "query": "a cat", "vid": "bikes", "relevant_windows": [[5, 2]]}\n')
    res = run_cli("eval", str(bad), "--store", str(store))
    assert res.returncode == 2 and "start_s < end_s" in res.stderr
    ok = _write_jsonl(tmp_path / "ok.jsonl", _sample_annotations())
    res = run_cli("eval", str(ok), "--store", str(tmp_path / "no-store"))
    assert res.returncode == 2 and "holds no videos" in res.stderr
    res = run_cli("eval", str(ok), "--store", str(store), "--method", "magic")
    assert res.returncode == 2 and "unknown method" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ query --plot


def test_query_plot_writes_a_png(indexed, tmp_path):
    from PIL import Image

    _, store, _ = indexed
    png = tmp_path / "plots" / "bike.png"
    res = run_cli("query", "a person riding a bicycle", "--store", str(store), "--json", "--plot", str(png))
    assert res.returncode == 0, res.stderr[-3000:]
    moments = json.loads(res.stdout)  # --json output stays pure JSON
    assert moments and Path(moments[0]["uri"]).name == "bikes.mp4"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 300


# ------------------------------------------------------------------------------------------ ground-batch


def test_ground_batch_writes_parquet_rows_per_query(indexed, tmp_path):
    import pyarrow.parquet as pq

    _, store, _ = indexed
    queries = tmp_path / "events.txt"
    queries.write_text("# events to tag\na person riding a bicycle\n\n\x01\x02\na man talking on a phone\n")
    out = tmp_path / "tags"
    res = run_cli("ground-batch", str(queries), "--store", str(store), "--out", str(out), "--top-k", "2", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert (s["queries"], s["queries_answered"], s["queries_failed"]) == (3, 2, 1)
    assert s["failures"][0]["query_id"] == 4 and s["failures"][0]["error_type"] == "bad_query"
    rows = pq.read_table(out).to_pylist()  # read back with pyarrow, not through the code under test
    assert s["rows"] == sum(r["rank"] is not None for r in rows) and 2 <= s["rows"] <= 4
    by_q = {}
    for r in rows:
        by_q.setdefault(r["query_id"], []).append(r)
    assert set(by_q) == {2, 4, 5}  # line numbers
    bike = sorted(by_q[2], key=lambda r: r["rank"])
    assert Path(bike[0]["uri"]).name == "bikes.mp4" and bike[0]["rank"] == 1
    assert all(0 <= r["start_s"] < r["end_s"] and 0 <= r["score"] <= 1 for r in bike)
    again = run_cli("ground-batch", str(queries), "--store", str(store), "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


# ------------------------------------------------------------------------------------------ bench grounding


def test_bench_grounding_tiny(tmp_path):
    out = tmp_path / "g.json"
    res = run_cli("bench", "grounding", "--out", str(out), "--videos", "1", "--seconds", "12", "--no-samples",
                  "--work-dir", str(tmp_path / "work"), "--seed", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "per video" in res.stdout and "library-wide" in res.stdout and "fused" in res.stdout
    rep = json.loads(out.read_text())
    got = [(r["set"], r["prune"], r["method"]) for r in rep["results"]]
    ann = [json.loads(x) for x in (tmp_path / "work" / "videos" / "annotations.jsonl").read_text().splitlines()]
    # The small-objects set (queries whose photo is only shown in a corner) is evaluated when there are any.
    sets = ["generated"] + (["small_objects"] if any(set(r["layouts"]) == {"corner"} for r in ann) else [])
    assert got == [row for name in sets for row in (
        (name, None, "random"), (name, None, "whole"), (name, True, "content"), (name, True, "context"),
        (name, True, "fused"), (name, False, "content"), (name, False, "context"), (name, False, "fused"))]
    whole = rep["results"][1]
    # whole video [0, 12): IoU = the photo's time on screen / 12 s
    want = sum(max(e - s for s, e in r["relevant_windows"]) / 12.0 for r in ann) / len(ann)
    assert whole["num_queries"] == len(ann) and whole["per_video"]["mIoU"] == pytest.approx(100 * want, abs=0.5)
    for r in rep["results"]:
        assert all(0 <= r[part][k] <= 100 for part in ("per_video", "library")
                   for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP", "top1_overlap"))

