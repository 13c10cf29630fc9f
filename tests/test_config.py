"""Configs: YAML round trip, unknown keys refused, the output hash tracks only what changes the store."""

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ray_vlm.core.config import IndexConfig

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_is_the_default_config():
    assert IndexConfig.from_yaml(ROOT / "pipelines/configs/default.yaml") == IndexConfig()


def test_unknown_key_and_bad_value_are_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("schema: ray-vlm/index-config/v1\ndecode: {target_fsp: 2}\n")
    with pytest.raises(ValidationError, match="target_fsp"):
        IndexConfig.from_yaml(p)
    p.write_text("decode: {target_fps: -1}\n")
    with pytest.raises(ValidationError):
        IndexConfig.from_yaml(p)
    p.write_text("schema: other/v9\n")
    with pytest.raises(ValidationError, match="unknown config schema"):
        IndexConfig.from_yaml(p)


def test_output_hash_ignores_resources_but_not_sampling():
    base = IndexConfig()
    more_cpus = IndexConfig.model_validate({"resources": {"decode": {"concurrency": 8}}, "commit_interval_s": 1})
    two_fps = IndexConfig.model_validate({"decode": {"target_fps": 2.0}})
    int8 = IndexConfig.model_validate({"compress": {"dtype": "int8"}})
    assert base.output_hash() == more_cpus.output_hash()
    assert len({base.output_hash(), two_fps.output_hash(), int8.output_hash()}) == 3
    assert base.output_hash("rev-a") != base.output_hash("rev-b")
    # the exact scaler (default) changed the stored pixels, so it changes the hash; "fast" keeps the hash stores
    # made with FAST_BILINEAR had before the knob existed
    fast = IndexConfig.model_validate({"decode": {"scaler": "fast"}, "speech": {"enabled": False}})
    assert fast.output_hash() != base.output_hash()
    legacy = {"decode": {"mode": "fps", "target_fps": 1.0, "truncation_tolerance": 0.95},
              "prune": base.prune.model_dump(), "encoder": base.encoder.id, "encoder_revision": "",
              "compress": base.compress.model_dump()}
    assert fast.output_hash() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    assert base.compress.layout == "global+grid2+patches:fp16"
    # speech entered the hash with it: without speech (or without audio), a store keeps the hash it had before
    no_audio = IndexConfig.model_validate({"decode": {"scaler": "fast"}, "audio": {"enabled": False}})
    assert no_audio.output_hash() == fast.output_hash()
    speech = IndexConfig.model_validate({"speech": {"enabled": False}})
    assert speech.output_hash() != base.output_hash()
    other_asr = IndexConfig.model_validate({"speech": {"id": "/models/whisper-small"}})
    assert other_asr.output_hash() != base.output_hash()
