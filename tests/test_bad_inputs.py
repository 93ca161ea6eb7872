"""The bad-input catalogue, through a whole grid run: each bad item is named, the rest finishes."""
import csv
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import yaml

from flows.cli import main
from storage import Ledger
from tasks.sample_data import write_sample_data
from tests.media_factory import PIPELINE_TEST_STAGES, write_mp3


def make_bad_dataset(root):
    data = write_sample_data(root / "data", videos=3, clips=4, seed=11, frames=8)
    audio = data.esc50_root / "audio"
    names = sorted(p.name for p in audio.iterdir())
    rows = list(csv.reader(open(data.esc50_root / "meta" / "esc50.csv")))
    bad = {
        "empty": "1-9000001-A-10.wav",
        "corrupt": "1-9000002-A-10.wav",
        "nan": "1-9000003-A-10.wav",
        "mp3_named_wav": "1-9000004-A-10.wav",
    }
    (audio / bad["empty"]).write_bytes(b"")
    (audio / bad["corrupt"]).write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(audio / bad["nan"], x, 16000, subtype="FLOAT")
    write_mp3(audio / bad["mp3_named_wav"])
    for f in bad.values():
        rows.append([f, 1, 10, "rain", "True", f.split("-")[1], "A"])
    rows.append(["missing-clip.wav", 1, 10, "rain", "True", "x", "A"])
    rows.append(["../../escape.wav", 1, 10, "rain", "True", "y", "A"])
    with open(data.esc50_root / "meta" / "esc50.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)

    frames = data.davis_root / "JPEGImages" / "480p"
    anns = data.davis_root / "Annotations" / "480p"
    # A 1-frame video.
    shutil.copytree(frames / data.videos[0], frames / "single")
    for p in sorted((frames / "single").iterdir())[1:]:
        p.unlink()
    # An unreadable JPEG inside a sequence.
    (frames / data.videos[1] / "00004.jpg").write_bytes(b"\xff\xd8\xff garbage")
    # A non-UTF-8 sequence name.
    os.rename(bytes(frames / data.videos[2]), bytes(frames) + b"/seq\xff")
    # A path-traversal-looking sequence name is just a name: it gets a safe id.
    shutil.copytree(frames / data.videos[0], frames / "..dots..")
    shutil.copytree(anns / data.videos[0], anns / "..dots..")
    return data, names, bad


@pytest.mark.heavy(80)
def test_grid_with_bad_inputs_finishes_the_rest(prefect_server, tmp_path, capsys):
    data, good_clips, bad = make_bad_dataset(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "work"),
        "catalogs": {"videos": [{"kind": "davis", "root": str(data.davis_root)}],
                     "audio": [{"kind": "esc50", "root": str(data.esc50_root)}]},
        # 8-frame edits (span "frames"): a 1-frame video is then too short, a bad input
        "models": {"preset": "tiny"}, "stages": {**PIPELINE_TEST_STAGES, "video": {**PIPELINE_TEST_STAGES["video"], "span": "frames"}},
    }))
    code = main(["run", str(config)])
    out = capsys.readouterr().out
    assert code == 1  # finished, with failures named
    issues = (tmp_path / "work" / "catalog" / "catalog.issues.json").read_text()
    for needle in (bad["empty"], bad["corrupt"], "missing-clip.wav", "../../escape.wav", data.videos[1], "seq\\\\xff"):
        assert needle in issues, needle
    assert "00004.jpg" in issues
    # NaN audio is caught by the audio stage, naming the file.
    assert bad["nan"].removesuffix(".wav") in out and "NaN" in out
    ledger = Ledger(tmp_path / "work" / "ledger")
    done = set(ledger.read(stage="audio", status="done")["item_id"].to_pylist())
    assert done == {n.removesuffix(".wav") for n in good_clips} | {bad["mp3_named_wav"].removesuffix(".wav")}
    from tasks.catalog import read_catalog

    videos = {e["id"] for e in read_catalog(tmp_path / "work" / "catalog" / "catalog.parquet").entries if e["media"] == "video"}
    assert videos == {data.videos[0], "single", "dots"}  # '..dots..' kept under a safe id
    # The 1-frame video fails the frames stage, naming itself and the counts; the others go on.
    (single,) = ledger.read(stage="frames", status="failed").to_pylist()
    assert single["item_id"] == "single" and "has 1 frame" in single["error"]
    assert "single" in out
    for stage in ("frames", "masks", "depth", "latents"):
        assert set(ledger.read(stage=stage, status="done")["item_id"].to_pylist()) == {data.videos[0], "dots"}, stage
