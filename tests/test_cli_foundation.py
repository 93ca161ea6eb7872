"""The CLI and the pipeline flow against the session's Prefect server."""
import json

import pytest

from flows.cli import main
from storage import Ledger
from tests.diffusion_factory import one_thread  # noqa: F401  (autouse: tiny models, one torch thread)


def test_sample_data_cli(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "d"), "--videos", "1", "--clips", "2", "--frames", "3"]) == 0
    assert (tmp_path / "d/davis/JPEGImages/480p/ball/00002.jpg").exists()
    assert len(list((tmp_path / "d/esc50/audio").glob("*.wav"))) == 2


@pytest.mark.heavy(450)
def test_demo_builds_catalog_and_ledger_once(prefect_server, tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "catalog: 2 videos, 4 clips, 0 left out" in out
    assert str(work / "store.zarr") in out and str(work / "demo.yaml") in out
    led = Ledger(work / "ledger")
    assert led.read(stage="catalog").num_rows == 1
    assert led.read(stage="audio").num_rows == 4
    # A second run with nothing changed records nothing new.
    assert main(["run", str(work / "demo.yaml")]) == 0
    assert "audio: 0 computed, 4 already done, 0 failed" in capsys.readouterr().out
    assert led.read(stage="catalog").num_rows == 1
    assert led.read(stage="audio").num_rows == 4
    # A changed clip changes the catalog key (one new row) and that clip's features only.
    clip = sorted((work / "data/esc50/audio").glob("*.wav"))[0]
    clip.write_bytes(clip.read_bytes()[:-2] + b"\x01\x02")
    assert main(["run", str(work / "demo.yaml")]) == 0
    assert "audio: 1 computed, 3 already done, 0 failed" in capsys.readouterr().out
    assert led.read(stage="catalog").num_rows == 2
    assert led.read(stage="audio", item_ids=[clip.stem]).num_rows == 2
    assert led.read(stage="audio").num_rows == 5
    capsys.readouterr()
    assert main(["status", str(work / "demo.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["catalog"]["videos"] == 2 and report["stages"]["catalog"]["audio"] == 4
    assert {k: report["stages"]["audio"][k] for k in ("done", "stale", "missing", "failed")} == \
        {"done": 4, "stale": 0, "missing": 0, "failed": 0}
    # A parameter change makes every clip stale, and status says why.
    assert main(["status", str(work / "demo.yaml"), "--json", "--set", "stages.audio.n_mels=64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["audio"]["stale"] == 4
    assert {tuple(i["reasons"]) for i in report["stages"]["audio"]["items"]} == {("parameters changed",)}
    # The temperature shapes each edit's M_a, derived from the stored features: fine-tuning and
    # edits go stale, the audio stage does not.
    assert main(["status", str(work / "demo.yaml"), "--json", "--set", "stages.audio.temperature=0.5"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    # 2 videos x 2 trained variants (w/o SceneMasker edits with the full method's weights); 2 x 4 clips x 3 variants
    assert (stages["audio"]["stale"], stages["finetune"]["stale"], stages["edit"]["stale"]) == (0, 4, 24)


def test_run_refuses_bad_config(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("stages: {audio: {temperature: 0}}\n")
    assert main(["run", str(bad)]) == 2
    assert "stages.audio.temperature" in capsys.readouterr().err


def test_paper_config_refused_without_weights(capsys):
    from tests.test_config import REPO

    assert main(["run", str(REPO / "configs" / "paper.yaml")]) == 2
    assert "models.paths.imagebind" in capsys.readouterr().err
