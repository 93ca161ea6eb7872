"""Depth stage: MiDaS DPT-hybrid per frame -> Zarr `video/{id}/depth` (array "depth").

(F, R, R), stages.video.depth_dtype (float16 by default, or float32), each frame
min-max normalised to [0, 1] with 1 = nearest (models.depth). The depth ControlNet
reads it. Cache key: the frames key + dtype + the estimator's identity.
"""
from __future__ import annotations

from typing import Any

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from tasks import frames as frames_stage
from tasks.config import BUILTIN_PRESETS
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, run_logged_batch, task
from tasks.video import (
    Lazy,
    catalog_videos,
    entry_payload,
    model_identity,
    read_upstream_frames,
    run_video_items,
)

STAGE = "depth"
CODE_VERSION = "1"
CONFIG_SECTION = "video"  # stages.video holds this stage's settings (batch_size, ...)
ARRAY = "depth"


def artifact_path(video_id: str) -> str:
    return f"video/{video_id}/depth"


def params(cfg) -> dict[str, Any]:
    return {"dtype": cfg.stages.video.depth_dtype, "model": model_identity(cfg, "depth")}


def item_key(cfg, entry: dict[str, Any]) -> StageKey:
    return StageKey.build(
        STAGE, CODE_VERSION, params(cfg), inputs={"video": entry["content_hash"]},
        upstream={"frames": frames_stage.item_key(cfg, entry).key},
    )


def work_items(cfg, catalog) -> list[WorkItem]:
    return [
        WorkItem(
            stage=STAGE, item_id=e["id"], artifact=artifact_path(e["id"]), key=item_key(cfg, e), video_id=e["id"],
            payload={**entry_payload(e), "frames_artifact": frames_stage.artifact_path(e["id"])},
        )
        for e in catalog_videos(catalog)
    ]


def load_depth(cfg):
    from models.depth import DepthEstimator

    m = cfg.models
    if m.preset in BUILTIN_PRESETS:
        est = DepthEstimator.tiny(m.seed)
        est.model.to(m.device)
        return est
    return DepthEstimator.from_folder(m.paths.depth, m.device, setting="models.paths.depth")


def compute(cfg, item: WorkItem, writer: ArtifactWriter, store: ArtifactStore, model: Lazy) -> None:
    v = cfg.stages.video
    frames = read_upstream_frames(store, item)
    depth = model.get()(frames, batch_size=v.depth_batch).numpy().astype(v.depth_dtype)
    writer.write(ARRAY, depth)
    writer.set_attrs(normalised="per-frame min-max, 1 = nearest", dtype=v.depth_dtype)


def run_batch(
    cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None
) -> BatchResult:
    model = Lazy(lambda: load_depth(cfg))  # once per batch, on first use

    def compute_one(it, w):
        compute(cfg, it, w, store, model)

    return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)


@task(name="depth", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of videos; returns a small summary (never the data)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
