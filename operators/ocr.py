"""On-screen text stage: frames whose picture changed are read by OCR; their text lines become ``ocr`` segments.

Runs after prune, before encode. Which frames: DiffFP's verdict (``keep_mask``): a kept frame with at least
``ocr.min_changed`` of its patches changed is read (a video's first frame always is), at most one every
``ocr.min_interval_s`` seconds, so a static slide is read once. The picture is read again from the source at up
to ``ocr.max_side`` pixels (the sampled frames are the encoder's small input), and small pictures are enlarged
before reading (``ScreenReader.upscale_below``).

Each text line is one ``ocr`` row: from the time of the frame it was read in until the next frame read (or
the chunk's end), its text, the recogniser's confidence, its MiniLM embedding, and its box in the lineage. The
same line read again in the next frame read extends the row instead of adding one. Rows are added to the chunk's
``segment_items`` (after the speech stage's, when there are any).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ray_vlm.core import schema as S
from ray_vlm.core.config import OCR_RESOURCES, OcrConfig
from ray_vlm.operators._values import plain_scalar

OPERATOR = "ReadScreenText"
TRACK_OCR = "ocr"
_MAX_ERROR_CHARS = 2000


class ReadScreenText:
    """Ray Data operator: pruned chunks in, the same chunks with their on-screen text added to ``segment_items``.

    Args:
        ocr: when to read, how large, how sure.
        storage_options: for reading the source again.
    """

    reads = (S.VIDEO_ID, S.URI, S.PTS_S, S.KEEP_MASK, S.CHUNK_END_S)
    adds = (S.SEGMENT_ITEMS,)
    resources = OCR_RESOURCES

    def __init__(self, ocr: OcrConfig | None = None, storage_options: dict | None = None):
        self.config = ocr or OcrConfig()
        self.storage_options = storage_options
        self._reader: Any = None
        self._text: Any = None

    def _models(self):
        if self._reader is None:
            from ray_vlm.models.bundled import MiniLMText
            from ray_vlm.models.ocr import ScreenReader
            from ray_vlm.models.speech import cpu_threads

            self._reader = ScreenReader(threads=cpu_threads(), min_confidence=self.config.min_confidence,
                                        upscale_below=self.config.upscale_below)
            self._text = MiniLMText()
        return self._reader, self._text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        S.require_columns(batch, self.reads, OPERATOR)
        n = len(batch[S.VIDEO_ID])
        status = batch.get(S.STATUS)
        chunk_error = (np.array(batch[S.CHUNK_ERROR], dtype=object) if S.CHUNK_ERROR in batch
                       else np.full(n, None, dtype=object))
        old = batch.get(S.SEGMENT_ITEMS)
        items = [old[r] if old is not None and old[r] is not None else b"" for r in range(n)]
        for r in range(n):
            err = plain_scalar(chunk_error[r])
            if (status is not None and status[r] == S.STATUS_FAILED) or (isinstance(err, str) and err):
                continue  # a chunk already failed (a null error column may come back from Arrow as NaN)
            try:
                rows = self.chunk_rows(batch, r)
                if rows[S.TRACK]:
                    items[r] = _append(items[r], rows)
            except Exception as e:  # noqa: BLE001 - a per-chunk failure is data
                chunk_error[r] = f"{OPERATOR}: {type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
        out = dict(batch)
        out[S.CHUNK_ERROR] = chunk_error
        out[S.SEGMENT_ITEMS] = S.object_column(items)
        return out

    def chosen(self, batch: dict, r: int) -> list[int]:
        """Indices of the chunk's frames to read: enough of the picture changed (the video's first frame always)."""
        masks = batch[S.KEEP_MASK][r]
        pts = np.asarray(batch[S.PTS_S][r], dtype=np.float64).reshape(-1)
        out: list[int] = []
        for i in range(len(pts)):
            changed = float(np.mean(np.asarray(masks[i], dtype=bool))) if masks is not None else 1.0
            first = int(batch[S.CHUNK_INDEX][r]) == 0 and i == 0 if S.CHUNK_INDEX in batch else i == 0
            if out and pts[i] - pts[out[-1]] < self.config.min_interval_s:
                continue
            if first or changed >= self.config.min_changed:
                out.append(i)
        return out[: self.config.max_frames_per_chunk]

    def chunk_rows(self, batch: dict, r: int) -> dict[str, list]:
        """The ``ocr`` segment rows of one chunk."""
        from ray_vlm.media.frames import read_frames_at

        rows: dict[str, list] = {f: [] for f in S.SEGMENT_ITEM_FIELDS}
        pick = self.chosen(batch, r)
        if not pick:
            return rows
        pts = np.asarray(batch[S.PTS_S][r], dtype=np.float64).reshape(-1)
        end_of_chunk = float(batch[S.CHUNK_END_S][r])
        reader, text_model = self._models()
        pictures = read_frames_at(str(batch[S.URI][r]), [float(pts[i]) for i in pick], max_side=self.config.max_side,
                                  storage_options=self.storage_options)
        open_rows: dict[str, int] = {}  # text -> its row, while it stays on screen
        for k, (i, (_, rgb)) in enumerate(zip(pick, pictures)):
            start = float(pts[i])
            end = float(pts[pick[k + 1]]) if k + 1 < len(pick) else max(end_of_chunk, start)
            seen: dict[str, int] = {}
            for box in reader.read(rgb):
                if box.text in open_rows:  # still on screen: the row goes on
                    j = open_rows[box.text]
                    rows[S.END_S][j] = end
                    seen[box.text] = j
                    continue
                rows[S.TRACK].append(TRACK_OCR)
                rows[S.START_S].append(start)
                rows[S.END_S].append(end)
                rows[S.TEXT].append(box.text)
                rows[S.EMBEDDING].append(None)
                rows[S.CONFIDENCE].append(box.confidence)
                rows[S.LINEAGE].append(json.dumps({"model": "bundled:pp-ocrv4",
                                                   "box": [round(x, 1) for x in box.box],
                                                   "size": [int(rgb.shape[1]), int(rgb.shape[0])]}))
                seen[box.text] = len(rows[S.TRACK]) - 1
            open_rows = seen
        if rows[S.TEXT]:
            emb = text_model.encode(list(rows[S.TEXT])).cpu().numpy().astype(np.float32)
            rows[S.EMBEDDING] = list(emb)
        return rows


def _append(blob, rows: dict[str, list]) -> bytes:
    """``blob`` (segment items bytes, maybe empty) with ``rows`` added."""
    if blob is None or len(blob) == 0:
        return S.segment_items_bytes(rows)
    table = S.segment_items_table(blob)
    merged = {f: table.column(f).to_pylist() + list(rows[f]) for f in S.SEGMENT_ITEM_FIELDS}
    return S.segment_items_bytes(merged)
