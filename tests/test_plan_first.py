"""Issue 16: plan first. A run with nothing to do answers from the ledger, with no Prefect and no model library;
planning and status import no torch.

The "done" workdir is made without running the models: every stage's work items are
recorded done in the ledger under their keys (what a finished run leaves), and the
report stamp names a report that exists. The CLI then runs in a fresh interpreter, so
what it imports is its own doing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from flows.preflight import answer_without_prefect, items_digest, preflight, write_report_stamp
from flows.stages import stage_modules
from storage import Ledger
from storage.state import open_state, using
from tasks.catalog import read_catalog, update_catalog
from tasks.config import QUICK_STAGES, load_config
from tasks.sample_data import write_sample_data
from tests.conftest import REPO

HEAVY = ("torch", "diffusers", "transformers", "torchaudio", "prefect", "zarr")


def record_all_done(cfg) -> dict[str, int]:
    """Ledger rows 'done' for every work item of every stage, and a report stamp: a finished run's traces."""
    update_catalog(cfg)
    catalog = read_catalog(cfg.catalog_path)
    state = open_state(cfg.workdir)
    ledger = Ledger(cfg.ledger_url)
    counts, digest = {}, None
    with using(state):
        for mod in stage_modules():
            items = mod.work_items(cfg, catalog)
            counts[mod.STAGE] = len(items)
            ledger.append([dict(stage=it.stage, item_id=it.item_id, key=it.key.key, code_version=it.key.code_version,
                                params_hash=it.key.params_hash, inputs_hash=it.key.inputs_hash,
                                upstream_keys=it.key.upstream_json()) for it in items])
            if mod.STAGE == "metrics":
                digest = items_digest(items)
    state.save()
    index = cfg.workdir / "report" / "index.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("<html></html>")
    write_report_stamp(cfg, catalog, digest, {"report": str(index)})
    return counts


@pytest.fixture()
def done(tmp_path):
    data = write_sample_data(tmp_path / "data", videos=1, clips=2, seed=4, frames=4)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "work"),
        "catalogs": {"videos": [{"kind": "davis", "root": str(data.davis_root)}],
                     "audio": [{"kind": "esc50", "root": str(data.esc50_root)}]},
        "models": {"preset": "tiny"}, "stages": QUICK_STAGES,
    }))
    cfg = load_config(config)
    return config, cfg, record_all_done(cfg), data


def cli(args: list[str], tmp_path) -> tuple[int, str, list[str]]:
    """`audioscenic ARGS` in a fresh interpreter -> (exit code, stdout, heavy modules it imported)."""
    code = (
        "import json, sys\n"
        "from flows.cli import main\n"
        f"rc = main({args!r})\n"
        f"print('@@' + json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out, _, tail = p.stdout.rpartition("@@")
    result = json.loads(tail)
    return result["rc"], out, result["heavy"]


def test_noop_run_answers_without_prefect_or_models(done, tmp_path):
    config, cfg, counts, _ = done
    fragments = sorted(Ledger(cfg.ledger_url).fragment_paths())
    rc, out, heavy = cli(["run", str(config)], tmp_path)
    assert rc == 0
    assert heavy == []  # no Prefect (so no server, temporary or not), no torch, no zarr
    for stage, n in counts.items():
        assert f"{stage}: 0 computed, {n} already done, 0 failed" in out
    assert "catalog: 1 videos, 2 clips, 0 left out" in out and "report: " in out
    assert not (tmp_path / "prefect-home").exists()  # Prefect never even set up its home
    assert sorted(Ledger(cfg.ledger_url).fragment_paths()) == fragments  # nothing recorded


def test_status_imports_no_model_library(done, tmp_path):
    config, _, counts, _ = done
    rc, out, heavy = cli(["status", str(config), "--json"], tmp_path)
    assert rc == 0 and heavy == []
    report = json.loads(out)
    for stage, n in counts.items():
        assert {k: report["stages"][stage][k] for k in ("done", "stale", "missing", "failed")} == \
            {"done": n, "stale": 0, "missing": 0, "failed": 0}, stage


def test_any_work_left_goes_to_the_flow(done):
    config, cfg, _, data = done
    assert preflight(cfg).nothing_to_do and answer_without_prefect(cfg) is not None
    # A changed clip: its features, edits and metrics are stale, and the catalog changes.
    clip = sorted((data.esc50_root / "audio").glob("*.wav"))[1]
    clip.write_bytes(clip.read_bytes()[:-2] + b"\x05\x06")
    pf = preflight(cfg)
    assert not pf.nothing_to_do and answer_without_prefect(cfg) is None
    assert "catalog changed" in pf.why and "audio: 1 to do" in pf.why
    clip.write_bytes(clip.read_bytes()[:-2] + b"\x00\x00")
    # A failed item is work too.
    from tasks import depth

    item = depth.work_items(cfg, read_catalog(cfg.catalog_path))[0]
    Ledger(cfg.ledger_url).append([dict(stage="depth", item_id=item.item_id, key=item.key.key,
                                        status="failed", error="boom")])
    assert "depth: 1 to do" in preflight(cfg).why


def test_planned_keys_are_cached_and_never_trusted_blindly(done, monkeypatch):
    """status/preflight keep every stage's keys in the workdir while config, catalog and code are unchanged."""
    from flows import plancache
    from flows.status import status
    from tasks import depth

    config, cfg, counts, _ = done
    assert preflight(cfg).nothing_to_do
    cache = cfg.workdir / ".audioscenic" / "plan.parquet"
    assert cache.exists()
    built = []
    real = plancache.rows_of
    monkeypatch.setattr(plancache, "rows_of", lambda items: built.append(1) or real(items))
    assert preflight(cfg).nothing_to_do and built == []  # answered from the cache
    # A config change, a code version changed at run time, a damaged cache: each rebuilds the keys.
    bumped = load_config(config, {"stages.edit.guidance_scale": 3.0})
    report = status(bumped)["stages"]
    assert report["edit"]["stale"] == counts["edit"] and built
    assert {tuple(i["reasons"]) for i in report["edit"]["items"]} == {("parameters changed",)}
    built.clear()
    report = status(bumped)["stages"]  # the second time from the cache, reasons included
    assert built == [] and {tuple(i["reasons"]) for i in report["metrics"]["items"]} == {("upstream changed: edit",)}
    monkeypatch.setattr(depth, "CODE_VERSION", depth.CODE_VERSION + ".1")
    assert "depth: 1 to do" in preflight(cfg).why and built
    monkeypatch.undo()
    built.clear()
    monkeypatch.setattr(plancache, "rows_of", lambda items: built.append(1) or real(items))
    cache.write_bytes(b"PAR1 torn")
    assert preflight(cfg).nothing_to_do and built


def test_report_must_match_the_config_and_exist(done):
    config, cfg, _, _ = done
    assert preflight(cfg).nothing_to_do
    # A smaller selection whose edits are all done still redraws the report (other rows).
    clip = sorted(read_catalog(cfg.catalog_path).by_id("audio"))[0]
    video = sorted(read_catalog(cfg.catalog_path).by_id("video"))[0]
    sub = load_config(config, {"grid.subsets": {"one": {"pairs": [[video, clip]]}}, "grid.selection": "one"})
    pf = preflight(sub)
    assert all(state == "done" for entries in pf.stages.values() for _, state, _ in entries)
    assert pf.why == ["report not written for this state"]
    (cfg.workdir / "report" / "index.html").unlink()
    assert preflight(cfg).why == ["report not written for this state"]
