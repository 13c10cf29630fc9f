"""Answer "when does X happen?" over a token store, and evaluate the answers against annotations.

``search`` embeds the query with the store's own encoder, grounds it in every video (``ray_vlm.grounding``:
content + context-token scores, calibration, moment extraction) and ranks the moments of the whole library by
their calibrated score. The store's tokens are read and decoded once per process per store version
(``load_library``: cache keyed by store URI + manifest version), so a second query costs only the scoring.

``evaluate_store`` runs a QVHighlights-format annotation file against a store, per video (the annotation
names the video) and library-wide (the best moments of the whole library), with ``ray_vlm.eval_metrics``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath

import numpy as np

from ray_vlm import grounding as G
from ray_vlm import schema as S

MAX_QUERY_CHARS = 1000
CALIBRATION_SAMPLE_FRAMES = 4096  # library frames the calibration centres are measured on (fixed sample)
_LIBRARY_CACHE_SIZE = 4

# Frame columns the grounder reads.
_FRAME_COLUMNS = [S.VIDEO_ID, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S, S.ENCODER, S.SPACE, S.DIM, S.TOKEN_DTYPE,
                  S.GLOBAL_TOKEN, S.GLOBAL_SCALE, S.GRID_SIZE, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_GRID_H,
                  S.PATCH_GRID_W, S.PATCH_INDEX, S.PATCH_TOKENS, S.PATCH_SCALES]


class QueryError(ValueError):
    """A query the service cannot answer as asked (empty, too long, unknown video, wrong space)."""


@dataclass(frozen=True)
class Moment:
    """One answer: ``[start_s, end_s)`` of ``video_id``; ``score`` is calibrated in [0, 1] and compares across
    videos and queries; ``z`` is the fused calibrated contrast at ``peak_s``."""

    video_id: str
    uri: str
    start_s: float
    end_s: float
    score: float
    peak_s: float
    z: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_query(text: str) -> str:
    """Validate a free-text query; return it stripped of surrounding white space."""
    if not isinstance(text, str):
        raise QueryError("the query must be a string")
    cleaned = "".join(ch for ch in text if ch.isprintable() or ch in " \t")
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        raise QueryError("the query is empty")
    if len(cleaned) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(cleaned)} characters; at most {MAX_QUERY_CHARS} are accepted")
    return cleaned


# ================================================================ the library: a store's tokens, decoded once


@dataclass
class Library:
    """Every ok/partial video of one store version, decoded for grounding.

    Attributes:
        uri, version: the store and the manifest version read.
        encoder_id, space: of the frames (one per store: the config hash pins them).
        videos: ``{video_id: VideoTokens}`` in video_id order.
        info: ``{video_id: {"uri", "duration_s", "status"}}`` for every video row (failed ones included).
        sample: ``{video_id: rows}`` the fixed sample of frames calibration is measured on.
    """

    uri: str
    version: int
    encoder_id: str
    space: str
    videos: dict[str, G.VideoTokens]
    info: dict[str, dict]
    sample: dict[str, np.ndarray]
    _units: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_frames(self) -> int:
        return sum(v.num_frames for v in self.videos.values())

    def resolve_video(self, video: str) -> list[str]:
        """Video ids matching a video_id or a file-name stem (QueryError when none)."""
        ids = [v for v, r in self.info.items() if v == video or PurePosixPath(r["uri"]).stem == video
               or PurePosixPath(r["uri"]).name == video]
        if not ids:
            raise QueryError(f"no video {video!r} in the store (give a video_id or a file name stem)")
        return sorted(ids)

    def units(self, encoder, params: G.GroundingParams) -> dict[str, float]:
        """Calibration units of this library for ``params`` (reference queries scored once, then cached)."""
        key = (encoder.spec.id, encoder.spec.revision, tuple(params.channels), params.context_tau,
               params.center_quantile, params.unit_quantile)
        with self._lock:
            if key in self._units:
                return self._units[key]
        refs = _encode(encoder, list(G.REFERENCE_QUERIES))
        units = G.channel_units(self._sample_scores(refs, params, {}), params)
        with self._lock:
            self._units[key] = units
        return units

    def _sample_scores(self, queries: np.ndarray, params: G.GroundingParams,
                       computed: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Scores of ``queries`` on the calibration sample: ``{channel: (N_sample, Q)}`` (reusing ``computed``
        full-video scores where a video was scored already)."""
        parts: dict[str, list[np.ndarray]] = {}
        for vid, rows in self.sample.items():
            if vid in computed:
                sc = {ch: s[rows] for ch, s in computed[vid].items()}
            else:
                sc = G.frame_scores(self.videos[vid].rows(rows), queries, params)
            for ch, s in sc.items():
                parts.setdefault(ch, []).append(s)
        return {ch: np.concatenate(p) for ch, p in parts.items()}

    def calibrate(self, queries: np.ndarray, params: G.GroundingParams = G.DEFAULT_PARAMS, *, encoder,
                  computed: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> G.Calibration:
        """Library-wide calibration of Q queries (centres on the fixed frame sample, units of the library)."""
        q = G._as_queries(queries)
        return G.calibration_from_scores(self._sample_scores(q, params, computed or {}),
                                         self.units(encoder, params), params)

    def ground(self, queries: np.ndarray, params: G.GroundingParams = G.DEFAULT_PARAMS, *, encoder,
               video_ids: Sequence[str] | None = None, calibration: G.Calibration | None = None
               ) -> list[list[G.GroundedMoment]]:
        """Ground Q queries in the given videos (default: all); per query, moments best first.

        ``calibration`` (from ``calibrate`` for the same queries and params) saves re-measuring it per call.
        """
        q = G._as_queries(queries)
        targets = list(self.videos) if video_ids is None else [v for v in video_ids if v in self.videos]
        scores = {vid: G.frame_scores(self.videos[vid], q, params) for vid in targets}
        calib = calibration or self.calibrate(q, params, encoder=encoder, computed=scores)
        out: list[list[G.GroundedMoment]] = [[] for _ in range(len(q))]
        for vid in targets:
            v = self.videos[vid]
            z = G.fuse(scores[vid], calib, params)  # (T, Q)
            for i in range(len(q)):
                out[i].extend(G.ground_curve(vid, v.pts_s, v.span_end_s, v.frame_index, z[:, i], params))
        for i in range(len(q)):
            out[i].sort(key=lambda m: -m.score)
        return out


_LIBRARIES: OrderedDict[tuple, Library] = OrderedDict()
_LIBRARIES_LOCK = threading.Lock()


def load_library(store: str, storage_options: dict | None = None, version: int | None = None) -> Library:
    """The store's tokens decoded for grounding, cached per process by (store URI, manifest version).

    Raises:
        QueryError: the store holds no videos.
    """
    from ray_vlm.store import TokenStore

    ts = TokenStore(store, storage_options)
    version = ts.latest_version() if version is None else int(version)
    key = (store, repr(sorted((storage_options or {}).items())), version)
    with _LIBRARIES_LOCK:
        lib = _LIBRARIES.get(key)
        if lib is not None:
            _LIBRARIES.move_to_end(key)
            return lib
    lib = _read_library(ts, version)
    with _LIBRARIES_LOCK:
        _LIBRARIES[key] = lib
        while len(_LIBRARIES) > _LIBRARY_CACHE_SIZE:
            _LIBRARIES.popitem(last=False)
    return lib


def _read_library(ts, version: int) -> Library:
    from ray_vlm.store import binary_column_values, column_to_matrix, vectors_per_row

    videos_t = ts.read_videos(version)
    if videos_t.num_rows == 0:
        raise QueryError(f"the store {ts.uri} holds no videos")
    info = {r[S.VIDEO_ID]: {"uri": r[S.URI], "duration_s": r[S.DURATION_S], "status": r[S.STATUS]}
            for r in videos_t.select([S.VIDEO_ID, S.URI, S.DURATION_S, S.STATUS]).to_pylist()}
    frames = ts.read_frames(version, columns=_FRAME_COLUMNS)
    lib = Library(ts.uri, version, "", "", {}, info, {})
    if frames.num_rows == 0:
        return lib
    lib.encoder_id = frames.column(S.ENCODER)[0].as_py()
    lib.space = frames.column(S.SPACE)[0].as_py()
    dim = int(frames.column(S.DIM)[0].as_py())
    dtype = frames.column(S.TOKEN_DTYPE)[0].as_py()
    n = frames.num_rows
    vid_col = np.asarray(frames.column(S.VIDEO_ID).to_pylist(), dtype=object)
    pts = frames.column(S.PTS_S).to_numpy()
    span = frames.column(S.SPAN_END_S).to_numpy()
    fidx = frames.column(S.FRAME_INDEX).to_numpy().astype(np.int64)
    glob = column_to_matrix(frames.column(S.GLOBAL_TOKEN), dim, dtype, frames.column(S.GLOBAL_SCALE).to_numpy())

    grid = None
    g = int(frames.column(S.GRID_SIZE)[0].as_py() or 0)
    if g and frames.column(S.GRID_TOKENS).null_count == 0:
        scales = frames.column(S.GRID_SCALES) if dtype == "int8" else None
        grid = column_to_matrix(frames.column(S.GRID_TOKENS), dim, dtype, scales).reshape(n, g * g, dim)

    counts = vectors_per_row(frames.column(S.PATCH_TOKENS), dim, "int8")
    have_patches = counts.sum() > 0
    if have_patches:
        codes = column_to_matrix(frames.column(S.PATCH_TOKENS), dim, "int8", out_dtype=None)
        pscales = binary_column_values(frames.column(S.PATCH_SCALES), np.dtype("<f4")).astype(np.float32)
        pindex = binary_column_values(frames.column(S.PATCH_INDEX), np.dtype("<u2")).astype(np.int64)
        gh = frames.column(S.PATCH_GRID_H).to_numpy().astype(np.int64)
        gw = frames.column(S.PATCH_GRID_W).to_numpy().astype(np.int64)
        pstart = np.concatenate([[0], np.cumsum(counts)])

    # Rows are sorted by (video_id, frame_index): each video is one contiguous run.
    bounds = np.flatnonzero(vid_col[1:] != vid_col[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    for a, b in zip(starts, ends):
        vid = str(vid_col[a])
        if info.get(vid, {}).get("status") == S.STATUS_FAILED:
            continue
        kw = {}
        if have_patches and counts[a:b].sum() > 0:
            pa_, pb_ = int(pstart[a]), int(pstart[b])
            kw = {"patch_codes": codes[pa_:pb_], "patch_scales": pscales[pa_:pb_],
                  "patch_src": G.patch_sources(counts[a:b], pindex[pa_:pb_], int(gh[a] * gw[a]))}
        lib.videos[vid] = G.VideoTokens(
            video_id=vid, pts_s=pts[a:b], span_end_s=span[a:b], frame_index=fidx[a:b],
            global_tokens=glob[a:b], grid_tokens=None if grid is None else grid[a:b],
            uri=info.get(vid, {}).get("uri", ""), **kw)

    # A fixed sample of library frames for calibration (all frames in small libraries).
    total = sum(v.num_frames for v in lib.videos.values())
    offsets, off = {}, 0
    for vid, v in lib.videos.items():
        offsets[vid] = off
        off += v.num_frames
    if total <= CALIBRATION_SAMPLE_FRAMES:
        lib.sample = {vid: np.arange(v.num_frames) for vid, v in lib.videos.items()}
    else:
        pick = np.sort(np.random.default_rng(0).choice(total, CALIBRATION_SAMPLE_FRAMES, replace=False))
        for vid, v in lib.videos.items():
            o = offsets[vid]
            rows = pick[(pick >= o) & (pick < o + v.num_frames)] - o
            if len(rows):
                lib.sample[vid] = rows
    return lib


# ================================================================ search


def search(store: str, text: str, *, top_k: int = 5, video: str | None = None,
           storage_options: dict | None = None, encoder=None,
           params: G.GroundingParams | None = None) -> list[Moment]:
    """Ranked moments where ``text`` happens across the store (or in one ``video``: id or file name stem).

    Args:
        store: token store URI.
        text: the query (1..MAX_QUERY_CHARS printable characters).
        top_k: moments returned at most (library-wide ranking by calibrated score).
        video: only this video (video_id or file-name stem); calibration stays library-wide.
        storage_options: fsspec options of the store.
        encoder: a loaded encoder of the store's space (default: the store's own, loaded once per process).
        params: grounding knobs (default ``grounding.DEFAULT_PARAMS``).

    Raises:
        QueryError: bad query or top_k, empty store, unknown video, encoder of another space.
    """
    text = check_query(text)
    if not isinstance(top_k, int) or top_k < 1:
        raise QueryError("top_k must be at least 1")
    lib = load_library(store, storage_options)
    ids = lib.resolve_video(video) if video is not None else None
    if not lib.videos:
        return []
    encoder = _check_encoder(lib, encoder)
    params = params or G.DEFAULT_PARAMS
    q = _encode(encoder, [text])
    moments = lib.ground(q, replace(params, max_moments=max(params.max_moments, min(top_k, 20))),
                         encoder=encoder, video_ids=ids)[0]
    return [_moment(lib, m) for m in moments[:top_k]]


def _moment(lib: Library, m: G.GroundedMoment) -> Moment:
    return Moment(m.video_id, lib.info[m.video_id]["uri"], m.start_s, m.end_s, m.score, m.peak_s, m.z)


def _check_encoder(lib: Library, encoder):
    if encoder is None:
        encoder = _cached_encoder(lib.encoder_id)
    if encoder.spec.space != lib.space:
        raise QueryError(f"the store's space is {lib.space!r} but the query encoder's is {encoder.spec.space!r}")
    return encoder


_TEXT_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()


def _encode(encoder, texts: list[str]) -> np.ndarray:
    """Text embeddings (Q, D), cached per (encoder, text) (reference queries are embedded once per process)."""
    key_base = (encoder.spec.id, encoder.spec.revision, id(encoder))
    missing = [t for t in texts if (key_base, t) not in _TEXT_CACHE]
    if missing:
        vecs = np.asarray(encoder.encode_text(missing), dtype=np.float32)
        for t, v in zip(missing, vecs):
            _TEXT_CACHE[(key_base, t)] = v
        while len(_TEXT_CACHE) > 4096:
            _TEXT_CACHE.popitem(last=False)
    return np.stack([_TEXT_CACHE[(key_base, t)] for t in texts])


_ENCODERS: dict[str, object] = {}


def _cached_encoder(encoder_id: str):
    from ray_vlm.models import load_encoder

    if encoder_id not in _ENCODERS:
        _ENCODERS[encoder_id] = load_encoder(encoder_id)
    return _ENCODERS[encoder_id]


# ================================================================ evaluation

METHODS = ("fused", "content", "global", "context", "random", "whole")


def method_params(method: str, base: G.GroundingParams | None = None) -> G.GroundingParams | None:
    """Grounding params of a scored method (None for the random / whole-video baselines)."""
    base = base or G.DEFAULT_PARAMS
    table = {"fused": G.CHANNELS, "content": G.CONTENT_CHANNELS, "global": ("global",), "context": ("context",)}
    if method in table:
        return replace(base, channels=table[method])
    if method in ("random", "whole"):
        return None
    raise QueryError(f"unknown method {method!r}; expected one of {METHODS}")


def evaluate_store(store: str, annotations, *, top_k: int = 10, method: str = "fused",
                   params: G.GroundingParams | None = None, storage_options: dict | None = None, encoder=None,
                   seed: int = 0, return_predictions: bool = False) -> dict:
    """Moment-retrieval metrics of a store against QVHighlights-format annotations.

    Two tasks per annotated query:

    * per video: ground the query in the annotation's ``vid`` (a file-name stem or a video_id) and predict
      ``[[start_s, end_s, score], ...]`` (top ``top_k``);
    * library-wide: the ``top_k`` best moments of the whole library for each distinct query text; a moment
      counts only in the right video (every annotated window of that text, in any video, is a true window). The
      videos are laid end to end on one library timeline, so ``eval_metrics.evaluate`` scores this task too
      (``R1@0.5``: the library's top moment overlaps a true window of the right video with IoU >= 0.5).

    Args:
        store: token store URI.
        annotations: a JSONL path / URI, or the records themselves.
        top_k: predictions per query.
        method: "fused" (content + context tokens), "content" (global + grid), "global", "context", or the
            baselines "random" (random windows, seeded) and "whole" (the whole video).
        params: base grounding params (channels are set by ``method``).
        seed: seed of the random baseline.
        return_predictions: also return the prediction records.

    Returns:
        ``{"method", "num_queries", "per_video": {metric: value}, "library": {metric: value},
        "per_video_R1@0.5", "library_R1@0.5"}`` (+ ``"predictions": {"per_video": [...], "library": [...]}``).
        Metrics are percentages as ``eval_metrics.evaluate`` returns them.
    """
    from ray_vlm.eval_metrics import evaluate, load_jsonl

    records = load_jsonl(annotations) if isinstance(annotations, (str, bytes)) or hasattr(annotations, "__fspath__") \
        else [dict(r) for r in annotations]
    if not records:
        raise QueryError("no annotations to evaluate")
    lib = load_library(store, storage_options)
    gp = method_params(method, params)
    vid_of = {}
    for r in records:
        ids = lib.resolve_video(str(r["vid"]))
        if len(ids) > 1:
            raise QueryError(f"annotation vid {r['vid']!r} names {len(ids)} videos in the store")
        vid_of[r["qid"]] = ids[0]
    durations = {v: _duration(lib, v) for v in lib.info}
    # Library timeline: videos end to end with a gap, so windows of different videos never overlap.
    offset, t = {}, 0.0
    for v in sorted(lib.info):
        offset[v] = t
        t += durations[v] + 1000.0
    rng = np.random.default_rng(seed)

    texts = sorted({str(r["query"]) for r in records})
    per_video_preds, lib_preds = [], []
    if gp is not None:
        encoder = _check_encoder(lib, encoder)
        gp = replace(gp, max_moments=max(top_k, 1))
        qv = _encode(encoder, [check_query(x) for x in texts])
        text_row = {x: i for i, x in enumerate(texts)}
        calib = lib.calibrate(qv, gp, encoder=encoder)  # once for every text: it is library-wide
        by_vid: dict[str, list[dict]] = {}
        for r in records:  # per video: score each video once for all of its queries
            by_vid.setdefault(vid_of[r["qid"]], []).append(r)
        for vid, recs in by_vid.items():
            rows = sorted({text_row[str(r["query"])] for r in recs})
            res = lib.ground(qv[rows], gp, encoder=encoder, video_ids=[vid], calibration=calib.take(rows))
            got = dict(zip(rows, res))
            for r in recs:
                ms = got[text_row[str(r["query"])]][:top_k]
                per_video_preds.append({"qid": r["qid"], "vid": r["vid"],
                                        "pred_relevant_windows": [[m.start_s, m.end_s, m.score] for m in ms]})
        lib_res = lib.ground(qv, gp, encoder=encoder, calibration=calib)
        lib_moments = {x: [(m.video_id, m.start_s, m.end_s, m.score) for m in lib_res[text_row[x]][:top_k]]
                       for x in texts}
    else:
        vids = sorted(v for v in lib.info if durations[v] > 0)
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


def _duration(lib: Library, vid: str) -> float:
    d = lib.info[vid].get("duration_s")
    if d is not None and np.isfinite(d) and d > 0:
        return float(d)
    v = lib.videos.get(vid)
    return v.end_s if v is not None else 0.0


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
