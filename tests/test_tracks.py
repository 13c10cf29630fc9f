"""Text tracks at query time: lexical and semantic hybrid, quoted phrases on the word track, fusion with visual."""

import numpy as np
import pyarrow as pa
import pytest

from ray_vlm.core import schema as S
from ray_vlm.query.searcher import Moment, QueryError, _VersionState, fuse, parse_tracks
from ray_vlm.query.tracks import TrackIndex, quoted_phrases, terms


def _segments(rows):
    cols = {f.name: [r.get(f.name) for r in rows] for f in S.SEGMENTS_SCHEMA}
    cols[S.CHUNK_INDEX] = [0] * len(rows)
    return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in S.SEGMENTS_SCHEMA],
                                schema=S.SEGMENTS_SCHEMA)


def _utterance(vid, start, words, emb=None, conf=0.8):
    """A speech row and its word rows, 0.3 s per word from ``start``."""
    rows = [{S.VIDEO_ID: vid, S.TRACK: "speech", S.START_S: start, S.END_S: start + 0.3 * len(words),
             S.TEXT: " ".join(words), S.EMBEDDING: emb, S.CONFIDENCE: conf}]
    for i, w in enumerate(words):
        rows.append({S.VIDEO_ID: vid, S.TRACK: "word", S.START_S: start + 0.3 * i, S.END_S: start + 0.3 * (i + 1),
                     S.TEXT: w, S.CONFIDENCE: conf})
    return rows


def _unit(i, d=8):
    v = np.zeros(d, np.float32)
    v[i] = 1.0
    return v.tolist()


@pytest.fixture()
def index():
    rows = (_utterance("a", 10.0, "The budget won approved by the committee on Tuesday.".split(), _unit(0))
            + _utterance("a", 30.0, "Lunch is served in the main hall.".split(), _unit(1))
            + _utterance("b", 5.0, "Tomatoes need six hours of sunlight.".split(), _unit(2))
            + [{S.VIDEO_ID: "b", S.TRACK: "ocr", S.START_S: 20.0, S.END_S: 24.0, S.TEXT: "QUARTERLY RESULTS 2026",
                S.EMBEDDING: _unit(3), S.CONFIDENCE: 0.9},
               {S.VIDEO_ID: "b", S.TRACK: "sound", S.START_S: 0.0, S.END_S: 5.0, S.TEXT: "silence"}])
    return TrackIndex(_segments(rows))


def test_terms_and_phrases():
    assert terms("The budget was approved!") == ["budget", "approv"]
    assert terms("approves") == terms("approved") == terms("approve")
    assert terms("tomato's Tomatoes") == ["tomato", "tomato"]
    assert quoted_phrases('say "hello world" and “good bye”') == ["hello world", "good bye"]


def test_quoted_phrase_is_found_to_the_word_despite_one_recognition_error(index):
    hits = index.search('"the budget was approved by the committee"', None, tracks=["speech"])
    assert hits[0].kind == "phrase" and hits[0].video_id == "a"
    assert (hits[0].start_s, hits[0].end_s) == pytest.approx((10.0, 12.1))  # words 0..6, from the word times
    assert "won" in hits[0].text  # the evidence is what was recognised
    assert not [h for h in index.search('"budget for lunch"', None, tracks=["speech"]) if h.kind == "phrase"]


def test_hybrid_lexical_and_semantic(index):
    lex = index.search("when did the committee approve the budget", None, tracks=["speech"])
    assert lex[0].video_id == "a" and lex[0].start_s == 10.0 and lex[0].kind == "hybrid"
    # no shared word: found by meaning (the query's embedding is the utterance's), on its own video only
    sem = index.search("how much light do plants want", np.asarray(_unit(2)), tracks=["speech"])
    assert sem[0].video_id == "b" and sem[0].score > 0.5
    assert index.search("how much light do plants want", np.asarray(_unit(2)), tracks=["speech"],
                        video_ids=["a"]) == []
    assert index.search("zebra xylophone", None) == []


def test_on_screen_text_track(index):
    hits = index.search("quarterly results", None, tracks=["text"])
    assert hits and hits[0].track == "text" and (hits[0].start_s, hits[0].end_s) == (20.0, 24.0)
    assert index.search("quarterly results", None, tracks=["speech"]) == []


def test_fusion_merges_overlapping_tracks_and_ranks_once(index):
    st = _VersionState(1, {"a": {"uri": "/x/a.mp4"}, "b": {"uri": "/x/b.mp4"}}, {"a": 1}, {"a": 10}, "e", "s")
    hits = index.search("when did the committee approve the budget", None, tracks=["speech"])
    visual = [Moment("a", "/x/a.mp4", 9.0, 11.0, 0.6, 10.0, 2.0), Moment("a", "/x/a.mp4", 50.0, 52.0, 0.7, 51.0)]
    fused = fuse(st, visual, hits)
    merged = [m for m in fused if m.start_s == 10.0][0]
    assert merged.tracks == ("speech", "visual") and merged.evidence[0]["track"] == "speech"
    assert merged.score > max(hits[0].score, 0.6)  # agreeing tracks raise the score
    assert [m.score for m in fused] == sorted((m.score for m in fused), reverse=True)
    assert any(m.tracks == ("visual",) and m.start_s == 50.0 for m in fused)


def test_parse_tracks():
    assert parse_tracks("all") == {"visual", "speech", "text"}
    assert parse_tracks("speech,text") == {"speech", "text"}
    with pytest.raises(QueryError, match="unknown track"):
        parse_tracks(["smell"])


def test_a_line_on_screen_across_chunks_is_one_moment():
    rows = [{S.VIDEO_ID: "s", S.TRACK: "ocr", S.START_S: 58.0, S.END_S: 64.0, S.TEXT: "Questions and answers",
             S.EMBEDDING: _unit(4), S.CONFIDENCE: 0.9},
            {S.VIDEO_ID: "s", S.TRACK: "ocr", S.START_S: 64.0, S.END_S: 72.0, S.TEXT: "Questions and answers",
             S.EMBEDDING: _unit(4), S.CONFIDENCE: 0.9},
            {S.VIDEO_ID: "s", S.TRACK: "ocr", S.START_S: 90.0, S.END_S: 95.0, S.TEXT: "Questions and answers",
             S.EMBEDDING: _unit(4), S.CONFIDENCE: 0.9}]
    hits = TrackIndex(_segments(rows)).search("questions and answers", None, tracks=["text"])
    assert [(h.start_s, h.end_s) for h in hits] == [(58.0, 72.0), (90.0, 95.0)]  # shown again later: its own
