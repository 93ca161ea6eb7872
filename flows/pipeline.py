"""The end-to-end flow: catalog, then every registered stage, planned from the ledger."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.planning import run_stage
from flows.stages import stage_modules
from storage import Ledger
from tasks.catalog import catalog_task, read_catalog
from tasks.config import load_config


@flow(name="audioscenic-pipeline")
def pipeline_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    summary: dict[str, Any] = {"catalog": catalog_task(cfg)}
    logger.info("catalog: %s", summary["catalog"])
    catalog = read_catalog(cfg.catalog_path)
    ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
    for mod in stage_modules():
        summary[mod.STAGE] = run_stage(mod, cfg, catalog, ledger)
        logger.info("%s: %s", mod.STAGE, {k: v for k, v in summary[mod.STAGE].items() if k != "failed"})
    return summary
