"""Types shared by every encoder family: the spec, the protocol, the error, and small helpers.

An encoder maps RGB frames and free text into one embedding space. Each family lives in its own
module (``bundled.py``, ``hf.py``) and is reached through ``ray_vlm.models.get_spec`` /
``load_encoder`` by an id with a family prefix (``bundled:``, ``hf:``).
"""

from __future__ import annotations

import hashlib
import os
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
    """

    id: str
    revision: str
    space: str
    dim: int
    input_size: tuple[int, int]
    patch_grid: tuple[int, int]

    @property
    def num_patches(self) -> int:
        """gh * gw: patch tokens per frame."""
        return self.patch_grid[0] * self.patch_grid[1]


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
    """Raise EncoderError unless ``frames`` is uint8 (N, H, W, 3) at ``spec.input_size``."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise EncoderError(f"{spec.id}: frames must be uint8 (N, H, W, 3) RGB, got {desc}")
    if tuple(frames.shape[1:3]) != tuple(spec.input_size):
        raise EncoderError(
            f"{spec.id}: frames are {frames.shape[1]}x{frames.shape[2]} (HxW) but the encoder takes "
            f"{spec.input_size[0]}x{spec.input_size[1]}; decode at the encoder's input_size"
        )


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
