"""``hf:<hub id or local dir>`` encoders: CLIP, SigLIP and SigLIP2 checkpoints through ``transformers``.

The family is picked from ``config.json``'s ``model_type`` (``clip`` -> CLIPModel, ``siglip`` ->
SiglipModel, ``siglip2`` -> Siglip2Model). What each token is::

    CLIP     global  = visual_projection(post_layernorm(CLS))            == get_image_features
             patches = visual_projection(post_layernorm(patch tokens))    (CLS dropped)
    SigLIP   global  = head(post_layernorm(tokens))   (attention-pooling head) == get_image_features
    SigLIP2  patches = head applied to each post_layernorm'd token on its own

SigLIP has no projection: its joint space is the output of the attention-pooling head. A head
whose attention sees a single token returns ``out_proj(v_proj(x))`` followed by the head's MLP
residual, so running the head on each patch token alone maps patch tokens into the same space as
the global embedding (as MaskCLIP does for CLIP's last attention block). Every output is L2-normalised.

Preprocessing: frames arrive already resized to ``input_size`` by the decoder (no centre crop);
pixels are scaled to [0, 1] and normalised with the mean/std of ``preprocessor_config.json`` when the
checkpoint has one, else the family's defaults. SigLIP2 (NaFlex) takes its pixels as a sequence of
patches: frames are cut into a fixed ``sqrt(num_patches)`` square grid (``input_size`` =
grid * patch_size) with every patch valid. Text: CLIP pads to the longest query; SigLIP/SigLIP2 pad
to ``max_length`` as they were trained (SigLIP2 also lower-cases, its training default).

Safety: ``trust_remote_code`` is always False and configs that would need it (``auto_map``) are
refused; weights load only from safetensors (``use_safetensors=True``; a local directory holding
only pickle checkpoints is refused before ``transformers`` sees it). Nothing is downloaded when
``HF_HUB_OFFLINE=1``; otherwise hub ids resolve through Hugging Face's normal cache.

Identity: ``revision`` is, for a local directory, a sha256 over each top-level file's name, size and
content (config, weights, tokenizer, preprocessor; computed once per process); for a hub id, the
commit of the cached snapshot (or the ``@revision`` given, else ``"unknown"``). ``space`` is
``hf:<hub id or directory name>@<revision>``, so different weights never
share a space while the same weights copied to another path still do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_vlm.models.base import (
    EncoderError,
    EncoderSpec,
    check_frames,
    check_texts,
    frames_tensor,
    resolve_device,
    resolve_dtype,
)

SUPPORTED_MODEL_TYPES = ("clip", "siglip", "siglip2")

# Normalisation used when a checkpoint ships no preprocessor_config.json.
_DEFAULT_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

_HASH_BLOCK_BYTES = 1 << 20
_SKIP_IN_REVISION = {"README.md", ".gitattributes"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class _Source:
    """Where an ``hf:`` id points: a local directory or a hub repo (+ optional pinned revision)."""

    ref: str  # what from_pretrained gets: absolute dir path or hub repo id
    local: bool
    hub_revision: str | None  # "@<rev>" suffix of a hub id
    display: str  # name used in the space id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _parse(rest: str) -> _Source:
    if not rest or not rest.strip():
        raise EncoderError("empty hf: encoder id; expected 'hf:<hub id>' or 'hf:<local dir>'")
    expanded = os.path.expanduser(rest)
    if os.path.isdir(expanded):
        path = Path(expanded).resolve()
        return _Source(ref=str(path), local=True, hub_revision=None, display=path.name)
    if rest.startswith(("/", ".", "~")) or os.path.isabs(rest):
        raise EncoderError(f"hf: model directory {rest!r} does not exist")
    repo, sep, rev = rest.partition("@")
    if not _HUB_ID.fullmatch(repo) or (sep and not rev):
        raise EncoderError(f"hf: {rest!r} is neither an existing directory nor a hub id 'owner/name[@revision]'")
    return _Source(ref=repo, local=False, hub_revision=rev or None, display=repo)


def _dir_fingerprint(path: Path) -> tuple:
    """Cheap change detector for a local directory: (name, size, mtime_ns) of its top-level files."""
    out = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            out.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _local_revision(path: Path) -> str:
    """sha256 over each top-level file's name, size and full content (16 hex chars).

    Weights are hashed whole: a prefix would miss fine-tunes that leave the first tensors alone. It
    costs one read of the files (about a second per GB), once per process thanks to ``_spec_cache``.
    """
    h = hashlib.sha256(b"ray_vlm.hf.local.v1")
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith(".") or entry.name in _SKIP_IN_REVISION:
            continue
        size = entry.stat().st_size
        h.update(f"{entry.name}\0{size}\0".encode())
        with open(entry.path, "rb") as f:
            while block := f.read(_HASH_BLOCK_BYTES):
                h.update(block)
    return h.hexdigest()[:16]


def _read_local_json(path: Path, name: str) -> dict | None:
    p = path / name
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncoderError(f"hf: cannot read {p}: {e}") from e
    if not isinstance(data, dict):
        raise EncoderError(f"hf: {p} is not a JSON object")
    return data


def _check_local_weights(path: Path) -> None:
    """Refuse a directory whose only weights are pickles (never handed to transformers)."""
    names = [e.name for e in os.scandir(path) if e.is_file()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise EncoderError(
            f"hf: {path} holds only pickle checkpoint(s) {pickles}; ray-vlm loads safetensors only "
            "(convert the weights, e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise EncoderError(f"hf: {path} has no *.safetensors weights")


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - a core dependency
        raise EncoderError("hf: encoders need the 'transformers' package (pip install ray-vlm)") from e
    import transformers

    return transformers


@dataclass(frozen=True)
class _Resolved:
    source: _Source
    config: Any  # transformers PretrainedConfig (each model's own subclass: its fields vary)
    model_type: str
    spec: EncoderSpec


_spec_cache: dict[tuple, _Resolved] = {}
_spec_lock = threading.Lock()


def _load_config(src: _Source):
    transformers = _require_transformers()
    if src.local:
        raw = _read_local_json(Path(src.ref), "config.json")
        if raw is None:
            raise EncoderError(f"hf: {src.ref} has no config.json")
        if "auto_map" in raw:
            raise EncoderError(
                f"hf: {src.ref}/config.json needs remote code (auto_map); trust_remote_code is never enabled"
            )
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EncoderError(
                f"hf: unsupported model_type {model_type!r} in {src.ref}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
    try:
        config = transformers.AutoConfig.from_pretrained(
            src.ref,
            revision=src.hub_revision,
            trust_remote_code=False,
            local_files_only=src.local or _offline(),
        )
    except EncoderError:
        raise
    except Exception as e:  # OSError (not cached / offline), ValueError (remote code), ...
        raise EncoderError(f"hf: cannot load the config of {src.ref!r}: {type(e).__name__}: {e}") from e
    if getattr(config, "auto_map", None):
        raise EncoderError(f"hf: {src.ref!r} needs remote code (auto_map); trust_remote_code is never enabled")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise EncoderError(
            f"hf: unsupported model_type {config.model_type!r} for {src.ref!r}; "
            f"supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def _geometry(config) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(input_size, patch_grid, dim) from a CLIP/SigLIP/SigLIP2 config."""
    v, t = config.vision_config, config.text_config
    patch = int(v.patch_size if not isinstance(v.patch_size, (list, tuple)) else v.patch_size[0])
    if config.model_type == "siglip2":
        side = math.isqrt(int(v.num_patches))  # NaFlex: we use a fixed square grid within the budget
        grid = (side, side)
        size = (side * patch, side * patch)
    else:
        s = int(v.image_size)
        grid = (s // patch, s // patch)
        size = (s, s)
    if config.model_type == "clip":
        dim = int(config.projection_dim)
    else:
        dim = int(v.hidden_size)
        text_dim = int(getattr(t, "projection_size", None) or t.hidden_size)
        if text_dim != dim:
            raise EncoderError(
                f"hf: {config.model_type} vision width {dim} != text embedding width {text_dim}; "
                "the two towers do not share a space"
            )
        if not getattr(v, "vision_use_head", True):
            raise EncoderError(
                f"hf: {config.model_type} checkpoint has no attention-pooling head (vision_use_head=False)"
            )
    return size, grid, dim


def _resolve(rest: str) -> _Resolved:
    src = _parse(rest)
    key = (src, _dir_fingerprint(Path(src.ref)) if src.local else _offline())
    with _spec_lock:
        hit = _spec_cache.get(key)
    if hit is not None:
        return hit
    config = _load_config(src)
    if src.local:
        revision = _local_revision(Path(src.ref))
    else:
        revision = getattr(config, "_commit_hash", None) or _cached_commit(src) or src.hub_revision or "unknown"
    size, grid, dim = _geometry(config)
    spec = EncoderSpec(
        id=f"hf:{rest}",
        revision=revision,
        space=f"hf:{src.display}@{revision}",
        dim=dim,
        input_size=size,
        patch_grid=grid,
    )
    resolved = _Resolved(source=src, config=config, model_type=config.model_type, spec=spec)
    with _spec_lock:
        _spec_cache[key] = resolved
    return resolved


def get_spec(rest: str) -> EncoderSpec:
    """Spec of ``hf:<rest>`` from its config (and, for a local dir, a hash of its files); no model is built."""
    return _resolve(rest).spec


def _find_file(src: _Source, name: str) -> Path | None:
    """A checkpoint file on local disk (local dir, or the hub cache without downloading), or None."""
    if src.local:
        p = Path(src.ref) / name
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    hit = try_to_load_from_cache(src.ref, name, revision=src.hub_revision)
    return Path(hit) if isinstance(hit, (str, os.PathLike)) else None


def _cached_commit(src: _Source) -> str | None:
    """The commit of the hub-cache snapshot the config was read from (``.../snapshots/<commit>/config.json``)."""
    path = _find_file(src, "config.json")
    if path is not None and path.parent.parent.name == "snapshots":
        return path.parent.name
    return None


def _mean_std(src: _Source, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    mean, std = _DEFAULT_MEAN_STD[model_type]
    rescale = 1 / 255
    path = _find_file(src, "preprocessor_config.json")
    if path is not None:
        try:
            pp = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EncoderError(f"hf: cannot read {path}: {e}") from e
        mean = tuple(float(x) for x in pp.get("image_mean", mean))
        std = tuple(float(x) for x in pp.get("image_std", std))
        if pp.get("do_rescale", True):
            rescale = float(pp.get("rescale_factor", rescale))
        else:
            rescale = 1.0
        if not pp.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise EncoderError(f"hf: bad image_mean/image_std {mean} / {std} in {path}")
    return mean, std, rescale


def _tower_class():
    import torch

    class VisionTower(torch.nn.Module):
        """Frames uint8 (N, H, W, 3) -> (global (N, D), patches (N, gh*gw, D)), L2-normalised float32: the
        preprocessing and the image tower as one module (what ONNX Runtime runs)."""

        def __init__(self, model, model_type: str, grid: tuple[int, int], size: tuple[int, int], scale, shift):
            super().__init__()
            self.model = model
            self.model_type = model_type
            self.grid = grid
            self.patch = size[0] // grid[0]
            self.register_buffer("scale", scale)  # (1, 3, 1, 1)
            self.register_buffer("shift", shift)

        def pixels(self, frames):
            """uint8 (N, H, W, 3) -> normalised (N, 3, H, W) in the model's dtype."""
            x = frames.permute(0, 3, 1, 2).float()
            return (x * self.scale - self.shift).to(next(self.model.parameters()).dtype)

        def forward(self, frames):
            x = self.pixels(frames)
            n = x.shape[0]
            vm = self.model.vision_model
            if self.model_type == "clip":
                out = vm(pixel_values=x)
                proj = self.model.visual_projection
                g = proj(out.pooler_output)  # pooler_output is post_layernorm(CLS)
                p = proj(vm.post_layernorm(out.last_hidden_state[:, 1:]))  # (N, gh*gw, D)
            else:
                if self.model_type == "siglip":
                    out = vm(pixel_values=x)
                else:
                    gh, gw, ps = self.grid[0], self.grid[1], self.patch
                    # (N, 3, H, W) -> (N, gh*gw, ps*ps*3), each patch flattened (row, col, channel) as
                    # Siglip2ImageProcessor does.
                    seq = x.permute(0, 2, 3, 1).reshape(n, gh, ps, gw, ps, 3).permute(0, 1, 3, 2, 4, 5)
                    seq = seq.reshape(n, gh * gw, ps * ps * 3)
                    ones = torch.ones_like(seq[:, :, 0], dtype=torch.long)  # (N, gh*gw), follows the batch
                    shapes = torch.stack([ones[:, 0] * gh, ones[:, 0] * gw], dim=1)  # (N, 2)
                    out = vm(pixel_values=seq, pixel_attention_mask=ones, spatial_shapes=shapes)
                tokens = out.last_hidden_state  # (N, gh*gw, D), already post_layernorm
                g = out.pooler_output  # head(tokens)
                width = tokens.shape[-1]
                p = vm.head(tokens.reshape(-1, 1, width)).reshape(n, -1, width)  # head on each token alone
            normalize = torch.nn.functional.normalize
            return normalize(g.float(), dim=-1), normalize(p.float(), dim=-1)

    return VisionTower


class HFEncoder:
    """A loaded CLIP / SigLIP / SigLIP2 encoder (see the module docstring for what each output is).

    ``runtime``: "auto" (``onnx`` on CPU for CLIP and SigLIP, else ``torch``), "torch", "onnx" (the image
    tower exported to ONNX Runtime, float32) or "onnx-int8" (its matrix multiplications quantised to int8
    per channel, dynamically: no calibration). ``threads``: ONNX Runtime's intra-op threads (None: torch's count).
    """

    def __init__(self, resolved: _Resolved, device: str = "auto", dtype: str = "float32", runtime: str = "auto",
                 threads: int | None = None):
        import torch

        from ray_vlm.models import _ort

        transformers = _require_transformers()
        self._torch = torch
        self.spec = resolved.spec
        self.model_type = resolved.model_type
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # SigLIP2 resizes its position embeddings with an antialiased resize the ONNX exporter lacks.
        cpu_default = "torch" if resolved.model_type == "siglip2" else "onnx"
        self.runtime = _ort.resolve_runtime(runtime, self.device, cpu_default=cpu_default)
        src = resolved.source
        if src.local:
            _check_local_weights(Path(src.ref))
        model_cls = {
            "clip": transformers.CLIPModel,
            "siglip": transformers.SiglipModel,
            "siglip2": getattr(transformers, "Siglip2Model", None),
        }[self.model_type]
        if model_cls is None:  # pragma: no cover - transformers too old
            raise EncoderError("hf: SigLIP2 needs a newer 'transformers' (pip install -U transformers)")
        common = dict(revision=src.hub_revision, trust_remote_code=False, local_files_only=src.local or _offline())
        try:
            model = model_cls.from_pretrained(src.ref, use_safetensors=True, dtype=self.dtype, **common)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(src.ref, **common)
        except Exception as e:
            raise EncoderError(f"hf: cannot load {src.ref!r}: {type(e).__name__}: {e}") from e
        self.model = model.to(self.device).eval()
        mean, std, rescale = _mean_std(src, self.model_type)
        shape = (1, 3, 1, 1)
        scale = torch.tensor([rescale / s for s in std], device=self.device).view(shape)
        shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=self.device).view(shape)
        self.tower = _tower_class()(self.model, self.model_type, self.spec.patch_grid, self.spec.input_size,
                                    scale, shift).eval()
        self._max_text_tokens = int(resolved.config.text_config.max_position_embeddings)
        self._session = None
        if self.runtime != "torch":
            self._session = self._onnx_session(threads or _ort.default_threads())

    def _onnx_session(self, threads: int):
        from ray_vlm.models import _ort

        torch = self._torch
        # A hub id without a known commit has no identity to cache under: its export is rebuilt per load.
        cacheable = self.spec.revision != "unknown"
        key = _ort.cache_key(self.spec.id, self.spec.revision, self.model_type, "hf-tower-v1")

        def export(path: Path) -> None:
            example = torch.zeros((2, *self.spec.input_size, 3), dtype=torch.uint8)
            _ort.export(self.tower, example, path, input_name="frames", output_names=("global", "patches"),
                        dynamic_axes={"frames": {0: "n"}, "global": {0: "n"}, "patches": {0: "n"}})

        name = "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", self.spec.id.removeprefix("hf:"))[-60:]
        try:
            model = _ort.build_cached(name, key, self.runtime, export_fp32=export, calibration=None,
                                      input_name="frames", cache=cacheable)
        except Exception as e:
            raise EncoderError(f"{self.spec.id}: cannot export the {self.model_type} image tower for runtime "
                               f"{self.runtime!r} ({type(e).__name__}: {str(e)[:300]}); use runtime 'torch'") from e
        return _ort.session(model, threads)

    def _pixels(self, frames: np.ndarray):
        """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W) on the device."""
        with self._torch.inference_mode():
            return self.tower.pixels(frames_tensor(frames, self.device))

    def encode_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frames uint8 (N, H, W, 3) at input_size -> (global (N, D), patches (N, gh*gw, D)), float32, L2-normalised."""
        torch = self._torch
        check_frames(frames, self.spec)
        d, np_ = self.spec.dim, self.spec.num_patches
        if len(frames) == 0:
            return np.zeros((0, d), np.float32), np.zeros((0, np_, d), np.float32)
        if self._session is not None:
            g, p = self._session.run(None, {"frames": np.ascontiguousarray(frames)})
            return g, p
        with torch.inference_mode():
            g, p = self.tower(frames_tensor(frames, self.device))
        return g.cpu().numpy(), p.cpu().numpy()

    # ------------------------------------------------------------ text

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Queries -> float32 (N, D), L2-normalised, via the model's text tower."""
        torch = self._torch
        texts = check_texts(texts, self.spec.id)
        if not texts:
            return np.zeros((0, self.spec.dim), np.float32)
        if self.model_type == "siglip2":
            texts = [t.lower() for t in texts]
        padding = True if self.model_type == "clip" else "max_length"
        enc = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self._max_text_tokens, return_tensors="pt"
        ).to(self.device)
        # Pass what the tokenizer produces, as HF's processors do: SigLIP's tokenizer gives no
        # attention mask (it was trained on max_length-padded ids), CLIP's and SigLIP2's do.
        kwargs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
        with torch.inference_mode():
            out = self.model.get_text_features(**kwargs)
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()


def load(rest: str, device: str = "auto", dtype: str = "float32", runtime: str = "auto") -> HFEncoder:
    """Load ``hf:<rest>`` (see ``ray_vlm.models.load_encoder``)."""
    return HFEncoder(_resolve(rest), device=device, dtype=dtype, runtime=runtime)
