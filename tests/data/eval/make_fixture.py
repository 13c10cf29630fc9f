"""Regenerate the QVHighlights-style fixture in this folder (seeded; the committed files are the truth).

    /work/main/.venv/bin/python tests/data/eval/make_fixture.py

Writes ``annotations.jsonl`` (``qid``, ``query``, ``vid``, ``duration``, ``relevant_windows``) and
``predictions.jsonl`` (``qid``, ``query``, ``vid``, ``pred_relevant_windows``) for 80 synthetic queries over
150-s clips. Windows sit mostly on the benchmark's 2-s grid (so IoUs land exactly on thresholds such as
0.5 and 0.7), some at 0.1-s precision. Predictions include lists longer than 10, lists not sorted by
score, tied scores, exact duplicates and zero-length windows; ground-truth windows never have zero
length (the reference evaluation divides 0 by 0 there). ``reference_metrics.json`` holds what the
reference evaluation printed for these files; see the test module for how it was obtained.

Also writes ``threshold_annotations.jsonl`` and ``threshold_predictions.jsonl`` (29 hand-picked queries
whose IoUs land exactly on thresholds, see :data:`THRESHOLD_PAIRS`); the reference's outputs for them are
in ``threshold_reference_metrics.json``.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CLIP_S = 150


def _gt_windows(rng: random.Random) -> list[list[float]]:
    n = rng.choice([1, 1, 1, 2, 2, 3])
    kind = rng.choice(["short", "middle", "long", "mixed"])
    windows: list[list[float]] = []
    t = rng.randrange(0, 20, 2)
    for _ in range(n):
        k = kind if kind != "mixed" else rng.choice(["short", "middle", "long"])
        length = {"short": rng.randrange(2, 11, 2), "middle": rng.randrange(12, 31, 2),
                  "long": rng.randrange(32, 91, 2)}[k]
        if t + length > CLIP_S:
            break
        windows.append([float(t), float(t + length)])
        t += length + rng.randrange(2, 30, 2)
    return windows or [[0.0, 8.0]]


def _jitter(rng: random.Random, w: list[float], fine: bool) -> list[float]:
    step = 0.1 if fine else 2.0
    s = w[0] + step * rng.randint(-6, 6)
    e = w[1] + step * rng.randint(-6, 6)
    s, e = max(0.0, min(s, float(CLIP_S))), max(0.0, min(e, float(CLIP_S)))
    if e < s:
        s, e = e, s
    return [round(s, 1), round(e, 1)]


def _predictions(rng: random.Random, gt: list[list[float]]) -> list[list[float]]:
    fine = rng.random() < 0.3
    n = rng.choice([1, 3, 5, 10, 12, 14])
    wins = []
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            wins.append(_jitter(rng, rng.choice(gt), fine))
        elif r < 0.65:
            wins.append(list(rng.choice(gt)))  # exact hit
        elif r < 0.72:
            p = float(rng.randrange(0, CLIP_S, 2))
            wins.append([p, p])  # zero length
        else:
            s = float(rng.randrange(0, CLIP_S - 2, 2))
            wins.append([s, float(min(CLIP_S, s + rng.randrange(2, 60, 2)))])
    scores = [round(rng.random(), 4) for _ in wins]
    if rng.random() < 0.3:  # tied scores
        scores[rng.randrange(len(scores))] = scores[0]
    out = [[s, e, sc] for (s, e), sc in zip(wins, scores)]
    if rng.random() < 0.2:  # an exact duplicate of the best window
        out.append(list(max(out, key=lambda w: w[2])))
    if rng.random() < 0.75:
        out.sort(key=lambda w: -w[2])
    return out


def main() -> None:
    rng = random.Random(20240601)
    anns, preds = [], []
    for i in range(78):
        qid = 1000 + i
        vid = f"vid{i:03d}_{CLIP_S}"
        gt = _gt_windows(rng)
        anns.append({"qid": qid, "query": f"synthetic query {i}", "vid": vid, "duration": CLIP_S,
                     "relevant_windows": gt})
        preds.append({"qid": qid, "query": f"synthetic query {i}", "vid": vid,
                      "pred_relevant_windows": _predictions(rng, gt)})
    # Two ground-truth windows overlapping the first prediction equally (IoU 9/11 each): which one it
    # takes decides whether the second prediction is a hit at high thresholds.
    anns.append({"qid": 2000, "query": "tie", "vid": "tie_150", "duration": CLIP_S,
                 "relevant_windows": [[0.0, 10.0], [2.0, 12.0]]})
    preds.append({"qid": 2000, "query": "tie", "vid": "tie_150",
                  "pred_relevant_windows": [[1.0, 11.0, 0.9], [0.0, 10.0, 0.8]]})
    # Prediction IoUs exactly on the thresholds 0.5 and 0.7 (2-s grid arithmetic is exact).
    anns.append({"qid": 2001, "query": "boundary", "vid": "boundary_150", "duration": CLIP_S,
                 "relevant_windows": [[20.0, 40.0]]})
    preds.append({"qid": 2001, "query": "boundary", "vid": "boundary_150",
                  "pred_relevant_windows": [[20.0, 34.0, 0.7], [30.0, 40.0, 0.6], [26.0, 40.0, 0.5]]})
    with open(HERE / "annotations.jsonl", "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in anns)
    with open(HERE / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)
    write_threshold_fixture()


# Top-1 windows at 0.1-s precision whose exact IoU with the ground truth is a threshold t, as
# (t, prediction, ground truth). The reference's R1 divides by the hull, max(end) - min(start); its AP
# (and its choice of the ground-truth window R1 compares with) by len_a + len_b - inter. In floating
# point the two land on either side of t; the comments say which one reaches t (>= t).
THRESHOLD_PAIRS: list[tuple[float, list[float], list[float]]] = [
    (0.5, [8.6, 60.2], [18.7, 44.5]),  # hull 0.5, sum 0.49999999999999994 (quoted in the issue)
    (0.75, [2.6, 8.6], [3.8, 9.0]),  # hull 0.7499999999999999, sum 0.75 (quoted in the issue)
    (0.3, [79.7, 114.5], [32.9, 148.9]),  # hull only
    (0.3, [107.2, 122.7], [112.2, 142.2]),  # both (just above)
    (0.3, [85.0, 128.0], [114.7, 127.6]),  # neither
    (0.5, [8.9, 147.6], [8.2, 78.6]),  # sum only
    (0.5, [61.9, 75.4], [55.8, 71.7]),  # both, exactly 0.5
    (0.5, [18.0, 46.3], [25.8, 59.0]),  # neither
    (0.7, [40.6, 120.4], [27.4, 105.7]),  # hull only
    (0.7, [42.4, 82.3], [38.8, 95.8]),  # hull only
    (0.7, [18.7, 76.1], [11.2, 93.2]),  # sum only
    (0.7, [23.4, 94.0], [33.1, 110.4]),  # both, exactly 0.7
    (0.7, [77.2, 83.5], [77.9, 85.2]),  # neither
    (0.55, [63.6, 93.3], [48.3, 102.3]),  # sum only
    (0.6, [27.6, 131.1], [61.8, 143.1]),  # hull only
    (0.65, [24.0, 80.0], [42.4, 78.8]),  # hull only
    (0.75, [3.4, 26.1], [1.3, 22.0]),  # hull only
    (0.75, [34.8, 86.8], [43.9, 92.0]),  # sum only
    (0.8, [11.8, 101.4], [5.8, 117.8]),  # hull only
    (0.8, [3.4, 99.8], [2.7, 123.2]),  # sum only
    (0.85, [1.9, 27.4], [0.3, 30.3]),  # both, exactly 0.85
    (0.9, [69.1, 130.1], [71.2, 126.1]),  # neither
    (0.95, [6.5, 145.2], [0.4, 146.4]),  # both, exactly 0.95
]


def write_threshold_fixture() -> None:
    """``threshold_annotations.jsonl`` / ``threshold_predictions.jsonl``: IoUs exactly on thresholds.

    Fewer than 50 queries, so that the reference (which averages AP over queries in the order its
    worker pool returns them, in chunks of 50) is deterministic to the last bit. Every prediction list is
    sorted by strictly decreasing score, so ranking by score and taking the listed order agree.
    """
    anns, preds = [], []

    def add(name: str, gt: list[list[float]], windows: list[list[float]]) -> None:
        qid = 3000 + len(anns)
        vid = f"{name}_{CLIP_S}"
        scores = [round(0.95 - 0.05 * k, 2) for k in range(len(windows))]
        anns.append({"qid": qid, "query": name, "vid": vid, "duration": CLIP_S, "relevant_windows": gt})
        preds.append({"qid": qid, "query": name, "vid": vid,
                      "pred_relevant_windows": [[s, e, sc] for (s, e), sc in zip(windows, scores)]})

    for k, (t, p, g) in enumerate(THRESHOLD_PAIRS):
        add(f"iou {t:g} #{k}", [g], [p])
    # The top-1 overlaps two ground-truth windows; R1 compares it with the one it overlaps most.
    add("two windows", [[6.7, 50.2], [60.0, 80.0]], [[19.1, 68.9]])  # hull 0.5, sum 0.49999999999999994
    # AP with recall in steps of 1/3: misses, edge IoUs, an exact duplicate, a zero-length window.
    add("ap thirds", [[18.7, 44.5], [3.8, 9.0], [100.0, 130.0]],
        [[50.0, 60.0], [8.6, 60.2], [2.6, 8.6], [100.0, 130.0], [100.0, 130.0], [18.7, 44.5], [70.0, 70.0],
         [0.0, 5.0]])
    # Twelve windows: the last two (exact hits) are beyond the ten that count.
    add("truncated", [[0.3, 30.3], [40.0, 50.0], [61.8, 143.1]],
        [[1.9, 27.4], [27.6, 131.1], [140.0, 150.0], [41.0, 50.0], [0.0, 1.0], [2.0, 3.0], [4.0, 5.0],
         [6.0, 7.0], [8.0, 9.0], [90.0, 92.0], [40.0, 50.0], [0.3, 30.3]])
    # Windows nominally 10 s / 30 s long whose float64 length is just above or below the bucket bound
    # (16.1 - 6.1 > 10, 16.4 - 6.4 < 10, 32.2 - 2.2 > 30, 32.3 - 2.3 < 30).
    add("bounds short", [[6.1, 16.1], [16.4, 26.4]], [[6.1, 16.1], [18.0, 26.4], [16.4, 26.4]])
    add("bounds middle", [[2.2, 32.2], [62.3, 92.3]], [[62.3, 92.3], [2.2, 30.0], [2.2, 32.2]])
    add("bounds mixed", [[6.4, 16.4], [2.3, 32.3], [40.0, 140.0]],
        [[2.3, 32.3], [40.0, 120.0], [6.4, 16.4], [6.9, 16.9]])
    with open(HERE / "threshold_annotations.jsonl", "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in anns)
    with open(HERE / "threshold_predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)


if __name__ == "__main__":
    main()
