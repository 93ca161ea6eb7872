"""The planned keys of every stage, kept between runs while nothing they depend on changed.

Work items and their cache keys are a pure function of the config, the catalog, the code
(the `tasks`, `storage` and `models` packages, and the stages' code versions as loaded)
and the model weights' fingerprints; they never depend on the ledger or the store. Building
them costs Python time per item (a full DAVIS x ESC-50 grid is 180,000 edits and as many
metrics), while comparing them with the ledger is one columnar pass. So `status` and the
plan-first check keep each stage's (item, key and key parts) in
`<workdir>/.audioscenic/plan.parquet`, stamped with a fingerprint of all those inputs,
and rebuild them only when the fingerprint differs. A run that plans its stages writes
the same file from the items it planned. A stamp that does not match, or a file that
cannot be read, is simply recomputed: it is never trusted.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import atomic_path
from storage.hashing import file_fingerprint, hash_params
from storage.keys import key_diff
from storage.state import STATE_DIR

PLAN_FILE = "plan.parquet"
FORMAT = "audioscenic-plan-1"
SCHEMA = pa.schema([
    ("stage", pa.string()), ("item_id", pa.string()), ("key", pa.string()), ("code_version", pa.string()),
    ("params_hash", pa.string()), ("inputs_hash", pa.string()), ("upstream_keys", pa.string()),
])
_code: str | None = None


def code_digest() -> str:
    """sha256 over the source of the packages that build work items and keys (read once per process)."""
    global _code
    if _code is None:
        h = hashlib.sha256()
        for pkg in ("tasks", "storage", "models", "flows"):
            spec = importlib.util.find_spec(pkg)
            for root in sorted(spec.submodule_search_locations or []) if spec else []:
                for name in sorted(os.listdir(root)):
                    if name.endswith(".py"):
                        h.update(f"{pkg}/{name}\0".encode())
                        h.update(hashlib.sha256(Path(root, name).read_bytes()).digest())
        _code = h.hexdigest()
    return _code


def _weights(cfg) -> dict[str, Any]:
    out = {}
    for name, path in sorted(cfg.models.paths.model_dump().items()):
        if path is None:
            continue
        out[name] = file_fingerprint(path) if os.path.exists(path) else {"path": str(path), "missing": True}
    return out


def fingerprint(cfg, catalog, mods: Sequence) -> str:
    buf = io.BytesIO()
    pq.write_table(catalog.table(), buf)  # every column a key may read, in catalog order
    return hash_params({
        "format": FORMAT,
        "config": cfg.model_dump(mode="json"),
        "catalog": hashlib.sha256(buf.getvalue()).hexdigest(),
        "code": code_digest(),
        "stages": [[m.__name__, str(getattr(m, "CODE_VERSION", ""))] for m in mods],
        "weights": _weights(cfg),
    })


def _path(cfg) -> Path:
    return Path(cfg.workdir) / STATE_DIR / PLAN_FILE


def rows_of(items) -> dict[str, list]:
    cols: dict[str, list] = {n: [] for n in SCHEMA.names}
    for it in items:
        k = it.key
        for n, v in (("stage", it.stage), ("item_id", it.item_id), ("key", k.key), ("code_version", k.code_version),
                     ("params_hash", k.params_hash), ("inputs_hash", k.inputs_hash), ("upstream_keys", k.upstream_json())):
            cols[n].append(v)
    return cols


KEY_COLUMNS = ["stage", "item_id", "key"]
PART_COLUMNS = ["code_version", "params_hash", "inputs_hash", "upstream_keys"]


class PlanKeys:
    """Per stage, its work items' (item_id, key); their key parts (for the reasons of stale items) on demand."""

    def __init__(self, stages: dict[str, pa.Table], path: Path | None = None):
        self.stages, self._path, self._parts = stages, path, {}

    def parts(self, stage: str) -> pa.Table:
        if stage not in self._parts:
            t = self.stages[stage]
            if not set(PART_COLUMNS) <= set(t.column_names):  # read from the cache file, for this stage only
                import pyarrow.compute as pc

                full = pq.read_table(self._path, columns=["stage", *PART_COLUMNS])
                t = full.filter(pc.equal(full["stage"], stage))
            self._parts[stage] = t
        return self._parts[stage]


def save(cfg, fp: str, stages: dict[str, pa.Table]) -> None:
    table = pa.concat_tables([t.cast(SCHEMA) for t in stages.values()]) if stages else SCHEMA.empty_table()
    table = table.replace_schema_metadata({"fingerprint": fp, "stages": json.dumps(list(stages))})
    with atomic_path(_path(cfg)) as tmp:
        pq.write_table(table, tmp)


def load(cfg, fp: str) -> PlanKeys | None:
    path = _path(cfg)
    try:
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"fingerprint", b"").decode() != fp:
            return None
        order = json.loads(meta[b"stages"])
        table = pq.read_table(path, columns=KEY_COLUMNS)
    except Exception:  # absent, foreign, unreadable: recompute
        return None
    import pyarrow.compute as pc

    # Rows are stored stage after stage: slice instead of filtering.
    stages, start = {}, 0
    counts = dict(zip(*[c.to_pylist() for c in pc.value_counts(table["stage"]).flatten()]))
    for stage in order:
        n = counts.get(stage, 0)
        stages[stage] = table.slice(start, n)
        start += n
    return PlanKeys(stages, path)


def stage_keys(cfg, catalog, mods: Sequence) -> PlanKeys:
    """Per stage, (item_id, key) of its work items: from the cache, or built (and cached)."""
    fp = fingerprint(cfg, catalog, mods)
    cached = load(cfg, fp)
    if cached is not None and list(cached.stages) == [m.STAGE for m in mods]:
        return cached
    out = {m.STAGE: pa.table(rows_of(m.work_items(cfg, catalog)), schema=SCHEMA) for m in mods}
    store_planned(cfg, fp, out)
    return PlanKeys(out)


def store_planned(cfg, fp: str, stages: dict[str, pa.Table]) -> None:
    try:
        save(cfg, fp, stages)
    except OSError:
        pass  # a read-only workdir still gets its answers, just not faster next time


def plan_keys(keys: PlanKeys, stage: str, ledger) -> list[tuple[str, str, tuple[str, ...]]]:
    """(item_id, state, reasons) per item, like `tasks.stage.plan`: done / failed / stale (why) / missing."""
    table = keys.stages[stage]
    if table.num_rows == 0:
        return []
    latest = ledger.latest_table(stage)
    index = {iid: i for i, iid in enumerate(latest["item_id"].to_pylist())}
    lkeys, lstatus = latest["key"].to_pylist(), latest["status"].to_pylist()
    out = []
    parts = None
    for n, (iid, key) in enumerate(zip(table["item_id"].to_pylist(), table["key"].to_pylist())):
        i = index.get(iid)
        if i is None:
            out.append((iid, "missing", ("never run",)))
        elif lkeys[i] == key and lstatus[i] == "done":
            out.append((iid, "done", ()))
        elif lkeys[i] == key:
            out.append((iid, "failed", (f"last run failed: {latest['error'][i].as_py()}",)))
        else:
            if parts is None:
                p = keys.parts(stage)
                parts = {c: p[c].to_pylist() for c in PART_COLUMNS}
            row = {c: latest[c][i].as_py() for c in PART_COLUMNS}
            reasons = key_diff(
                new={"code_version": parts["code_version"][n], "params_hash": parts["params_hash"][n],
                     "inputs_hash": parts["inputs_hash"][n], "upstream": json.loads(parts["upstream_keys"][n] or "{}")},
                old={"code_version": row["code_version"] or "", "params_hash": row["params_hash"] or "",
                     "inputs_hash": row["inputs_hash"] or "", "upstream": json.loads(row["upstream_keys"] or "{}")},
            )
            out.append((iid, "stale", tuple(reasons or ["key changed"])))
    return out
