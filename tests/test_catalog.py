import csv
import json
import os

import numpy as np
import pytest

from tasks.catalog import build_catalog, read_catalog, scan_davis, scan_esc50, write_catalog
from tasks.ids import sanitize_id, unique_ids
from tasks.media import MediaError, sniff_audio_format
from tasks.sample_data import write_sample_data
from tests.conftest import fixtures_dir
from tests.media_factory import write_mp3, write_mp4, write_wav


@pytest.fixture()
def data(tmp_path):
    return write_sample_data(tmp_path / "data", videos=3, clips=6, seed=3, frames=6)


def test_davis_layout(data):
    cat = scan_davis(data.davis_root)
    assert cat.issues == []
    by_name = {e["name"]: e for e in cat.entries}
    assert sorted(by_name) == sorted(data.videos)
    e = by_name[data.videos[0]]
    assert e["num_frames"] == 6 and (e["width"], e["height"]) == (128, 96)
    assert e["fps"] == 24.0 and e["kind"] == "frames" and e["format"] == "jpeg-frames"
    assert e["annotations_path"].endswith(f"Annotations/480p/{data.videos[0]}")
    assert e["split"] == "train" and by_name[data.videos[1]]["split"] == "val"
    assert len(e["content_hash"]) == 64 and len(e["annotations_hash"]) == 64
    assert [x["name"] for x in scan_davis(data.davis_root, split="val").entries] == [data.videos[1]]
    assert [x["name"] for x in scan_davis(data.davis_root, sequences=[data.videos[2]]).entries] == [data.videos[2]]


def test_esc50_layout(data):
    cat = scan_esc50(data.esc50_root)
    assert cat.issues == []
    assert len(cat.entries) == 6
    first = cat.entries[0]
    assert first["label"] == "rain" and first["sample_rate"] == 44100 and first["channels"] == 1
    assert first["duration_s"] == pytest.approx(5.0)
    meta = json.loads(first["meta"])
    assert meta["target"] == 10 and meta["esc10"] is True and meta["fold"] == 1
    assert {e["label"] for e in cat.entries} == {"rain", "crackling fire", "sea waves", "chirping birds"}


def test_bad_esc50_items_are_named_and_rest_intact(data):
    audio = data.esc50_root / "audio"
    files = sorted(p.name for p in audio.iterdir())
    (audio / files[0]).write_bytes(b"")  # empty file
    (audio / files[1]).write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")  # unreadable WAV
    write_mp3(audio / files[2])  # MP3 stream named .wav: usable, detected by content
    (audio / files[3]).unlink()  # CSV row for a missing file
    meta = data.esc50_root / "meta" / "esc50.csv"
    with open(meta, "a", newline="") as f:
        csv.writer(f).writerow(["../../etc/passwd", 1, 0, "dog", "True", "x", "A"])
    cat = scan_esc50(data.esc50_root)
    problems = {i.item: i.problem for i in cat.issues}
    assert "empty" in problems[files[0]]
    assert "cannot be decoded" in problems[files[1]] or "no audio" in problems[files[1]]
    assert "missing" in problems[files[3]]
    assert "not a plain file name" in problems["../../etc/passwd"]
    kept = {e["name"]: e for e in cat.entries}
    assert sorted(kept) == sorted([files[2], files[4], files[5]])
    assert kept[files[2]]["format"] == "mp3"
    assert kept[files[2]]["duration_s"] == pytest.approx(1.0, abs=0.1)


def test_unreadable_frame_and_bad_sequence(data):
    seq = data.davis_root / "JPEGImages" / "480p" / data.videos[1]
    (seq / "00003.jpg").write_bytes(b"\xff\xd8not a jpeg")
    cat = scan_davis(data.davis_root)
    assert [i.item for i in cat.errors] == [data.videos[1]]
    assert "00003.jpg" in cat.errors[0].path and "not a readable image" in cat.errors[0].problem
    assert sorted(e["name"] for e in cat.entries) == sorted([data.videos[0], data.videos[2]])


def test_frame_folder_problems_name_the_frame(data):
    from PIL import Image

    frames = data.davis_root / "JPEGImages" / "480p"
    corrupt, truncated, mixed = (frames / v for v in data.videos)
    (corrupt / "00002.jpg").write_bytes(b"\xff\xd8\xff garbage")
    whole = (truncated / "00004.jpg").read_bytes()
    (truncated / "00004.jpg").write_bytes(whole[: len(whole) // 2])  # a valid header: verify() alone passes it
    Image.new("RGB", (64, 48)).save(mixed / "00001.jpg")
    cat = scan_davis(data.davis_root)
    assert cat.entries == []
    problems = {i.item: (i.problem, i.path) for i in cat.errors}
    assert problems[corrupt.name][0].startswith("frame 00002.jpg is not a readable image")
    assert problems[truncated.name][0].startswith("frame 00004.jpg is not a readable image") \
        and "truncated" in problems[truncated.name][0]
    assert problems[mixed.name][0] == "frame 00001.jpg has size 64x48, other frames are 128x96"
    assert problems[mixed.name][1] == str(mixed / "00001.jpg")
    # The same through a plain folder (what `edit --video FOLDER` catalogues) and in the issue's text.
    cat = build_catalog([dict(kind="folder", root=frames, media="video")])
    assert f"{mixed.name}: frame 00001.jpg has size 64x48" in str(next(i for i in cat.errors if i.item == mixed.name))


def test_annotation_count_mismatch_is_a_warning(data):
    ann = data.davis_root / "Annotations" / "480p" / data.videos[0]
    sorted(ann.iterdir())[-1].unlink()
    cat = scan_davis(data.davis_root)
    (w,) = [i for i in cat.issues if i.item == data.videos[0]]
    assert w.severity == "warning" and "5 annotation masks for 6 frames" in w.problem


def test_plain_folders(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    write_wav(audio / "dog bark.wav", rng.normal(0, 0.1, 8000), 16000)
    write_wav(audio / "dog bark.flac", rng.normal(0, 0.1, 8000), 22050)  # same id -> made unique
    write_mp3(audio / "..evil.mp3")
    (audio / "notes.txt").write_text("ignored")
    (audio / "broken.ogg").write_bytes(b"OggS garbage")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "clip.mp4", rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8))
    (videos / "frames").mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(videos / "frames" / f"{i}.png")
    cat = build_catalog([dict(kind="folder", root=audio, media="audio"), dict(kind="folder", root=videos, media="video")])
    ids = {e["id"]: e for e in cat.entries}
    assert set(ids) == {"dog-bark", "dog-bark-2", "evil", "clip", "frames"}
    assert ids["dog-bark"]["format"] == "flac" and ids["dog-bark-2"]["format"] == "wav"
    assert ids["clip"]["num_frames"] == 5 and ids["clip"]["fps"] == 24 and ids["clip"]["kind"] == "video_file"
    assert ids["frames"]["num_frames"] == 3 and ids["frames"]["format"] == "png-frames"
    errors = {i.item: i.problem for i in cat.errors}
    assert list(errors) == ["broken.ogg"]
    renamed = [i for i in cat.issues if i.severity == "warning"]
    assert any("dog-bark-2" in i.problem for i in renamed)


def test_non_utf8_file_name(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    write_wav(folder / "good.wav", np.zeros(1600), 16000)
    write_wav(folder / "tmp.wav", np.zeros(1600), 16000)
    os.rename(bytes(folder / "tmp.wav"), bytes(folder) + b"/bad\xff.wav")
    cat = build_catalog([dict(kind="folder", root=folder, media="audio")])
    assert [e["id"] for e in cat.entries] == ["good"]
    assert "not valid UTF-8" in cat.errors[0].problem and "bad\\xff" in cat.errors[0].item


@pytest.mark.parametrize(
    "name, expected",
    [("../../etc/passwd", "etc-passwd"), ("..", None), ("a/b\\c", "a-b-c"), ("café olé", "cafe-ole"),
     (".hidden", "hidden"), ("x..y", "x.y"), ("???", None)],
)
def test_sanitize_id_never_escapes(name, expected):
    out = sanitize_id(name)
    assert "/" not in out and "\\" not in out and ".." not in out and not out.startswith(".")
    assert out not in ("", ".", "..")
    if expected is not None:
        assert out == expected
    else:
        assert out.startswith("item-")


def test_unique_ids():
    ids, renamed = unique_ids(["a b", "a-b", "a_b", "a b"])
    assert ids == ["a-b", "a-b-2", "a_b", "a-b-3"]
    assert renamed == [("a-b", "a-b-2"), ("a b", "a-b-3")]


def test_catalog_parquet_round_trip(data, tmp_path):
    cat = build_catalog([dict(kind="davis", root=data.davis_root, media="video"),
                         dict(kind="esc50", root=data.esc50_root, media="audio")])
    path = write_catalog(cat, tmp_path / "cat" / "catalog.parquet")
    back = read_catalog(path)
    assert back.entries == cat.entries
    assert len(back.entries) == 9


def test_sniff_by_content(tmp_path):
    assert sniff_audio_format(write_mp3(tmp_path / "x.wav")) == "mp3"
    assert sniff_audio_format(write_wav(tmp_path / "x.mp3", np.zeros(100), 8000, format="WAV")) == "wav"
    (tmp_path / "e.wav").write_bytes(b"")
    with pytest.raises(MediaError, match=r"e\.wav: is empty"):
        sniff_audio_format(tmp_path / "e.wav")


def test_sample_data_is_deterministic(tmp_path):
    from storage.hashing import hash_file

    a = write_sample_data(tmp_path / "a", videos=1, clips=2, seed=7, frames=3)
    b = write_sample_data(tmp_path / "b", videos=1, clips=2, seed=7, frames=3)
    c = write_sample_data(tmp_path / "c", videos=1, clips=2, seed=8, frames=3)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all(hash_file(tmp_path / "a" / f) == hash_file(tmp_path / "b" / f) for f in fa)
    wav = a.esc50_root / "audio" / a.clips[0]
    assert hash_file(wav) != hash_file(c.esc50_root / "audio" / c.clips[0].replace("007", "008"))


def test_sample_masks_match_object(tmp_path):
    """The annotation is exactly the object's pixels: the object colour sits inside it."""
    from PIL import Image

    from tasks.sample_data import render_video

    d = write_sample_data(tmp_path, videos=1, clips=1, seed=0, frames=3)
    frames, masks = render_video(0, 3, 96, 128, (220, 40, 40))
    for t in range(3):
        img = np.asarray(Image.open(d.davis_root / f"JPEGImages/480p/ball/{t:05d}.jpg")).astype(int)
        ann = Image.open(d.davis_root / f"Annotations/480p/ball/{t:05d}.png")
        assert ann.mode == "P"
        m = np.asarray(ann) == 1
        np.testing.assert_array_equal(m, masks[t])  # palette PNG round trip is exact
        assert 0.03 < m.mean() < 0.3
        assert np.abs(img - frames[t]).mean() < 3  # JPEG at quality 95
        assert (img[m][:, 0] > img[m][:, 2] + 60).mean() > 0.95  # the red object is under its mask


@pytest.mark.skipif(fixtures_dir() is None, reason="real media fixtures not present (set AUDIOSCENIC_FIXTURES)")
def test_real_fixture_media_catalogue():
    root = fixtures_dir()
    cat = build_catalog([dict(kind="folder", root=root / "audio", media="audio"),
                         dict(kind="folder", root=root / "video", media="video")])
    assert cat.errors == []
    fmt = {e["id"]: e["format"] for e in cat.entries}
    assert fmt["train"] == "mp3" and fmt["motorcycle"] == "mp3" and fmt["cat"] == "wav"
    rates = {e["id"]: e["sample_rate"] for e in cat.entries if e["media"] == "audio"}
    assert rates["cat"] == 22050 and rates["cattle"] == 48000
    assert {e["id"] for e in cat.entries if e["media"] == "video"} == {"man-skiing", "rabbit-watermelon"}
