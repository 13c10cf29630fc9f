"""Temporal grounding over stored tokens: per-frame scores, score curves, moments, calibration.

Everything here is plain NumPy over one video's tokens (``VideoTokens``), so the same code grounds a whole
video, a candidate window handed over by an ANN index (``VideoTokens.window``), or a live ring buffer.

Per-frame scores come from three channels, each a cosine-like number per (frame, query):

* ``global``: the frame's global content token, ``g . q``;
* ``grid``: the g x g pooled content tokens, max over cells (a small object fills one cell better than the frame);
* ``context``: LLaMA-VID's context token computed at query time. The query attends over the frame's patch
  tokens, ``a = softmax(q . p_i / tau)``, the context token is ``c = sum_i a_i p_i`` and the score is
  ``cos(q, c)``. Small ``tau`` makes it close to the best patch, large ``tau`` close to the mean patch; by
  default the attention runs over each frame's 8 best patches (the others carry almost no weight at that
  ``tau``, and gathering fewer patch vectors is what saves time). Patches DiffFP pruned are the last kept
  version of that patch (the pruner dropped them because they had not changed
  since), so the patch grid of every stored frame is rebuilt over time from the kept patches
  (``patch_sources``) without copying a vector.

Calibration. Raw cosines do not compare across queries (the bundled encoder scores "a car" above "a bicycle"
on every frame) nor across channels (max-pooled channels sit higher). Each channel is therefore centred on the
query's own background level in the library (a quantile of its scores over a sample of library frames) and
divided by the channel's *unit*: the contrast typical real queries reach in this library (median over a fixed
set of reference queries of ``q95 - q50`` of their scores). ``z = (s - centre) / unit`` compares across videos
and queries; the channels' ``z`` are fused (weighted mean or max); the calibrated score is
``sigmoid(slope * (z - z0))`` in [0, 1]. A query the encoder cannot read (gibberish, a script its tokenizer
does not know) produces a flat response: its contrast stays far below the unit, so its calibrated score is low
instead of a confident argmax over noise.

Moments. The fused ``z`` of each stored frame is expanded to the frames that were *sampled* (a kept frame
stands for the pruned samples after it, up to ``span_end_s``), smoothed with a Gaussian of ``smooth_s``
seconds, and cut around its peaks: a moment grows from a peak while the curve stays above
``base + rel * (peak - base)`` (``base``: the lower of the video's median and the query's library background,
so a query present all through a video gives one whole-video moment), and its boundaries sit half-way between the
last sample inside and the first outside (the best estimate of a change that happened between two samples).
Up to ``max_moments`` disjoint moments per video, then temporal non-maximum suppression.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ray_vlm.core.errors import RayVlmError

CHANNELS = ("global", "grid", "context")
CONTENT_CHANNELS = ("global", "grid")

# Reference queries that set the calibration unit: everyday things, most of them ImageNet-ish, phrased as users
# phrase queries. Only their *typical* contrast matters (median over the set), not any single one.
REFERENCE_QUERIES: tuple[str, ...] = (
    "a person", "a car", "a dog", "a cat", "a tree", "a house", "a street", "food", "a table", "a chair",
    "a bird", "a boat", "water", "the sky", "grass", "a flower", "a computer", "a phone", "a book", "a ball",
    "a horse", "a road", "a window", "a door", "a shirt", "a bottle", "a cup", "a bicycle", "a truck",
    "an airplane", "a train", "a building",
)


class GroundingError(RayVlmError, ValueError):
    """Tokens or queries that cannot be grounded as given (shapes that disagree, no frames)."""

    code = "grounding_invalid"


# ================================================================ tokens of one video


@dataclass
class VideoTokens:
    """The stored tokens of one video (or of a window of it), decoded, in time order.

    Attributes:
        video_id: the video's id.
        pts_s: float64 (T,) ascending start time of each stored frame.
        span_end_s: float64 (T,) each frame covers ``[pts_s, span_end_s)`` (pruned frames after it included).
        frame_index: int64 (T,) index of the frame among the video's *sampled* frames (gaps = pruned frames).
        global_tokens: float32 (T, D) global content tokens.
        grid_tokens: float32 (T, G, D) pooled grid tokens, or None.
        patch_codes: (K, D) kept patch tokens of the whole video, int8 codes (with ``patch_scales``) or float32,
            or None when the store has no patches.
        patch_scales: float32 (K,) per-patch scale of int8 codes (None for float codes).
        patch_src: int32 (T, P) row of ``patch_codes`` holding the current version of each grid patch of each
            frame (-1 where the patch was never kept yet), see ``patch_sources``.
        uri: the video's URI (informational).
    """

    video_id: str
    pts_s: np.ndarray
    span_end_s: np.ndarray
    frame_index: np.ndarray
    global_tokens: np.ndarray
    grid_tokens: np.ndarray | None = None
    patch_codes: np.ndarray | None = None
    patch_scales: np.ndarray | None = None
    patch_src: np.ndarray | None = None
    uri: str = ""

    def __post_init__(self):
        t = len(self.pts_s)
        for name in ("span_end_s", "frame_index", "global_tokens"):
            if len(getattr(self, name)) != t:
                raise GroundingError(f"VideoTokens {self.video_id}: {name} has {len(getattr(self, name))} rows, "
                                     f"pts_s {t}")
        if self.grid_tokens is not None and (self.grid_tokens.ndim != 3 or len(self.grid_tokens) != t):
            raise GroundingError(f"VideoTokens {self.video_id}: grid_tokens must be (T, G, D), got "
                                 f"{self.grid_tokens.shape}")
        if self.patch_src is not None:
            if self.patch_codes is None or self.patch_src.ndim != 2 or len(self.patch_src) != t:
                raise GroundingError(f"VideoTokens {self.video_id}: patch_src must be (T, P) with patch_codes")
            if self.patch_src.size and self.patch_src.max() >= len(self.patch_codes):
                raise GroundingError(f"VideoTokens {self.video_id}: patch_src points past patch_codes")

    @property
    def num_frames(self) -> int:
        return len(self.pts_s)

    @property
    def has_grid(self) -> bool:
        return self.grid_tokens is not None and self.grid_tokens.shape[1] > 0

    @property
    def has_patches(self) -> bool:
        return self.patch_src is not None and self.patch_codes is not None and len(self.patch_codes) > 0

    @property
    def start_s(self) -> float:
        return float(self.pts_s[0]) if len(self.pts_s) else 0.0

    @property
    def end_s(self) -> float:
        return float(self.span_end_s[-1]) if len(self.span_end_s) else 0.0

    def rows(self, rows: np.ndarray) -> VideoTokens:
        """The frames at ``rows`` (sorted int indices). Patch codes are shared, not copied."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            pts_s=self.pts_s[rows], span_end_s=self.span_end_s[rows], frame_index=self.frame_index[rows],
            global_tokens=self.global_tokens[rows],
            grid_tokens=None if self.grid_tokens is None else self.grid_tokens[rows],
            patch_src=None if self.patch_src is None else self.patch_src[rows],
        )

    def window(self, start_s: float, end_s: float, *, compact: bool = False) -> VideoTokens:
        """The frames whose span overlaps ``[start_s, end_s)`` (for grounding inside a candidate window).

        ``compact``: also keep only the patch rows those frames use (``compact_patches``), so scoring a short
        window of a long video does not touch the video's other patches.
        """
        sel = np.flatnonzero((self.span_end_s > start_s) & (self.pts_s < end_s))
        out = self.rows(sel)
        return out.compact_patches() if compact else out

    def compact_patches(self) -> VideoTokens:
        """The same frames with ``patch_codes`` / ``patch_scales`` cut down to the rows ``patch_src`` points at
        (a copy of those rows; ``rows`` and ``window`` share the whole video's patches instead)."""
        if not self.has_patches:
            return self
        assert self.patch_src is not None and self.patch_codes is not None  # has_patches
        used = np.unique(self.patch_src[self.patch_src >= 0])
        remap = np.full(len(self.patch_codes), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        src = np.where(self.patch_src >= 0, remap[np.maximum(self.patch_src, 0)], -1).astype(np.int32)
        return replace(self, patch_codes=self.patch_codes[used],
                       patch_scales=None if self.patch_scales is None else self.patch_scales[used], patch_src=src)


def patch_sources(counts: np.ndarray, flat_index: np.ndarray, num_patches: int) -> np.ndarray:
    """Rebuild each frame's full patch grid from DiffFP-kept patches, as indices (no vector is copied).

    The kept patches of a video are stored frame after frame (``counts[t]`` of them for frame t, at grid
    positions ``flat_index``). A patch the pruner dropped is, by construction, the last kept version of that
    grid position, so the source of (t, p) is the latest kept row at position p at or before frame t.

    Args:
        counts: int (T,) kept patches per frame, frames in time order.
        flat_index: int (K,) grid position (row-major, < num_patches) of each kept patch, K = counts.sum().
        num_patches: P = gh * gw.

    Returns:
        int32 (T, P): row in the kept-patch matrix, -1 where that position was never kept up to frame t.
    """
    counts = np.asarray(counts, dtype=np.int64)
    flat_index = np.asarray(flat_index, dtype=np.int64)
    t = len(counts)
    k = int(counts.sum())
    if len(flat_index) != k:
        raise GroundingError(f"patch_sources: {len(flat_index)} patch indices for {k} kept patches")
    if k and (flat_index.min() < 0 or flat_index.max() >= num_patches):
        raise GroundingError(f"patch_sources: a patch index is outside 0..{num_patches - 1}")
    src = np.full((t, num_patches), -1, dtype=np.int32)
    if k:
        frame_of = np.repeat(np.arange(t), counts)
        src[frame_of, flat_index] = np.arange(k, dtype=np.int32)
        # Rows grow with time, so "latest kept at or before t" is a running maximum down each column.
        np.maximum.accumulate(src, axis=0, out=src)
    return src


# ================================================================ per-frame scores


@dataclass(frozen=True)
class GroundingParams:
    """Knobs of scoring, fusion, calibration and moment extraction (defaults chosen on the benchmark).

    Attributes:
        channels: channels used (subset of CHANNELS); missing ones (no grid / no patches) are skipped.
        weights: fusion weight per channel.
        fusion: "mean" (weighted mean of channel z) or "max" (weighted max).
        context_tau: softmax temperature of the context token's attention, in cosine units.
        context_block: frames per block when building context tokens (bounds memory to block*P*D floats).
        context_top_m: the context token attends over each frame's best ``top_m`` patches (None: all).
        center_quantile: the query's background level is this quantile of its scores over library frames.
        unit_quantile: reference contrast is ``quantile(unit_quantile) - quantile(center_quantile)``.
        slope, z0: calibrated score ``sigmoid(slope * (z - z0))``.
        smooth_s: Gaussian sigma (seconds) of the temporal smoothing (0: none).
        rel: a moment spans the samples above ``base + rel * (peak - base)``.
        base: the reference level of a video's curve: "video" (its median: the video's own distribution),
            "library" (0: the query's library background), "min" (the lower of the two: a query present all
            through a video, above the library background, gives one whole-video moment).
        min_prominence: a further moment needs a peak at least this many z above the video's base.
        max_moments: moments per video at most.
        nms_iou: moments overlapping a better one by more than this IoU are dropped.
    """

    channels: tuple[str, ...] = CHANNELS
    weights: Mapping[str, float] = field(default_factory=lambda: {"global": 1.0, "grid": 1.0, "context": 1.0})
    fusion: str = "mean"
    context_tau: float = 0.02
    context_block: int = 256
    context_top_m: int | None = 8
    center_quantile: float = 0.5
    unit_quantile: float = 0.95
    slope: float = 2.0
    z0: float = 2.0
    smooth_s: float = 0.5
    rel: float = 0.6
    base: str = "min"
    min_prominence: float = 0.5
    max_moments: int = 5
    nms_iou: float = 0.5

    def __post_init__(self):
        unknown = set(self.channels) - set(CHANNELS)
        if unknown or not self.channels:
            raise GroundingError(f"unknown or no channels {sorted(unknown)}; expected a subset of {CHANNELS}")
        if self.fusion not in ("mean", "max"):
            raise GroundingError(f"fusion must be 'mean' or 'max', got {self.fusion!r}")
        if self.base not in ("video", "library", "min"):
            raise GroundingError(f"base must be 'video', 'library' or 'min', got {self.base!r}")
        if self.context_tau <= 0:
            raise GroundingError("context_tau must be positive")


DEFAULT_PARAMS = GroundingParams()


def as_queries(queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2:
        raise GroundingError(f"queries must be (Q, D), got {q.shape}")
    return q


def context_scores(patch_codes: np.ndarray, patch_scales: np.ndarray | None, patch_src: np.ndarray,
                   queries: np.ndarray, tau: float, block: int = 256, top_m: int | None = None) -> np.ndarray:
    """LLaMA-VID context-token scores: each query attends over each frame's (rebuilt) patch grid.

    Args:
        patch_codes: (K, D) int8 codes or float32 patch tokens (one row per kept patch).
        patch_scales: float32 (K,) scales of int8 codes, or None.
        patch_src: int32 (T, P) row of each frame's patch at each grid position (-1: none).
        queries: float32 (Q, D), L2-normalised.
        tau: softmax temperature on ``q . p`` (cosine units).
        block: frames per block (memory: block * P * D float32).
        top_m: attend over each frame's ``top_m`` best patches only (sparse attention: with a small ``tau`` the
            rest carry almost no weight) when ``top_m < P``; None: every patch (exact). The choice never depends on
            how many queries are scored together, so a query's scores are the same alone or in a batch.

    Returns:
        float32 (T, Q): ``cos(q, c_tq)`` with ``c_tq = sum_p softmax_p(q . p / tau) p``; NaN for a frame with
        no patch at all.
    """
    q = as_queries(queries)
    t, p = patch_src.shape
    out = np.full((t, len(q)), np.nan, dtype=np.float32)
    if t == 0 or len(patch_codes) == 0:
        return out
    # q . p for every kept patch once (K x Q), then gathered per frame: pruned patches cost nothing here.
    kp = np.asarray(patch_codes @ q.T if patch_codes.dtype == np.float32 else
                    patch_codes.astype(np.float32) @ q.T, dtype=np.float32)  # (K, Q)
    if patch_scales is not None:
        kp *= patch_scales[:, None]
    for a in range(0, t, block):
        src = patch_src[a:a + block]  # (B, P)
        valid = src >= 0
        safe = np.where(valid, src, 0)
        s = kp[safe]  # (B, P, Q)
        logits = np.where(valid[..., None], s / tau, -np.inf)
        if top_m is not None and top_m < p:
            out[a:a + block] = _context_top_m(patch_codes, patch_scales, safe, logits, s, top_m)
            continue
        m = logits.max(axis=1, keepdims=True)  # (B, 1, Q)
        ok = np.isfinite(m[:, 0, 0])
        m = np.where(np.isfinite(m), m, 0.0)
        w = np.exp(logits - m)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-30)  # (B, P, Q)
        vec = patch_codes[safe].astype(np.float32)  # (B, P, D)
        if patch_scales is not None:
            vec *= patch_scales[safe][..., None]
        ctx = np.einsum("bpq,bpd->bqd", w, vec, optimize=True)  # (B, Q, D): the context tokens
        dot = (w * s).sum(axis=1)  # (B, Q) == ctx . q
        norm = np.linalg.norm(ctx, axis=-1)
        cos = dot / np.maximum(norm, 1e-12)
        cos[~ok] = np.nan
        out[a:a + block] = cos
    return out


def _context_top_m(codes, scales, safe, logits, s, m):
    """``context_scores`` of one block over each frame's ``m`` best patches, one query at a time."""
    b, _, nq = logits.shape
    out = np.empty((b, nq), np.float32)
    rows = np.arange(b)[:, None]
    for j in range(nq):
        idx = np.argpartition(-logits[:, :, j], m - 1, axis=1)[:, :m]  # (B, m)
        lg = logits[rows, idx, j]
        mx = lg.max(axis=1, keepdims=True)
        ok = np.isfinite(mx[:, 0])
        w = np.exp(lg - np.where(np.isfinite(mx), mx, 0.0))
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-30)  # (B, m)
        src = safe[rows, idx]  # (B, m)
        vec = codes[src].astype(np.float32)  # (B, m, D)
        if scales is not None:
            vec *= scales[src][..., None]
        ctx = np.einsum("bm,bmd->bd", w, vec)
        cos = (w * s[rows, idx, j]).sum(1) / np.maximum(np.linalg.norm(ctx, axis=1), 1e-12)
        cos[~ok] = np.nan
        out[:, j] = cos
    return out


def frame_scores(tokens: VideoTokens, queries: np.ndarray, params: GroundingParams = DEFAULT_PARAMS
                 ) -> dict[str, np.ndarray]:
    """Raw per-frame scores of each available channel.

    Args:
        tokens: one video's (or window's) tokens.
        queries: float32 (Q, D) or (D,), L2-normalised, in the store's embedding space.
        params: which channels, and the context token's temperature.

    Returns:
        ``{channel: float32 (T, Q)}`` for each channel in ``params.channels`` the tokens have (``global`` is
        always there; ``grid`` needs grid tokens; ``context`` needs patch tokens).
    """
    q = as_queries(queries)
    if q.shape[1] != tokens.global_tokens.shape[1]:
        raise GroundingError(f"query dim {q.shape[1]} != token dim {tokens.global_tokens.shape[1]}")
    out: dict[str, np.ndarray] = {}
    if "global" in params.channels:
        out["global"] = tokens.global_tokens @ q.T
    if "grid" in params.channels and tokens.has_grid:
        out["grid"] = (tokens.grid_tokens @ q.T).max(axis=1)  # (T, G, Q) -> (T, Q)
    if "context" in params.channels and tokens.has_patches:
        assert tokens.patch_codes is not None and tokens.patch_src is not None  # has_patches
        ctx = context_scores(tokens.patch_codes, tokens.patch_scales, tokens.patch_src, q, params.context_tau,
                             params.context_block, params.context_top_m)
        if np.isnan(ctx).any():  # a frame with no patch: its global score stands in
            g = tokens.global_tokens @ q.T
            ctx = np.where(np.isnan(ctx), g, ctx)
        out["context"] = ctx
    if not out:  # e.g. channels=("context",) on a store without patches: fall back to content tokens
        out["global"] = tokens.global_tokens @ q.T
        if tokens.has_grid:
            out["grid"] = (tokens.grid_tokens @ q.T).max(axis=1)
    return out


# ================================================================ calibration


@dataclass(frozen=True)
class Calibration:
    """Per-query, per-channel centre and per-channel unit: ``z = (score - center) / unit``.

    Attributes:
        center: ``{channel: float32 (Q,)}`` the queries' background level in the library.
        unit: ``{channel: float}`` typical contrast of real queries in the library.
    """

    center: Mapping[str, np.ndarray]
    unit: Mapping[str, float]

    def select(self, i: int) -> Calibration:
        """The calibration of query ``i`` alone."""
        return self.take([i])

    def take(self, rows: Sequence[int]) -> Calibration:
        """The calibration of queries ``rows`` (in that order)."""
        idx = np.asarray(rows, dtype=np.int64)
        return Calibration({k: np.asarray(v)[idx] for k, v in self.center.items()}, dict(self.unit))


def channel_units(ref_scores: Mapping[str, np.ndarray], params: GroundingParams = DEFAULT_PARAMS,
                  min_unit: float = 1e-3) -> dict[str, float]:
    """Calibration unit of each channel from reference queries' scores over library frames.

    Args:
        ref_scores: ``{channel: (N_frames, R)}`` scores of R reference queries (``REFERENCE_QUERIES`` embedded by
            the store's encoder) on a sample of library frames.

    Returns:
        ``{channel: median_r(quantile(unit_quantile) - quantile(center_quantile))}``, at least ``min_unit``.
    """
    out = {}
    for ch, s in ref_scores.items():
        s = np.asarray(s, dtype=np.float64)
        if s.size == 0:
            out[ch] = 1.0
            continue
        hi = np.quantile(s, params.unit_quantile, axis=0)
        mid = np.quantile(s, params.center_quantile, axis=0)
        out[ch] = max(float(np.median(hi - mid)), min_unit)
    return out


def calibration_from_scores(sample_scores: Mapping[str, np.ndarray], units: Mapping[str, float],
                            params: GroundingParams = DEFAULT_PARAMS) -> Calibration:
    """The queries' calibration from their scores on a sample of library frames.

    Args:
        sample_scores: ``{channel: (N_frames, Q)}`` scores of the queries on library frames (all of them, or a
            fixed sample; the same frames for every channel).
        units: ``channel_units`` of the library.
    """
    center = {ch: np.quantile(np.asarray(s, np.float64), params.center_quantile, axis=0).astype(np.float32)
              for ch, s in sample_scores.items() if len(s)}
    return Calibration(center, {ch: float(units.get(ch, 1.0)) for ch in center})


def fuse(scores: Mapping[str, np.ndarray], calibration: Calibration, params: GroundingParams = DEFAULT_PARAMS
         ) -> np.ndarray:
    """Calibrated, fused z per frame.

    Args:
        scores: ``{channel: (T, Q)}`` from ``frame_scores``.
        calibration: centres for the same Q queries, and units.

    Returns:
        float32 (T, Q) fused z (0: the query's library background; 1: one typical query contrast above it).
    """
    zs, ws = [], []
    for ch, s in scores.items():
        if ch not in calibration.center:
            continue
        zs.append((s - calibration.center[ch][None, :]) / calibration.unit[ch])
        ws.append(float(params.weights.get(ch, 1.0)))
    if not zs:
        raise GroundingError(f"no calibrated channel among {sorted(scores)}")
    z = np.stack(zs)  # (C, T, Q)
    w = np.asarray(ws, dtype=np.float32)[:, None, None]
    if params.fusion == "max":
        return (z * w).max(axis=0).astype(np.float32)
    return ((z * w).sum(axis=0) / max(w.sum(), 1e-12)).astype(np.float32)


def calibrated_score(z, params: GroundingParams = DEFAULT_PARAMS):
    """Map fused z to [0, 1]: ``sigmoid(slope * (z - z0))``."""
    x = params.slope * (np.asarray(z, dtype=np.float64) - params.z0)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic function, without exp overflow


# ================================================================ curves and moments


def sample_grid(pts_s: np.ndarray, span_end_s: np.ndarray, frame_index: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Times of every *sampled* frame a video's stored frames stand for.

    A stored frame t covers the samples ``frame_index[t] .. frame_index[t+1]-1`` (the pruned ones after it), spread
    evenly over ``[pts_s[t], span_end_s[t])``; the last frame covers ``round(span / dt)`` samples.

    Returns:
        (times float64 (N,), owner int64 (N,): the stored frame each sample copies, dt: the sampling step).
    """
    pts = np.asarray(pts_s, dtype=np.float64)
    end = np.asarray(span_end_s, dtype=np.float64)
    fi = np.asarray(frame_index, dtype=np.int64)
    t = len(pts)
    if t == 0:
        return np.zeros(0), np.zeros(0, np.int64), 1.0
    dfi = np.diff(fi)
    dpts = np.diff(pts)
    ok = dfi > 0
    if ok.any():
        dt = float(np.median(dpts[ok] / dfi[ok]))
    else:
        dt = float(end[0] - pts[0])
    if not np.isfinite(dt) or dt <= 0:
        dt = 1.0
    counts = np.empty(t, dtype=np.int64)
    counts[:-1] = np.clip(dfi, 1, None)
    counts[-1] = max(1, int(round((end[-1] - pts[-1]) / dt)))
    # A frame never stands for more samples than its span can hold (frame_index gaps from another cause).
    cap = np.maximum(1, np.round((end - pts) / dt).astype(np.int64))
    counts = np.minimum(counts, np.maximum(cap, 1))
    owner = np.repeat(np.arange(t), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(len(owner)) - first[owner]
    step = (end - pts) / counts
    times = pts[owner] + k * step[owner]
    return times, owner, dt


def smooth(values: np.ndarray, sigma_samples: float) -> np.ndarray:
    """Gaussian smoothing along time (edges padded with the edge value). values: (N,) -> (N,)."""
    v = np.asarray(values, dtype=np.float64)
    if sigma_samples <= 0 or len(v) < 2:
        return v.copy()
    r = max(1, int(np.ceil(3 * sigma_samples)))
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma_samples) ** 2)
    k /= k.sum()
    return np.convolve(np.pad(v, r, mode="edge"), k, mode="valid")


@dataclass(frozen=True)
class GroundedMoment:
    """One moment of one video.

    Attributes:
        video_id, start_s, end_s: where.
        score: calibrated score in [0, 1] (compares across videos and queries).
        z: fused, calibrated z at the moment's peak (smoothed curve).
        peak_s: time of the peak sample.
    """

    video_id: str
    start_s: float
    end_s: float
    score: float
    z: float
    peak_s: float


def extract_moments(times: np.ndarray, values: np.ndarray, *, start_s: float, end_s: float,
                    max_moments: int = 5, rel: float = 0.5, min_prominence: float = 0.5,
                    base: float | None = None) -> list[tuple[float, float, float, float]]:
    """Cut moments out of one score curve sampled at ``times``.

    Args:
        times: float (N,) ascending sample times.
        values: float (N,) the (smoothed) curve.
        start_s, end_s: the extent the samples cover (a moment touching the first / last sample reaches it).
        max_moments: moments returned at most.
        rel: a moment spans the contiguous samples around its peak with ``v >= base + rel * (peak - base)``.
        min_prominence: moments after the first need ``peak - base >= min_prominence``.
        base: reference level (default: the median of ``values``: the video's own distribution).

    Returns:
        ``[(start_s, end_s, peak_value, peak_s)]`` best first, disjoint. A boundary between a sample inside and
        one outside sits half-way between them.
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return []
    base = float(np.median(v)) if base is None else float(base)
    taken = np.zeros(n, dtype=bool)
    out: list[tuple[float, float, float, float]] = []
    for _ in range(max_moments):
        cand = np.where(taken, -np.inf, v)
        i = int(np.argmax(cand))
        if not np.isfinite(cand[i]):
            break
        peak = float(v[i])
        if out and peak - base < min_prominence:
            break
        cut = base + rel * (peak - base)
        inside = (v >= cut) & ~taken
        inside[i] = True
        left_out = np.flatnonzero(~inside[:i])
        lo = int(left_out[-1]) + 1 if len(left_out) else 0
        right_out = np.flatnonzero(~inside[i + 1:])
        hi = i + int(right_out[0]) if len(right_out) else n - 1
        taken[lo:hi + 1] = True
        s = start_s if lo == 0 else 0.5 * (times[lo - 1] + times[lo])
        e = end_s if hi == n - 1 else 0.5 * (times[hi] + times[hi + 1])
        out.append((float(s), float(e), peak, float(times[i])))
    return out


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def nms(moments: Sequence[GroundedMoment], iou_threshold: float = 0.5) -> list[GroundedMoment]:
    """Greedy temporal non-maximum suppression within each video (best score first)."""
    kept: list[GroundedMoment] = []
    for m in sorted(moments, key=lambda m: -m.score):
        if all(k.video_id != m.video_id or temporal_iou((k.start_s, k.end_s), (m.start_s, m.end_s)) <= iou_threshold
               for k in kept):
            kept.append(m)
    return kept


def ground_curve(video_id: str, pts_s: np.ndarray, span_end_s: np.ndarray, frame_index: np.ndarray,
                 z: np.ndarray, params: GroundingParams = DEFAULT_PARAMS) -> list[GroundedMoment]:
    """Moments of one video from its per-stored-frame fused z (T,)."""
    times, owner, dt = sample_grid(pts_s, span_end_s, frame_index)
    if len(times) == 0:
        return []
    curve = smooth(np.asarray(z, dtype=np.float64)[owner], params.smooth_s / dt)
    base = float(np.median(curve))
    if params.base == "library":
        base = 0.0
    elif params.base == "min":
        base = min(base, 0.0)
    raw = extract_moments(times, curve, start_s=float(pts_s[0]), end_s=float(span_end_s[-1]),
                          max_moments=params.max_moments, rel=params.rel, min_prominence=params.min_prominence,
                          base=base)
    moments = [GroundedMoment(video_id, s, e, float(calibrated_score(pk, params)), pk, peak_s)
               for s, e, pk, peak_s in raw]
    return nms(moments, params.nms_iou)


def ground(tokens: VideoTokens, query: np.ndarray, calibration: Calibration,
           params: GroundingParams = DEFAULT_PARAMS) -> list[GroundedMoment]:
    """Ground one query in one video (or in a candidate window: pass ``tokens.window(s, e)``).

    Args:
        tokens: the video's tokens.
        query: float32 (D,) or (1, D), L2-normalised.
        calibration: the query's calibration (``Calibration.select(i)`` for one of several queries).
        params: scoring / moment knobs.

    Returns:
        Moments best first, each with a calibrated score in [0, 1].
    """
    if tokens.num_frames == 0:
        return []
    scores = frame_scores(tokens, query, params)
    z = fuse(scores, calibration, params)[:, 0]
    return ground_curve(tokens.video_id, tokens.pts_s, tokens.span_end_s, tokens.frame_index, z, params)
