"""The operator contract: what every stage of a pipeline declares, in plain Python.

An operator is a callable over column batches (``dict[str, numpy.ndarray]``, one array per column) that
returns a batch or yields batches. Its class, or the function itself, declares:

- ``reads``: the columns every input batch must hold (names from ``ray_vlm.core.schema``);
- ``adds``: the columns it writes into its output (an operator may also drop columns it consumed, as
  encode drops the pixels, or return only what it adds, as probe does);
- ``resources``: its default Ray resources (``StageResources``: CPUs and GPUs per task or actor, how many
  run at once, rows per call); a job's config overrides them field by field.

A class is constructed once per worker and then called per batch: an actor pool, for state worth keeping
(a loaded model, a decoder process). A function is called per batch: tasks. ``ray_vlm.pipelines.stages``
turns any operator declared this way into its ``Dataset.map_batches`` call and checks ``reads`` on every
batch; operators themselves never import Ray, so they run and are tested on plain arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from ray_vlm.core import schema as S
from ray_vlm.core.config import StageResources

Columns = tuple[str, ...]
T = TypeVar("T")


@runtime_checkable
class Operator(Protocol):
    """An operator class (or a function given the same attributes by :func:`declare`)."""

    reads: Columns
    adds: Columns
    resources: StageResources


@dataclass(frozen=True)
class Contract:
    """What one operator declares, under the name its errors carry.

    Attributes:
        name: the operator's name (its class or function name).
        reads: columns every input batch must hold.
        adds: columns its output gains.
        resources: its default Ray resources.
    """

    name: str
    reads: Columns
    adds: Columns
    resources: StageResources

    def check(self, batch: dict[str, Any]) -> None:
        """Raise ``schema.SchemaError`` naming this operator when ``batch`` lacks a column it reads."""
        S.require_columns(batch, self.reads, self.name)

    def then(self, other: Any) -> Contract:
        """The contract of this operator followed by ``other`` within one call (one task or actor).

        It reads what this one reads plus what ``other`` reads that this one does not add, adds what ``other``
        adds, and runs on ``other``'s resources.
        """
        nxt = contract_of(other)
        reads = self.reads + tuple(c for c in nxt.reads if c not in self.adds and c not in self.reads)
        return Contract(f"{self.name}+{nxt.name}", reads, nxt.adds, nxt.resources)


def declare(
    *, reads: Columns, adds: Columns, resources: StageResources | None = None
) -> Callable[[T], T]:
    """Give a function or class the operator contract (for your own stages).

    Args:
        reads: columns every input batch must hold.
        adds: columns the output gains.
        resources: default Ray resources; None: Ray's defaults.

    Returns:
        A decorator that sets ``reads``, ``adds`` and ``resources`` on what it decorates and returns it.
    """

    if isinstance(reads, str) or isinstance(adds, str):
        raise TypeError("declare: reads and adds are tuples of column names, not one string")

    def attach(op: T) -> T:
        op.reads = tuple(reads)  # type: ignore[attr-defined]
        op.adds = tuple(adds)  # type: ignore[attr-defined]
        op.resources = resources if resources is not None else StageResources()  # type: ignore[attr-defined]
        return op

    return attach


def op_name(op: Any) -> str:
    """The name an operator goes by in messages and in Ray: its ``__name__`` (a partial's function's)."""
    name = getattr(op, "__name__", None) or getattr(getattr(op, "func", None), "__name__", None)
    return str(name or type(op).__name__)


def contract_of(op: Any) -> Contract:
    """The contract ``op`` declares: an operator class, a declared function, or a Contract (returned as is).

    Raises:
        TypeError: naming ``op`` when it declares no ``reads``, ``adds`` or ``resources``, or declares them
            with the wrong types.
    """
    if isinstance(op, Contract):
        return op
    name = op_name(op)
    if not isinstance(op, Operator):
        raise TypeError(
            f"{name} declares no operator contract: give it reads, adds and resources "
            "(ray_vlm.operators.stage.declare), or name the operator it runs"
        )
    reads, adds, resources = op.reads, op.adds, op.resources
    if not (isinstance(reads, tuple | list) and isinstance(adds, tuple | list)
            and all(isinstance(c, str) for c in (*reads, *adds)) and isinstance(resources, StageResources)):
        raise TypeError(f"{name}: reads and adds must be column names (str), resources a StageResources")
    return Contract(name, tuple(reads), tuple(adds), resources)
