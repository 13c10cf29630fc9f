"""Speech and on-screen text end to end: a talk (video + speech), a podcast (audio only), a screen recording
(slides of text, no audio) and a silent clip indexed with the bundled models; a quoted phrase and a paraphrase
of it find the right second from Python, the CLI and HTTP; the text on a slide is found when it is shown."""

from __future__ import annotations

import json
import subprocess
import sys

import lance
import numpy as np
import pytest

from benchmarks.speechgen import draw_text, speech_track, write_media
from fixtures import videos as V
from fixtures.stores import read_committed
from ray_vlm.core import schema as S
from ray_vlm.core.config import IndexConfig

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

FAST = IndexConfig.model_validate({"commit_interval_s": 0.5, "speech": {"enabled": True}, "ocr": {"enabled": True}})
SLIDES = [(0.0, 10.0, "Agenda for the meeting"), (10.0, 20.0, "Quarterly results 2026"),
          (20.0, 30.0, "Questions and answers")]


QUERIES = ('"the budget was approved by the committee"', "when did the committee approve the budget")


def _slide(i: int, t: float) -> np.ndarray:
    text = next(s for a, b, s in SLIDES if a <= t < b)
    return draw_text(np.full((360, 640, 3), (20, 40, 80), np.uint8), text, size=32)
TALK = [(4.0, "Welcome everyone to the annual planning meeting."),
        (41.0, "The budget was approved by the committee on Tuesday."),
        (70.0, "Thank you all for coming today.")]
PODCAST = [(3.0, "This podcast is about gardening in small spaces."),
           (33.0, "Tomatoes need at least six hours of sunlight every day.")]


@pytest.fixture(scope="module")
def indexed(ray_local, tmp_path_factory):
    from ray_vlm.pipelines.archive_index import index_archive

    root = tmp_path_factory.mktemp("speech")
    lib = root / "lib"
    talk_audio, talk_truth = speech_track(80.0, TALK)
    write_media(lib / "talk.mp4", talk_audio, duration_s=80.0, fps=5)
    pod_audio, pod_truth = speech_track(45.0, PODCAST)
    write_media(lib / "podcast.m4a", pod_audio, duration_s=45.0, fps=0)
    V.make_video(lib / "silent.mp4", duration_s=4)
    write_media(lib / "screen.mp4", None, duration_s=30.0, fps=2, width=640, height=360, frame=_slide)
    store = root / "store"
    summary = index_archive([str(lib)], str(store), FAST)
    return store, summary, {"talk": talk_truth, "podcast": pod_truth}


def test_every_file_indexed_with_its_tracks(indexed):
    store, summary, _ = indexed
    assert (summary.videos_ok, summary.videos_failed, summary.videos_partial) == (4, 0, 0), summary.failures
    videos, _ = read_committed(store)
    by_name = {v[S.URI].rsplit("/", 1)[-1]: v for v in videos}
    assert by_name["podcast.m4a"][S.STATUS] == S.STATUS_OK and by_name["podcast.m4a"][S.FRAMES_KEPT] == 0
    assert by_name["podcast.m4a"][S.DURATION_S] == pytest.approx(45.0, abs=0.5)
    assert by_name["talk.mp4"][S.FRAMES_KEPT] > 0
    # read with Lance, not through the code under test: utterances per file, none for the silent clip
    seg = lance.dataset(str(store / "segments.lance")).to_table().to_pylist()
    speech = {}
    for r in seg:
        if r[S.TRACK] == "speech":
            speech.setdefault(r[S.VIDEO_ID], []).append(r)
    assert len(speech.get(by_name["talk.mp4"][S.VIDEO_ID], [])) == 3
    assert len(speech.get(by_name["podcast.m4a"][S.VIDEO_ID], [])) == 2
    assert by_name["silent.mp4"][S.VIDEO_ID] not in speech
    # each slide read once (DiffFP: only when the picture changed), its line from when it is shown
    ocr = sorted((r for r in seg if r[S.TRACK] == "ocr" and r[S.VIDEO_ID] == by_name["screen.mp4"][S.VIDEO_ID]),
                 key=lambda r: r[S.START_S])
    assert [r[S.TEXT] for r in ocr] == [s for _, _, s in SLIDES]
    for r, (a, b, _) in zip(ocr, SLIDES):
        assert r[S.START_S] == pytest.approx(a, abs=0.6) and r[S.END_S] == pytest.approx(b, abs=0.6)


def test_rerun_adds_no_segment(ray_local, indexed):
    from ray_vlm.pipelines.archive_index import index_archive

    store, _, _ = indexed
    before = lance.dataset(str(store / "segments.lance")).count_rows()
    again = index_archive([str(store.parent / "lib")], str(store), FAST)
    assert again.videos_skipped == 4
    assert lance.dataset(str(store / "segments.lance")).count_rows() == before


@pytest.mark.parametrize("query", QUERIES)
def test_quoted_and_paraphrased_speech_find_the_second(indexed, query):
    import ray_vlm

    store, _, truth = indexed
    said = truth["talk"][1]
    best = ray_vlm.search(str(store), query, top_k=3)[0]
    assert best.uri.endswith("talk.mp4") and "speech" in best.tracks
    assert best.start_s == pytest.approx(said.start_s, abs=0.5)
    assert best.end_s <= said.end_s + 0.5
    assert any("budget" in e["text"].lower() for e in best.evidence)
    only_visual = ray_vlm.search(str(store), query, top_k=3, tracks="visual")
    assert all(m.tracks == ("visual",) for m in only_visual)


@pytest.mark.parametrize("query", QUERIES)
def test_cli_query_finds_the_second_said(indexed, query):
    store, _, truth = indexed
    out = subprocess.run([sys.executable, "-m", "ray_vlm.cli", "query", query, "--store", str(store), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    best = json.loads(out.stdout)[0]
    assert best["uri"].endswith("talk.mp4") and "speech" in best["tracks"]
    assert best["start_s"] == pytest.approx(truth["talk"][1].start_s, abs=0.5)


def test_cli_query_by_track_finds_the_podcast(indexed):
    store, _, truth = indexed
    said = truth["podcast"][1]
    out = subprocess.run([sys.executable, "-m", "ray_vlm.cli", "query", "how much sun do tomato plants need",
                          "--store", str(store), "--track", "speech", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    best = json.loads(out.stdout)[0]
    assert best["uri"].endswith("podcast.m4a") and best["tracks"] == ["speech"]
    assert best["start_s"] == pytest.approx(said.start_s, abs=0.5)
    bad = subprocess.run([sys.executable, "-m", "ray_vlm.cli", "query", "x", "--store", str(store), "--track",
                          "smell"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown track" in bad.stderr


def test_http_search_page_and_ask_carry_the_words(indexed, tmp_path):
    """Over HTTP (Ray Serve on loopback): /v1/search returns the speech evidence, the page (headless Chromium)
    shows it under the moment, /v1/ask puts it in the answer."""
    import socket

    import requests
    from ray import serve

    from ray_vlm.serve.app import ServeArgs, build_app

    store, _, truth = indexed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(ServeArgs(store=str(store), token=None, token_env=None, num_cpus=0.1)),
                  name="speech", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        said = truth["talk"][1]
        for query in QUERIES:
            r = requests.post(f"{base}/v1/search", json={"query": query, "tracks": "speech,visual"}, timeout=120)
            assert r.status_code == 200, r.text
            best = r.json()["moments"][0]
            assert best["uri"].endswith("talk.mp4") and "speech" in best["tracks"]
            assert best["start_s"] == pytest.approx(said.start_s, abs=0.5)
            assert best["evidence"][0]["track"] == "speech" and "budget" in best["evidence"][0]["text"].lower()
            _page_shows_the_words(base, query, said.start_s, tmp_path)
        bad = requests.post(f"{base}/v1/search", json={"query": "x", "tracks": "smell"}, timeout=60)
        assert bad.status_code == 400 and "unknown track" in bad.text
        ask = requests.post(f"{base}/v1/ask", json={"question": "how many hours of sunlight do tomatoes need"},
                            timeout=120)
        assert ask.status_code == 200
        assert "[speech]" in ask.text and "sunlight" in ask.text.lower()
    finally:
        serve.delete("speech")
        serve.shutdown()


def _page_shows_the_words(base: str, query: str, start_s: float, tmp_path) -> None:
    """The web page, rendered by headless Chromium: its best moment starts at ``start_s`` and shows the words."""
    import html
    import re
    import shutil
    from urllib.parse import quote_plus

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    url = f"{base}/?q={quote_plus(query)}&k=3"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom", url]
    dom = subprocess.run(flags, capture_output=True, text=True, timeout=180).stdout
    assert 'data-state="done"' in dom and 'class="moment"' in dom, dom[-2000:]
    first = dom.split('class="moment"', 1)[1].split('class="moment"', 1)[0]  # the best moment's card
    start = re.search(r'data-start="([0-9.]+)"', first)
    assert start and float(start.group(1)) == pytest.approx(start_s, abs=0.5), first[:500]
    words = re.search(r'<div class="evidence speech">([^<]*)</div>', first)
    assert words and "[speech]" in words.group(1) and "budget" in html.unescape(words.group(1)).lower(), first


def test_text_on_screen_is_found_when_shown(indexed):
    import ray_vlm

    store, _, _ = indexed
    best = ray_vlm.search(str(store), "quarterly results", top_k=3, tracks="text")[0]
    assert best.uri.endswith("screen.mp4") and best.tracks == ("text",)
    assert (best.start_s, best.end_s) == pytest.approx((10.0, 20.0), abs=0.6)
    assert best.evidence[0]["text"] == "Quarterly results 2026"
    quoted = ray_vlm.search(str(store), '"questions and answers"', top_k=1)[0]
    assert quoted.uri.endswith("screen.mp4") and quoted.start_s == pytest.approx(20.0, abs=0.6)
