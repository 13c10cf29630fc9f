"""Answer "when does X happen?" over a token store.

``Searcher`` is the query path: embed the query with the store's own encoder, *retrieve* candidate
windows from the store's window ANN index (``ray_vlm.query.windows``), *ground* inside them
(``ray_vlm.query.grounding``: content + context-token score curves, library-wide calibration, moment
extraction) and rank the moments of
every video by their calibrated score. Retrieval and grounding are separate calls joined by a small picklable
``Candidates`` (store version + video spans), so a retriever replica and a grounder replica of a Ray Serve app
can run them in different processes. Small libraries (``RetrievalParams.whole_below_frames``) are grounded
whole: there it costs little and loses nothing the index cannot see. ``search(store, text)`` is a thin
function over a process-wide cached Searcher.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.errors import RayVlmError
from ray_vlm.query import grounding as G
from ray_vlm.query.methods import METHODS
from ray_vlm.query.tracks import TRACK_SPEECH, TRACK_TEXT, TRACK_VISUAL, TRACKS, TrackHit, TrackIndex

if TYPE_CHECKING:
    from ray_vlm.query.windows import WindowIndex, WindowIndexConfig

MAX_QUERY_CHARS = 1000
_SEARCHER_CACHE_SIZE = 4  # Searchers kept per process by get_searcher (store, options, encoder, params)
CALIBRATION_SAMPLE_FRAMES = 4096  # library frames the calibration centres are measured on (fixed sample)

# Frame columns the grounder reads.
_FRAME_COLUMNS = [S.VIDEO_ID, S.FRAME_INDEX, S.PTS_S, S.SPAN_END_S, S.ENCODER, S.SPACE, S.DIM, S.TOKEN_DTYPE,
                  S.GLOBAL_TOKEN, S.GLOBAL_SCALE, S.GRID_SIZE, S.GRID_TOKENS, S.GRID_SCALES, S.PATCH_GRID_H,
                  S.PATCH_GRID_W, S.PATCH_INDEX, S.PATCH_TOKENS, S.PATCH_SCALES]


class QueryError(RayVlmError, ValueError):
    """A query the service cannot answer as asked (empty, too long, unknown video, wrong space)."""

    code = "query_invalid"


@dataclass(frozen=True)
class Moment:
    """One answer: ``[start_s, end_s)`` of ``video_id``; ``score`` is calibrated in [0, 1] and compares across
    videos and queries; ``z`` is the fused calibrated contrast at ``peak_s`` (visual). ``tracks``: the tracks
    that support the moment (``visual``, ``speech``, ``text``); ``evidence``: what the text tracks found there,
    ``{"track", "start_s", "end_s", "text"}`` each (the words spoken, the text on screen)."""

    video_id: str
    uri: str
    start_s: float
    end_s: float
    score: float
    peak_s: float
    z: float = 0.0
    tracks: tuple[str, ...] = ("visual",)
    evidence: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def check_query(text: str) -> str:
    """Validate a free-text query; return it stripped of surrounding white space."""
    if not isinstance(text, str):
        raise QueryError("the query must be a string")
    # Control characters (and lone surrogates, format characters...) become a space, not nothing: "a\x00cat" is
    # two words, as a reader of the raw text would see it.
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        raise QueryError("the query is empty")
    if len(cleaned) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(cleaned)} characters; at most {MAX_QUERY_CHARS} are accepted")
    return cleaned


# ================================================================ the library: a store's tokens, decoded once


def _video_info(videos_t) -> dict[str, dict]:
    """``{video_id: {"uri", "duration_s", "status", "frames"}}`` of a videos table."""
    cols = [S.VIDEO_ID, S.URI, S.DURATION_S, S.STATUS, S.FRAMES_SAMPLED, S.FRAMES_KEPT, S.ENCODER, S.SPACE]
    return {r[S.VIDEO_ID]: {"uri": r[S.URI], "duration_s": r[S.DURATION_S], "status": r[S.STATUS],
                            "frames": r[S.FRAMES_SAMPLED], "frames_kept": r[S.FRAMES_KEPT],
                            "encoder": r[S.ENCODER], "space": r[S.SPACE]}
            for r in videos_t.select(cols).to_pylist()}


def decode_video_tokens(frames, info: Mapping[str, dict]) -> dict[str, G.VideoTokens]:
    """Decode a frames table (``_FRAME_COLUMNS``, sorted by video_id, frame_index) into one VideoTokens per video.

    Videos whose row in ``info`` is failed are skipped. Patch grids are rebuilt per video (``patch_sources``).
    """
    import pyarrow.compute as pc

    from ray_vlm.store.codec import binary_column_values, column_to_matrix, vectors_per_row

    out: dict[str, G.VideoTokens] = {}
    n = frames.num_rows
    if n == 0:
        return out
    dim = int(frames.column(S.DIM)[0].as_py())
    dtype = frames.column(S.TOKEN_DTYPE)[0].as_py()
    vd = pc.dictionary_encode(frames.column(S.VIDEO_ID).combine_chunks())
    vid_code, vid_names = vd.indices.to_numpy(zero_copy_only=False), vd.dictionary.to_pylist()
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
    bounds = np.flatnonzero(vid_code[1:] != vid_code[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    for a, b in zip(starts, ends):
        vid = str(vid_names[vid_code[a]])
        if info.get(vid, {}).get("status") == S.STATUS_FAILED:
            continue
        kw = {}
        if have_patches and counts[a:b].sum() > 0:
            pa_, pb_ = int(pstart[a]), int(pstart[b])
            kw = {"patch_codes": codes[pa_:pb_], "patch_scales": pscales[pa_:pb_],
                  "patch_src": G.patch_sources(counts[a:b], pindex[pa_:pb_], int(gh[a] * gw[a]))}
        out[vid] = G.VideoTokens(
            video_id=vid, pts_s=pts[a:b], span_end_s=span[a:b], frame_index=fidx[a:b],
            global_tokens=glob[a:b], grid_tokens=None if grid is None else grid[a:b],
            uri=info.get(vid, {}).get("uri", ""), **kw)
    return out


# ================================================================ the Searcher: retrieve candidates, then ground


@dataclass(frozen=True)
class RetrievalParams:
    """Knobs of the retrieval stage (what gets grounded) and of the token cache.

    Attributes:
        k_windows: ANN candidate windows per query (``WindowIndex.search``).
        neighbours: windows either side of a candidate (same video) grounded with it, so an event cut by a
            window boundary is whole and the moment's start/end can be refined outside the hit window.
        max_videos: candidate spans are kept from this many videos at most (the best by exact best-frame
            cosine; each kept video's tokens are read once).
        whole_below_frames: a library of at most this many frames (default: one video-hour at 1 fps) is
            grounded whole, without the ANN stage. Grounding every frame costs little there (``bench query``),
            and it keeps what retrieval over global tokens cannot see: a small object only the context tokens
            find, and the weaker moments of other videos (library mAP on the grounding benchmark). 0 always
            retrieves.
        cache_bytes: decoded tokens of candidate videos kept in memory (LRU by video and committed version).
        index: window index settings (default ``WindowIndexConfig()``).
        cache_dir: local directory for shard files of a remote store's index.
    """

    k_windows: int = 64
    neighbours: int = 1
    max_videos: int = 16
    whole_below_frames: int = 3_600
    cache_bytes: int = 1 << 30
    index: WindowIndexConfig | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("k_windows", "max_videos"):
            if int(getattr(self, name)) < 1:
                raise QueryError(f"{name} must be at least 1")
        if self.neighbours < 0 or self.whole_below_frames < 0 or self.cache_bytes < 0:
            raise QueryError("neighbours, whole_below_frames and cache_bytes must not be negative")


DEFAULT_RETRIEVAL = RetrievalParams()


@dataclass(frozen=True)
class Candidates:
    """Where to ground one query: spans of videos of one store version (picklable; crosses Serve deployments).

    Attributes:
        store: the store URI; version: its store version (immutable: any process can read it).
        video_ids, start_s, end_s: one entry per span; ``[start_s, end_s)`` in the video's time, ``end_s`` inf
            for "to the end" (whole videos).
        scores: retrieval score per span: exact cosine of the query with the span's best frame's global token
            (NaN where nothing was retrieved: whole videos of a small library or of ``--video``).
        whole: the spans are whole videos (small-library fallback or a named video).
    """

    store: str
    version: int
    video_ids: tuple[str, ...] = ()
    start_s: tuple[float, ...] = ()
    end_s: tuple[float, ...] = ()
    scores: tuple[float, ...] = ()
    whole: bool = False

    def __post_init__(self):
        n = len(self.video_ids)
        if not (len(self.start_s) == len(self.end_s) == len(self.scores) == n):
            raise QueryError("Candidates: video_ids, start_s, end_s and scores must have one entry per span")

    def __len__(self) -> int:
        return len(self.video_ids)

    def spans(self) -> list[tuple[str, float, float, float]]:
        """``[(video_id, start_s, end_s, score)]``."""
        return list(zip(self.video_ids, self.start_s, self.end_s, self.scores))

    def to_dict(self) -> dict:
        """JSON-safe form (inf and NaN become None)."""
        def clean(xs):
            return [float(x) if np.isfinite(x) else None for x in xs]
        return {"store": self.store, "version": self.version, "video_ids": list(self.video_ids),
                "start_s": clean(self.start_s), "end_s": clean(self.end_s), "scores": clean(self.scores),
                "whole": self.whole}

    @classmethod
    def from_dict(cls, d: Mapping) -> Candidates:
        return cls(str(d["store"]), int(d["version"]), tuple(d["video_ids"]),
                   tuple(0.0 if x is None else float(x) for x in d["start_s"]),
                   tuple(np.inf if x is None else float(x) for x in d["end_s"]),
                   tuple(np.nan if x is None else float(x) for x in d["scores"]), bool(d["whole"]))


@dataclass
class _VersionState:
    """What a Searcher knows about one store version (manifest facts, the index once needed, calibration)."""

    version: int
    info: dict[str, dict]  # every video row, failed ones included
    live: dict[str, int]  # video_id -> committed_version, videos with frames
    frames: dict[str, int]  # video_id -> frames kept (sources row)
    encoder_id: str
    space: str
    index: WindowIndex | None = None
    sample: dict[str, G.VideoTokens] | None = None
    units: dict = field(default_factory=dict)
    tracks: TrackIndex | None = None  # the text tracks (speech, on-screen text), read on first use

    @property
    def num_frames(self) -> int:
        return sum(self.frames.values())


class Searcher:
    """"When does X happen?" over one token store: retrieve candidate windows, ground inside them, rank.

    The query path:

    1. ``encode``: the query text through the store's own encoder (checked: same embedding space).
    2. ``retrieve``: candidate windows from the store's window ANN index (``ray_vlm.query.windows``: usearch HNSW over
       global tokens, sharded, versioned with the store), plus ``neighbours`` windows either side, merged
       into spans of contiguous frames, kept from the ``max_videos`` best videos (exact best-frame cosine).
       A library of at most ``whole_below_frames`` frames is grounded whole instead (see ``RetrievalParams``);
       a named ``video`` is always grounded whole.
    3. ``ground``: per span, score curves from content + context tokens (``ray_vlm.query.grounding``), calibrated
       on a fixed sample of library frames (all frames up to ``CALIBRATION_SAMPLE_FRAMES``; beyond, that many
       frames drawn from the first videos in video_id order: content hashes, so a stable, unbiased pick that
       new videos rarely disturb), moments extracted and merged into one ranking by calibrated score.

    ``ground`` needs only what ``Candidates`` carry (store version, video ids, spans), so a grounder replica
    (another Searcher of the same store, another process) grounds what a retriever replica retrieved. Tokens
    are read per candidate video (the store's read unit; patch grids are rebuilt over the whole video, so
    context tokens inside a window see patches kept before it) and kept in an LRU cache keyed by (video,
    committed version): ``refresh`` to a newer store version keeps every untouched video's tokens, and the
    index increment re-uses every untouched shard.

    Thread-safe: ``refresh`` swaps the version state atomically; searches in flight finish on the old one.

    Args:
        store: token store URI.
        storage_options: fsspec options of the store.
        encoder: a loaded encoder of the store's space (default: the store's own, loaded on first ``encode``).
        params: grounding knobs (default ``grounding.DEFAULT_PARAMS``).
        retrieval: retrieval knobs (default ``RetrievalParams()``).
        version: serve this store version (default: the latest).

    A store with no videos yet (version 0) is served too: ``refresh`` picks up its first commit, and queries
    until then raise QueryError.

    Raises:
        QueryError: the store (version) cannot be read.
    """

    def __init__(self, store: str, *, storage_options: dict | None = None, encoder=None,
                 params: G.GroundingParams | None = None, retrieval: RetrievalParams | None = None,
                 version: int | None = None):
        from ray_vlm.store.token_store import TokenStore

        self.store = str(store)
        self.storage_options = dict(storage_options or {})
        self.params = params or G.DEFAULT_PARAMS
        self.retrieval = retrieval or DEFAULT_RETRIEVAL
        self._encoder = encoder
        self._ts = TokenStore(self.store, self.storage_options)
        self._lock = threading.RLock()
        self._tokens: OrderedDict[tuple[str, int], G.VideoTokens] = OrderedDict()
        self._token_bytes = 0
        self._states: OrderedDict[int, _VersionState] = OrderedDict()
        self._state = self._load_state(self._ts.latest_version() if version is None else int(version))
        if encoder is not None:
            self._check_space(encoder)

    def __repr__(self) -> str:
        return f"Searcher({self.store!r} v{self.version}, {len(self._state.live)} videos)"

    # ---------------------------------------------------------------- versions
    @property
    def version(self) -> int:
        """The store version served."""
        return self._state.version

    @property
    def space(self) -> str:
        """Embedding space id of the store's vectors ("" for a store without frames)."""
        return self._state.space

    @property
    def encoder_id(self) -> str:
        return self._state.encoder_id

    def refresh(self) -> bool:
        """Serve the newest committed store version if there is a newer one; True if it changed.

        The window index (when this Searcher uses one) is brought to the new version incrementally
        (``ensure_index``: untouched shards kept, new and replaced videos indexed); decoded tokens of videos the
        new version did not replace stay cached.
        """
        latest = self._ts.latest_version()
        if latest <= self.version:
            return False
        state = self._load_state(latest)
        if self._encoder is not None and state.space and self._encoder.spec.space != state.space:
            raise QueryError(f"the store's space is now {state.space!r} but the query encoder's is "
                             f"{self._encoder.spec.space!r}")
        old = self._state
        if old.index is not None and state.num_frames > self.retrieval.whole_below_frames:
            self._index(state)  # a retriever: bring its index up before serving the new version
        self._state = state
        return True

    def prepare(self, *, retrieve: bool = True, ground: bool = True) -> Searcher:
        """Do the first query's one-off work now (a Serve replica's start): load or build the window index
        (``retrieve``, only for a library above ``whole_below_frames``), read the calibration sample and load
        the encoder (``ground``). Returns self."""
        st = self._state
        if retrieve and st.num_frames > self.retrieval.whole_below_frames:
            self._index(st)
        if ground and st.live:
            self._calibration(st, self.encode(["a person"]), self.params)
        return self

    def _load_state(self, version: int) -> _VersionState:
        from ray_vlm.query.windows import live_videos
        from ray_vlm.store.token_store import StoreError

        with self._lock:
            st = self._states.get(version)
            if st is not None:
                return st
            older = [v for v in self._states if v < version]
            prev = self._states[max(older)] if older else None
        try:
            m = self._ts.manifest(version)
            # a refresh reads the rows of the videos that changed since the state it follows, not the whole table
            changed = None if prev is None else self._ts.changed_video_ids(prev.version, version)
            videos_t = self._ts.read_videos(version, video_ids=changed)
        except StoreError as e:
            raise QueryError(str(e)) from e
        info = dict(prev.info) if prev is not None else {}
        if videos_t.num_rows:
            info.update(_video_info(videos_t))
        if prev is None:
            live = live_videos(m)
            frames = {v: int(m["videos"][v].get("frames_kept") or 0) for v in live}
            spaces = {info[v]["space"] for v in live if info.get(v, {}).get("space")}
            encoders = {info[v]["encoder"] for v in live if info.get(v, {}).get("encoder")}
        else:
            changed = changed or []
            live, frames = dict(prev.live), dict(prev.frames)
            for v in changed:
                live.pop(v, None)
                frames.pop(v, None)
            for v, cv in live_videos({"videos": {v: m["videos"][v] for v in changed if v in m["videos"]}}).items():
                live[v], frames[v] = cv, int(m["videos"][v].get("frames_kept") or 0)
            spaces = {prev.space} if prev.space and prev.live else set()
            encoders = {prev.encoder_id} if prev.encoder_id and prev.live else set()
            spaces |= {info[v]["space"] for v in changed if v in live and info.get(v, {}).get("space")}
            encoders |= {info[v]["encoder"] for v in changed if v in live and info.get(v, {}).get("encoder")}
        if len(spaces) > 1:
            raise QueryError(f"the store {self.store} v{version} mixes embedding spaces {sorted(spaces)}")
        st = _VersionState(int(m["version"]), info, live, frames, min(encoders) if encoders else "",
                           spaces.pop() if spaces else "")
        with self._lock:
            self._states[st.version] = st
            while len(self._states) > 4:
                self._states.popitem(last=False)
        return st

    def _index(self, state: _VersionState):
        """The window index of a version (built or brought up to date on first use)."""
        from ray_vlm.query.windows import WindowIndexConfig, WindowIndexError, ensure_index

        if state.index is None:
            with self._lock:
                if state.index is None:
                    try:
                        state.index = ensure_index(self.store, self.storage_options, version=state.version,
                                                   config=self.retrieval.index or WindowIndexConfig(),
                                                   cache_dir=self.retrieval.cache_dir, space=state.space or None)
                    except WindowIndexError as e:
                        raise QueryError(f"the window index of {self.store} v{state.version}: {e}") from e
        return state.index

    # ---------------------------------------------------------------- the store
    @property
    def num_videos(self) -> int:
        """Video rows of the served version, failed ones included."""
        return len(self._state.info)

    def videos(self) -> list[dict]:
        """Every video row of the served version: ``video_id, uri, status, duration_s, frames`` (sampled)."""
        return [{"video_id": v, "uri": r["uri"], "status": r["status"], "duration_s": r["duration_s"],
                 "frames": r["frames"]} for v, r in sorted(self._state.info.items())]

    def duration_s(self, video_id: str) -> float:
        """Seconds of ``video_id``: its decoded duration, else the end of its last frame's span (0.0 if none)."""
        st = self._state
        d = st.info[video_id].get("duration_s")
        if d is not None and np.isfinite(d) and d > 0:
            return float(d)
        vt = self._video_tokens(st, [video_id]).get(video_id) if video_id in st.live else None
        return vt.end_s if vt is not None else 0.0

    def resolve_video(self, video: str) -> list[str]:
        """Video ids matching a video_id or a file name stem / name (QueryError when none)."""
        info = self._state.info
        ids = [v for v, r in info.items() if v == video or PurePosixPath(r["uri"]).stem == video
               or PurePosixPath(r["uri"]).name == video]
        if not ids:
            raise QueryError(f"no video {video!r} in the store (give a video_id or a file name stem)")
        return sorted(ids)

    # ---------------------------------------------------------------- encode
    @property
    def encoder(self):
        """The query encoder (the store's own unless one was given), loaded on first use."""
        if self._encoder is None:
            if not self.encoder_id:
                raise QueryError(f"the store {self.store} has no indexed frames (no encoder to query with)")
            self._encoder = _cached_encoder(self.encoder_id)
            self._check_space(self._encoder)
        return self._encoder

    def _check_space(self, encoder) -> None:
        if self.space and encoder.spec.space != self.space:
            raise QueryError(f"the store's space is {self.space!r} but the query encoder's is "
                             f"{encoder.spec.space!r}")

    def encode(self, texts: list[str]) -> np.ndarray:
        """Query embeddings float32 (Q, D) by the store's encoder (each text checked by ``check_query``)."""
        if isinstance(texts, str):
            texts = [texts]
        cleaned = [check_query(t) for t in texts]
        if not cleaned:
            raise QueryError("no query")
        return _encode(self.encoder, cleaned)

    # ---------------------------------------------------------------- retrieve
    def retrieve(self, queries: np.ndarray, *, top_k: int = 5, video: str | None = None) -> list[Candidates]:
        """Where to ground each query (one ``Candidates`` per query row).

        Args:
            queries: float32 (Q, D) or (D,) query embeddings of the store's space.
            top_k: moments wanted (at least ``top_k`` ANN windows are fetched, and spans of ``top_k`` videos kept).
            video: only this video (video_id or file name stem): grounded whole, no ANN.
        """
        q = self._queries(queries)
        _check_top_k(top_k)
        st = self._state
        rp = self.retrieval
        self._require_videos(st)
        if video is not None:
            ids = [v for v in self.resolve_video(video) if v in st.live]
            return [self._whole(st, ids) for _ in range(len(q))]
        if not st.live:
            return [Candidates(self.store, st.version) for _ in range(len(q))]
        if st.num_frames <= rp.whole_below_frames:
            return [self._whole(st, sorted(st.live)) for _ in range(len(q))]
        index = self._index(st)
        k = max(rp.k_windows, int(top_k))
        found = index.search(q, k, threads=1 if len(q) == 1 else None)
        out = []
        for qi, (ids, _) in enumerate(found):
            block = index.frames_of(ids, rp.neighbours)
            exact = block.score(q[qi]) if len(block) else np.zeros(0, np.float32)
            spans = []
            for vid, rows in block.segments():
                if rows.stop <= rows.start:
                    continue
                spans.append((vid, float(block.pts_s[rows.start]), float(block.span_end_s[rows.stop - 1]),
                              float(exact[rows].max())))
            best: dict[str, float] = {}
            for vid, _, _, sc in spans:
                best[vid] = max(best.get(vid, -np.inf), sc)
            keep = set(sorted(best, key=lambda v: -best[v])[: max(rp.max_videos, int(top_k))])
            spans = sorted((s for s in spans if s[0] in keep), key=lambda s: -s[3])
            out.append(Candidates(self.store, st.version, tuple(s[0] for s in spans), tuple(s[1] for s in spans),
                                  tuple(s[2] for s in spans), tuple(s[3] for s in spans), False))
        return out

    def _require_videos(self, st: _VersionState) -> None:
        if not st.info:
            raise QueryError(f"the store {self.store} holds no videos (v{st.version})")

    def _whole(self, st: _VersionState, ids: Sequence[str]) -> Candidates:
        n = len(ids)
        return Candidates(self.store, st.version, tuple(ids), (0.0,) * n, (np.inf,) * n, (np.nan,) * n, True)

    def _queries(self, queries) -> np.ndarray:
        try:
            q = G.as_queries(queries)
        except G.GroundingError as e:
            raise QueryError(str(e)) from e
        if len(q) == 0:
            raise QueryError("no query vectors")
        if not np.all(np.isfinite(q)):
            raise QueryError("query vectors contain NaN or inf")
        return q

    # ---------------------------------------------------------------- ground
    def ground(self, queries: np.ndarray, candidates: Sequence[Candidates], *, top_k: int = 5
               ) -> list[list[Moment]]:
        """Ground each query inside its candidates and rank its moments across videos.

        Args:
            queries: float32 (Q, D) query embeddings (the ones the candidates were retrieved for).
            candidates: Q ``Candidates`` of this store (any version still readable).
            top_k: moments per query at most.

        Returns:
            Per query, up to ``top_k`` moments best first (calibrated scores compare across videos).
        """
        q = self._queries(queries)
        _check_top_k(top_k)
        if len(candidates) != len(q):
            raise QueryError(f"{len(q)} queries but {len(candidates)} candidate lists")
        params = replace(self.params, max_moments=max(self.params.max_moments, min(int(top_k), 20)))
        out: list[list[Moment]] = [[] for _ in range(len(q))]
        by_version: dict[int, list[int]] = {}
        for i, c in enumerate(candidates):
            if c.store != self.store:
                raise QueryError(f"candidates of store {c.store!r} given to a searcher of {self.store!r}")
            if len(c):
                by_version.setdefault(int(c.version), []).append(i)
        for version, rows in by_version.items():
            st = self._state if version == self.version else self._load_state(version)
            res = self._ground_version(st, q[rows], [candidates[i] for i in rows], params)
            for i, ms in zip(rows, res):
                out[i] = [_moment_of(st, m) for m in ms[: int(top_k)]]
        return out

    def _ground_version(self, st: _VersionState, q: np.ndarray, cands: Sequence[Candidates],
                        params: G.GroundingParams) -> list[list[G.GroundedMoment]]:
        spans = [c.spans() for c in cands]
        tokens = self._video_tokens(st, sorted({s[0] for sp in spans for s in sp}))
        return ground_spans(tokens, spans, q, self._calibration(st, q, params), params)

    def search_vectors(self, queries: np.ndarray, *, top_k: int = 5, video: str | None = None
                       ) -> list[list[Moment]]:
        """``ground(retrieve(queries))``: per query, up to ``top_k`` moments best first."""
        q = self._queries(queries)
        return self.ground(q, self.retrieve(q, top_k=top_k, video=video), top_k=top_k)

    def search(self, text: str, *, top_k: int = 5, video: str | None = None,
               tracks: Sequence[str] | str = "all") -> list[Moment]:
        """Ranked moments where ``text`` happens (in the whole library, or in one ``video``: id or file stem).

        ``tracks``: ``"all"`` (default), or some of ``visual``, ``speech``, ``text``: the visual channels ground the
        query in the frames; speech and on-screen text are searched lexically and semantically
        (``ray_vlm.query.tracks``). Moments of different tracks that overlap in one video are one moment, with
        each track's support and evidence; its times are the text track's (word times) when one supports it.
        """
        text = check_query(text)
        _check_top_k(top_k)
        want = parse_tracks(tracks)
        st = self._state
        self._require_videos(st)
        ids = None
        if video is not None:
            ids = self.resolve_video(video)  # an unknown video is an error even in a store without frames
        visual: list[Moment] = []
        if TRACK_VISUAL in want and st.live and (ids is None or any(v in st.live for v in ids)):
            visual = self.search_vectors(self.encode([text]), top_k=top_k, video=video)[0]
        return self.with_tracks(text, visual, top_k=top_k, video=video, tracks=sorted(want))

    def with_tracks(self, text: str, visual: Sequence[Moment], *, top_k: int = 5, video: str | None = None,
                    tracks: Sequence[str] | str = "all", version: int | None = None) -> list[Moment]:
        """``visual`` moments (dropped unless ``visual`` is among ``tracks``) fused with the speech and on-screen
        text tracks' moments for ``text``: one ranking, best first, at most ``top_k``."""
        want = parse_tracks(tracks)
        st = self._state if version is None or int(version) == self.version else self._load_state(int(version))
        ids = self.resolve_video(video) if video is not None else None
        hits: list[TrackHit] = []
        if want & {TRACK_SPEECH, TRACK_TEXT}:
            index = self._track_index(st)
            if len(index):
                hits = index.search(text, _minilm_query(text), tracks=sorted(want - {TRACK_VISUAL}),
                                    video_ids=ids, top_k=max(int(top_k), 10))
        return fuse(st, list(visual) if TRACK_VISUAL in want else [], hits)[: int(top_k)]

    def _track_index(self, st: _VersionState) -> TrackIndex:
        """The text tracks of a version (read on first use)."""
        if st.tracks is None:
            with self._lock:
                if st.tracks is None:
                    from ray_vlm.store.token_store import StoreError

                    try:
                        segments = self._ts.read_segments(st.version)
                    except StoreError as e:
                        raise QueryError(str(e)) from e
                    st.tracks = TrackIndex(segments)
        return st.tracks

    def score_curve(self, query: np.ndarray, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated score curve of one query over one video: the curve moments are cut from.

        Args:
            query: float32 (D,) query embedding (``encode([text])[0]``).
            video_id: a video of the served store version.

        Returns:
            (times_s float64 (N,), score float64 (N,) in [0, 1]) at every *sampled* frame (pruned samples repeat
            the frame that stands for them), smoothed as moment extraction smooths it, calibrated against the
            whole library so heights compare across videos. Empty for a video without frames.
        """
        st = self._state
        params = self.params
        vt = self._video_tokens(st, [video_id]).get(video_id)
        if vt is None or vt.num_frames == 0:
            return np.zeros(0), np.zeros(0)
        q = G.as_queries(query)[:1]
        calib = self._calibration(st, q, params)
        z = G.fuse(G.frame_scores(vt, q, params), calib, params)[:, 0]  # (T,)
        times, owner, dt = G.sample_grid(vt.pts_s, vt.span_end_s, vt.frame_index)
        curve = G.smooth(np.asarray(z, dtype=np.float64)[owner], params.smooth_s / dt)
        return times, np.asarray(G.calibrated_score(curve, params), dtype=np.float64)

    # ---------------------------------------------------------------- tokens and calibration
    def _video_tokens(self, st: _VersionState, video_ids: Sequence[str]) -> dict[str, G.VideoTokens]:
        """Decoded tokens of some videos of a version (read once, then from the LRU cache)."""
        out, missing = {}, []
        with self._lock:
            for v in video_ids:
                if v not in st.live:
                    continue
                key = (v, st.live[v])
                vt = self._tokens.get(key)
                if vt is None:
                    missing.append(v)
                else:
                    self._tokens.move_to_end(key)
                    out[v] = vt
        if missing:
            table = self._ts.read_frames(st.version, video_ids=missing, columns=_FRAME_COLUMNS)
            got = decode_video_tokens(table, st.info)
            with self._lock:
                for v, vt in got.items():
                    out[v] = vt
                    key = (v, st.live[v])
                    if key not in self._tokens:
                        self._tokens[key] = vt
                        self._token_bytes += tokens_nbytes(vt)
                while self._token_bytes > self.retrieval.cache_bytes and len(self._tokens) > 1:
                    _, old = self._tokens.popitem(last=False)
                    self._token_bytes -= tokens_nbytes(old)
        return out

    def _sample(self, st: _VersionState) -> dict[str, G.VideoTokens]:
        """The version's calibration sample: ``{video_id: tokens of the sampled frames}``.

        All frames when the library has at most ``CALIBRATION_SAMPLE_FRAMES``; otherwise that many frames drawn
        (seeded) from the first videos in video_id order holding 4x as many frames (at most 64 videos), read
        one video at a time and kept compact (only the patch rows the sampled frames use).
        """
        if st.sample is not None:
            return st.sample
        order = sorted(st.live)
        if st.num_frames <= CALIBRATION_SAMPLE_FRAMES:
            sample = self._video_tokens(st, order)
        else:
            chosen: list[str] = []
            n = 0
            for v in order:
                if n >= 4 * CALIBRATION_SAMPLE_FRAMES or len(chosen) >= 64:
                    break
                chosen.append(v)
                n += st.frames[v]
            rng = np.random.default_rng(0)
            sample = {}
            for v in chosen:
                vt = self._video_tokens(st, [v]).get(v)
                if vt is None or vt.num_frames == 0:
                    continue
                want = min(vt.num_frames, max(1, int(round(CALIBRATION_SAMPLE_FRAMES * st.frames[v] / max(n, 1)))))
                rows = np.sort(rng.choice(vt.num_frames, want, replace=False))
                sample[v] = _compact(vt.rows(rows))
        with self._lock:
            if st.sample is None:
                st.sample = sample
        return st.sample

    def _calibration(self, st: _VersionState, q: np.ndarray, params: G.GroundingParams) -> G.Calibration:
        """Library-wide calibration of the queries (per-query centres cached by query vector and params)."""
        sample = self._sample(st)
        key = (self.encoder.spec.id, self.encoder.spec.revision, tuple(params.channels), params.context_tau,
               params.context_top_m, params.center_quantile, params.unit_quantile)
        units = st.units.get(key)
        if units is None:
            refs = _encode(self.encoder, list(G.REFERENCE_QUERIES))
            units = G.channel_units(scores_on(sample, refs, params), params)
            st.units[key] = units
        centres = st.units.setdefault(("centres",) + key, OrderedDict())
        keys = [qi.tobytes() for qi in q]
        with self._lock:
            known = {k: centres[k] for k in keys if k in centres}
        todo = list(dict.fromkeys(k for k in keys if k not in known))
        if todo:
            rows = [keys.index(k) for k in todo]
            cal = G.calibration_from_scores(scores_on(sample, q[rows], params), units, params)
            for j, k in enumerate(todo):
                known[k] = {ch: float(c[j]) for ch, c in cal.center.items()}
            with self._lock:
                for k in todo:
                    centres[k] = known[k]
                while len(centres) > 4096:
                    centres.popitem(last=False)
        got = [known[k] for k in keys]
        channels = sorted(set().union(*got)) if got else []
        return G.Calibration({ch: np.asarray([g[ch] for g in got], np.float32) for ch in channels},
                             {ch: float(units.get(ch, 1.0)) for ch in channels})


def ground_spans(tokens: Mapping[str, G.VideoTokens], spans: Sequence[Sequence[tuple]], queries: np.ndarray,
                 calibration: G.Calibration, params: G.GroundingParams = G.DEFAULT_PARAMS
                 ) -> list[list[G.GroundedMoment]]:
    """Ground each query inside its spans; per query, moments of all its spans best first (NMS per video).

    Args:
        tokens: ``{video_id: VideoTokens}`` of every video named in ``spans`` (a missing one is skipped).
        spans: per query, ``[(video_id, start_s, end_s, ...)]``; ``[0, inf)`` is the whole video.
        queries: float32 (Q, D).
        calibration: of the Q queries (library-wide).
        params: grounding knobs.

    Each distinct span is scored once, with every query that asked for it (one matmul per channel).
    """
    q = G.as_queries(queries)
    todo: dict[tuple[str, float, float], list[int]] = {}
    for i, sp in enumerate(spans):
        for span in sp:
            todo.setdefault((str(span[0]), float(span[1]), float(span[2])), []).append(i)
    found: list[list[G.GroundedMoment]] = [[] for _ in range(len(q))]
    for (vid, s, e), rows in todo.items():
        vt = tokens.get(vid)
        if vt is None:
            continue
        if not (s <= vt.start_s and e >= vt.end_s):  # a window (whole videos come as [0, inf))
            vt = vt.window(s, e, compact="context" in params.channels)
        if vt.num_frames == 0:
            continue
        z = G.fuse(G.frame_scores(vt, q[rows], params), calibration.take(rows), params)  # (T, len(rows))
        for j, i in enumerate(rows):
            found[i].extend(G.ground_curve(vid, vt.pts_s, vt.span_end_s, vt.frame_index, z[:, j], params))
    # A moment lies inside its span and a query's spans never overlap (``WindowIndex.frames_of`` merges them),
    # so the per-span NMS of ``ground_curve`` is all there is to do: rank (stable: ties keep span order).
    return [sorted(f, key=lambda m: -m.score) for f in found]


def scores_on(sample: Mapping[str, G.VideoTokens], q: np.ndarray, params: G.GroundingParams
               ) -> dict[str, np.ndarray]:
    """``{channel: (N_sample, Q)}`` scores of queries on a calibration sample."""
    parts: dict[str, list[np.ndarray]] = {}
    for vt in sample.values():
        for ch, s in G.frame_scores(vt, q, params).items():
            parts.setdefault(ch, []).append(s)
    return {ch: np.concatenate(p) for ch, p in parts.items()}


def _compact(vt: G.VideoTokens) -> G.VideoTokens:
    """Copy of ``vt`` holding only its own rows and the patch rows its frames point at (a small sample of a long
    video, kept without the rest of the video)."""
    return replace(vt.compact_patches(), global_tokens=vt.global_tokens.copy(),
                   grid_tokens=None if vt.grid_tokens is None else vt.grid_tokens.copy())


def tokens_nbytes(vt: G.VideoTokens) -> int:
    return int(sum(a.nbytes for a in (vt.pts_s, vt.span_end_s, vt.frame_index, vt.global_tokens, vt.grid_tokens,
                                      vt.patch_codes, vt.patch_scales, vt.patch_src) if a is not None))


def parse_tracks(tracks: Sequence[str] | str) -> set[str]:
    """``"all"``, one track or a list of them (``visual``, ``speech``, ``text``) as a set; QueryError if unknown."""
    if isinstance(tracks, str):
        tracks = TRACKS if tracks == "all" else [t for t in tracks.split(",") if t.strip()]
    out = {str(t).strip() for t in tracks}
    bad = sorted(out - set(TRACKS))
    if bad or not out:
        raise QueryError(f"unknown track(s) {bad}; expected 'all' or some of {list(TRACKS)}")
    return out


# Fusion: where tracks agree, the moment's score rises towards 1 by this share of the weaker track's score.
_AGREEMENT = 0.5


def fuse(st: _VersionState, visual: Sequence[Moment], hits: Sequence[TrackHit]) -> list[Moment]:
    """One ranking of visual moments and text-track hits: overlapping ones of a video become one moment."""
    out: list[Moment] = []
    for h in sorted(hits, key=lambda h: -h.score):
        ev = {"track": h.track, "start_s": round(h.start_s, 3), "end_s": round(h.end_s, 3), "text": h.text}
        for i, m in enumerate(out):
            if m.video_id == h.video_id and h.start_s < m.end_s and m.start_s < h.end_s:
                if h.track not in m.tracks:
                    out[i] = replace(m, tracks=m.tracks + (h.track,), evidence=m.evidence + (ev,),
                                     score=_agree(m.score, h.score))
                break
        else:
            out.append(Moment(h.video_id, st.info.get(h.video_id, {}).get("uri", ""), h.start_s, h.end_s, h.score,
                              (h.start_s + h.end_s) / 2, 0.0, (h.track,), (ev,)))
    for v in visual:
        for i, m in enumerate(out):
            if m.video_id == v.video_id and v.start_s < m.end_s and m.start_s < v.end_s:
                if TRACK_VISUAL not in m.tracks:
                    out[i] = replace(m, tracks=m.tracks + (TRACK_VISUAL,), score=_agree(m.score, v.score), z=v.z)
                break
        else:
            out.append(v)
    return sorted(out, key=lambda m: -m.score)


def _agree(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return float(hi + _AGREEMENT * lo * (1.0 - hi))


_MINILM: list = []
_MINILM_LOCK = threading.Lock()


def _minilm_query(text: str) -> np.ndarray:
    """The query's MiniLM embedding (the text tracks' space), the model loaded once per process."""
    with _MINILM_LOCK:
        if not _MINILM:
            from ray_vlm.models.bundled import MiniLMText

            _MINILM.append(MiniLMText())
        model = _MINILM[0]
    with _TEXT_LOCK:
        hit = _TEXT_CACHE.get(("minilm-tracks", text))
    if hit is not None:
        return hit
    vec = model.encode([text]).cpu().numpy()[0].astype(np.float32)
    with _TEXT_LOCK:
        _TEXT_CACHE[("minilm-tracks", text)] = vec
    return vec


def _moment_of(st: _VersionState, m: G.GroundedMoment) -> Moment:
    return Moment(m.video_id, st.info.get(m.video_id, {}).get("uri", ""), m.start_s, m.end_s, m.score, m.peak_s,
                  m.z)


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise QueryError("top_k must be at least 1")


_SEARCHERS: OrderedDict[tuple, Searcher] = OrderedDict()
_SEARCHERS_LOCK = threading.Lock()


def get_searcher(store: str, storage_options: dict | None = None, *, encoder=None,
                 params: G.GroundingParams | None = None, retrieval: RetrievalParams | None = None,
                 refresh: bool = True) -> Searcher:
    """A process-wide cached Searcher of ``store`` (one per store, options, encoder, params and retrieval
    params), refreshed to the newest committed version when ``refresh``."""
    key = (str(store), repr(sorted((storage_options or {}).items())), id(encoder) if encoder is not None else None,
           repr(params), repr(retrieval))
    with _SEARCHERS_LOCK:
        s = _SEARCHERS.get(key)
        if s is not None:
            _SEARCHERS.move_to_end(key)
    if s is None:
        s = Searcher(store, storage_options=storage_options, encoder=encoder, params=params,
                     retrieval=retrieval)
        with _SEARCHERS_LOCK:
            _SEARCHERS[key] = s
            while len(_SEARCHERS) > _SEARCHER_CACHE_SIZE:
                _SEARCHERS.popitem(last=False)
    elif refresh:
        s.refresh()
    return s


# ================================================================ search


def search(store: str, text: str, *, top_k: int = 5, video: str | None = None,
           storage_options: dict | None = None, encoder=None,
           params: G.GroundingParams | None = None, retrieval: RetrievalParams | None = None,
           tracks: Sequence[str] | str = "all") -> list[Moment]:
    """Ranked moments where ``text`` happens across the store (or in one ``video``: id or file name stem).

    A thin function over a process-wide cached ``Searcher`` (refreshed to the newest committed version on
    every call).

    Args:
        store: token store URI.
        text: the query (1..MAX_QUERY_CHARS printable characters).
        top_k: moments returned at most (library-wide ranking by calibrated score).
        video: only this video (video_id or file-name stem); calibration stays library-wide.
        storage_options: fsspec options of the store.
        encoder: a loaded encoder of the store's space (default: the store's own, loaded once per process).
        params: grounding knobs (default ``grounding.DEFAULT_PARAMS``).
        retrieval: retrieval knobs (default ``RetrievalParams()``).
        tracks: ``"all"`` or some of ``visual``, ``speech``, ``text`` (see ``Searcher.search``).

    Raises:
        QueryError: bad query, top_k or track, empty store, unknown video, encoder of another space.
    """
    text = check_query(text)
    _check_top_k(top_k)
    parse_tracks(tracks)
    s = get_searcher(store, storage_options, encoder=encoder, params=params, retrieval=retrieval)
    return s.search(text, top_k=top_k, video=video, tracks=tracks)


_TEXT_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_TEXT_LOCK = threading.Lock()


def _encode(encoder, texts: list[str]) -> np.ndarray:
    """Text embeddings (Q, D), cached per (encoder, text) (reference queries are embedded once per process)."""
    key_base = (encoder.spec.id, encoder.spec.revision, id(encoder))
    with _TEXT_LOCK:
        got = {t: _TEXT_CACHE[(key_base, t)] for t in texts if (key_base, t) in _TEXT_CACHE}
    missing = list(dict.fromkeys(t for t in texts if t not in got))
    if missing:
        vecs = np.asarray(encoder.encode_text(missing), dtype=np.float32)
        got.update(zip(missing, vecs))
        with _TEXT_LOCK:
            for t in missing:
                _TEXT_CACHE[(key_base, t)] = got[t]
            while len(_TEXT_CACHE) > 4096:
                _TEXT_CACHE.popitem(last=False)
    return np.stack([got[t] for t in texts])


_ENCODERS: dict[str, object] = {}


def _cached_encoder(encoder_id: str):
    from ray_vlm.models import load_encoder

    if encoder_id not in _ENCODERS:
        _ENCODERS[encoder_id] = load_encoder(encoder_id, runtime="torch")  # queries only: text is torch anyway
    return _ENCODERS[encoder_id]


# ================================================================ evaluation



def method_params(method: str, base: G.GroundingParams | None = None) -> G.GroundingParams | None:
    """Grounding params of a scored method (None for the random / whole-video baselines)."""
    base = base or G.DEFAULT_PARAMS
    table = {"fused": G.CHANNELS, "content": G.CONTENT_CHANNELS, "global": ("global",), "context": ("context",)}
    if method in table:
        return replace(base, channels=table[method])
    if method in ("random", "whole"):
        return None
    raise QueryError(f"unknown method {method!r}; expected one of {METHODS}")
