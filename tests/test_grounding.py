"""Grounding: patch-grid reconstruction, context tokens, score curves, moments, calibration.

Synthetic tokens and score sequences have exact expected answers; the slow test runs the real bundled encoder
on real frames of the sample clips.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ray_vlm.query import grounding as G

pytestmark = pytest.mark.timeout(120)


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- pruned-patch reconstruction


def test_patch_sources_points_every_pruned_patch_at_its_last_kept_version():
    # 3 frames, 4 patches. Frame 0 keeps all; frame 1 keeps patch 2; frame 2 keeps patches 0 and 3.
    counts = np.array([4, 1, 2])
    flat = np.array([0, 1, 2, 3, 2, 0, 3])
    src = G.patch_sources(counts, flat, 4)
    assert src.tolist() == [[0, 1, 2, 3], [0, 1, 4, 3], [5, 1, 4, 6]]


def test_patch_sources_rebuild_the_true_grids_of_a_diff_pruned_sequence():
    rng = np.random.default_rng(0)
    t, p, d = 40, 9, 8
    truth = np.empty((t, p, d), np.float32)
    truth[0] = rng.normal(size=(p, d))
    changed = rng.random((t, p)) < 0.2
    changed[0] = True
    for i in range(1, t):  # a patch changes only when the pruner keeps it (DiffFP against the last kept)
        truth[i] = truth[i - 1]
        truth[i, changed[i]] = rng.normal(size=(changed[i].sum(), d))
    frames, patches = np.nonzero(changed)  # row-major: frame by frame, as the store holds them
    kept = truth[frames, patches]
    src = G.patch_sources(changed.sum(1), patches, p)
    assert (src >= 0).all()
    np.testing.assert_array_equal(kept[src], truth)


def test_patch_sources_marks_positions_never_kept_and_checks_its_input():
    src = G.patch_sources(np.array([1, 1]), np.array([2, 0]), 3)
    assert src.tolist() == [[-1, -1, 0], [1, -1, 0]]
    with pytest.raises(G.GroundingError, match="indices"):
        G.patch_sources(np.array([2]), np.array([0]), 3)
    with pytest.raises(G.GroundingError, match="outside"):
        G.patch_sources(np.array([1]), np.array([5]), 3)


# ---------------------------------------------------------------- context tokens


def _reference_context(vecs, q, tau):
    """Direct LLaMA-VID context token score for one frame: vecs (P, D), q (D,)."""
    s = vecs @ q
    w = np.exp((s - s.max()) / tau)
    w /= w.sum()
    c = (w[:, None] * vecs).sum(0)
    return float(c @ q / np.linalg.norm(c))


def test_context_scores_match_a_direct_computation_on_int8_codes():
    rng = np.random.default_rng(1)
    t, p, d = 7, 6, 12
    vec = _unit(rng.normal(size=(t * p, d)))
    scales = (np.abs(vec).max(1) / 127).astype(np.float32)
    codes = np.clip(np.rint(vec / scales[:, None]), -127, 127).astype(np.int8)
    deq = codes.astype(np.float32) * scales[:, None]
    src = np.arange(t * p, dtype=np.int32).reshape(t, p)
    q = _unit(rng.normal(size=(2, d)))
    got = G.context_scores(codes, scales, src, q, tau=0.05, block=3)  # blocks cut through the frames
    want = np.array([[_reference_context(deq[src[i]], q[j], 0.05) for j in range(2)] for i in range(t)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # small tau -> the best patch; large tau -> the mean patch
    sharp = G.context_scores(deq, None, src, q[:1], tau=1e-4)[:, 0]
    best = [deq[src[i]][np.argmax(deq[src[i]] @ q[0])] for i in range(t)]  # cosine of the best patch
    np.testing.assert_allclose(sharp, [b @ q[0] / np.linalg.norm(b) for b in best], atol=1e-5)
    flat = G.context_scores(deq, None, src, q[:1], tau=1e4)[:, 0]
    mean = [_unit(deq[src[i]].mean(0)) @ q[0] for i in range(t)]
    np.testing.assert_allclose(flat, mean, atol=1e-4)


def _planted_video(seed=0, prune=False):
    """20 frames of 49 noise patches at 1 fps; a small object (one patch along the query) in frames 10..14.

    The global token is the mean patch plus per-frame noise larger than one patch's share of the mean, so the
    global score cannot see the object. With ``prune``, the object's patch is kept only at frame 10 (the pruner
    dropped it while it did not change) and every other frame keeps only a few changing patches.
    """
    rng = np.random.default_rng(seed)
    t, p, d = 20, 49, 32
    q = _unit(np.eye(d)[0])
    grid = _unit(rng.normal(size=(t, p, d)) + np.eye(d)[1] * 0.5)
    grid[:, :, 0] = 0.0  # noise patches are orthogonal to the query...
    grid = _unit(grid)
    obj = _unit(np.eye(d)[0] * 3 + rng.normal(size=d) * 0.2)
    grid[10:15, 17] = obj  # ...the object patch is not
    glob = _unit(grid.mean(1) + rng.normal(size=(t, d)) * 0.3)
    pts = np.arange(t, dtype=np.float64)
    keep = np.ones((t, p), dtype=bool)
    if prune:
        keep = rng.random((t, p)) < 0.3
        keep[0] = True
        keep[:, 17] = False
        keep[[0, 10, 15], 17] = True
        for i in range(1, t):  # a dropped patch is the last kept version of itself
            grid[i, ~keep[i]] = grid[i - 1, ~keep[i]]
        glob = _unit(grid.mean(1) + rng.normal(size=(t, d)) * 0.3)
    frames, patches = np.nonzero(keep)
    tok = G.VideoTokens("v", pts, pts + 1.0, np.arange(t), glob, None, grid[frames, patches].astype(np.float32),
                        None, G.patch_sources(keep.sum(1), patches, p))
    return tok, q


@pytest.mark.parametrize("prune", [False, True])
def test_context_tokens_find_a_small_object_the_global_token_misses(prune):
    tok, q = _planted_video(prune=prune)
    units = {"global": 0.05, "context": 0.05}
    glob_p = G.GroundingParams(channels=("global",), smooth_s=0.0)
    ctx_p = G.GroundingParams(channels=("context",), smooth_s=0.0)
    sg = G.frame_scores(tok, q, glob_p)["global"][:, 0]
    sc = G.frame_scores(tok, q, ctx_p)["context"][:, 0]
    inside = np.zeros(20, bool)
    inside[10:15] = True
    assert sc[inside].min() > 0.8 and sc[~inside].max() < 0.3  # the context token carries the object
    assert sg[inside].min() < sg[~inside].max()  # no threshold on the pooled token separates them
    cal = G.calibration_from_scores(G.frame_scores(tok, q, ctx_p), units, ctx_p)
    [best, *_] = G.ground(tok, q, cal, ctx_p)
    assert (best.start_s, best.end_s) == (9.5, 14.5)  # half-way to the frames outside
    cal_g = G.calibration_from_scores(G.frame_scores(tok, q, glob_p), units, glob_p)
    top_g = G.ground(tok, q, cal_g, glob_p)[0]
    assert G.temporal_iou((top_g.start_s, top_g.end_s), (10.0, 15.0)) < 0.5


def test_frame_scores_fall_back_to_content_tokens_without_patches():
    rng = np.random.default_rng(2)
    tok = G.VideoTokens("v", np.arange(4.0), np.arange(1.0, 5.0), np.arange(4), _unit(rng.normal(size=(4, 8))),
                        _unit(rng.normal(size=(4, 4, 8))))
    q = _unit(rng.normal(size=8))
    sc = G.frame_scores(tok, q, G.GroundingParams(channels=("context",)))
    assert set(sc) == {"global", "grid"}
    np.testing.assert_allclose(sc["grid"][:, 0], (tok.grid_tokens @ q).max(1), rtol=1e-6)
    assert set(G.frame_scores(tok, q)) == {"global", "grid"}


# ---------------------------------------------------------------- curves and moments


def test_sample_grid_expands_pruned_spans_to_the_sampled_frames():
    # 1 fps; stored frames 0, 3 (covering pruned 4, 5) and 6; the video ends at 7.0.
    times, owner, dt = G.sample_grid(np.array([0.0, 3.0, 6.0]), np.array([3.0, 6.0, 7.0]), np.array([0, 3, 6]))
    assert dt == 1.0
    assert times.tolist() == [0, 1, 2, 3, 4, 5, 6] and owner.tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_moments_of_a_step_curve_have_exact_half_way_boundaries():
    times = np.arange(30, dtype=np.float64)
    v = np.zeros(30)
    v[8:13] = 4.0  # samples 8..12 inside
    v[20:22] = 2.0  # a weaker, second moment
    v[29] = 1.0  # below min_prominence: not a moment
    ms = G.extract_moments(times, v, start_s=0.0, end_s=30.0, rel=0.5, min_prominence=1.5)
    assert [(s, e, pk) for s, e, pk, _ in ms] == [(7.5, 12.5, 4.0), (19.5, 21.5, 2.0)]
    # a moment that touches the ends of the video reaches them
    edge = np.zeros(10)
    edge[:3] = 3.0
    edge[8:] = 2.5
    ms = G.extract_moments(np.arange(10.0), edge, start_s=0.0, end_s=10.0, min_prominence=1.0)
    assert [(s, e) for s, e, _, _ in ms] == [(0.0, 2.5), (7.5, 10.0)]


def test_ground_curve_with_pruned_frames_and_smoothing_keeps_the_step_boundaries():
    # Stored frames at 0..29 s, except that an event 10..19 is one kept frame spanning 10 s (all pruned after).
    pts = np.array([*range(10), 10, *range(20, 30)], dtype=np.float64)
    span = np.array([*range(1, 11), 20, *range(21, 31)], dtype=np.float64)
    fidx = np.array([*range(10), 10, *range(20, 30)])
    z = np.where(pts == 10, 5.0, 0.0)
    p = G.GroundingParams(smooth_s=1.0, max_moments=3)
    [m, *rest] = G.ground_curve("v", pts, span, fidx, z, p)
    assert (m.start_s, m.end_s) == (9.5, 19.5)  # symmetric smoothing, half-height cut: the step stays put
    assert m.z == pytest.approx(5.0, abs=0.05) and 9.9 < m.peak_s < 19.1
    assert all(r.score < m.score for r in rest)


def test_nms_drops_overlapping_moments_of_the_same_video_only():
    a = G.GroundedMoment("v", 0.0, 10.0, 0.9, 3.0, 5.0)
    b = G.GroundedMoment("v", 1.0, 10.0, 0.8, 2.0, 5.0)  # IoU 0.9 with a
    c = G.GroundedMoment("w", 1.0, 10.0, 0.7, 1.0, 5.0)  # another video
    d = G.GroundedMoment("v", 8.0, 20.0, 0.6, 1.0, 15.0)  # IoU 2/20 with a
    assert G.nms([d, c, b, a], 0.5) == [a, c, d]


def test_window_selects_the_frames_of_a_candidate_window():
    tok, q = _planted_video()
    win = tok.window(8.5, 16.0)
    assert win.pts_s.tolist() == list(range(8, 16)) and win.patch_src.shape == (8, 49)
    p = G.GroundingParams(channels=("context",), smooth_s=0.0)
    cal = G.calibration_from_scores(G.frame_scores(tok, q, p), {"context": 0.05}, p)  # library-wide centre
    [m, *_] = G.ground(win, q, cal, p)
    assert (m.start_s, m.end_s) == (9.5, 14.5)


def test_compact_window_keeps_only_the_patches_its_frames_use_and_scores_the_same():
    tok, q = _planted_video(prune=True)
    win = tok.window(9.5, 13.0)
    small = tok.window(9.5, 13.0, compact=True)
    assert small.pts_s.tolist() == win.pts_s.tolist() == [9.0, 10.0, 11.0, 12.0]
    used = np.unique(win.patch_src[win.patch_src >= 0])
    assert len(small.patch_codes) == len(used) < len(tok.patch_codes)
    np.testing.assert_array_equal(small.patch_codes[small.patch_src], win.patch_codes[win.patch_src])
    p = G.GroundingParams(context_top_m=8)
    for ch, s in G.frame_scores(win, q, p).items():
        np.testing.assert_allclose(G.frame_scores(small, q, p)[ch], s, rtol=1e-6)
    assert tok.window(100.0, 200.0, compact=True).num_frames == 0


def test_context_scores_of_a_query_do_not_depend_on_the_batch_it_is_scored_in():
    """Top-m attention is chosen from (top_m, P) alone: a query scores the same alone or among many."""
    tok, _ = _planted_video(prune=True)
    rng = np.random.default_rng(3)
    many = _unit(rng.normal(size=(10, tok.global_tokens.shape[1])))  # 8 * 10 >= 49 patches
    p = G.GroundingParams(channels=("context",), context_top_m=8, context_tau=0.5)  # a soft attention
    alone = G.frame_scores(tok, many[:1], p)["context"][:, 0]
    # the same top-8 patches and weights; the logits come from one float32 GEMM for ten queries and a GEMV for
    # one, whose sums round differently by a few ulps (which kernels run depends on the CPU): hence a tolerance
    np.testing.assert_allclose(G.frame_scores(tok, many, p)["context"][:, 0], alone, rtol=1e-5, atol=1e-6)
    exact = G.frame_scores(tok, many[:1], replace(p, context_top_m=None))["context"][:, 0]
    assert np.abs(exact - alone).max() > 1e-3  # top-8 is an approximation here: the choice matters


# ---------------------------------------------------------------- calibration


def test_calibration_centres_each_query_and_maps_to_unit_interval():
    rng = np.random.default_rng(3)
    n = 200
    # query 0: biased high everywhere but flat; query 1: low baseline with a strong peak
    s = np.stack([0.5 + rng.normal(size=n) * 0.002, 0.2 + rng.normal(size=n) * 0.002], axis=1).astype(np.float32)
    s[50:55, 1] += 0.2
    ref = rng.normal(size=(n, 10)) * 0.02
    units = G.channel_units({"global": ref})
    assert 0.02 < units["global"] < 0.05  # q95 - q50 of a normal with sigma 0.02 is ~0.033
    cal = G.calibration_from_scores({"global": s}, units)
    z = G.fuse({"global": s}, cal)
    scores = G.calibrated_score(z.max(0))
    assert scores[0] < 0.1 and scores[1] > 0.9  # the flat, biased query is not confident; the peaked one is
    assert ((0 <= G.calibrated_score(z)) & (G.calibrated_score(z) <= 1)).all()
    assert G.calibrated_score(-1e6) == 0.0 and G.calibrated_score(1e6) == 1.0


def test_fusion_mean_and_max():
    s = {"global": np.array([[1.0], [0.0]]), "context": np.array([[0.0], [3.0]])}
    cal = G.Calibration({"global": np.array([0.0]), "context": np.array([0.0])}, {"global": 1.0, "context": 1.0})
    np.testing.assert_allclose(G.fuse(s, cal, G.GroundingParams(fusion="mean"))[:, 0], [0.5, 1.5])
    np.testing.assert_allclose(G.fuse(s, cal, G.GroundingParams(fusion="max"))[:, 0], [1.0, 3.0])
    w = G.GroundingParams(weights={"global": 3.0, "context": 1.0})
    np.testing.assert_allclose(G.fuse(s, cal, w)[:, 0], [0.75, 0.75])
    with pytest.raises(G.GroundingError):
        G.GroundingParams(channels=("colour",))


@pytest.mark.slow
def test_calibrated_scores_with_the_bundled_encoder_on_real_frames():
    """Real sample clips at 1 fps through the real encoder: queries that name what is there score high in the
    right video; gibberish, another script and an unrelated object stay low in every video."""
    import av

    from ray_vlm.core.samples import sample_videos
    from ray_vlm.models import load_encoder
    from ray_vlm.operators._sampler import scaler_interpolation  # the same pixels on every CPU
    from ray_vlm.operators.compress import adaptive_avg_pool

    enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu")
    videos = {}
    for path in sample_videos():
        frames, pts = [], []
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            nxt = 0.0
            for f in c.decode(s):
                t = float(f.pts * s.time_base)
                if t + 1e-6 >= nxt:
                    frames.append(
                        f.reformat(224, 224, format="rgb24", interpolation=scaler_interpolation()).to_ndarray())
                    pts.append(t)
                    nxt += 1.0
        g, p = enc.encode_frames(np.stack(frames))
        n = len(pts)
        grid = adaptive_avg_pool(p.reshape(n, 7, 7, -1), 2).reshape(n, 4, -1)
        grid = _unit(grid)
        pts = np.asarray(pts)
        videos[path.stem] = G.VideoTokens(path.stem, pts, np.append(pts[1:], pts[-1] + 1.0), np.arange(n), g,
                                          grid, p.reshape(n * 49, -1), None,
                                          np.arange(n * 49, dtype=np.int32).reshape(n, 49))
    params = G.DEFAULT_PARAMS
    lib = [videos[k] for k in sorted(videos)]

    def scores_on_library(q):
        per = [G.frame_scores(v, q, params) for v in lib]
        return per, {ch: np.concatenate([s[ch] for s in per]) for ch in per[0]}

    _, ref = scores_on_library(enc.encode_text(list(G.REFERENCE_QUERIES)))
    units = G.channel_units(ref, params)
    queries = {"a rabbit": "bigbuckbunny", "a man wearing a bow tie": "carphone_pristine", "a taxi": "bikes",
               "xqzv blorf wumpt": None, "ウサギが草の上に座っている": None, "a submarine": None}
    q = enc.encode_text(list(queries))
    per, lib_scores = scores_on_library(q)
    cal = G.calibration_from_scores(lib_scores, units, params)
    best = {}
    for i, text in enumerate(queries):
        for v, sc in zip(lib, per):
            z = G.fuse(sc, cal, params)[:, i]
            best[(text, v.video_id)] = float(G.calibrated_score(z.max(), params))
    # Unrelated queries stay below 0.4 (the int8 encoder gives "a submarine" on the street clip 0.32, torch
    # 0.25) and far below every query that names what is there (0.78 and up).
    right_scores = [best[(text, right)] for text, right in queries.items() if right is not None]
    for text, right in queries.items():
        top = max(best[(text, v)] for v in videos)
        if right is None:
            assert top < 0.4 and top < min(right_scores) - 0.3, (text, top)
        else:
            assert best[(text, right)] > 0.7, (text, best[(text, right)])
            assert all(best[(text, v)] < best[(text, right)] for v in videos if v != right)
