"""The id -> family dispatch of ray_vlm.models and the small shared helpers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ray_vlm.models import (
    DEFAULT_ENCODER_ID,
    Encoder,
    EncoderError,
    EncoderSpec,
    get_spec,
    load_encoder,
)
from ray_vlm.models.base import (
    check_frames,
    l2_normalize,
    resolve_device,
    resolve_dtype,
)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("clip-vit", "no family prefix"),
        ("torchhub:resnet", "unknown encoder family 'torchhub'"),
        ("bundled:other", "unknown bundled encoder"),
        ("hf:/definitely/not/a/dir", "does not exist"),
    ],
)
def test_bad_ids(bad, message):
    with pytest.raises(EncoderError, match=message):
        get_spec(bad)
    with pytest.raises(EncoderError, match=message):
        load_encoder(bad, device="cpu")


def test_error_is_a_value_error():
    assert issubclass(EncoderError, ValueError)


def test_default_id_resolves():
    spec = get_spec(DEFAULT_ENCODER_ID)
    assert spec.id == DEFAULT_ENCODER_ID and spec.dim == 384


def test_spec_is_frozen():
    spec = get_spec(DEFAULT_ENCODER_ID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dim = 1  # type: ignore[misc]
    assert isinstance(spec, EncoderSpec) and spec.num_patches == 49


def test_loaded_encoders_satisfy_the_protocol(bundled_encoder):
    assert isinstance(bundled_encoder, Encoder)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(EncoderError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(EncoderError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_check_frames_and_normalize():
    spec = EncoderSpec("x:y", "r", "s", 4, (8, 6), (2, 2))
    check_frames(np.zeros((2, 8, 6, 3), np.uint8), spec)
    with pytest.raises(EncoderError, match="8x6"):
        check_frames(np.zeros((2, 6, 8, 3), np.uint8), spec)
    v = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(v, [[0.6, 0.8], [0.0, 0.0]])
    assert v.dtype == np.float32
