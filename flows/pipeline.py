"""The end-to-end flow: catalog, then every stage that exists, planned from the ledger."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.catalog import catalog_task
from tasks.config import load_config


@flow(name="audioscenic-pipeline", log_prints=True)
def pipeline_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    summary: dict[str, Any] = {"catalog": catalog_task(cfg)}
    logger.info("catalog: %s", summary["catalog"])
    return summary
