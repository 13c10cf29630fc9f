"""Moment-retrieval metrics ("when does X happen?") with the QVHighlights / Moment-DETR conventions.

Inputs are the two JSONL formats of the QVHighlights benchmark:

* annotations, one query per line: ``{"qid", "query", "vid", "relevant_windows": [[start_s, end_s], ...],
  "duration"?}``;
* predictions (the benchmark's submission format): ``{"qid", "query", "vid",
  "pred_relevant_windows": [[start_s, end_s, score], ...]}``.

:func:`evaluate` returns one flat ``dict[str, float]``; every metric is a percentage in [0, 100], as the
reference evaluation prints it, but *not* rounded to two decimals: ``round(value, 2)`` gives exactly the
number the reference prints (it formats ``f"{value:.2f}"`` and parses that back; both are the correctly
rounded decimal of the same double). The definitions follow ``standalone_eval/eval.py`` of
jayleicn/moment_detr (the official QVHighlights evaluation, reused unchanged by QD-DETR, UniVTG,
Lighthouse ...), down to the floating-point arithmetic, so that an IoU landing exactly on a threshold
is decided as there:

Temporal IoU (two formulas, as in the reference)
    ``inter = max(0, min(end) - max(start))``. The reference divides it by two different unions, equal
    in exact arithmetic but not always in float64 (e.g. [8.6, 60.2] against [18.7, 44.5]: 0.5 by the
    first, 0.49999999999999994 by the second), and so do we:

    * *hull* IoU, ``inter / (max(end) - min(start))`` (:func:`temporal_iou_paired`, :func:`iou`): the
      IoU that ``R1@t`` and ``mIoU`` compare with t;
    * *sum* IoU, ``inter / ((end_a - start_a) + (end_b - start_b) - inter)``
      (:func:`temporal_iou_matrix`): the IoU that AP matching compares with t, and by which the top-1
      window picks its ground-truth window.

    Where the union has zero length (identical points, ``start == end``) both give 0: a zero-length
    window covers no time. (The reference's hull IoU does the same; its sum IoU divides 0 by 0 and gets
    NaN, which its AP matcher then counts as a hit -- we do not reproduce that accident.)

Ranking
    Predictions of a query are ranked by score, highest first; equal scores keep their listed order.
    Only the top ``max_predictions`` (10, as in the reference) take part. The reference instead trusts
    the submission to be sorted already: its top-1 is the *first listed* window and it keeps the first 10
    listed before sorting them by score. Both agree on any submission sorted by score, which the format
    asks for; ``sort_by_score=False`` reproduces the reference on unsorted ones too.

R1@t, mIoU, top1_overlap (top-1 prediction)
    The top-1 window is compared with the ground-truth window of highest sum IoU (the first listed among
    equals); the query's IoU is the hull IoU of that pair. ``R1@t``: share of queries with that IoU >= t.
    ``mIoU``: its mean (as UniVTG and most Charades-STA code report it; the Moment-DETR evaluation itself
    has no mIoU). ``top1_overlap`` (ours, not a QVHighlights metric): share of queries whose top-1
    window overlaps some ground-truth window at all (IoU > 0). It is *not* QVHighlights' "HIT@1"
    ("HL-Hit1"), a highlight-detection metric (is the top-scored 2-s clip a positive clip) that needs
    per-clip saliency scores, which this module does not evaluate.

mAP (per-query average precision, averaged over queries)
    Per query and IoU threshold t, the ranked predictions are matched greedily, as in the ActivityNet /
    MMAction2 detection AP the reference uses: each prediction in rank order takes the unmatched
    ground-truth window with the highest IoU, if that IoU >= t (a true positive), else it is a false
    positive. Each ground-truth window is matched at most once, so a duplicate of a hit is a false
    positive. Among equally overlapping windows the later listed one is taken (the reference's
    ``argsort()[::-1]``). AP is the all-point interpolated area under the precision/recall curve
    (VOC 2011 onwards): the sum, over the ranks where recall grows, of the recall step times the best
    precision at this rank or below; recall never reached adds nothing. It is computed with the
    reference's operations in the reference's order (recall ``cum_tp / num_gt`` padded with 0 and 1,
    steps as differences of consecutive recalls, one ``numpy.sum``), which can differ from
    ``sum(best precision) / num_gt`` in the last bit. ``mAP@t`` averages AP over queries (*not* pooled
    over queries), in the order the predictions list the queries (queries without predictions last);
    ``mAP`` averages ``mAP@t`` over t = 0.5, 0.55, ..., 0.95. (The reference averages in the order its
    worker pool returns chunks of 50 queries, so beyond 50 queries its own last bits vary from run to
    run; up to 50 the order is the predictions', as here.)

Length buckets (``mAP_short``, ``mAP_middle``, ``mAP_long``)
    Queries keep only their ground-truth windows of length ``end_s - start_s`` (float64, so [6.1, 16.1]
    is a little over 10 s long) in (0, 10], (10, 30] or (30, inf) seconds; a query with none is left out
    of that bucket; predictions are unchanged. A bucket's mAP is the mean over t of its ``mAP@t``. The
    reference's long bucket
    stops at 150 s, the length of every QVHighlights clip, so the two agree there; here a longer window
    stays in "long". An empty bucket gives NaN and ``num_queries_<bucket> == 0``.

Missing predictions
    An annotated query with no prediction line, or an empty ``pred_relevant_windows``, counts as a miss
    everywhere (IoU 0, AP 0). The reference refuses submissions whose qids differ from the ground
    truth's, and crashes on (R1) or silently skips (mAP) empty prediction lists.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ray_vlm.core.errors import RayVlmError

MAX_PREDICTIONS = 10
R1_IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
# 0.5, 0.55, ..., 0.95 spelled as decimals (the same doubles as float("0.55")), so that ">= t" behaves
# exactly as with the reference's thresholds.
MAP_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# name -> (min_len_s, max_len_s]: a window belongs to a bucket when min_len_s < end_s - start_s <= max_len_s.
LENGTH_BUCKETS_S: dict[str, tuple[float, float]] = {
    "short": (0.0, 10.0),
    "middle": (10.0, 30.0),
    "long": (30.0, math.inf),
}

QID = "qid"
VID = "vid"
GT_WINDOWS = "relevant_windows"
PRED_WINDOWS = "pred_relevant_windows"


class EvalDataError(RayVlmError, ValueError):
    """Annotations or predictions that cannot be evaluated as given (malformed, inconsistent)."""

    code = "eval_data_invalid"


def _thr_name(thr: float) -> str:
    return f"{thr:g}"


# ----------------------------------------------------------------------------------------------- I/O


def load_jsonl(path: str | os.PathLike, storage_options: dict | None = None) -> list[dict]:
    """Read a JSON Lines file of objects (local path or any URI :mod:`ray_vlm.core.fs` accepts).

    Blank lines are skipped.

    Raises:
        EvalDataError (a ValueError): a line is not valid UTF-8 / JSON or not a JSON object; the
            message names the file and the 1-based line number.
        ray_vlm.core.fs.PolicyError: the URI is refused. OSError: the file cannot be read.
    """
    from ray_vlm.core import fs as _fs  # fsspec stays out of `import ray_vlm.eval.metrics`

    uri = os.fspath(path)
    filesystem, fs_path = _fs.resolve(uri, storage_options)
    with filesystem.open(fs_path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    records: list[dict] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalDataError(f"{uri}, line {line_no}: not valid UTF-8 ({e.reason})") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{uri}, line {line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{uri}, line {line_no}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


# ----------------------------------------------------------------------------------------------- IoU


def _as_windows(windows: Any, name: str) -> np.ndarray:
    arr = np.asarray(windows, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, 2) (or (N, 3) with scores), got {arr.shape}")
    return arr[:, :2]


def temporal_iou_matrix(pred: Any, gt: Any) -> np.ndarray:
    """*Sum* IoU of every predicted window with every ground-truth window (AP matching uses it).

    ``inter / (len_pred + len_gt - inter)``, evaluated in that order in float64, as the reference's
    AP matching does; see :func:`temporal_iou_paired` for the IoU that R1 uses.

    Args:
        pred: (N, 2) ``[start_s, end_s]`` rows; extra columns (a score) are ignored.
        gt: (M, 2) ``[start_s, end_s]`` rows; extra columns are ignored.

    Returns:
        (N, M) float64 array in [0, 1]; 0 where the union has zero length.
    """
    p = _as_windows(pred, "pred")
    g = _as_windows(gt, "gt")
    len_p = p[:, 1] - p[:, 0]  # (N,)
    len_g = g[:, 1] - g[:, 0]  # (M,)
    left = np.maximum(p[:, None, 0], g[None, :, 0])  # (N, M)
    right = np.minimum(p[:, None, 1], g[None, :, 1])  # (N, M)
    inter = np.clip(right - left, 0.0, None)
    union = len_p[:, None] + len_g[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def temporal_iou_paired(pred: Any, gt: Any) -> np.ndarray:
    """*Hull* IoU of row i of ``pred`` with row i of ``gt`` (R1 and mIoU use it).

    ``inter / (max(end) - min(start))``: for overlapping windows the hull is their union; for disjoint
    ones the intersection is 0, and so is the IoU. Evaluated in float64 in the reference's order of
    operations, so that an IoU on a threshold compares with it as in the reference's R1 (e.g.
    [8.6, 60.2] against [18.7, 44.5] is exactly 0.5 here, 0.49999999999999994 by
    :func:`temporal_iou_matrix`).

    Args:
        pred: (N, 2) ``[start_s, end_s]`` rows; extra columns (a score) are ignored.
        gt: (N, 2) ``[start_s, end_s]`` rows; extra columns are ignored.

    Returns:
        (N,) float64 array in [0, 1]; 0 where the hull has zero length.
    """
    p = _as_windows(pred, "pred")
    g = _as_windows(gt, "gt")
    if len(p) != len(g):
        raise ValueError(f"pred and gt must have as many rows, got {len(p)} and {len(g)}")
    inter = np.maximum(0.0, np.minimum(p[:, 1], g[:, 1]) - np.maximum(p[:, 0], g[:, 0]))
    hull = np.maximum(p[:, 1], g[:, 1]) - np.minimum(p[:, 0], g[:, 0])
    return np.divide(inter, hull, out=np.zeros_like(inter), where=hull != 0)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Hull IoU of two windows ``[start_s, end_s(, score)]``, as ``R1@t`` compares it with t.

    0 if their union has zero length. See :func:`temporal_iou_paired`.
    """
    return float(temporal_iou_paired([a], [b])[0])


# ------------------------------------------------------------------------------------ average precision


def average_precision(
    ranked_pred: Any, gt: Any, iou_thresholds: Sequence[float] = MAP_IOU_THRESHOLDS
) -> np.ndarray:
    """Detection AP of one query's ranked predictions, at several IoU thresholds (fractions, not %).

    Args:
        ranked_pred: (N, 2) windows, best first (already ranked and truncated).
        gt: (M, 2) ground-truth windows, M >= 1.
        iou_thresholds: (T,) thresholds; a match needs IoU >= threshold.

    Returns:
        (T,) float64 AP in [0, 1] (all zeros when N == 0). See the module docstring for the matching
        and interpolation rules.
    """
    thr = np.asarray(iou_thresholds, dtype=np.float64)  # (T,)
    ious = temporal_iou_matrix(ranked_pred, gt)  # (N, M)
    num_pred, num_gt = ious.shape
    if num_gt == 0:
        raise ValueError("average precision needs at least one ground-truth window")
    if num_pred == 0:
        return np.zeros(len(thr))
    matched = np.zeros((len(thr), num_gt), dtype=bool)  # (T, M) ground truth already taken
    tp = np.zeros((len(thr), num_pred), dtype=bool)  # (T, N)
    gt_index = np.arange(num_gt)
    for i in range(num_pred):
        # Visit ground truth by IoU, highest first; ties: later listed first.
        order = np.lexsort((-gt_index, -ious[i]))  # (M,)
        ok = (ious[i, order][None, :] >= thr[:, None]) & ~matched[:, order]  # (T, M)
        hit = ok.any(axis=1)  # (T,)
        first = order[ok.argmax(axis=1)]  # (T,) the window taken where hit
        matched[hit, first[hit]] = True
        tp[:, i] = hit
    cum_tp = np.cumsum(tp, axis=1).astype(np.float64)  # (T, N)
    precision = cum_tp / np.arange(1, num_pred + 1)  # (T, N); every rank is a TP or an FP
    recall = cum_tp / float(num_gt)  # (T, N)
    ap = np.zeros(len(thr))
    for k in range(len(thr)):
        # Padded as in VOC 2011+: recall from 0 to 1, precision 0 beyond the last rank; the envelope is
        # the best precision at this rank or any later one. One 1-D numpy.sum per threshold over the
        # ranks where recall grows, so that the float64 result is the reference's to the last bit.
        rec = np.concatenate(([0.0], recall[k], [1.0]))
        prec = np.concatenate(([0.0], precision[k], [0.0]))
        prec = np.maximum.accumulate(prec[::-1])[::-1]
        steps = np.flatnonzero(rec[1:] != rec[:-1]) + 1
        ap[k] = np.sum((rec[steps] - rec[steps - 1]) * prec[steps])
    return ap


# ------------------------------------------------------------------------------------- validation


def _check_qid(record: Mapping, where: str) -> Any:
    if QID not in record:
        raise EvalDataError(f"{where}: missing '{QID}'")
    qid = record[QID]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise EvalDataError(f"{where}: '{QID}' must be an int or a string, got {qid!r}")
    return qid


def _check_windows(raw: Any, width: int, where: str, field: str) -> np.ndarray:
    """Validate a list of windows; return (K, width) float64 (width 2: start, end; 3: plus score)."""
    if not isinstance(raw, (list, tuple)):
        raise EvalDataError(f"{where}: '{field}' must be a list of windows, got {type(raw).__name__}")
    out = np.zeros((len(raw), width), dtype=np.float64)
    for k, w in enumerate(raw):
        shape = "[start_s, end_s, score]" if width == 3 else "[start_s, end_s]"
        if not isinstance(w, (list, tuple)) or len(w) != width:
            raise EvalDataError(f"{where}: {field}[{k}] must be {shape}, got {w!r}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in w):
            raise EvalDataError(f"{where}: {field}[{k}] must hold numbers, got {w!r}")
        vals = [float(v) for v in w]
        if not all(math.isfinite(v) for v in vals):
            raise EvalDataError(f"{where}: {field}[{k}] must hold finite numbers, got {w!r}")
        if vals[1] < vals[0]:
            raise EvalDataError(f"{where}: {field}[{k}] ends before it starts: {w!r}")
        out[k] = vals
    return out


def _index_annotations(annotations: Iterable[Mapping]) -> dict[Any, tuple[np.ndarray, Any]]:
    by_qid: dict[Any, tuple[np.ndarray, Any]] = {}
    for n, rec in enumerate(annotations):
        where = f"annotation #{n}"
        if not isinstance(rec, Mapping):
            raise EvalDataError(f"{where}: expected a dict, got {type(rec).__name__}")
        qid = _check_qid(rec, where)
        where = f"annotation #{n} (qid {qid!r})"
        if qid in by_qid:
            raise EvalDataError(f"{where}: qid appears twice in the annotations")
        if GT_WINDOWS not in rec:
            raise EvalDataError(f"{where}: missing '{GT_WINDOWS}'")
        windows = _check_windows(rec[GT_WINDOWS], 2, where, GT_WINDOWS)
        if len(windows) == 0:
            raise EvalDataError(f"{where}: '{GT_WINDOWS}' is empty; every query needs a ground-truth window")
        by_qid[qid] = (windows, rec.get(VID))
    if not by_qid:
        raise EvalDataError("no annotations to evaluate against")
    return by_qid


def _index_predictions(predictions: Iterable[Mapping], gt: Mapping[Any, tuple[np.ndarray, Any]]
                       ) -> dict[Any, np.ndarray]:
    by_qid: dict[Any, np.ndarray] = {}
    for n, rec in enumerate(predictions):
        where = f"prediction #{n}"
        if not isinstance(rec, Mapping):
            raise EvalDataError(f"{where}: expected a dict, got {type(rec).__name__}")
        qid = _check_qid(rec, where)
        where = f"prediction #{n} (qid {qid!r})"
        if qid in by_qid:
            raise EvalDataError(f"{where}: qid appears twice in the predictions")
        if qid not in gt:
            other = str(qid) if isinstance(qid, int) else (int(qid) if qid.lstrip("-").isdigit() else None)
            hint = f" (the annotations do have {other!r}: int and str qids differ)" if other in gt else ""
            raise EvalDataError(f"{where}: qid not in the annotations{hint}")
        gt_vid = gt[qid][1]
        if gt_vid is not None and rec.get(VID) is not None and rec[VID] != gt_vid:
            raise EvalDataError(f"{where}: vid {rec[VID]!r} differs from the annotation's {gt_vid!r}")
        if PRED_WINDOWS not in rec:
            raise EvalDataError(f"{where}: missing '{PRED_WINDOWS}'")
        by_qid[qid] = _check_windows(rec[PRED_WINDOWS], 3, where, PRED_WINDOWS)
    return by_qid


def _rank(pred: np.ndarray, max_predictions: int | None, sort_by_score: bool) -> tuple[np.ndarray, np.ndarray]:
    """(K, 3) windows with scores -> (top-1 window (min(K, 1), 3), ranked windows (min(K, max), 3)).

    With ``sort_by_score`` both come from the list sorted by score (stable). Without it, as in the
    reference: the top-1 is the first listed window, and the first ``max_predictions`` listed are
    sorted by score (stable) for AP.
    """
    if sort_by_score:
        pred = pred[np.argsort(-pred[:, 2], kind="stable")]
        ranked = pred[:max_predictions] if max_predictions is not None else pred
        return ranked[:1], ranked
    kept = pred[:max_predictions] if max_predictions is not None else pred
    return pred[:1], kept[np.argsort(-kept[:, 2], kind="stable")]


def _top1_iou(top1: np.ndarray, gt: np.ndarray) -> float:
    """The query's R1 IoU: hull IoU of the top-1 window with the ground-truth window of highest sum IoU.

    The first listed ground-truth window wins a tie. 0 for a query without predictions.
    """
    if len(top1) == 0:
        return 0.0
    best = int(np.argmax(temporal_iou_matrix(top1, gt)[0]))
    return float(temporal_iou_paired(top1[:, :2], gt[best : best + 1])[0])


# --------------------------------------------------------------------------------------- evaluate


def evaluate(
    predictions: Iterable[Mapping],
    annotations: Iterable[Mapping],
    *,
    max_predictions: int | None = MAX_PREDICTIONS,
    sort_by_score: bool = True,
    r1_iou_thresholds: Sequence[float] = R1_IOU_THRESHOLDS,
) -> dict[str, float]:
    """Moment-retrieval metrics of ``predictions`` against ``annotations`` (see the module docstring).

    Args:
        predictions: records with ``qid`` and ``pred_relevant_windows`` ``[[start_s, end_s, score], ...]``
            (``vid``, if present on both sides, must agree). Annotated qids without a record are misses.
        annotations: records with ``qid`` and a non-empty ``relevant_windows`` ``[[start_s, end_s], ...]``.
        max_predictions: windows per query that count (10 in the reference); None keeps all.
        sort_by_score: rank by score before taking the top-1 and the first ``max_predictions``
            (default); False takes them in listed order, exactly as the reference does.
        r1_iou_thresholds: the t of the ``R1@t`` entries (the reference prints 0.5, 0.55, ..., 0.95).

    Returns:
        Flat dict, percentages in [0, 100] unless noted:
        ``R1@0.3``, ``R1@0.5``, ``R1@0.7`` (by default), ``mIoU``, ``top1_overlap``; ``mAP`` (mean over
        0.5:0.05:0.95),
        ``mAP@0.5``, ``mAP@0.55``, ..., ``mAP@0.95``; ``mAP_short``, ``mAP_middle``, ``mAP_long`` (NaN
        when the bucket is empty); counts (as floats): ``num_queries``, ``num_queries_short``,
        ``num_queries_middle``, ``num_queries_long``, ``num_queries_without_predictions``.

    Raises:
        EvalDataError (a ValueError): malformed or inconsistent records (duplicate qids, a prediction
            for an unknown qid, a window ending before it starts, non-finite numbers ...).
    """
    if max_predictions is not None and max_predictions < 1:
        raise ValueError(f"max_predictions must be >= 1 or None, got {max_predictions}")
    gt = _index_annotations(annotations)
    preds = _index_predictions(predictions, gt)
    # The order of the float64 sums over queries: the predictions' order, then queries without a line.
    qids = list(preds) + [q for q in gt if q not in preds]
    empty = np.zeros((0, 3))
    top1, ranked = {}, {}
    for q in qids:
        top1[q], ranked[q] = _rank(preds.get(q, empty), max_predictions, sort_by_score)

    top1_iou = np.array([_top1_iou(top1[q], gt[q][0]) for q in qids])  # (Q,)
    out: dict[str, float] = {}
    for t in r1_iou_thresholds:
        out[f"R1@{_thr_name(t)}"] = 100.0 * float(np.mean(top1_iou >= t))
    out["mIoU"] = 100.0 * float(top1_iou.mean())
    out["top1_overlap"] = 100.0 * float(np.mean(top1_iou > 0))

    ap = np.stack([average_precision(ranked[q], gt[q][0]) for q in qids])  # (Q, T)
    ap_per_thr = ap.mean(axis=0)  # (T,)
    out["mAP"] = 100.0 * float(ap_per_thr.mean())
    for t, v in zip(MAP_IOU_THRESHOLDS, ap_per_thr):
        out[f"mAP@{_thr_name(t)}"] = 100.0 * float(v)

    for name, (lo, hi) in LENGTH_BUCKETS_S.items():
        bucket_ap = []
        for q in qids:
            windows = gt[q][0]
            length_s = windows[:, 1] - windows[:, 0]
            kept = windows[(length_s > lo) & (length_s <= hi)]
            if len(kept):
                bucket_ap.append(average_precision(ranked[q], kept))
        # Mean over thresholds of the mean over queries (the reference's order of the two means).
        out[f"mAP_{name}"] = 100.0 * float(np.stack(bucket_ap).mean(axis=0).mean()) if bucket_ap else math.nan
        out[f"num_queries_{name}"] = float(len(bucket_ap))

    out["num_queries"] = float(len(qids))
    out["num_queries_without_predictions"] = float(sum(1 for q in qids if len(ranked[q]) == 0))
    return out
