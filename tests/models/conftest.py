"""Fixtures for the encoder tests: the bundled encoder (loaded once) and tiny random HF checkpoints.

The tiny checkpoints are built here, never downloaded: random CLIP / SigLIP / SigLIP2 models
(hidden 32, 2 layers, 32x32 images, 8x8 patches) saved with ``save_pretrained`` next to a
word-level tokenizer made with ``tokenizers``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Derived, re-computable cache (class-name embeddings of the bundled encoder); gitignored.
MODEL_CACHE = Path(__file__).resolve().parents[1] / ".fixtures" / "model_cache"

WORDS = "a photo of the dog cat car bicycle person riding bike fish red blue green man woman in on".split()
SPECIALS = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}


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


def save_tiny_tokenizer(directory: Path) -> int:
    """Write a word-level tokenizer (no lower-casing, appends <eos>) to ``directory``; returns vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        model_max_length=16,
    )
    fast.save_pretrained(str(directory))
    return len(vocab)


def build_tiny_hf(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a random tiny ``kind`` ("clip" | "siglip" | "siglip2") model + tokenizer into ``directory``."""
    import torch
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = save_tiny_tokenizer(directory)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
    torch.manual_seed(seed)
    if kind == "clip":
        model = tf.CLIPModel(
            tf.CLIPConfig(
                text_config=text, vision_config={**vision, "image_size": 32}, projection_dim=24,
                bos_token_id=2, eos_token_id=3, pad_token_id=0,
            )
        )
    elif kind == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config={**vision, "image_size": 32}))
    elif kind == "siglip2":
        model = tf.Siglip2Model(tf.Siglip2Config(text_config=text, vision_config={**vision, "num_patches": 16}))
    else:  # pragma: no cover
        raise ValueError(kind)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_hf_root(tmp_path_factory):
    """{kind: directory} of tiny random checkpoints, built once per session."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {kind: build_tiny_hf(kind, root / kind) for kind in ("clip", "siglip", "siglip2")}
