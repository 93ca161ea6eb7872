"""Prefect glue shared by every stage task: the cache policy and small helpers.

Stage modules keep their plain functions free of this; their thin `stage_task`
uses it. Results returned to Prefect are ids only; the data lives in Zarr.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy

from storage import ArtifactStore, Ledger
from storage.claims import Claims
from storage.hashing import hash_params
from tasks.stage import BatchResult, WorkItem


def batch_summary(result: BatchResult) -> dict[str, Any]:
    """What a Prefect task returns: small, never the data."""
    return {
        "computed": list(result.computed), "adopted": list(result.adopted), "failed": dict(result.failed),
        "busy": list(result.busy),
    }


def open_store_and_ledger(cfg) -> tuple[ArtifactStore, Ledger]:
    opts = cfg.storage.storage_options
    return ArtifactStore(cfg.store_url, opts), Ledger(cfg.ledger_url, opts)


_item_listener = None  # called (stage, state) as each item finishes; the CLI's progress bars set it


def set_item_listener(fn) -> None:
    """Report every finished item of in-process stage tasks to fn(stage, state); None stops it."""
    global _item_listener
    _item_listener = fn


def run_logged_batch(stage: str, run_batch, cfg, items: Sequence[WorkItem]) -> dict[str, Any]:
    """The body of every stage's Prefect task: run one batch with its progress and failures in
    the task run's log, and return a small summary (never the data, which is in Zarr)."""
    from prefect import get_run_logger

    logger = get_run_logger()
    store, ledger = open_store_and_ledger(cfg)

    def progress(item, state):
        logger.info("%s %s: %s", stage, item.item_id, state)
        listener = _item_listener
        if listener is not None:
            listener(stage, state)

    result = run_batch(cfg, list(items), store, ledger, progress=progress, claims=open_claims(cfg))
    for item_id, msg in result.failed.items():
        logger.error("%s %s failed: %s", stage, item_id, msg)
    return batch_summary(result)


def open_claims(cfg) -> Claims:
    """Work claims shared by every worker, so overlapping batches compute each artifact once."""
    return Claims(cfg.claims_url, cfg.storage.storage_options)


# ----------------------------------------------------------------------------- Prefect cache policy


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache key of a batch task = hash of its items' stage cache keys (DESIGN 4).

    The ledger stays the authority: the key is offered only when the ledger already
    records every item done under exactly that key, so a cached Prefect result can
    never stand in for work that failed, was never recorded, or was lost with a
    wiped ledger (the task then runs, and adopts what the store already holds).
    """

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        items: Sequence[WorkItem] = inputs.get("items") or ()
        cfg = inputs.get("cfg")
        if not items or cfg is None:
            return None
        try:
            ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
            stages = {it.stage for it in items}
            latest = {s: ledger.latest(s) for s in stages}
        except Exception:
            return None  # no ledger to trust: always run
        for it in items:
            row = latest[it.stage].get(it.item_id)
            if row is None or row["status"] != "done" or row["key"] != it.key.key:
                return None
        return hash_params({"stage_batch": sorted(f"{it.stage}/{it.item_id}/{it.key.key}" for it in items)})
