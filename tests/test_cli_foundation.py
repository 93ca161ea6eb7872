"""The CLI and the pipeline flow against the session's Prefect server."""
import json

import pytest

from flows.cli import main
from storage import Ledger


def test_sample_data_cli(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "d"), "--videos", "1", "--clips", "2", "--frames", "3"]) == 0
    assert (tmp_path / "d/davis/JPEGImages/480p/ball/00002.jpg").exists()
    assert len(list((tmp_path / "d/esc50/audio").glob("*.wav"))) == 2


def test_demo_builds_catalog_and_ledger_once(prefect_server, tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "catalog: 2 videos, 4 clips, 0 left out" in out
    assert str(work / "store.zarr") in out and str(work / "demo.yaml") in out
    led = Ledger(work / "ledger")
    assert led.read(stage="catalog").num_rows == 1
    # A second run with nothing changed records nothing new.
    assert main(["run", str(work / "demo.yaml")]) == 0
    assert led.read(stage="catalog").num_rows == 1
    # A changed clip changes the catalog key: one new row.
    clip = sorted((work / "data/esc50/audio").glob("*.wav"))[0]
    clip.write_bytes(clip.read_bytes()[:-2] + b"\x01\x02")
    assert main(["run", str(work / "demo.yaml")]) == 0
    assert led.read(stage="catalog").num_rows == 2
    capsys.readouterr()
    assert main(["status", str(work / "demo.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["catalog"]["videos"] == 2 and report["stages"]["catalog"]["audio"] == 4


def test_run_refuses_bad_config(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("stages: {audio: {temperature: 0}}\n")
    assert main(["run", str(bad)]) == 2
    assert "stages.audio.temperature" in capsys.readouterr().err


def test_paper_config_refused_without_weights(capsys):
    from tests.test_config import REPO

    assert main(["run", str(REPO / "configs" / "paper.yaml")]) == 2
    assert "models.paths.imagebind" in capsys.readouterr().err
