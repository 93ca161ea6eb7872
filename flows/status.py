"""Per stage: how many items are done, stale, missing or failed, and why (from the ledger).

By default the catalog sources are rescanned (in memory; the catalog is not written), so a
clip whose bytes changed since the last run shows as stale, with the reason, before any
rerun. The rescan hashes through the workdir's state file (`storage.state`): an unchanged
file costs one stat, a touched or changed one is read again. Neither Prefect nor any
model library is imported.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from flows.plancache import plan_keys, stage_keys
from flows.stages import stage_modules
from storage.ledger import Ledger
from storage.state import open_state, using
from tasks.catalog import read_catalog, scan_catalog
from tasks.config import Config


def stage_work_items(cfg: Config, catalog) -> dict[str, list]:
    return {mod.STAGE: mod.work_items(cfg, catalog) for mod in stage_modules()}


def status(cfg: Config, rescan: bool = True) -> dict[str, Any]:
    """rescan=False trusts the catalog of the last run (no stat or hash of the media)."""
    report: dict[str, Any] = {"workdir": str(cfg.workdir), "stages": {}}
    if not cfg.catalog_path.exists():
        report["stages"]["catalog"] = {"done": 0, "stale": 0, "missing": 1, "failed": 0, "items": [
            {"item": "catalog", "state": "missing", "reasons": ["catalog not built yet: run `audioscenic run CONFIG`"]}]}
        return report
    state = open_state(cfg.workdir)
    with using(state):
        catalog = scan_catalog(cfg) if rescan else read_catalog(cfg.catalog_path)
        report["stages"]["catalog"] = {
            "done": 1, "stale": 0, "missing": 0, "failed": 0,
            "videos": sum(e["media"] == "video" for e in catalog.entries),
            "audio": sum(e["media"] == "audio" for e in catalog.entries),
            "issues": [str(i) for i in catalog.issues],
        }
        ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options).snapshot()
        keys = stage_keys(cfg, catalog, stage_modules())  # cached while config, catalog and code are unchanged
        for stage in keys.stages:
            entries = plan_keys(keys, stage, ledger)
            counts = Counter(state for _, state, _ in entries)
            report["stages"][stage] = {
                **{s: counts.get(s, 0) for s in ("done", "stale", "missing", "failed")},
                "items": [
                    {"item": item, "state": state, "reasons": list(reasons)}
                    for item, state, reasons in entries if state != "done"
                ],
            }
    state.save()
    return report
