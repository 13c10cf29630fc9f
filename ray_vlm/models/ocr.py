"""Text on screen: PP-OCRv4 (detection, orientation, recognition) through RapidOCR on ONNX Runtime.

The three ONNX models ship in the ``rapidocr-onnxruntime`` wheel; each is pinned by sha256 and checked before it
is loaded. The PP-OCRv4 recogniser reads Chinese and English (Latin letters, digits, punctuation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_vlm.core.errors import RayVlmError
from ray_vlm.models.base import verify_sha256

OCR_ID = "bundled:pp-ocrv4"
OCR_SHA256 = {
    "ch_PP-OCRv4_det_infer.onnx": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "ch_PP-OCRv4_rec_infer.onnx": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
}


class OcrError(RayVlmError, RuntimeError):
    """The OCR models cannot be found, verified or loaded."""

    code = "ocr_model_invalid"


@dataclass(frozen=True)
class TextBox:
    """One line of text found in a picture: its text, confidence and box (x0, y0, x1, y1) in that picture's pixels."""

    text: str
    confidence: float
    box: tuple[float, float, float, float]


def _models() -> dict[str, Path]:
    try:
        import rapidocr_onnxruntime
    except ImportError as e:  # pragma: no cover - a core dependency
        raise OcrError("text on screen needs the 'rapidocr-onnxruntime' package (pip install ray-vlm)") from e
    root = Path(rapidocr_onnxruntime.__file__).resolve().parent / "models"
    out = {}
    for name, sha in OCR_SHA256.items():
        verify_sha256(root / name, sha, OcrError, "bundled OCR weights")
        out[name] = root / name
    return out


class ScreenReader:
    """Lines of text in RGB pictures (``read(rgb)``), PP-OCRv4 on ONNX Runtime with ``threads`` threads.

    ``upscale_below``: pictures whose shorter side is under this many pixels are enlarged to it first (small text
    in a small frame reads better larger); 0 never upscales.
    """

    def __init__(self, threads: int = 1, min_confidence: float = 0.5, upscale_below: int = 720):
        from rapidocr_onnxruntime import RapidOCR

        m = _models()
        t = max(1, int(threads))
        self.engine = RapidOCR(
            det_model_path=str(m["ch_PP-OCRv4_det_infer.onnx"]),
            cls_model_path=str(m["ch_ppocr_mobile_v2.0_cls_infer.onnx"]),
            rec_model_path=str(m["ch_PP-OCRv4_rec_infer.onnx"]), det_intra_op_num_threads=t,
            det_inter_op_num_threads=1, cls_intra_op_num_threads=t, cls_inter_op_num_threads=1,
            rec_intra_op_num_threads=t, rec_inter_op_num_threads=1, text_score=float(min_confidence),
            print_verbose=False)
        self.min_confidence = float(min_confidence)
        self.upscale_below = int(upscale_below)

    def read(self, rgb: np.ndarray) -> list[TextBox]:
        """Text lines of one picture, top to bottom; boxes in the given picture's pixels."""
        img: np.ndarray = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[..., ::-1])  # RapidOCR reads BGR
        scale = 1.0
        short = min(img.shape[:2])
        if self.upscale_below and 0 < short < self.upscale_below:
            import cv2

            scale = self.upscale_below / short
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_CUBIC)
        result, _ = self.engine(img)
        out = []
        for pts, text, conf in result or []:
            text = str(text).strip()
            if not text or float(conf) < self.min_confidence:
                continue
            xy = np.asarray(pts, dtype=np.float64) / scale
            out.append(TextBox(text, float(conf), (float(xy[:, 0].min()), float(xy[:, 1].min()),
                                                   float(xy[:, 0].max()), float(xy[:, 1].max()))))
        return sorted(out, key=lambda b: (round(b.box[1] / 10), b.box[0]))
