"""The grounding benchmark generator: determinism, exact ground truth (checked by decoding), annotation format."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from benchmarks import benchgen as B

pytestmark = pytest.mark.timeout(300)


def _photos():
    photos = B.available_photos()
    if not photos:
        pytest.skip("no benchmark photo installed (scikit-learn ships china.jpg and flower.jpg)")
    return photos[:3]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generate_is_deterministic_and_writes_qvhighlights_annotations(tmp_path):
    photos = _photos()
    kw = {"n_videos": 2, "seconds": 12.0, "size": (160, 120), "events_per_video": 1, "photos": photos}
    va, aa = B.generate(tmp_path / "a", seed=3, **kw)
    vb, ab = B.generate(tmp_path / "b", seed=3, **kw)
    assert [p.name for p in va] == ["gen-000.mp4", "gen-001.mp4"]
    assert [_sha(p) for p in va] == [_sha(p) for p in vb]  # the same bytes (on every CPU: test_cpu_independence)
    assert aa.read_text() == ab.read_text()
    B.generate(tmp_path / "c", seed=4, **kw)
    assert (tmp_path / "c" / "events.json").read_text() != (tmp_path / "a" / "events.json").read_text()

    records = [json.loads(line) for line in aa.read_text().splitlines()]
    events = json.loads((tmp_path / "a" / "events.json").read_text())["videos"]
    assert len({r["qid"] for r in records}) == len(records) and all(isinstance(r["qid"], int) for r in records)
    by_name = {p.name: p for p in photos}
    for vid, evs in events.items():
        [ev] = evs
        mine = [r for r in records if r["vid"] == vid]
        assert [r["query"] for r in mine] == list(by_name[ev["photo"]].queries)  # every phrasing, in order
        for r in mine:
            assert r["relevant_windows"] == [[ev["start_s"], ev["end_s"]]] and r["duration"] == 12.0
            assert 0 <= ev["start_s"] < ev["end_s"] <= 12.0
            assert ev["end_s"] - ev["start_s"] >= 2.0  # 4..10 s, halved at most once for a 12-s video

    from ray_vlm.eval.metrics import evaluate

    perfect = [{"qid": r["qid"], "vid": r["vid"], "pred_relevant_windows": [[*w, 1.0] for w in r["relevant_windows"]]}
               for r in records]
    assert evaluate(perfect, records)["R1@0.7"] == 100.0


def test_ground_truth_is_exact_to_the_frame(tmp_path):
    """Decode every frame: inside an annotated window the photo is in its box; one frame outside it is not."""
    import av

    photos = _photos()
    videos, _ = B.generate(tmp_path, n_videos=3, seconds=14.0, seed=11, size=(192, 144), events_per_video=1,
                           photos=photos)
    meta = json.loads((tmp_path / "events.json").read_text())
    fps = meta["fps"]
    pixels = {p.name: B.load_photo(p) for p in photos}
    layouts = set()
    for path in videos:
        [ev] = meta["videos"][path.stem]
        layouts.add(ev["layout"])
        x, y, bw, bh = ev["box"]
        want = B._fit(pixels[ev["photo"]], bw, bh).astype(np.float32)
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            frames = {int(round(float(f.pts * s.time_base) * fps)): f.to_ndarray(format="rgb24")
                      for f in c.decode(s)}
        assert sorted(frames) == list(range(14 * fps))
        diff = {i: float(np.abs(f[y:y + bh, x:x + bw].astype(np.float32) - want).mean()) for i, f in frames.items()}
        inside = range(ev["start_frame"], ev["end_frame"])
        assert ev["start_s"] == ev["start_frame"] / fps and ev["end_s"] == ev["end_frame"] / fps
        assert max(diff[i] for i in inside) < 12.0, path.name  # the photo, up to H.264 loss
        for i in (ev["start_frame"] - 1, ev["end_frame"]):
            if i in diff:
                assert diff[i] > 25.0, (path.name, i)  # background, not the photo
    assert len(layouts) >= 2  # the layout cycle varies across events


def test_plan_places_disjoint_spans_inside_the_video():
    rng = np.random.default_rng(0)
    for seconds, n in ((60.0, 2), (30.0, 3), (8.0, 3)):
        spans = B._plan(seconds, n, 10, rng)
        assert spans and all(0 <= s < e <= seconds * 10 for s, e in spans)
        assert all(b[0] - a[1] >= 20 for a, b in zip(spans, spans[1:]))  # >= 2 s gaps


def test_sample_clip_annotations_fit_the_real_clips(tmp_path):
    import av

    from ray_vlm.core.samples import sample_dir

    path = B.write_sample_annotations(tmp_path / "s.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(B.SAMPLE_CLIP_ANNOTATIONS) == len({r["qid"] for r in records})
    for r in records:
        with av.open(str(sample_dir() / f"{r['vid']}.mp4")) as c:
            s = c.streams.video[0]
            last = max(float(f.pts * s.time_base) for f in c.decode(s))
        assert last < r["duration"] <= last + 0.05
        assert all(0 <= a < b <= r["duration"] for a, b in r["relevant_windows"])


def test_grounding_cost_is_measured():
    c = B.grounding_cost(frames=300, repeats=1)
    assert c["frames"] == 300 and all(c[k] > 0 for k in ("content", "context", "fused", "moments"))
    text = B.format_table({"results": [], "cost_one_video_hour_s": c})
    assert "content" in text and "ms" in text
