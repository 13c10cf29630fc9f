"""Tests for ray_vlm.eval.metrics: IoU, AP, R1/mIoU/top1_overlap/mAP, input checks, and agreement with the
reference QVHighlights evaluation on two fixtures under tests/data/eval/ (make_fixture.py regenerates
their JSONL files):

* ``annotations.jsonl`` + ``predictions.jsonl``: 80 synthetic queries (long and unsorted lists, ties,
  duplicates, zero-length windows); ``reference_metrics.json``;
* ``threshold_annotations.jsonl`` + ``threshold_predictions.jsonl``: 29 queries whose IoUs land exactly
  on thresholds at 0.1-s precision, where the reference's two IoU formulas fall on either side of the
  threshold in float64 (among them the issue's [8.6, 60.2] vs [18.7, 44.5] and [2.6, 8.6] vs
  [3.8, 9.0]), plus AP with recall in thirds, truncation to ten windows, and windows a hair above or
  below the 10-s / 30-s bucket bounds; ``threshold_reference_metrics.json``.

The ``*reference_metrics.json`` numbers are the reference's own outputs: standalone_eval/ of
github.com/jayleicn/moment_detr at commit b7e553ac3b0c898ee6b85e03ee507c064eab89ca, run from a checkout
of that repository (Python 3.11, numpy 2.4.6, scikit-learn 1.9.1) with

    from standalone_eval.eval import eval_submission, compute_mr_r1
    from standalone_eval.utils import load_jsonl
    eval_submission(load_jsonl(PREDICTIONS), load_jsonl(ANNOTATIONS), verbose=False)  # "printed"
    compute_mr_r1(load_jsonl(PREDICTIONS), load_jsonl(ANNOTATIONS), iou_thds=[0.3, 0.5, 0.7])

("printed": the reference's return value, rounded to 2 decimals by the reference itself) and, for the
"unrounded" numbers, the same module's source with only its two ``float(f"{...:.2f}")`` rounding
expressions replaced by the bare values, executed and called the same way (eval_moment_retrieval, and
compute_mr_r1 at 0.3/0.5/0.7; compute_mr_ap(num_workers=1) for "unrounded_one_worker"). Each file's
"about" entry says the same. The tests compare with ``==``: unrounded numbers bit for bit, printed ones
as ``round(ours, 2)``, which is exactly the reference's ``float(f"{x:.2f}")`` of the same double.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from ray_vlm.eval.metrics import (
    MAP_IOU_THRESHOLDS,
    EvalDataError,
    average_precision,
    evaluate,
    iou,
    load_jsonl,
    temporal_iou_matrix,
    temporal_iou_paired,
)

DATA = Path(__file__).parent / "data" / "eval"


def ann(qid, windows, vid=None):
    rec = {"qid": qid, "query": f"q{qid}", "relevant_windows": windows}
    if vid is not None:
        rec["vid"] = vid
    return rec


def pred(qid, windows, vid=None):
    rec = {"qid": qid, "query": f"q{qid}", "pred_relevant_windows": windows}
    if vid is not None:
        rec["vid"] = vid
    return rec


# ---------------------------------------------------------------------------------------------- IoU


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 10], [5, 15], 5 / 15),  # inter 5, union 10 + 10 - 5
        ([0, 10], [0, 10], 1.0),
        ([2, 4], [0, 10], 2 / 10),  # contained
        ([0, 5], [5, 10], 0.0),  # touching
        ([0, 5], [7, 10], 0.0),  # disjoint
        ([0, 10, 0.9], [0, 10], 1.0),  # a score column is ignored
        ([5, 5], [0, 10], 0.0),  # zero length inside: no time covered
        ([5, 5], [5, 5], 0.0),  # same point: union 0 -> 0 by definition
        ([20.0, 26.0], [20.0, 30.0], 0.6),  # 6 / 10, exactly the double 0.6
    ],
)
def test_iou_hand_values(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=1e-15)
    assert iou(b, a) == pytest.approx(expected, abs=1e-15)


# The two cases: the reference's R1 divides by the hull max(end) - min(start), its AP matching by
# len_a + len_b - inter; in float64 they fall on either side of the threshold.
@pytest.mark.parametrize(
    "pred_w, gt_w, hull, summed",
    [
        ([8.6, 60.2], [18.7, 44.5], 0.5, 0.49999999999999994),
        ([2.6, 8.6], [3.8, 9.0], 0.7499999999999999, 0.75),
    ],
)
def test_iou_float64_as_the_reference(pred_w, gt_w, hull, summed):
    assert iou(pred_w, gt_w) == hull
    assert iou(gt_w, pred_w) == hull
    assert temporal_iou_paired([pred_w], [gt_w]).tolist() == [hull]
    assert temporal_iou_matrix([pred_w], [gt_w]).tolist() == [[summed]]
    # R1 compares the hull IoU with t, AP the other one, as the reference does.
    t = 0.5 if hull == 0.5 else 0.75
    m = evaluate([pred(1, [pred_w + [0.9]])], [ann(1, [gt_w])], r1_iou_thresholds=[t])
    assert m[f"R1@{t:g}"] == (100.0 if hull >= t else 0.0)
    assert m[f"mAP@{t:g}"] == (100.0 if summed >= t else 0.0)
    assert m["mIoU"] == 100.0 * hull and m["top1_overlap"] == 100.0


def test_temporal_iou_paired_shape_and_values():
    # Row-wise; disjoint and touching windows have IoU 0; a zero-length hull gives 0, not NaN.
    got = temporal_iou_paired([[0, 10], [0, 5], [0, 5], [5, 5], [2, 4]],
                              [[5, 15], [5, 10], [7, 10], [5, 5], [0, 10]])
    assert got.tolist() == [5 / 15, 0.0, 0.0, 0.0, 0.2]
    assert temporal_iou_paired([[2, 4, 0.9]], [[0, 10]]).tolist() == [0.2]  # a score column is ignored
    assert temporal_iou_paired(np.zeros((0, 2)), np.zeros((0, 2))).shape == (0,)
    with pytest.raises(ValueError, match="as many rows"):
        temporal_iou_paired([[0, 1]], [[0, 1], [0, 2]])


def test_r1_takes_the_window_of_highest_sum_iou():
    # The top-1 overlaps both windows; the first (sum IoU 0.4999..., hull 0.5) is its best: R1@0.5 hit.
    m = evaluate([pred(1, [[19.1, 68.9, 0.9]])], [ann(1, [[6.7, 50.2], [60.0, 80.0]])])
    assert m["R1@0.5"] == 100.0 and m["mIoU"] == 50.0


def test_temporal_iou_matrix_shape_and_values():
    m = temporal_iou_matrix([[0, 10], [5, 15]], [[0, 10], [10, 20], [100, 101]])
    assert m.shape == (2, 3)
    # [0,10] vs [0,10]: 1; vs [10,20]: touch 0. [5,15] vs [0,10]: 5/15; vs [10,20]: 5/15.
    np.testing.assert_allclose(m, [[1, 0, 0], [1 / 3, 1 / 3, 0]], atol=1e-15)
    assert temporal_iou_matrix(np.zeros((0, 2)), [[0, 1]]).shape == (0, 1)
    assert temporal_iou_matrix([[0, 1]], []).shape == (1, 0)
    with pytest.raises(ValueError, match="shape"):
        temporal_iou_matrix([1, 2, 3], [[0, 1]])


# ----------------------------------------------------------------------------------------------- AP


def test_average_precision_hand_computed():
    gt = [[0, 10], [20, 30]]
    ranked = [[0, 10], [40, 50], [20, 26]]  # IoU 1 with gt0; miss; 0.6 with gt1
    ap = average_precision(ranked, gt)
    # t <= 0.6: tp = [1, 0, 1], precision = [1, 1/2, 2/3], envelope = [1, 2/3, 2/3]
    #           AP = (1 + 2/3) / 2 = 5/6.
    # t >= 0.65: tp = [1, 0, 0]; AP = 1 / 2 (the second window is never recalled).
    np.testing.assert_allclose(ap, [5 / 6] * 3 + [0.5] * 7, atol=1e-12)


def test_average_precision_duplicates_and_greedy_matching():
    gt = [[0, 10]]
    # A duplicate after the hit is a false positive but cannot lower the interpolated precision: AP 1.
    np.testing.assert_allclose(average_precision([[0, 10], [0, 10], [50, 60]], gt), 1.0)
    # Miss, hit, duplicate: tp = [0, 1, 0], precision = [0, 1/2, 1/3], envelope at the hit 1/2 -> AP 1/2.
    np.testing.assert_allclose(average_precision([[50, 60], [0, 10], [0, 10]], gt), 0.5)
    # The first window takes the only GT at IoU 0.5 (t = 0.5), so the exact one after it is a false
    # positive: AP 1 at t = 0.5; above 0.5 the first misses: tp = [0, 1], AP = 1/2.
    ap = average_precision([[10, 20], [0, 20]], [[0, 20]])
    np.testing.assert_allclose(ap, [1.0] + [0.5] * 9, atol=1e-12)
    assert average_precision(np.zeros((0, 2)), gt).tolist() == [0.0] * 10
    with pytest.raises(ValueError, match="ground-truth"):
        average_precision([[0, 1]], np.zeros((0, 2)))


def test_average_precision_tie_takes_later_window():
    # The first window overlaps both GT windows by 9/11. Taking the later one ([2, 12]) leaves [0, 10]
    # for the exact second window: tp = [1, 1] for t <= 0.8 (AP 1). For t >= 0.85 the first misses:
    # tp = [0, 1], precision 1/2, AP = 1/2 * 1/2 = 1/4.
    ap = average_precision([[1, 11], [0, 10]], [[0, 10], [2, 12]])
    np.testing.assert_allclose(ap, [1.0] * 7 + [0.25] * 3, atol=1e-12)


# ------------------------------------------------------------------------------------- evaluate: hand


def _two_queries():
    annotations = [ann(1, [[0, 10], [20, 30]], vid="a"), ann(2, [[0, 20]], vid="b")]
    predictions = [
        # Listed out of score order: ranked [0,10] (.9), [40,50] (.7), [20,26] (.5).
        pred(1, [[20, 26, 0.5], [0, 10, 0.9], [40, 50, 0.7]], vid="a"),
        pred(2, [[10, 20, 0.9], [0, 20, 0.8]], vid="b"),
    ]
    return predictions, annotations


def test_evaluate_hand_computed():
    predictions, annotations = _two_queries()
    m = evaluate(predictions, annotations)
    # Query 1 (test_average_precision_hand_computed): AP 5/6 at 3 thresholds, 1/2 at 7: mean 0.6.
    # Query 2 (the [10,20] then [0,20] case): AP 1 at t = 0.5, 1/2 at 9: mean 0.55.
    assert m["mAP"] == pytest.approx(100 * (0.6 + 0.55) / 2)  # 57.5
    assert m["mAP@0.5"] == pytest.approx(100 * (5 / 6 + 1) / 2)  # 91.67
    assert m["mAP@0.75"] == pytest.approx(100 * (0.5 + 0.5) / 2)  # 50
    assert m["mAP@0.6"] == pytest.approx(100 * (5 / 6 + 0.5) / 2)  # 66.67: 0.6 >= 0.6 holds
    assert m["mAP@0.65"] == pytest.approx(50.0)
    # Top-1: query 1 -> [0,10], IoU 1; query 2 -> [10,20], IoU 10/20 = 0.5.
    assert (m["R1@0.3"], m["R1@0.5"], m["R1@0.7"]) == (100.0, 100.0, 50.0)
    assert m["mIoU"] == pytest.approx(100 * (1 + 0.5) / 2)  # 75
    assert m["top1_overlap"] == 100.0
    # Buckets: query 1's windows are 10 s long (short, (0, 10]); query 2's is 20 s (middle).
    assert m["mAP_short"] == pytest.approx(60.0)
    assert m["mAP_middle"] == pytest.approx(55.0)
    assert math.isnan(m["mAP_long"])
    assert (m["num_queries_short"], m["num_queries_middle"], m["num_queries_long"]) == (1.0, 1.0, 0.0)
    assert m["num_queries"] == 2.0 and m["num_queries_without_predictions"] == 0.0


def test_evaluate_listed_order_like_reference():
    predictions, annotations = _two_queries()
    m = evaluate(predictions, annotations, sort_by_score=False)
    # Top-1 is now the first listed window: query 1 -> [20,26], IoU 0.6 with [20,30]; query 2 unchanged (0.5).
    assert (m["R1@0.3"], m["R1@0.5"], m["R1@0.7"]) == (100.0, 100.0, 0.0)
    assert m["mIoU"] == pytest.approx(100 * (0.6 + 0.5) / 2)  # 55
    # AP still ranks the (at most 10) listed windows by score: unchanged.
    assert m["mAP"] == pytest.approx(57.5)


def test_missing_and_empty_predictions_are_misses():
    annotations = [ann(1, [[0, 10]]), ann(2, [[0, 10]]), ann(3, [[0, 10]])]
    predictions = [pred(1, [[0, 10, 1.0]]), pred(2, [])]  # qid 3 has no line at all
    m = evaluate(predictions, annotations)
    # Only query 1 is right: 1 of 3 everywhere.
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "top1_overlap", "mAP", "mAP@0.5", "mAP@0.95", "mAP_short"):
        assert m[key] == pytest.approx(100 / 3), key
    assert m["num_queries"] == 3.0 and m["num_queries_without_predictions"] == 2.0


def test_multiple_gt_windows():
    annotations = [ann(1, [[0, 10], [20, 30], [40, 80]])]
    # Top-1 overlaps the second window best (IoU 1): a hit although it misses the first.
    m = evaluate([pred(1, [[20, 30, 0.9]])], annotations)
    assert m["R1@0.7"] == 100.0 and m["mIoU"] == 100.0
    # One of three windows recalled at precision 1: AP = 1/3 at every threshold.
    assert m["mAP"] == pytest.approx(100 / 3)
    # Buckets split the windows: short {[0,10], [20,30]} (10 s each, in (0, 10]): one of two found, AP 1/2;
    # middle: none; long {[40,80]}: missed.
    assert m["mAP_short"] == pytest.approx(50.0) and m["mAP_long"] == 0.0 and math.isnan(m["mAP_middle"])
    # All three found, in any order: AP 1.
    m = evaluate([pred(1, [[40, 80, 0.1], [0, 10, 0.5], [20, 30, 0.9]])], annotations)
    assert m["mAP"] == pytest.approx(100.0) and m["mAP_short"] == pytest.approx(100.0)
    # Buckets keep every prediction (as the reference does), so a perfect hit on a long window is a
    # false positive in the short bucket: long bucket ranked [40,80] tp -> AP 1; short bucket ranked
    # [40,80] fp, [0,10] tp, [20,30] tp -> precision [0, 1/2, 2/3]; interpolated (best at this rank or
    # later) [2/3, 2/3, 2/3] -> AP (2/3 + 2/3) / 2 = 2/3.
    m = evaluate([pred(1, [[40, 80, 0.9], [0, 10, 0.5], [20, 30, 0.4]])], annotations)
    assert m["mAP"] == pytest.approx(100.0) and m["mAP_long"] == pytest.approx(100.0)
    assert m["mAP_short"] == pytest.approx(100 * 2 / 3)


def test_duplicate_predictions_and_ties_in_score():
    annotations = [ann(1, [[0, 10], [20, 30]])]
    # The duplicate of the hit cannot take the same GT window: tp = [1, 0, 1] -> AP (1 + 2/3) / 2.
    m = evaluate([pred(1, [[0, 10, 0.9], [0, 10, 0.9], [20, 30, 0.8]])], annotations)
    assert m["mAP"] == pytest.approx(100 * 5 / 6)
    # Equal scores keep the listed order: top-1 is the first of the tied windows.
    m = evaluate([pred(1, [[50, 60, 0.5], [0, 10, 0.5]])], annotations)
    assert m["R1@0.3"] == 0.0 and m["top1_overlap"] == 0.0
    # Also in a long list (where an unstable sort would be free to reorder the ties).
    rng = random.Random(0)
    windows = [[100.0, 110.0, round(rng.random() * 0.5, 3)] for _ in range(60)]
    for k in rng.sample(range(60), 20):
        windows[k][2] = 0.9
    first_tied = next(k for k, w in enumerate(windows) if w[2] == 0.9)
    windows[first_tied][:2] = [0.0, 10.0]
    m = evaluate([pred(1, windows)], annotations, max_predictions=None)
    assert m["R1@0.7"] == 100.0


def test_zero_length_windows():
    annotations = [ann(1, [[0, 10]]), ann(2, [[5, 5]])]
    predictions = [pred(1, [[5, 5, 0.9], [0, 10, 0.1]]), pred(2, [[5, 5, 0.9]])]
    m = evaluate(predictions, annotations)
    # Query 1: the zero-length top-1 covers no time: IoU 0, no hit; AP: tp = [0, 1] -> 1/2.
    # Query 2: a zero-length ground truth can never be matched (IoU 0 by definition): AP 0.
    assert m["top1_overlap"] == 0.0 and m["mIoU"] == 0.0
    assert m["mAP"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    # A zero-length GT window is in no length bucket (lengths are (lo, hi]).
    assert m["num_queries_short"] == 1.0 and m["mAP_short"] == pytest.approx(50.0)


def test_max_predictions_truncates_after_ranking():
    annotations = [ann(1, [[0, 10]])]
    windows = [[50.0 + 2 * k, 52.0 + 2 * k, 0.9 - 0.01 * k] for k in range(10)] + [[0, 10, 0.01]]
    # The only hit is ranked 11th: outside the reference's 10.
    assert evaluate([pred(1, windows)], annotations)["mAP"] == 0.0
    # Keeping all: tp only at rank 11, precision 1/11 -> AP 1/11.
    assert evaluate([pred(1, windows)], annotations, max_predictions=None)["mAP"] == pytest.approx(100 / 11)
    # Ranked by score before truncating: listed last, scored highest, it is the top-1.
    windows[-1][2] = 0.99
    m = evaluate([pred(1, windows)], annotations)
    assert m["mAP"] == pytest.approx(100.0) and m["R1@0.7"] == 100.0
    # The reference keeps the first 10 *listed*: the hit is dropped there.
    assert evaluate([pred(1, windows)], annotations, sort_by_score=False)["mAP"] == 0.0
    with pytest.raises(ValueError, match="max_predictions"):
        evaluate([pred(1, windows)], annotations, max_predictions=0)


# ------------------------------------------------------------------------------------ evaluate: random


def _random_case(seed: int, num_queries: int = 150):
    rng = random.Random(seed)
    annotations, predictions = [], []
    for q in range(num_queries):
        gt = []
        t = rng.uniform(0, 20)
        for _ in range(rng.randint(1, 3)):
            length = rng.choice([rng.uniform(1, 10), rng.uniform(10, 30), rng.uniform(30, 100)])
            gt.append([t, t + length])
            t += length + rng.uniform(1, 30)
        annotations.append(ann(q, gt))
        windows = []
        for _ in range(rng.randint(0, 14)):
            s = rng.uniform(0, 150)
            windows.append([s, s + rng.uniform(0, 60), rng.random()])
        predictions.append(pred(q, windows))
    return predictions, annotations


def test_perfect_predictions_score_100():
    _, annotations = _random_case(1)
    predictions = [pred(a["qid"], [[s, e, 1.0 - 0.01 * k] for k, (s, e) in enumerate(a["relevant_windows"])])
                   for a in annotations]
    m = evaluate(predictions, annotations)
    for key in ("mAP", "mAP@0.5", "mAP@0.95", "R1@0.3", "R1@0.7", "mIoU", "top1_overlap"):
        assert m[key] == pytest.approx(100.0), key
    # Length buckets reach 100 only where a query's windows all fall into one bucket (the other windows'
    # hits count as false positives there, see test_multiple_gt_windows).
    single = [dict(a, relevant_windows=a["relevant_windows"][:1]) for a in annotations]
    m = evaluate(predictions, single, max_predictions=1)
    assert min(m["num_queries_short"], m["num_queries_middle"], m["num_queries_long"]) > 20
    for key in ("mAP", "mAP_short", "mAP_middle", "mAP_long"):
        assert m[key] == pytest.approx(100.0), key


def test_random_consistency():
    predictions, annotations = _random_case(2)
    thresholds = [round(0.05 * k, 2) for k in range(1, 21)]
    m = evaluate(predictions, annotations, r1_iou_thresholds=thresholds)
    r1 = [m[f"R1@{t:g}"] for t in thresholds]
    assert all(a >= b for a, b in zip(r1, r1[1:])) and r1[0] > r1[-1]
    assert m["top1_overlap"] >= r1[0]
    maps = [m[f"mAP@{t:g}"] for t in MAP_IOU_THRESHOLDS]
    assert all(a >= b for a, b in zip(maps, maps[1:])) and maps[0] > maps[-1]
    assert m["mAP"] == pytest.approx(np.mean(maps))
    assert all(0.0 <= v <= 100.0 for k, v in m.items() if not k.startswith("num_"))
    assert 0 < m["num_queries_without_predictions"] < m["num_queries"] == 150
    # Neither the order of the queries nor (with distinct scores) the listed order of windows matters.
    rng = random.Random(3)
    shuffled = [dict(p, pred_relevant_windows=rng.sample(p["pred_relevant_windows"],
                                                         len(p["pred_relevant_windows"])))
                for p in predictions]
    rng.shuffle(shuffled)
    assert evaluate(shuffled, annotations[::-1], r1_iou_thresholds=thresholds) == pytest.approx(m)


# ---------------------------------------------------------------------------------- reference fixture


def _reference_as_ours(ref: dict) -> dict[str, float]:
    """Map the reference's nested output onto our flat metric names."""
    out = {}
    for t, v in ref["full"]["MR-mAP"].items():
        out["mAP" if t == "average" else f"mAP@{t}"] = v
    for t, v in ref["full"]["MR-R1"].items():
        out[f"R1@{t}"] = v
    for bucket in ("short", "middle", "long"):
        out[f"mAP_{bucket}"] = ref[bucket]["MR-mAP"]["average"]
    return out


@pytest.mark.parametrize("mode", ["sorted", "listed"])
def test_agrees_with_reference_evaluation(mode):
    reference = json.loads((DATA / "reference_metrics.json").read_text())[mode]
    annotations = load_jsonl(DATA / "annotations.jsonl")
    predictions = load_jsonl(DATA / "predictions.jsonl")
    if mode == "sorted":
        for p in predictions:
            p["pred_relevant_windows"].sort(key=lambda w: -w[2])
    printed = _reference_as_ours(reference["printed"])
    unrounded = _reference_as_ours(reference["unrounded"])
    thresholds = sorted({float(k[3:]) for k in list(printed) + list(unrounded) if k.startswith("R1@")})
    assert 0.3 in thresholds and 0.95 in thresholds
    m = evaluate(predictions, annotations, sort_by_score=(mode == "sorted"), r1_iou_thresholds=thresholds)
    # The reference's full-set mAP sums the 80 queries' AP in the order its worker pool happens to return
    # two chunks (50 + 30), so the last bits of its own unrounded mAP@t vary from run to run; its
    # single-process result (the predictions' order, as ours) is the one to equal bit for bit.
    one_worker = reference["unrounded_one_worker"]["full"]["MR-mAP"]
    pool_order = {k for k in unrounded if k == "mAP" or k.startswith("mAP@")}
    assert pool_order == {"mAP" if t == "average" else f"mAP@{t}" for t in one_worker}
    for t, value in one_worker.items():
        key = "mAP" if t == "average" else f"mAP@{t}"
        assert m[key] == value, key
        assert m[key] == pytest.approx(unrounded[key], rel=1e-14, abs=0), key
    for key, value in unrounded.items():
        if key not in pool_order:
            assert m[key] == value, key
    for key, value in printed.items():
        assert round(m[key], 2) == value, key
    assert len(printed) == 10 + 1 + 10 + 3  # every number the reference printed was compared
    for bucket in ("short", "middle", "long"):
        assert m[f"num_queries_{bucket}"] == reference["bucket_sizes"][bucket]
    assert m["num_queries"] == reference["bucket_sizes"]["full"] == 80


@pytest.mark.parametrize("sort_by_score", [True, False])
def test_agrees_with_reference_on_threshold_cases(sort_by_score):
    reference = json.loads((DATA / "threshold_reference_metrics.json").read_text())
    annotations = load_jsonl(DATA / "threshold_annotations.jsonl")
    predictions = load_jsonl(DATA / "threshold_predictions.jsonl")
    m = evaluate(predictions, annotations, sort_by_score=sort_by_score,
                 r1_iou_thresholds=[0.3] + list(MAP_IOU_THRESHOLDS))
    unrounded = _reference_as_ours(reference["unrounded"])
    printed = _reference_as_ours(reference["printed"])
    printed.update({f"R1@{t}": v for t, v in reference["printed_r1"].items()})
    assert len(unrounded) == 10 + 1 + 11 + 3 and len(printed) == 10 + 1 + 11 + 3
    for key, value in unrounded.items():  # 29 queries: the reference's order is the file's, every run
        assert m[key] == value, key
    for key, value in printed.items():
        assert round(m[key], 2) == value, key
    for bucket in ("short", "middle", "long"):
        assert m[f"num_queries_{bucket}"] == reference["bucket_sizes"][bucket]
    assert m["num_queries"] == reference["bucket_sizes"]["full"] == 29


def test_threshold_fixture_is_on_the_edge():
    # Guard against a regenerated fixture that no longer splits the two IoU formulas at the thresholds.
    annotations = load_jsonl(DATA / "threshold_annotations.jsonl")
    predictions = load_jsonl(DATA / "threshold_predictions.jsonl")
    split = 0
    for a, p in zip(annotations, predictions):
        top1 = p["pred_relevant_windows"][0][:2]
        hull = temporal_iou_paired([top1] * len(a["relevant_windows"]), a["relevant_windows"])
        summed = temporal_iou_matrix([top1], a["relevant_windows"])[0]
        split += any((h >= t) != (s >= t) for h, s in zip(hull, summed) for t in (0.3, 0.5, 0.7))
    assert split >= 6


def test_fixture_has_the_hard_cases():
    # Guard against a regenerated fixture that no longer exercises what the reference test is for.
    predictions = load_jsonl(DATA / "predictions.jsonl")
    lists = [p["pred_relevant_windows"] for p in predictions]
    assert sum(len(w) > 10 for w in lists) >= 5
    assert sum([x[2] for x in w] != sorted((x[2] for x in w), reverse=True) for w in lists) >= 5
    assert any(x[0] == x[1] for w in lists for x in w)
    assert any(len({tuple(x) for x in w}) < len(w) for w in lists)


# --------------------------------------------------------------------------------------- input checks


def test_load_jsonl(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"qid": 1}\n\n  \n{"qid": 2}\n')
    assert load_jsonl(path) == [{"qid": 1}, {"qid": 2}]
    assert load_jsonl(str(path)) == [{"qid": 1}, {"qid": 2}]


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"qid": 1}\n{"qid": 2,\n', r"line 2: invalid JSON"),
        (b'{"qid": 1}\n\n[1, 2]\n', r"line 3: expected a JSON object, got list"),
        (b'{"qid": 1}\n{"q": "\xff"}\n', r"line 2: not valid UTF-8"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        load_jsonl(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, EvalDataError)


def test_load_jsonl_through_fsspec_uri():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ray_vlm_eval_test/p.jsonl", b'{"qid": 7, "pred_relevant_windows": []}\n')
    try:
        assert load_jsonl("memory:///ray_vlm_eval_test/p.jsonl") == [{"qid": 7, "pred_relevant_windows": []}]
    finally:
        fs.rm("/ray_vlm_eval_test", recursive=True)


@pytest.mark.parametrize(
    "predictions, annotations, match",
    [
        ([], [], "no annotations"),
        ([], [ann(1, [[0, 1]]), ann(1, [[0, 2]])], "twice in the annotations"),
        ([pred(1, []), pred(1, [])], [ann(1, [[0, 1]])], "twice in the predictions"),
        ([pred("1", [])], [ann(1, [[0, 1]])], r"not in the annotations \(the annotations do have 1"),
        ([pred(2, [])], [ann(1, [[0, 1]])], "not in the annotations$"),
        ([], [ann(1, [])], "is empty"),
        ([], [{"qid": 1}], "missing 'relevant_windows'"),
        ([], [{"relevant_windows": [[0, 1]]}], "missing 'qid'"),
        ([], [ann(True, [[0, 1]])], "int or a string"),
        ([], [ann(1, [[5, 1]])], "ends before it starts"),
        ([], [ann(1, [[0, float("nan")]])], "finite"),
        ([], [ann(1, [[0, "3"]])], "must hold numbers"),
        ([], [ann(1, [[0, 1, 2]])], r"\[start_s, end_s\]"),
        ([pred(1, [[0, 1]])], [ann(1, [[0, 1]])], r"\[start_s, end_s, score\]"),
        ([pred(1, [[0, 1, float("inf")]])], [ann(1, [[0, 1]])], "finite"),
        ([{"qid": 1}], [ann(1, [[0, 1]])], "missing 'pred_relevant_windows'"),
        ([pred(1, [], vid="x")], [ann(1, [[0, 1]], vid="y")], "vid 'x' differs"),
        ([pred(1, "0 1")], [ann(1, [[0, 1]])], "must be a list"),
    ],
)
def test_evaluate_rejects_bad_input(predictions, annotations, match):
    with pytest.raises(EvalDataError, match=match):
        evaluate(predictions, annotations)
