"""Answering questions from grounded moments: the evidence-only answerer and the VLM adapter.

Serve's QA deployment (and ``/v1/ask``) gets a question plus the best moments with a few frames each
(:class:`Evidence`) and streams an answer:

* :class:`EvidenceAnswerer` (no model configured): lists the grounded moments, labelled as such, and
  says nothing else. It never invents an answer.
* :class:`VLMAnswerer`: a vision-language model through ``transformers``, from a Hugging Face id already
  in the local cache or a local directory. Supported families (``config.json``'s ``model_type``):
  Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``) and VideoLLaMA3 (``video_llama_3``, native in
  transformers 5.23 as ``VideoLlama3ForConditionalGeneration``; the ``-HF`` conversions of the
  checkpoints, not the original remote-code ones). The frames go in as images, each preceded by its
  time (``Time 12.0s:``) under a line naming its video and moment, VideoLLaMA3-style; the answer streams
  token by token (``TextIteratorStreamer``, generation in a thread). Greedy decoding.

Safety: nothing is ever downloaded (``local_files_only=True``; a hub id must already be in the local
cache), ``trust_remote_code`` is always False and configs that would need it (``auto_map``) are
refused, weights load from safetensors only (a directory with only pickle checkpoints is refused before
transformers sees it).

Processor: ``AutoProcessor`` when it loads. In an environment without ``torchvision`` transformers 5.23
cannot build these processors (their *video* processor needs it, though we send only images); then the
same processor class is assembled from the checkpoint's tokenizer, its (PIL-backed) image processor and
its chat template, without a video processor. Both paths tokenise and expand image tokens with
transformers' own processor code.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_vlm.core.errors import RayVlmError
from ray_vlm.query.searcher import Moment

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "video_llama_3")
EVIDENCE_ANSWERER_NAME = "evidence"
# Longest question echoed back by the evidence answerer (the HTTP layer validates questions itself).
MAX_ECHO_CHARS = 500
# How long the consumer waits for the next piece of text before giving up (the whole generation may
# queue behind another request on the same replica: generation is serialised per model).
DEFAULT_TOKEN_TIMEOUT_S = 600.0

INSTRUCTION = (
    "You are shown frames from a video library, each labelled with its video and its time in seconds. "
    "Answer the question using only what these frames show, and say at which times. "
    "If the frames do not show the answer, say so."
)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class AnswererError(RayVlmError, ValueError):
    """A VLM cannot be resolved or loaded (not cached, unsupported family, remote code, pickle weights)."""

    code = "answerer_unavailable"


@dataclass
class Evidence:
    """One grounded moment and frames from it.

    Attributes:
        moment: the moment (video, ``[start_s, end_s)``, calibrated score).
        frames: ``(pts_s, rgb)`` pairs, ``rgb`` uint8 (H, W, 3), e.g. from
            :func:`ray_vlm.media.frames.read_frames_at`; may be empty.
    """

    moment: Moment
    frames: list[tuple[float, np.ndarray]]


def video_name(moment: Moment) -> str:
    """The file name of the moment's video (its ``video_id`` when the URI has none)."""
    name = posixpath.basename(str(moment.uri or "").rstrip("/").split("?", 1)[0])
    return name or str(moment.video_id)


def _clean(text: str, limit: int) -> str:
    """One printable line, at most ``limit`` characters (for echoing user text)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ====================================================================== no model: the evidence itself


class EvidenceAnswerer:
    """Answers with the grounded moments only, clearly labelled; never claims anything else.

    Attributes:
        name: ``"evidence"``.
    """

    name = EVIDENCE_ANSWERER_NAME

    def stream(self, question: str, evidence: Sequence[Evidence]) -> Iterator[str]:
        """Yield the answer in chunks: a header line, then one line per moment (best first).

        Each moment line is ``"<i>. <file name> <start>–<end> s (score <s>)"`` with times to 0.1 s.
        """
        q = _clean(question, MAX_ECHO_CHARS)
        if not evidence:
            yield f'No answering model is configured, and no moments were found for "{q}".\n'
            return
        n = len(evidence)
        yield f'No answering model is configured; grounded evidence for "{q}" ({n} moment{"s" if n != 1 else ""}):\n'
        for i, ev in enumerate(evidence, 1):
            m = ev.moment
            yield f"{i}. {video_name(m)} {m.start_s:.1f}–{m.end_s:.1f} s (score {m.score:.2f})\n"
            for line in transcript_lines(m):
                yield f"   {line}\n"

    def answer(self, question: str, evidence: Sequence[Evidence]) -> str:
        """The whole streamed text."""
        return "".join(self.stream(question, evidence))


# ====================================================================== prompts


def select_frames(evidence: Sequence[Evidence], max_frames: int) -> list[list[tuple[float, np.ndarray]]]:
    """Pick at most ``max_frames`` frames over the moments, best moment first.

    Frames are taken round-robin over the moments (in the order given, best first), so every moment
    gets a frame before any gets a second. Returns, per moment, its chosen frames in time order
    (possibly empty); the total is ``min(max_frames, total frames)``.
    """
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    queues = [list(ev.frames) for ev in evidence]
    chosen: list[list[tuple[float, np.ndarray]]] = [[] for _ in evidence]
    left = max_frames
    depth = 0
    while left > 0 and any(depth < len(q) for q in queues):
        for i, q in enumerate(queues):
            if left == 0:
                break
            if depth < len(q):
                chosen[i].append(q[depth])
                left -= 1
        depth += 1
    return [sorted(c, key=lambda tf: float(tf[0])) for c in chosen]


def _to_image(rgb: np.ndarray, max_side: int):
    """uint8 (H, W, 3) -> PIL image, longest side at most ``max_side``."""
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"evidence frames must be uint8 (H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    h, w = arr.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return img


def transcript_lines(moment) -> list[str]:
    """The moment's speech and on-screen text as prompt lines, ``"Time 12.0s: [speech] ..."``, in time order."""
    out = []
    for e in sorted(getattr(moment, "evidence", ()) or (), key=lambda e: float(e.get("start_s", 0.0))):
        text = _clean(str(e.get("text", "")), 1000)
        if text:
            out.append(f"Time {float(e.get('start_s', 0.0)):.1f}s: [{e.get('track', 'speech')}] {text}")
    return out


def build_messages(
    question: str,
    evidence: Sequence[Evidence],
    *,
    max_frames: int = 8,
    max_side: int = 448,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The chat messages and the images for one question (the VideoLLaMA3-style timestamped prompt).

    One user turn: the instruction; then per moment with frames or text evidence, ``"Video <name>, moment <a>–<b>
    s:"`` followed, per frame, by ``"Time <t>s:"`` and an image placeholder, and per line of the moment's speech or
    on-screen text, ``"Time <t>s: [speech] <words>"`` / ``"Time <t>s: [text] <text>"``; then
    ``"Question: <q>"``.

    Returns:
        ``(messages, images)``: messages in the transformers chat format (``{"type": "image"}``
        placeholders), and PIL images in placeholder order, longest side at most ``max_side``.
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": INSTRUCTION}]
    images = []
    lines = 0
    for ev, frames in zip(evidence, select_frames(evidence, max_frames), strict=True):
        m = ev.moment
        said = transcript_lines(m)
        if not frames and not said:
            continue
        content.append({"type": "text", "text": f"\nVideo {video_name(m)}, moment {m.start_s:.1f}–{m.end_s:.1f} s:"})
        for t, rgb in frames:
            content.append({"type": "text", "text": f"\nTime {float(t):.1f}s:"})
            content.append({"type": "image"})
            images.append(_to_image(rgb, max_side))
        for line in said:
            content.append({"type": "text", "text": f"\n{line}"})
            lines += 1
    if not images and not lines:
        content.append({"type": "text", "text": "\n(No frames were found for this question.)"})
    content.append({"type": "text", "text": f"\nQuestion: {_clean(question, 4000)}"})
    return [{"role": "user", "content": content}], images


# ====================================================================== the VLM adapter


def _locate(model: str) -> Path:
    """The local directory holding ``model`` (a directory, or a hub id's cached snapshot). Never downloads."""
    if not isinstance(model, str) or not model.strip():
        raise AnswererError("empty VLM id; expected a Hugging Face id (already cached) or a local directory")
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return Path(expanded).resolve()
    if model.startswith(("/", ".", "~")) or os.path.isabs(model) or not _HUB_ID.fullmatch(model):
        raise AnswererError(f"VLM {model!r} is neither an existing directory nor a Hugging Face id 'owner/name'")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise AnswererError("huggingface_hub is needed to find cached models") from e
    hit = try_to_load_from_cache(model, "config.json")
    if not isinstance(hit, (str, os.PathLike)):
        raise AnswererError(
            f"VLM {model!r} is not in the local Hugging Face cache and ray-vlm never downloads models; "
            f"fetch it first (e.g. `huggingface-cli download {model}`) or pass a local directory"
        )
    return Path(hit).parent


def _check_dir(path: Path) -> dict:
    """Refuse remote code, unsupported families and pickle-only weights; return config.json."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise AnswererError(f"VLM directory {path} has no config.json")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AnswererError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(config, dict):
        raise AnswererError(f"{cfg_path} is not a JSON object")
    if "auto_map" in config:
        raise AnswererError(f"{cfg_path} needs remote code (auto_map); trust_remote_code is never enabled")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AnswererError(
            f"unsupported VLM model_type {model_type!r} in {path}; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    names = [p.name for p in path.iterdir() if p.is_file() or p.is_symlink()]
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise AnswererError(f"{path} holds only pickle checkpoint(s) {pickles}; ray-vlm loads safetensors only")
        raise AnswererError(f"{path} has no *.safetensors weights")
    return config


def _load_processor(path: Path, model_type: str):
    """AutoProcessor, or (without torchvision) the family's processor class assembled with no video processor."""
    import transformers

    common = dict(local_files_only=True, trust_remote_code=False)
    try:
        return transformers.AutoProcessor.from_pretrained(str(path), **common)
    except ImportError as first:
        import importlib.util

        if importlib.util.find_spec("torchvision") is not None:
            raise AnswererError(f"cannot load the processor of {path}: {first}") from first
    except Exception as e:
        raise AnswererError(f"cannot load the processor of {path}: {type(e).__name__}: {e}") from e

    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])

    class _ImagesOnlyProcessor(base):  # type: ignore[misc, valid-type]
        """The family's processor without its (torchvision-only) video processor."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **common)
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(path), **common)
        template = getattr(tokenizer, "chat_template", None)
        for name in ("chat_template.jinja", "chat_template.json"):
            p = path / name
            if p.is_file():
                text = p.read_text(encoding="utf-8")
                template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        return _ImagesOnlyProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template
        )
    except Exception as e:
        raise AnswererError(f"cannot load the processor of {path}: {type(e).__name__}: {e}") from e


class _Cancel:
    """A stopping criterion that ends generation once the reader has gone away."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class VLMAnswerer:
    """Answers from evidence frames with a local Qwen2-VL / Qwen2.5-VL / VideoLLaMA3 checkpoint.

    Args:
        model: a Hugging Face id already in the local cache (``"Qwen/Qwen2-VL-2B-Instruct"``) or a local
            directory holding a saved model, its processor files and a chat template.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``/None (CUDA when visible).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None: float32 on CPU, bfloat16 on CUDA.
        max_new_tokens: answer length bound (tokens).
        max_frames: at most this many frames per question (round-robin over moments, best first).
        max_side: frames are shrunk so their longest side is at most this many pixels.
        token_timeout_s: how long a reader waits for the next piece of text.

    Attributes:
        name: the ``model`` string as given. model_type: the family (``config.json``'s ``model_type``).

    Raises:
        AnswererError: the model cannot be found locally or is refused (see the module docstring).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 128,
        max_frames: int = 8,
        max_side: int = 448,
        token_timeout_s: float = DEFAULT_TOKEN_TIMEOUT_S,
    ):
        import torch
        import transformers

        from ray_vlm.models.base import EncoderError, resolve_device, resolve_dtype

        if max_new_tokens < 1 or max_frames < 0 or max_side < 28:
            raise ValueError(
                f"need max_new_tokens >= 1, max_frames >= 0, max_side >= 28; got {max_new_tokens}, "
                f"{max_frames}, {max_side}"
            )
        self.name = model
        self.max_new_tokens = int(max_new_tokens)
        self.max_frames = int(max_frames)
        self.max_side = int(max_side)
        self.token_timeout_s = float(token_timeout_s)
        self.path = _locate(model)
        config = _check_dir(self.path)
        self.model_type = str(config["model_type"])
        try:
            self.device = resolve_device(device or "auto")
            if dtype is None:
                dtype = "float32" if self.device == "cpu" else "bfloat16"
            self.dtype = resolve_dtype(dtype, self.device)
        except EncoderError as e:
            raise AnswererError(str(e)) from e
        self.processor = _load_processor(self.path, self.model_type)
        if not getattr(self.processor, "chat_template", None):
            raise AnswererError(f"{self.path} has no chat template (use an instruction-tuned checkpoint)")
        try:
            model_obj = transformers.AutoModelForImageTextToText.from_pretrained(
                str(self.path),
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=self.dtype,
            )
        except Exception as e:
            raise AnswererError(f"cannot load the VLM {model!r}: {type(e).__name__}: {e}") from e
        # transformers wraps ``.to`` with ``functools.wraps(nn.Module.to)``: mypy then takes ``self`` for its
        # first argument
        self.model = model_obj.to(self.device).eval()  # type: ignore[arg-type]
        self._torch = torch
        self._lock = threading.Lock()  # one generation at a time per loaded model

    # ------------------------------------------------------------ prompt

    def build_messages(self, question: str, evidence: Sequence[Evidence]) -> tuple[list[dict[str, Any]], list[Any]]:
        """:func:`build_messages` with this answerer's ``max_frames`` / ``max_side``."""
        return build_messages(question, evidence, max_frames=self.max_frames, max_side=self.max_side)

    def build_prompt(self, question: str, evidence: Sequence[Evidence]) -> tuple[str, list[Any]]:
        """The rendered chat prompt (image placeholders not yet expanded) and its images."""
        messages, images = self.build_messages(question, evidence)
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt, images

    def _inputs(self, question: str, evidence: Sequence[Evidence]):
        prompt, images = self.build_prompt(question, evidence)
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        out = {}
        for k, v in inputs.items():
            if hasattr(v, "to"):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    # ------------------------------------------------------------ answer

    def stream(self, question: str, evidence: Sequence[Evidence]) -> AnswerStream:
        """The answer as it is generated: an iterator of text pieces (roughly a word each).

        The prompt is built (and checked) here; generation starts in a thread at the first ``next()``.
        ``close()`` on the returned iterator stops generation at the next token, and may be called
        from any thread, even while another thread is blocked in ``next()``.

        Raises:
            ValueError: an evidence frame is not uint8 (H, W, 3).
            AnswererError (from ``next()``): generation failed (the cause is chained) or produced
                nothing for ``token_timeout_s``.
        """
        return AnswerStream(self, self._inputs(question, evidence))

    def answer(self, question: str, evidence: Sequence[Evidence]) -> str:
        """The whole answer text."""
        return "".join(self.stream(question, evidence))


class AnswerStream:
    """Iterator over a VLM answer being generated in a background thread (see :meth:`VLMAnswerer.stream`)."""

    def __init__(self, answerer: VLMAnswerer, inputs: dict[str, Any]):
        from transformers import TextIteratorStreamer

        self._answerer = answerer
        self._inputs = inputs
        self._streamer = TextIteratorStreamer(
            answerer.processor.tokenizer,
            skip_prompt=True,
            skip_special_tokens=True,
            timeout=answerer.token_timeout_s,
        )
        self._cancel = _Cancel()
        self._failure: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._done = False

    def _run(self) -> None:
        from transformers import StoppingCriteriaList

        a = self._answerer
        try:
            with a._lock, a._torch.inference_mode():
                if self._cancel.event.is_set():
                    self._streamer.end()
                    return
                a.model.generate(
                    **self._inputs,
                    max_new_tokens=a.max_new_tokens,
                    do_sample=False,
                    streamer=self._streamer,
                    stopping_criteria=StoppingCriteriaList([self._cancel]),
                )
        except BaseException as e:  # noqa: BLE001 - re-raised in the reader's thread
            self._failure.append(e)
            self._streamer.end()

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        import queue

        if self._done:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ray-vlm-qa-generate", daemon=True)
            self._thread.start()
        try:
            while True:
                text = next(self._streamer)
                if text:
                    return text
        except StopIteration:
            self._done = True
            self._cancel.event.set()
            if self._failure:
                e = self._failure[0]
                raise AnswererError(f"generation failed: {type(e).__name__}: {e}") from e
            raise
        except queue.Empty as e:
            self.close()
            raise AnswererError(f"no answer text for {self._answerer.token_timeout_s:.0f} s") from e

    def close(self) -> None:
        """Stop generation at its next token (thread-safe; idempotent)."""
        self._done = True
        self._cancel.event.set()

    def __del__(self):
        self._cancel.event.set()


def load_answerer(model: str | None, **kw) -> EvidenceAnswerer | VLMAnswerer:
    """``None`` (or "") -> :class:`EvidenceAnswerer`; else a :class:`VLMAnswerer` for ``model`` (``kw`` go to it)."""
    if model is None or (isinstance(model, str) and not model.strip()):
        return EvidenceAnswerer()
    return VLMAnswerer(model, **kw)
