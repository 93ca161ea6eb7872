"""Probing media files: what a file really is (by content), and its basic facts.

Extensions lie (real ESC-style files exist that are MP3 streams named .wav), so
audio format comes from the first bytes. Every failure is a `MediaError` whose
message names the file and the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
FRAME_EXTENSIONS = {".jpg", ".jpeg", ".png"}
DEFAULT_FRAME_FOLDER_FPS = 24.0  # DAVIS sequences are 24 fps


class MediaError(ValueError):
    """A media file cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def sniff_audio_format(path: str | os.PathLike) -> str:
    """'wav', 'flac', 'ogg', 'mp3' or 'aiff' from the file's first bytes."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise MediaError(p, f"cannot be read ({e.strerror or e})") from e
    if not head:
        raise MediaError(p, "is empty (0 bytes)")
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return "mp3"
    raise MediaError(p, f"is not a recognised audio file (first bytes {head[:4]!r}; expected WAV, FLAC, Ogg or MP3)")


@dataclass(frozen=True)
class AudioInfo:
    format: str
    sample_rate: int
    channels: int
    num_samples: int

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate if self.sample_rate else 0.0


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    fmt = sniff_audio_format(path)
    try:
        import soundfile as sf

        info = sf.info(os.fspath(path))
        frames, rate, channels = int(info.frames), int(info.samplerate), int(info.channels)
    except Exception:
        frames, rate, channels = _probe_audio_av(path)
    if rate <= 0 or channels <= 0:
        raise MediaError(path, "has no usable audio stream")
    if frames <= 0:
        raise MediaError(path, "holds no audio samples")
    return AudioInfo(format=fmt, sample_rate=rate, channels=channels, num_samples=frames)


def _probe_audio_av(path: str | os.PathLike) -> tuple[int, int, int]:
    import av

    try:
        with av.open(os.fspath(path)) as c:
            if not c.streams.audio:
                raise MediaError(path, "has no audio stream")
            s = c.streams.audio[0]
            rate = int(s.rate or s.codec_context.sample_rate or 0)
            channels = int(s.codec_context.channels if hasattr(s.codec_context, "channels") else s.channels)
            if s.duration and s.time_base:
                frames = int(round(float(s.duration * s.time_base) * rate))
            else:
                frames = sum(fr.samples for fr in c.decode(s))
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(path, f"cannot be decoded as audio ({type(e).__name__}: {e})") from e
    return frames, rate, channels


@dataclass(frozen=True)
class VideoInfo:
    format: str
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


def frame_files(folder: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS)


def probe_frame_folder(folder: str | os.PathLike, fps: float = DEFAULT_FRAME_FOLDER_FPS) -> VideoInfo:
    """Count frames and check every image decodes; sizes must agree."""
    from PIL import Image

    files = frame_files(folder)
    if not files:
        raise MediaError(folder, "holds no .jpg/.png frames")
    size = None
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:
                this = im.size
                # verify() does not decode a JPEG, so a truncated one passes it; decoding at 1/8
                # scale (draft) still reads every byte, at a fraction of a full decode's cost.
                im.draft("RGB", (1, 1))
                im.load()
        except Exception as e:
            raise MediaError(f, f"is not a readable image ({type(e).__name__}: {e})") from e
        if size is None:
            size = this
        elif this != size:
            raise MediaError(f, f"has size {this[0]}x{this[1]}, other frames are {size[0]}x{size[1]}")
    fmt = "jpeg-frames" if files[0].suffix.lower() in (".jpg", ".jpeg") else "png-frames"
    return VideoInfo(format=fmt, num_frames=len(files), fps=fps, width=size[0], height=size[1])


def probe_video_file(path: str | os.PathLike) -> VideoInfo:
    import av

    p = Path(path)
    if p.stat().st_size == 0:
        raise MediaError(p, "is empty (0 bytes)")
    try:
        with av.open(os.fspath(p)) as c:
            if not c.streams.video:
                raise MediaError(p, "has no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            n = int(s.frames or 0)
            if n <= 0:
                n = sum(1 for _ in c.decode(s))
            w, h = int(s.codec_context.width), int(s.codec_context.height)
            names = (c.format.name or "video").split(",")
            ext = p.suffix.lower().lstrip(".")
            fmt = ext if ext in names else names[0]
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(p, f"cannot be decoded as video ({type(e).__name__}: {e})") from e
    if n <= 0:
        raise MediaError(p, "holds no video frames")
    return VideoInfo(format=fmt, num_frames=n, fps=fps or DEFAULT_FRAME_FOLDER_FPS, width=w, height=h)
