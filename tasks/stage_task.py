"""Prefect glue shared by every stage task: the cache policy and small helpers.

Stage modules keep their plain functions free of this; their thin `stage_task`
uses it. Results returned to Prefect are ids only; the data lives in Zarr.

Importing a stage module must not import Prefect (planning and `status` run without
it, DESIGN 4): `task` here is a deferred `prefect.task` whose Prefect task is built on
first use (a call, `.submit`, any attribute), and `StageCachePolicy` becomes a Prefect
`CachePolicy` only then.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from storage.hashing import hash_params
from tasks.stage import BatchResult, WorkItem


class DeferredTask:
    """A Prefect task built on first use: `prefect.task(**options)(fn)`, with deferred cache policies made real."""

    def __init__(self, fn: Callable, options: dict[str, Any]):
        self.__dict__.update(_fn=fn, _options=options, _task=None, _lock=threading.Lock())
        functools.update_wrapper(self, fn)

    def prefect_task(self):
        if self._task is None:
            with self._lock:
                if self._task is None:
                    from prefect import task as prefect_task

                    opts = dict(self._options)
                    if isinstance(opts.get("cache_policy"), StageCachePolicy):
                        opts["cache_policy"] = opts["cache_policy"].prefect_policy()
                    self.__dict__["_task"] = prefect_task(**opts)(self._fn)
        return self._task

    def __call__(self, *args, **kwargs):
        return self.prefect_task()(*args, **kwargs)

    def __getattr__(self, name: str):  # submit, map, with_options, fn, name, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.prefect_task(), name)

    def __repr__(self) -> str:
        return f"DeferredTask({self._fn.__module__}.{self._fn.__qualname__})"

    def __reduce__(self):
        # Pickled by reference (a flow's globals travel to Dask workers): the lock never does.
        return (_module_attribute, (self._fn.__module__, self._fn.__qualname__))


def _module_attribute(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def task(fn: Callable | None = None, **options: Any):
    """`prefect.task` with Prefect imported only when the task is first used (same arguments)."""
    if fn is not None:
        return DeferredTask(fn, options)
    return lambda f: DeferredTask(f, options)


def batch_summary(result: BatchResult) -> dict[str, Any]:
    """What a Prefect task returns: small, never the data."""
    return {
        "computed": list(result.computed), "adopted": list(result.adopted), "failed": dict(result.failed),
        "busy": list(result.busy), "not_started": list(result.not_started), "interrupted": bool(result.interrupted),
    }


def open_store_and_ledger(cfg):
    """(ArtifactStore, Ledger) of a config."""
    from storage import ArtifactStore, Ledger

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


def open_claims(cfg):
    """Work claims shared by every worker, so overlapping batches compute each artifact once."""
    from storage.claims import Claims

    return Claims(cfg.claims_url, cfg.storage.storage_options, lease_s=cfg.execution.claim_lease_s)


# ----------------------------------------------------------------------------- Prefect cache policy


class StageCachePolicy:
    """Prefect cache key of a batch task = hash of its items' stage cache keys (DESIGN 4).

    The ledger stays the authority: the key is offered only when the ledger already
    records every item done under exactly that key, so a cached Prefect result can
    never stand in for work that failed, was never recorded, or was lost with a
    wiped ledger (the task then runs, and adopts what the store already holds).
    During a run the ledger is the run's `LedgerView` (read at plan time, then each
    row this process appends): a dict lookup, never a read per batch.
    Plain Python until a task is built: `prefect_policy()` is the Prefect CachePolicy.
    """

    def prefect_policy(self):
        return _prefect_policy_class()(rule=self)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        from storage.ledger import Ledger

        items: Sequence[WorkItem] = inputs.get("items") or ()
        cfg = inputs.get("cfg")
        if not items or cfg is None:
            return None
        try:
            # Inside a run: a lookup in the run's ledger view; elsewhere only these items' rows are read.
            done = Ledger(cfg.ledger_url, cfg.storage.storage_options).done_under(
                (it.stage, it.item_id, it.key.key) for it in items)
        except Exception:
            return None  # no ledger to trust: always run
        if not done:
            return None
        return hash_params({"stage_batch": sorted(f"{it.stage}/{it.item_id}/{it.key.key}" for it in items)})



def _prefect_policy_class():
    from tasks.stage_prefect import PrefectStageCachePolicy

    return PrefectStageCachePolicy
