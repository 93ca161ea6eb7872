"""Flows: the whole pipeline, the grid edit flow, and one flow per preprocessing group.

Every flow reads one YAML config, refreshes the catalog, then runs its stages
in dependency order; each stage is planned from the ledger, so a flow that
finds nothing missing or stale does no stage work. Before the stages subflow (and
its task runner, e.g. a Dask cluster) starts, the whole run is planned once
(`flows.preflight`): with nothing to do, the flow returns that plan's summary.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.planning import run_stage
from flows.plancache import fingerprint, store_planned
from flows.preflight import COMPACT_AFTER_FRAGMENTS, answer_without_prefect, keys_digest, write_report_stamp
from flows.stages import stage_modules
from storage import Ledger
from storage.state import open_state, using
from tasks import interrupts
from tasks.catalog import catalog_task, read_catalog
from tasks.config import load_config


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg) -> dict[str, str]:
    """Metrics tables for the config's edits, then the HTML report; returns their paths."""
    from tasks import metrics
    from tasks.report import write_report

    catalog = read_catalog(cfg.catalog_path)
    tables = metrics.collect(cfg, catalog)
    index = write_report(cfg, catalog=catalog)
    return {"report": str(index), **{k: str(v) for k, v in tables.items()}}


def run_stages(config_path: str, overrides: dict[str, Any] | None, only: set[str] | None = None,
               videos: list[str] | None = None) -> dict[str, Any]:
    """Run the stages in a subflow whose task runner the config picks (Prefect's default, or Dask).

    videos: only the items of these videos (and the clip-level audio items), for one child run of a
    fanned-out grid (flows.fanout); their cache keys are those of the whole grid."""
    cfg = load_config(config_path, overrides)
    if videos is None:  # the plan-first answer covers the whole grid, not a part of it
        summary = answer_without_prefect(cfg, only)
        if summary is not None:
            get_run_logger().info("nothing to do: every stage is done and the report is current")
            return summary
    runner = task_runner(cfg)
    sub = stages_flow if runner is None else stages_flow.with_options(task_runner=runner)
    if videos is None:
        return sub(config_path, overrides, sorted(only) if only else None)
    return sub(config_path, overrides, sorted(only) if only else None, videos=list(videos))


def task_runner(cfg):
    if cfg.execution.dask_address is None:
        return None
    from prefect_dask import DaskTaskRunner

    if cfg.execution.dask_address == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.execution.dask_workers, "threads_per_worker": 1})
    return DaskTaskRunner(address=cfg.execution.dask_address)


@flow(name="audioscenic-stages")
def stages_flow(config_path: str, overrides: dict[str, Any] | None = None, only: list[str] | None = None,
                videos: list[str] | None = None) -> dict[str, Any]:
    """The stages in order. With `videos`, a part of a grid: no plan cache, report or compaction
    (the fan-out parent does those once for the whole)."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    summary: dict[str, Any] = {"catalog": catalog_task(cfg)}
    logger.info("catalog: %s", summary["catalog"])
    catalog = read_catalog(cfg.catalog_path)
    ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
    state, planned, mods = open_state(cfg.workdir), {}, stage_modules()
    # One read of the ledger for the whole run: planning and the cache policy share the view.
    with using(state), ledger.view() as view:  # key parts memoised here let the next plan skip the model libraries
        for mod in mods:
            if only is not None and mod.STAGE not in only:
                continue
            summary[mod.STAGE] = run_stage(mod, cfg, catalog, view, max_concurrency=cfg.execution.max_concurrency,
                                           planned=planned if videos is None else None, videos=videos)
            logger.info("%s: %s", mod.STAGE, {k: v for k, v in summary[mod.STAGE].items() if k != "failed"})
            for item, err in summary[mod.STAGE]["failed"].items():
                logger.error("%s %s failed: %s", mod.STAGE, item, err)
            if interrupts.stop_requested():
                break
    state.save()
    if interrupts.stop_requested():  # no further stage, no report: what finished is in the ledger
        logger.warning("stopped (%s): finished work is kept; rerun to continue", interrupts.stop_reason())
        summary["interrupted"] = True
        return summary
    if videos is not None:
        return summary
    if only is None:  # every stage planned: the next status or no-op check need not build these keys again
        store_planned(cfg, fingerprint(cfg, catalog, mods), planned)
    if any(m.STAGE == "metrics" for m in mods) and (only is None or "metrics" in only):
        summary["report"] = report_task(cfg)
        if "metrics" in planned:
            t = planned["metrics"]
            write_report_stamp(cfg, catalog, keys_digest(t["item_id"].to_pylist(), t["key"].to_pylist()),
                               summary["report"])
    if len(ledger.fragment_paths()) > COMPACT_AFTER_FRAGMENTS:
        logger.info("ledger compacted: %s", ledger.compact())
    return summary


@flow(name="audioscenic-pipeline")
def pipeline_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every stage, for the config's active grid selection."""
    return run_stages(config_path, overrides)


@flow(name="audioscenic-edit-grid")
def edit_grid_flow(config_path: str, selection: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The grid of the named selection (a subset in the config's `grid.subsets`, or 'all')."""
    overrides = dict(overrides or {})
    if selection:
        overrides["grid.selection"] = selection
    return run_stages(config_path, overrides)


@flow(name="audioscenic-preprocess-audio")
def preprocess_audio_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_stages(config_path, overrides, only={"audio"})


@flow(name="audioscenic-preprocess-video")
def preprocess_video_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return run_stages(config_path, overrides, only={"frames", "masks", "depth", "latents"})


@flow(name="audioscenic-finetune")
def finetune_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tuning and everything it needs (audio features, video preprocessing, inversion)."""
    return run_stages(config_path, overrides, only={"audio", "frames", "masks", "depth", "latents", "inversion", "finetune"})


@flow(name="audioscenic-evaluate")
def evaluate_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics for the config's edits (computing whatever they need), the tables and the report."""
    return run_stages(config_path, overrides)


@flow(name="audioscenic-ablation")
def ablation_flow(config_path: str, variants: list[str] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each variant (config overrides) over the same grid; upstream stages are shared through their keys."""
    from flows.planning import run_stage
    from tasks.ablation import default_variants, run_ablation

    cfg = load_config(config_path, overrides)
    chosen = default_variants(cfg)
    if variants:
        chosen = {k: v for k, v in chosen.items() if k in set(variants)}
    result = run_ablation(config_path, chosen, stage_modules(), overrides=overrides, run_stage=run_stage, report=True)
    return {"tables": {k: str(v) for k, v in result.tables.items()}, "report": str(result.report),
            "variants": sorted(result.summaries), "summaries": result.summaries}
