"""A stand-in edit stage for the metrics, ablation and report tests (the diffusion stages are separate work).

`FakeEditStage` has the stage-module interface (STAGE, work_items, run_batch) and
writes what the edit stage writes: uint8 frames in Zarr `edits/{video}/{audio}/{variant}`
(array "frames") and an H.264 MP4 at <workdir>/outputs/{variant}/{video}/{audio}.mp4.
Like the edit stage, it makes one item per (pair, variant) for the variants in
`stages.finetune.variants`, keyed on the variant's switches (`variants`). Its
"edit" repaints the background with a colour per clip, stronger where the clip
is louder (M_a), and keeps the foreground; switching a part off degrades it the
way the paper's ablations show (no TASI: no semantics; no SceneMasker: the
foreground changes; no Frequency Fuser: flicker).
"""
from __future__ import annotations

import types

import numpy as np
from prefect import task

from storage import StageKey
from tasks import audio as audio_stage
from tasks import frames as frames_stage
from tasks import masks as masks_stage
from tasks.grid import select_pairs
from tasks.metrics import mp4_path
from tasks.stage import WorkItem, run_items
from tasks.stage_task import StageCachePolicy, batch_summary, open_store_and_ledger
from tests.media_factory import write_mp4

STAGE = "edit"


def work_items(cfg, catalog) -> list[WorkItem]:
    videos = catalog.by_id("video")
    audio = {it.audio_id: it for it in audio_stage.work_items(cfg, catalog)}
    out = []
    for vid, aid in select_pairs(cfg, catalog):
        up = {"frames": frames_stage.item_key(cfg, videos[vid]).key,
              "masks": masks_stage.item_key(cfg, videos[vid]).key, "audio": audio[aid].key.key}
        for variant in cfg.stages.finetune.variants:
            switches = dict(cfg.variants[variant])
            key = StageKey.build(STAGE, "test", {"switches": switches}, upstream=up)
            out.append(WorkItem(STAGE, f"{vid}/{aid}/{variant}", f"edits/{vid}/{aid}/{variant}", key, video_id=vid,
                                audio_id=aid, variant=variant,
                                payload={"audio_artifact": audio[aid].artifact, "switches": switches}))
    return out


def fake_edit(source: np.ndarray, mask: np.ndarray, magnitude: np.ndarray, colour, switches: dict, seed: int = 0):
    src = source.astype(np.float64)
    w = np.clip(0.5 + 0.25 * magnitude, 0, 1)[:, None, None, None]  # louder frame -> stronger repaint
    paint = np.asarray(colour, np.float64)
    if not switches.get("tasi", True):
        paint = np.full(3, 128.0)  # no audio semantics reach the model
    out = np.where(mask[..., None], src, (1 - w) * src + w * paint)
    if not switches.get("scene_masker", True):
        out = np.where(mask[..., None], 0.6 * src + 0.4 * paint, out)  # the foreground changes too
    if not switches.get("frequency_fuser", True):
        rng = np.random.default_rng(seed)
        out = out + np.where(mask[..., None], 0, rng.normal(0, 25, size=(len(src), 1, 1, 3)))  # flicker
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _colour(audio_id: str) -> tuple[int, int, int]:
    rng = np.random.default_rng(sum(map(ord, audio_id)))
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def run_batch(cfg, items, store, ledger, progress=None, claims=None):
    def compute(item, writer):
        up = item.key.upstream
        src = store.read(frames_stage.artifact_path(item.video_id), up["frames"])["frames"]
        mask = store.read(masks_stage.artifact_path(item.video_id), up["masks"])["masks"]
        mag = store.read(item.payload["audio_artifact"], up["audio"])["magnitude"]
        frames = fake_edit(src, mask, mag, _colour(item.audio_id), item.payload["switches"])
        writer.write("frames", frames)
        path = mp4_path(cfg, item.video_id, item.audio_id, item.variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, frames, fps=8)

    return run_items(items, store, ledger, compute, progress=progress, claims=claims)


@task(name="edit-stand-in", cache_policy=StageCachePolicy())
def stage_task(cfg, items) -> dict:
    store, ledger = open_store_and_ledger(cfg)
    return batch_summary(run_batch(cfg, items, store, ledger))


def module() -> types.ModuleType:
    """This file as a stage module (what the pipeline's stage list holds)."""
    import sys

    return sys.modules[__name__]
