"""Masks stage: bool (F, R, R) foreground masks in Zarr `video/{id}/masks` (array "masks").

stages.video.mask_source picks where masks come from (DESIGN 1 "Masks"):
- "grounded_sam": Grounding DINO finds the catalog label (the caption) on frame 0,
  SAM turns the best box into a mask, XMem propagates it through the stored frames;
  mask = XMem foreground probability > mask_threshold (frame 0 is SAM's mask).
  Attributes: the detection (box, score) and the caption.
- "dataset": the DAVIS annotation PNGs of the same source frames, through the same
  crop and resize as the frames (nearest neighbour); all object ids (union) or
  `mask_object_id`. The annotation folder must hold one PNG per frame.

Both work on the frames artifact (upstream), so masks match frames pixel for pixel.
Cache key: content hash (+ the annotations' hash for dataset masks), the frames
key, the source's parameters and the model identities (tiny preset + seed, or the
weights' fingerprints).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from storage.state import memo
from tasks import frames as frames_stage
from tasks import interrupts, span
from tasks.config import BUILTIN_PRESETS
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, run_logged_batch, task
from tasks.video import (
    Lazy,
    VideoItemError,
    catalog_videos,
    entry_payload,
    model_identity,
    read_annotation_masks,
    read_upstream_frames,
    run_video_items,
)

STAGE = "masks"
CODE_VERSION = "1"
CONFIG_SECTION = "video"  # stages.video holds this stage's settings (batch_size, ...)
ARRAY = "masks"


def artifact_path(video_id: str) -> str:
    return f"video/{video_id}/masks"


def _caption(entry: dict[str, Any]) -> str | None:
    def build():
        from models.grounded_sam import normalize_caption

        try:
            return normalize_caption(entry.get("label") or "")
        except ValueError:
            return None  # the item fails at run time, naming the video

    return memo("models.grounded_sam.normalize_caption", entry.get("label") or "", build)


def xmem_memory_config(cfg, entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full memory settings XMem will use over the video's frames (defaults filled in), for the cache key."""
    options = dict(cfg.stages.video.xmem)
    n = span.video_frames(cfg, entry) if entry is not None else cfg.stages.video.num_frames

    def build():
        from models.xmem import MemoryConfig

        return dataclasses.asdict(MemoryConfig.from_kwargs(options, num_frames=n))

    return memo("models.xmem.MemoryConfig", {"options": options, "num_frames": n}, build)


def params(cfg, entry: dict[str, Any]) -> dict[str, Any]:
    v = cfg.stages.video
    if v.mask_source == "dataset":
        return {"source": "dataset", "object_id": v.mask_object_id}
    return {
        "source": "grounded_sam",
        "caption": _caption(entry),
        "box_threshold": v.box_threshold,
        "text_threshold": v.text_threshold,
        "mask_threshold": v.mask_threshold,
        "xmem_memory": xmem_memory_config(cfg, entry),
        "models": {
            "grounding_dino": model_identity(cfg, "grounding_dino"),
            "sam": model_identity(cfg, "sam"),
            "xmem": model_identity(cfg, "xmem"),
        },
    }


def item_key(cfg, entry: dict[str, Any]) -> StageKey:
    inputs = {"video": entry["content_hash"]}
    if cfg.stages.video.mask_source == "dataset":
        inputs["annotations"] = entry.get("annotations_hash") or "none"
    return StageKey.build(
        STAGE, CODE_VERSION, params(cfg, entry), inputs=inputs, upstream={"frames": frames_stage.item_key(cfg, entry).key}
    )


def work_items(cfg, catalog) -> list[WorkItem]:
    out = []
    for e in catalog_videos(catalog):
        payload = {**entry_payload(e), "frames_artifact": frames_stage.artifact_path(e["id"]), "caption": _caption(e)}
        key = item_key(cfg, e)
        out.append(WorkItem(STAGE, e["id"], artifact_path(e["id"]), key, video_id=e["id"], payload=payload))
    return out


# ----------------------------------------------------------------------------- models


def load_grounded_sam(cfg):
    from models.grounded_sam import GroundedSAM

    m = cfg.models
    if m.preset in BUILTIN_PRESETS:
        return GroundedSAM.tiny(m.seed).to(m.device)
    return GroundedSAM.from_folders(
        m.paths.grounding_dino, m.paths.sam, m.device,
        dino_setting="models.paths.grounding_dino", sam_setting="models.paths.sam",
    )


def load_xmem(cfg):
    from models.checkpoints import MissingWeightsError
    from models.xmem import XMem

    m = cfg.models
    if m.preset in BUILTIN_PRESETS:
        return XMem.tiny(m.seed).to(m.device).eval()
    if m.paths.xmem is None:
        raise MissingWeightsError(
            "XMem: models.paths.xmem is not set; expected the path of XMem.pth (nothing is downloaded)"
        )
    return XMem.from_checkpoint(m.paths.xmem).to(m.device).eval()


# ----------------------------------------------------------------------------- compute


def grounded_sam_masks(gsam, xmem, frames: np.ndarray, caption: str, v) -> tuple[np.ndarray, dict[str, Any]]:
    """Grounded-SAM on frame 0, XMem through all frames -> bool (F, H, W) and the detection."""
    from models.xmem import propagate

    first, det = gsam.first_mask(frames[0], caption, v.box_threshold, v.text_threshold)
    if not first.any():
        raise ValueError(f"SAM returned an empty mask for caption {caption!r} (box {det.as_dict()['box']})")
    # Every frame is a safe point for a stop (tasks.interrupts): XMem over a long span takes a while.
    prob = propagate(xmem, frames, first, progress=lambda done, total: interrupts.check(), **dict(v.xmem))
    masks = np.asarray(prob.numpy() if hasattr(prob, "numpy") else prob) > v.mask_threshold
    masks[0] = first  # the given mask, exactly (XMem returns it for frame 0 as a probability)
    return masks, {"detection": det.as_dict(), "caption": caption}


def compute(cfg, item: WorkItem, writer: ArtifactWriter, store: ArtifactStore, models: dict[str, Lazy]) -> None:
    v = cfg.stages.video
    frames = read_upstream_frames(store, item)
    attrs: dict[str, Any] = {"source": v.mask_source}
    if v.mask_source == "dataset":
        frame_attrs = store.attrs(item.payload["frames_artifact"], item.key.upstream["frames"]) or {}
        indices = frame_attrs.get("source_indices")
        if indices is None:
            raise VideoItemError(item.video_id, "its frames artifact does not record the source frame indices")
        if item.payload.get("kind") != "frames":
            raise VideoItemError(
                item.video_id, "dataset masks need a DAVIS frame folder with Annotations; this is a video file"
            )
        masks = read_annotation_masks(
            item.video_id, item.payload.get("annotations_path"), item.payload["path"], indices, v.mask_object_id,
            v.resolution, frame_attrs.get("source_size"),
        )
        attrs["object_id"] = v.mask_object_id
    else:
        caption = item.payload.get("caption")
        if not caption:
            raise VideoItemError(item.video_id, "has no catalog label to use as the Grounding DINO caption")
        masks, info = grounded_sam_masks(models["grounded_sam"].get(), models["xmem"].get(), frames, caption, v)
        attrs.update(info)
    if masks.shape != frames.shape[:3]:
        raise VideoItemError(
            item.video_id, f"{masks.shape[0]} masks of {masks.shape[1]}x{masks.shape[2]} for {frames.shape[0]} frames of "
            f"{frames.shape[1]}x{frames.shape[2]}; masks and frames must correspond one to one"
        )
    writer.write(ARRAY, masks.astype(bool))
    writer.set_attrs(**attrs)


def run_batch(
    cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None
) -> BatchResult:
    # Models load once per batch, on first use (dataset masks never load them).
    models = {"grounded_sam": Lazy(lambda: load_grounded_sam(cfg)), "xmem": Lazy(lambda: load_xmem(cfg))}

    def compute_one(it, w):
        compute(cfg, it, w, store, models)

    return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)


@task(name="masks", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of videos; returns a small summary (never the data)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
