"""Flows: the whole pipeline, the grid edit flow, and one flow per preprocessing group.

Every flow reads one YAML config, refreshes the catalog, then runs its stages
in dependency order; each stage is planned from the ledger, so a flow that
finds nothing missing or stale does no stage work.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.planning import run_stage
from flows.stages import stage_modules
from storage import Ledger
from tasks.catalog import catalog_task, read_catalog
from tasks.config import load_config


# Planning reads every fragment; past a few hundred small files, one merged file is much faster.
COMPACT_AFTER_FRAGMENTS = 256


def run_stages(config_path: str, overrides: dict[str, Any] | None, only: set[str] | None = None) -> dict[str, Any]:
    """Run the stages in a subflow whose task runner the config picks (Prefect's default, or Dask)."""
    cfg = load_config(config_path, overrides)
    runner = task_runner(cfg)
    sub = stages_flow if runner is None else stages_flow.with_options(task_runner=runner)
    return sub(config_path, overrides, sorted(only) if only else None)


def task_runner(cfg):
    if cfg.execution.dask_address is None:
        return None
    from prefect_dask import DaskTaskRunner

    if cfg.execution.dask_address == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.execution.dask_workers, "threads_per_worker": 1})
    return DaskTaskRunner(address=cfg.execution.dask_address)


@flow(name="audioscenic-stages")
def stages_flow(config_path: str, overrides: dict[str, Any] | None = None, only: list[str] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    summary: dict[str, Any] = {"catalog": catalog_task(cfg)}
    logger.info("catalog: %s", summary["catalog"])
    catalog = read_catalog(cfg.catalog_path)
    ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
    for mod in stage_modules():
        if only is not None and mod.STAGE not in only:
            continue
        summary[mod.STAGE] = run_stage(mod, cfg, catalog, ledger, max_concurrency=cfg.execution.max_concurrency)
        logger.info("%s: %s", mod.STAGE, {k: v for k, v in summary[mod.STAGE].items() if k != "failed"})
        for item, err in summary[mod.STAGE]["failed"].items():
            logger.error("%s %s failed: %s", mod.STAGE, item, err)
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
