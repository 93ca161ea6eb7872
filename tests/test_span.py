"""What an edit covers (tasks.span): frame counts, the audio under each frame, and the keys that follow them.

Planning only (no model runs): catalog entries written by hand, tiny presets.
"""
from __future__ import annotations

import numpy as np
import pytest

from tasks import audio, depth, edit, finetune, frames, inversion, latents, masks
from tasks.catalog import Catalog
from tasks.config import config_from_dict
from tasks.span import SpanError, chunk_edges, edit_span, video_frames


def video(vid="v", frames_=80, fps=10.0, **kw):
    return {"id": vid, "media": "video", "kind": "video_file", "path": f"/data/{vid}.mp4", "label": "ball",
            "content_hash": f"h-{vid}", "num_frames": frames_, "fps": fps, **kw}


def clip(aid="a", seconds=5.0, **kw):
    return {"id": aid, "media": "audio", "kind": "audio_file", "path": f"/data/{aid}.wav", "label": "rain",
            "content_hash": f"h-{aid}", "duration_s": seconds, **kw}


def cfg_of(video_=None, edit_=None, **top):
    return config_from_dict({"workdir": "/tmp/span-test", "models": {"preset": "tiny"},
                             "stages": {"video": video_ or {}, "edit": edit_ or {}}, **top})


# ----------------------------------------------------------------------------- frame counts


def test_default_span_is_the_shorter_of_video_and_clip_at_the_source_rate():
    cfg = cfg_of()
    s = edit_span(cfg, video(frames_=80, fps=10.0), clip(seconds=5.0))  # 8 s at 10 fps, 5 s clip
    assert (s.mode, s.frames, s.fps, s.seconds, s.audio_seconds) == ("clip", 50, 10.0, 5.0, 5.0)
    s = edit_span(cfg, video(frames_=72, fps=24.0), clip(seconds=8.0))  # 3 s at 24 fps, 8 s clip
    assert (s.frames, s.seconds) == (72, 3.0)
    s = edit_span(cfg, video(frames_=72, fps=24.0), clip(seconds=2.6))  # 2.6 s = 62.4 frames: 62
    assert s.frames == 62 and abs(s.seconds - 2.6) < 1 / 24
    # floor(seconds * fps + 1e-6): 2.6 s at 10 fps is 26 frames although 2.6 * 10 = 25.999...
    assert edit_span(cfg, video(frames_=80, fps=10.0), clip(seconds=2.6)).frames == 26
    # a clip shorter than one frame still gives one frame
    assert edit_span(cfg, video(), clip(seconds=0.01)).frames == 1
    # every frame covers [k / fps, (k + 1) / fps) of the clip
    np.testing.assert_allclose(chunk_edges(edit_span(cfg, video(), clip(seconds=0.5))), np.arange(6) / 10)


def test_stride_start_cap_and_output_rate():
    v = video(frames_=240, fps=24.0)  # 10 s
    # stride 2: 12 fps, 120 frames; from frame 24 (1 s in): 108 frames left
    assert video_frames(cfg_of({"stride": 2}), v) == 120
    assert video_frames(cfg_of({"stride": 2, "start": 24}), v) == 108
    s = edit_span(cfg_of({"stride": 2, "start": 24}), v, clip(seconds=30.0))
    assert (s.frames, s.fps, s.start, s.start_seconds) == (108, 12.0, 24, 1.0)
    # max_seconds caps the video stages and every span: 4 s of source at 24 fps
    capped = cfg_of({"max_seconds": 4})
    assert video_frames(capped, v) == 96 and edit_span(capped, v, clip(seconds=30.0)).frames == 96
    assert edit_span(capped, v, clip(seconds=2.0)).frames == 48
    # stages.edit.fps retimes the frames: 5 s of clip at 10 fps = 50 of the video's frames
    assert edit_span(cfg_of(edit_={"fps": 10}), v, clip(seconds=5.0)).frames == 50


def test_video_and_frames_modes():
    v = video(frames_=72, fps=24.0)
    s = edit_span(cfg_of({"span": "video"}, {"audio_fit": "loop"}), v, clip(seconds=1.0))
    assert (s.mode, s.frames, s.audio_fit, s.audio_seconds) == ("video", 72, "loop", 3.0)
    assert edit_span(cfg_of({"span": "video"}), v, clip(seconds=1.0)).audio_fit == "pad"
    # frames: exactly num_frames frames (the paper's 8-frame figures), M_a over the whole clip
    s = edit_span(cfg_of({"span": "frames", "num_frames": 8}), v, clip(seconds=5.0))
    assert (s.frames, s.whole_clip, s.seconds) == (8, True, 8 / 24)
    assert chunk_edges(s) is None
    assert video_frames(cfg_of({"span": "frames", "num_frames": 8}), v) == 8


def test_a_video_with_no_frame_from_start_is_a_clear_error():
    with pytest.raises(SpanError, match=r"video 'short' is too short: it has 5 frames, none from frame 5 "
                                        r"\(stages.video.start\) at stride 1"):
        edit_span(cfg_of({"start": 5}), video("short", frames_=5), clip())
    with pytest.raises(SpanError, match="clip 'x' has no known duration"):
        edit_span(cfg_of(), video(), clip("x", seconds=None))


def test_the_frames_stage_fails_a_too_short_video_by_name(tmp_path):
    from tasks.stage_task import open_store_and_ledger
    from tests.media_factory import write_mp4

    path = write_mp4(tmp_path / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8), fps=24)
    cfg = config_from_dict({"workdir": str(tmp_path / "w"), "stages": {"video": {"start": 3, "resolution": 32}}})
    cat = Catalog(entries=[video("short", frames_=3, fps=24.0, path=str(path))])
    store, ledger = open_store_and_ledger(cfg)
    r = frames.run_batch(cfg, frames.work_items(cfg, cat), store, ledger)
    assert r.failed["short"] == (f"TooFewFramesError: video 'short': is too short: it has 3 frames ({path}), none from frame 3 "
                                 "(stages.video.start); lower stages.video.start or leave the video out")
    # the whole video from frame 1 at stride 1: frames 1 and 2
    cfg1 = config_from_dict({"workdir": str(tmp_path / "w"), "stages": {"video": {"start": 1, "resolution": 32}}})
    r = frames.run_batch(cfg1, frames.work_items(cfg1, cat), store, ledger)
    (item,) = frames.work_items(cfg1, cat)
    assert r.computed == ["short"] and store.read(item.artifact, item.key.key)["frames"].shape == (2, 32, 32, 3)
    assert store.attrs(item.artifact, item.key.key)["source_indices"] == [1, 2]


# ----------------------------------------------------------------------------- keys


def catalog(*clips_):
    return Catalog(entries=[video("v", frames_=80, fps=10.0), *clips_])


def keys(cfg, cat):
    out = {}
    for mod in (frames, masks, depth, latents, inversion):
        out[mod.STAGE] = {i.item_id: i.key.key for i in mod.work_items(cfg, cat)}
    for mod in (audio, finetune, edit):
        out[mod.STAGE] = {i.item_id: i.key.key for i in mod.work_items(cfg, cat)}
    return out


VIDEO_STAGES = ("frames", "masks", "depth", "latents", "inversion")


def test_video_preprocessing_never_depends_on_the_clips():
    one = keys(cfg_of(), catalog(clip("a", 5.0)))
    two = keys(cfg_of(), catalog(clip("a", 5.0), clip("b", 2.0)))
    for stage in VIDEO_STAGES:
        assert one[stage] == two[stage], stage
    # the video's span of preprocessing is the same for "clip" and "video" edits
    vid = keys(cfg_of({"span": "video"}, {"audio_fit": "loop"}), catalog(clip("a", 5.0)))
    for stage in VIDEO_STAGES:
        assert one[stage] == vid[stage], stage
    assert one["edit"]["v/a/full"] != vid["edit"]["v/a/full"]
    # a longer clip grows only its own edit's span: the other edit keeps its key
    longer = keys(cfg_of(), catalog(clip("a", 5.0), clip("b", 3.0)))
    assert longer["edit"]["v/a/full"] == two["edit"]["v/a/full"]
    assert longer["edit"]["v/b/full"] != two["edit"]["v/b/full"]


def test_cache_keys_follow_the_span_settings():
    cat = catalog(clip("a", 5.0))
    base = keys(cfg_of(), cat)

    def changed(other):
        return {stage for stage in base if base[stage] != other[stage]}

    every = set(VIDEO_STAGES) | {"finetune", "edit"}
    assert changed(keys(cfg_of({"max_seconds": 4}), cat)) == every
    assert changed(keys(cfg_of({"start": 2}), cat)) == every
    assert changed(keys(cfg_of({"stride": 2}), cat)) == every
    frames_mode = keys(cfg_of({"span": "frames"}), cat)
    assert changed(frames_mode) == every
    # num_frames matters only to the "frames" span; max_seconds only to the others
    assert changed(keys(cfg_of({"num_frames": 16}), cat)) == set()
    assert keys(cfg_of({"span": "frames", "max_seconds": 4}), cat) == frames_mode
    assert keys(cfg_of({"span": "frames", "num_frames": 16}), cat)["frames"] != frames_mode["frames"]
    # audio_fit: only where sound can run out (span "video"); the audio stage never changes
    assert changed(keys(cfg_of(edit_={"audio_fit": "loop"}), cat)) == set()
    video_pad = keys(cfg_of({"span": "video"}), cat)
    video_loop = keys(cfg_of({"span": "video"}, {"audio_fit": "loop"}), cat)
    assert {s for s in video_pad if video_pad[s] != video_loop[s]} == {"finetune", "edit"}
    # the temperature shapes M_a: fine-tuning and edits, not the stored audio features
    hot = keys(config_from_dict({"workdir": "/tmp/span-test", "stages": {"audio": {"temperature": 0.5}}}), cat)
    assert changed(hot) == {"finetune", "edit"}


def test_edits_of_one_video_with_different_lengths_are_never_denoised_together():
    cfg = cfg_of()
    items = edit.work_items(cfg, catalog(clip("a", 5.0), clip("b", 2.0), clip("c", 5.0)))
    by_id = {it.audio_id: it for it in items}
    assert [by_id[a].payload["span"]["frames"] for a in "abc"] == [50, 20, 50]
    assert edit._same_group(by_id["a"], by_id["c"]) and not edit._same_group(by_id["a"], by_id["b"])


# ----------------------------------------------------------------------------- the MP4's sound


def test_mp4_sound_is_the_clip_from_its_start_padded_or_looped():
    rate = 16000
    w = np.linspace(-0.5, 0.5, rate, dtype=np.float32)[None]  # 1 s ramp
    head, r = edit.fit_audio(w, rate, 0.25)
    assert r == rate and head.shape == (1, 4000) and np.array_equal(head, w[:, :4000])
    pad, _ = edit.fit_audio(w, rate, 2.5)
    assert pad.shape == (1, 40000) and np.array_equal(pad[:, :rate], w) and not pad[:, rate:].any()
    loop, _ = edit.fit_audio(w, rate, 2.5, "loop")
    assert np.array_equal(loop[:, :rate], w) and np.array_equal(loop[:, rate : 2 * rate], w)
    assert np.array_equal(loop[:, 2 * rate :], w[:, : rate // 2])
