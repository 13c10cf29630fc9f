"""Text tracks at query time: what was said (speech) and what was written on screen (text), searched two ways.

A :class:`TrackIndex` holds one store version's ``segments`` rows of the text tracks: utterances (``speech``: one
sentence each, with its MiniLM embedding), their ``word`` rows (each word's own times) and on-screen text
(``ocr``). A query is scored against every utterance and text box two ways, then ranked as a hybrid:

- lexical: BM25's inverse document frequency over the library's utterances and text boxes; an item's lexical
  score is the share of the query's idf mass its terms cover (words lower-cased, ``'s`` and common suffixes
  stripped by ``_stem``, a short list of English stop words left out), in [0, 1];
- semantic: the cosine between the query's and the item's MiniLM embeddings, calibrated against the library as
  the visual channels are: ``z = (cos - centre) / unit`` with the centre the query's median cosine over the
  library's items (at least :data:`_SEM_CENTER_FLOOR`) and a fixed unit, mapped by ``sigmoid``;
- hybrid: ``1 - (1 - lexical) (1 - semantic)``, scaled by :data:`_MAX_HYBRID` (only an exact phrase reaches
  above it); an item needs lexical or semantic evidence above :data:`_MIN_SCORE` to be returned at all.

A phrase in double quotes must be said (or written) as such: the word track is searched for the phrase's terms in
order (one mismatch allowed in five, for recognition errors), and a match is a moment from its first word's start
to its last word's end, scored ``_PHRASE_SCORE`` (+ the words' mean confidence x 0.04). Without quotes, a
speech moment is the utterance (one sentence), from its first word's start to its last word's end.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ray_vlm.core import schema as S

TRACK_VISUAL, TRACK_SPEECH, TRACK_TEXT = "visual", "speech", "text"
TRACKS = (TRACK_VISUAL, TRACK_SPEECH, TRACK_TEXT)
# segments rows behind each query track
_ROWS_OF = {TRACK_SPEECH: "speech", TRACK_TEXT: "ocr"}

_STOP = frozenset(
    "a an the and or but of to in on at by for with from as is are was were be been being it its this that these "
    "those there here what when where who whom which why how does do did done say says said someone somebody "
    "anyone people person i you he she we they me him her us them my your our their one about into over under "
    "than then so if not no yes just also very can could would should will shall may might must has have had "
    "happen happens happened show shows shown written write writes screen".split()
)
_WORD_RE = re.compile(r"[0-9a-zà-öø-ÿ]+(?:['’][0-9a-z]+)?", re.IGNORECASE)
_PHRASE_RE = re.compile(r'"([^"]+)"|“([^”]+)”')

_SEM_CENTER_FLOOR = 0.15  # MiniLM cosine of unrelated English sentences sits below this
_SEM_UNIT = 0.1
_SEM_SLOPE, _SEM_Z0 = 1.5, 3.0
_MAX_HYBRID = 0.92
_PHRASE_SCORE = 0.95
_MIN_SCORE = 0.2


def terms(text: str, *, keep_stop: bool = False) -> list[str]:
    """Normalised words of ``text``: lower case, ``'s`` and a plural ``s`` dropped (stop words too, unless kept)."""
    out = []
    for m in _WORD_RE.finditer(text.lower()):
        w = re.sub(r"['’]s$", "", m.group(0)).replace("’", "'")
        if keep_stop or w not in _STOP:
            out.append(_stem(w))
    return out


def _stem(w: str) -> str:
    """A light suffix stripper (both sides of a comparison get the same): approved / approves -> approv."""
    for suffix, min_len in (("ing", 6), ("ed", 5), ("es", 5)):
        if w.endswith(suffix) and len(w) >= min_len:
            w = w[: -len(suffix)]
            break
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def quoted_phrases(query: str) -> list[str]:
    """Phrases of ``query`` in double quotes."""
    return [a or b for a, b in _PHRASE_RE.findall(query) if (a or b).strip()]


@dataclass(frozen=True)
class TrackHit:
    """One moment of a text track: ``[start_s, end_s)`` of ``video_id``, ``score`` in [0, 1], its evidence."""

    video_id: str
    track: str
    start_s: float
    end_s: float
    score: float
    text: str
    kind: str = "hybrid"  # "phrase" | "hybrid"


@dataclass
class _Items:
    track: np.ndarray  # object (N,): "speech" | "ocr"
    video_id: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    text: list[str]
    confidence: np.ndarray
    emb: np.ndarray  # float32 (N, D), rows without an embedding are zero
    terms: list[list[str]] = field(default_factory=list)


class TrackIndex:
    """The text tracks of one store version (see the module docstring).

    Args:
        segments: ``SEGMENTS_SCHEMA`` rows (any tracks; the text ones are kept).
    """

    def __init__(self, segments: pa.Table):
        t = segments
        tracks = np.asarray(t.column(S.TRACK).to_pylist(), dtype=object) if t.num_rows else np.zeros(0, object)
        keep = np.isin(tracks, list(_ROWS_OF.values()))
        idx = np.flatnonzero(keep)
        texts = t.column(S.TEXT).to_pylist() if t.num_rows else []
        embs = t.column(S.EMBEDDING).to_pylist() if t.num_rows else []
        dim = next((len(e) for i in idx if (e := embs[i]) is not None), 0)
        emb = np.zeros((len(idx), dim), dtype=np.float32)
        for j, i in enumerate(idx):
            if embs[i] is not None and len(embs[i]) == dim:
                emb[j] = embs[i]
        col = (lambda n, dt: np.asarray(t.column(n).to_numpy(zero_copy_only=False), dtype=dt)[idx]) \
            if t.num_rows else (lambda n, dt: np.zeros(0, dt))
        self.items = _merge_runs(_Items(tracks[idx], col(S.VIDEO_ID, object), col(S.START_S, np.float64),
                                        col(S.END_S, np.float64), [texts[i] or "" for i in idx],
                                        np.nan_to_num(col(S.CONFIDENCE, np.float64), nan=0.0), emb))
        self.items.terms = [terms(x) for x in self.items.text]
        self.dim = dim
        df: dict[str, int] = {}
        for ts in self.items.terms:
            for w in set(ts):
                df[w] = df.get(w, 0) + 1
        n = max(1, len(self.items.terms))
        self._idf = {w: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
        self._idf_unseen = math.log(1.0 + (n + 0.5) / 0.5)
        self._words = _word_track(t, tracks == "word")

    def __len__(self) -> int:
        return len(self.items.text)

    def idf(self, w: str) -> float:
        return self._idf.get(w, self._idf_unseen)

    # -------------------------------------------------------------- search

    def search(self, query: str, qvec: np.ndarray | None, *, tracks: Sequence[str] = (TRACK_SPEECH, TRACK_TEXT),
               video_ids: Sequence[str] | None = None, top_k: int = 10) -> list[TrackHit]:
        """Best moments of the text tracks for ``query`` (``qvec``: its MiniLM embedding, None: lexical only)."""
        want = {_ROWS_OF[t] for t in tracks if t in _ROWS_OF}
        if not want or not len(self):
            return []
        it = self.items
        mask = np.isin(it.track, list(want))
        if video_ids is not None:
            mask &= np.isin(it.video_id, list(video_ids))
        hits: list[TrackHit] = []
        for phrase in quoted_phrases(query):
            if TRACK_SPEECH in tracks:
                hits.extend(self._phrase_hits(phrase, video_ids))
        if TRACK_TEXT in tracks and quoted_phrases(query):  # a quoted phrase on screen: inside one text box
            for phrase in quoted_phrases(query):
                p = terms(phrase, keep_stop=True)
                for i in np.flatnonzero(mask & (it.track == "ocr")):
                    if _contains(terms(it.text[i], keep_stop=True), p):
                        hits.append(TrackHit(str(it.video_id[i]), TRACK_TEXT, float(it.start_s[i]),
                                             float(it.end_s[i]), _PHRASE_SCORE + 0.04 * float(it.confidence[i]),
                                             it.text[i], "phrase"))
        lex = self._lexical(terms(query), mask)
        sem = self._semantic(qvec, mask)
        score = _MAX_HYBRID * (1.0 - (1.0 - lex) * (1.0 - sem))
        order = np.argsort(-score, kind="stable")
        for i in order[: max(4 * top_k, 20)]:
            if not mask[i] or max(lex[i], sem[i]) < _MIN_SCORE:
                continue
            track = TRACK_SPEECH if it.track[i] == "speech" else TRACK_TEXT
            hits.append(TrackHit(str(it.video_id[i]), track, float(it.start_s[i]), float(it.end_s[i]),
                                 float(score[i]), it.text[i]))
        return _dedupe(hits)[:top_k]

    def _lexical(self, qterms: list[str], mask: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.float64)
        if not qterms:
            return out
        q = list(dict.fromkeys(qterms))
        weights = np.asarray([self.idf(w) for w in q])
        total = float(weights.sum()) or 1.0
        for i in np.flatnonzero(mask):
            have = set(self.items.terms[i])
            out[i] = sum(wt for w, wt in zip(q, weights) if w in have) / total
        return out

    def _semantic(self, qvec: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.float64)
        if qvec is None or self.dim == 0 or np.asarray(qvec).shape[-1] != self.dim:
            return out
        q = np.asarray(qvec, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        cos = self.items.emb @ q
        has = np.abs(self.items.emb).sum(axis=1) > 0
        sel = mask & has
        if not sel.any():
            return out
        center = max(_SEM_CENTER_FLOOR, float(np.median(cos[has])))
        z = (cos - center) / _SEM_UNIT
        out[sel] = 1.0 / (1.0 + np.exp(-_SEM_SLOPE * (z[sel] - _SEM_Z0)))
        return out

    def _phrase_hits(self, phrase: str, video_ids: Sequence[str] | None) -> list[TrackHit]:
        p = terms(phrase, keep_stop=True)
        if not p:
            return []
        allowed = len(p) // 5  # recognition errors: one wrong word in five
        out = []
        for vid, (starts, ends, words, conf, raw) in self._words.items():
            if video_ids is not None and vid not in video_ids:
                continue
            n = len(words)
            for i in range(0, n - len(p) + 1):
                bad = 0
                for k, w in enumerate(p):
                    if words[i + k] != w:
                        bad += 1
                        if bad > allowed:
                            break
                j = i + len(p) - 1
                if bad > allowed or (bad and words[i] != p[0] and words[j] != p[-1]):
                    continue  # a near match must still begin or end on the phrase's own word
                c = float(np.mean(conf[i: j + 1]))
                said = " ".join(dict.fromkeys(raw[i: j + 1]))  # the words as recognised
                out.append(TrackHit(vid, TRACK_SPEECH, float(starts[i]), float(ends[j]),
                                    _PHRASE_SCORE + 0.04 * c - 0.02 * bad, said, "phrase"))
        return out



def _merge_runs(it: _Items, gap_s: float = 0.5) -> _Items:
    """On-screen text rows of one video with the same text that follow each other (a line still on screen when
    one chunk ends and the next begins) become one row."""
    order = sorted(range(len(it.text)), key=lambda i: (it.video_id[i], it.track[i], it.text[i], it.start_s[i]))
    keep: list[int] = []
    end = it.end_s.copy()
    for i in order:
        j = keep[-1] if keep else None
        if (j is not None and it.track[i] == "ocr" and it.track[j] == "ocr" and it.video_id[i] == it.video_id[j]
                and it.text[i] == it.text[j] and it.start_s[i] <= end[j] + gap_s):
            end[j] = max(end[j], it.end_s[i])
            continue
        keep.append(i)
    keep.sort()
    k = np.asarray(keep, dtype=np.int64)
    return _Items(it.track[k], it.video_id[k], it.start_s[k], end[k], [it.text[i] for i in keep],
                  it.confidence[k], it.emb[k])


def _contains(seq: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return any(seq[i: i + n] == sub for i in range(len(seq) - n + 1))


def _word_track(t: pa.Table, mask: np.ndarray
                ) -> dict[str, tuple[np.ndarray, np.ndarray, list[str], np.ndarray, list[str]]]:
    """Per video: word starts, ends, normalised words (stop words kept), confidences and the recognised words, in
    time order (a recognised word that normalises to several terms repeats its times)."""
    if not t.num_rows or not mask.any():
        return {}
    idx = np.flatnonzero(mask)
    vids = np.asarray(t.column(S.VIDEO_ID).to_pylist(), dtype=object)[idx]
    st = np.asarray(t.column(S.START_S).to_numpy(zero_copy_only=False), dtype=np.float64)[idx]
    en = np.asarray(t.column(S.END_S).to_numpy(zero_copy_only=False), dtype=np.float64)[idx]
    cf = np.nan_to_num(np.asarray(t.column(S.CONFIDENCE).to_numpy(zero_copy_only=False), dtype=np.float64)[idx])
    tx = t.column(S.TEXT).to_pylist()
    out = {}
    for vid in sorted(set(vids)):
        sel = np.flatnonzero(vids == vid)
        sel = sel[np.argsort(st[sel], kind="stable")]
        words, starts, ends, conf, raw = [], [], [], [], []
        for j in sel:
            text = tx[idx[j]] or ""
            for w in terms(text, keep_stop=True) or [""]:
                words.append(w)
                starts.append(st[j])
                ends.append(en[j])
                conf.append(cf[j])
                raw.append(text)
        out[str(vid)] = (np.asarray(starts), np.asarray(ends), words, np.asarray(conf), raw)
    return out


def _dedupe(hits: list[TrackHit]) -> list[TrackHit]:
    """Best first; a hit overlapping a better one of the same video and track is dropped."""
    out: list[TrackHit] = []
    for h in sorted(hits, key=lambda h: -h.score):
        if any(o.video_id == h.video_id and o.track == h.track and h.start_s < o.end_s and o.start_s < h.end_s
               for o in out):
            continue
        out.append(h)
    return out
