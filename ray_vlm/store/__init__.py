"""The token store: what an indexing job commits and every reader reads (above ``core``).

``from ray_vlm.store import TokenStore`` (and the other public names of ``ray_vlm.store.token_store``) work
from here; the modules are ``token_store`` (the Lance datasets, commits, the ledger, compaction), ``codec``
(vectors), ``errors``, ``migrate`` (v1 stores into v2) and ``v1`` (reading and writing the v1 format).
"""

from __future__ import annotations


def __getattr__(name: str):
    if not name.startswith("_") and name not in ("token_store", "codec", "errors"):
        import importlib

        token_store = importlib.import_module("ray_vlm.store.token_store")
        if hasattr(token_store, name):
            return getattr(token_store, name)
    raise AttributeError(f"module 'ray_vlm.store' has no attribute {name!r}")
