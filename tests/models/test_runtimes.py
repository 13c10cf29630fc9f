"""Encoders on ONNX Runtime: the same outputs as torch (float32) or within a stated tolerance (int8), cached exports."""

from __future__ import annotations

import numpy as np
import pytest

from ray_vlm.models import EncoderError, _ort, bundled, load_encoder

pytestmark = pytest.mark.timeout(900)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def sample_frames() -> np.ndarray:
    return bundled.calibration_frames()  # 48 real frames of the three sample clips


@pytest.fixture(scope="module")
def torch_reference(sample_frames):
    enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="torch")
    return enc, enc.encode_frames(sample_frames)


def test_runtime_names_and_devices():
    with pytest.raises(EncoderError, match="unknown runtime"):
        _ort.resolve_runtime("tensorrt", "cpu")
    with pytest.raises(EncoderError, match="CPU only"):
        _ort.resolve_runtime("onnx", "cuda")
    assert _ort.resolve_runtime("auto", "cuda") == "torch"
    assert _ort.resolve_runtime("auto", "cpu") == ("onnx-int8" if _ort.int8_dot_product() else "onnx")
    assert _ort.resolve_runtime("auto", "cpu", cpu_default="onnx") == "onnx"


def test_bundled_onnx_float32_equals_torch(torch_reference, sample_frames, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", str(tmp_path))
    _, (g_ref, p_ref) = torch_reference
    enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="onnx")
    g, p = enc.encode_frames(sample_frames)
    assert g.dtype == np.float32 and p.shape == p_ref.shape
    np.testing.assert_allclose(g, g_ref, atol=2e-4)
    np.testing.assert_allclose(p, p_ref, atol=2e-4)


def test_bundled_int8_stays_within_tolerance(torch_reference, sample_frames, bundled_encoder):
    """The tolerance the index relies on: every frame's global embedding within cosine 0.99 of torch's, patch
    tokens 0.99 on average (single cells near a tie between ImageNet classes move more)."""
    _, (g_ref, p_ref) = torch_reference
    enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="onnx-int8")
    g, p = enc.encode_frames(sample_frames)
    floor = 0.99 if _ort.int8_dot_product() else 0.98  # 7-bit weights where int8 products would saturate
    assert _cos(g, g_ref).min() >= floor
    assert _cos(p, p_ref).mean() >= floor
    # Batch composition barely changes a frame's embedding: activation scales are fixed at calibration, and
    # the int8 kernels for one frame and for many may round a requantised value differently.
    g1, p1 = enc.encode_frames(sample_frames[5:6])
    assert _cos(g1[0], g[5]) > 0.999 and _cos(p1[0], p[5]).mean() > 0.999


def test_exports_are_cached_and_a_damaged_file_is_rebuilt(tmp_path, monkeypatch, sample_frames):
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", str(tmp_path))
    calls = []
    real = bundled.calibration_frames
    monkeypatch.setattr(bundled, "calibration_frames", lambda: calls.append(1) or real())
    a = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="onnx-int8")
    built = sorted(p.name for p in tmp_path.glob("effnet-lite0-minilm-*.onnx"))
    assert len(built) == 2 and len(calls) == 1  # float32 export, int8 model; no temporary files left
    assert not list(tmp_path.glob("*.tmp"))
    load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="onnx-int8")
    assert len(calls) == 1  # read back, not recalibrated
    for p in tmp_path.glob("effnet-lite0-minilm-*-int8.onnx"):
        p.write_bytes(b"not a model")
    c = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="onnx-int8")
    assert len(calls) == 2
    np.testing.assert_allclose(c.encode_frames(sample_frames[:4])[0], a.encode_frames(sample_frames[:4])[0],
                               atol=1e-3)


def test_caching_off_builds_in_a_temporary_directory(tmp_path, monkeypatch, sample_frames):
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    enc = load_encoder("bundled:effnet-lite0-minilm", device="cpu", runtime="onnx")
    assert enc.encode_frames(sample_frames[:2])[0].shape == (2, 384)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_towers_on_onnx_runtime(tiny_hf_root, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", str(tmp_path))
    x = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ref = load_encoder(f"hf:{tiny_hf_root[kind]}", device="cpu", runtime="torch")
    g_ref, p_ref = ref.encode_frames(x)
    auto = load_encoder(f"hf:{tiny_hf_root[kind]}", device="cpu")
    assert auto.runtime == "onnx"
    g, p = auto.encode_frames(x)
    np.testing.assert_allclose(g, g_ref, atol=1e-4)
    np.testing.assert_allclose(p, p_ref, atol=1e-4)
    q = load_encoder(f"hf:{tiny_hf_root[kind]}", device="cpu", runtime="onnx-int8")
    gq, pq = q.encode_frames(x)
    assert gq.shape == g_ref.shape and pq.shape == p_ref.shape
    assert _cos(gq, g_ref).min() > 0.9  # random tiny weights: a smoke bound; real weights are measured in bench
    np.testing.assert_allclose(q.encode_text(["a dog"]), ref.encode_text(["a dog"]), atol=1e-6)  # text: torch


def test_siglip2_runs_on_torch_and_says_why_not_onnx(tiny_hf_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", str(tmp_path))
    assert load_encoder(f"hf:{tiny_hf_root['siglip2']}", device="cpu").runtime == "torch"
    with pytest.raises(EncoderError, match="runtime 'torch'"):
        load_encoder(f"hf:{tiny_hf_root['siglip2']}", device="cpu", runtime="onnx")
