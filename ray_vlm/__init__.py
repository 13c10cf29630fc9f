"""ray-vlm: make video archives searchable by time on Ray.

The public API is small; everything else is reachable through its module:

- ``index_archive(sources, store, config=None)``: the indexing job (``ray_vlm.pipelines.archive_index``).
- ``search(store, text, top_k=5)``: "when does X happen?" over a store (``ray_vlm.query.searcher``).
- ``Searcher``: the same, kept loaded: retrieve candidate windows, ground inside them, pick up new commits.
- ``IndexConfig``: the job's typed configuration (``ray_vlm.core.config``).
- ``TokenStore``: read what a job committed (``ray_vlm.store.token_store``).
- ``RayVlmError``: the base of every error ray-vlm raises; ``code`` names the condition (``ray_vlm.core.errors``).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Candidates", "IndexConfig", "IndexSummary", "Moment", "RayVlmError", "RetrievalParams", "Searcher",
           "TokenStore", "index_archive", "search"]

_LAZY = {
    "IndexConfig": ("ray_vlm.core.config", "IndexConfig"),
    "IndexSummary": ("ray_vlm.pipelines.archive_index", "IndexSummary"),
    "index_archive": ("ray_vlm.pipelines.archive_index", "index_archive"),
    "Moment": ("ray_vlm.query.searcher", "Moment"),
    "search": ("ray_vlm.query.searcher", "search"),
    "Searcher": ("ray_vlm.query.searcher", "Searcher"),
    "Candidates": ("ray_vlm.query.searcher", "Candidates"),
    "RetrievalParams": ("ray_vlm.query.searcher", "RetrievalParams"),
    "TokenStore": ("ray_vlm.store.token_store", "TokenStore"),
    "RayVlmError": ("ray_vlm.core.errors", "RayVlmError"),
}


def __getattr__(name: str):
    # Heavy modules (ray, torch, pyarrow) load on first use, not on ``import ray_vlm``.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ray_vlm' has no attribute {name!r}")
