"""Ablations (paper 5.5, Table 2): one grid under several method variants, each a set of config overrides.

A variant is the base config plus its dotted overrides (the same form as
`load_config` overrides). By default the variants are the config's own
(`variants`: name -> U-Net switches) and variant `name` is the override
`stages.finetune.variants = [name]`: fine-tuning and editing then run that
variant only, and its edits carry its name (edits/{video}/{audio}/{name}).
Stages whose settings the overrides do not touch (audio features, frames,
masks, depth, latents, base-model inversion) get the same cache keys under
every variant: the first variant computes them, every later one finds them
done in the ledger. Only fine-tuning, editing and metrics run per variant.

`run_ablation` is a plain function; a flow wires it with the pipeline's stage
list and its Prefect-backed `run_stage`. Without one, stages run in-process.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from storage import Ledger
from tasks import metrics as metrics_stage
from tasks.config import ConfigError, load_config
from tasks.stage import plan
from tasks.stage_task import open_store_and_ledger

RunStage = Callable[[ModuleType, Any, Any, Ledger], dict[str, Any]]


def default_variants(cfg) -> dict[str, dict[str, Any]]:
    """One run per variant the config defines: name -> {"stages.finetune.variants": [name]}."""
    return {name: {"stages.finetune.variants": [name]} for name in cfg.variants}


def run_stage_locally(mod: ModuleType, cfg, catalog, ledger: Ledger) -> dict[str, Any]:
    """Plan one stage from the ledger and run what is not done, in this process, as one batch.

    Returns the summary flows.planning.run_stage returns (planned counts by state,
    computed, adopted, skipped, failed, busy), so either can be passed as `run_stage`.
    """
    store, _ = open_store_and_ledger(cfg)
    entries = plan(mod.work_items(cfg, catalog), ledger)
    todo = [e.item for e in entries if e.state != "done"]
    planned = {"done": 0, "stale": 0, "missing": 0, "failed": 0}
    for e in entries:
        planned[e.state] += 1
    summary: dict[str, Any] = {"planned": planned, "computed": 0, "adopted": 0, "skipped": len(entries) - len(todo),
                               "failed": {}, "busy": 0}
    if todo:
        result = mod.run_batch(cfg, todo, store, ledger)
        summary.update(computed=len(result.computed), adopted=len(result.adopted), failed=dict(result.failed),
                       busy=len(result.busy), not_started=len(result.not_started), interrupted=result.interrupted)
    return summary


def _check_distinct_edits(cfgs: Mapping[str, Any], catalog) -> None:
    """Before any work: two variants must not write different edits to one artifact (one would overwrite the other)."""
    seen: dict[str, tuple[str, str]] = {}
    for name, cfg in cfgs.items():
        for ed in metrics_stage.edit_items(cfg, catalog):
            other, key = seen.setdefault(ed.artifact, (name, ed.key.key))
            if other != name and key != ed.key.key:
                raise ConfigError(
                    f"ablation: variants {other!r} and {name!r} write different edits to {ed.artifact}; "
                    "the edit stage must give each variant its own artifact path"
                )


@dataclass
class AblationResult:
    tables: dict[str, Path]  # "metrics" (per edit) and "by_variant" (one row per variant) Parquet files
    rows: list[dict[str, Any]]  # the per-edit rows of every variant
    summaries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant -> stage -> summary
    report: Path | None = None  # index.html when asked for


def run_ablation(
    config_path: str | Path,
    variants: Mapping[str, Mapping[str, Any]] | None,
    stages: Sequence[ModuleType],
    *,
    overrides: Mapping[str, Any] | None = None,
    run_stage: RunStage = run_stage_locally,
    catalog=None,
    report: bool = False,
) -> AblationResult:
    """Run `stages` (in order) under each variant; then write the per-edit and per-variant tables.

    variants: name -> dotted config overrides applied over `overrides`; None: the
    config's own variants (`default_variants`). The metrics stage is appended when `stages`
    lacks it. catalog: the catalog to use (default: refreshed once from the base
    config). Tables go to <workdir>/metrics/ of the base config; with report=True
    the HTML report is written too.
    """
    from tasks.catalog import update_catalog

    base = dict(overrides or {})
    base_cfg = load_config(config_path, base)
    variants = default_variants(base_cfg) if variants is None else variants
    if not variants:
        raise ConfigError("ablation: no variants given (name -> config overrides)")
    if catalog is None:
        catalog = update_catalog(base_cfg)
    mods = list(stages)
    if not any(getattr(m, "STAGE", None) == metrics_stage.STAGE for m in mods):
        mods.append(metrics_stage)
    cfgs = {name: load_config(config_path, {**base, **dict(extra)}) for name, extra in variants.items()}
    _check_distinct_edits(cfgs, catalog)
    store, _ = open_store_and_ledger(base_cfg)
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    for name, cfg in cfgs.items():
        ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
        summaries[name] = {m.STAGE: run_stage(m, cfg, catalog, ledger) for m in mods}
        rows += metrics_stage.metrics_rows(store, metrics_stage.work_items(cfg, catalog))
    tables = metrics_stage.write_metrics_tables(base_cfg, rows)
    index = None
    if report:
        from tasks.report import write_report

        index = write_report(base_cfg, rows)
    return AblationResult(tables=tables, rows=rows, summaries=summaries, report=index)
