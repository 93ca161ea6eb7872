"""Latents stage: the base model's VAE over the frames -> Zarr `video/{id}/latents` (array "latents").

float32 (F, C, R/8, R/8) (C = 4 for SD): posterior mean x the VAE config's
scaling_factor (recorded in the attributes), encoded stages.video.latent_chunk
frames at a time (models.vae). Inversion starts from these. Cache key: the frames
key + the VAE's identity (the base folder's vae/ fingerprint, or tiny + seed).
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

STAGE = "latents"
CODE_VERSION = "1"
CONFIG_SECTION = "video"  # stages.video holds this stage's settings (batch_size, ...)
ARRAY = "latents"


def artifact_path(video_id: str) -> str:
    return f"video/{video_id}/latents"


def params(cfg) -> dict[str, Any]:
    return {"vae": model_identity(cfg, "base", subpath="vae"), "posterior": "mean"}


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


def load_vae(cfg):
    from models.vae import FrameVAE

    m = cfg.models
    if m.preset == "toy":
        from models import toy

        return toy.load_vae(device=m.device)
    if m.preset in BUILTIN_PRESETS:
        vae = FrameVAE.tiny(m.seed)
        vae.vae.to(m.device)
        return vae
    return FrameVAE.from_base_folder(m.paths.base, m.device, setting="models.paths.base")


def compute(cfg, item: WorkItem, writer: ArtifactWriter, store: ArtifactStore, model: Lazy) -> None:
    frames = read_upstream_frames(store, item)
    vae = model.get()
    latents = vae.encode(frames, chunk=cfg.stages.video.latent_chunk).numpy().astype("float32")
    writer.write(ARRAY, latents)
    writer.set_attrs(scaling_factor=vae.scaling_factor, posterior="mean")


def run_batch(
    cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None
) -> BatchResult:
    model = Lazy(lambda: load_vae(cfg))  # once per batch, on first use

    def compute_one(it, w):
        compute(cfg, it, w, store, model)

    return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)


@task(name="latents", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of videos; returns a small summary (never the data)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
