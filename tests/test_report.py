"""Ablation over the demo grid (upstream stages once, one table row per variant) and the HTML report.

The edit stage here is tests.metrics_factory's stand-in (synthetic edits and MP4s);
every other stage is the real one on tiny presets.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from flows.cli import demo_config
from scripts import check_report
from storage import Ledger, StageKey
from tasks import audio, depth, frames, latents, masks, metrics
from tasks.ablation import run_ablation
from tasks.catalog import Catalog
from tasks.config import ConfigError, load_config
from tasks.stage import WorkItem
from tests import metrics_factory

REPO = Path(__file__).resolve().parents[1]

UPSTREAM = [audio, frames, masks, depth, latents]
# Four of the config's default variants, one run each (tasks.ablation.default_variants' form).
VARIANTS = {v: {"stages.finetune.variants": [v]} for v in ("full", "no_tasi", "no_scene_masker", "no_frequency_fuser")}


@pytest.fixture(scope="module")
def ablation(sample_data, tmp_path_factory):
    """The demo config on the session's sample data (2 videos x 4 clips, 8 frames), 32 px, four variants."""
    work = tmp_path_factory.mktemp("ablation")
    cfg = demo_config(work)
    cfg["catalogs"] = {"videos": [{"kind": "davis", "root": str(sample_data.davis_root)}],
                       "audio": [{"kind": "esc50", "root": str(sample_data.esc50_root)}]}
    cfg["stages"] = {"video": {"resolution": 32, "mask_source": "dataset"}}
    cfg["report"] = {"thumb": 48}
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "edit_module", lambda: metrics_factory)
        stages = [*UPSTREAM, metrics_factory.module()]
        first = run_ablation(path, VARIANTS, stages, report=True)
        again = run_ablation(path, VARIANTS, stages)
    return load_config(path), first, again


def test_upstream_stages_run_once_across_variants(ablation):
    cfg, first, _ = ablation
    ledger = Ledger(cfg.ledger_url)
    for mod in UPSTREAM:
        rows = ledger.read(stage=mod.STAGE).to_pylist()
        ids = [r["item_id"] for r in rows]
        assert len(ids) == len(set(ids)) > 0, f"{mod.STAGE} ran more than once for an item"
        assert all(r["status"] == "done" for r in rows)
        computed = [first.summaries[v][mod.STAGE]["computed"] for v in VARIANTS]
        assert computed == [len(ids)] + [0] * (len(VARIANTS) - 1), mod.STAGE
    edits = len(first.rows) // len(VARIANTS)
    assert edits == 2 * 4
    for stage in ("edit", "metrics"):
        rows = ledger.read(stage=stage).to_pylist()
        assert len(rows) == edits * len(VARIANTS) and {r["variant"] for r in rows} == set(VARIANTS)


def test_one_table_row_per_variant_in_table_2_order(ablation):
    _, first, _ = ablation
    table = metrics.read_table(first.tables["by_variant"])
    assert [r["variant_name"] for r in table] == ["w/o TASI", "w/o SceneMasker", "w/o Frequency Fuser", "Ours"]
    assert all(r["edits"] == 8 for r in table)
    by = {r["variant"]: r for r in table}
    # The stand-in edits keep the foreground except without SceneMasker: SSIM shows it.
    assert by["no_scene_masker"]["masked_ssim"] < by["full"]["masked_ssim"]
    per_edit = metrics.read_table(first.tables["metrics"])
    assert len(per_edit) == 32 and all(r["temp_s"] == pytest.approx(r["clip_f"] * r["clip_t"]) for r in per_edit)


def test_a_second_ablation_run_does_no_stage_work(ablation):
    _, first, again = ablation
    for variant, stages in again.summaries.items():
        for stage, s in stages.items():
            assert s["computed"] == 0 and s["skipped"] == s["planned"]["done"] > 0, (variant, stage)
    assert metrics.read_table(again.tables["by_variant"]) == metrics.read_table(first.tables["by_variant"])


def test_ablation_refuses_variants_that_would_overwrite_each_others_edits(ablation, monkeypatch):
    cfg, _, _ = ablation

    def work_items(c, catalog):  # an edit stage that leaves the variant out of its artifact path
        key = StageKey.build("edit", "1", {"variants": c.stages.finetune.variants})
        return [WorkItem("edit", "ball/x", "edits/ball/x/same", key, video_id="ball", audio_id="x")]

    monkeypatch.setattr(metrics, "edit_module", lambda: types.SimpleNamespace(work_items=work_items))
    with pytest.raises(ConfigError, match="write different edits to edits/ball/x/same"):
        run_ablation(Path(cfg.workdir) / "demo.yaml", None, [], catalog=Catalog())  # the config's five variants


def test_report_folder_is_self_contained(ablation):
    _, first, _ = ablation
    root = first.report.parent
    page = first.report.read_text()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["missing"] == [] and len(manifest["videos"]) == 32
    assert set(manifest["tables"]) <= set(re.findall(r'<table id="([^"]+)"', page))
    assert check_report.static_problems(root, manifest) == []
    assert all((root / v).is_file() for v in manifest["videos"])
    for label in ("rain", "crackling fire", "sea waves", "chirping birds"):
        assert label in page  # each edit row names its clip's class


@pytest.mark.skipif(check_report.find_browser() is None, reason="chromium is not installed (CI installs it)")
def test_report_renders_in_headless_chromium(ablation, tmp_path):
    _, first, _ = ablation
    root = first.report.parent
    shot = tmp_path / "report.png"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_report.py"), str(root), "--no-install",
                        "--screenshot", str(shot)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["videos"] == 32 and summary["tables"]["table-by-variant"] == 4 and shot.stat().st_size > 1000

    # The same check fails on a broken image, a missing video and a missing table.
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    img = broken / manifest["images"][0]
    img.write_bytes(img.read_bytes()[:200])
    (broken / manifest["videos"][0]).unlink()
    page = (broken / "index.html").read_text()
    (broken / "index.html").write_text(re.sub(r'<table id="table-by-variant">.*?</table>', "", page, flags=re.DOTALL))
    code, summary = check_report.check(broken, tmp_path / "broken.png", install=False)
    problems = "\n".join(summary["problems"])
    assert code == 1
    assert f"broken image '{manifest['images'][0]}'" in problems
    assert f"video '{manifest['videos'][0]}' does not play" in problems
    assert "table 'table-by-variant' is not in the page" in problems
