"""Artifacts (Zarr v3), the run ledger (Parquet fragments), cache keys and hashing.

Knows nothing of models or Prefect: it stores arrays and rows, and says whether
what is stored is complete and current. The names below load on first use, so a
module that needs only keys or hashing does not import zarr or pyarrow.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ArtifactStore": "storage.artifacts",
    "Ledger": "storage.ledger",
    "LedgerView": "storage.ledger",
    "StageKey": "storage.keys",
    "canonical_json": "storage.hashing",
    "hash_bytes": "storage.hashing",
    "hash_file": "storage.hashing",
    "hash_params": "storage.hashing",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from storage.artifacts import ArtifactStore
    from storage.hashing import canonical_json, hash_bytes, hash_file, hash_params
    from storage.keys import StageKey
    from storage.ledger import Ledger, LedgerView


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
