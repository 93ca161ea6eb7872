"""`audioscenic edit` makes edits as long as their sound, at the source's rate, in sync (issue 13).

Real pipeline runs through the CLI on generated video files and clips (tiny presets, 32 px,
2 DDIM and 2 fine-tuning steps): frame counts, the MP4's rate and sound duration, the sound
track being the clip's opening (envelope correlation after AAC, decoded with PyAV), the
per-frame M_a following the loudness under each frame, and the "video" / "frames" spans.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.stats import spearmanr

from flows.cli import main
from storage import ArtifactStore
from tasks.audio import decode_audio, envelope
from tasks.sample_data import render_video
from tests.diffusion_factory import one_thread  # noqa: F401  (autouse: tiny models, one torch thread)
from tests.media_factory import write_mp4, write_wav

FAST = ["--set", "stages.video.resolution=32", "--set", "stages.inversion.steps=2",
        "--set", "stages.finetune.steps=2", "--set", "stages.edit.decode_chunk=16"]
RATE = 22050


def swell(t):
    """Loudness that swells to a peak at 1.5 s, fades, and swells again less at 3.8 s (5 s clip)."""
    return 0.04 + 0.9 * np.exp(-(((t - 1.5) / 0.45) ** 2)) + 0.45 * np.exp(-(((t - 3.8) / 0.35) ** 2))


def bursts(seconds, seed):
    """Loudness with bursts at random times: any stretch of it is recognisable by its envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    level = np.full_like(t, 0.03)
    for start in rng.uniform(0, seconds, int(seconds * 3)):
        level += rng.uniform(0.2, 0.8) * np.exp(-(((t - start) / 0.06) ** 2))
    return t, level


def write_clip(path, t, level, seed):
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return write_wav(path, (np.clip(level, 0, 1) * noise * 0.6).clip(-1, 1).astype(np.float32), RATE)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("span-media")
    long_video, _ = render_video(11, 80, 48, 64, (220, 40, 40))  # 8 s at 10 fps
    short_video, _ = render_video(12, 72, 48, 64, (30, 90, 220))  # 3 s at 24 fps
    t5 = np.arange(5 * RATE) / RATE
    t8, l8 = bursts(8.0, 1)
    t26, l26 = bursts(2.6, 2)
    return {
        "ball": write_mp4(root / "ball.mp4", long_video, fps=10),
        "car": write_mp4(root / "car.mp4", short_video, fps=24),
        "swell": write_clip(root / "swell.wav", t5, swell(t5), 3),
        "long": write_clip(root / "long.wav", t8, l8, 4),
        "short": write_clip(root / "short.wav", t26, l26, 5),
    }


def edit(media, video, clip, out, work, *extra):
    args = ["edit", "--video", str(media[video]), "--audio", str(media[clip]), "--source-audio", str(media["long"]),
            "--workdir", str(work), "-o", str(out), *FAST, *extra]
    assert main(args) == 0
    return out


class Mp4:
    def __init__(self, path):
        with av.open(str(path)) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            self.fps = Fraction(v.average_rate)
            self.video_seconds = float(v.duration * v.time_base)
            # the sound's duration as the container states it (the decoder returns whole 1024-sample
            # AAC frames, up to 46 ms more at 22.05 kHz)
            self.audio_seconds = float(a.duration * a.time_base)
            self.frames = sum(1 for _ in c.decode(video=0))
        wav, self.rate = decode_audio(path)  # AAC decoded by PyAV
        self.track = wav.numpy()


def read_mp4(path):
    m = Mp4(path)
    assert abs(m.audio_seconds - m.video_seconds) < 1 / float(m.fps)  # video and sound within one frame
    return m.frames, m.fps, m.audio_seconds, m.track, m.rate


def smooth_env(wav, rate):
    e = envelope(wav, rate).astype(np.float64)
    return np.convolve(e, np.ones(5) / 5, mode="same")


def best_corr(track_env, clip_env, start_bin, lag=6):
    """Best Pearson correlation of the track's envelope with the clip's from `start_bin`, lags of +-60 ms."""
    n = len(track_env) - 2 * lag
    a = track_env[lag : lag + n]
    out = []
    for d in range(-lag, lag + 1):
        lo = start_bin + lag + d
        if lo < 0 or lo + n > len(clip_env):
            continue
        out.append(np.corrcoef(a, clip_env[lo : lo + n])[0, 1])
    return max(out)


def edit_artifact(work, video, clip):
    store = ArtifactStore(Path(work) / "store.zarr")
    path = f"edits/{video}/{clip}/full"
    return store.read(path), store.attrs(path)


def test_a_5s_clip_over_an_8s_10fps_video_is_a_5s_edit_driven_by_the_sound_under_each_frame(
        prefect_server, media, tmp_path):
    work = tmp_path / "single"
    n, fps, seconds, track, rate = read_mp4(edit(media, "ball", "swell", tmp_path / "swell.mp4", work))
    assert (n, fps) == (50, 10)
    assert abs(seconds - 5.0) < 0.1  # 5 s of sound, within one frame
    clip, clip_rate = decode_audio(media["swell"])
    assert best_corr(smooth_env(track, rate), smooth_env(clip.numpy(), clip_rate), 0) > 0.9

    data, attrs = edit_artifact(work, "ball", "swell")
    assert data["frames"].shape == (50, 32, 32, 3) and data["magnitude"].shape == (50,)
    assert (attrs["frames"], attrs["fps"], attrs["audio_seconds"], attrs["span"]) == (50, 10.0, 5.0, "clip")
    assert (attrs["span_start_frame"], attrs["span_start_seconds"], attrs["audio_start_seconds"]) == (0, 0.0, 0.0)
    # M_a follows the loudness of the sound played under each frame (frame k: [k/10, (k+1)/10) s)
    under = swell((np.arange(50) + 0.5) / 10)
    assert spearmanr(data["magnitude"], under)[0] >= 0.95
    assert int(np.argmax(data["magnitude"])) in (14, 15) and data["magnitude"].mean() == pytest.approx(1, abs=1e-5)

    # The video's preprocessing covers the whole video (80 frames), the edit its first 50.
    store = ArtifactStore(work / "store.zarr")
    for group, array in (("frames", "frames"), ("masks", "masks"), ("depth", "depth"), ("latents", "latents")):
        assert store.read(f"video/ball/{group}", names=[array])[array].shape[0] == 80, group
    assert store.read("inversion/ball/base", names=["z_T"])["z_T"].shape[0] == 80
    # the report shows evenly spaced frames (8 of 50), its M_a picture as wide as the strip
    import json

    from PIL import Image

    report = work / "report"
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["missing"] == [] and manifest["videos"] == ["media/full/ball/swell.mp4"]
    strip = Image.open(report / "img" / "ball" / "swell.full.png")
    ma = Image.open(report / "img" / "ball" / "swell.full.ma.png")
    assert strip.size[0] == 8 * 96 and ma.size[0] == strip.size[0]
    assert "<video controls" in (report / "index.html").read_text()


@pytest.mark.heavy(150)
def test_clips_longer_and_shorter_than_a_3s_24fps_video(prefect_server, media, tmp_path):
    work = tmp_path / "single"
    long_clip, long_rate = decode_audio(media["long"])
    long_env = smooth_env(long_clip.numpy(), long_rate)

    # 8 s clip over a 3 s video: 72 frames = 3 s, the sound is the clip's first 3 s
    n, fps, seconds, track, rate = read_mp4(edit(media, "car", "long", tmp_path / "long.mp4", work))
    assert (n, fps) == (72, 24) and abs(seconds - 3.0) < 1 / 24
    env = smooth_env(track, rate)
    opening = best_corr(env, long_env, 0)
    assert opening > 0.9, opening
    assert best_corr(env, long_env, 450) < 0.6  # not any 3 s of the clip: its 4.5 - 7.5 s differ
    _, attrs = edit_artifact(work, "car", "long")
    assert (attrs["frames"], attrs["audio_seconds"]) == (72, 3.0)

    # 2.6 s clip: 62 frames = 2.583 s (2.6 s within one frame), the whole clip as sound
    n, fps, seconds, track, rate = read_mp4(edit(media, "car", "short", tmp_path / "short.mp4", work))
    assert (n, fps) == (62, 24)
    assert abs(n / 24 - 2.6) < 1 / 24 and abs(seconds - 62 / 24) < 1 / 24
    short_clip, short_rate = decode_audio(media["short"])
    short_env = smooth_env(short_clip.numpy(), short_rate)
    assert best_corr(smooth_env(track, rate), short_env, 0) > 0.9
    # the second clip reused the video's preprocessing, inversion and fine-tuning (same source clip)
    from storage import Ledger

    stages = [r["stage"] for r in Ledger(work / "ledger").read(status="done").to_pylist()
              if r["stage"] in ("frames", "masks", "depth", "latents", "inversion", "finetune")]
    assert sorted(stages) == ["depth", "finetune", "frames", "inversion", "latents", "masks"]

    # span "video", audio_fit "loop": the whole 3 s video, the 2.6 s clip again from its start after 2.6 s
    n, fps, seconds, track, rate = read_mp4(edit(media, "car", "short", tmp_path / "loop.mp4", work,
                                        "--set", "stages.video.span=video", "--set", "stages.edit.audio_fit=loop"))
    assert (n, fps) == (72, 24) and abs(seconds - 3.0) < 1 / 24
    env = smooth_env(track, rate)
    tail = env[265:300]  # 2.65 - 3.0 s of the track: the clip's 0.05 - 0.4 s
    assert np.corrcoef(tail, short_env[5:40])[0, 1] > 0.8
    loop_data, loop_attrs = edit_artifact(work, "car", "short")
    assert (loop_attrs["span"], loop_attrs["audio_fit"], loop_attrs["frames"]) == ("video", "loop", 72)
    # ... and "pad": silence after 2.6 s, which M_a weighs least
    n, _, seconds, track, rate = read_mp4(edit(media, "car", "short", tmp_path / "pad.mp4", work,
                                      "--set", "stages.video.span=video"))
    assert n == 72 and np.abs(track[:, int(2.65 * rate) :]).max() < 0.01
    pad_data, _ = edit_artifact(work, "car", "short")
    assert np.allclose(pad_data["magnitude"][63:], pad_data["magnitude"].min())
    assert not np.allclose(loop_data["magnitude"][63:], loop_data["magnitude"].min())

    # span "frames", num_frames 8: today's 8-frame edits (the paper's figures), 1/3 s
    n, fps, seconds, track, rate = read_mp4(edit(media, "car", "long", tmp_path / "eight.mp4", work,
                                        "--set", "stages.video.span=frames", "--set", "stages.video.num_frames=8"))
    assert (n, fps) == (8, 24) and abs(seconds - 8 / 24) < 0.03
    data, attrs = edit_artifact(work, "car", "long")
    assert data["frames"].shape[0] == 8 and attrs["span"] == "frames"
