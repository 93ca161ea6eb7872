"""Stage cache keys: hash(stage, code_version, params, input content, upstream keys).

A key changes when, and only when, one of its parts changes, and every part is
kept so a stale artifact can say *why* it is stale (see `StageKey.diff`).
Upstream keys are part of the key, so a change anywhere upstream changes every
key downstream (Merkle style).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from storage.hashing import canonical_json, hash_bytes, hash_params


@dataclass(frozen=True)
class StageKey:
    stage: str
    code_version: str
    params_hash: str
    inputs: Mapping[str, str] = field(default_factory=dict)  # input name -> content hash
    upstream: Mapping[str, str] = field(default_factory=dict)  # upstream name -> cache key

    @classmethod
    def build(
        cls,
        stage: str,
        code_version: str | int,
        params: Any,
        inputs: Mapping[str, str] | None = None,
        upstream: Mapping[str, str] | None = None,
    ) -> "StageKey":
        if not stage:
            raise ValueError("stage name must not be empty")
        return cls(
            stage=stage,
            code_version=str(code_version),
            params_hash=hash_params(params),
            inputs=dict(sorted((inputs or {}).items())),
            upstream=dict(sorted((upstream or {}).items())),
        )

    @cached_property  # keys are immutable; planning a large grid reads each many times
    def inputs_hash(self) -> str:
        return hash_bytes(canonical_json(self.inputs).encode())

    @cached_property
    def key(self) -> str:
        payload = {
            "stage": self.stage,
            "code_version": self.code_version,
            "params": self.params_hash,
            "inputs": self.inputs,
            "upstream": self.upstream,
        }
        return hash_bytes(canonical_json(payload).encode())

    def upstream_json(self) -> str:
        return json.dumps(dict(self.upstream), sort_keys=True)

    def diff(self, *, code_version: str, params_hash: str, inputs_hash: str, upstream: Mapping[str, str]) -> list[str]:
        """Reasons a stored artifact with these parts differs from this key (empty if none)."""
        reasons = []
        if code_version != self.code_version:
            reasons.append(f"code_version {code_version} -> {self.code_version}")
        if params_hash != self.params_hash:
            reasons.append("parameters changed")
        if inputs_hash != self.inputs_hash:
            reasons.append("input content changed")
        changed = sorted(
            name for name in set(upstream) | set(self.upstream) if upstream.get(name) != self.upstream.get(name)
        )
        if changed:
            reasons.append("upstream changed: " + ", ".join(changed))
        return reasons
