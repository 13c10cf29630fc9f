"""Regenerate the QVHighlights-style fixture in this folder (seeded; the committed files are the truth).

    /work/main/.venv/bin/python tests/data/eval/make_fixture.py

Writes ``annotations.jsonl`` (``qid``, ``query``, ``vid``, ``duration``, ``relevant_windows``) and
``predictions.jsonl`` (``qid``, ``query``, ``vid``, ``pred_relevant_windows``) for 80 synthetic queries over
150-s clips. Windows sit mostly on the benchmark's 2-s grid (so IoUs land exactly on thresholds such as
0.5 and 0.7), some at 0.1-s precision. Predictions include lists longer than 10, lists not sorted by
score, tied scores, exact duplicates and zero-length windows; ground-truth windows never have zero
length (the reference evaluation divides 0 by 0 there). ``reference_metrics.json`` holds what the
reference evaluation printed for these files; see the test module for how it was obtained.
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


if __name__ == "__main__":
    main()
