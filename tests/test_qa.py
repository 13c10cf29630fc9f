"""ray_vlm.query.qa: the evidence-only answerer, timestamped prompts, and tiny random VLMs loaded by path.

The VLMs are built here from configs (``fixtures.models.build_tiny_vlm``: random weights, a word-level
tokenizer, our own ChatML-style chat template), never downloaded.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from fixtures.models import VLM_KINDS, VLM_WORDS, build_tiny_vlm
from ray_vlm.query.qa import (
    AnswererError,
    Evidence,
    EvidenceAnswerer,
    VLMAnswerer,
    build_messages,
    load_answerer,
    select_frames,
)
from ray_vlm.query.searcher import Moment

pytestmark = pytest.mark.timeout(300)


def _frame(seed: int, h: int = 90, w: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _evidence() -> list[Evidence]:
    a = Moment("vid_a", "/lib/bikes.mp4", 10.0, 14.0, 0.83, 12.0)
    b = Moment("vid_b", "s3://bucket/clips/carphone.mp4", 1.25, 3.5, 0.41, 2.0)
    c = Moment("vid_c", "", 30.0, 31.0, 0.12, 30.5)
    return [
        Evidence(a, [(11.0, _frame(1)), (12.0, _frame(2)), (13.0, _frame(3))]),
        Evidence(b, [(2.0, _frame(4, 600, 800)), (3.0, _frame(5))]),
        Evidence(c, []),
    ]


# ================================================================== evidence answerer


def test_evidence_answer_lists_exactly_the_moments():
    ans = EvidenceAnswerer()
    chunks = list(ans.stream("who rides a bike?", _evidence()))
    assert len(chunks) == 4  # header + one line per moment
    expected = (
        'No answering model is configured; grounded evidence for "who rides a bike?" (3 moments):\n'
        "1. bikes.mp4 10.0–14.0 s (score 0.83)\n"
        "2. carphone.mp4 1.2–3.5 s (score 0.41)\n"
        "3. vid_c 30.0–31.0 s (score 0.12)\n"
    )
    assert "".join(chunks) == expected  # nothing beyond the moments is claimed
    assert ans.answer("who rides a bike?", _evidence()) == expected
    assert ans.name == "evidence"


def test_evidence_answer_with_nothing_found():
    text = EvidenceAnswerer().answer("a unicorn", [])
    assert text == 'No answering model is configured, and no moments were found for "a unicorn".\n'


def test_evidence_answer_echoes_a_clean_bounded_question():
    text = EvidenceAnswerer().answer("why\x00\n\tnot " + "x" * 2000, [])
    first = text.splitlines()[0]
    assert "\x00" not in text and text.count("\n") == 1
    assert '"why not xxx' in first and len(first) < 600


# ================================================================== prompts


def test_select_frames_round_robin_best_first():
    ev = _evidence()
    picked = select_frames(ev, 4)
    assert [[t for t, _ in frames] for frames in picked] == [[11.0, 12.0], [2.0, 3.0], []]
    picked = select_frames(ev, 3)
    assert [[t for t, _ in frames] for frames in picked] == [[11.0, 12.0], [2.0], []]
    assert sum(map(len, select_frames(ev, 100))) == 5
    assert select_frames(ev, 0) == [[], [], []]


@pytest.mark.parametrize("max_frames", [1, 3, 5, 8])
def test_build_messages_timestamps_each_frame(max_frames):
    messages, images = build_messages("what is he riding?", _evidence(), max_frames=max_frames, max_side=224)
    assert len(images) == min(5, max_frames)
    (turn,) = messages
    assert turn["role"] == "user"
    content = turn["content"]
    assert sum(c["type"] == "image" for c in content) == len(images)
    # every image is directly preceded by its "Time <t>s:" line
    for i, c in enumerate(content):
        if c["type"] == "image":
            assert content[i - 1]["type"] == "text" and content[i - 1]["text"].startswith("\nTime ")
            assert content[i - 1]["text"].endswith("s:")
    text = "".join(c.get("text", "") for c in content)
    assert "Time 11.0s:" in text and "Video bikes.mp4, moment 10.0–14.0 s:" in text
    assert ("Time 2.0s:" in text) == (max_frames >= 2)
    assert text.rstrip().endswith("Question: what is he riding?")
    assert "vid_c" not in text  # a moment without frames is not shown
    assert all(max(img.size) <= 224 for img in images)
    # the 800x600 frame is shrunk to a longest side of 224, aspect kept; 160x90 frames are left alone
    assert ((224, 168) in [img.size for img in images]) == (max_frames >= 2)
    assert images[0].size == (160, 90)


def test_build_messages_without_frames_says_so():
    messages, images = build_messages("q", [Evidence(Moment("v", "/x.mp4", 0, 1, 0.5, 0.5), [])])
    assert images == []
    assert "No frames were found" in "".join(c.get("text", "") for c in messages[0]["content"])


# ================================================================== tiny VLMs


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {kind: build_tiny_vlm(kind, root / kind) for kind in VLM_KINDS}


@pytest.fixture(scope="module")
def answerers(tiny_vlms):
    return {kind: VLMAnswerer(str(path), device="cpu", max_new_tokens=6, max_frames=3)
            for kind, path in tiny_vlms.items()}


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_prompt_and_streamed_answer(answerers, kind):
    ans = answerers[kind]
    assert ans.model_type == kind
    ev = [Evidence(Moment("v1", "/lib/bikes.mp4", 10.0, 14.0, 0.9, 12.0), [(12.0, _frame(7)), (13.5, _frame(8))]),
          Evidence(Moment("v2", "/lib/cars.mp4", 40.0, 44.0, 0.5, 42.0), [(41.0, _frame(9)), (43.0, _frame(10))])]
    prompt, images = ans.build_prompt("what is the man riding", ev)
    assert "Time 12.0s:" in prompt and "Time 41.0s:" in prompt and "Time 13.5s:" in prompt
    assert "Time 43.0s:" not in prompt  # max_frames=3: round-robin drops the 2nd moment's 2nd frame
    assert "Video bikes.mp4" in prompt and prompt.index("Time 12.0s:") < prompt.index("Question:")
    assert len(images) == 3

    inputs = ans._inputs("what is the man riding", ev)
    grid = inputs["image_grid_thw"]
    assert grid.shape[0] == min(4, ans.max_frames)  # frames that reach the model
    merge = ans.processor.image_processor.merge_size
    n_image_tokens = int((inputs["input_ids"] == ans.model.config.image_token_id).sum())
    assert n_image_tokens == int(grid.prod(-1).sum()) // merge**2 > 0

    chunks = list(ans.stream("what is the man riding", ev))
    assert len(chunks) > 1  # streamed, not returned in one piece
    words = "".join(chunks).split()
    assert 1 <= len(words) <= ans.max_new_tokens and set(words) <= set(VLM_WORDS)
    assert "".join(ans.stream("what is the man riding", ev)) == "".join(chunks)  # greedy: deterministic


def test_closing_the_stream_early_stops_generation(tiny_vlms, monkeypatch):
    import threading

    ans = VLMAnswerer(str(tiny_vlms["qwen2_vl"]), device="cpu", max_new_tokens=400, max_frames=2)
    produced: list[int] = []
    real_generate = ans.model.generate

    def counting_generate(**kwargs):
        out = real_generate(**kwargs)
        produced.append(int(out.shape[-1] - kwargs["input_ids"].shape[-1]))
        return out

    monkeypatch.setattr(ans.model, "generate", counting_generate)
    gen = ans.stream("what happens", _evidence())
    assert next(gen)
    gen.close()  # the reader went away
    for t in threading.enumerate():
        if t.name == "ray-vlm-qa-generate":
            t.join(timeout=60)
    assert len(produced) == 1 and produced[0] < 400  # stopped early, not after 400 tokens
    assert list(gen) == []

    # closed from another thread while a reader thread is blocked in next() (Serve's disconnect path)
    gen = ans.stream("what happens", _evidence())
    assert next(gen)
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(gen))
    reader.start()
    gen.close()
    reader.join(timeout=60)
    assert not reader.is_alive()
    for t in threading.enumerate():
        if t.name == "ray-vlm-qa-generate":
            t.join(timeout=60)
    assert len(produced) == 2 and produced[1] < 400
    ans.max_new_tokens = 4
    assert len(list(ans.stream("what happens", _evidence()))) > 1  # the model is free again


def test_generation_failure_is_raised_to_the_reader(answerers, monkeypatch):
    ans = answerers["qwen2_5_vl"]

    def boom(**kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(ans.model, "generate", boom)
    with pytest.raises(AnswererError, match="simulated"):
        list(ans.stream("q", _evidence()))


def test_load_answerer(tiny_vlms):
    assert isinstance(load_answerer(None), EvidenceAnswerer)
    assert load_answerer("").name == "evidence"
    path = str(tiny_vlms["qwen2_vl"])
    ans = load_answerer(path, max_frames=2, max_new_tokens=3)
    assert isinstance(ans, VLMAnswerer) and ans.name == path and ans.max_frames == 2
    assert len(ans.build_messages("q", _evidence())[1]) == 2


# ============================================================ refusals (nothing downloaded, no remote code, no pickles)


def test_uncached_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AnswererError, match="not in the local Hugging Face cache"):
        VLMAnswerer("Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(AnswererError, match="neither an existing directory"):
        VLMAnswerer(str(tmp_path / "no-such-dir"))
    with pytest.raises(AnswererError):
        VLMAnswerer("not a model id")


def test_refuses_remote_code_pickles_and_other_families(tiny_vlms, tmp_path):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(tiny_vlms["qwen2_vl"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.Evil"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AnswererError, match="remote code"):
        VLMAnswerer(str(remote))

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_vlms["qwen2_vl"], pickled)
    (pickled / "model.safetensors").unlink()
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(AnswererError, match="safetensors only"):
        VLMAnswerer(str(pickled))
    assert not canary.exists()

    other = tmp_path / "clip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(AnswererError, match="unsupported VLM model_type 'clip'"):
        VLMAnswerer(str(other))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", VLM_KINDS)
def test_cuda_bfloat16_streams(tiny_vlms, kind):
    import torch

    ans = VLMAnswerer(str(tiny_vlms[kind]), device="cuda", max_new_tokens=6, max_frames=3)
    assert ans.dtype == torch.bfloat16 and next(ans.model.parameters()).is_cuda
    chunks = list(ans.stream("what is the man riding", _evidence()))
    assert len(chunks) > 1 and set("".join(chunks).split()) <= set(VLM_WORDS)


def test_half_precision_on_cpu_is_refused(tiny_vlms):
    with pytest.raises(AnswererError, match="only supported on CUDA"):
        VLMAnswerer(str(tiny_vlms["qwen2_vl"]), device="cpu", dtype="bfloat16")
