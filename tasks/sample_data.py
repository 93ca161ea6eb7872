"""Synthetic sample data in the DAVIS and ESC-50 layouts, deterministic for a seed.

Videos: a coloured object moving over a textured, scrolling background, with
palette-PNG annotations of the object (DAVIS style); 48 frames (2 s at DAVIS' 24 fps)
by default. Audio: procedurally
synthesised 5 s, 44.1 kHz mono clips of a few ESC-50 classes, each with a
recognisable temporal structure (steady rain, crackling impulses, slow swells,
chirps), plus a valid meta/esc50.csv.

The toy world (`world="toy"`, issue 18): each sound class has a background look,
composited over the textured background under the object:

    rain            grey diagonal streaks falling down the frame
    crackling_fire  orange glow rising from the bottom edge, flickering
    sea_waves       blue horizontal bands rolling upwards
    chirping_birds  green dots (leaves) scattered over the frame

Its strength in frame k follows the loudness of the sound played under frame k
(`frame_loudness`: mean absolute amplitude of the frame's chunk of the clip,
divided by the loudest chunk), as alpha = coverage * (0.5 + 0.5 * loudness), so the look is
recognisable even in quiet frames and pulses with the sound. The object (and its
mask) is drawn on top, exactly as in the plain world. A video of the toy world is
paired with clip i % clips of the same data set (video i), whose first
frames / fps seconds it shows. Decisions where the issue is silent: the look's
random layout (streak positions, dot positions, band phases) is drawn from its
own generator seeded by (seed, class), so the plain world's random draws, and
hence its bytes, are unchanged; the DAVIS frame rate is taken as 24 fps.
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


# The toy world's background look of each sound class (see the module docstring).
SCENE_LOOKS = {
    "rain": "grey diagonal streaks",
    "crackling_fire": "orange flickering glow",
    "sea_waves": "blue rolling bands",
    "chirping_birds": "green dots",
}
FPS = 24  # DAVIS' frame rate; a toy-world video shows its clip's first frames / FPS seconds


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


def frame_loudness(waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float = FPS) -> np.ndarray:
    """(num_frames,) in [0, 1]: mean |amplitude| of the sound under each frame / the loudest frame's.

    Frame k hears samples [k / fps, (k + 1) / fps) s of the mono clip; frames past the
    clip's end hear silence. An all-silent span gives zeros.
    """
    x = np.abs(np.asarray(waveform, np.float32).reshape(-1))
    per = sample_rate / fps
    out = np.zeros(num_frames, np.float32)
    for k in range(num_frames):
        a, b = int(round(k * per)), int(round((k + 1) * per))
        if a < len(x):
            out[k] = x[a:min(b, len(x))].mean()
    peak = out.max()
    return out / peak if peak > 0 else out


def _look_layout(category: str, seed: int, height: int, width: int) -> dict:
    """Random but fixed per (seed, class) positions of a look's elements, from its own generator."""
    if category not in SCENE_LOOKS:
        raise ValueError(f"no toy-world look for class {category!r}; known: {', '.join(SCENE_LOOKS)}")
    rng = np.random.default_rng([seed, list(SCENE_LOOKS).index(category), 18])
    return {
        "streaks": rng.uniform(0, 1, size=(max(6, width // 5), 2)),  # rain: x offset, phase
        "dots": rng.uniform(0, 1, size=(max(12, height * width // 120), 3)),  # birds: y, x, size
        "phase": rng.uniform(0, 2 * np.pi, size=4),  # waves / fire
        "flicker": rng.normal(size=(64, 8)),  # fire: per-frame flame heights
    }


def look_layer(category: str, layout: dict, t: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The class look in frame t: colour (H, W, 3) float in [0, 255] and coverage (H, W) in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    yn, xn = y / height, x / width
    if category == "rain":
        colour = np.array([200, 200, 210], np.float32)
        cover = np.zeros((height, width), np.float32)
        period = 0.6
        for off, ph in layout["streaks"]:
            # diagonal line x = off * width + 0.3 * y, short dashes moving down by 0.12 frame heights per frame
            d = np.abs(x - (off * width + 0.3 * y))
            dash = ((yn - 0.12 * t + ph) % period) < 0.35 * period
            cover = np.maximum(cover, (d < 1.2) * dash)
        colour = np.broadcast_to(colour, (height, width, 3)) * (0.5 + 0.5 * cover[..., None])  # dark grey wash
        return colour, np.clip(0.65 + 0.35 * cover, 0, 1)
    if category == "crackling_fire":
        fl = layout["flicker"][t % len(layout["flicker"])]
        cols = np.interp(xn, np.linspace(0, 1, len(fl)), fl)  # flame height varies across x and time
        top = 0.45 + 0.12 * cols + 0.05 * np.sin(8 * np.pi * xn + layout["phase"][0] + 1.3 * t)
        heat = np.clip((yn - (1 - top)) / np.maximum(top, 1e-3), 0, 1)  # 0 above the flames, 1 at the bottom
        colour = np.stack([255 * np.ones_like(heat), 90 + 120 * heat, 20 + 30 * heat], -1)
        return colour, np.clip(0.55 + 0.45 * np.sqrt(heat), 0, 1)
    if category == "sea_waves":
        band = 0.5 + 0.5 * np.sin(2 * np.pi * (5 * yn + 0.08 * t) + 0.6 * np.sin(2 * np.pi * xn + layout["phase"][1]))
        colour = np.stack([20 + 40 * band, 70 + 80 * band, 170 + 70 * band], -1)
        return colour, np.full((height, width), 0.9, np.float32)
    if category == "chirping_birds":
        cover = np.zeros((height, width), np.float32)
        r0 = max(1.5, min(height, width) / 40)
        for dy, dx, size in layout["dots"]:
            cy = (dy * height + 0.5 * np.sin(t / 3 + 6 * dx)) % height
            cx = (dx * width + 0.5 * np.cos(t / 4 + 6 * dy)) % width
            cover = np.maximum(cover, ((y - cy) ** 2 + (x - cx) ** 2 <= (r0 * (0.7 + size)) ** 2).astype(np.float32))
        colour = np.broadcast_to(np.array([40, 170, 60], np.float32), (height, width, 3)) * (0.6 + 0.4 * cover[..., None])
        return colour, np.clip(0.6 + 0.4 * cover, 0, 1)
    raise ValueError(f"no toy-world look for class {category!r}")


def render_video(
    seed: int, num_frames: int, height: int, width: int, color: tuple[int, int, int],
    scene: str | None = None, loudness=None,
):
    """Frames (F,H,W,3) uint8 and object masks (F,H,W) bool.

    With `scene` (a sound class), the background takes that class's toy-world look,
    its strength in frame k 0.5 + 0.5 * loudness[k] (loudness in [0, 1], default all
    ones); without it, the plain world (the same bytes as before the toy world existed).
    """
    rng = np.random.default_rng(seed)
    if scene is not None:
        layout = _look_layout(scene, seed, height, width)
        loud = np.ones(num_frames, np.float32) if loudness is None else np.clip(np.asarray(loudness, np.float32), 0, 1)
        if loud.shape != (num_frames,):
            raise ValueError(f"loudness must have one value per frame ({num_frames}), got shape {loud.shape}")
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
        if scene is not None:
            colour, cover = look_layer(scene, layout, t, height, width)
            alpha = (cover * (0.5 + 0.5 * loud[t]))[..., None]
            img = (1 - alpha) * img + alpha * colour
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        light = 0.75 + 0.25 * np.clip(1 - ((x - cx + rx / 3) ** 2 + (y - cy + ry / 3) ** 2) / (rx * ry), 0, 1)
        img[inside] = (shade[None, :] * light[inside][:, None]).clip(0, 255)
        frames[t] = img.astype(np.uint8)
        masks[t] = inside
    return frames, masks


def video_id(i: int) -> str:
    """The name of sample video i (its object; a number from the second round of objects on)."""
    obj = VIDEO_OBJECTS[i % len(VIDEO_OBJECTS)][0]
    return obj if i < len(VIDEO_OBJECTS) else f"{obj}-{i // len(VIDEO_OBJECTS) + 1}"


def _clip_fields(i: int, seed: int) -> tuple[int, str, str]:
    return i % 5 + 1, f"{seed:03d}{i:04d}", chr(ord("A") + i // len(AUDIO_CLASSES) % 26)


def clip_id(i: int, seed: int) -> str:
    """The id (file stem, ESC-50 naming {fold}-{source}-{take}-{target}) of sample clip i."""
    fold, src, take = _clip_fields(i, seed)
    return f"{fold}-{src}-{take}-{AUDIO_CLASSES[i % len(AUDIO_CLASSES)][1]}"


def toy_source_audio(videos: int, clips: int, seed: int) -> dict[str, str]:
    """In the toy world, video i shows the look of clip i % clips: that clip is its source audio."""
    return {video_id(i): clip_id(i % clips, seed) for i in range(videos)}


def write_davis(
    root: Path, num_videos: int, num_frames: int, height: int, width: int, seed: int,
    scenes: list[tuple[str, np.ndarray]] | None = None,
) -> list[str]:
    """Videos; with `scenes`, video i gets the look scenes[i][0] with per-frame loudness scenes[i][1]."""
    names = []
    for i in range(num_videos):
        color = VIDEO_OBJECTS[i % len(VIDEO_OBJECTS)][1]
        name = video_id(i)
        scene, loud = scenes[i] if scenes is not None else (None, None)
        frames, masks = render_video(seed * 1000 + i, num_frames, height, width, color, scene=scene, loudness=loud)
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
        fold, src, take = _clip_fields(i, seed)
        filename = f"{clip_id(i, seed)}.wav"
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
    world: str = "plain",
) -> SampleData:
    """world "plain": textured backgrounds unrelated to the sound; "toy": video i shows the look of
    clip i % clips's class, pulsing with that clip's loudness (module docstring)."""
    out = Path(out)
    if videos < 1 or clips < 1 or frames < 1:
        raise ValueError("sample data needs at least one video, one clip and one frame")
    if world not in ("plain", "toy"):
        raise ValueError(f"world must be 'plain' or 'toy', got {world!r}")
    davis, esc = out / "davis", out / "esc50"
    c = write_esc50(esc, clips, seed)
    scenes = None
    if world == "toy":
        scenes = []
        for i in range(videos):
            j = i % clips
            category = AUDIO_CLASSES[j % len(AUDIO_CLASSES)][0]
            wav = synthesize_clip(category, seed * 1000 + j)  # the bytes write_esc50 wrote for clip j
            scenes.append((category, frame_loudness(wav, 44100, frames)))
    v = write_davis(davis, videos, frames, height, width, seed, scenes=scenes)
    return SampleData(davis_root=davis, esc50_root=esc, videos=v, clips=c)
