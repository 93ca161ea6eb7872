"""Inversion stage: DDIM inversion of the source latents -> Zarr `inversion/{video}/{model}`.

I(E(V)) of paper eq. 6, with the zero audio condition and the blank prompt, over
the base's DDIM schedule (models.ddim: exact mirror of the sampler for epsilon and
v-prediction), stages.inversion.steps steps (50).

Which model inverts (stages.inversion.model):
- "base" (default, DESIGN 1): the inflated base model with its new parts at
  initialisation; one inversion per video serves every variant. {model} = "base".
- "finetuned": each variant's fine-tuned model (Tune-A-Video's practice); a separate
  artifact per fine-tuned model, {model} = "ft-<training variant>" (tasks.diffusion).

Arrays: "z_T" float32 (F, C, h, w), the layout of the latents; "timesteps" int64
(steps,) in sampling order; with save_trajectory (or when editing blends the
foreground) "trajectory" float32 (steps + 1, F, C, h, w): index 0 is the source
latents, index k the latent at timesteps[steps - k], the last z_T.
Cache key: the inverting model's identity (base fingerprint or tiny preset, U-Net 3D
config, scheduler, blank prompt; the fine-tuning key for "finetuned"), the
settings, and the latents' key (upstream).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from tasks.stage_lazy import torch  # imported on first use: planning needs no torch

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from tasks import diffusion, interrupts
from tasks import latents as latents_stage
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, run_logged_batch, task
from tasks.video import Lazy, run_video_items

STAGE = "inversion"
CONFIG_SECTION = "inversion"


def artifact_path(video_id: str, model: str) -> str:
    return f"inversion/{video_id}/{model}"


def model_tag(cfg, variant: str | None = None) -> str:
    """{model} of the artifact path: "base", or "ft-<training variant>" for fine-tuned inversion."""
    if cfg.stages.inversion.model == "base":
        return "base"
    return f"ft-{diffusion.training_variant(cfg, variant or 'full')}"


def keeps_trajectory(cfg) -> bool:
    return cfg.stages.inversion.save_trajectory or cfg.stages.edit.foreground_blend


def params(cfg, model: dict[str, Any]) -> dict[str, Any]:
    s = cfg.stages.inversion
    return {
        "steps": s.steps, "fixed_point_iters": s.fixed_point_iters, "trajectory": keeps_trajectory(cfg),
        "condition": "zero audio, blank prompt", "model": model, "precision": cfg.models.precision,
        "windows": diffusion.windows(cfg),
    }


def _videos(cfg, catalog) -> list[dict[str, Any]]:
    from tasks.grid import selected_videos

    wanted = set(selected_videos(cfg, catalog))
    return [e for e in catalog.entries if e["media"] == "video" and e["id"] in wanted]


def work_items(cfg, catalog) -> list[WorkItem]:
    """One item per selected video ("base"), or per (video, fine-tuned model) ("finetuned")."""
    lat = {it.video_id: it for it in latents_stage.work_items(cfg, catalog)}
    base = {"base": diffusion.base_identity(cfg), "scheduler": diffusion.scheduler_identity(cfg)}
    items = []
    if cfg.stages.inversion.model == "base":
        model = {**base, "kind": "base", "unet3d": diffusion.unet_config(cfg, None, training=True)}
        for e in _videos(cfg, catalog):
            items.append(_item(cfg, e["id"], "base", lat[e["id"]], params(cfg, model), {}))
        return items
    from tasks import finetune as finetune_stage

    for ft in finetune_stage.work_items(cfg, catalog):
        tag = f"ft-{ft.variant}"
        model = {**base, "kind": "finetuned", "variant": ft.variant,
                 "unet3d": diffusion.unet_config(cfg, ft.variant, training=True)}
        extra = {"finetune_artifact": ft.artifact, "finetune_key": ft.key.key, "variant": ft.variant}
        items.append(_item(cfg, ft.video_id, tag, lat[ft.video_id], params(cfg, model), {"finetune": ft.key.key},
                           extra))
    return items


def _item(cfg, vid: str, tag: str, lat: WorkItem, p: dict, upstream: dict, extra: dict | None = None) -> WorkItem:
    key = StageKey.build(STAGE, cfg.stages.inversion.code_version, p, upstream={"latents": lat.key.key, **upstream})
    payload = {"latents_artifact": lat.artifact, "latents_key": lat.key.key, "model_tag": tag,
               "unet3d": p["model"]["unet3d"], **(extra or {})}
    return WorkItem(STAGE, f"{vid}/{tag}", artifact_path(vid, tag), key, video_id=vid, variant=tag, payload=payload)


def item_for(items: list[WorkItem], cfg, video_id: str, variant: str) -> WorkItem | None:
    """The inversion an edit of `video_id` with `variant` starts from."""
    want = f"{video_id}/{model_tag(cfg, variant)}"
    return next((it for it in items if it.item_id == want), None)


# ----------------------------------------------------------------------------- compute


def invert_latents(model, ddim, z0: torch.Tensor, prompt: torch.Tensor, trajectory: bool = False,
                   fixed_point_iters: int = 0, window: int | None = None, overlap: int = 0):
    """z0 (1, C, F, h, w) -> (z_T, trajectory list or None) with the zero audio condition.

    The span is denoised in windows of `window` frames (models.windows; None = all at once),
    laid out as the edits lay them out, so that sampling retraces the inversion.
    """
    from models.windows import WindowedModel

    def out(x, t, w):
        interrupts.check()  # a safe point: every window of every step
        return model(x, t, prompt, audio=None, anchored=w.anchored).sample

    windowed = WindowedModel(out, z0.shape[2], window, overlap, anchor=model.config.sparse_causal_attention)
    return ddim.invert(windowed, z0, trajectory=trajectory, fixed_point_iters=fixed_point_iters)


def compute(cfg, item: WorkItem, writer: ArtifactWriter, store: ArtifactStore, models: dict[str, Any]) -> None:
    from models.ddim import DDIM

    s = cfg.stages.inversion
    p = item.payload
    lat = diffusion.read_required(store, p["latents_artifact"], p["latents_key"], ["latents"], "latents", item.video_id)
    slot = ("ft", p["finetune_key"]) if "finetune_artifact" in p else ("base", None)
    if slot not in models:
        if slot[0] == "ft":
            from tasks.finetune import weights_file

            wpath = weights_file(store, p["finetune_artifact"], p["finetune_key"], item.video_id)
            models[slot] = Lazy(lambda: diffusion.load_unet(cfg, p["unet3d"], wpath))
        else:
            models[slot] = Lazy(lambda: diffusion.load_unet(cfg, p["unet3d"]))
    unet = models[slot].get()
    ddim = DDIM(diffusion.load_scheduler_config(cfg), s.steps)
    prompt = diffusion.blank_prompt(cfg).to(unet.device)
    z0 = diffusion.to_model_layout(lat["latents"]).to(unet.device, torch.float32)
    started = time.time()
    with diffusion.inference_autocast(cfg):
        z_T, traj = invert_latents(unet, ddim, z0, prompt, keeps_trajectory(cfg), s.fixed_point_iters,
                                   **diffusion.windows(cfg))
    z_T, traj = z_T.float(), (None if traj is None else [x.float() for x in traj])
    writer.write("z_T", diffusion.to_stored_layout(z_T))
    writer.write("timesteps", ddim.timesteps.numpy().astype(np.int64))
    if traj is not None:
        shape = (len(traj), *lat["latents"].shape)
        # One chunk per level (~1.2 MB at 768 px): each level is written once, and blending reads them in order.
        arr = writer.create("trajectory", shape, np.float32, chunks=(1, *shape[1:]))
        for k, x in enumerate(traj):
            arr[k] = diffusion.to_stored_layout(x)
    writer.set_attrs(
        steps=s.steps, prediction_type=ddim.prediction_type, model=p["model_tag"], latents_key=p["latents_key"],
        fixed_point_iters=s.fixed_point_iters, trajectory=traj is not None, seconds=round(time.time() - started, 3),
        windows=diffusion.windows(cfg),
        trajectory_order="index 0 = source latents, index k = latent at timesteps[steps - k], last = z_T",
    )


def run_batch(cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None,
              model=None) -> BatchResult:
    """Invert each item; the base model (or each fine-tuned one) loads once per batch, on first use."""
    models: dict[Any, Lazy] = {}
    if model is not None:
        models[("base", None)] = Lazy(lambda: model)

    def compute_one(it, w):
        compute(cfg, it, w, store, models)

    with torch.no_grad():
        return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)


@task(name="inversion", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of videos; returns a small summary (never the data)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
