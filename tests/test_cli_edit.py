"""`audioscenic edit --video V --audio A -o OUT.mp4`: one pair through the whole pipeline."""
from __future__ import annotations

from fractions import Fraction

import av
import pytest

from flows.cli import main
from storage import Ledger
from tests.media_factory import edit_media

QUICK = ["--set", "stages.finetune.steps=4", "--set", "stages.inversion.steps=4"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return edit_media(tmp_path_factory.mktemp("edit-media"), clips=3, seed=2)


def read_mp4(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        return frames, Fraction(v.average_rate), float(a.duration * a.time_base), a.rate


def test_edit_writes_the_mp4_and_reuses_the_video_stages(prefect_server, media, tmp_path, capsys):
    frames, clips = media
    work = tmp_path / "single"
    out = tmp_path / "out" / "first.mp4"
    args = ["edit", "--video", str(frames), "--audio", str(clips[1]), "--source-audio", str(clips[0]),
            "--workdir", str(work), "-o", str(out), *QUICK]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"edit: {out}" in printed
    n, fps, seconds, rate = read_mp4(out)
    # 8 frames at DAVIS' 24 fps; the clip's sound trimmed to the video's 1/3 s (AAC frames: ~23 ms at 44.1 kHz).
    assert n == 8 and fps == 24
    assert abs(seconds - 8 / 24) < 0.03, seconds

    # A second clip with the same fine-tuning clip: only that clip's features, edit and metrics are new.
    ledger = Ledger(work / "ledger")
    before = ledger.read(status="done").num_rows
    second = tmp_path / "out" / "second.mp4"
    assert main(["edit", "--video", str(frames), "--audio", str(clips[2]), "--source-audio", str(clips[0]),
                 "--workdir", str(work), "-o", str(second), *QUICK]) == 0
    new = ledger.read(status="done").to_pylist()[before:]
    assert sorted((r["stage"], r["item_id"]) for r in new if r["stage"] != "catalog") == [
        ("audio", clips[2].stem), ("edit", f"{frames.name}/{clips[2].stem}/full"),
        ("metrics", f"{frames.name}/{clips[2].stem}/full")]
    assert read_mp4(second)[0] == 8


def test_edit_refuses_bad_inputs_by_name(media, tmp_path, capsys):
    frames, clips = media
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = tmp_path / "never.mp4"
    assert main(["edit", "--video", str(frames), "--audio", str(broken), "--workdir", str(tmp_path / "w"),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.wav" in err and "cannot be used as audio" in err
    assert main(["edit", "--video", str(tmp_path / "absent.mp4"), "--audio", str(clips[0]), "-o", str(out)]) == 2
    assert "absent.mp4" in capsys.readouterr().err
    assert not out.exists()
