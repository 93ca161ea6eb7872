"""Edit stage: V* = D(S(z_T, A*)) (paper eq. 6) -> Zarr `edits/{video}/{audio}/{variant}` and an MP4.

One item per (video, clip, variant); batches never mix videos (BATCH_BY_VIDEO), and
within a batch the U-Net of each variant, the video's z_T (and trajectory), masks
and depth, the ControlNet, the VAE and the blank prompt are loaded once
(`EditSession`, which counts its loads).

Sampling (`edit_latents`): DDIM over the inversion's schedule from z_T with the
clip's (E_a, M_a, F_a); classifier-free guidance against the zero audio condition
(one batched forward of [zero; clip] rows): out = u + s (c - u), s =
stages.edit.guidance_scale (1 = no guidance, one forward); the depth ControlNet's
residuals per frame (stages.edit.controlnet_scale), computed once per step and
shared by both rows; the SceneMasker mask (the "w/o SceneMasker" variant passes
none). Variants that differ only in edit-only switches (tasks.diffusion.
EDIT_ONLY_SWITCHES: scene_masker, fuser_scene_masked) edit with one fine-tuned model,
on which each sets its own switches before its forwards. Optional, beyond the paper (stages.edit.foreground_blend, off by default):
after every step the foreground latents are replaced by the inversion trajectory's
latents of the same noise level, so the final foreground latents are the source's.
The latent mask is the max over each latent's pixel block (8x8 for SD's VAE): any foreground pixel makes
its latent foreground.

The span (tasks.span, decided at planning): N frames at fps_out from stages.video.start;
the edit uses the first N of the video's z_T, masks and depth (and trajectory), and the
clip's M_a / F_a for exactly the sound under each frame (chunk k = [k/fps, (k+1)/fps),
past the clip's end padded or looped for span "video"), derived from the audio stage's
stored features. Edits of one video with different N are never denoised together.

Outputs: "frames" uint8 (N, R, R, 3) (decoded `decode_chunk` frames at a time),
"latents" float32 (N, C, R/8, R/8) and "magnitude" float32 (N,) (the M_a that drove each
frame) in the Zarr group, whose attributes record the span (start frame and seconds,
frames, fps, audio seconds, audio_fit); an H.264 + AAC MP4 at
<workdir>/outputs/{variant}/{video}/{audio}.mp4 (written to a temporary name and
renamed) with all N frames at fps_out (source fps / stride, or stages.edit.fps), whose
sound is the clip from its start for N / fps_out seconds (padded or looped past its end).
Cache key: the settings, the span, the variant's U-Net config, the ControlNet's identity;
upstream the inversion, fine-tuning, clip features, masks and depth keys.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tasks.stage_lazy import F, torch  # imported on first use: planning needs no torch

from storage import ArtifactStore, Ledger, StageKey
from storage.artifacts import ArtifactWriter
from storage.files import atomic_path
from tasks import audio as audio_stage
from tasks import depth as depth_stage
from tasks import diffusion, interrupts
from tasks import finetune as finetune_stage
from tasks import inversion as inversion_stage
from tasks import masks as masks_stage
from tasks import span as span_mod
from tasks.stage import BatchResult, WorkItem
from tasks.stage_task import StageCachePolicy, run_logged_batch, task
from tasks.video import VideoItemError, run_video_items

STAGE = "edit"
CONFIG_SECTION = "edit"
BATCH_BY_VIDEO = True  # one batch = one video: its models and z_T load once for all its clips
ARRAY = "frames"
DEFAULT_FPS = 24.0  # DAVIS
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


def artifact_path(video_id: str, audio_id: str, variant: str) -> str:
    return f"edits/{video_id}/{audio_id}/{variant}"


def mp4_path(cfg, video_id: str, audio_id: str, variant: str) -> Path:
    return Path(cfg.outputs_dir) / variant / video_id / f"{audio_id}.mp4"


def output_fps(cfg, entry: dict[str, Any]) -> float:
    return span_mod.output_fps(cfg, entry)


def uses_mask(unet3d: dict[str, Any]) -> bool:
    return bool(unet3d.get("scene_masker", True))


def params(cfg, variant: str, span: span_mod.Span) -> dict[str, Any]:
    e = cfg.stages.edit
    return {
        "variant": variant, "unet3d": diffusion.unet_config(cfg, variant), "guidance_scale": e.guidance_scale,
        "controlnet": {"scale": e.controlnet_scale, "model": diffusion.controlnet_identity(cfg)} if e.controlnet else None,
        "foreground_blend": e.foreground_blend, "fps": span.fps, "mp4": e.write_mp4, "precision": cfg.models.precision,
        "span": span.key_params(), "temperature": cfg.stages.audio.temperature, "windows": diffusion.windows(cfg),
        "audio_track": "the clip from its start for the span's seconds, past its end padded or looped (audio_fit)",
    }


def work_items(cfg, catalog) -> list[WorkItem]:
    """One item per (video, clip, variant) of the grid, ordered video, variant, clip (batches follow videos)."""
    from tasks.grid import select_pairs

    variants = diffusion.selected_variants(cfg)
    pairs = select_pairs(cfg, catalog)
    if not pairs:
        return []
    inv = inversion_stage.work_items(cfg, catalog)
    ft = finetune_stage.work_items(cfg, catalog)
    aud = {it.audio_id: it for it in audio_stage.work_items(cfg, catalog)}
    msk = {it.video_id: it for it in masks_stage.work_items(cfg, catalog)}
    dep = {it.video_id: it for it in depth_stage.work_items(cfg, catalog)}
    videos, clips = catalog.by_id("video"), catalog.by_id("audio")
    by_video: dict[str, list[str]] = {}
    for vid, aid in pairs:
        by_video.setdefault(vid, []).append(aid)
    items = []
    for vid, aids in by_video.items():
        spans = {}
        for aid in aids:
            try:
                spans[aid] = span_mod.edit_span(cfg, videos[vid], clips.get(aid))
            except span_mod.SpanError:
                continue  # a video with no frames: the frames stage fails it, naming it
        for v in variants:
            inv_it, ft_it = inversion_stage.item_for(inv, cfg, vid, v), finetune_stage.item_for(ft, cfg, vid, v)
            if inv_it is None or ft_it is None or vid not in msk:
                continue  # no source clip or latents for this video: those stages report it
            for aid in aids:
                if aid not in aud or aid not in spans:
                    continue
                sp = spans[aid]
                p = params(cfg, v, sp)
                up = {"inversion": inv_it.key.key, "finetune": ft_it.key.key, "audio": aud[aid].key.key,
                      "masks": msk[vid].key.key}
                if cfg.stages.edit.controlnet:
                    up["depth"] = dep[vid].key.key
                key = StageKey.build(STAGE, cfg.stages.edit.code_version, p, upstream=up)
                payload = {
                    "inversion_artifact": inv_it.artifact, "inversion_key": inv_it.key.key,
                    "finetune_artifact": ft_it.artifact, "finetune_key": ft_it.key.key,
                    "training_unet3d": ft_it.payload["unet3d"], "use_mask": uses_mask(p["unet3d"]),
                    "edit_switches": diffusion.edit_switches(p["unet3d"]),
                    "audio_artifact": aud[aid].artifact, "audio_key": aud[aid].key.key,
                    "masks_artifact": msk[vid].artifact, "masks_key": msk[vid].key.key,
                    "depth_artifact": dep[vid].artifact, "depth_key": dep[vid].key.key,
                    "clip_path": clips[aid]["path"], "label": clips[aid].get("label"), "fps": sp.fps,
                    "span": sp.key_params(), "mp4": str(mp4_path(cfg, vid, aid, v)), "array": ARRAY,
                }
                items.append(WorkItem(STAGE, f"{vid}/{aid}/{v}", artifact_path(vid, aid, v), key, video_id=vid,
                                      audio_id=aid, variant=v, payload=payload))
    return items


# ----------------------------------------------------------------------------- sampling


def latent_mask(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(F, H, W) pixel mask -> (1, 1, F, h, w): 1 where any pixel of the latent's block is foreground."""
    m = masks.float()[:, None]
    return F.adaptive_max_pool2d(m, latent_hw)[:, 0][None, None]


def edit_latents(
    unet,
    ddim,
    z_T: torch.Tensor,
    prompt: torch.Tensor,
    audio,
    guidance_scale: float,
    mask: torch.Tensor | None = None,
    controlnet=None,
    control: torch.Tensor | None = None,
    controlnet_scale: float = 1.0,
    blend: tuple[torch.Tensor, torch.Tensor] | None = None,
    window: int | None = None,
    overlap: int = 0,
) -> torch.Tensor:
    """DDIM from z_T (1, C, F, h, w) for B clips at once -> (B, C, F, h, w).

    audio: AudioCondition with B rows; mask (1, F, H, W) foreground (SceneMasker) or None;
    control (1, 3, F, 8h, 8w) ControlNet image in [0, 1]; blend (trajectory (steps + 1, 1, C, F, h, w),
    latent mask (1, 1, F, h, w)) for foreground blending, or None. The span is denoised in
    windows of `window` frames overlapping by `overlap` (models.windows; None = all at once).
    """
    from models.unet3d import controlnet_residuals
    from models.windows import WindowedModel

    B = audio.embedding.shape[0]
    x0 = z_T.expand(B, *z_T.shape[1:]).clone()
    guided = guidance_scale != 1.0
    cond = audio.with_unconditional() if guided else audio
    rows = 2 * B if guided else B
    m = mask.expand(rows, *mask.shape[1:]) if mask is not None else None

    def out(x, t, w):
        interrupts.check()  # a safe point: every window of every step
        idx = w.index(x.device)
        down = mid = None
        if controlnet is not None:
            # Residuals depend on x, t, the prompt and depth only: the zero and clip rows share them.
            ctl = w.take(control, 2)
            down, mid = controlnet_residuals(controlnet, x, t, prompt, ctl.expand(B, *ctl.shape[1:]),
                                             controlnet_scale)
            if guided:
                down, mid = [torch.cat([r, r]) for r in down], torch.cat([mid, mid])
        xx = torch.cat([x, x]) if guided else x
        y = unet(xx, t, prompt, audio=cond.frames(idx), mask=None if m is None else m.index_select(1, idx),
                 down_block_additional_residuals=down, mid_block_additional_residual=mid,
                 anchored=w.anchored).sample
        if not guided:
            return y
        u, c = y.chunk(2)
        return u + guidance_scale * (c - u)

    after = None
    if blend is not None:
        traj, lm = blend

        def after(i, x):
            return lm * traj[ddim.trajectory_index(i)] + (1 - lm) * x

    windowed = WindowedModel(out, x0.shape[2], window, overlap, anchor=unet.config.sparse_causal_attention)
    return ddim.sample(windowed, x0, after_step=after)


@torch.no_grad()
def decode_latents(frame_vae, latents: torch.Tensor, chunk: int = 4) -> np.ndarray:
    """(F, C, h, w) scaled latents -> uint8 (F, 8h, 8w, 3), `chunk` frames per VAE decode."""
    vae = frame_vae.vae
    param = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, latents.shape[0], max(1, int(chunk))):
        z = latents[i : i + chunk].to(param.device, param.dtype) / frame_vae.scaling_factor + shift
        img = vae.decode(z).sample.float().clamp(-1, 1)
        out.append(((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- MP4


def fit_audio(wav: np.ndarray, sample_rate: int, seconds: float, fit: str = "pad") -> tuple[np.ndarray, int]:
    """(C, S) float -> (C', round(seconds * rate')) float32 at an AAC rate: the clip from its start,
    trimmed, or past its end zero-padded ("pad") or repeated from its start ("loop").

    More than two channels are mixed to mono; a rate AAC lacks is resampled to 48 kHz.
    """
    from models.imagebind_audio import resample

    w = np.asarray(wav, np.float32)
    if w.ndim == 1:
        w = w[None]
    if w.shape[0] > 2:
        w = w.mean(axis=0, keepdims=True)
    rate = int(sample_rate)
    if rate not in AAC_RATES:
        w = np.stack([resample(torch.from_numpy(c), rate, 48000).numpy() for c in w])
        rate = 48000
    n = round(seconds * rate)
    out = np.zeros((w.shape[0], n), np.float32)
    if fit == "loop" and w.shape[1] > 0:
        reps = -(-n // w.shape[1])
        out[:] = np.tile(w, (1, reps))[:, :n]
    else:
        k = min(n, w.shape[1])
        out[:, :k] = w[:, :k]
    return np.clip(out, -1.0, 1.0), rate


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
              sample_rate: int | None = None, crf: int = 18) -> Path:
    """uint8 (F, H, W, 3) frames (+ (C, S) float audio) -> H.264 (yuv420p) + AAC MP4, atomically."""
    import av

    path = Path(path)
    _, h, w, _ = frames.shape
    # Readers never see a half-written file under the final name.
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as c:
            vs = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"crf": str(crf)}
            a_s = None
            layout = "mono" if audio is not None and audio.shape[0] == 1 else "stereo"
            if audio is not None:
                a_s = c.add_stream("aac", rate=int(sample_rate))
                a_s.layout = layout
                a_s.bit_rate = 128000 if layout == "mono" else 192000  # FFmpeg's default (~70 kb/s) dulls noisy sounds
            for frame in frames:
                for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    c.mux(packet)
            for packet in vs.encode(None):
                c.mux(packet)
            if a_s is not None:
                step = 1024  # one AAC frame
                for i in range(0, audio.shape[1], step):
                    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, i : i + step]), format="fltp",
                                                    layout=layout)
                    fr.sample_rate, fr.pts, fr.time_base = int(sample_rate), i, Fraction(1, int(sample_rate))
                    for packet in a_s.encode(fr):
                        c.mux(packet)
                for packet in a_s.encode(None):
                    c.mux(packet)
    return path


# ----------------------------------------------------------------------------- the batch


class EditSession:
    """What a batch loads once: the ControlNet, VAE and prompt; per video its masks, depth and z_T
    (+ trajectory); per fine-tuned model its U-Net. `counts` records every load."""

    def __init__(self, cfg, store: ArtifactStore, unet=None, controlnet=None, vae=None):
        self.cfg, self.store = cfg, store
        self.counts: Counter[str] = Counter()
        self._controlnet, self._vae, self._prompt = controlnet, vae, None
        self._given_unet = unet
        self._unet_key, self._unet = None, None
        self._video_id: str | None = None
        self._video: dict[str, Any] = {}
        self._inv_key, self._inv = None, None
        self.results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.queue: list[WorkItem] = []

    @property
    def device(self):
        return torch.device(self.cfg.models.device)

    def controlnet(self):
        if self._controlnet is None:
            self.counts["controlnet"] += 1
            self._controlnet = diffusion.load_controlnet(self.cfg)
        return self._controlnet

    def vae(self):
        if self._vae is None:
            self.counts["vae"] += 1
            self._vae = diffusion.load_vae(self.cfg)
        return self._vae

    def prompt(self) -> torch.Tensor:
        if self._prompt is None:
            self.counts["prompt"] += 1
            self._prompt = diffusion.blank_prompt(self.cfg).to(self.device)
        return self._prompt

    def unet(self, item: WorkItem):
        """The fine-tuned U-Net of the item (loaded when the fine-tuned model changes; one at a time)."""
        p = item.payload
        if self._unet_key != p["finetune_key"]:
            self._unet = None  # free the previous one first
            wpath = finetune_stage.weights_file(self.store, p["finetune_artifact"], p["finetune_key"], item.video_id)
            self.counts["unet"] += 1
            if self._given_unet is not None:
                self._unet = self._given_unet
                self._unet.load_trainable(wpath)
            else:
                self._unet = diffusion.load_unet(self.cfg, p["training_unet3d"], wpath)
            self._unet_key = p["finetune_key"]
        return self._unet

    def video(self, item: WorkItem) -> dict[str, Any]:
        """Masks, ControlNet image, latent mask and z_T of the item's video, read once."""
        p = item.payload
        if self._video_id != item.video_id:
            self._video, self._inv_key, self._inv = {}, None, None
            m = diffusion.read_required(self.store, p["masks_artifact"], p["masks_key"], ["masks"], "masks",
                                        item.video_id)["masks"]
            self.counts["masks"] += 1
            self._video["masks"] = torch.from_numpy(np.asarray(m, bool))
            if self.cfg.stages.edit.controlnet:
                d = diffusion.read_required(self.store, p["depth_artifact"], p["depth_key"], ["depth"], "depth",
                                            item.video_id)["depth"]
                self.counts["depth"] += 1
                d = torch.from_numpy(np.asarray(d, np.float32))  # (F, R, R) in [0, 1]
                self._video["control"] = d[None, None].expand(1, 3, *d.shape).contiguous().to(self.device)
            self._video_id = item.video_id
        if self._inv_key != p["inversion_key"]:
            names = ["z_T"] + (["trajectory"] if self.cfg.stages.edit.foreground_blend else [])
            inv = diffusion.read_required(self.store, p["inversion_artifact"], p["inversion_key"], names, "inversion",
                                          item.video_id)
            self.counts["z_T"] += 1
            z_T = diffusion.to_model_layout(inv["z_T"]).to(self.device, torch.float32)
            state = {"z_T": z_T, "trajectory": None}
            if "trajectory" in inv:
                state["trajectory"] = torch.from_numpy(inv["trajectory"]).permute(0, 2, 1, 3, 4)[:, None].to(
                    self.device, torch.float32)  # (steps + 1, 1, C, F, h, w)
            masks = self._video["masks"]
            if masks.shape[0] != z_T.shape[2]:
                raise VideoItemError(item.video_id, f"{masks.shape[0]} masks for {z_T.shape[2]} latent frames")
            state["latent_mask"] = latent_mask(masks, tuple(z_T.shape[-2:])).to(self.device)
            self._inv_key, self._inv = p["inversion_key"], state
        return {**self._video, **self._inv}


def _clip_conditions(session: EditSession, items: Sequence[WorkItem], sp: span_mod.Span):
    """The clips' (E_a, M_a, F_a) for the span: chunk k is the sound under frame k."""
    from models.unet3d import AudioCondition

    conds = [finetune_stage.audio_condition(session.store, it.payload["audio_artifact"], it.payload["audio_key"],
                                            sp.frames, session.device, it.video_id, edges=span_mod.chunk_edges(sp),
                                            temperature=session.cfg.stages.audio.temperature, fit=sp.audio_fit)
             for it in items]
    return AudioCondition(
        embedding=torch.cat([c.embedding for c in conds]), magnitude=torch.cat([c.magnitude for c in conds]),
        mel=torch.cat([c.mel for c in conds]),
    )


def _same_group(a: WorkItem, b: WorkItem) -> bool:
    """Clips denoised together: same model, same z_T and the same number of frames."""
    return (a.payload["finetune_key"], a.payload["inversion_key"], a.variant, a.payload["span"]["frames"]) == (
        b.payload["finetune_key"], b.payload["inversion_key"], b.variant, b.payload["span"]["frames"])


@torch.no_grad()
def _edit_group(cfg, session: EditSession, items: Sequence[WorkItem]) -> None:
    """Denoise and decode up to clip_batch clips of one (video, model) together; results kept in the session."""
    from models.ddim import DDIM

    e = cfg.stages.edit
    first = items[0]
    # Variants sharing one fine-tuning share the loaded model; each sets its own edit-only switches.
    unet = diffusion.apply_edit_switches(session.unet(first), first.payload["edit_switches"])
    v = session.video(first)
    ddim = DDIM(diffusion.load_scheduler_config(cfg), cfg.stages.inversion.steps)
    sp = span_mod.span_from_payload(first.payload["span"])
    n = sp.frames
    if v["z_T"].shape[2] < n:
        raise VideoItemError(first.video_id, f"its inversion holds {v['z_T'].shape[2]} frames, the span needs {n} "
                             f"({first.payload['inversion_artifact']})")
    # The span is a prefix of the video's frames: z_T, masks, depth (and trajectory) sliced to N.
    z_T = v["z_T"][:, :, :n]
    audio = _clip_conditions(session, items, sp)
    mask = v["masks"][None, :n].float().to(session.device) if first.payload["use_mask"] else None
    control = v["control"][:, :, :n] if v.get("control") is not None else None
    blend = None
    if e.foreground_blend:
        if v["trajectory"] is None or v["trajectory"].shape[0] != ddim.steps + 1:
            raise VideoItemError(first.video_id, "foreground blending needs the inversion trajectory of "
                                 f"{ddim.steps} steps ({first.payload['inversion_artifact']})")
        blend = (v["trajectory"][:, :, :, :n], v["latent_mask"][:, :, :n])
    with diffusion.inference_autocast(cfg):
        lat = edit_latents(
            unet, ddim, z_T, session.prompt(), audio, e.guidance_scale, mask=mask,
            controlnet=session.controlnet() if e.controlnet else None, control=control,
            controlnet_scale=e.controlnet_scale, blend=blend, **diffusion.windows(cfg),
        ).float()
    for k, it in enumerate(items):
        stored = lat[k : k + 1]
        frames = decode_latents(session.vae(), stored[0].permute(1, 0, 2, 3), e.decode_chunk)
        session.results[it.item_id] = (diffusion.to_stored_layout(stored), frames,
                                       audio.magnitude[k].float().cpu().numpy())


def compute(cfg, item: WorkItem, writer: ArtifactWriter, session: EditSession) -> None:
    from tasks.audio import decode_audio

    started = time.time()
    if item.item_id not in session.results:
        # This clip and the next pending ones of the same model, denoised together.
        pos = next(i for i, it in enumerate(session.queue) if it.item_id == item.item_id)
        group = [item]
        for it in session.queue[pos + 1 :]:
            if len(group) >= cfg.stages.edit.clip_batch or not _same_group(item, it):
                break
            if it.item_id not in session.results and not session.store.is_complete(it.artifact, it.key.key):
                group.append(it)
        _edit_group(cfg, session, group)
    latents, frames, magnitude = session.results.pop(item.item_id)
    writer.write("frames", frames)
    writer.write("latents", latents.astype(np.float32))
    writer.write("magnitude", magnitude.astype(np.float32))  # the M_a that drove each frame
    p = item.payload
    sp = span_mod.span_from_payload(p["span"])
    attrs = {"fps": p["fps"], "variant": item.variant, "audio_id": item.audio_id, "label": p.get("label"),
             "guidance_scale": cfg.stages.edit.guidance_scale, "steps": cfg.stages.inversion.steps,
             "foreground_blend": cfg.stages.edit.foreground_blend, "mp4": None,
             "span": sp.mode, "span_start_frame": sp.start, "span_start_seconds": sp.start_seconds,
             "stride": sp.stride, "frames": int(frames.shape[0]), "audio_seconds": sp.audio_seconds,
             "audio_start_seconds": 0.0, "audio_fit": sp.audio_fit,
             "audio_chunks": "whole clip in N chunks" if sp.whole_clip else "chunk k = [k/fps, (k+1)/fps) of the clip"}
    if cfg.stages.edit.write_mp4:
        wav, sr = decode_audio(p["clip_path"])
        seconds = frames.shape[0] / p["fps"]
        track, rate = fit_audio(wav.numpy(), sr, seconds, sp.audio_fit)
        write_mp4(p["mp4"], frames, p["fps"], track, rate)
        attrs.update(mp4=p["mp4"], audio_seconds=seconds, audio_rate=rate)
    attrs["seconds"] = round(time.time() - started, 3)
    writer.set_attrs(**attrs)


def run_batch(cfg, items: list[WorkItem], store: ArtifactStore, ledger: Ledger, progress=None, claims=None,
              session: EditSession | None = None) -> BatchResult:
    """Edit every item; items are taken video by video and model by model, so each loads once."""
    order = {v: i for i, v in enumerate(dict.fromkeys(it.video_id for it in items))}
    items = sorted(items, key=lambda it: (order[it.video_id], it.payload["finetune_key"], it.payload["inversion_key"],
                                          it.payload["span"]["frames"]))
    session = session if session is not None else EditSession(cfg, store)
    session.queue = list(items)

    def compute_one(it, w):
        compute(cfg, it, w, session)

    try:
        return run_video_items(items, store, ledger, compute_one, progress=progress, claims=claims)
    finally:
        session.results.clear()


@task(name="edit", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    """Prefect task: one video's batch of edits; returns a small summary (never the frames)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)
