"""Fine-tuning stage: the trainable parts of the inflated U-Net on one source video (paper 5.1).

One item per (video, source audio, training variant): stages.finetune.steps (300)
AdamW steps at learning_rate 3e-5 on the video's latents, the model's own
regression target (v for the v-prediction bases) with MSE, the source clip's
(E_a, M_a, F_a) as the condition and the zero condition on a `condition_dropout`
fraction (10%) of steps, so that classifier-free guidance has an unconditional
model to push against. Trainable: DESIGN 1's set (models.unet3d.is_trainable_name).
Decisions where the paper is silent: the span of (video, source clip) (tasks.span: a
prefix of the video's latents, by the same rule as an edit; M_a / F_a of the sound under
each of its frames) is one training sample; t uniform over the training timesteps; no mask and no ControlNet while
fine-tuning (Fig. 2 brings depth and masks in at inference only), so variants that
differ only in SceneMasker share one fine-tuned model (tasks.diffusion); gradient
norm clipped at max_grad_norm (1.0, as Tune-A-Video).

Resuming: every `checkpoint_every` steps the trainable weights, the optimizer state,
the state of the generator that draws t / noise / dropout, torch's RNG states (and
the AMP scaler's) go to one checkpoint file, written to a temporary name and
renamed. A run that dies is resumed from its last checkpoint and ends equal to an
uninterrupted run with the same seed. On a GPU the forward runs under autocast
(bfloat16 where supported, else float16 with a gradient scaler) with gradient
checkpointing; on a CPU in float32 without either.

Outputs: `trainable.safetensors` (models.unet3d.save_trainable) and `finetune.json`
(what it was trained on, with which settings, the losses) in
<weights_dir>/{video}/{audio}/{variant}/{key[:16]}/, written to a temporary folder
and renamed; then the Zarr artifact `finetune/{video}/{audio}/{variant}` (array
"loss" (steps,) float32; attributes: the files' paths, the weights' sha256) is
committed. Only that commit makes the item done, so nothing half-written reads as
complete. Cache key: settings, U-Net 3D config, base identity, scheduler; upstream
the latents' and the source clip's audio-feature keys.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tasks.stage_lazy import F, torch  # imported on first use: planning needs no torch

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from storage.files import atomic_path
from storage.hashing import hash_file
from tasks import audio as audio_stage
from tasks import diffusion, interrupts
from tasks import latents as latents_stage
from tasks.span import Span, SpanError, chunk_edges, edit_span, span_from_payload
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, run_logged_batch, task
from tasks.video import VideoItemError, run_video_items

STAGE = "finetune"
CONFIG_SECTION = "finetune"
WEIGHTS_FILE = "trainable.safetensors"
INFO_FILE = "finetune.json"
EVAL_DRAWS = 8  # fixed (t, noise) draws for the before/after loss in finetune.json


def artifact_path(video_id: str, audio_id: str, variant: str) -> str:
    return f"finetune/{video_id}/{audio_id}/{variant}"


def weights_root(cfg) -> Path:
    return Path(cfg.stages.finetune.weights_dir or Path(cfg.workdir) / "finetune")


def output_dir(cfg, video_id: str, audio_id: str, variant: str, key: str) -> Path:
    return weights_root(cfg) / video_id / audio_id / variant / key[:16]


def checkpoint_path(cfg, video_id: str, audio_id: str, variant: str, key: str) -> Path:
    return weights_root(cfg) / video_id / audio_id / variant / f"{key[:16]}.checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    learning_rate: float = 3e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    condition_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    prediction_type: str = "v_prediction"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def settings(cfg, prediction_type: str) -> TrainSettings:
    s = cfg.stages.finetune
    return TrainSettings(
        steps=s.steps, learning_rate=s.learning_rate, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        condition_dropout=s.condition_dropout, seed=s.seed, checkpoint_every=s.checkpoint_every,
        prediction_type=prediction_type,
    )


def params(cfg, variant: str, span: Span | None = None) -> dict[str, Any]:
    # checkpoint_every only decides where a run can resume, not what it computes: not in the key.
    st = {k: v for k, v in settings(cfg, "").as_dict().items() if k not in ("checkpoint_every", "prediction_type")}
    return {
        "span": span.key_params() if span is not None else None,
        "settings": st, "unet3d": diffusion.unet_config(cfg, variant, training=True),
        "base": diffusion.base_identity(cfg), "scheduler": diffusion.scheduler_identity(cfg), "prompt": "",
        "optimizer": "AdamW", "loss": "mse(model output, scheduler target)",
        "temperature": cfg.stages.audio.temperature,
        # Each step trains on one window of the span; the overlap only shapes the reported losses.
        "window": cfg.stages.windows.window,
    }


def work_items(cfg, catalog) -> list[WorkItem]:
    """One item per (selected video, its source clip, training variant of each selected variant)."""
    from tasks.grid import selected_videos, source_audio

    variants = list(dict.fromkeys(diffusion.training_variant(cfg, v) for v in diffusion.selected_variants(cfg)))
    lat = {it.video_id: it for it in latents_stage.work_items(cfg, catalog)}
    aud = {it.audio_id: it for it in audio_stage.work_items(cfg, catalog)}
    videos, clips = catalog.by_id("video"), catalog.by_id("audio")
    items = []
    for vid in selected_videos(cfg, catalog):
        src = source_audio(cfg, catalog, vid)
        if vid not in lat or src not in aud:
            continue
        try:
            sp = edit_span(cfg, videos[vid], clips.get(src))
        except SpanError:
            continue  # the frames stage fails this video, naming it
        for v in variants:
            p = params(cfg, v, sp)
            key = StageKey.build(STAGE, cfg.stages.finetune.code_version, p, upstream={"latents": lat[vid].key.key, "audio": aud[src].key.key})
            payload = {
                "latents_artifact": lat[vid].artifact, "latents_key": lat[vid].key.key,
                "audio_artifact": aud[src].artifact, "audio_key": aud[src].key.key,
                "unet3d": p["unet3d"], "out_dir": str(output_dir(cfg, vid, src, v, key.key)),
                "checkpoint": str(checkpoint_path(cfg, vid, src, v, key.key)),
                "span": sp.key_params(),
            }
            items.append(WorkItem(STAGE, f"{vid}/{src}/{v}", artifact_path(vid, src, v), key, video_id=vid,
                                  audio_id=src, variant=v, payload=payload))
    return items


def item_for(items: list[WorkItem], cfg, video_id: str, variant: str) -> WorkItem | None:
    """The fine-tuning an edit of `video_id` with `variant` uses."""
    tv = diffusion.training_variant(cfg, variant)
    return next((it for it in items if it.video_id == video_id and it.variant == tv), None)


def weights_file(store: ArtifactStore, artifact: str, key: str, video_id: str | None = None) -> Path:
    """The committed trainable weights of a fine-tuning artifact, checked against the recorded sha256."""
    attrs = store.attrs(artifact, key)
    if attrs is None:
        raise VideoItemError(
            video_id or "?", f"its fine-tuning artifact {artifact} is {store.status(artifact, key)} (not complete "
            "under the expected key); the finetune stage must succeed first"
        )
    path = Path(attrs["weights"])
    if not path.is_file():
        raise VideoItemError(video_id or "?", f"fine-tuned weights '{path}' ({artifact}) are missing")
    if hash_file(path) != attrs["weights_sha256"]:
        raise VideoItemError(video_id or "?", f"fine-tuned weights '{path}' changed since {artifact} was committed")
    return path


# ----------------------------------------------------------------------------- training


def span_prefix(array, frames: int, what: str, video_id: str | None = None):
    """The first `frames` frames of a video artifact's array: an edit (or fine-tuning run) uses a
    prefix of the frames its video's preprocessing holds."""
    if array.shape[0] < frames:
        raise VideoItemError(video_id or "?", f"its {what} hold {array.shape[0]} frames, the span needs {frames}; "
                             "rerun the video stages")
    return array[:frames]


def audio_condition(store: ArtifactStore, artifact: str, key: str, num_frames: int, device, video_id=None,
                    edges=None, temperature: float = 0.25, fit: str = "pad"):
    """AudioCondition (batch 1) for `num_frames` frames, derived from a clip's stored features:
    chunk k = [edges[k], edges[k+1]) seconds of the clip (the sound under frame k), or the whole
    clip in num_frames chunks when edges is None (tasks.audio.span_condition)."""
    from models.unet3d import AudioCondition

    feats = audio_stage.read_features(store, artifact, key)
    if feats is None:
        diffusion.read_required(store, artifact, key, list(audio_stage.FEATURE_ARRAYS), "audio", video_id)
        raise VideoItemError(video_id or "?", f"audio features {artifact} lack the envelope / Mel frames; "
                             "recompute the audio stage")
    c = audio_stage.span_condition(feats, num_frames, edges, temperature, fit)
    return AudioCondition(embedding=c["embedding"][None].to(device), magnitude=c["magnitude"][None].to(device),
                          mel=c["mel"][None].to(device))


@dataclass
class TrainResult:
    losses: list[float]
    resumed_from: int  # step the run started at (0 = from scratch)
    mixed_precision: str
    gradient_checkpointing: bool
    seconds: float


def _draw(gen: torch.Generator, shape, num_train: int, dropout: float, window: int | None = None,
          anchor: bool = True):
    """t, the window, noise and the dropout decision for one step, all from `gen` (on the CPU, so any
    device agrees). shape is the span's (1, C, F, h, w); a window shorter than the span starts anywhere
    in it (models.windows.Window, anchored by the span's frame 0 unless it starts there)."""
    from models.windows import Window

    frames = shape[2]
    t = torch.randint(0, num_train, (1,), generator=gen)
    if window is None or window >= frames:
        win = Window(0, frames, False)
    else:
        start = int(torch.randint(0, frames - window + 1, (1,), generator=gen))
        win = Window(start, start + window, anchor and start > 0)
    noise = torch.randn((*shape[:2], len(win.index()), *shape[3:]), generator=gen, dtype=torch.float32)
    drop = bool(torch.rand((), generator=gen) < dropout)  # drawn every step: the stream never depends on it
    return t, win, noise, drop


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:  # a kill leaves the previous checkpoint or the new one, never half of one
        torch.save(state, tmp)


def train(
    model,
    z0: torch.Tensor,
    audio,
    prompt: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    s: TrainSettings,
    checkpoint: str | os.PathLike | None = None,
    run_key: str = "",
    callback: Callable[[int, float], None] | None = None,
    window: int | None = None,
) -> TrainResult:
    """Fine-tune model's trainable parameters in place on z0 (1, C, F, h, w); resumes from `checkpoint`
    when it holds a run with the same `run_key`. `callback(step, loss)` runs after each step (and its
    checkpoint); an exception from it stops training like a crash would. Each step trains on one
    window of `window` frames drawn from the span (None = the whole span); the loss covers the
    window's own frames, not the anchor."""
    from models.ddim import noisy_and_target

    dev = z0.device
    cuda = dev.type == "cuda"
    amp = None
    if cuda:
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=s.learning_rate, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    names = model.trainable_parameter_names()
    start, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("key") == run_key and state.get("names") == names:
            with torch.no_grad():
                for p, n in zip(params, names):
                    p.copy_(state["trainable"][n])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if cuda and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start, losses = int(state["step"]), list(state["losses"])
    if cuda:
        model.enable_gradient_checkpointing()
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    num_train = len(alphas_cumprod)
    started = time.time()

    def save(done: int) -> None:
        _save_checkpoint(ckpt, {
            "key": run_key, "step": done, "names": names, "losses": losses,
            "trainable": {n: p.detach().cpu().clone() for n, p in zip(names, params)},
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        })

    model.train()
    try:
        for step in range(start, s.steps):
            t, win, noise, drop = _draw(gen, tuple(z0.shape), num_train, s.condition_dropout, window,
                                        model.config.sparse_causal_attention)
            t, noise = t.to(dev), noise.to(dev)
            idx = win.index(dev)
            x_t, target = noisy_and_target(alphas_cumprod, z0.index_select(2, idx), noise, t, s.prediction_type)
            with autocast:
                out = model(x_t, t, prompt, audio=None if (drop or audio is None) else audio.frames(idx), anchored=win.anchored).sample
            skip = 1 if win.anchored else 0
            loss = F.mse_loss(out[:, :, skip:].float(), target[:, :, skip:].float())
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if s.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(float(loss.detach()))
            done = step + 1
            if ckpt is not None and done % s.checkpoint_every == 0:
                save(done)
            if callback is not None:
                callback(done, losses[-1])
            if interrupts.stop_requested() and done < s.steps:
                # A stop is a safe point: checkpoint first, so the rerun resumes from this step.
                if ckpt is not None and done % s.checkpoint_every != 0:
                    save(done)
                interrupts.check()
    finally:
        model.eval()
        model.release_state()
        opt.zero_grad(set_to_none=True)
        if cuda:
            model.disable_gradient_checkpointing()
    precision = "float32" if amp is None else ("bfloat16" if amp is torch.bfloat16 else "float16")
    return TrainResult(losses, start, precision, cuda, time.time() - started)


@torch.no_grad()
def evaluation_loss(model, z0, audio, prompt, alphas_cumprod, prediction_type: str, seed: int, draws: int = EVAL_DRAWS,
                    window: int | None = None, overlap: int = 0) -> float:
    """Mean loss over fixed (t, noise) draws with the audio condition, over the whole span (in windows
    as the edits run): comparable before and after training."""
    from models.ddim import noisy_and_target
    from models.windows import WindowedModel

    def out(x, t, w):
        cond = None if audio is None else audio.frames(w.index(x.device))
        return model(x, t, prompt, audio=cond, anchored=w.anchored).sample

    windowed = WindowedModel(out, z0.shape[2], window, overlap, anchor=model.config.sparse_causal_attention)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = torch.randint(0, len(alphas_cumprod), (1,), generator=gen).to(z0.device)
        noise = torch.randn(tuple(z0.shape), generator=gen, dtype=torch.float32).to(z0.device)
        x_t, target = noisy_and_target(alphas_cumprod, z0, noise, t, prediction_type)
        total += float(F.mse_loss(windowed(x_t, t).float(), target.float()))
    return total / draws


def _write_outputs(out_dir: Path, model, info: dict[str, Any]) -> Path:
    """trainable.safetensors + finetune.json into a temporary folder, renamed into place."""
    from models.unet3d import save_trainable

    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        save_trainable(model, tmp / WEIGHTS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        if out_dir.exists():  # a previous run that died before its commit
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / WEIGHTS_FILE


class _Models:
    """One inflated model per training configuration per batch; reset to its initial trainable
    weights before each item (the frozen weights never change), so a batch loads the base once."""

    def __init__(self, cfg, preloaded=None):
        self.cfg, self._models, self._initial = cfg, {}, {}
        self.loads = 0
        if preloaded is not None:
            self._put(json.dumps(preloaded.config.to_dict(), sort_keys=True), preloaded)

    def _put(self, ident: str, model) -> None:
        self._models[ident] = model
        self._initial[ident] = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}

    def fresh(self, config: dict[str, Any]):
        ident = json.dumps(config, sort_keys=True)
        if ident not in self._models:
            self.loads += 1
            self._put(ident, diffusion.load_unet(self.cfg, config))
        model = self._models[ident]
        own = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in self._initial[ident].items():
                own[k].copy_(v)
        return model


def compute(cfg, item: WorkItem, writer: ArtifactWriter, store: ArtifactStore, models: _Models,
            callback: Callable[[int, float], None] | None = None) -> None:
    from models.ddim import DDIM

    p = item.payload
    lat = diffusion.read_required(store, p["latents_artifact"], p["latents_key"], ["latents"], "latents", item.video_id)
    model = models.fresh(p["unet3d"])
    dev = model.device
    sp = span_from_payload(p["span"])
    latents = span_prefix(lat["latents"], sp.frames, "latents", item.video_id)
    z0 = diffusion.to_model_layout(latents).to(dev, torch.float32)
    audio = audio_condition(store, p["audio_artifact"], p["audio_key"], sp.frames, dev, item.video_id,
                            edges=chunk_edges(sp), temperature=cfg.stages.audio.temperature, fit=sp.audio_fit)
    sched = diffusion.load_scheduler_config(cfg)
    ddim = DDIM(sched, 1)
    alphas = ddim.alphas_cumprod.to(dev)
    s = settings(cfg, ddim.prediction_type)
    prompt = diffusion.blank_prompt(cfg).to(dev)
    win = diffusion.windows(cfg)
    before = evaluation_loss(model, z0, audio, prompt, alphas, s.prediction_type, s.seed + 1, **win)
    result = train(model, z0, audio, prompt, alphas, s, checkpoint=p["checkpoint"], run_key=item.key.key,
                   callback=callback, window=win["window"])
    after = evaluation_loss(model, z0, audio, prompt, alphas, s.prediction_type, s.seed + 1, **win)
    n_params = sum(v.numel() for v in model.trainable_state_dict().values())
    info = {
        "key": item.key.key, "stage": STAGE, "code_version": item.key.code_version,
        "video_id": item.video_id, "source_audio_id": item.audio_id, "variant": item.variant,
        "trained_on": {"latents": {"artifact": p["latents_artifact"], "key": p["latents_key"],
                                   "shape": list(latents.shape), "of": list(lat["latents"].shape)},
                       "span": p["span"],
                       "audio": {"artifact": p["audio_artifact"], "key": p["audio_key"]}, "prompt": ""},
        "settings": s.as_dict(), "optimizer": "AdamW", "unet3d": p["unet3d"], "base": diffusion.base_identity(cfg),
        "scheduler": sched, "trainable_parameters": n_params, "device": str(dev),
        "mixed_precision": result.mixed_precision, "gradient_checkpointing": result.gradient_checkpointing,
        "resumed_from_step": result.resumed_from, "seconds": round(result.seconds, 3),
        "eval_loss_before": before, "eval_loss_after": after, "eval_draws": EVAL_DRAWS, "losses": result.losses,
        "finished_at": time.time(),
    }
    weights = _write_outputs(Path(p["out_dir"]), model, info)
    writer.write("loss", np.asarray(result.losses, np.float32))
    writer.set_attrs(
        weights=str(weights), info=str(Path(p["out_dir"]) / INFO_FILE), weights_sha256=hash_file(weights),
        trainable_parameters=n_params, steps=s.steps, final_loss=result.losses[-1] if result.losses else None,
        eval_loss_before=before, eval_loss_after=after, resumed_from_step=result.resumed_from,
        source_audio_id=item.audio_id, variant=item.variant,
    )


def run_batch(cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None,
              model=None, callback: Callable[[int, float], None] | None = None) -> BatchResult:
    """Fine-tune each item; the base model loads once per training configuration per batch.

    Checkpoints of items whose weights got committed are deleted (unless keep_checkpoints).
    """
    models = _Models(cfg, model)

    def compute_one(it, w):
        compute(cfg, it, w, store, models, callback)

    result = run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)
    if not cfg.stages.finetune.keep_checkpoints:
        done = set(result.computed) | set(result.adopted)
        for it in items:
            if it.item_id in done:
                Path(it.payload["checkpoint"]).unlink(missing_ok=True)
    return result


@task(name="finetune", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one batch of fine-tuning items; returns a small summary (never the weights)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
