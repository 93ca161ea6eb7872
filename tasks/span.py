"""What an edit covers: its span of the video, its frame count N and the sound it plays (DESIGN 1 "Time").

Decided here, from the catalog (frame count and fps of the video, duration of the clip)
and the config, at planning time, so N is part of every key that depends on it:

- `video_frames(cfg, video)`: the frames the video stages (frames, masks, depth,
  latents) and the inversion hold for a video, M. span "clip" / "video": every frame
  from stages.video.start at stages.video.stride, capped at max_seconds of source time;
  independent of the clips, so adding a clip never invalidates a video's preprocessing.
  span "frames": exactly stages.video.num_frames.
- `edit_span(cfg, video, clip)`: the span of one edit (and of a fine-tuning run, with the
  video's source clip). N frames at fps_out = source fps / stride (or stages.edit.fps):
    "clip"   N = min(M, floor(clip seconds * fps_out + 1e-6)), at least 1: the first
             min(video, clip, max_seconds) seconds;
    "video"  N = M: the whole video (capped), the sound padded with silence or looped
             past the clip's end (stages.edit.audio_fit);
    "frames" N = num_frames; M_a and F_a split the whole clip into N chunks (the paper's
             definition and its 8-frame figures), while the MP4 plays the clip's first
             N / fps_out seconds (as before spans existed).
  Frame k covers [k / fps_out, (k + 1) / fps_out) seconds of the clip ("clip" and
  "video"): that is chunk k of M_a and F_a, and the sound the MP4 plays under frame k.
  An edit uses the first N of the video's M frames, masks, depth maps and z_T.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.media import DEFAULT_FRAME_FOLDER_FPS

SPAN_MODES = ("clip", "video", "frames")
_EPS = 1e-6  # floor(seconds * fps + eps): 2.6 s at 10 fps is 26 frames, not 25 (2.6 * 10 = 25.999...)


class SpanError(ValueError):
    """An edit's span cannot be made; the message names the video (or clip) and why."""


def source_fps(entry: dict[str, Any]) -> float:
    return float(entry.get("fps") or DEFAULT_FRAME_FOLDER_FPS)


def output_fps(cfg, entry: dict[str, Any]) -> float:
    """The rate an edit of this video plays at: stages.edit.fps, else the source's fps / stride."""
    if cfg.stages.edit.fps is not None:
        return float(cfg.stages.edit.fps)
    return source_fps(entry) / cfg.stages.video.stride


def frames_from(total: int, start: int, stride: int) -> int:
    """How many frames start, start + stride, ... lie within `total` source frames."""
    return max(0, -(-(int(total) - int(start)) // int(stride)))


def frames_in(seconds: float, fps: float) -> int:
    """floor(seconds * fps + 1e-6): the whole frames that fit in `seconds` at `fps`."""
    return math.floor(float(seconds) * float(fps) + _EPS)


def video_frames(cfg, entry: dict[str, Any]) -> int:
    """M: frames of this video that the video stages hold (0: none from stages.video.start)."""
    v = cfg.stages.video
    if v.span == "frames":
        return v.num_frames
    available = frames_from(entry.get("num_frames") or 0, v.start, v.stride)
    cap = max(1, frames_in(v.max_seconds, source_fps(entry) / v.stride))
    return min(available, cap)


def video_params(cfg) -> dict[str, Any]:
    """The span settings in the video stages' keys: the same for "clip" and "video" (one
    preprocessing serves both); stages.video.num_frames only for "frames"."""
    v = cfg.stages.video
    common = {"stride": v.stride, "start": v.start}
    if v.span == "frames":
        return {"extent": "frames", "num_frames": v.num_frames, **common}
    return {"extent": "whole video", "max_seconds": v.max_seconds, **common}


@dataclass(frozen=True)
class Span:
    mode: str  # clip | video | frames
    frames: int  # N
    fps: float  # output frames per second
    start: int  # first source frame (stages.video.start)
    stride: int
    start_seconds: float  # where the span starts in the source video
    audio_seconds: float  # sound the MP4 plays: N / fps, from the clip's start
    audio_fit: str  # past the clip's end: "pad" (silence) or "loop"
    whole_clip: bool  # M_a / F_a from the whole clip in N chunks ("frames"), else chunk k = [k/fps, (k+1)/fps)
    max_seconds: float | None

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def key_params(self) -> dict[str, Any]:
        return asdict(self)


def edit_span(cfg, video: dict[str, Any], clip: dict[str, Any] | None) -> Span:
    """The span of an edit of `video` driven by `clip` (catalog entries). SpanError when the video
    has no frame from stages.video.start, or the clip's duration is unknown."""
    v, e = cfg.stages.video, cfg.stages.edit
    fps = output_fps(cfg, video)
    m = video_frames(cfg, video)
    if m < 1:
        total = video.get("num_frames") or 0
        raise SpanError(
            f"video '{video.get('id')}' is too short: it has {total} frame{'s' if total != 1 else ''}, none from "
            f"frame {v.start} (stages.video.start) at stride {v.stride}"
        )
    fit = "pad"
    if v.span == "frames":
        n = v.num_frames
    elif v.span == "video":
        n, fit = m, e.audio_fit
    else:
        seconds = (clip or {}).get("duration_s")
        if not seconds or not seconds > 0:
            raise SpanError(f"clip '{(clip or {}).get('id')}' has no known duration; it cannot set an edit's span")
        n = min(m, max(1, frames_in(seconds, fps)))
    return Span(
        mode=v.span, frames=n, fps=fps, start=v.start, stride=v.stride,
        start_seconds=v.start / source_fps(video), audio_seconds=n / fps, audio_fit=fit,
        whole_clip=v.span == "frames", max_seconds=None if v.span == "frames" else v.max_seconds,
    )


def chunk_edges(span: Span) -> np.ndarray | None:
    """Chunk edges in seconds of the clip (N + 1,), or None for "whole clip in N chunks"."""
    if span.whole_clip:
        return None
    return np.arange(span.frames + 1, dtype=np.float64) / span.fps


def span_from_payload(d: dict[str, Any]) -> Span:
    return Span(**d)
