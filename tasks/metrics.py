"""Evaluation metrics (paper 5.3, DESIGN 1 "Metrics") and the metrics stage.

Pure functions (public seams, DESIGN 7):

- `masked_ssim(source, edited, mask)`: the SSIM map of Wang et al. (2004) between
  source and edited frames, averaged over foreground pixels only. Settings (those
  of the paper by Wang et al., and scikit-image's `structural_similarity` with
  `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
  channel_axis=-1`): 11 x 11 Gaussian window (sigma 1.5, truncated at 3.5 sigma:
  radius 5), K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, borders by
  half-sample symmetric reflection. Computed per frame (the window never spans
  frames) and per RGB channel: a hue change of the foreground (the paper's red car
  turning black) must count even where the luminance barely moves, which a
  grayscale SSIM would miss. The map is averaged over channels and then over
  every foreground pixel of every frame (each pixel weighs the same). Because the
  window has radius 5, pixels more than 5 px (Chebyshev distance) from every
  foreground pixel do not enter the value. No foreground at all gives NaN.
- `scene_change_correlation(source, edited, mask, magnitude)`: the paper's claim of the
  Magnitude Modulator (4.4: louder sound, stronger change) as a number: the Pearson
  correlation over frames of the scene's change (mean |edited - source| over RGB and
  the pixels outside the mask, 0..255) with the M_a that drove each frame. NaN with
  fewer than 2 frames with scene pixels, or when either series is constant.
- `clip_scores(frames_embeds, text_embeds_target, text_embeds_source=None)`:
  CLIP-T = mean over frames of 100 x cos(frame, target text); CLIP-F = mean cosine
  over all ordered frame pairs i != j; Temp-S = CLIP-F x CLIP-T; Sem-A = fraction
  of frames whose CLIP-T for the target text exceeds (strictly) that for the
  source text, None without a source text.

The stage: one item per edit (`edits/{video}/{audio}/{variant}`), over every frame of
the edit's span (the first N frames of its video's frames and masks), keyed on the
edit's key and the source frames' and masks' keys (DESIGN 4). It writes
`metrics/{video}/{audio}/{variant}` (per-frame arrays: clip_t, clip_t_source,
ssim; the scores as attributes) and `write_metrics_table` gathers the current
items into `<workdir>/metrics/metrics.parquet` (one row per edit, columns in
METRICS_COLUMNS) and `<workdir>/metrics/by_variant.parquet` (the paper's Tables
1-2 shape: one row per method variant).

Text: "a photo of {label}" (stages.metrics.prompt) with the clip's catalog class
label, underscores as spaces ("crackling_fire" -> "a photo of crackling fire").
Sem-A's source condition is the label of the video's source audio (the clip it
was fine-tuned with, grid.source_audio): DAVIS has no sound, and that clip is
what the unedited model was conditioned on. When the target and source labels
are the same, Sem-A is undefined (None).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from storage.files import atomic_path
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, open_store_and_ledger, run_logged_batch, task
from tasks.video import Lazy, VideoItemError, model_identity, run_video_items

# ----------------------------------------------------------------------------- SSIM

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5, as scipy.ndimage computes it: an 11 x 11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_DATA_RANGE = 255.0
SSIM_SETTINGS = {
    "window": "gaussian", "sigma": SSIM_SIGMA, "truncate": SSIM_TRUNCATE, "K1": SSIM_K1, "K2": SSIM_K2,
    "data_range": SSIM_DATA_RANGE, "covariance": "population", "channels": "rgb-mean", "pooling": "foreground-pixels",
}


def _check_frames(name: str, frames) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (F, H, W, 3), got {a.dtype} {a.shape}")
    return a


def _check_pair(source, edited, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, e = _check_frames("source", source), _check_frames("edited", edited)
    if s.shape != e.shape:
        raise ValueError(f"source {s.shape} and edited {e.shape} frames differ in shape")
    m = np.asarray(mask)
    if m.dtype != bool:
        raise ValueError(f"mask must be bool (F, H, W), got {m.dtype}")
    if m.shape != s.shape[:3]:
        raise ValueError(f"mask {m.shape} does not match the frames {s.shape[:3]}")
    return s, e, m


def ssim_map(source_frame: np.ndarray, edited_frame: np.ndarray) -> np.ndarray:
    """Per-channel SSIM map of one frame pair, uint8 (H, W, 3) x2 -> float64 (H, W, 3).

    Equal to skimage.metrics.structural_similarity(..., channel_axis=-1, full=True)[1]
    with the module's settings; scipy's Gaussian filter over the two image axes at once.
    """
    from scipy.ndimage import gaussian_filter

    x = np.asarray(source_frame, np.float64)
    y = np.asarray(edited_frame, np.float64)
    if min(x.shape[:2]) < 2 * SSIM_RADIUS + 1:
        side = 2 * SSIM_RADIUS + 1
        raise ValueError(f"frames of {x.shape[1]}x{x.shape[0]} are smaller than the {side}-pixel SSIM window")

    def blur(a):
        return gaussian_filter(a, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode="reflect")

    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1, c2 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2, (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def masked_ssim_frames(source, edited, mask) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: (sum of the channel-mean SSIM map over foreground pixels, foreground pixel count)."""
    s, e, m = _check_pair(source, edited, mask)
    sums = np.zeros(len(s), np.float64)
    counts = m.reshape(len(m), -1).sum(axis=1)
    for f in range(len(s)):
        if counts[f]:
            sums[f] = ssim_map(s[f], e[f]).mean(axis=-1)[m[f]].sum()
    return sums, counts


def masked_ssim(source, edited, mask) -> float:
    """SSIM map averaged over the foreground (mask True) pixels of all frames; NaN without foreground."""
    sums, counts = masked_ssim_frames(source, edited, mask)
    total = int(counts.sum())
    return float(sums.sum() / total) if total else float("nan")


# ----------------------------------------------------------------------------- loudness


# In the metrics key: what the loudness figure measures (a change of it must recompute the scores).
SCENE_CHANGE = {"change": "mean abs RGB difference over the pixels outside the mask", "corr": "pearson vs M_a"}


def scene_change_correlation(source, edited, mask, magnitude) -> float:
    """corr over frames of (mean |edited - source| over the scene) with M_a; NaN when undefined (module doc)."""
    src, out = np.asarray(source, np.float64), np.asarray(edited, np.float64)
    scene = ~np.asarray(mask, bool)
    m = np.asarray(magnitude, np.float64).reshape(-1)
    if src.shape != out.shape or src.ndim != 4 or scene.shape != src.shape[:3] or len(m) != len(src):
        raise ValueError(f"scene change: frames {src.shape} / {out.shape}, masks {scene.shape} and "
                         f"{len(m)} magnitudes do not agree")
    diff = np.abs(out - src).mean(-1)
    has = scene.reshape(len(src), -1).any(1)
    change = np.array([diff[k][scene[k]].mean() for k in np.flatnonzero(has)])
    m = m[has]
    if len(change) < 2 or change.std() == 0 or m.std() == 0:
        return float("nan")
    return float(np.corrcoef(change, m)[0, 1])


# ----------------------------------------------------------------------------- CLIP scores


def _as_2d(name: str, x) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be (D,) or (N, D) embeddings, got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if not np.all(norms > 0) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds a zero or non-finite embedding")
    return a / norms


def _text(name: str, x) -> np.ndarray:
    a = _as_2d(name, x)
    if a.shape[0] != 1:
        raise ValueError(f"{name} must be one text embedding ((D,) or (1, D)), got {a.shape[0]}")
    return a[0]


def clip_scores(frames_embeds, text_embeds_target, text_embeds_source=None) -> dict[str, Any]:
    """CLIP-T, CLIP-F, Temp-S and Sem-A of one edited video from its CLIP embeddings.

    frames_embeds (F, D), one per edited frame; text embeddings (D,) or (1, D);
    torch tensors or arrays, normalised here. Returns floats (clip_t, clip_f, temp_s;
    sem_a None without a source text) and the per-frame CLIP-T lists clip_t_frames
    (and clip_t_source_frames with a source text). A single frame has no pairs:
    CLIP-F and Temp-S are then NaN.
    """
    frames = _as_2d("frames_embeds", frames_embeds)
    target = _text("text_embeds_target", text_embeds_target)
    if target.shape[0] != frames.shape[1]:
        raise ValueError(f"text embedding width {target.shape[0]} != frame embedding width {frames.shape[1]}")
    t_frames = 100.0 * frames @ target
    n = frames.shape[0]
    if n > 1:
        gram = frames @ frames.T
        clip_f = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    else:
        clip_f = float("nan")
    clip_t = float(t_frames.mean())
    out: dict[str, Any] = {
        "clip_t": clip_t, "clip_f": clip_f, "temp_s": clip_f * clip_t, "sem_a": None,
        "clip_t_frames": t_frames.tolist(),
    }
    if text_embeds_source is not None:
        source = _text("text_embeds_source", text_embeds_source)
        s_frames = 100.0 * frames @ source
        out["sem_a"] = float(np.mean(t_frames > s_frames))
        out["clip_t_source_frames"] = s_frames.tolist()
    return out


def label_text(label: str | None, template: str = "a photo of {label}") -> str:
    """The CLIP text of a class label: underscores and runs of spaces become single spaces."""
    words = " ".join((label or "").replace("_", " ").split())
    if not words:
        raise ValueError("a clip without a class label cannot be scored (CLIP-T needs its label)")
    return template.format(label=words)


# ----------------------------------------------------------------------------- variants

# Artifact-safe variant ids (Zarr path segments) -> the names the paper's tables use,
# in Table 2's row order (the full model last).
VARIANT_NAMES = {
    "no_tasi": "w/o TASI",
    "no_scene_masker": "w/o SceneMasker",
    "no_frequency_fuser": "w/o Frequency Fuser",
    "unmasked_frequency_fuser": "Frequency Fuser unmasked",
    "no_magnitude_modulator": "w/o Magnitude Modulator",
    "full": "Ours",
}


def variant_name(variant: str | None) -> str:
    return VARIANT_NAMES.get(variant or "full", variant or "full")


def variant_rank(variant: str) -> tuple[int, str]:
    order = list(VARIANT_NAMES)
    return (order.index(variant), variant) if variant in order else (len(order) - 1, variant)


# ----------------------------------------------------------------------------- the stage

STAGE = "metrics"
CONFIG_SECTION = "metrics"
BATCH_BY_VIDEO = True  # a batch reads one video's source frames and masks once
# Per-edit columns of metrics.parquet (in this order).
METRICS_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("audio_id", pa.string()),
    ("variant", pa.string()),  # artifact id of the method variant, e.g. "full", "no_tasi"
    ("variant_name", pa.string()),  # as in the paper's tables, e.g. "w/o TASI"
    ("target_label", pa.string()),  # class label of the driving clip
    ("source_audio_id", pa.string()),  # the clip the video was fine-tuned with
    ("source_label", pa.string()),
    ("video_label", pa.string()),  # the DAVIS object words
    ("target_text", pa.string()),  # the CLIP prompts actually scored
    ("source_text", pa.string()),
    ("num_frames", pa.int64()),
    ("clip_t", pa.float64()),  # mean over frames of 100 x cos(frame, target text)
    ("clip_f", pa.float64()),  # mean cos over ordered frame pairs i != j
    ("temp_s", pa.float64()),  # clip_f x clip_t
    ("sem_a", pa.float64()),  # fraction of frames with CLIP-T(target) > CLIP-T(source); null if labels equal
    ("masked_ssim", pa.float64()),  # SSIM map over foreground pixels; null without foreground
    ("ma_corr", pa.float64()),  # corr over frames of the scene's change with M_a; null if undefined
    ("foreground_fraction", pa.float64()),  # mask pixels / all pixels, over all frames
    ("key", pa.string()),  # this row's metrics cache key (ledger)
    ("metrics_artifact", pa.string()),
    ("edit_artifact", pa.string()),
    ("edit_key", pa.string()),
    ("edit_array", pa.string()),
    ("frames_artifact", pa.string()),
    ("frames_key", pa.string()),
    ("masks_artifact", pa.string()),
    ("masks_key", pa.string()),
    ("audio_artifact", pa.string()),  # for the report's magnitude curve
    ("audio_key", pa.string()),
    ("mp4", pa.string()),  # the edit's video file (absolute path) or null
])
METRICS_COLUMNS = tuple(METRICS_SCHEMA.names)
# Columns of by_variant.parquet: the paper's Table 2 (Sem-A, SSIM, Temp-S) plus CLIP-T, CLIP-F, counts.
VARIANT_SCHEMA = pa.schema([
    ("variant", pa.string()),
    ("variant_name", pa.string()),
    ("edits", pa.int64()),
    ("sem_a", pa.float64()),  # mean over edits with a defined Sem-A
    ("masked_ssim", pa.float64()),
    ("temp_s", pa.float64()),
    ("clip_t", pa.float64()),
    ("clip_f", pa.float64()),
    ("ma_corr", pa.float64()),
])
METRIC_LABELS = {
    "sem_a": "Sem-A ↑", "masked_ssim": "SSIM ↑", "temp_s": "Temp-S ↑", "clip_t": "CLIP-T ↑", "clip_f": "CLIP-F ↑",
    "ma_corr": "M_a corr ↑",
}


def artifact_path(video_id: str, audio_id: str, variant: str) -> str:
    return f"metrics/{video_id}/{audio_id}/{variant}"


def metrics_dir(cfg) -> Path:
    return Path(cfg.workdir) / "metrics"


def mp4_path(cfg, video_id: str, audio_id: str, variant: str) -> Path:
    """Where the edit stage writes an edit's MP4 (DESIGN: <workdir>/outputs/{variant}/{video}/{audio}.mp4)."""
    return Path(cfg.outputs_dir) / variant / video_id / f"{audio_id}.mp4"


def edit_module():
    """tasks.edit when it is installed, else None (metrics then has nothing to score).

    Only a missing module counts as "not installed"; an edit module that fails to
    import raises, rather than silently leaving every edit unscored.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec("tasks.edit") is None:
        return None
    return importlib.import_module("tasks.edit")


def edit_items(cfg, catalog) -> list[WorkItem]:
    """The edit stage's work items for this config (none while that stage is not installed)."""
    mod = edit_module()
    return list(mod.work_items(cfg, catalog)) if mod is not None else []


def _edit_array(item: WorkItem) -> str:
    mod = edit_module()
    return item.payload.get("array") or getattr(mod, "ARRAY", "frames")


def params(cfg, target_text: str, source_text: str | None) -> dict[str, Any]:
    return {
        "prompt": cfg.stages.metrics.prompt, "target_text": target_text, "source_text": source_text,
        "clip": model_identity(cfg, "clip"), "ssim": SSIM_SETTINGS, "scene_change": SCENE_CHANGE,
    }


def work_items(cfg, catalog, edits: Sequence[WorkItem] | None = None) -> list[WorkItem]:
    """One item per edit; `edits` defaults to the edit stage's items for this config.

    Key: the edit's key, the source frames' and masks' keys (upstream), the two CLIP
    texts and the CLIP model's identity (params).
    """
    from tasks import audio as audio_stage
    from tasks import frames as frames_stage
    from tasks import masks as masks_stage
    from tasks.grid import source_audio

    edits = edit_items(cfg, catalog) if edits is None else list(edits)
    if not edits:
        return []
    videos, clips = catalog.by_id("video"), catalog.by_id("audio")
    audio_keys = {it.audio_id: it for it in audio_stage.work_items(cfg, catalog)}
    template = cfg.stages.metrics.prompt
    sc = cfg.stages.metrics
    out = []
    for ed in edits:
        vid, aid, variant = ed.video_id, ed.audio_id, ed.variant or "full"
        ventry, aentry = videos.get(vid), clips.get(aid)
        if ventry is None or aentry is None:
            continue  # an edit of something no longer catalogued: nothing to compare against
        src_id = source_audio(cfg, catalog, vid)
        src_label = clips[src_id]["label"] if src_id in clips else None
        try:
            target_text = label_text(aentry["label"], template)
        except ValueError:
            target_text = ""  # fails at run time, naming the clip
        source_text = None
        if src_label and src_label != aentry["label"]:
            source_text = label_text(src_label, template)
        frames_key = frames_stage.item_key(cfg, ventry).key
        masks_key = masks_stage.item_key(cfg, ventry).key
        key = StageKey.build(
            STAGE, sc.code_version, params(cfg, target_text, source_text),
            upstream={"edit": ed.key.key, "frames": frames_key, "masks": masks_key},
        )
        audio_item = audio_keys.get(aid)
        payload = {
            "edit_artifact": ed.artifact, "edit_key": ed.key.key, "edit_array": _edit_array(ed),
            "frames_artifact": frames_stage.artifact_path(vid), "frames_key": frames_key,
            "masks_artifact": masks_stage.artifact_path(vid), "masks_key": masks_key,
            "audio_artifact": audio_item.artifact if audio_item else None,
            "audio_key": audio_item.key.key if audio_item else None,
            "target_label": aentry["label"], "source_audio_id": src_id, "source_label": src_label,
            "video_label": ventry.get("label"), "target_text": target_text, "source_text": source_text,
            "mp4": str(ed.payload.get("mp4") or mp4_path(cfg, vid, aid, variant)),
        }
        out.append(WorkItem(STAGE, f"{vid}/{aid}/{variant}", artifact_path(vid, aid, variant), key,
                            video_id=vid, audio_id=aid, variant=variant, payload=payload))
    return out


def load_scorer(cfg):
    from models.clip_scorer import ClipScorer

    m = cfg.models
    if m.preset == "tiny":
        scorer = ClipScorer.tiny(m.seed)
        scorer.model.to(m.device)
        return scorer
    if m.preset == "toy":
        from models import toy

        return toy.load_scorer(device=m.device)
    return ClipScorer.from_folder(m.paths.clip, m.device, setting="models.paths.clip")


def _read(store: ArtifactStore, item: WorkItem, what: str, array: str) -> np.ndarray:
    path, key = item.payload[f"{what}_artifact"], item.payload[f"{what}_key"]
    data = store.read(path, key, names=[array])
    if data is None:
        raise VideoItemError(
            item.video_id, f"its {what} artifact {path} is {store.status(path, key)} (not complete under the "
            f"expected key); the {what} stage must succeed first"
        )
    return data[array]


def as_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Edited frames as stored: uint8 as is; floats are taken as [0, 1] and rounded."""
    a = np.asarray(frames)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "f":
        return np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"edited frames have dtype {a.dtype}; expected uint8 or float in [0, 1]")


def compute(cfg, item: WorkItem, writer: ArtifactWriter, store: ArtifactStore, scorer: Lazy,
            texts: dict[str, Any]) -> None:
    p = item.payload
    if not p["target_text"]:
        raise ValueError(f"clip '{item.audio_id}' has no class label; CLIP-T needs one")
    edited = as_uint8_frames(_read(store, item, "edit", p["edit_array"]))
    # An edit covers a prefix of its video's frames (tasks.span): score every frame of that span.
    n = len(edited)
    source = _read(store, item, "frames", "frames")
    mask = _read(store, item, "masks", "masks").astype(bool)
    if len(source) < n or len(mask) < n:
        raise VideoItemError(item.video_id, f"the edit has {n} frames, its video's frames / masks only "
                             f"{len(source)} / {len(mask)}")
    source, mask = source[:n], mask[:n]
    model = scorer.get()
    for t in (p["target_text"], p["source_text"]):
        if t is not None and t not in texts:
            texts[t] = model.embed_texts([t])[0]
    scores = clip_scores(
        model.embed_images(edited, batch_size=cfg.stages.metrics.clip_batch), texts[p["target_text"]],
        texts[p["source_text"]] if p["source_text"] is not None else None,
    )
    sums, counts = masked_ssim_frames(source, edited, mask)
    total = int(counts.sum())
    ssim = float(sums.sum() / total) if total else float("nan")
    per_frame = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    writer.write("clip_t", np.asarray(scores["clip_t_frames"], np.float32))
    if "clip_t_source_frames" in scores:
        writer.write("clip_t_source", np.asarray(scores["clip_t_source_frames"], np.float32))
    writer.write("ssim", per_frame.astype(np.float32))
    corr = scene_change_correlation(source, edited, mask, _read(store, item, "edit", "magnitude")[:n])

    def finite(x):
        return None if x is None or not math.isfinite(x) else float(x)

    writer.set_attrs(
        clip_t=finite(scores["clip_t"]), clip_f=finite(scores["clip_f"]), temp_s=finite(scores["temp_s"]),
        sem_a=finite(scores["sem_a"]), masked_ssim=finite(ssim), ma_corr=finite(corr), num_frames=len(edited),
        foreground_fraction=float(mask.mean()), target_text=p["target_text"], source_text=p["source_text"],
        ssim_settings=SSIM_SETTINGS,
    )


def run_batch(cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None,
              scorer=None) -> BatchResult:
    """Score each edit; CLIP is loaded once per batch (on first use) and each text embedded once."""
    model = Lazy(lambda: scorer if scorer is not None else load_scorer(cfg))
    texts: dict[str, Any] = {}

    def compute_one(it, w):
        compute(cfg, it, w, store, model, texts)

    return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)


@task(name="metrics", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of edits; returns a small summary (never the data)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)


# ----------------------------------------------------------------------------- tables


# Row columns that come from the item's payload (the rest: ids, key, and the artifact's scores).
_PAYLOAD_COLUMNS = (
    "target_label", "source_audio_id", "source_label", "video_label", "target_text", "source_text", "edit_artifact",
    "edit_key", "edit_array", "frames_artifact", "frames_key", "masks_artifact", "masks_key", "audio_artifact",
    "audio_key", "mp4",
)


def metrics_rows(store: ArtifactStore, items: Iterable[WorkItem]) -> list[dict[str, Any]]:
    """One row per item whose metrics artifact is complete under its current key (others are left out)."""
    rows = []
    for it in items:
        attrs = store.attrs(it.artifact, it.key.key)
        if attrs is None:
            continue
        p = it.payload
        row = {name: None for name in METRICS_COLUMNS}
        row.update(
            video_id=it.video_id, audio_id=it.audio_id, variant=it.variant, variant_name=variant_name(it.variant),
            key=it.key.key, metrics_artifact=it.artifact,
            **{k: p.get(k) for k in _PAYLOAD_COLUMNS},
            **{k: attrs.get(k) for k in ("clip_t", "clip_f", "temp_s", "sem_a", "masked_ssim", "ma_corr",
                                         "num_frames", "foreground_fraction")},
        )
        rows.append(row)
    return rows


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def aggregate_by_variant(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The paper's Tables 1-2 shape: one row per method variant (Table 2 order), metric means over edits.

    Means skip undefined values (Sem-A of same-label edits, SSIM without foreground).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["variant"] or "full", []).append(r)
    out = []
    for variant in sorted(groups, key=variant_rank):
        g = groups[variant]
        out.append({
            "variant": variant, "variant_name": variant_name(variant), "edits": len(g),
            **{m: _mean(r.get(m) for r in g) for m in ("sem_a", "masked_ssim", "temp_s", "clip_t", "clip_f", "ma_corr")},
        })
    return pa.Table.from_pylist(out, schema=VARIANT_SCHEMA)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write to a hidden temporary name beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_metrics_tables(
    cfg, rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """metrics.parquet (per edit) and by_variant.parquet (per variant) under <workdir>/metrics/."""
    out = Path(out_dir) if out_dir is not None else metrics_dir(cfg)
    rows = sorted(rows, key=lambda r: (r["video_id"], r["audio_id"], variant_rank(r["variant"] or "full")))
    per_edit = pa.Table.from_pylist([{c: r.get(c) for c in METRICS_COLUMNS} for r in rows], schema=METRICS_SCHEMA)
    return {
        "metrics": write_parquet_atomic(per_edit, out / "metrics.parquet"),
        "by_variant": write_parquet_atomic(aggregate_by_variant(rows), out / "by_variant.parquet"),
    }


def collect(cfg, catalog, items: Sequence[WorkItem] | None = None, out_dir=None) -> dict[str, Path]:
    """Write the tables for the config's current metrics items (or the given ones)."""
    store, _ = open_store_and_ledger(cfg)
    items = work_items(cfg, catalog) if items is None else items
    return write_metrics_tables(cfg, metrics_rows(store, items), out_dir)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()
