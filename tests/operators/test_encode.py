"""EncodeFrames on synthetic chunk batches (no Ray): batching across rows, failures as data, wiring errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ray_vlm.core import schema
from ray_vlm.core.config import EncoderConfig
from ray_vlm.core.schema import SchemaError
from ray_vlm.models import EncoderError, EncoderSpec, get_spec
from ray_vlm.operators.encode import EncodeFrames

pytestmark = pytest.mark.timeout(300)

H, W, D, GH, GW = 8, 6, 4, 2, 3
POISON = 13  # frames whose first pixel is this make the fake encoder raise
NAN = 17  # ... or return NaN


class FakeEncoder:
    """Embeds a frame as a function of its first pixel value, so outputs can be traced to inputs."""

    spec = EncoderSpec(
        id="fake:enc", revision="rev123", space="fake-space", dim=D, input_size=(H, W), patch_grid=(GH, GW)
    )

    def __init__(self):
        self.calls: list[int] = []

    def encode_frames(self, frames):
        self.calls.append(len(frames))
        v = frames[:, 0, 0, 0].astype(np.float32)  # (N,)
        if (v == POISON).any():
            raise RuntimeError("poisoned frame")
        g = np.stack([v, np.ones_like(v), np.zeros_like(v), np.zeros_like(v)], axis=1)  # (N, D)
        if (v == NAN).any():
            g[v == NAN] = np.nan
        p = np.repeat(g[:, None, :], GH * GW, axis=1) + np.arange(GH * GW, dtype=np.float32)[None, :, None]
        return g, p

    def encode_text(self, texts):  # pragma: no cover - unused here
        return np.zeros((len(texts), D), np.float32)


def _frames(values) -> np.ndarray:
    out = np.zeros((len(values), H, W, 3), np.uint8)
    for t, v in enumerate(values):
        out[t, 0, 0, 0] = v
    return out


def _obj(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def _batch(rows, statuses=None) -> dict[str, np.ndarray]:
    n = len(rows)
    return {
        schema.VIDEO_ID: np.array([f"vid{i}" for i in range(n)], dtype=object),
        schema.CHUNK_INDEX: np.arange(n, dtype=np.int32),
        schema.FRAMES: _obj(rows),
        schema.PTS_S: _obj([np.arange(len(r), dtype=np.float64) for r in rows]),
        schema.STATUS: np.array(statuses or [schema.STATUS_OK] * n, dtype=object),
        schema.ERROR_TYPE: np.array([None] * n, dtype=object),
        schema.ERROR: np.array([None] * n, dtype=object),
    }


def test_batches_across_rows_and_splits_back():
    enc = FakeEncoder()
    op = EncodeFrames.from_encoder(enc, batch_size=4)
    rows = [_frames([1, 2, 3]), _frames([]), _frames([4, 5, 6, 7, 8])]
    batch = _batch(rows)
    out = op(batch)

    assert enc.calls == [4, 4]  # 8 frames in sub-batches of 4, across row boundaries
    assert schema.FRAMES not in out
    assert set(EncodeFrames.adds) <= set(out)
    for col in (schema.VIDEO_ID, schema.CHUNK_INDEX):
        np.testing.assert_array_equal(out[col], batch[col])
    assert out[schema.PTS_S] is batch[schema.PTS_S]
    expected = {0: [1, 2, 3], 1: [], 2: [4, 5, 6, 7, 8]}
    for i, values in expected.items():
        g, p = out[schema.GLOBAL_EMB][i], out[schema.PATCH_EMB][i]
        assert g.shape == (len(values), D) and g.dtype == np.float32
        assert p.shape == (len(values), GH * GW, D) and p.dtype == np.float32
        np.testing.assert_array_equal(g[:, 0], values)
        if values:
            np.testing.assert_array_equal(p[:, 5, 0], np.array(values) + 5)  # patch order kept
    assert list(out[schema.ENCODER]) == ["fake:enc"] * 3
    assert list(out[schema.ENCODER_REVISION]) == ["rev123"] * 3
    assert list(out[schema.SPACE]) == ["fake-space"] * 3
    assert list(out[schema.STATUS]) == [schema.STATUS_OK] * 3
    # The input batch was not modified.
    assert schema.FRAMES in batch and batch[schema.STATUS][0] == schema.STATUS_OK


def test_a_failing_row_is_isolated():
    enc = FakeEncoder()
    op = EncodeFrames.from_encoder(enc, batch_size=8)
    out = op(_batch([_frames([1, 2]), _frames([3, POISON, 4]), _frames([5])]))
    assert list(out[schema.STATUS]) == [schema.STATUS_OK, schema.STATUS_FAILED, schema.STATUS_OK]
    assert out[schema.ERROR_TYPE][1] == schema.ERR_ENCODE
    assert "poisoned frame" in out[schema.ERROR][1] and "EncodeFrames" in out[schema.ERROR][1]
    assert out[schema.ERROR_TYPE][0] is None and out[schema.ERROR_TYPE][2] is None
    np.testing.assert_array_equal(out[schema.GLOBAL_EMB][0][:, 0], [1, 2])
    np.testing.assert_array_equal(out[schema.GLOBAL_EMB][2][:, 0], [5])
    assert out[schema.GLOBAL_EMB][1].shape == (0, D)
    assert out[schema.PATCH_EMB][1].shape == (0, GH * GW, D)


def test_non_finite_output_fails_the_row():
    op = EncodeFrames.from_encoder(FakeEncoder(), batch_size=8)
    out = op(_batch([_frames([NAN]), _frames([2])]))
    assert list(out[schema.STATUS]) == [schema.STATUS_FAILED, schema.STATUS_OK]
    assert "non-finite" in out[schema.ERROR][0]


def test_rows_failed_upstream_are_not_encoded():
    enc = FakeEncoder()
    op = EncodeFrames.from_encoder(enc, batch_size=8)
    batch = _batch([_frames([1, 2]), _frames([3, 4, 5])], statuses=[schema.STATUS_FAILED, schema.STATUS_PARTIAL])
    batch[schema.ERROR_TYPE][0] = schema.ERR_DECODE
    out = op(batch)
    assert enc.calls == [3]  # only the partial row's frames
    assert list(out[schema.STATUS]) == [schema.STATUS_FAILED, schema.STATUS_PARTIAL]
    assert out[schema.ERROR_TYPE][0] == schema.ERR_DECODE  # upstream error kept
    assert out[schema.GLOBAL_EMB][0].shape == (0, D)
    np.testing.assert_array_equal(out[schema.GLOBAL_EMB][1][:, 0], [3, 4, 5])


def test_all_empty_batch_never_calls_the_model():
    enc = FakeEncoder()
    out = EncodeFrames.from_encoder(enc)(_batch([_frames([]), np.zeros((0,), np.uint8)]))
    assert enc.calls == []
    assert [g.shape for g in out[schema.GLOBAL_EMB]] == [(0, D), (0, D)]


def test_dense_frames_column_is_accepted():
    # Ray may hand equal-shaped tensors as one (B, T, H, W, 3) array instead of an object column.
    op = EncodeFrames.from_encoder(FakeEncoder(), batch_size=3)
    batch = _batch([_frames([1, 2]), _frames([3, 4])])
    batch[schema.FRAMES] = np.stack(list(batch[schema.FRAMES]))
    out = op(batch)
    np.testing.assert_array_equal(out[schema.GLOBAL_EMB][1][:, 0], [3, 4])


def test_wrong_frame_size_is_a_wiring_error():
    op = EncodeFrames.from_encoder(FakeEncoder())
    bad = np.zeros((2, H + 1, W, 3), np.uint8)
    with pytest.raises(EncoderError, match=r"9x6 \(HxW\).*takes 8x6"):
        op(_batch([_frames([1]), bad]))
    with pytest.raises(EncoderError, match="uint8"):
        op(_batch([np.zeros((1, H, W, 3), np.float32)]))


def test_missing_columns_name_the_operator():
    op = EncodeFrames.from_encoder(FakeEncoder())
    batch = _batch([_frames([1])])
    del batch[schema.STATUS]
    with pytest.raises(SchemaError, match="EncodeFrames.*status"):
        op(batch)
    assert schema.FRAMES in EncodeFrames.reads


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        EncodeFrames.from_encoder(FakeEncoder(), batch_size=0)


def test_with_the_bundled_encoder(monkeypatch):
    cache = Path(__file__).resolve().parents[1] / ".fixtures" / "model_cache"
    monkeypatch.setenv("RAY_VLM_CACHE_DIR", str(cache))
    op = EncodeFrames(EncoderConfig(id="bundled:effnet-lite0-minilm", batch_size=3, device="cpu"))
    spec = get_spec("bundled:effnet-lite0-minilm")
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (t, 224, 224, 3), dtype=np.uint8) for t in (2, 0, 3)]
    out = op(_batch(rows))
    assert [g.shape for g in out[schema.GLOBAL_EMB]] == [(2, 384), (0, 384), (3, 384)]
    assert [p.shape for p in out[schema.PATCH_EMB]] == [(2, 49, 384), (0, 49, 384), (3, 49, 384)]
    assert out[schema.ENCODER_REVISION][0] == spec.revision and out[schema.SPACE][0] == spec.space
    # Same frames encoded alone give the same vectors (sub-batching across rows is transparent).
    g_alone, _ = op.encoder.encode_frames(rows[2])
    np.testing.assert_allclose(out[schema.GLOBAL_EMB][2], g_alone, atol=1e-5)


def test_config_dict_form_is_validated():
    # fn_constructor_kwargs may carry the config as a dict: it is validated, then its id resolved.
    with pytest.raises(EncoderError, match="unknown bundled encoder"):
        EncodeFrames({"id": "bundled:nope", "batch_size": 4})
    with pytest.raises(ValueError, match="batch_size"):
        EncodeFrames({"id": "bundled:effnet-lite0-minilm", "batch_size": 0})


class AnySizeEncoder(FakeEncoder):
    """Takes frames of any whole number of 2-pixel patches: the grid is their size in patches."""

    spec = EncoderSpec(id="fake:any", revision="rev", space="fake-space", dim=D, input_size=(4, 4), patch_grid=(2, 2),
                       patch_px=2)

    def encode_frames(self, frames):
        self.calls.append(frames.shape[:3])
        n, h, w = frames.shape[:3]
        g = np.tile(np.array([h, w, 1, 0], np.float32), (n, 1))
        return g, np.repeat(g[:, None, :], (h // 2) * (w // 2), axis=1)


def test_rows_of_different_frame_sizes_are_encoded_apart_and_keep_their_grids():
    enc = AnySizeEncoder()
    op = EncodeFrames.from_encoder(enc, batch_size=8)
    wide, tall = np.zeros((3, 4, 6, 3), np.uint8), np.zeros((2, 6, 4, 3), np.uint8)
    out = op(_batch([wide, tall, np.zeros((1, 4, 6, 3), np.uint8)]))
    assert sorted(enc.calls) == [(2, 6, 4), (4, 4, 6)]  # one call per size, rows of a size together
    assert [p.shape for p in out[schema.PATCH_EMB]] == [(3, 6, D), (2, 6, D), (1, 6, D)]  # 2x3 and 3x2 grids
    assert [tuple(g[0, :2]) for g in out[schema.GLOBAL_EMB]] == [(4, 6), (6, 4), (4, 6)]
    with pytest.raises(EncoderError, match="multiples of 2"):
        op(_batch([np.zeros((1, 5, 6, 3), np.uint8)]))
