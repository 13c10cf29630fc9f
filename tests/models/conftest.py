"""Fixtures for the encoder tests: the bundled encoder (loaded once) and tiny random HF checkpoints.

The tiny checkpoints are built here, never downloaded: random CLIP / SigLIP / SigLIP2 models
(hidden 32, 2 layers, 32x32 images, 8x8 patches) saved with ``save_pretrained`` next to a
word-level tokenizer made with ``tokenizers``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.models import SPECIALS, WORDS, build_tiny_hf, save_tiny_tokenizer  # noqa: F401  (re-exported)

# Derived, re-computable cache (class-name embeddings of the bundled encoder); gitignored.
MODEL_CACHE = Path(__file__).resolve().parents[1] / ".fixtures" / "model_cache"



def _with_cache_env(fn):
    old = os.environ.get("RAY_VLM_CACHE_DIR")
    os.environ["RAY_VLM_CACHE_DIR"] = str(MODEL_CACHE)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("RAY_VLM_CACHE_DIR", None)
        else:
            os.environ["RAY_VLM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def bundled_encoder():
    """The real bundled encoder on CPU (class embeddings cached under tests/.fixtures)."""
    from ray_vlm.models import load_encoder

    return _with_cache_env(lambda: load_encoder("bundled:effnet-lite0-minilm", device="cpu"))


@pytest.fixture(scope="session")
def tiny_hf_root(tmp_path_factory):
    """{kind: directory} of tiny random checkpoints, built once per session."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {kind: build_tiny_hf(kind, root / kind) for kind in ("clip", "siglip", "siglip2")}
