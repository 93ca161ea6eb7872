"""Small media writers for tests (the tests generate all of their own data)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from tasks.config import QUICK_STAGES

# Whole-pipeline tests about planning, bad inputs, caching or orchestration: every stage runs, with
# the fewest diffusion steps that still exercise each code path (CI time; the steps' own behaviour is
# tested in test_finetune / test_inversion / test_edit).
PIPELINE_TEST_STAGES = copy.deepcopy(QUICK_STAGES)
PIPELINE_TEST_STAGES["finetune"]["steps"] = 4
PIPELINE_TEST_STAGES["inversion"]["steps"] = 4


def write_mp3(path: Path, seconds: float = 1.0, rate: int = 44100) -> Path:
    """An MP3 stream written to any file name (e.g. one that ends in .wav)."""
    import av

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w", format="mp3") as c:
        s = c.add_stream("libmp3lame", rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int, format: str | None = None) -> Path:
    """16-bit PCM; the container follows the suffix unless `format` forces one (e.g. 'WAV')."""
    import soundfile as sf

    sf.write(str(path), samples, rate, subtype="PCM_16", format=format)
    return path


def write_mp4(path: Path, frames: np.ndarray, fps: int = 24) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return path


def edit_media(folder: Path, clips: int, seed: int) -> tuple[Path, list[Path]]:
    """One 8-frame sample video's frame folder and `clips` sample clips: the inputs of `audioscenic edit` tests."""
    from tasks.sample_data import write_sample_data

    data = write_sample_data(folder, videos=1, clips=clips, seed=seed, frames=8)
    return data.davis_root / "JPEGImages" / "480p" / data.videos[0], sorted((data.esc50_root / "audio").glob("*.wav"))
