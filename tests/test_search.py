"""search / evaluate_store over token stores: a synthetic store with known answers (fast, no Ray), and the real
sample clips indexed by the real job (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.library import load_library
from fixtures.stores import GH, GW, D, T, _unit  # the toy space, shared with the other toy-store tests
from fixtures.stores import ToyEncoder as FakeEncoder
from fixtures.stores import commit_toy_store as _commit
from ray_vlm.core import schema as S
from ray_vlm.eval.run import evaluate_store
from ray_vlm.models.base import EncoderSpec
from ray_vlm.query import grounding as G
from ray_vlm.query.searcher import QueryError, check_query, search

pytestmark = pytest.mark.timeout(120)


def _noise(rng, *shape):
    x = rng.normal(size=(*shape, D)) * 0.3
    x[..., :2] = 0.0  # noise never points at a cat or a dog
    return x


def _video(rng, cat=(), dog=(), small_cat=(), small_cat_kept=()):
    """T frames at 1 fps: a full-frame cat / dog on the given frames; a one-patch cat (patch 4) on ``small_cat``
    frames, which the pruner keeps only on ``small_cat_kept`` (a dropped patch repeats its last kept value)."""
    g = _noise(rng, T)
    p = _noise(rng, T, GH * GW)
    keep = rng.random((T, GH * GW)) < 0.5
    keep[0] = True
    for shown in (set(cat), set(dog)):  # a whole-frame change: the pruner keeps every patch
        for i in range(1, T):
            if (i in shown) != (i - 1 in shown):
                keep[i] = True
    for i in cat:
        g[i, 0] += 1.0
        p[i, :, 0] += 1.0
    for i in dog:
        g[i, 1] += 1.0
        p[i, :, 1] += 1.0
    for i in small_cat:
        p[i, 4] = np.eye(D)[0] * 2.0
        keep[i, 4] = i in small_cat_kept
    if small_cat:
        keep[max(small_cat) + 1, 4] = True  # the cat leaves: that patch changes again
    for i in range(1, T):  # pruned patches are the last kept version of themselves (DiffFP)
        p[i, ~keep[i]] = p[i - 1, ~keep[i]]
    return _unit(g), _unit(p), keep.reshape(T, GH, GW)


@pytest.fixture()
def toy_store(tmp_path):
    rng = np.random.default_rng(0)
    store = tmp_path / "store"
    _commit(store, {"cats": _video(rng, cat=range(5, 10)),
                    "dogs": _video(rng, dog=range(12, 16), small_cat=(2, 3, 4), small_cat_kept=(2,))})
    return store


def test_check_query():
    assert check_query("  a   cat\n") == "a cat"
    assert check_query("猫") == "猫"
    assert check_query("a\x00cat\x1bdog\ud800x") == "a cat dog x"  # control characters become a space
    for bad in ("", "   ", "\x00\x01", "x" * 1001):
        with pytest.raises(QueryError):
            check_query(bad)
    with pytest.raises(QueryError, match="string"):
        check_query(None)


def test_search_ranks_the_library_and_finds_a_pruned_small_object(toy_store):
    enc = FakeEncoder()
    moments = search(str(toy_store), "a cat", top_k=3, encoder=enc)
    top, second = moments[0], moments[1]
    assert top.uri.endswith("cats.mp4") and (top.start_s, top.end_s) == (4.5, 9.5)
    # the one-patch cat in "dogs" was kept only on its first frame: the rebuilt grid carries it to frame 4
    assert second.uri.endswith("dogs.mp4") and (second.start_s, second.end_s) == (1.5, 4.5)
    assert 1.0 >= top.score > second.score > 0.0 and all(0 <= m.score <= 1 for m in moments)
    dog = search(str(toy_store), "a dog", top_k=1, encoder=enc)[0]
    assert dog.uri.endswith("dogs.mp4") and (dog.start_s, dog.end_s) == (11.5, 15.5)
    only = search(str(toy_store), "a dog", top_k=5, video="cats", encoder=enc)
    assert only and {m.uri for m in only} == {"/archive/cats.mp4"}
    by_id = search(str(toy_store), "a dog", top_k=5, video=only[0].video_id, encoder=enc)
    assert [m.to_dict() for m in by_id] == [m.to_dict() for m in only]
    # content tokens alone cannot see the one-patch cat
    content = search(str(toy_store), "a cat", top_k=3, encoder=enc,
                     params=G.GroundingParams(channels=G.CONTENT_CHANNELS))
    assert not any(m.uri.endswith("dogs.mp4") and m.start_s < 4 and m.end_s > 2 and m.score > second.score / 2
                   for m in content)


def test_search_errors(toy_store, tmp_path):
    enc = FakeEncoder()
    with pytest.raises(QueryError, match="empty"):
        search(str(toy_store), "  ", encoder=enc)
    with pytest.raises(QueryError, match="top_k"):
        search(str(toy_store), "a cat", top_k=0, encoder=enc)
    with pytest.raises(QueryError, match="no video"):
        search(str(toy_store), "a cat", video="nope", encoder=enc)

    class Other(FakeEncoder):
        spec = EncoderSpec("fake:other", "r", "other-space", D, (8, 8), (GH, GW))

    with pytest.raises(QueryError, match="space"):
        search(str(toy_store), "a cat", encoder=Other())
    with pytest.raises(QueryError, match="no videos"):
        search(str(tmp_path / "empty"), "a cat", encoder=enc)


def test_library_is_read_once_per_store_version(toy_store):
    a = load_library(str(toy_store))
    assert load_library(str(toy_store)) is a and {v.uri for v in a.videos.values()} == \
        {"/archive/cats.mp4", "/archive/dogs.mp4"}
    cats = next(v for v in a.videos.values() if v.uri.endswith("cats.mp4"))
    assert cats.num_frames == T and cats.has_grid and cats.has_patches and cats.grid_tokens.shape == (T, 4, D)
    assert (cats.patch_src >= 0).all()
    _commit(toy_store, {"birds": _video(np.random.default_rng(5))})
    b = load_library(str(toy_store))
    assert b is not a and b.version == a.version + 1 and len(b.videos) == 3


def test_evaluate_store_on_known_answers(toy_store):
    ann = [{"qid": 1, "query": "a cat", "vid": "cats", "relevant_windows": [[5, 10]]},
           {"qid": 2, "query": "a dog", "vid": "dogs", "relevant_windows": [[12, 16]]}]
    r = evaluate_store(str(toy_store), ann, method="fused", encoder=FakeEncoder(), return_predictions=True)
    assert r["per_video"]["R1@0.5"] == 100.0 and r["library"]["R1@0.5"] == 100.0
    assert r["per_video_R1@0.5"] == 100.0 and r["num_queries"] == 2
    [p1, _] = r["predictions"]["per_video"]
    assert p1["pred_relevant_windows"][0][:2] == [4.5, 9.5]
    whole = evaluate_store(str(toy_store), ann, method="whole")
    assert whole["per_video"]["R1@0.5"] == 0.0 and whole["per_video"]["mIoU"] == pytest.approx((25 + 20) / 2)
    rand = evaluate_store(str(toy_store), ann, method="random", seed=1)
    assert rand == evaluate_store(str(toy_store), ann, method="random", seed=1)
    with pytest.raises(QueryError, match="method"):
        evaluate_store(str(toy_store), ann, method="oracle")
    with pytest.raises(QueryError, match="no video"):
        evaluate_store(str(toy_store), [dict(ann[0], vid="elsewhere")], encoder=FakeEncoder())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_search_and_evaluate_on_indexed_sample_clips(ray_local, tmp_path):
    from benchmarks.benchgen import SAMPLE_CLIP_ANNOTATIONS
    from ray_vlm.core.config import IndexConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.pipelines.archive_index import index_archive

    store = tmp_path / "store"
    cfg = IndexConfig.model_validate({"commit_interval_s": 0.5})
    s = index_archive([str(p) for p in sample_videos()], str(store), cfg)
    assert s.videos_ok == 3
    top = search(str(store), "a person riding a bicycle", top_k=3)
    assert top[0].uri.endswith("bikes.mp4") and 0 <= top[0].start_s < top[0].end_s <= 10.05
    rabbit = search(str(store), "a rabbit", top_k=1)[0]
    assert rabbit.uri.endswith("bigbuckbunny.mp4") and rabbit.score > 0.5
    noise = search(str(store), "xqzv blorf wumpt", top_k=1)[0]
    assert noise.score < 0.3 < rabbit.score
    one = search(str(store), "a bicycle", video="carphone_pristine", top_k=5)
    assert one and {m.uri.rsplit("/", 1)[-1] for m in one} == {"carphone_pristine.mp4"}
    r = evaluate_store(str(store), list(SAMPLE_CLIP_ANNOTATIONS), method="fused")
    assert r["num_queries"] == len(SAMPLE_CLIP_ANNOTATIONS) and 0 <= r["per_video_R1@0.5"] <= 100
    whole = evaluate_store(str(store), list(SAMPLE_CLIP_ANNOTATIONS), method="whole")
    # the two whole-video annotations (bow tie, rabbit) are hits for the whole-video baseline, the rest not
    assert whole["per_video"]["R1@0.5"] == pytest.approx(100 * 2 / 7)


# ---------------------------------------------------------------- Searcher: retrieve, then ground


def _forced(**kw):
    """Retrieval through the window index even on a toy library (8-s windows, no shard merging)."""
    from ray_vlm.query.searcher import RetrievalParams
    from ray_vlm.query.windows import WindowIndexConfig

    return RetrievalParams(whole_below_frames=0, index=WindowIndexConfig(merge_below_windows=0), **kw)


def test_searcher_api_and_a_second_instance_grounds_the_same(toy_store):
    import pickle

    from ray_vlm.query.searcher import Candidates, Searcher

    enc = FakeEncoder()
    s = Searcher(str(toy_store), encoder=enc)
    assert s.version == 1 and s.space == "toy-space"
    rows = s.videos()
    assert [r["uri"] for r in sorted(rows, key=lambda r: r["uri"])] == ["/archive/cats.mp4", "/archive/dogs.mp4"]
    assert all(r["status"] == S.STATUS_OK and r["frames"] == T and r["duration_s"] == float(T) for r in rows)
    q = s.encode(["a cat", "  a   dog "])
    assert q.shape == (2, D) and q.dtype == np.float32 and np.allclose(q[1], np.eye(D)[1])
    with pytest.raises(QueryError, match="empty"):
        s.encode(["a cat", " "])
    cands = s.retrieve(q, top_k=3)
    assert len(cands) == 2 and all(c.whole and c.version == 1 and len(c) == 2 for c in cands)  # small library
    back = pickle.loads(pickle.dumps(cands))
    assert back == cands or all(b.to_dict() == c.to_dict() for b, c in zip(back, cands))
    assert Candidates.from_dict(cands[0].to_dict()).to_dict() == cands[0].to_dict()
    mine = s.ground(q, cands, top_k=3)
    other = Searcher(str(toy_store), encoder=FakeEncoder()).ground(q, back, top_k=3)  # a grounder replica
    assert [[m.to_dict() for m in ms] for ms in mine] == [[m.to_dict() for m in ms] for ms in other]
    assert mine[0][0].uri.endswith("cats.mp4") and (mine[0][0].start_s, mine[0][0].end_s) == (4.5, 9.5)
    assert mine[1][0].uri.endswith("dogs.mp4") and (mine[1][0].start_s, mine[1][0].end_s) == (11.5, 15.5)
    # search == search_vectors == the module function; batch or alone, the same moments
    alone = s.search("a cat", top_k=3)
    assert [m.to_dict() for m in alone] == [m.to_dict() for m in s.search_vectors(q[:1], top_k=3)[0]] == \
        [m.to_dict() for m in mine[0]] == [m.to_dict() for m in search(str(toy_store), "a cat", top_k=3, encoder=enc)]
    only = s.retrieve(q[:1], video="dogs")[0]
    assert only.whole and len(only) == 1 and s.videos()[[r["uri"] for r in rows].index("/archive/dogs.mp4")]
    assert {m.uri for m in s.ground(q[:1], [only], top_k=5)[0]} == {"/archive/dogs.mp4"}
    with pytest.raises(QueryError, match="candidate lists"):
        s.ground(q, cands[:1])
    with pytest.raises(QueryError, match="store"):
        s.ground(q[:1], [Candidates("elsewhere", 1)])
    with pytest.raises(QueryError, match="one entry per span"):
        Candidates(str(toy_store), 1, ("a",), (0.0,), (), ())
    with pytest.raises(QueryError, match="top_k"):
        s.retrieve(q, top_k=0)


def test_a_searcher_of_an_empty_store_picks_up_its_first_commit(tmp_path):
    from ray_vlm.query.searcher import Searcher

    store = tmp_path / "store"
    s = Searcher(str(store), encoder=FakeEncoder())
    assert s.version == 0 and s.videos() == [] and s.space == ""
    with pytest.raises(QueryError, match="no videos"):
        s.search("a cat")
    with pytest.raises(QueryError, match="no videos"):
        s.retrieve(FakeEncoder().encode_text(["a cat"]))
    _commit(store, {"cats": _video(np.random.default_rng(1), cat=range(3, 6))})
    assert s.refresh() and s.version == 1 and s.space == "toy-space"
    top = s.search("a cat", top_k=1)[0]
    assert top.uri.endswith("cats.mp4") and (top.start_s, top.end_s) == (2.5, 5.5)


def test_searcher_equals_the_brute_force_library_path(toy_store):
    """The brute-force reference (every video of the library grounded, ``Library.ground``) and the Searcher agree."""
    from ray_vlm.query.searcher import Searcher

    enc = FakeEncoder()
    lib = load_library(str(toy_store))
    for text in ("a cat", "a dog"):
        q = enc.encode_text([text])
        old = lib.ground(q, G.DEFAULT_PARAMS, encoder=enc)[0]
        for retrieval in (None, _forced(neighbours=1)):
            new = Searcher(str(toy_store), encoder=enc, retrieval=retrieval).search(text, top_k=5)
            assert (new[0].video_id, new[0].start_s, new[0].end_s) == (old[0].video_id, old[0].start_s, old[0].end_s)
            assert new[0].score == pytest.approx(old[0].score)
        whole = Searcher(str(toy_store), encoder=enc).search(text, top_k=5)
        assert [(m.video_id, m.start_s, m.end_s, round(m.score, 6)) for m in whole] == \
            [(m.video_id, m.start_s, m.end_s, round(m.score, 6)) for m in old[:5]]


def test_retrieval_grounds_inside_index_windows(toy_store):
    from ray_vlm.query.searcher import Searcher

    enc = FakeEncoder()
    s = Searcher(str(toy_store), encoder=enc, retrieval=_forced(k_windows=1, neighbours=0, max_videos=1))
    q = s.encode(["a dog"])
    [c] = s.retrieve(q, top_k=1)
    # one 8-s window: the dog (frames 12-15) is in window [8, 16) of "dogs"
    assert not c.whole and len(c) == 1 and c.start_s == (8.0,) and c.end_s == (16.0,)
    assert s.videos()[0]["video_id"] in c.video_ids or c.video_ids[0] in {r["video_id"] for r in s.videos()}
    assert 0.5 < c.scores[0] <= 1.0  # exact cosine of the best frame (the dog axis + noise)
    [m] = s.ground(q, [c], top_k=1)[0]
    # grounded inside the window only: the dog ends with frame 15, where the window ends too
    assert m.uri.endswith("dogs.mp4") and (m.start_s, m.end_s) == (11.5, 16.0)
    assert (toy_store / "_index").is_dir()
    # one neighbour window each side: the curve goes on past 16 s, so the end is refined to 15.5
    s1 = Searcher(str(toy_store), encoder=enc, retrieval=_forced(k_windows=1, neighbours=1, max_videos=1))
    [c1] = s1.retrieve(q, top_k=1)
    assert c1.video_ids == c.video_ids and c1.start_s == (0.0,) and c1.end_s == (20.0,)
    assert [(m.start_s, m.end_s) for m in s1.ground(q, [c1], top_k=1)[0]] == [(11.5, 15.5)]


def test_refresh_picks_up_a_newly_committed_video_incrementally(toy_store):
    from ray_vlm.query.searcher import Searcher

    enc = FakeEncoder()
    s = Searcher(str(toy_store), encoder=enc, retrieval=_forced(neighbours=1)).prepare()
    assert s._state.index is not None and s._state.sample is not None
    assert s.refresh() is False
    first = s.search("a cat", top_k=1)[0]
    assert first.uri.endswith("cats.mp4")
    old_shards = list(s._state.index.shard_ids)
    _commit(toy_store, {"more-cats": _video(np.random.default_rng(9), cat=range(0, 20))})  # a cat all through
    assert s.version == 1 and s.refresh() is True and s.version == 2
    assert s.refresh() is False
    idx = s._state.index
    assert idx.store_version == 2 and set(old_shards) <= set(idx.shard_ids) and len(idx.manifest["built_shards"]) == 1
    assert {r["uri"] for r in s.videos()} == {"/archive/cats.mp4", "/archive/dogs.mp4", "/archive/more-cats.mp4"}
    got = s.search("a cat", top_k=3)
    assert {m.uri for m in got} >= {"/archive/cats.mp4", "/archive/more-cats.mp4"}
    whole_new = next(m for m in got if m.uri.endswith("more-cats.mp4"))
    assert (whole_new.start_s, whole_new.end_s) == (0.0, float(T))  # present all through: one whole-video moment
    # candidates of the old version still ground on a searcher that moved on (versions are immutable)
    old = Searcher(str(toy_store), encoder=enc, version=1)
    c1 = old.retrieve(old.encode(["a cat"]))
    assert c1[0].version == 1 and s.ground(old.encode(["a cat"]), c1, top_k=1)[0][0].to_dict() == \
        old.ground(old.encode(["a cat"]), c1, top_k=1)[0][0].to_dict()


def test_large_library_calibration_sample_is_bounded_and_compact(toy_store, monkeypatch):
    import ray_vlm.query.searcher as SR

    monkeypatch.setattr(SR, "CALIBRATION_SAMPLE_FRAMES", 8)  # the toy library (40 frames) is now "large"
    enc = FakeEncoder()
    s = SR.Searcher(str(toy_store), encoder=enc, retrieval=SR.RetrievalParams(cache_bytes=1))  # cache: 1 video
    top = s.search("a cat", top_k=1)[0]
    assert top.uri.endswith("cats.mp4") and (top.start_s, top.end_s) == (4.5, 9.5)
    sample = s._state.sample
    assert sum(v.num_frames for v in sample.values()) == 8 and len(sample) == 2  # 4 from each 20-frame video
    for v in sample.values():  # only the patches the sampled frames use are kept
        assert v.has_patches and len(v.patch_codes) <= v.num_frames * GH * GW and (v.patch_src >= 0).all()
    assert len(s._tokens) == 1  # the LRU keeps at least the last video read, and no more at 1 byte
    monkeypatch.undo()
    again = SR.Searcher(str(toy_store), encoder=enc).search("a cat", top_k=1)[0]  # calibrated on all 40 frames
    assert again.uri == top.uri and (again.start_s, again.end_s) == (top.start_s, top.end_s)
