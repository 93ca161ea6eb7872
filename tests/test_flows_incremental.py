"""Issue 7: a small grid through every stage (edits included) against the session's Prefect server.

One grid, run in sequence: cold; a no-op rerun; one clip's bytes changed; one stage's
code_version bumped from the config; another stage's code version bumped in code. Each
step asserts exactly which (stage, item) pairs were computed, from the ledger and from
Prefect's task runs.
"""
from __future__ import annotations

import copy
import json
from datetime import datetime, timezone

import pytest
import soundfile as sf
import yaml

from flows.cli import main
from flows.pipeline import pipeline_flow
from flows.status import status
from storage import Ledger
from tasks.catalog import read_catalog
from tasks.config import QUICK_STAGES, load_config
from tasks.grid import source_audio
from tasks.sample_data import write_sample_data

STAGES = ("audio", "frames", "masks", "depth", "latents", "finetune", "inversion", "edit", "metrics")
# Prefect task names of the stage tasks (audio's is "audio-features").
TASK_NAMES = {"audio-features", "frames", "masks", "depth", "latents", "finetune", "inversion", "edit", "metrics"}


@pytest.fixture(scope="module")
def grid(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    data = write_sample_data(root / "data", videos=1, clips=3, seed=5, frames=8)
    stages = copy.deepcopy(QUICK_STAGES)
    stages["inversion"]["steps"] = 4
    stages["finetune"]["steps"] = 4
    config = root / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(root / "work"),
        "catalogs": {"videos": [{"kind": "davis", "root": str(data.davis_root)}],
                     "audio": [{"kind": "esc50", "root": str(data.esc50_root)}]},
        "models": {"preset": "tiny"}, "stages": stages,
    }))
    return config, data


def done_rows(ledger: Ledger) -> set[tuple[str, str, str]]:
    t = ledger.read(status="done")
    return set(zip(t["stage"].to_pylist(), t["item_id"].to_pylist(), t["key"].to_pylist()))


def stage_task_runs(since: datetime) -> list[tuple[str, str]]:
    """(task name, state name) of every stage task run that started after `since`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since)))
    out = []
    for r in runs:
        name = r.name.rsplit("-", 1)[0]
        if name in TASK_NAMES:
            out.append((name, r.state.name if r.state else "?"))
    return out


def run(config, overrides=None):
    """One pipeline run -> (computed (stage, item) pairs from the ledger, stage task runs, summary)."""
    cfg = load_config(config, overrides)
    ledger = Ledger(cfg.ledger_url)
    before = done_rows(ledger)
    since = datetime.now(timezone.utc)
    summary = pipeline_flow(str(config), overrides)
    new = {(s, i) for s, i, _ in done_rows(ledger) - before}
    for stage in STAGES:
        assert summary[stage]["failed"] == {}, (stage, summary[stage]["failed"])
        assert summary[stage]["computed"] == sum(1 for s, _ in new if s == stage), stage
    return new, stage_task_runs(since), summary


def test_incremental_grid(grid, capsys):
    config, data = grid
    cfg = load_config(config)
    # --- cold: every stage computes every item once.
    cold, tasks, summary = run(config)
    cat = read_catalog(cfg.catalog_path)
    video = data.videos[0]
    clips = sorted(cat.by_id("audio"))
    assert len(clips) == 3
    src = source_audio(cfg, cat, video)
    expected_cold = (
        {("catalog", "catalog")} | {("audio", c) for c in clips} | {(s, video) for s in ("frames", "masks", "depth", "latents")}
        | {("finetune", f"{video}/{src}/full"), ("inversion", f"{video}/base")}
        | {("edit", f"{video}/{c}/full") for c in clips} | {("metrics", f"{video}/{c}/full") for c in clips}
    )
    assert cold == expected_cold
    assert {n for n, _ in tasks} == TASK_NAMES and {s for _, s in tasks} == {"Completed"}

    # --- second run: no stage work at all, and no stage task even submitted.
    again, tasks, summary = run(config)
    assert again == set() and tasks == []
    assert all(summary[s]["skipped"] == sum(1 for st, _ in cold if st == s) for s in STAGES)

    # --- one clip's bytes change (not the fine-tuning clip): its features, edit and metrics only.
    changed = next(c for c in clips if c != src)
    entry = read_catalog(cfg.catalog_path).by_id("audio")[changed]
    wav, rate = sf.read(entry["path"], always_2d=True)
    sf.write(entry["path"], wav[::-1] * 0.5, rate)  # same length and format, other sound
    report = status(cfg)
    stale = {(st, it["item"]): it["reasons"] for st, s in report["stages"].items() if st != "catalog"
             for it in s.get("items", [])}
    assert stale == {
        ("audio", changed): ["input content changed"],
        ("edit", f"{video}/{changed}/full"): ["upstream changed: audio"],
        ("metrics", f"{video}/{changed}/full"): ["upstream changed: edit"],
    }
    recomputed, tasks, _ = run(config)
    assert recomputed == {("catalog", "catalog"), ("audio", changed), ("edit", f"{video}/{changed}/full"),
                          ("metrics", f"{video}/{changed}/full")}
    assert sorted(n for n, _ in tasks) == ["audio-features", "edit", "metrics"]

    # --- a config code_version bump (fine-tuning): that stage and everything downstream, nothing upstream.
    bump = {"stages.finetune.code_version": "3"}
    assert main(["status", str(config), "--json", "--set", "stages.finetune.code_version=3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["finetune"]["items"] == [
        {"item": f"{video}/{src}/full", "state": "stale", "reasons": ["code_version 2 -> 3"]}]
    assert {it["item"]: it["reasons"] for it in report["stages"]["edit"]["items"]} == {
        f"{video}/{c}/full": ["upstream changed: finetune"] for c in clips}
    assert report["stages"]["audio"]["stale"] == report["stages"]["inversion"]["stale"] == 0
    recomputed, _, _ = run(config, bump)
    assert recomputed == ({("finetune", f"{video}/{src}/full")} | {("edit", f"{video}/{c}/full") for c in clips}
                          | {("metrics", f"{video}/{c}/full") for c in clips})

    # --- a code change in a video stage (depth's module version): depth and its dependants only.
    from tasks import depth

    old = depth.CODE_VERSION
    depth.CODE_VERSION = old + ".1"
    try:
        recomputed, _, _ = run(config, bump)
    finally:
        depth.CODE_VERSION = old
    assert recomputed == ({("depth", video)} | {("edit", f"{video}/{c}/full") for c in clips}
                          | {("metrics", f"{video}/{c}/full") for c in clips})
