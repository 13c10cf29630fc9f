"""The operator contract (``operators/stage.py``) and its one adapter to Ray Data (``pipelines/stages.py``)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ray_vlm.core import schema as S
from ray_vlm.core.config import IndexConfig, StageResources
from ray_vlm.operators.compress import CompressTokens
from ray_vlm.operators.decode import DecodeVideos
from ray_vlm.operators.encode import EncodeFrames
from ray_vlm.operators.probe import ProbeVideos
from ray_vlm.operators.prune import PruneFrames
from ray_vlm.operators.stage import Operator, contract_of, declare
from ray_vlm.operators.write import WriteShards
from ray_vlm.pipelines.stages import Stage, map_stage, map_stages

pytestmark = pytest.mark.timeout(300)

OPERATORS_DIR = Path(__file__).resolve().parents[2] / "operators"
BUILT_IN = {  # operator -> the config's resources key of the stage that runs it
    ProbeVideos: "probe", DecodeVideos: "decode", PruneFrames: "prune", EncodeFrames: "encode",
    CompressTokens: "write", WriteShards: "write",
}


class _Recorder:
    """Stands in for a Ray Dataset: records each ``map_batches`` call instead of running it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def map_batches(self, fn: Any, **kwargs: Any) -> _Recorder:
        self.calls.append((fn, kwargs))
        return self


@declare(reads=(S.VIDEO_ID, S.FRAMES), adds=("n_frames",), resources=StageResources(num_cpus=0.5, batch_size=8))
def count_frames(batch, *, scale=1):
    return {S.VIDEO_ID: batch[S.VIDEO_ID], "n_frames": np.array([len(f) * scale for f in batch[S.FRAMES]])}


class Tagger:
    reads = (S.VIDEO_ID,)
    adds = ("tag",)
    resources = StageResources(num_cpus=0.25)

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, batch):
        return {S.VIDEO_ID: batch[S.VIDEO_ID], "tag": np.array([self.tag] * len(batch[S.VIDEO_ID]), dtype=object)}


# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("op", list(BUILT_IN), ids=lambda op: op.__name__)
def test_every_operator_declares_columns_and_the_configs_default_resources(op):
    assert isinstance(op, Operator)
    c = contract_of(op)
    assert c.name == op.__name__ and c.reads and c.adds
    assert all(isinstance(col, str) for col in c.reads + c.adds)
    assert c.resources == getattr(IndexConfig().resources, BUILT_IN[op])  # the defaults live in config.py


def test_operators_never_import_ray():
    pattern = re.compile(r"^\s*(import ray(\.|\s|$)|from ray(\.| ))", re.M)
    offenders = [p.name for p in OPERATORS_DIR.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_contract_of_a_chain_reads_what_the_first_does_not_add():
    c = contract_of(CompressTokens).then(WriteShards)
    assert c.name == "CompressTokens+WriteShards"
    assert S.GLOBAL_EMB in c.reads and S.VIDEO_ID in c.reads and S.GLOBAL_TOKEN not in c.reads
    assert c.adds == WriteShards.adds and c.resources == WriteShards.resources


def test_an_undeclared_or_misdeclared_operator_is_named():
    def undeclared(batch):
        return batch

    class Misdeclared(Tagger):
        reads = S.FRAMES  # a string, not a tuple of columns

    with pytest.raises(TypeError, match="undeclared declares no operator contract"):
        contract_of(undeclared)
    with pytest.raises(TypeError, match="Misdeclared: reads and adds must be column names"):
        contract_of(Misdeclared)
    with pytest.raises(TypeError, match="tuples of column names"):
        declare(reads=S.FRAMES, adds=())


def test_the_column_check_names_the_operator():
    with pytest.raises(S.SchemaError, match=r"count_frames: input batch lacks column\(s\) \['frames'\]"):
        contract_of(count_frames).check({S.VIDEO_ID: np.array(["v"])})


# ------------------------------------------------------------------------------------------ the adapter


def test_a_function_runs_as_tasks_with_its_declared_resources():
    ds = _Recorder()
    map_stage(ds, Stage(count_frames, dict(scale=2)))
    fn, kw = ds.calls[0]
    assert kw == dict(batch_format="numpy", batch_size=8, num_cpus=0.5, fn_kwargs=dict(scale=2), max_retries=2)
    assert fn.__name__ == "count_frames"  # Ray Data names the stage MapBatches(count_frames)
    batch = {S.VIDEO_ID: np.array(["a"], dtype=object), S.FRAMES: np.array([np.zeros((3, 2, 2, 3))])}
    assert fn(batch, scale=2)["n_frames"].tolist() == [6]
    with pytest.raises(S.SchemaError, match="count_frames: input batch lacks"):
        fn({S.VIDEO_ID: batch[S.VIDEO_ID]}, scale=2)


def test_a_class_runs_as_an_actor_pool():
    import ray.data

    ds = _Recorder()
    map_stages(ds, [Stage(Tagger, dict(tag="x"), max_tasks_in_flight_per_actor=1)], max_retries=5)
    cls, kw = ds.calls[0]
    assert kw == dict(batch_format="numpy", num_cpus=0.25, fn_constructor_kwargs=dict(tag="x"),
                      compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
                      max_restarts=5, max_task_retries=-1)  # batches retried while the actor can restart
    assert isinstance(cls, type) and issubclass(cls, Tagger) and cls.__name__ == "Tagger"
    assert cls("y")({S.VIDEO_ID: np.array(["a"], dtype=object)})["tag"].tolist() == ["y"]
    with pytest.raises(S.SchemaError, match="Tagger: input batch lacks"):
        cls("y")({S.FRAMES: np.array([])})


def test_config_resources_override_the_declared_ones_field_by_field_and_an_explicit_zero_is_kept():
    import ray.data

    ds = _Recorder()
    map_stage(ds, Stage(count_frames, resources=StageResources(num_cpus=0, concurrency=3)))
    _, kw = ds.calls[0]
    assert kw["num_cpus"] == 0 and kw["batch_size"] == 8  # 0 is honoured; batch_size stays declared
    assert kw["compute"] == ray.data.TaskPoolStrategy(size=3)
    map_stage(ds, Stage(Tagger, dict(tag="x"), StageResources(num_gpus=0, concurrency=2)))
    _, kw = ds.calls[1]
    assert kw["num_gpus"] == 0 and kw["num_cpus"] == 0.25
    assert kw["compute"] == ray.data.ActorPoolStrategy(size=2)


def test_stage_resources_reject_what_cannot_be_honoured():
    for bad in ({"num_cpus": -1}, {"concurrency": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            StageResources.model_validate(bad)


# ------------------------------------------------------------------------------------------ the index job


def _wiring(monkeypatch, config: IndexConfig, cpus: float = 8.0) -> list[tuple[Any, dict[str, Any]]]:
    """The index job's map_batches calls, recorded (nothing runs)."""
    import ray
    import ray.data

    from ray_vlm.models import get_spec
    from ray_vlm.pipelines import archive_index as A

    ds = _Recorder()
    monkeypatch.setattr(ray.data, "from_items", lambda rows, **kw: ds)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    A.build_dataset([], store_uri="/nowhere", config=config, spec=get_spec(config.encoder.id), config_hash="h",
                    storage_options=None, skip_video_ids=frozenset())
    return ds.calls


def test_the_index_job_wires_each_stage_as_before(monkeypatch):
    import ray.data

    calls = _wiring(monkeypatch, IndexConfig(), cpus=4.0)
    names = [fn.__name__ for fn, _ in calls]
    assert names == ["_probe_stage", "decode_videos_task", "SpeechStage", "_prune_stage", "EncodeStage",
                     "_compress_write_stage"]
    probe, decode, speech, prune, encode, write = (kw for _, kw in calls)
    # the speech actor reserves no CPU (it idles through silent videos), and decode gets the config's audio
    assert {k: speech[k] for k in ("batch_size", "num_cpus", "compute", "fn_constructor_kwargs")} == dict(
        batch_size=1, num_cpus=0, compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs=dict(speech=IndexConfig().speech))
    assert decode["fn_kwargs"]["audio"] == IndexConfig().audio and probe["fn_kwargs"]["audio"] == IndexConfig().audio
    no_speech = _wiring(monkeypatch, IndexConfig.model_validate({"speech": {"enabled": False}}), cpus=4.0)
    assert [fn.__name__ for fn, _ in no_speech] == ["_probe_stage", "decode_videos_task", "_prune_stage",
                                                    "EncodeStage", "_compress_write_stage"]
    assert no_speech[1][1]["fn_kwargs"]["audio"] is None
    with_ocr = _wiring(monkeypatch, IndexConfig.model_validate({"ocr": {"enabled": True}}), cpus=4.0)
    assert [fn.__name__ for fn, _ in with_ocr][3:5] == ["_prune_stage", "OcrStage"]
    assert {k: probe[k] for k in ("batch_size", "num_cpus", "max_retries")} == dict(
        batch_size=4, num_cpus=0.25, max_retries=2)
    assert "compute" not in probe and "max_calls" not in probe
    assert {k: decode[k] for k in ("batch_size", "num_cpus", "max_retries", "compute")} == dict(
        batch_size=1, num_cpus=1, max_retries=2, compute=ray.data.TaskPoolStrategy(size=3))  # 4 - 0.5 - 0.5
    assert "max_calls" not in decode and decode["fn_kwargs"]["frame_size"] == (224, 224)
    assert {k: prune[k] for k in ("batch_size", "num_cpus", "max_retries", "max_calls")} == dict(
        batch_size=1, num_cpus=0.25, max_retries=2, max_calls=64)
    assert {k: encode[k] for k in ("batch_size", "num_cpus", "num_gpus", "max_restarts", "max_task_retries",
                                   "compute", "fn_constructor_kwargs")} == dict(
        batch_size=1, num_cpus=0.5, num_gpus=0, max_restarts=2, max_task_retries=-1,
        compute=ray.data.ActorPoolStrategy(size=1), fn_constructor_kwargs=dict(encoder=IndexConfig().encoder))
    assert {k: write[k] for k in ("batch_size", "num_cpus", "max_retries", "max_calls")} == dict(
        batch_size=1, num_cpus=0.25, max_retries=2, max_calls=64)
    assert all(kw["batch_format"] == "numpy" for _, kw in calls)


def test_the_index_job_honours_an_explicit_zero_and_keeps_defaults_a_config_leaves_out(monkeypatch):
    zero = {"num_cpus": 0}
    cfg = IndexConfig.model_validate({"resources": {
        "probe": zero, "decode": zero, "prune": zero, "write": zero, "encode": {"num_cpus": 0, "concurrency": 2},
        "max_task_retries": 0}})
    calls = _wiring(monkeypatch, cfg, cpus=4.0)
    assert [kw["num_cpus"] for _, kw in calls] == [0, 0, 0, 0, 0, 0]  # `or 0.25` made these the default
    probe, decode, _, _, encode, _ = (kw for _, kw in calls)
    assert probe["batch_size"] == 4 and probe["max_retries"] == 0  # left out: the declared batch size
    assert decode["compute"].size == 3  # a decoder reserving no CPU still counts as one: (4 - 0 - 0.5) // 1
    assert encode["compute"].min_size == encode["compute"].max_size == 2 and encode["max_restarts"] == 0
    assert encode["max_task_retries"] == 0  # no retries asked: none, whatever the failure


# ------------------------------------------------------------------------------------------ on Ray


def test_stages_run_on_ray_and_a_miswired_one_fails_with_its_name(ray_local):
    import sys

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this file
    rows = [{S.VIDEO_ID: f"v{i}", S.FRAMES: np.zeros((i + 1, 2, 2, 3), np.uint8)} for i in range(3)]
    ds = map_stages(ray_local.data.from_items(rows), [Stage(count_frames, dict(scale=10)),
                                                       Stage(Tagger, dict(tag="t"))])
    out = sorted(ds.take_all(), key=lambda r: r[S.VIDEO_ID])
    assert [(r[S.VIDEO_ID], r["tag"]) for r in out] == [("v0", "t"), ("v1", "t"), ("v2", "t")]
    wrong = map_stages(ray_local.data.from_items(rows), [Stage(Tagger, dict(tag="t")), count_frames])  # no frames
    with pytest.raises(Exception, match=r"count_frames: input batch lacks column\(s\) \['frames'\]"):
        wrong.take_all()


# ------------------------------------------------------------------------------------------ CPU accounting

_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def _burn(seconds: float) -> None:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


@declare(reads=(S.VIDEO_ID,), adds=("child",), resources=StageResources(num_cpus=0.25, batch_size=1))
def burn_in_a_child(batch):
    """Spends 0.3 s of CPU in a child process it waits for, one row per call."""
    assert not [k for k in batch if k.startswith("cpu_s:")]  # cost columns never reach an operator
    subprocess.run([sys.executable, "-c", _BURN.format(s=0.3)], check=True)
    return {S.VIDEO_ID: batch[S.VIDEO_ID], "child": np.ones(len(batch[S.VIDEO_ID]))}


@declare(reads=(S.VIDEO_ID,), adds=("part",), resources=StageResources(num_cpus=0.25, batch_size=1))
def burn_per_output(batch):
    """A generator: two outputs per row, 0.2 s of CPU each in this process."""
    for part in range(2):
        _burn(0.2)
        yield {S.VIDEO_ID: batch[S.VIDEO_ID], "part": np.full(len(batch[S.VIDEO_ID]), part)}


class BurnInAnActor:
    reads = (S.VIDEO_ID,)
    adds = ("actor",)
    resources = StageResources(num_cpus=0.25, batch_size=1)

    def __call__(self, batch):
        _burn(0.1)
        return {**batch, "actor": np.ones(len(batch[S.VIDEO_ID]))}


def test_metered_stages_hand_on_every_stages_cpu_seconds(ray_local):
    from ray_vlm.pipelines.stages import stage_cpu_totals

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = [{S.VIDEO_ID: f"v{i}"} for i in range(3)]
    ds = map_stages(ray_local.data.from_items(rows),
                    [Stage(burn_in_a_child, name="child"), Stage(burn_per_output), Stage(BurnInAnActor)],
                    meter=True)
    totals: dict[str, float] = {}
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(batch[S.VIDEO_ID])
        for k, v in stage_cpu_totals(batch).items():
            totals[k] = totals.get(k, 0.0) + v
    assert n == 6  # the generator's two outputs per row
    # CPU time is at least what each stage burned (it may be more: imports, Ray's own threads), never less.
    assert totals["child"] >= 3 * 0.3 * 0.95
    assert totals["burn_per_output"] >= 6 * 0.2 * 0.95
    assert totals["BurnInAnActor"] >= 6 * 0.1 * 0.95
    # Unmetered, no cost columns appear.
    plain = map_stages(ray_local.data.from_items(rows), [Stage(burn_in_a_child)])
    assert not [k for k in plain.take(1)[0] if k.startswith("cpu_s:")]
