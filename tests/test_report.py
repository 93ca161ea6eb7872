"""Ablation over the demo grid (upstream stages once, one table row per variant) and the HTML report.

Every stage is the real one (fine-tuning, inversion and editing included) on tiny
presets at 32 px with 4 DDIM and 4 fine-tuning steps: random weights, so the figures
mean nothing, but every path a user's ablation takes is taken.
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
from flows.pipeline import ablation_flow
from scripts import check_report
from storage import Ledger, StageKey
from tasks import audio, depth, frames, inversion, latents, masks, metrics
from tasks.ablation import run_ablation
from tasks.catalog import Catalog
from tasks.config import ConfigError, load_config
from tasks.stage import WorkItem

REPO = Path(__file__).resolve().parents[1]

UPSTREAM = [audio, frames, masks, depth, latents, inversion]  # the same keys under every variant
# The config's default variants: the method and its five ablations (the paper's Table 2, plus the
# Magnitude Modulator and the Frequency Fuser outside SceneMasker).
VARIANTS = ["full", "no_tasi", "no_scene_masker", "no_frequency_fuser", "no_magnitude_modulator",
            "unmasked_frequency_fuser"]
EDITS = 2 * 4 * len(VARIANTS)


def run_ablation_flow(path: Path) -> types.SimpleNamespace:
    """`audioscenic ablation`'s flow; its tables read back at once (a later run rewrites the same files)."""
    out = ablation_flow(str(path))
    tables = {k: Path(v) for k, v in out["tables"].items()}
    return types.SimpleNamespace(summaries=out["summaries"], tables=tables, report=Path(out["report"]),
                                 by_variant=metrics.read_table(tables["by_variant"]),
                                 per_edit=metrics.read_table(tables["metrics"]))


@pytest.fixture(scope="module")
def ablation(prefect_server, sample_data, tmp_path_factory):
    """The demo config on the session's sample data (2 videos x 4 clips, 8 frames), 32 px, four variants."""
    work = tmp_path_factory.mktemp("ablation")
    cfg = demo_config(work)
    cfg["models"] = {"preset": "tiny"}  # the report's mechanics, not the toy preset's figures
    cfg.pop("grid")
    cfg["catalogs"] = {"videos": [{"kind": "davis", "root": str(sample_data.davis_root)}],
                       "audio": [{"kind": "esc50", "root": str(sample_data.esc50_root)}]}
    cfg["stages"] = {"video": {"resolution": 32, "mask_source": "dataset"}, "inversion": {"steps": 4},
                     "finetune": {"steps": 4}}
    cfg["report"] = {"thumb": 48}
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = run_ablation_flow(path)
    again = run_ablation_flow(path)
    return load_config(path), first, again


@pytest.mark.heavy(100)
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
    # "w/o SceneMasker" and the unmasked Frequency Fuser train exactly what "full" trains (the
    # mask plays no part in fine-tuning): they reuse full's fine-tuned weights.
    assert [first.summaries[v]["finetune"]["computed"] for v in VARIANTS] == [2, 2, 0, 2, 2, 0]
    assert len(first.per_edit) == EDITS
    edits = EDITS // len(VARIANTS)
    for stage in ("edit", "metrics"):
        rows = ledger.read(stage=stage).to_pylist()
        assert len(rows) == edits * len(VARIANTS) and {r["variant"] for r in rows} == set(VARIANTS)


def test_one_table_row_per_variant_in_table_2_order(ablation):
    cfg, first, _ = ablation
    table = first.by_variant
    assert [r["variant_name"] for r in table] == [
        "w/o TASI", "w/o SceneMasker", "w/o Frequency Fuser", "Frequency Fuser unmasked",
        "w/o Magnitude Modulator", "Ours"]
    assert all(r["edits"] == 8 for r in table)
    # Each variant's row is the mean of its own edits' rows.
    per_edit = first.per_edit
    for r in table:
        own = [e["masked_ssim"] for e in per_edit if e["variant"] == r["variant"]]
        assert r["masked_ssim"] == pytest.approx(sum(own) / len(own))
    # Different switches give different edits (no variant silently reuses another's).
    assert len({round(r["masked_ssim"], 9) for r in table}) == len(table)
    # The unmasked Frequency Fuser shares full's fine-tuned model: its edits differ only because
    # it sets its own edit-only switch on that model (they were identical when the edit stage
    # built the model from the training config alone).
    from tasks import edit as edit_stage
    from tasks.catalog import read_catalog
    from tasks.stage_task import open_store_and_ledger

    catalog, store = read_catalog(cfg.catalog_path), open_store_and_ledger(cfg)[0]

    def edit_latents(variant):
        c = load_config(Path(cfg.workdir) / "demo.yaml", {"stages.finetune.variants": [variant]})
        return {(i.video_id, i.audio_id): store.read(i.artifact, i.key.key)["latents"]
                for i in edit_stage.work_items(c, catalog)}

    full, unmasked = edit_latents("full"), edit_latents("unmasked_frequency_fuser")
    assert set(full) == set(unmasked) and len(full) == EDITS // len(VARIANTS)
    assert all(abs(full[k] - unmasked[k]).max() > 1e-6 for k in full)
    assert len(per_edit) == EDITS and all(r["temp_s"] == pytest.approx(r["clip_f"] * r["clip_t"]) for r in per_edit)


def test_a_second_ablation_run_does_no_stage_work(ablation):
    _, first, again = ablation
    for variant, stages in again.summaries.items():
        for stage, s in stages.items():
            assert s["computed"] == 0 and s["skipped"] == s["planned"]["done"] > 0, (variant, stage)
    assert again.by_variant == first.by_variant and again.per_edit == first.per_edit


def test_ablation_refuses_variants_that_would_overwrite_each_others_edits(ablation, monkeypatch):
    cfg, _, _ = ablation

    def work_items(c, catalog):  # an edit stage that leaves the variant out of its artifact path
        key = StageKey.build("edit", "1", {"variants": c.stages.finetune.variants})
        return [WorkItem("edit", "ball/x", "edits/ball/x/same", key, video_id="ball", audio_id="x")]

    monkeypatch.setattr(metrics, "edit_module", lambda: types.SimpleNamespace(work_items=work_items))
    with pytest.raises(ConfigError, match="write different edits to edits/ball/x/same"):
        run_ablation(Path(cfg.workdir) / "demo.yaml", None, [], catalog=Catalog())  # the config's six variants


def test_report_folder_is_self_contained(ablation):
    _, first, _ = ablation
    root = first.report.parent
    page = first.report.read_text()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["missing"] == [] and len(manifest["videos"]) == EDITS
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
    assert summary["videos"] == EDITS and summary["tables"]["table-by-variant"] == len(VARIANTS) and shot.stat().st_size > 1000

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
