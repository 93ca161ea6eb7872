"""Frames stage: catalog video -> uint8 (F, R, R, 3) in Zarr `video/{id}/frames` (array "frames").

DAVIS JPEG folders and video files (PyAV). The frames every edit of the video may
need (tasks.span.video_frames): span "clip"/"video", every frame from `start` at
`stride` up to max_seconds; span "frames", exactly num_frames. Each is resampled from
the largest centred square to R x R (stages.video.resolution); see tasks.video for the
geometry and the too-few-frames policy. Attributes: source_indices, source_size (H, W), fps.

Cache key: the video's content hash + the span extent (tasks.span.video_params:
whole video + max_seconds, or num_frames), stride, start, resolution; never the clips.
"""
from __future__ import annotations

from typing import Any

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from tasks import span
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, run_logged_batch, task
from tasks.video import (
    TooFewFramesError,
    catalog_videos,
    entry_payload,
    read_frames,
    run_video_items,
)

STAGE = "frames"
CODE_VERSION = "2"  # 2: the whole video from `start` (span clip/video), not num_frames frames
CONFIG_SECTION = "video"  # stages.video holds this stage's settings (batch_size, ...)
ARRAY = "frames"


def artifact_path(video_id: str) -> str:
    return f"video/{video_id}/frames"


def params(cfg) -> dict[str, Any]:
    return {**span.video_params(cfg), "resolution": cfg.stages.video.resolution}


def item_key(cfg, entry: dict[str, Any]) -> StageKey:
    return StageKey.build(STAGE, CODE_VERSION, params(cfg), inputs={"video": entry["content_hash"]})


def work_items(cfg, catalog) -> list[WorkItem]:
    return [
        WorkItem(
            stage=STAGE, item_id=e["id"], artifact=artifact_path(e["id"]), key=item_key(cfg, e), video_id=e["id"],
            payload={**entry_payload(e), "fps": e.get("fps"), "span_frames": span.video_frames(cfg, e)},
        )
        for e in catalog_videos(catalog)
    ]


def compute(cfg, item: WorkItem, writer: ArtifactWriter) -> None:
    v = cfg.stages.video
    count = item.payload["span_frames"]
    if count < 1:
        total = item.payload.get("num_frames") or 0
        raise TooFewFramesError(
            item.video_id, f"is too short: it has {total} frame{'s' if total != 1 else ''} ({item.payload['path']}), "
            f"none from frame {v.start} (stages.video.start); lower stages.video.start or leave the video out",
        )
    frames, indices, size = read_frames(item.payload, count, v.stride, v.start, v.resolution)
    writer.write(ARRAY, frames)
    writer.set_attrs(
        source_indices=indices, source_size=list(size), fps=item.payload.get("fps"), resolution=v.resolution
    )


def run_batch(
    cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None
) -> BatchResult:
    def compute_one(it, w):
        compute(cfg, it, w)

    return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)


@task(name="frames", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of videos; returns a small summary (never the data)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
