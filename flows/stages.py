"""The stage registry: which task modules make up the pipeline, in dependency order.

Every module listed here exposes STAGE, work_items(cfg, catalog) (whose items carry
cache keys with the stage's code version), run_batch(cfg, items, store, ledger,
progress=None) and a Prefect task `stage_task(cfg, items)`. A module that is not
importable yet (a stage still being built) is simply not part of the pipeline.
"""
from __future__ import annotations

import importlib
from types import ModuleType

PIPELINE = [
    "tasks.audio",
    "tasks.frames",
    "tasks.masks",
    "tasks.depth",
    "tasks.latents",
    "tasks.finetune",  # before inversion: `stages.inversion.model: finetuned` inverts with its weights
    "tasks.inversion",
    "tasks.edit",
    "tasks.metrics",
]


def stage_modules() -> list[ModuleType]:
    mods = []
    for name in PIPELINE:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the stage itself is not there yet; a broken import elsewhere still fails
                continue
            raise
        if all(hasattr(mod, a) for a in ("STAGE", "work_items", "run_batch", "stage_task")):
            mods.append(mod)
    return mods
