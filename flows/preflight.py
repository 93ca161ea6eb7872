"""Plan first: decide from the ledger whether a run has anything to do, before Prefect is involved.

`preflight` rescans the catalog through the workdir's hash state, plans every stage
against one read of the ledger and checks the report's stamp. When nothing is missing,
stale or failed, the catalog would be written unchanged and the report is current, the
run is answered from the plan: the same per-stage summary a flow run returns, without
starting (or contacting) a Prefect server and without importing Prefect or any model
library. Otherwise the Prefect flow runs and plans again for itself (cheap: the hashes
are cached), so a flow started any other way (a deployment, a worker) is unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.files import atomic_path
from storage.hashing import hash_params
from storage.ledger import Ledger
from storage.state import STATE_DIR, open_state, using

log = logging.getLogger("audioscenic")

# Planning reads every fragment; past a few hundred small files, one merged file is much faster.
COMPACT_AFTER_FRAGMENTS = 256
REPORT_STAMP = "report-stamp.json"


@dataclass
class Preflight:
    catalog_summary: dict[str, Any]
    catalog_current: bool  # the catalog on disk and its ledger row match a rescan now
    stages: dict[str, list[tuple[str, str, tuple[str, ...]]]] = field(default_factory=dict)  # (item, state, reasons)
    report: dict[str, str] | None = None  # the last report's paths, while its stamp matches
    report_needed: bool = True  # the run would write a report (its stages are part of the run)
    why: list[str] = field(default_factory=list)  # what there is to do (empty: nothing)

    @property
    def nothing_to_do(self) -> bool:
        return not self.why

    def summary(self) -> dict[str, Any]:
        """What the flow would have returned, had it run: nothing computed, everything already done."""
        out: dict[str, Any] = {"catalog": dict(self.catalog_summary)}
        for stage, entries in self.stages.items():
            out[stage] = {"planned": _counts(entries), "computed": 0, "adopted": 0, "skipped": len(entries),
                          "failed": {}, "busy": 0}
        if self.report_needed and self.report is not None:
            out["report"] = dict(self.report)
        return out


def _counts(entries) -> dict[str, int]:
    counts = {"done": 0, "stale": 0, "missing": 0, "failed": 0}
    for _, state, _ in entries:
        counts[state] += 1
    return counts


def keys_digest(item_ids, keys) -> str:
    """One hash over a stage's (item, key) pairs: equal digests, equal work."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(f"{i}@{k}" for i, k in zip(item_ids, keys))).encode()).hexdigest()


def items_digest(items) -> str:
    return keys_digest([it.item_id for it in items], [it.key.key for it in items])


def _code_digest() -> str:
    """The report's own code: a changed report or metrics module redraws the report."""
    import hashlib
    import importlib.util

    parts = []
    for name in ("tasks.report", "tasks.metrics"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and os.path.exists(spec.origin):
            parts.append(hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest())
    return hash_params(parts)


def report_stamp(cfg, catalog, metrics_digest: str) -> str:
    """What the report is a function of: the config, the catalog, the metrics items' keys and the report code."""
    return hash_params({
        "config": cfg.model_dump(mode="json"),
        "catalog": hash_params([[e["media"], e["id"], e["content_hash"], e["label"]] for e in catalog.entries]),
        "issues": [str(i) for i in catalog.issues],
        "metrics": metrics_digest,
        "code": _code_digest(),
    })


def _stamp_path(cfg) -> Path:
    return Path(cfg.workdir) / STATE_DIR / REPORT_STAMP


def write_report_stamp(cfg, catalog, metrics_digest: str, report: dict[str, str]) -> None:
    with atomic_path(_stamp_path(cfg)) as tmp:
        tmp.write_text(json.dumps({"stamp": report_stamp(cfg, catalog, metrics_digest), "report": report}))


def current_report(cfg, catalog, metrics_digest: str) -> dict[str, str] | None:
    """The last report's paths if it was written for exactly this config, catalog and metrics, and is still there."""
    try:
        saved = json.loads(_stamp_path(cfg).read_text())
        report = saved["report"]
        if saved["stamp"] != report_stamp(cfg, catalog, metrics_digest):
            return None
        if not all(isinstance(v, str) and Path(v).exists() for v in report.values()):
            return None
        return {str(k): v for k, v in report.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def preflight(cfg, only: set[str] | None = None) -> Preflight:
    """Plan the whole run from the catalog scan and the ledger alone (no Prefect, no model library)."""
    from flows.plancache import plan_keys, stage_keys
    from flows.stages import stage_modules
    from tasks.catalog import catalog_key, catalog_summary, previous_catalog, same_catalog, scan_catalog

    state = open_state(cfg.workdir)
    with using(state):
        old = previous_catalog(cfg)
        cat = scan_catalog(cfg, previous=old)
        ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
        snapshot = ledger.snapshot()
        row = snapshot.latest("catalog").get("catalog")
        current = same_catalog(cat, old) and row is not None and row["key"] == catalog_key(cfg, cat).key
        pf = Preflight(catalog_summary(cfg, cat), current)
        if not current:
            pf.why.append("catalog changed" if old is not None else "no catalog yet")
        mods = stage_modules()
        keys = stage_keys(cfg, cat, mods)
        metrics_digest = None
        for mod in mods:
            if only is not None and mod.STAGE not in only:
                continue
            entries = plan_keys(keys, mod.STAGE, snapshot)
            pf.stages[mod.STAGE] = entries
            todo = sum(state != "done" for _, state, _ in entries)
            if todo:
                pf.why.append(f"{mod.STAGE}: {todo} to do")
            if mod.STAGE == "metrics":
                t = keys.stages["metrics"]
                metrics_digest = keys_digest(t["item_id"].to_pylist(), t["key"].to_pylist())
        pf.report_needed = any(m.STAGE == "metrics" for m in mods) and (only is None or "metrics" in only)
        if pf.report_needed:
            pf.report = current_report(cfg, cat, metrics_digest or "") if metrics_digest is not None else None
            if pf.report is None:
                pf.why.append("report not written for this state")
    state.save()
    return pf


def compact_if_needed(cfg) -> dict[str, int] | None:
    ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
    if len(ledger.fragment_paths()) > COMPACT_AFTER_FRAGMENTS:
        return ledger.compact()
    return None


_caller_planned = threading.local()  # set while a flow runs that its caller has just planned


def answer_without_prefect(cfg, only: set[str] | None = None) -> dict[str, Any] | None:
    """The run's summary when it has nothing to do (no Prefect); None when there is work (or the plan failed)."""
    if getattr(_caller_planned, "value", False):
        return None  # planned a moment ago by run_pipeline: there is work
    try:
        pf = preflight(cfg, only)
    except Exception as e:  # a plan that fails here fails the same way in the flow, which reports it properly
        log.debug("preflight failed, running the flow: %s: %s", type(e).__name__, e)
        return None
    if not pf.nothing_to_do:
        log.debug("work to do: %s", "; ".join(pf.why))
        return None
    compact_if_needed(cfg)
    return pf.summary()


def run_pipeline(config_path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                 progress: bool = False, detached_server: bool = False) -> dict[str, Any]:
    """The whole pipeline for a config: answered from the plan when there is nothing to do, else the Prefect flow
    (with progress bars when `progress`; with `detached_server`, a temporary Prefect server that a Ctrl-C in the
    terminal does not kill, flows.server)."""
    import contextlib

    from tasks import interrupts
    from tasks.config import load_config

    cfg = load_config(config_path, overrides or None)
    summary = answer_without_prefect(cfg)
    if summary is not None:
        return summary
    if interrupts.stop_requested():
        return {"catalog": {}, "interrupted": True}
    from flows.pipeline import pipeline_flow
    from flows.progress import show_progress
    from flows.server import temporary_server

    _caller_planned.value = True
    try:
        with temporary_server() if detached_server else contextlib.nullcontext(), show_progress(progress):
            if interrupts.stop_requested():  # stopped while the server started
                return {"catalog": {}, "interrupted": True}
            return pipeline_flow(str(config_path), overrides or None)
    finally:
        _caller_planned.value = False
