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
        return key_diff(
            new={"code_version": self.code_version, "params_hash": self.params_hash, "inputs_hash": self.inputs_hash,
                 "upstream": self.upstream},
            old={"code_version": code_version, "params_hash": params_hash, "inputs_hash": inputs_hash, "upstream": upstream},
        )


def key_diff(new: Mapping[str, Any], old: Mapping[str, Any]) -> list[str]:
    """Reasons the key parts `old` (code_version, params_hash, inputs_hash, upstream) differ from `new`."""
    reasons = []
    if old["code_version"] != new["code_version"]:
        reasons.append(f"code_version {old['code_version']} -> {new['code_version']}")
    if old["params_hash"] != new["params_hash"]:
        reasons.append("parameters changed")
    if old["inputs_hash"] != new["inputs_hash"]:
        reasons.append("input content changed")
    up_old, up_new = old["upstream"], new["upstream"]
    changed = sorted(name for name in set(up_old) | set(up_new) if up_old.get(name) != up_new.get(name))
    if changed:
        reasons.append("upstream changed: " + ", ".join(changed))
    return reasons
