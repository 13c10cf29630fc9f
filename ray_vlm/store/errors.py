"""Errors of the token store (its codec, manifests and commits)."""

from __future__ import annotations

from ray_vlm.core.errors import RayVlmError


class StoreError(RayVlmError, RuntimeError):
    """The token store cannot do what was asked (bad store, unknown schema version, bad commit input)."""

    code = "store_error"


class CommitConflictError(StoreError):
    """A commit lost the race for a manifest version more times than ``max_retries`` allowed."""

    code = "store_commit_conflict"
