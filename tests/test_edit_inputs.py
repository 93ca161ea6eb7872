"""`audioscenic edit` with hostile inputs: bad output paths and inputs are exit 2 before any work,
rejected inputs never stay in the workdir, long legal names work.

All but the last test stop before the pipeline (catalog scans at most), so they take seconds.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from flows.single_edit import check_output, prepare
from tasks.config import ConfigError
from tests.media_factory import edit_media

QUICK = ["--set", "stages.finetune.steps=2", "--set", "stages.inversion.steps=2"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return edit_media(tmp_path_factory.mktemp("edit-inputs"), clips=2, seed=5)


def _edit(frames, audio, work, out, *extra):
    return main(["edit", "--video", str(frames), "--audio", str(audio), "--workdir", str(work), "-o", str(out), *extra])


def _catalog_errors(work) -> list[dict]:
    issues = json.loads((work / "catalog" / "catalog.issues.json").read_text())
    return [i for i in issues if i["severity"] == "error"]


@pytest.mark.parametrize("case", ["folder", "under_a_file", "name_too_long", "folder_name_too_long", "proc",
                                  "no_access", "no_access_above"])
def test_bad_output_is_exit_2_before_any_work(media, tmp_path, capsys, monkeypatch, case):
    frames, clips = media
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir()
    out, needle = {
        "folder": (tmp_path, "is a folder"),
        "under_a_file": (tmp_path / "file" / "sub" / "e.mp4", f"{tmp_path / 'file'} is not a folder"),
        "name_too_long": (tmp_path / ("e" * 252 + ".mp4"), "is 256 bytes; the filesystem of"),
        "folder_name_too_long": (tmp_path / ("d" * 256) / "e.mp4", "is 256 bytes; the filesystem of"),
        # Not writable even for root (tests here run as root, whom permission bits do not stop):
        # os.access says yes for root, the probe file cannot be created.
        "proc": (Path("/proc/edit.mp4"), "folder /proc is not writable"),
        # Permissions that refuse the user (simulated: as root a chmod would not bind).
        "no_access": (tmp_path / "ro" / "e.mp4", f"folder {tmp_path / 'ro'} is not writable"),
        "no_access_above": (tmp_path / "ro" / "new" / "e.mp4", f"folder {tmp_path / 'ro'} is not writable"),
    }[case]
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(tmp_path / "ro") and real(p, mode, **kw))
    work = tmp_path / "work"
    assert _edit(frames, clips[0], work, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and str(out) in err, err
    assert not work.exists()  # nothing linked, catalogued or computed


def test_check_output_takes_a_writable_new_file(tmp_path):
    assert check_output(tmp_path / "new.mp4") == tmp_path / "new.mp4"
    assert check_output(tmp_path / "a" / "b" / "new.mp4") == tmp_path / "a" / "b" / "new.mp4"  # made on delivery
    assert list(tmp_path.iterdir()) == []  # the check creates nothing (its probe file is gone)
    assert check_output(tmp_path / ("e" * 251 + ".mp4")).name.endswith(".mp4")  # 255 bytes: legal


def test_missing_and_special_inputs_are_exit_2_before_any_work(media, tmp_path, capsys):
    frames, clips = media
    work = tmp_path / "work"
    assert _edit(tmp_path / "absent.mp4", clips[0], work, tmp_path / "o.mp4") == 2
    assert "--video" in (err := capsys.readouterr().err) and "absent.mp4" in err and "no such file" in err
    assert _edit(tmp_path / ("v" * 300), clips[0], work, tmp_path / "o.mp4") == 2
    assert "--video" in (err := capsys.readouterr().err) and "File name too long" in err and err.count("\n") == 1
    assert _edit(frames, "/dev/null", work, tmp_path / "o.mp4") == 2
    assert "--audio '/dev/null': not a regular file or folder" in capsys.readouterr().err
    assert _edit(frames, clips[0], work, tmp_path / "o.mp4", "--variant", "nope") == 2
    assert "--variant 'nope'" in capsys.readouterr().err
    assert not work.exists()


def _bad_audio(tmp_path) -> dict:
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "truncated.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "text.wav").write_text("not audio at all\n")
    (tmp_path / "notes.txt").write_text("no audio extension\n")
    (tmp_path / "a_folder.wav").mkdir()
    return {"empty.wav": "is empty (0 bytes)", "truncated.wav": "cannot be decoded as audio", "text.wav": "is not a recognised audio file",
            "notes.txt": "has no audio file extension", "a_folder.wav": "is a folder, not an audio file"}


def test_a_rejected_input_is_named_and_never_stays_linked(media, tmp_path, capsys):
    frames, _ = media
    work = tmp_path / "work"
    for name, reason in _bad_audio(tmp_path).items():
        assert _edit(frames, tmp_path / name, work, tmp_path / "o.mp4") == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name}: cannot be used as audio: {reason}" in err and err.count("\n") == 1, err
        assert sorted(p.name for p in (work / "inputs" / "audio").iterdir()) == []  # unlinked before the error
        assert _catalog_errors(work) == []
    assert not (work / "store.zarr").exists()  # no stage ran


def test_frame_folder_messages_name_the_frame(media, tmp_path, capsys):
    frames, clips = media
    work = tmp_path / "work"
    corrupt, mixed = tmp_path / "corrupt", tmp_path / "mixed"
    shutil.copytree(frames, corrupt)
    shutil.copytree(frames, mixed)
    (corrupt / "00003.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (64, 48)).save(mixed / "00005.jpg")
    assert _edit(corrupt, clips[0], work, tmp_path / "o.mp4") == 2
    assert f"{corrupt}: cannot be used as video: frame 00003.jpg is not a readable image" in capsys.readouterr().err
    assert _edit(mixed, clips[0], work, tmp_path / "o.mp4") == 2
    assert (f"{mixed}: cannot be used as video: frame 00005.jpg has size 64x48, other frames are 128x96"
            in capsys.readouterr().err)
    assert list((work / "inputs" / "video").iterdir()) == []


def test_a_workdir_poisoned_by_an_earlier_version_is_cleaned(media, tmp_path):
    frames, clips = media
    work = tmp_path / "work"
    bad = _bad_audio(tmp_path)
    # Earlier versions left rejected inputs linked; every later edit then met them again.
    (work / "inputs" / "audio").mkdir(parents=True)
    (work / "inputs" / "video").mkdir(parents=True)
    for name in bad:
        os.symlink(tmp_path / name, work / "inputs" / "audio" / name)
    os.symlink(frames.parent, work / "inputs" / "video" / "not-frames")  # a folder of folders, no frames
    in_flight = work / "inputs" / "audio" / f".x.wav.{'0' * 32}.tmp"  # another edit's link, not yet renamed
    os.symlink(clips[0], in_flight)
    # Long legal names (244 and 240 characters): ids are capped, every derived file name fits.
    long_audio = tmp_path / ("a" * 240 + ".wav")
    shutil.copy(clips[1], long_audio)
    long_video = tmp_path / ("v" * 240)
    shutil.copytree(frames, long_video)
    job = prepare(str(long_video), str(long_audio), workdir=str(work), source_audio=str(clips[0]))
    assert sorted(p.name for p in (work / "inputs" / "audio").iterdir()) == sorted(
        [long_audio.name, clips[0].name, in_flight.name])
    assert [p.name for p in (work / "inputs" / "video").iterdir()] == [long_video.name]
    assert _catalog_errors(work) == []
    assert job.config_path.is_file() and len(job.config_path.name.encode()) <= 200
    assert len(job.audio_id) <= 96 and len(job.video_id) <= 96


def test_set_values_are_checked_for_edit_too(media, tmp_path, capsys):
    frames, clips = media
    with pytest.raises(SystemExit) as e:
        _edit(frames, clips[0], tmp_path / "work", tmp_path / "o.mp4", "--set", "models.seed=&a 1")
    assert e.value.code == 2 and "anchors or aliases" in capsys.readouterr().err


def test_prepare_errors_are_config_errors(media, tmp_path):
    frames, _ = media
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.wav: cannot be used as audio: is empty"):
        prepare(str(frames), str(tmp_path / "empty.wav"), workdir=str(tmp_path / "w"))


def test_an_edit_after_a_rejected_input_succeeds_with_a_long_name(prefect_server, media, tmp_path, capsys):
    """The issue's case: a rejected input, then a good edit in that workdir (with a 244-character
    input name) exits 0 and says nothing about the rejected file."""
    frames, clips = media
    work = tmp_path / "work"
    (tmp_path / "zero.wav").write_bytes(b"")
    assert _edit(frames, tmp_path / "zero.wav", work, tmp_path / "never.mp4", *QUICK) == 2
    capsys.readouterr()
    long_audio = tmp_path / ("b" * 240 + ".wav")
    shutil.copy(clips[0], long_audio)
    out = tmp_path / "out" / ("c" * 240 + ".mp4")  # a long output name too: its temporary name must fit
    out.parent.mkdir()
    assert _edit(frames, long_audio, work, out, *QUICK) == 0
    captured = capsys.readouterr()
    assert "zero.wav" not in captured.out + captured.err
    assert "0 left out" in captured.out and f"edit: {out}" in captured.out  # the catalog met no bad input
    assert _catalog_errors(work) == []
    assert out.stat().st_size > 0
    assert [p.name for p in (work / "inputs" / "audio").iterdir()] == [long_audio.name]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
