"""Randomly initialised Hugging Face checkpoints built from configs, never downloaded: throughput depends on a
model's shape, not on its weights."""

from __future__ import annotations

from pathlib import Path

SPECIALS = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}

# Image-tower shapes (CLIP's vision config); the text tower is kept small: it embeds queries only.
PRESETS: dict[str, dict] = {
    "vit-b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=16, image_size=224),
    "vit-b32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=32, image_size=224),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 patch_size=8, image_size=32),
}


def save_word_tokenizer(directory: Path, words: list[str], max_length: int = 16) -> int:
    """Write a word-level tokenizer over ``words`` (no lower-casing, appends <eos>) to ``directory``; returns
    the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", model_max_length=max_length)
    fast.save_pretrained(str(directory))
    return len(vocab)


def build_random_clip(directory: Path, preset: str = "vit-b16", seed: int = 0) -> Path:
    """Save a random CLIP with the ``preset`` image tower (and a 2-layer text tower) into ``directory``."""
    import torch
    import transformers as tf

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    vocab = save_word_tokenizer(directory, "a photo of the dog cat car bicycle person riding".split())
    vision = PRESETS[preset]
    width = 64 if preset == "tiny" else 512
    text = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=width,
                                       bos_token_id=2, eos_token_id=3, pad_token_id=0))
    model.save_pretrained(str(directory))
    return directory
