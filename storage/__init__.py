"""Artifacts (Zarr v3), the run ledger (Parquet fragments), cache keys and hashing.

Knows nothing of models or Prefect: it stores arrays and rows, and says whether
what is stored is complete and current.
"""
from storage.artifacts import ArtifactStore
from storage.hashing import canonical_json, hash_bytes, hash_file, hash_params
from storage.keys import StageKey
from storage.ledger import Ledger

__all__ = [
    "ArtifactStore",
    "Ledger",
    "StageKey",
    "canonical_json",
    "hash_bytes",
    "hash_file",
    "hash_params",
]
