"""One grid, many workers: a grid flow that fans its videos out as child flow runs on a work pool.

`fanout_grid_flow` (deployment `fanout-grid`, on the small `audioscenic-grid` pool) refreshes
the catalog, computes the clips' audio features (shared by every video), then starts one run
of the `video-stages` deployment per video that has work left, with Prefect's
`run_deployment(..., timeout=0)`. Any worker of the `audioscenic-process` pool takes them, so
N workers drain one grid with no manual subsets, and each video's frames, masks, depth,
latents, fine-tuning, inversion, edits and metrics run in one child, on one machine.

The parent waits for every child to reach a final state. A child whose machine died
(SIGKILL, power, network) stays Running in Prefect; the parent sees its flow-run heartbeats
stop (`prefect.flow-run.heartbeat` events, every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds),
marks it Crashed after `lost_after_s` and starts that video again. The new run finds what
the dead one committed done (ledger or store) and takes over the items it held once their
claims' leases lapse (storage.claims), so nothing committed is redone. A healthy child
wrongly declared lost costs a duplicate run, never a duplicate artifact: the claims keep
each item to one worker.

Last, the parent plans the whole grid once more (per-stage counts: done, failed, left) and
writes the report, as the whole-grid flow does.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import run_stages
from flows.planning import run_stage
from flows.stages import stage_modules
from storage import Ledger
from storage.state import open_state, using
from tasks import interrupts
from tasks.catalog import catalog_task, read_catalog
from tasks.config import load_config
from tasks.stage import plan

VIDEO_DEPLOYMENT = "audioscenic-grid-video/video-stages"
SHARED_STAGES = ("audio",)  # per clip, used by every video: computed by the parent first
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


@flow(name="audioscenic-grid-video")
def video_flow(config_path: str, video: str, overrides: dict[str, Any] | None = None,
               only: list[str] | None = None) -> dict[str, Any]:
    """Every stage (or those in `only`) for one video of a grid, with the grid's cache keys (a child of
    fanout_grid_flow)."""
    return run_stages(config_path, overrides, set(only) if only else None, videos=[video])


def plan_grid(cfg, catalog, ledger, mods) -> dict[str, list]:
    """Each stage's plan entries against one read of the ledger."""
    snapshot = ledger.snapshot()
    return {mod.STAGE: plan(mod.work_items(cfg, catalog), snapshot) for mod in mods}


def videos_with_work(cfg, catalog, ledger, mods) -> list[str]:
    """Videos (catalog order) that some per-video stage has a missing, stale or failed item for."""
    plans = plan_grid(cfg, catalog, ledger, [m for m in mods if m.STAGE not in SHARED_STAGES])
    todo = {e.item.video_id for entries in plans.values() for e in entries
            if e.state != "done" and e.item.video_id is not None}
    return [e["id"] for e in catalog.entries if e["media"] == "video" and e["id"] in todo]


def finish_grid(cfg, catalog, ledger, mods) -> dict[str, Any]:
    """After the children: per-stage counts from one plan of the grid, then (with metrics among the
    stages) the report unless the last one is current, its stamp, and ledger compaction when due."""
    from flows.pipeline import report_task
    from flows.preflight import compact_if_needed, current_report, keys_digest, write_report_stamp

    plans = plan_grid(cfg, catalog, ledger, mods)
    out: dict[str, Any] = {"stages": {}}
    for stage, entries in plans.items():
        counts = {"done": 0, "stale": 0, "missing": 0, "failed": 0}
        for e in entries:
            counts[e.state] += 1
        out["stages"][stage] = counts
    out["failed"] = {f"{stage} {e.item.item_id}": "; ".join(e.reasons) for stage, entries in plans.items()
                     for e in entries if e.state == "failed"}
    out["left"] = {stage: c["missing"] + c["stale"] for stage, c in out["stages"].items() if c["missing"] + c["stale"]}
    if out["left"] or "metrics" not in plans:
        return out
    digest = keys_digest([e.item.item_id for e in plans["metrics"]], [e.item.key.key for e in plans["metrics"]])
    out["report"] = current_report(cfg, catalog, digest)
    if out["report"] is None:
        out["report"] = report_task(cfg)
        write_report_stamp(cfg, catalog, digest, out["report"])
    compacted = compact_if_needed(cfg)
    if compacted:
        out["compacted"] = compacted
    return out


def default_lost_after_s() -> float | None:
    """Three missed heartbeats (of this process's PREFECT_FLOWS_HEARTBEAT_FREQUENCY; workers should match)."""
    from prefect.settings import get_current_settings

    freq = get_current_settings().flows.heartbeat_frequency
    return None if freq is None else 3.0 * max(freq, 30)


class Children:
    """The child runs of one fan-out: submit, poll, declare lost, resubmit."""

    def __init__(self, client, deployment: str, parent_id: str, params: dict[str, Any], attempts: int,
                 lost_after_s: float | None, logger, job_variables: dict[str, Any] | None = None):
        self.client, self.deployment, self.parent_id, self.params = client, deployment, parent_id, params
        self.job_variables = job_variables
        self.attempts, self.lost_after_s, self.logger = attempts, lost_after_s, logger
        self.runs: dict[str, list[Any]] = {}  # video -> its FlowRuns, latest last
        self.final: dict[str, str] = {}  # video -> final state type of its latest run
        self.notes: dict[str, list[str]] = {}

    def submit(self, video: str) -> None:
        from prefect.deployments import run_deployment

        n = len(self.runs.get(video, [])) + 1
        run = run_deployment(
            self.deployment, parameters={**self.params, "video": video}, timeout=0, as_subflow=True,
            flow_run_name=f"{video}" if n == 1 else f"{video}-attempt-{n}",
            idempotency_key=f"{self.parent_id}:{video}:{n}",  # a retried parent finds its children again
            tags=["audioscenic", "grid-video"], job_variables=self.job_variables,
        )
        self.runs.setdefault(video, []).append(run)
        self.logger.info("video %s: child run %s (%s), attempt %d", video, run.name, run.id, n)

    def pending(self) -> list[str]:
        return [v for v in self.runs if v not in self.final]

    def poll(self) -> None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        latest = {self.runs[v][-1].id: v for v in self.pending()}
        if not latest:
            return
        found = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(latest))))
        now = datetime.now(timezone.utc)
        seen = self._last_heartbeats([fr.id for fr in found if fr.state and fr.state.type.value in ("RUNNING", "PENDING")])
        for fr in found:
            video, state = latest[fr.id], fr.state.type.value if fr.state else "SCHEDULED"
            self.runs[video][-1] = fr
            if state in ("RUNNING", "PENDING") and self.lost_after_s is not None:
                last = max(t for t in (seen.get(fr.id), fr.state.timestamp) if t is not None)
                # Pending: taken by a worker, not started yet (no heartbeats); a busy machine may take a while.
                bound = self.lost_after_s * (1 if state == "RUNNING" else 2)
                if (now - last).total_seconds() > bound and self._crash(
                        fr, f"{state.lower()}, no heartbeat for {bound:.0f}s (last sign {last.isoformat()})"):
                    state = "CRASHED"
            if state not in FINAL:
                continue
            if state == "CRASHED" and len(self.runs[video]) < self.attempts:
                self.notes.setdefault(video, []).append(f"{fr.name} crashed")
                self.logger.warning("video %s: child run %s crashed; starting it again", video, fr.name)
                self.submit(video)
                continue
            self.final[video] = state
            log = self.logger.info if state == "COMPLETED" else self.logger.error
            log("video %s: child run %s %s", video, fr.name, state)

    def _last_heartbeats(self, run_ids) -> dict[Any, datetime]:
        """The latest heartbeat event of each run (one query for all of them)."""
        if not run_ids or self.lost_after_s is None:
            return {}
        from uuid import UUID

        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

        now = datetime.now(timezone.utc)
        flt = EventFilter(
            occurred=EventOccurredFilter(since=now - timedelta(seconds=10 * self.lost_after_s), until=now),
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{i}" for i in run_ids], distinct=True),
        )
        try:
            page = self.client.read_events(filter=flt, limit=len(run_ids))
        except Exception as e:  # no events API: liveness falls back to the state's time
            self.logger.warning("reading heartbeats failed: %s: %s", type(e).__name__, e)
            return {}
        return {UUID(ev.resource.id.rsplit(".", 1)[1]): ev.occurred for ev in page.events}

    def _crash(self, fr, why: str) -> bool:
        """Mark a lost child Crashed; not forced, so a child that reached a final state meanwhile keeps it."""
        from prefect.states import Crashed

        self.logger.warning("video child run %s is lost (%s): marking it Crashed", fr.name, why)
        result = self.client.set_flow_run_state(fr.id, Crashed(message=f"lost: {why} (marked by its fan-out parent)"))
        return getattr(result.status, "value", str(result.status)).upper() == "ACCEPT"

    def cancel_pending(self) -> None:
        from prefect.states import Cancelling

        for video in self.pending():
            try:
                self.client.set_flow_run_state(self.runs[video][-1].id, Cancelling(), force=True)
            except Exception as e:
                self.logger.warning("could not cancel the child run of %s: %s", video, e)

    def report(self) -> dict[str, Any]:
        return {v: {"state": self.final.get(v, "UNFINISHED"), "runs": [str(r.id) for r in runs],
                    "attempts": len(runs), **({"notes": self.notes[v]} if v in self.notes else {})}
                for v, runs in self.runs.items()}


@flow(name="audioscenic-grid-fanout")
def fanout_grid_flow(config_path: str, selection: str | None = None, overrides: dict[str, Any] | None = None,
                     only: list[str] | None = None, video_deployment: str = VIDEO_DEPLOYMENT, attempts: int = 3,
                     lost_after_s: float | None = None, poll_s: float = 5.0,
                     job_variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The grid of a selection, one child run per video on the pool; reports the whole.

    only: these stages only (e.g. the video preprocessing: frames, masks, depth, latents); the
    report is written when metrics is among them.
    attempts: runs per video in all (a crashed or lost child is started again until then).
    lost_after_s: a Running child with no heartbeat for this long is lost (default: three
    heartbeat periods; None with heartbeats off: never).
    job_variables: the child runs' work-pool job variables (e.g. {"env": {...}} for a process pool)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    logger = get_run_logger()
    overrides = dict(overrides or {})
    if selection:
        overrides["grid.selection"] = selection
    cfg = load_config(config_path, overrides)
    summary: dict[str, Any] = {"catalog": catalog_task(cfg)}
    catalog = read_catalog(cfg.catalog_path)
    ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
    mods = [m for m in stage_modules() if not only or m.STAGE in only]
    state = open_state(cfg.workdir)
    started = time.monotonic()
    with using(state):
        for mod in mods:
            if mod.STAGE in SHARED_STAGES:
                summary[mod.STAGE] = run_stage(mod, cfg, catalog, ledger, max_concurrency=cfg.execution.max_concurrency)
        videos = videos_with_work(cfg, catalog, ledger, mods)
    state.save()
    logger.info("%d video(s) with work left: %s", len(videos), videos)
    lost_after_s = default_lost_after_s() if lost_after_s is None else lost_after_s
    with get_client(sync_client=True) as client:
        children = Children(client, video_deployment, str(flow_run.get_id()),
                            {"config_path": config_path, "overrides": overrides or None, "only": only or None},
                            max(1, attempts), lost_after_s, logger, job_variables)
        try:
            for v in videos:
                children.submit(v)
            while children.pending() and not interrupts.stop_requested():
                _sleep(poll_s)
                children.poll()
        except BaseException as e:
            if not isinstance(e, Exception):
                children.cancel_pending()  # the grid was cancelled or stopped: so are its children
            raise
        summary["children"] = children.report()
    summary["children_s"] = round(time.monotonic() - started, 1)
    bad = {v: c["state"] for v, c in summary["children"].items() if c["state"] != "COMPLETED"}
    if bad or interrupts.stop_requested():
        raise RuntimeError(f"grid not finished: child runs {bad or 'stopped'}; rerun the fan-out to continue")
    with using(state):
        summary.update(finish_grid(cfg, read_catalog(cfg.catalog_path), ledger, mods))
    state.save()
    logger.info("child runs: %s", {v: c["state"] for v, c in summary["children"].items()})
    for stage, counts in summary["stages"].items():
        logger.info("%s: %s", stage, counts)
    for item, why in summary["failed"].items():
        logger.error("%s failed: %s", item, why)
    if summary["left"]:  # every child completed, yet items are missing: e.g. the catalog changed meanwhile
        raise RuntimeError(f"grid not finished: items left {summary['left']}; rerun the fan-out to continue")
    return summary


def _sleep(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not interrupts.stop_requested():
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
