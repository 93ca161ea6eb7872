"""Synthetic sample data in the DAVIS and ESC-50 layouts, deterministic for a seed.

Videos: a coloured object moving over a textured, scrolling background, with
palette-PNG annotations of the object (DAVIS style); 48 frames (2 s at DAVIS' 24 fps)
by default. Audio: procedurally
synthesised 5 s, 44.1 kHz mono clips of a few ESC-50 classes, each with a
recognisable temporal structure (steady rain, crackling impulses, slow swells,
chirps), plus a valid meta/esc50.csv.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (name used as the DAVIS sequence / grounding caption, object colour RGB)
VIDEO_OBJECTS = [("ball", (220, 40, 40)), ("car", (30, 90, 220)), ("dog", (240, 200, 40)), ("kite", (40, 200, 90))]
# ESC-50 class name -> its official target index and ESC-10 membership
AUDIO_CLASSES = [("rain", 10, True), ("crackling_fire", 12, True), ("sea_waves", 11, True), ("chirping_birds", 14, False)]
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (768 - 15)
ESC50_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


@dataclass(frozen=True)
class SampleData:
    davis_root: Path
    esc50_root: Path
    videos: list[str]
    clips: list[str]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A tileable texture twice as wide as the frame, so it can scroll."""
    w2 = 2 * width
    y, x = np.mgrid[0:height, 0:w2].astype(np.float32)
    tex = np.zeros((height, w2, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx = rng.integers(1, 6) * 2 * np.pi / w2
            fy = rng.uniform(0.02, 0.15)
            phase = rng.uniform(0, 2 * np.pi)
            tex[..., c] += np.sin(fx * x + fy * y + phase)
    tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
    base = rng.uniform(60, 160, size=3).astype(np.float32)
    return np.clip(base + 70 * (tex - 0.5), 0, 255)


def render_video(seed: int, num_frames: int, height: int, width: int, color: tuple[int, int, int]):
    """Frames (F,H,W,3) uint8 and object masks (F,H,W) bool."""
    rng = np.random.default_rng(seed)
    bg = _background(rng, height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ry, rx = height * rng.uniform(0.16, 0.24), width * rng.uniform(0.12, 0.18)
    x0, x1 = width * 0.25, width * 0.75
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.empty((num_frames, height, width), bool)
    shade = np.asarray(color, np.float32)
    for t in range(num_frames):
        u = t / max(num_frames - 1, 1)
        cx = x0 + (x1 - x0) * u
        cy = height * (0.5 + 0.15 * np.sin(2 * np.pi * u))
        shift = int(round(u * width * 0.5))  # camera pan: background scrolls
        img = np.roll(bg, -shift, axis=1)[:, :width].copy()
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        light = 0.75 + 0.25 * np.clip(1 - ((x - cx + rx / 3) ** 2 + (y - cy + ry / 3) ** 2) / (rx * ry), 0, 1)
        img[inside] = (shade[None, :] * light[inside][:, None]).clip(0, 255)
        frames[t] = img.astype(np.uint8)
        masks[t] = inside
    return frames, masks


def write_davis(root: Path, num_videos: int, num_frames: int, height: int, width: int, seed: int) -> list[str]:
    names = []
    for i in range(num_videos):
        obj, color = VIDEO_OBJECTS[i % len(VIDEO_OBJECTS)]
        name = obj if i < len(VIDEO_OBJECTS) else f"{obj}-{i // len(VIDEO_OBJECTS) + 1}"
        frames, masks = render_video(seed * 1000 + i, num_frames, height, width, color)
        jdir = root / "JPEGImages" / "480p" / name
        adir = root / "Annotations" / "480p" / name
        jdir.mkdir(parents=True, exist_ok=True)
        adir.mkdir(parents=True, exist_ok=True)
        for t in range(num_frames):
            Image.fromarray(frames[t]).save(jdir / f"{t:05d}.jpg", quality=95)
            ann = Image.fromarray(masks[t].astype(np.uint8), mode="P")
            ann.putpalette(DAVIS_PALETTE)
            ann.save(adir / f"{t:05d}.png")
        names.append(name)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    # Alternate train/val so both split files are exercised.
    (sets / "train.txt").write_text("".join(f"{n}\n" for n in names[0::2]))
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in names[1::2]))
    return names


def synthesize_clip(category: str, seed: int, sample_rate: int = 44100, seconds: float = 5.0) -> np.ndarray:
    """Mono float32 in [-1, 1] with the class's characteristic temporal structure."""
    rng = np.random.default_rng(seed)
    n = int(sample_rate * seconds)
    t = np.arange(n) / sample_rate
    if category == "rain":
        x = rng.normal(size=n)
        x = np.diff(x, prepend=0.0) * 0.3  # hiss: high-passed noise, steady level
        drops = rng.random(n) < 0.002
        x += np.convolve(drops * rng.normal(0, 1.5, n), np.exp(-np.arange(200) / 30), mode="same")
    elif category == "crackling_fire":
        x = np.cumsum(rng.normal(size=n)) * 0.002  # low rumble
        x -= np.convolve(x, np.ones(2001) / 2001, mode="same")
        pops = rng.random(n) < 0.0006
        x += np.convolve(pops * rng.normal(0, 3.0, n), np.exp(-np.arange(800) / 120), mode="same")
    elif category == "sea_waves":
        noise = rng.normal(size=n)
        noise = np.convolve(noise, np.ones(16) / 16, mode="same")
        period = rng.uniform(1.8, 2.6)
        swell = (0.5 - 0.5 * np.cos(2 * np.pi * t / period)) ** 2
        x = noise * (0.1 + 2.0 * swell)
    elif category == "chirping_birds":
        x = rng.normal(size=n) * 0.01
        for _ in range(int(seconds * 3)):
            start = rng.uniform(0, seconds - 0.2)
            dur = rng.uniform(0.05, 0.15)
            f0, f1 = rng.uniform(2500, 4000), rng.uniform(4000, 6500)
            idx = (t >= start) & (t < start + dur)
            tt = t[idx] - start
            phase = 2 * np.pi * (f0 * tt + (f1 - f0) * tt**2 / (2 * dur))
            x[idx] += 0.6 * np.sin(phase) * np.sin(np.pi * tt / dur)
    else:
        raise ValueError(f"unknown sample audio class {category!r}")
    x = x / (np.abs(x).max() + 1e-9) * 0.8
    return x.astype(np.float32)


def write_esc50(root: Path, num_clips: int, seed: int, sample_rate: int = 44100) -> list[str]:
    import soundfile as sf

    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    rows, names = [], []
    for i in range(num_clips):
        category, target, esc10 = AUDIO_CLASSES[i % len(AUDIO_CLASSES)]
        fold = i % 5 + 1
        src = f"{seed:03d}{i:04d}"
        take = chr(ord("A") + i // len(AUDIO_CLASSES) % 26)
        filename = f"{fold}-{src}-{take}-{target}.wav"
        sf.write(root / "audio" / filename, synthesize_clip(category, seed * 1000 + i, sample_rate), sample_rate, subtype="PCM_16")
        rows.append([filename, fold, target, category, "True" if esc10 else "False", src, take])
        names.append(filename)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ESC50_COLUMNS)
        w.writerows(rows)
    return names


def write_sample_data(
    out: str | Path,
    videos: int = 2,
    clips: int = 4,
    seed: int = 0,
    frames: int = 48,  # 2 s at DAVIS' 24 fps
    height: int = 96,
    width: int = 128,
) -> SampleData:
    out = Path(out)
    if videos < 1 or clips < 1 or frames < 1:
        raise ValueError("sample data needs at least one video, one clip and one frame")
    davis, esc = out / "davis", out / "esc50"
    v = write_davis(davis, videos, frames, height, width, seed)
    c = write_esc50(esc, clips, seed)
    return SampleData(davis_root=davis, esc50_root=esc, videos=v, clips=c)
