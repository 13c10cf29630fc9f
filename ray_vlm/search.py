"""Answer "when does X happen?" over a token store: score every stored frame, extract moments, rank.

This is the brute-force path: it reads the global content tokens of the store (``np.frombuffer`` over the
Parquet column), scores them against the query embedded by the store's own encoder, smooths each video's
score curve over time and cuts moments around its peaks. Pruned frames are covered by the kept frame
before them (``[pts_s, span_end_s)``), so a moment's end reaches over static stretches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import numpy as np

from ray_vlm import schema as S

MAX_QUERY_CHARS = 1000


class QueryError(ValueError):
    """A query the service cannot answer as asked (empty, too long, unknown video, wrong space)."""


@dataclass(frozen=True)
class Moment:
    video_id: str
    uri: str
    start_s: float
    end_s: float
    score: float
    peak_s: float

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


def _smooth(scores: np.ndarray, width: int = 3) -> np.ndarray:
    if len(scores) < 3 or width <= 1:
        return scores
    k = np.ones(width, dtype=np.float32) / width
    padded = np.pad(scores, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, k, mode="valid")


def extract_moments(pts: np.ndarray, span_end: np.ndarray, scores: np.ndarray, *, max_moments: int = 3,
                    rel: float = 0.5) -> list[tuple[float, float, float, float]]:
    """Cut moments out of one video's score curve.

    Args:
        pts: float (T,) frame start times, ascending.
        span_end: float (T,) time each frame covers up to.
        scores: float (T,) similarity per frame.
        max_moments: moments returned at most.
        rel: a frame belongs to a peak's moment while its smoothed score stays above
            ``floor + rel * (peak - floor)`` where floor is the video's median score.

    Returns:
        list of (start_s, end_s, score, peak_s), best first.
    """
    if len(pts) == 0:
        return []
    sm = _smooth(scores.astype(np.float32))
    floor = float(np.median(sm))
    taken = np.zeros(len(sm), dtype=bool)
    out = []
    for _ in range(max_moments):
        cand = np.where(taken, -np.inf, sm)
        i = int(np.argmax(cand))
        if not np.isfinite(cand[i]):
            break
        peak = float(sm[i])
        if out and peak <= floor:
            break
        cut = floor + rel * (peak - floor)
        lo = i
        while lo > 0 and not taken[lo - 1] and sm[lo - 1] >= cut:
            lo -= 1
        hi = i
        while hi + 1 < len(sm) and not taken[hi + 1] and sm[hi + 1] >= cut:
            hi += 1
        taken[lo : hi + 1] = True
        out.append((float(pts[lo]), float(span_end[hi]), float(scores[lo : hi + 1].max()), float(pts[i])))
    return out


def search(store: str, text: str, *, top_k: int = 5, video: str | None = None,
           storage_options: dict | None = None, encoder=None) -> list[Moment]:
    """Ranked moments where ``text`` happens across the store (or in one ``video``: id or file name stem)."""
    from ray_vlm.store import TokenStore, column_to_matrix

    text = check_query(text)
    if top_k < 1:
        raise QueryError("top_k must be at least 1")
    ts = TokenStore(store, storage_options)
    videos = ts.read_videos()
    if videos.num_rows == 0:
        raise QueryError(f"the store {store} holds no videos")
    vrows = {r[S.VIDEO_ID]: r for r in videos.select([S.VIDEO_ID, S.URI, S.STATUS, S.SPACE, S.ENCODER]).to_pylist()}
    ids = None
    if video is not None:
        ids = [v for v, r in vrows.items() if v == video or PurePosixPath(r[S.URI]).stem == video]
        if not ids:
            raise QueryError(f"no video {video!r} in the store (give a video_id or a file name stem)")
    frames = ts.read_frames(video_ids=ids, columns=[S.VIDEO_ID, S.PTS_S, S.SPAN_END_S, S.GLOBAL_TOKEN,
                                                    S.GLOBAL_SCALE, S.DIM, S.TOKEN_DTYPE, S.ENCODER, S.SPACE])
    if frames.num_rows == 0:
        return []
    encoder_id = frames.column(S.ENCODER)[0].as_py()
    space = frames.column(S.SPACE)[0].as_py()
    if encoder is None:
        encoder = _cached_encoder(encoder_id)
    if encoder.spec.space != space:
        raise QueryError(f"the store's space is {space!r} but the query encoder's is {encoder.spec.space!r}")
    q = encoder.encode_text([text])[0].astype(np.float32)
    dim = frames.column(S.DIM)[0].as_py()
    dtype = frames.column(S.TOKEN_DTYPE)[0].as_py()
    scales = frames.column(S.GLOBAL_SCALE).to_numpy()
    mat = column_to_matrix(frames.column(S.GLOBAL_TOKEN), dim, dtype, scales)
    scores = mat @ q
    vid = frames.column(S.VIDEO_ID).to_numpy(zero_copy_only=False)
    pts = frames.column(S.PTS_S).to_numpy()
    span = frames.column(S.SPAN_END_S).to_numpy()
    moments = []
    for v in np.unique(vid):
        sel = np.flatnonzero(vid == v)
        order = sel[np.argsort(pts[sel], kind="stable")]
        for start, end, score, peak in extract_moments(pts[order], span[order], scores[order]):
            moments.append(Moment(str(v), vrows[str(v)][S.URI], start, end, score, peak))
    moments.sort(key=lambda m: -m.score)
    return moments[:top_k]


_ENCODERS: dict[str, object] = {}


def _cached_encoder(encoder_id: str):
    from ray_vlm.models import load_encoder

    if encoder_id not in _ENCODERS:
        _ENCODERS[encoder_id] = load_encoder(encoder_id)
    return _ENCODERS[encoder_id]
