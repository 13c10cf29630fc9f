"""Types shared by every encoder family: the spec, the protocol, the error, and small helpers.

An encoder maps RGB frames and free text into one embedding space. Each family lives in its own
module (``bundled.py``, ``hf.py``) and is reached through ``ray_vlm.models.get_spec`` /
``load_encoder`` by an id with a family prefix (``bundled:``, ``hf:``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ray_vlm.core.errors import RayVlmError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class EncoderError(RayVlmError, ValueError):
    """An encoder cannot be resolved or loaded.

    Raised for an unknown id, a missing optional package (the message names what to install),
    weights whose hash does not match the pinned one, a model that would need remote code or a
    pickle checkpoint, or frames of the wrong size.
    """

    code = "encoder_unavailable"


@dataclass(frozen=True)
class EncoderSpec:
    """What a store needs to know about an encoder, available without loading weights.

    Attributes:
        id: registry id, e.g. ``"bundled:effnet-lite0-minilm"`` or ``"hf:openai/clip-vit-base-patch32"``.
        revision: identifies the exact weights: sha256 prefix of the bundled weight files, a hash of a
            local model directory's config and weight files, or a hub commit.
        space: embedding-space id. Two encoders share a space only if their vectors are comparable;
            a store is only ever queried with an encoder of the same space.
        dim: D, the embedding width.
        input_size: (H, W) pixels the decoder must deliver frames at.
        patch_grid: (gh, gw) patch tokens per frame at ``input_size`` (row-major).
        patch_px: pixels per patch token, when the encoder takes frames of any size that is a multiple of it
            (any-resolution tokens: the grid follows the frame); 0: only ``input_size``.
    """

    id: str
    revision: str
    space: str
    dim: int
    input_size: tuple[int, int]
    patch_grid: tuple[int, int]
    patch_px: int = 0

    @property
    def num_patches(self) -> int:
        """gh * gw: patch tokens per frame at ``input_size``."""
        return self.patch_grid[0] * self.patch_grid[1]

    def grid_for(self, width: int, height: int, max_patches: int | None = None) -> tuple[int, int]:
        """The patch grid (gh, gw) for a picture of ``width`` x ``height`` (as displayed): ``patch_grid`` for an
        encoder of one input size; else the grid whose shape is closest to the picture's (in log aspect ratio)
        among those of at most ``max_patches`` tokens (default: ``num_patches``), the larger of equally close
        ones."""
        if not self.patch_px or width <= 0 or height <= 0:
            return self.patch_grid
        return aspect_grid(width, height, max_patches or self.num_patches)

    def frame_size_for(self, width: int, height: int, max_patches: int | None = None) -> tuple[int, int]:
        """(H, W) pixels the decoder delivers frames at for that picture: ``input_size``, or the grid in pixels."""
        if not self.patch_px:
            return self.input_size
        gh, gw = self.grid_for(width, height, max_patches)
        return gh * self.patch_px, gw * self.patch_px


ASPECT_TOLERANCE = 1.1  # a grid may stretch the picture by up to 10 % to use more of the token budget


def aspect_grid(width: int, height: int, max_patches: int) -> tuple[int, int]:
    """The patch grid (gh, gw) for a ``width`` x ``height`` picture within ``max_patches`` tokens: of the grids whose
    shape gw / gh is within ``ASPECT_TOLERANCE`` of the picture's, the one with the most patches (then the closest
    shape); the closest shape if none is. 16:9 at 49: 5 x 9; 4:3: 6 x 8; 2.35:1: 4 x 10; square: 7 x 7; 9:16: 9 x 5.
    """
    import math

    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    target = math.log(width / height)
    within, closest = None, None
    for gh in range(1, max_patches + 1):
        for gw in range(1, max_patches // gh + 1):
            err = round(abs(math.log(gw / gh) - target), 9)
            if err <= math.log(ASPECT_TOLERANCE) + 1e-9:
                key = (-gh * gw, err, gh)
                within = min(within, (key, (gh, gw))) if within else (key, (gh, gw))
            key2 = (err, -gh * gw, gh)
            closest = min(closest, (key2, (gh, gw))) if closest else (key2, (gh, gw))
    assert closest is not None
    return (within or closest)[1]


@runtime_checkable
class Encoder(Protocol):
    """The whole interface of a loaded encoder (open_clip style: encode images, encode text)."""

    spec: EncoderSpec

    def encode_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embed frames.

        Args:
            frames: uint8 (N, H, W, 3) RGB at ``spec.input_size``.

        Returns:
            ``(global, patches)``: float32 (N, D) L2-normalised, and float32 (N, gh*gw, D) patch
            tokens in the same space, row-major over the grid, L2-normalised.
        """
        ...

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Embed queries: float32 (N, D), L2-normalised."""
        ...


# ---------------------------------------------------------------- helpers shared by the families


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a CUDA device is visible, else ``"cpu"``; check the rest."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EncoderError(f"device {device!r} requested but torch sees no CUDA device")
        return device
    raise EncoderError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Map a dtype name to a torch dtype. Half precision on CPU is refused (slow or unsupported)."""
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise EncoderError(f"unknown dtype {dtype!r}; expected one of {sorted(table)}")
    if device == "cpu" and dtype != "float32":
        raise EncoderError(f"dtype {dtype!r} is only supported on CUDA; use float32 on CPU")
    return table[dtype]


_verified: set[tuple[str, str]] = set()
_verified_lock = threading.Lock()


def verify_sha256(path: Path, expected: str, error: type[Exception], what: str = "bundled weights") -> None:
    """Raise ``error`` unless ``path`` exists and hashes to ``expected`` (checked once per process and file)."""
    key = (str(path), expected)
    with _verified_lock:
        if key in _verified:
            return
    if not path.is_file():
        raise error(f"{what} missing: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise error(f"{what} {path} have sha256 {actual}, expected {expected}; refusing to load them (reinstall "
                    "the package that ships them)")
    with _verified_lock:
        _verified.add(key)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a whole file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Divide by the L2 norm along ``axis`` (zero vectors stay zero)."""
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32, copy=False)


def check_frames(frames: np.ndarray, spec: EncoderSpec) -> None:
    """Raise EncoderError unless ``frames`` is uint8 (N, H, W, 3) at ``spec.input_size`` (or, for an encoder with
    ``patch_px``, any size that is a whole number of patches)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise EncoderError(f"{spec.id}: frames must be uint8 (N, H, W, 3) RGB, got {desc}")
    h, w = int(frames.shape[1]), int(frames.shape[2])
    if spec.patch_px:
        if h < spec.patch_px or w < spec.patch_px or h % spec.patch_px or w % spec.patch_px:
            raise EncoderError(
                f"{spec.id}: frames are {h}x{w} (HxW); the encoder takes sizes that are whole multiples of "
                f"{spec.patch_px} pixels; decode at a size from spec.frame_size_for()"
            )
        return
    if (h, w) != tuple(spec.input_size):
        raise EncoderError(
            f"{spec.id}: frames are {h}x{w} (HxW) but the encoder takes "
            f"{spec.input_size[0]}x{spec.input_size[1]}; decode at the encoder's input_size"
        )


def grid_of(frames_hw: tuple[int, int], spec: EncoderSpec) -> tuple[int, int]:
    """(gh, gw) of frames of (H, W) pixels: ``patch_grid`` at ``input_size``, else the size in patches."""
    if spec.patch_px:
        return frames_hw[0] // spec.patch_px, frames_hw[1] // spec.patch_px
    return spec.patch_grid


def frames_tensor(frames: np.ndarray, device: str):
    """uint8 (N, H, W, 3) ndarray -> uint8 torch tensor on ``device`` (copies read-only buffers,
    e.g. arrays backed by Arrow memory, which torch cannot wrap)."""
    import torch

    if not frames.flags.writeable or not frames.flags.c_contiguous:
        frames = np.array(frames, copy=True, order="C")
    return torch.from_numpy(frames).to(device)


def check_texts(texts: list[str], encoder_id: str) -> list[str]:
    """Return ``texts`` as a list of str, or raise EncoderError."""
    if isinstance(texts, str):
        raise EncoderError(f"{encoder_id}: encode_text takes a list of strings, got a single str")
    out = list(texts)
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise EncoderError(f"{encoder_id}: encode_text takes strings, got {bad[:3]}")
    return out


def cache_dir() -> Path | None:
    """Directory for derived, re-computable caches (class-name embeddings), or None if disabled.

    ``RAY_VLM_CACHE_DIR`` overrides the default ``~/.cache/ray_vlm``; set it to an empty string to
    turn disk caching off.
    """
    env = os.environ.get("RAY_VLM_CACHE_DIR")
    if env is not None:
        return Path(env) if env.strip() else None
    return Path(os.path.expanduser("~")) / ".cache" / "ray_vlm"
