"""Speech and on-screen text benchmark with exact ground truth, generated offline (``python -m benchmarks speech``).

Each generated talk is a moving picture with sentences spoken by espeak-ng at known times (``speechgen``) and
slides of text drawn onto the frames for known windows; each generated podcast is audio only. Queries quote a
sentence, paraphrase it, or ask for a slide's text. The library is indexed with the bundled models (speech and
OCR on) and every query is asked twice: inside its own video (per video) and across the whole library (library
wide: the top moment must be in the right file). Reported: R1@0.5 per kind, the median error of the quoted
phrases' start and end against where the voice is, and the speech recogniser's real-time factor per core
(``python -m benchmarks asr``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.speechgen import RATE, draw_text, speech_track, write_media

# (sentence as spoken, a paraphrase asked of it)
SENTENCES = [
    ("The quarterly budget was approved by the committee on Tuesday.", "when did the committee approve the budget"),
    ("Our new office in Lisbon opens next spring.", "when will the Portugal branch open"),
    ("Please remember to submit your expense reports by Friday.", "deadline for handing in expenses"),
    ("The server outage lasted about forty minutes last night.", "how long was the system down"),
    ("We hired twelve engineers in the last quarter.", "how many developers joined the team"),
    ("Customer satisfaction rose to ninety two percent this year.", "how happy are our clients"),
    ("The marketing campaign will launch in three weeks.", "start date of the advertising push"),
    ("Tomatoes need at least six hours of sunlight every day.", "how much sun do tomato plants need"),
    ("Water your herbs early in the morning before it gets hot.", "best time of day to water plants"),
    ("The museum is closed on Mondays for maintenance.", "which day can you not visit the gallery"),
    ("Our flight to Tokyo was delayed by two hours.", "the plane to Japan was late"),
    ("The recipe calls for two cups of flour and one egg.", "ingredients needed for the dough"),
    ("Heavy rain is expected across the north this weekend.", "weather forecast for the coming days"),
    ("The library extended its opening hours during exams.", "longer study hall times"),
    ("Electric cars now make up a third of new sales.", "share of battery vehicles sold"),
    ("The bridge will be closed for repairs until August.", "when does the road crossing reopen"),
]
SLIDES = [
    ("Agenda for today", "agenda slide"),
    ("Quarterly results 2026", "quarterly results"),
    ("Hiring plan", "the hiring plan"),
    ("Questions and answers", "time for questions"),
    ("Thank you", "thank you slide"),
    ("Product roadmap", "the product roadmap"),
    ("Safety briefing", "safety briefing"),
    ("Team offsite in Berlin", "offsite in Berlin"),
]


def generate(work_dir: Path, *, n_talks: int = 4, n_podcasts: int = 2, seconds: float = 90.0, seed: int = 7,
             fps: float = 2.0) -> list[dict]:
    """Write the library under ``work_dir/lib`` (reused when present); return the queries with their truth."""
    rng = np.random.default_rng(seed)
    lib = work_dir / "lib"
    truth_file = work_dir / "truth.json"
    if truth_file.exists():
        return json.loads(truth_file.read_text())
    lib.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(SENTENCES))
    slide_order = rng.permutation(len(SLIDES))
    queries: list[dict] = []
    per = 3
    for v in range(n_talks + n_podcasts):
        podcast = v >= n_talks
        name = f"podcast{v - n_talks:02d}" if podcast else f"talk{v:02d}"
        picks = [SENTENCES[order[(v * per + k) % len(SENTENCES)]] for k in range(per)]
        slots = seconds / per
        said_at = [k * slots + float(rng.uniform(2.0, slots - 12.0)) for k in range(per)]
        noise = (0.003 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
        audio, said = speech_track(seconds, [(t, s) for t, (s, _) in zip(said_at, picks)], bed=noise)
        for (sentence, para), s in zip(picks, said):
            words = sentence.rstrip(".").split()
            quoted = " ".join(words[: max(4, len(words) - 2)])  # a quoted phrase: most of the sentence
            for kind, q in (("quoted", f'"{quoted}"'), ("paraphrase", para)):
                queries.append({"qid": len(queries), "kind": kind, "query": q, "vid": name,
                                "window": [s.start_s, s.end_s], "said": sentence})
        slides = []
        if not podcast:
            k0 = v * 2
            for j in range(2):
                text, q = SLIDES[slide_order[(k0 + j) % len(SLIDES)]]
                a = float(rng.uniform(j * seconds / 2 + 5.0, (j + 1) * seconds / 2 - 25.0))
                slides.append((a, a + 15.0, text))
                queries.append({"qid": len(queries), "kind": "text", "query": q, "vid": name, "window": [a, a + 15.0],
                                "said": text})

        def frame(i: int, t: float, slides=slides) -> np.ndarray:
            base = np.full((360, 640, 3), 0, np.uint8)
            base[..., 0] = (np.arange(640)[None, :] + 7 * i) % 256
            base[..., 1] = np.arange(360)[:, None] % 256
            for a, b, text in slides:
                if a <= t < b:
                    return draw_text(base, text, size=36)
            return base

        write_media(lib / f"{name}{'.m4a' if podcast else '.mp4'}", audio, duration_s=seconds,
                    fps=0 if podcast else fps, width=640, height=360, frame=None if podcast else frame)
    truth_file.write_text(json.dumps(queries, indent=1))
    return queries


def _iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def run(out: Path, *, work_dir: Path, n_talks: int = 4, n_podcasts: int = 2, seconds: float = 90.0,
        seed: int = 7) -> dict:
    """Generate, index (speech and OCR on), ask every query per video and library-wide; write JSON to ``out``."""
    import ray_vlm
    from ray_vlm.core.config import IndexConfig

    work_dir.mkdir(parents=True, exist_ok=True)
    queries = generate(work_dir, n_talks=n_talks, n_podcasts=n_podcasts, seconds=seconds, seed=seed)
    store = work_dir / "store"
    cfg = IndexConfig.model_validate({"speech": {"enabled": True}, "ocr": {"enabled": True}})
    t0 = time.perf_counter()
    summary = ray_vlm.index_archive([str(work_dir / "lib")], str(store), cfg)
    index_s = time.perf_counter() - t0
    rows = []
    for q in queries:
        track = "text" if q["kind"] == "text" else "speech"
        win = (float(q["window"][0]), float(q["window"][1]))
        res = {}
        for scope, video in (("per_video", q["vid"]), ("library", None)):
            top = ray_vlm.search(str(store), q["query"], top_k=1, video=video)
            hit = top[0] if top else None
            right_file = hit is not None and Path(hit.uri).stem == q["vid"]
            iou = _iou((hit.start_s, hit.end_s), win) if right_file and hit is not None else 0.0
            res[scope] = {"iou": iou, "start_s": hit.start_s if hit else None, "end_s": hit.end_s if hit else None,
                          "tracks": list(hit.tracks) if hit else [], "right_file": right_file}
        rows.append({**q, "track": track, **res})
    report: dict = {"setup": {"talks": n_talks, "podcasts": n_podcasts, "seconds": seconds, "seed": seed,
                              "queries": len(rows), "index_wall_s": round(index_s, 1),
                              "stage_cpu_s": summary.stage_cpu_s},
                    "results": {}, "queries": rows}
    for kind in ("quoted", "paraphrase", "text"):
        sel = [r for r in rows if r["kind"] == kind]
        report["results"][kind] = {
            scope: round(100.0 * float(np.mean([r[scope]["iou"] >= 0.5 for r in sel])), 1) if sel else None
            for scope in ("per_video", "library")} | {"n": len(sel)}
    errs = [abs(r["per_video"][k] - w) for r in rows if r["kind"] == "quoted" and r["per_video"]["right_file"]
            for k, w in (("start_s", r["window"][0]), ("end_s", r["window"][1]))]
    report["results"]["quoted_boundary_error_median_s"] = round(float(np.median(errs)), 3) if errs else None
    out.write_text(json.dumps(report, indent=1))
    return report


def asr_rtf(seconds_of_speech: float = 60.0, threads: int = 1) -> dict:
    """CPU seconds per second of audio of the bundled recogniser (tiny.en int8) on ``threads`` threads, over
    espeak-ng sentences with short pauses (the VAD's regions, as the index job gives them)."""
    import resource

    from ray_vlm.models.speech import SileroVad, SpeechRecognizer, speech_regions

    sentences = [s for s, _ in SENTENCES]
    track, t = [], 0.5
    while t < seconds_of_speech:
        track.append((t, sentences[len(track) % len(sentences)]))
        t += 4.5
    audio, _ = speech_track(seconds_of_speech + 5.0, track)
    asr = SpeechRecognizer(threads=threads)
    vad = SileroVad()
    regions = speech_regions(vad.probs(audio), total_s=audio.size / RATE)
    asr.transcribe(audio[: 5 * RATE])  # warm-up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    words = 0
    for a, b in regions:
        for u in asr.transcribe(audio[int(a * RATE): int(b * RATE)], offset_s=a):
            words += len(u.words)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    dur = audio.size / RATE
    return {"audio_s": round(dur, 1), "threads": threads, "cpu_s": round(cpu, 2),
            "wall_s": round(time.perf_counter() - w0, 2), "cpu_per_audio_s": round(cpu / dur, 3), "words": words}


def format_table(report: dict) -> str:
    lines = ["| queries | n | R1@0.5 per video | R1@0.5 library-wide |", "|---|---|---|---|"]
    for kind in ("quoted", "paraphrase", "text"):
        r = report["results"][kind]
        lines.append(f"| {kind} | {r['n']} | {r['per_video']} | {r['library']} |")
    lines.append(f"median start/end error of quoted phrases: {report['results']['quoted_boundary_error_median_s']} s")
    return "\n".join(lines)
