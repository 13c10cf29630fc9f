"""Evaluation runs: a QVHighlights-format annotation file against a token store, through the product's query path.

Per video (the annotation names the video) and library-wide (the best moments of the whole library), scored with
``ray_vlm.eval.metrics`` (bit for bit the reference evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ray_vlm.eval.metrics import evaluate, load_jsonl
from ray_vlm.query import grounding as G
from ray_vlm.query.searcher import QueryError, RetrievalParams, get_searcher, method_params


def evaluate_store(store: str, annotations, *, top_k: int = 10, method: str = "fused",
                   params: G.GroundingParams | None = None, storage_options: dict | None = None, encoder=None,
                   seed: int = 0, return_predictions: bool = False,
                   retrieval: RetrievalParams | None = None) -> dict:
    """Moment-retrieval metrics of a store against QVHighlights-format annotations.

    Two tasks per annotated query, both through a ``Searcher`` (the product query path):

    * per video: ground the query in the annotation's ``vid`` (a file-name stem or a video_id) and predict
      ``[[start_s, end_s, score], ...]`` (top ``top_k``);
    * library-wide: the ``top_k`` best moments of the whole library for each distinct query text (retrieve,
      then ground); a moment counts only in the right video (every annotated window of that text, in any
      video, is a true window). The videos are laid end to end on one library timeline, so
      ``ray_vlm.eval.metrics.evaluate`` scores this task too (``R1@0.5``: the library's top moment overlaps a true
      window of the right video with IoU >= 0.5).

    Args:
        store: token store URI.
        annotations: a JSONL path / URI, or the records themselves.
        top_k: predictions per query.
        method: "fused" (content + context tokens), "content" (global + grid), "global", "context", or the
            baselines "random" (random windows, seeded) and "whole" (the whole video).
        params: base grounding params (channels are set by ``method``).
        seed: seed of the random baseline.
        return_predictions: also return the prediction records.
        retrieval: retrieval knobs of the library-wide task (e.g. ``whole_below_frames=0`` to force the ANN
            stage on a small library).

    Returns:
        ``{"method", "num_queries", "per_video": {metric: value}, "library": {metric: value},
        "per_video_R1@0.5", "library_R1@0.5"}`` (+ ``"predictions": {"per_video": [...], "library": [...]}``).
        Metrics are percentages as ``ray_vlm.eval.metrics.evaluate`` returns them.
    """
    # Long: both tasks share the library timeline and the predictions; split, they would pass half a dozen
    # values around.
    records = load_jsonl(annotations) if isinstance(annotations, (str, bytes)) or hasattr(annotations, "__fspath__") \
        else [dict(r) for r in annotations]
    if not records:
        raise QueryError("no annotations to evaluate")
    gp = method_params(method, params)
    searcher = get_searcher(store, storage_options, encoder=encoder if gp is not None else None,
                            params=None if gp is None else replace(gp, max_moments=max(top_k, 1)),
                            retrieval=retrieval)
    videos = {r["video_id"]: r for r in searcher.videos()}
    vid_of = {}
    for r in records:
        ids = searcher.resolve_video(str(r["vid"]))
        if len(ids) > 1:
            raise QueryError(f"annotation vid {r['vid']!r} names {len(ids)} videos in the store")
        vid_of[r["qid"]] = ids[0]
    durations = {v: searcher.duration_s(v) for v in videos}
    # Library timeline: videos end to end with a gap, so windows of different videos never overlap.
    offset, t = {}, 0.0
    for v in sorted(videos):
        offset[v] = t
        t += durations[v] + 1000.0
    rng = np.random.default_rng(seed)

    texts = sorted({str(r["query"]) for r in records})
    per_video_preds, lib_preds = [], []
    if gp is not None:
        qv = searcher.encode(texts)
        text_row = {x: i for i, x in enumerate(texts)}
        by_vid: dict[str, list[dict]] = {}
        for r in records:  # per video: score each video once for all of its queries
            by_vid.setdefault(vid_of[r["qid"]], []).append(r)
        for vid, recs in by_vid.items():
            rows = sorted({text_row[str(r["query"])] for r in recs})
            res = searcher.search_vectors(qv[rows], top_k=top_k, video=vid)
            got = dict(zip(rows, res))
            for r in recs:
                ms = got[text_row[str(r["query"])]][:top_k]
                per_video_preds.append({"qid": r["qid"], "vid": r["vid"],
                                        "pred_relevant_windows": [[m.start_s, m.end_s, m.score] for m in ms]})
        lib_res = searcher.search_vectors(qv, top_k=top_k)
        lib_moments = {x: [(m.video_id, m.start_s, m.end_s, m.score) for m in lib_res[text_row[x]][:top_k]]
                       for x in texts}
    else:
        vids = sorted(v for v in videos if durations[v] > 0)
        for r in records:
            vid = vid_of[r["qid"]]
            per_video_preds.append({"qid": r["qid"], "vid": r["vid"], "pred_relevant_windows": [
                [s, e, sc] for _, s, e, sc in _baseline(method, [vid], durations, rng, top_k)]})
        lib_moments = {x: _baseline(method, vids, durations, rng, top_k) for x in texts}

    for x in texts:
        lib_preds.append({"qid": f"library:{x}", "pred_relevant_windows": [
            [offset[v] + s, offset[v] + e, sc] for v, s, e, sc in lib_moments[x]]})
    lib_gt: dict[str, list] = {}
    for r in records:
        v = vid_of[r["qid"]]
        lib_gt.setdefault(str(r["query"]), []).extend(
            [[offset[v] + float(w[0]), offset[v] + float(w[1])] for w in r["relevant_windows"]])
    lib_ann = [{"qid": f"library:{x}", "relevant_windows": w} for x, w in lib_gt.items()]
    per_ann = [{"qid": r["qid"], "vid": r["vid"], "relevant_windows": r["relevant_windows"]} for r in records]
    pv = evaluate(per_video_preds, per_ann)
    lw = evaluate(lib_preds, lib_ann)
    out = {"method": method, "num_queries": len(records), "num_library_queries": len(texts),
           "per_video": pv, "library": lw, "per_video_R1@0.5": pv["R1@0.5"], "library_R1@0.5": lw["R1@0.5"]}
    if return_predictions:
        out["predictions"] = {"per_video": per_video_preds, "library": lib_preds}
    return out


def _baseline(method: str, vids: Sequence[str], durations: Mapping[str, float], rng, top_k: int
              ) -> list[tuple[str, float, float, float]]:
    """Moments of the random-window / whole-video baselines over ``vids``."""
    if not vids:
        return []
    if method == "whole":
        order = list(vids) if len(vids) == 1 else [vids[i] for i in rng.permutation(len(vids))]
        return [(v, 0.0, durations[v], 1.0) for v in order[:top_k]]
    out = []
    for k in range(top_k):
        v = vids[int(rng.integers(len(vids)))]
        d = durations[v]
        length = d * float(rng.uniform(0.05, 0.5))
        s = float(rng.uniform(0.0, d - length))
        out.append((v, s, s + length, 1.0 - k / (top_k + 1)))
    return out
