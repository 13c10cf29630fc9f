"""search / evaluate_store over token stores: a synthetic store with known answers (fast, no Ray), and the real
sample clips indexed by the real job (slow)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from ray_vlm import grounding as G
from ray_vlm import schema as S
from ray_vlm.config import CompressConfig
from ray_vlm.models.base import EncoderSpec
from ray_vlm.operators.compress import CompressTokens
from ray_vlm.operators.write import WriteShards
from ray_vlm.search import QueryError, check_query, evaluate_store, load_library, search
from ray_vlm.store import ChunkLedger, TokenStore

pytestmark = pytest.mark.timeout(120)

D, GH, GW, T = 16, 3, 3, 20


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeEncoder:
    """Text side of a toy space: "a cat" and "a dog" are two axes; any other text a fixed random direction."""

    spec = EncoderSpec("fake:toy", "r1", "toy-space", D, (8, 8), (GH, GW))

    def encode_text(self, texts):
        out = []
        for t in texts:
            if t in ("a cat", "a dog"):
                out.append(np.eye(D)[0 if t == "a cat" else 1])
            else:
                out.append(np.random.default_rng(zlib.crc32(t.encode())).normal(size=D))
        return _unit(np.stack(out))


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


def _commit(store, videos, seed=0):
    """Compress + write + commit ``{name: (global, patches, keep)}`` as one chunk per video (no Ray)."""
    cols = {k: [] for k in (S.GLOBAL_EMB, S.PATCH_EMB, S.KEEP_MASK, S.VIDEO_ID, S.URI, S.CHUNK_INDEX, S.IS_LAST,
                            S.STATUS, S.ERROR_TYPE, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S, S.ENCODER,
                            S.ENCODER_REVISION, S.SPACE, S.DURATION_S, S.FRAMES_SAMPLED)}
    for name, (g, p, keep) in videos.items():
        cols[S.GLOBAL_EMB].append(g)
        cols[S.PATCH_EMB].append(p)
        cols[S.KEEP_MASK].append(keep)
        cols[S.VIDEO_ID].append(f"{zlib.crc32(name.encode()):016x}")
        cols[S.URI].append(f"/archive/{name}.mp4")
        cols[S.CHUNK_INDEX].append(0)
        cols[S.IS_LAST].append(True)
        cols[S.STATUS].append(S.STATUS_OK)
        cols[S.ERROR_TYPE].append(None)
        cols[S.FRAME_INDEX].append(np.arange(T, dtype=np.int32))
        cols[S.PTS_S].append(np.arange(T, dtype=np.float64))
        cols[S.SPAN_END_S].append(np.arange(1, T + 1, dtype=np.float64))
        cols[S.ENCODER].append(FakeEncoder.spec.id)
        cols[S.ENCODER_REVISION].append("r1")
        cols[S.SPACE].append(FakeEncoder.spec.space)
        cols[S.DURATION_S].append(float(T))
        cols[S.FRAMES_SAMPLED].append(T)
    batch = {}
    for k, v in cols.items():
        if k in (S.GLOBAL_EMB, S.PATCH_EMB, S.KEEP_MASK, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S):
            batch[k] = S.object_column(v)
        elif k in (S.CHUNK_INDEX, S.FRAMES_SAMPLED):
            batch[k] = np.asarray(v, dtype=np.int64)
        elif k == S.DURATION_S:
            batch[k] = np.asarray(v, dtype=np.float64)
        elif k == S.IS_LAST:
            batch[k] = np.asarray(v, dtype=bool)
        else:
            batch[k] = np.asarray(v, dtype=object)
    comp = CompressTokens(CompressConfig(grid=2, patches=True, dtype="int8"))(batch)
    ledger = ChunkLedger()
    ledger.add(WriteShards(str(store), "cfg0")(comp))
    return ledger.commit(TokenStore(str(store))).version


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
    from ray_vlm.benchgen import SAMPLE_CLIP_ANNOTATIONS
    from ray_vlm.config import IndexConfig
    from ray_vlm.pipelines.archive_index import index_archive
    from ray_vlm.samples import sample_videos

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
