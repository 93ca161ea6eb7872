"""Turn a stage's plan into Prefect work: batches, bounded concurrency, a summary."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from flows import progress
from storage import Ledger, LedgerView
from tasks import interrupts
from tasks.stage import PlanEntry, WorkItem, plan


STOP_GRACE_S = 20.0  # how long a signalled flow lets its batches reach a safe point


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


def run_stage(mod, cfg, catalog, ledger: Ledger | LedgerView, max_concurrency: int = 1,
              planned: dict[str, Any] | None = None, videos: Sequence[str] | None = None) -> dict[str, Any]:
    """Plan one stage from the ledger and submit one Prefect task per batch of its todo items.

    ledger: the run's view (`Ledger.view()`: read once per run, shared with the cache policy), or a ledger
    (read once for this stage). Every `fan_in` finished batches, the view runs a bounded compaction step.
    planned: when given, gets the stage's planned keys (`flows.plancache` table).
    videos: keep only these videos' items (and items of no video, the clips' audio); the keys are
    built for the whole grid first, so a part of a grid computes exactly what the whole would."""
    items = mod.work_items(cfg, catalog)
    if videos is not None:
        keep = set(videos)
        items = [it for it in items if it.video_id is None or it.video_id in keep]
    if planned is not None:
        import pyarrow as pa

        from flows.plancache import SCHEMA, rows_of

        planned[mod.STAGE] = pa.table(rows_of(items), schema=SCHEMA)
    if isinstance(ledger, LedgerView):
        view = ledger
        view.refresh()  # what other processes wrote since: only their new fragments
    else:
        view = LedgerView(ledger)
    entries = plan(items, view)
    todo = [e.item for e in entries if e.state != "done"]
    summary: dict[str, Any] = {"planned": summarize_plan(entries), "computed": 0, "adopted": 0,
                               "skipped": len(items) - len(todo), "failed": {}, "busy": 0, "not_started": 0,
                               "interrupted": False}
    if not todo:
        return summary
    progress.stage_planned(mod.STAGE, len(todo))
    section = getattr(cfg.stages, getattr(mod, "CONFIG_SECTION", mod.STAGE), None)
    batch_size = getattr(section, "batch_size", 16)
    pending: list = []
    batches = make_batches(todo, batch_size, by_video=getattr(mod, "BATCH_BY_VIDEO", False))
    try:
        for i, batch in enumerate(batches):
            # Bounded concurrency: wait for the oldest batch before submitting past the bound.
            if len(pending) >= max_concurrency:
                _merge(summary, pending.pop(0).result())
                progress.batch_finished(mod.STAGE, _finished(summary))
                view.batch_finished()
            if interrupts.stop_requested():  # a stop: submit nothing more
                summary["not_started"] += sum(len(b) for b in batches[i:])
                break
            pending.append(mod.stage_task.submit(cfg, batch))
        while pending:
            _merge(summary, pending.pop(0).result())
            progress.batch_finished(mod.STAGE, _finished(summary))
            view.batch_finished()
    except BaseException as e:
        # SIGTERM inside a Prefect flow arrives here as Prefect's TerminationSignal (a worker's run cancelled
        # from the UI), Ctrl-C outside the CLI as KeyboardInterrupt: stop the batches in flight at their next
        # safe point (ledger rows flushed, claims released) before letting it through.
        if isinstance(e, Exception):
            raise
        interrupts.request_stop(type(e).__name__)
        for fut in pending:
            with contextlib.suppress(BaseException):
                fut.wait(timeout=STOP_GRACE_S)
        if not interrupts.signals_handled():
            raise
        # The CLI owns the signals (SIGTERM still reaches it through Prefect's bridge): end with a summary.
        for fut in pending:
            with contextlib.suppress(BaseException):
                _merge(summary, fut.result(timeout=0))
    summary["interrupted"] = interrupts.stop_requested()
    return summary


def _finished(summary: dict[str, Any]) -> int:
    return summary["computed"] + summary["adopted"] + len(summary["failed"]) + summary["busy"]


def _merge(summary: dict[str, Any], result: dict[str, Any]) -> None:
    summary["computed"] += len(result.get("computed", []))
    summary["adopted"] += len(result.get("adopted", []))
    summary["failed"].update(result.get("failed", {}))
    summary["busy"] += len(result.get("busy", []))
    summary["not_started"] += len(result.get("not_started", []))
    _forget(result)


def _forget(result: Any) -> None:
    """Prefect links each task result (and its members) to its task run's state until the flow ends, to track
    dependencies; a batch summary is never passed on, so drop those links (a grid has thousands of batches)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    links = getattr(ctx, "run_results", None)
    if isinstance(links, dict):
        for obj in (result, *result.values()) if isinstance(result, dict) else (result,):
            links.pop(id(obj), None)
