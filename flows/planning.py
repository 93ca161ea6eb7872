"""Turn a stage's plan into Prefect work: batches, bounded concurrency, a summary."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from flows import progress
from storage import Ledger
from tasks.stage import PlanEntry, WorkItem, plan


def make_batches(items: Sequence[WorkItem], batch_size: int, by_video: bool = False) -> list[list[WorkItem]]:
    """At most batch_size items per batch; with by_video, a batch never mixes videos
    (edit batches share one loaded video state: its model and z_T)."""
    groups: dict[str | None, list[WorkItem]] = defaultdict(list)
    for it in items:
        groups[it.video_id if by_video else None].append(it)
    out = []
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            out.append(group[i : i + batch_size])
    return out


def summarize_plan(entries: Sequence[PlanEntry]) -> dict[str, int]:
    counts = {"done": 0, "stale": 0, "missing": 0, "failed": 0}
    for e in entries:
        counts[e.state] += 1
    return counts


def run_stage(mod, cfg, catalog, ledger: Ledger, max_concurrency: int = 1,
              planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan one stage from the ledger and submit one Prefect task per batch of its todo items.

    planned: when given, gets the stage's planned keys (`flows.plancache` table)."""
    items = mod.work_items(cfg, catalog)
    if planned is not None:
        import pyarrow as pa

        from flows.plancache import SCHEMA, rows_of

        planned[mod.STAGE] = pa.table(rows_of(items), schema=SCHEMA)
    entries = plan(items, ledger)
    todo = [e.item for e in entries if e.state != "done"]
    summary: dict[str, Any] = {"planned": summarize_plan(entries), "computed": 0, "adopted": 0,
                               "skipped": len(items) - len(todo), "failed": {}, "busy": 0}
    if not todo:
        return summary
    progress.stage_planned(mod.STAGE, len(todo))
    section = getattr(cfg.stages, getattr(mod, "CONFIG_SECTION", mod.STAGE), None)
    batch_size = getattr(section, "batch_size", 16)
    pending = []
    for batch in make_batches(todo, batch_size, by_video=getattr(mod, "BATCH_BY_VIDEO", False)):
        # Bounded concurrency: wait for the oldest batch before submitting past the bound.
        if len(pending) >= max_concurrency:
            _merge(summary, pending.pop(0).result())
            progress.batch_finished(mod.STAGE, _finished(summary))
        pending.append(mod.stage_task.submit(cfg, batch))
    for fut in pending:
        _merge(summary, fut.result())
        progress.batch_finished(mod.STAGE, _finished(summary))
    return summary


def _finished(summary: dict[str, Any]) -> int:
    return summary["computed"] + summary["adopted"] + len(summary["failed"]) + summary["busy"]


def _merge(summary: dict[str, Any], result: dict[str, Any]) -> None:
    summary["computed"] += len(result.get("computed", []))
    summary["adopted"] += len(result.get("adopted", []))
    summary["failed"].update(result.get("failed", {}))
    summary["busy"] += len(result.get("busy", []))
