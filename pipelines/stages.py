"""From the operator contract to Ray Data: one ``map_batches`` call per stage.

An operator (``ray_vlm.operators.stage``) declares the columns it reads and adds and its default resources; a
:class:`Stage` adds how a pipeline runs it (its arguments, the job's resources, worker recycling).
:func:`map_stage` turns any stage into its ``Dataset.map_batches`` call, the same way for the built-in stages
and for yours:

- a class runs as an actor pool of ``concurrency`` actors (one when unset), each constructing it once with the
  stage's ``kwargs``; a crashed actor is restarted up to ``max_retries`` times, and its batches are retried for as
  long as it can be restarted (a call that finds its actor unreachable, on a node that died and is not yet known
  dead, is retried until the actor is back instead of failing the job);
- a function runs as Ray tasks, called with each batch and the stage's ``kwargs`` (at most ``concurrency`` at
  once when set); a failed task is retried up to ``max_retries`` times;
- resources are the stage's (a job's config) over the operator's declared ones, field by field: a field left
  None takes the declared value, an explicit value (``num_cpus=0`` too) is used as given;
- each batch is checked for the columns the operator reads before it runs, so a miswired pipeline fails with
  the operator's name and the columns it lacks, not somewhere inside it;
- with ``meter=True``, each stage adds the CPU seconds its calls cost (its worker process, the children it drives,
  every thread) as a column ``cpu_s:<stage name>``; stages never see these columns, and each hands on the ones it
  received, so the consumer of the last stage sums every stage's cost from the batches it gets
  (:func:`stage_cpu_totals`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray_vlm.core.config import MAX_TASK_RETRIES, StageResources
from ray_vlm.operators.stage import Contract, contract_of, op_name

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: an operator and how to run it.

    Attributes:
        op: the operator: a class (an actor pool) or a function (tasks) taking a batch and ``kwargs``.
        kwargs: the class's constructor arguments, or the function's keyword arguments.
        resources: the job's settings for this stage; fields left None take the operator's declared ones.
        declared_by: where the contract comes from when ``op`` is a function that runs another operator
            (an operator class or a ``Contract``); None: ``op`` declares its own.
        max_calls: tasks only: calls after which a task's worker process is replaced (None: never).
        max_tasks_in_flight_per_actor: actors only: batches queued on one actor at a time (None: Ray's default).
        name: the stage's name in CPU accounting (None: the operator's name).
    """

    op: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    resources: StageResources | None = None
    declared_by: Any = None
    max_calls: int | None = None
    max_tasks_in_flight_per_actor: int | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        """The stage's name: ``name``, else its operator's."""
        if self.name:
            return self.name
        declared = self.declared_by
        return op_name(declared if isinstance(declared, type) or callable(declared) else self.op)

    @property
    def contract(self) -> Contract:
        """The operator's declared contract (raises ``TypeError`` naming ``op`` when it declares none)."""
        return contract_of(self.op if self.declared_by is None else self.declared_by)

    @property
    def effective_resources(self) -> StageResources:
        """The stage's resources over the operator's declared ones."""
        declared = self.contract.resources
        return declared if self.resources is None else self.resources.over(declared)


def map_stage(
    ds: ray.data.Dataset, stage: Stage | Callable[..., Any], *, max_retries: int = MAX_TASK_RETRIES,
    meter: bool = False,
) -> ray.data.Dataset:
    """``ds`` followed by one stage (lazy, as ``map_batches`` is).

    Args:
        ds: the dataset the stage reads.
        stage: a :class:`Stage`, or a declared operator to run with no arguments and its declared resources.
        max_retries: bound on retries of a failed task or restarts of a crashed actor (Ray's own default
            retries a crash forever). An actor's batches are retried without a count of their own while it has
            restarts left: each crash uses one, so a batch that crashes its actor every time still ends the job.

    Returns:
        The dataset of the stage's output batches (numpy batch format).
    """
    import ray.data

    st = stage if isinstance(stage, Stage) else Stage(stage)
    contract = st.contract
    res = st.effective_resources
    kwargs = dict(st.kwargs) or None
    args: dict[str, Any] = {"batch_format": "numpy"}
    for name in ("batch_size", "num_cpus", "num_gpus"):
        value = getattr(res, name)
        if value is not None:
            args[name] = value
    # Retry bounds are passed as Ray remote args (Ray 2.60 warns that this spelling will change).
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated", category=DeprecationWarning)
    label = st.label if meter else None
    if isinstance(st.op, type):
        fn: Callable[..., Any] = _checked_class(st.op, contract, label)
        args["fn_constructor_kwargs"] = kwargs
        args["compute"] = ray.data.ActorPoolStrategy(
            size=res.concurrency if res.concurrency is not None else 1,
            max_tasks_in_flight_per_actor=st.max_tasks_in_flight_per_actor,
        )
        args["max_restarts"] = max_retries
        # Not max_retries: every call that finds the actor unreachable counts as a retry (Ray's
        # ActorUnavailableError), and a node lost with the actor is found dead only after several missed health
        # checks, by which time a few such calls have used up a small count and failed the job. Unbounded here,
        # the retries still stop with the actor's restarts (Ray Data's own default for actor pools too).
        args["max_task_retries"] = -1 if max_retries > 0 else 0
    else:
        fn = _checked_function(st.op, contract, label)
        args["fn_kwargs"] = kwargs
        if res.concurrency is not None:
            args["compute"] = ray.data.TaskPoolStrategy(size=res.concurrency)
        if st.max_calls is not None:
            args["max_calls"] = st.max_calls
        args["max_retries"] = max_retries
    return ds.map_batches(fn, **args)


def map_stages(
    ds: ray.data.Dataset, stages: Iterable[Stage | Callable[..., Any]], *, max_retries: int = MAX_TASK_RETRIES,
    meter: bool = False,
) -> ray.data.Dataset:
    """``ds`` followed by each stage in turn (see :func:`map_stage`)."""
    for stage in stages:
        ds = map_stage(ds, stage, max_retries=max_retries, meter=meter)
    return ds


CPU_COLUMN_PREFIX = "cpu_s:"


def stage_cpu_totals(batch: Mapping[str, Any]) -> dict[str, float]:
    """{stage name: CPU seconds} carried by one batch of a metered pipeline's output."""
    return {k[len(CPU_COLUMN_PREFIX):]: float(sum(v)) for k, v in batch.items() if k.startswith(CPU_COLUMN_PREFIX)}


def _split_costs(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(the batch without cost columns, {cost column: its sum})."""
    costs = {k: float(sum(v)) for k, v in batch.items() if k.startswith(CPU_COLUMN_PREFIX)}
    return {k: v for k, v in batch.items() if k not in costs}, costs


def _with_costs(out: Any, costs: dict[str, float]) -> tuple[Any, bool]:
    """``out`` with every cost column, the amounts on its first row; (out, whether they were placed)."""
    import numpy as np

    if not isinstance(out, dict) or not out:
        return out, False
    n = len(next(iter(out.values())))
    placed = n > 0
    out = dict(out)
    for k, v in costs.items():
        col = np.zeros(n, dtype=np.float64)
        if placed:
            col[0] = v
        out[k] = col
    return out, placed


def _metered(label: str, call: Callable[[Any], Any], batch: Any) -> Any:
    """Run ``call`` on ``batch`` without its cost columns; hand them on with this call's CPU seconds added."""
    from ray_vlm.core._proc import tree_cpu_s

    inner, costs = _split_costs(batch)
    key = CPU_COLUMN_PREFIX + label
    c0 = tree_cpu_s()
    result = call(inner)
    if not inspect.isgenerator(result):
        costs[key] = costs.get(key, 0.0) + tree_cpu_s() - c0
        return _with_costs(result, costs)[0]

    def stream() -> Any:  # each output's cost is the CPU spent producing it; what arrived goes on the first
        pending = dict(costs)
        start = c0
        while True:
            try:
                out = next(result)
            except StopIteration:
                return
            now = tree_cpu_s()
            pending[key] = pending.get(key, 0.0) + now - start
            out, placed = _with_costs(out, {**dict.fromkeys(costs, 0.0), key: 0.0, **pending})
            if placed:
                pending = {}
            yield out
            start = tree_cpu_s()

    return stream()


def _checked_function(fn: Callable[..., Any], contract: Contract, meter_as: str | None = None) -> Callable[..., Any]:
    """``fn`` with the contract's column check before each call; Ray Data names the stage after ``fn``. With
    ``meter_as``, the call's CPU seconds are added as a cost column (see :func:`map_stage`)."""

    def call(batch: Any, *args: Any, **kwargs: Any) -> Any:
        contract.check(batch)
        return fn(batch, *args, **kwargs)

    if meter_as is None:
        run = call
    elif inspect.isgeneratorfunction(fn):
        def run(batch: Any, *args: Any, **kwargs: Any) -> Any:
            yield from _metered(meter_as, lambda b: call(b, *args, **kwargs), batch)
    else:
        def run(batch: Any, *args: Any, **kwargs: Any) -> Any:
            return _metered(meter_as, lambda b: call(b, *args, **kwargs), batch)

    functools.update_wrapper(run, fn)  # a functools.partial has no name: set it below
    run.__name__ = run.__qualname__ = op_name(fn)
    return run


def _checked_class(cls: type, contract: Contract, meter_as: str | None = None) -> type:
    """A subclass of ``cls``, under its name, whose calls check the contract's columns first (and, with
    ``meter_as``, add their CPU seconds as a cost column)."""

    def checked(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        contract.check(batch)
        return cls.__call__(self, batch, *args, **kwargs)

    if meter_as is None:
        __call__ = checked
    else:
        def __call__(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
            return _metered(meter_as, lambda b: checked(self, b, *args, **kwargs), batch)

    namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "__doc__": cls.__doc__}
    return type(cls.__name__, (cls,), namespace)
