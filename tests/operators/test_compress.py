"""CompressTokens: quantisation round trips, LLaMA-VID grid pooling values, kept-patch selection by mask."""

from __future__ import annotations

import numpy as np
import pytest

from ray_vlm.core import schema as S
from ray_vlm.core.config import CompressConfig
from ray_vlm.operators.compress import CompressTokens, adaptive_avg_pool
from ray_vlm.store.codec import decode_vectors
from ray_vlm.store.token_store import CHUNK_ERROR

pytestmark = pytest.mark.timeout(60)


def _objects(items):
    col = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        col[i] = x
    return col


def _batch(global_emb, patch_emb, keep_mask, **extra):
    b = {
        S.GLOBAL_EMB: _objects(global_emb),
        S.PATCH_EMB: _objects(patch_emb),
        S.KEEP_MASK: _objects(keep_mask),
        S.VIDEO_ID: np.array([f"v{i}" for i in range(len(global_emb))], dtype=object),
    }
    b.update(extra)
    return b


def _random(t=4, gh=4, gw=4, d=32, seed=0):
    rng = np.random.default_rng(seed)
    ge = rng.normal(size=(t, d)).astype(np.float32)
    ge /= np.linalg.norm(ge, axis=1, keepdims=True)
    pe = rng.normal(size=(t, gh * gw, d)).astype(np.float32)
    km = rng.random((t, gh, gw)) > 0.5
    km[:, 0, 0] = True
    return ge, pe, km


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_fp16_round_trip_and_output_columns():
    ge, pe, km = _random()
    out = CompressTokens(CompressConfig(grid=2, patches=True, dtype="fp16"))(_batch([ge], [pe], [km]))
    assert S.GLOBAL_EMB not in out and S.PATCH_EMB not in out
    assert out[S.VIDEO_ID][0] == "v0" and out[S.KEEP_MASK][0] is not None  # pass-through
    assert out[S.LAYOUT][0] == "global+grid2+patches:fp16" and out[S.TOKEN_DTYPE][0] == "fp16"
    assert (out[S.DIM][0], out[S.GRID_SIZE][0], out[S.PATCH_GRID_H][0], out[S.PATCH_GRID_W][0]) == (32, 2, 4, 4)
    tokens = out[S.GLOBAL_TOKEN][0]
    assert len(tokens) == 4 and all(isinstance(b, bytes) and len(b) == 64 for b in tokens)
    back = decode_vectors(b"".join(tokens), 32, "fp16")
    assert np.abs(back - ge).max() < 1e-3
    assert np.all(out[S.GLOBAL_SCALE][0] == 1.0) and out[S.GLOBAL_SCALE][0].dtype == np.float32
    assert out[S.GRID_SCALES][0] == [None] * 4  # fp16 grid needs no scales
    assert all(len(b) == 2 * 2 * 32 * 2 for b in out[S.GRID_TOKENS][0])
    assert out[CHUNK_ERROR][0] is None


def test_int8_round_trip_cosine_above_099():
    ge, pe, km = _random(d=64, seed=3)
    out = CompressTokens(CompressConfig(grid=3, patches=True, dtype="int8"))(_batch([ge], [pe], [km]))
    g = decode_vectors(b"".join(out[S.GLOBAL_TOKEN][0]), 64, "int8", out[S.GLOBAL_SCALE][0])
    assert _cos(g, ge).min() > 0.99
    grid = decode_vectors(b"".join(out[S.GRID_TOKENS][0]), 64, "int8", b"".join(out[S.GRID_SCALES][0]))
    expected = adaptive_avg_pool(pe.reshape(4, 4, 4, 64), 3).reshape(-1, 64)
    assert grid.shape == (4 * 9, 64)
    assert _cos(grid, expected).min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(grid, axis=1), 1.0, atol=0.02)  # re-normalised


def test_grid_pooling_values_on_a_known_grid():
    # 4x4 patch grid, D=2: patch (r, c) = (r, c) + (1, 1). 2x2 pooling averages 2x2 blocks.
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    pe = np.stack([rows + 1.0, cols + 1.0], axis=-1).reshape(1, 16, 2).astype(np.float32)
    ge = np.array([[1.0, 0.0]], np.float32)
    out = CompressTokens(CompressConfig(grid=2, patches=False, dtype="fp16"))(
        _batch([ge], [pe], [np.ones((1, 4, 4), bool)]))
    grid = decode_vectors(out[S.GRID_TOKENS][0][0], 2, "fp16")
    means = np.array([[1.5, 1.5], [1.5, 3.5], [3.5, 1.5], [3.5, 3.5]])  # blocks row-major
    expected = means / np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(grid, expected, atol=1e-3)
    assert out[S.PATCH_TOKENS][0] == [None] and out[S.LAYOUT][0] == "global+grid2:fp16"


@pytest.mark.parametrize("shape,g", [((3, 5), 2), ((7, 7), 3), ((2, 2), 3)])
def test_adaptive_pool_matches_torch(shape, g):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, *shape, 5)).astype(np.float32)
    ours = adaptive_avg_pool(x, g)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), g).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_kept_patches_follow_the_mask():
    ge, pe, _ = _random(t=3, gh=3, gw=4, d=16, seed=5)
    km = np.zeros((3, 3, 4), bool)
    km[0] = True  # all 12
    km[1, 0, 3] = km[1, 2, 1] = True  # flat 3 and 9
    km[2, 1, 0] = True  # flat 4
    out = CompressTokens(CompressConfig(grid=0, patches=True, dtype="fp16"))(_batch([ge], [pe], [km]))
    idx = [np.frombuffer(b, "<u2").tolist() for b in out[S.PATCH_INDEX][0]]
    assert idx == [list(range(12)), [3, 9], [4]]
    for t in range(3):
        n = len(idx[t])
        assert len(out[S.PATCH_SCALES][0][t]) == 4 * n and len(out[S.PATCH_TOKENS][0][t]) == 16 * n
        tok = decode_vectors(out[S.PATCH_TOKENS][0][t], 16, "int8", out[S.PATCH_SCALES][0][t])
        assert _cos(tok, pe[t, idx[t]]).min() > 0.99
    assert out[S.GRID_TOKENS][0] == [None] * 3 and out[S.GRID_SIZE][0] == 0
    assert out[S.LAYOUT][0] == "global+patches:fp16"


def test_rows_without_frames_and_malformed_rows_do_not_fail_the_batch():
    ge, pe, km = _random(t=2, seed=7)
    bad_pe = np.zeros((2, 5, 32), np.float32)  # 5 patches for a 4x4 mask
    empty_ge = np.zeros((0, 32), np.float32)
    out = CompressTokens(CompressConfig())(
        _batch([ge, empty_ge, None, ge], [pe, np.zeros((0, 16, 32), np.float32), None, bad_pe],
               [km, np.zeros((0, 4, 4), bool), None, km]))
    assert len(out[S.GLOBAL_TOKEN][0]) == 2 and out[CHUNK_ERROR][0] is None
    for r in (1, 2):
        assert out[S.GLOBAL_TOKEN][r] == [] and len(out[S.GLOBAL_SCALE][r]) == 0 and out[CHUNK_ERROR][r] is None
    assert out[S.DIM][1] == 32
    assert out[S.GLOBAL_TOKEN][3] == [] and "CompressTokens" in out[CHUNK_ERROR][3]


def test_missing_global_emb_names_the_operator():
    with pytest.raises(S.SchemaError, match="CompressTokens"):
        CompressTokens(CompressConfig())({S.VIDEO_ID: np.array(["a"])})
