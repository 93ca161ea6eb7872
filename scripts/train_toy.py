#!/usr/bin/env python3
"""Train the `toy` preset (models/toy.py) on the toy world, reproducibly, on a few CPU cores.

    .venv/bin/python scripts/train_toy.py                 # the committed recipe -> models/toy/
    .venv/bin/python scripts/train_toy.py --out DIR --threads 2
    .venv/bin/python scripts/train_toy.py --only audio    # one model
    .venv/bin/python scripts/train_toy.py --only unet     # the U-Net (needs the audio encoder and VAE in --out)
    .venv/bin/python scripts/train_toy.py --only unet --evaluate --no-short-check   # re-measure it only

What it trains (issue 18, first part):

1. The audio encoder: `ImageBindAudioEncoder` at the tiny sizes (width 32, 2 blocks,
   2 heads, out 1024), seeded init, on clips synthesised by
   `tasks.sample_data.synthesize_clip` for the four classes (seeds disjoint from the
   sample data's and from the held-out ones). Each 2 s ImageBind clip of an audio is
   one training example (the encoder averages the three clips' unit embeddings at
   inference). Loss: cross-entropy of the post-processed embedding (unit norm x 20,
   ImageBind's fixed logit scale) against four learned class prototypes, so clips of
   one class embed together. The prototypes are discarded; the pipeline only uses the
   embedding. Augmentation: a random gain (a shift of the normalised log-Mel image) and
   a little noise.
2. The scorer: transformers `CLIPModel` at the tiny sizes (`models.clip_scorer.tiny_config`,
   32 px, projection 16) with the byte-level tiny tokenizer, seeded init, on toy-world
   frames (`render_video(..., scene=class, loudness=...)`, random objects, random
   per-frame loudness u^2 with u uniform, so that quiet frames are well represented) against the four prompts "a photo of <label>" that the
   metrics stage scores (tasks.metrics.label_text with the default template). Loss:
   CLIP's image-to-text cross-entropy over the four prompts, with CLIP's learned
   logit scale.

3. The VAE: diffusers `AutoencoderKL` with the tiny preset's blocks (`models.vae.vae_config(tiny=True)`)
   but three levels of widths 8-16-32, so its latents are 1/4 of the frame (16 x 16 at the demo's
   64 px; at 1/8, an object of a few latents could not come back sharp: masked SSIM 0.78, against
   0.85 at 1/4), 4 latent channels, seeded init, on toy-world and plain-world frames resized and
   centre-cropped to 64 px exactly as the frames stage does. Loss: MSE + L1 of the reconstruction of
   a posterior sample + a tiny KL term; afterwards the config's scaling factor is set to
   1 / std of the training latents (as SD's 0.18215 was chosen). The pipeline reads the
   downsampling from the VAE's config (the toy preset's tiny ControlNet is built to match).

4. The U-Net: the tiny preset's `UNet2DConditionModel` (models.unet3d_presets, unCLIP-style
   class embedding "projection" of 2 x 1024), seeded init, inflated (models.unet3d) and trained
   as the pipeline's base model through the 3D forward: v-prediction (the tiny DDIM schedule,
   models.ddim.tiny_scheduler_config) on the toy VAE's latents of 4-frame toy-world and
   plain-world clips, with the blank prompt of the seed-0 tiny text encoder, conditioned
   through the class embedding on TASI's label (noise level 0) of the toy audio encoder's
   embedding of a clip of the frames' class, and per frame on M_a of the look's strength
   through the Magnitude Modulator (the strength is drawn per frame; M_a is derived from it
   exactly as tasks.audio derives it from a clip's loudness); plain-world clips and 15% of
   the others get the zero condition (unCLIP's null label, no Magnitude Modulator), so the
   null condition means "any scene" (inversion, guidance). Half the batches give SceneMasker
   the object masks. Trained: the 2D U-Net and the Magnitude Modulator; the other inflated
   parts keep their identity init and are what the per-video fine-tuning trains. Saved as
   models/toy/base/unet/ (float16, read by models.unet3d.from_pretrained) and
   models/toy/base/audioscenic_init.safetensors (the Magnitude Modulator, which
   from_pretrained loads over the inflated parts: models.unet3d_io.PART_INIT_FILE).

Held-out figures (written into recipe.json, checked by tests/test_toy_preset.py):
nearest-centroid accuracy of held-out audio (centroids from the training audio,
whole-clip embeddings), and, for the scorer, Sem-A of held-out toy-world videos
(frames of class c, loudness of a held-out clip of c) for the target label c
against every other label as source: min and mean over the pairs; for the VAE, PSNR of
held-out frames through encode (posterior mean) and decode, and the masked SSIM
(tasks.metrics.masked_ssim) of the reconstruction over the object; for the U-Net, the
v-prediction MSE of held-out clips with their own class's audio, the null condition, another
class's audio, and the own class with M_a withheld (all ones), and the random tiny U-Net's; and
edits of held-out toy videos (edit_sem_a): Sem-A, masked SSIM and the correlation of the scene's
per-frame change with M_a, with and without the SceneMasker mask, and with no audio at all.

Reproducibility: everything is drawn from numpy / torch generators seeded by --seed;
with the same --threads the weights are bitwise identical. Other thread counts change
float summation order, so the weights differ slightly and the figures stay within
the tolerances stated in tests/test_toy_preset.py. Always call with a small --threads
on a shared machine (default 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import toy  # noqa: E402
from tasks.sample_data import AUDIO_CLASSES, VIDEO_OBJECTS, frame_loudness, render_video, synthesize_clip  # noqa: E402

CLASSES = [c for c, _, _ in AUDIO_CLASSES]
SAMPLE_RATE = 44100
# Seed ranges: sample data uses seed * 1000 + i (small); training and held-out data stay far from it.
TRAIN_BASE, HELDOUT_BASE = 1_000_000, 2_000_000

RECIPE = {
    "seed": 0,
    "audio": {"clips_per_class": 32, "steps": 240, "batch": 48, "lr": 2e-3, "weight_decay": 0.01,
              "gain_shift": [-0.3, 0.1], "noise": 0.05, "heldout_per_class": 12},
    "scorer": {"videos_per_class": 320, "frames_per_video": 1, "height": 96, "width": 128, "steps": 600,
               "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "jitter": 0.15, "heldout_per_class": 6, "heldout_frames": 24},
    "unet": {"clips_per_class": 8, "videos_per_class": 64, "frames_per_video": 4, "resolution": 64, "steps": 1200,
             "batch": 12, "lr": 2e-3, "weight_decay": 0.0, "cond_drop": 0.15, "mask_fraction": 0.5, "fg_consistency": 1.0,
             "heldout_per_class": 4,
             "edit_steps": 20, "edit_frames": 8, "guidance": 3.0},
    "vae": {"block_out_channels": [16, 32, 32], "norm_num_groups": 4, "object_weight": 4.0,
            "videos_per_class": 60, "frames_per_video": 2, "resolution": 64, "steps": 3000, "batch": 16,
            "lr": 2e-3, "weight_decay": 0.0, "kl_weight": 1e-6, "heldout_per_class": 4},
}

# A short budget of the same recipe, retrained by tests/test_toy_preset.py in well under a minute;
# recipe.json's "short_check" records the figures it gave when the weights were committed.
SHORT = {
    "audio": dict(RECIPE["audio"], clips_per_class=8, steps=40, batch=32, heldout_per_class=4),
    "scorer": dict(RECIPE["scorer"], videos_per_class=10, steps=60, heldout_per_class=2, heldout_frames=12),
    "vae": dict(RECIPE["vae"], videos_per_class=6, steps=30, heldout_per_class=1),
    "unet": dict(RECIPE["unet"], videos_per_class=16, steps=120, batch=8, heldout_per_class=2),
}


def _seeds(base: int, seed: int, k: int, n: int) -> list[int]:
    return [base + seed * 100_000 + k * 10_000 + i for i in range(n)]


# ----------------------------------------------------------------------------- audio


def audio_images(seeds_by_class: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 1, 128, 204) ImageBind inputs and (N,) class indices of synthesised clips."""
    from models.imagebind_audio import preprocess

    xs, ys = [], []
    for k, seeds in enumerate(seeds_by_class):
        for s in seeds:
            wav = synthesize_clip(CLASSES[k], s, SAMPLE_RATE)
            xs.append(preprocess(torch.from_numpy(wav)[None], SAMPLE_RATE))
            ys.append(k)
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def embed(encoder, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch]) for i in range(0, len(x), batch)])


def nearest_centroid_accuracy(train_emb, train_y, test_emb, test_y) -> float:
    cent = torch.stack([torch.nn.functional.normalize(train_emb[train_y == k], dim=-1).mean(0)
                        for k in range(len(CLASSES))])
    pred = (torch.nn.functional.normalize(test_emb, dim=-1) @ torch.nn.functional.normalize(cent, dim=-1).T).argmax(1)
    return float((pred == test_y).float().mean())


def train_audio(seed: int, recipe: dict, log=print) -> tuple[torch.nn.Module, dict]:
    from models.imagebind_audio import ImageBindAudioEncoder

    r = recipe
    t0 = time.time()
    x, y = audio_images([_seeds(TRAIN_BASE, seed, k, r["clips_per_class"]) for k in range(len(CLASSES))])
    clips = x.flatten(0, 1)  # every 2 s clip is an example
    clip_y = y.repeat_interleave(x.shape[1])
    log(f"audio: {len(x)} training clips synthesised and preprocessed in {time.time() - t0:.1f} s")
    enc = ImageBindAudioEncoder.tiny(seed=seed).train()
    gen = torch.Generator().manual_seed(seed)
    protos = torch.nn.Parameter(torch.randn(len(CLASSES), enc.config.out_dim, generator=gen))
    opt = torch.optim.AdamW(list(enc.parameters()) + [protos], lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    lo, hi = r["gain_shift"]
    t1 = time.time()
    for step in range(r["steps"]):
        idx = torch.randint(len(clips), (r["batch"],), generator=gen)
        xb = clips[idx] + (lo + (hi - lo) * torch.rand(len(idx), 1, 1, 1, generator=gen))
        xb = xb + r["noise"] * torch.randn(xb.shape, generator=gen)
        logits = enc.embed_clips(xb) @ torch.nn.functional.normalize(protos, dim=-1).T
        loss = torch.nn.functional.cross_entropy(logits, clip_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 40 == 0 or step == r["steps"] - 1:
            log(f"audio step {step:4d} loss {loss.item():.4f} ({time.time() - t1:.0f} s)")
    enc.eval()
    figures = evaluate_audio(enc, seed, recipe, train=(x, y))
    figures["train_seconds"] = round(time.time() - t0, 1)
    return enc, figures


def evaluate_audio(enc, seed: int, recipe: dict, train=None) -> dict:
    """Held-out nearest-centroid accuracy and the mean cosine within / across classes."""
    if train is None:
        train = audio_images([_seeds(TRAIN_BASE, seed, k, recipe["clips_per_class"]) for k in range(len(CLASSES))])
    xt, yt = audio_images([_seeds(HELDOUT_BASE, seed, k, recipe["heldout_per_class"]) for k in range(len(CLASSES))])
    e_train, e_test = embed(enc, train[0]), embed(enc, xt)
    n = torch.nn.functional.normalize(e_test, dim=-1)
    cos = n @ n.T
    same = (yt[:, None] == yt[None, :]) & ~torch.eye(len(yt), dtype=torch.bool)
    diff = yt[:, None] != yt[None, :]
    return {"heldout_accuracy": nearest_centroid_accuracy(e_train, train[1], e_test, yt),
            "cosine_within": float(cos[same].mean()), "cosine_across": float(cos[diff].mean())}


# ----------------------------------------------------------------------------- scorer


def scene_frames(seed: int, category: str, n: int, height: int, width: int, loudness=None, rng=None) -> np.ndarray:
    """n toy-world frames of a class: a random object over the class's look."""
    rng = rng or np.random.default_rng(seed)
    color = VIDEO_OBJECTS[int(rng.integers(len(VIDEO_OBJECTS)))][1]
    # u^2: many quiet frames, as impulsive sounds (fire, birds) are quiet most of the time
    loud = rng.uniform(0, 1, n) ** 2 if loudness is None else loudness
    frames, _ = render_video(seed, n, height, width, color, scene=category, loudness=loud)
    return frames


def train_scorer(seed: int, recipe: dict, log=print):
    from transformers import CLIPModel

    from models.clip_scorer import ClipScorer, tiny_config, tiny_image_processor, tiny_tokenizer
    from tasks.metrics import label_text

    r = recipe
    t0 = time.time()
    proc = tiny_image_processor()
    images, labels = [], []
    rng = np.random.default_rng([seed, 2])
    for k, c in enumerate(CLASSES):
        for s in _seeds(TRAIN_BASE, seed, k, r["videos_per_class"]):
            f = scene_frames(s, c, r["frames_per_video"], r["height"], r["width"], rng=rng)
            images.extend(f)
            labels.extend([k] * len(f))
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    y = torch.tensor(labels)
    log(f"scorer: {len(images)} training frames rendered in {time.time() - t0:.1f} s")
    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    model.train()
    texts = tok([label_text(c) for c in CLASSES], padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    t1 = time.time()
    for step in range(r["steps"]):
        idx = torch.randint(len(pixels), (r["batch"],), generator=gen)
        xb = pixels[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5  # the looks have no handedness
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        # brightness / contrast jitter of the normalised pixels
        xb = xb * (1 + r["jitter"] * (2 * torch.rand(len(idx), 1, 1, 1, generator=gen) - 1)) + \
            r["jitter"] * (2 * torch.rand(len(idx), 1, 1, 1, generator=gen) - 1)
        img = ClipScorer._pooled(model.get_image_features(pixel_values=xb))
        txt = ClipScorer._pooled(model.get_text_features(**texts))
        logits = model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
            torch.nn.functional.normalize(txt, dim=-1).T
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == r["steps"] - 1:
            log(f"scorer step {step:4d} loss {loss.item():.4f} ({time.time() - t1:.0f} s)")
    scorer = ClipScorer(model.eval(), tok, proc)
    figures = evaluate_scorer(scorer, seed, recipe)
    figures["train_seconds"] = round(time.time() - t0, 1)
    return scorer, figures


def evaluate_scorer(scorer, seed: int, recipe: dict) -> dict:
    """Sem-A of held-out toy videos (real clip loudness) for each (target, other source) pair."""
    from tasks.metrics import clip_scores, label_text

    r = recipe
    text = scorer.embed_texts([label_text(c) for c in CLASSES])
    sem, correct, total = [], 0, 0
    for k, c in enumerate(CLASSES):
        for s in _seeds(HELDOUT_BASE, seed, k, r["heldout_per_class"]):
            n = r["heldout_frames"]
            loud = frame_loudness(synthesize_clip(c, s, SAMPLE_RATE), SAMPLE_RATE, n)
            frames = scene_frames(s, c, n, r["height"], r["width"], loudness=loud)
            emb = scorer.embed_images(frames)
            sims = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
            correct += int((sims.argmax(1) == k).sum())
            total += len(frames)
            for j in range(len(CLASSES)):
                if j != k:
                    sem.append(clip_scores(emb, text[k], text[j])["sem_a"])
    return {"heldout_sem_a_min": float(np.min(sem)), "heldout_sem_a_mean": float(np.mean(sem)),
            "heldout_frame_accuracy": correct / total}


# ----------------------------------------------------------------------------- VAE


def vae_frames(seed: int, videos_per_class: int, frames_per_video: int, resolution: int, base: int):
    """uint8 (N, R, R, 3) frames as the pipeline's frames stage gives them (resize + centre crop),
    of every class's look and of the plain world (a source video need not sound like its scene),
    with their object masks (N, R, R)."""
    from tasks.video import resize_crop_frame, resize_crop_mask

    rng = np.random.default_rng([seed, 3])
    frames, masks = [], []
    for k, c in enumerate(CLASSES + [None]):
        for s in _seeds(base, seed, k, videos_per_class):
            color = VIDEO_OBJECTS[int(rng.integers(len(VIDEO_OBJECTS)))][1]
            loud = rng.uniform(0, 1, frames_per_video) ** 2
            f, m = render_video(s, frames_per_video, 96, 128, color, scene=c, loudness=None if c is None else loud)
            frames.extend(resize_crop_frame(x, resolution) for x in f)
            masks.extend(resize_crop_mask(x, resolution) for x in m)
    return np.stack(frames), np.stack(masks)


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(seed: int, recipe: dict, log=print):
    """The tiny AutoencoderKL (models.vae.vae_config(tiny=True)) on toy-world frames at the demo's resolution.

    Loss: MSE + L1 of the reconstruction of a posterior sample, plus kl_weight x KL. The
    scaling factor is then set, as SD's was, to 1 / std of the training frames' latent means,
    so the diffusion model sees unit-variance latents."""
    from models.vae import DOWN, UP, FrameVAE, vae_config

    r = recipe
    t0 = time.time()
    frames, masks = vae_frames(seed, r["videos_per_class"], r["frames_per_video"], r["resolution"], TRAIN_BASE)
    x = _to_tensor(frames)
    # per-pixel loss weight: the object counts object_weight times more (it is what an edit must keep)
    weight = 1.0 + r.get("object_weight", 0.0) * torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    log(f"vae: {len(x)} training frames rendered in {time.time() - t0:.1f} s")
    levels = len(r["block_out_channels"])  # latents 1 / 2^(levels - 1) of the frame
    config = dict(vae_config(tiny=True), block_out_channels=tuple(r["block_out_channels"]),
                  down_block_types=DOWN[:levels], up_block_types=UP[:levels], norm_num_groups=r["norm_num_groups"])
    model = FrameVAE.random(seed, **config)
    vae = model.vae.train()
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    t1 = time.time()
    for step in range(r["steps"]):
        idx = torch.randint(len(x), (r["batch"],), generator=gen)
        xb, wb = x[idx], weight[idx]
        flip = (torch.rand(len(idx), generator=gen) < 0.5)[:, None, None, None]
        xb, wb = torch.where(flip, xb.flip(-1), xb), torch.where(flip, wb.flip(-1), wb)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        err = (rec - xb) ** 2 + (rec - xb).abs()
        loss = (wb * err).mean() / wb.mean() + r["kl_weight"] * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == r["steps"] - 1:
            log(f"vae step {step:4d} loss {loss.item():.4f} ({time.time() - t1:.0f} s)")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    figures = evaluate_vae(model, seed, recipe)
    figures["train_seconds"] = round(time.time() - t0, 1)
    return model, figures


def evaluate_vae(model, seed: int, recipe: dict) -> dict:
    """Held-out reconstruction through the pipeline's encode (posterior mean, scaled) and a decode:
    PSNR over whole frames, and masked SSIM (tasks.metrics) over the object."""
    from tasks.metrics import masked_ssim

    r = recipe
    frames, masks = vae_frames(seed, r["heldout_per_class"], r["frames_per_video"], r["resolution"], HELDOUT_BASE)
    lat = model.encode(frames)
    with torch.no_grad():
        rec = model.vae.decode(lat / model.scaling_factor).sample
    rec8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    mse = float(np.mean((rec8.astype(np.float64) - frames) ** 2))
    return {"heldout_psnr": float(10 * np.log10(255.0**2 / max(mse, 1e-9))),
            "heldout_masked_ssim": float(masked_ssim(frames, rec8, masks)),
            "latent_std": float(lat.std()), "scaling_factor": model.scaling_factor}


# ----------------------------------------------------------------------------- U-Net


def _blank_prompt() -> torch.Tensor:
    """(1, 77, 32): "" through the tiny text encoder of seed 0, the toy preset's (tasks.diffusion.blank_prompt)."""
    from models.text import encode_prompt, tiny_text_encoder
    from models.unet3d import PRESETS

    tok, enc = tiny_text_encoder(0, hidden_size=PRESETS["tiny"]["cross_attention_dim"])
    return encode_prompt(tok, enc, "").detach()


def _class_embeddings(encoder, seed: int, base: int, n: int) -> torch.Tensor:
    """(4, n, 1024) toy audio embeddings of n synthesised clips per class."""
    x, _ = audio_images([_seeds(base, seed, k, n) for k in range(len(CLASSES))])
    return embed(encoder, x).reshape(len(CLASSES), n, -1)


def magnitude_of(loudness) -> torch.Tensor:
    """M_a (F,) of a window whose frames hear these per-frame loudnesses, as the pipeline derives it
    (tasks.audio.weights_from_means: peak-normalised, F * softmax(m / tau), the default tau)."""
    from tasks.audio import weights_from_means
    from tasks.config import AudioStageConfig

    return weights_from_means(np.asarray(loudness, np.float64), AudioStageConfig().temperature)


def unet_data(vae, encoder, seed: int, recipe: dict, base: int, videos_per_class: int) -> dict:
    """Clips of `frames_per_video` consecutive toy-world frames (every class's look, and the plain
    world) as the latents stage makes them (FrameVAE.encode: posterior mean x scaling factor):

    lat (N, C, F, h, w); masks (N, F, R, R) float, 1 = object; y (N,) class (-1 = plain world);
    loud (N, F): the look's per-frame strength, u^2 per frame (u uniform) divided by the clip's
    largest, so it is exactly the peak-normalised loudness M_a is computed from; mag (N, F): that M_a;
    emb (4, n, 1024): audio embeddings of n synthesised clips per class."""
    from tasks.video import resize_crop_frame, resize_crop_mask

    r = recipe
    F = r["frames_per_video"]
    rng = np.random.default_rng([seed, 7])
    frames, masks, ys, louds = [], [], [], []
    for k, c in enumerate(CLASSES + [None]):
        for s in _seeds(base, seed + 7, k, videos_per_class):
            color = VIDEO_OBJECTS[int(rng.integers(len(VIDEO_OBJECTS)))][1]
            loud = rng.uniform(0, 1, F) ** 2
            loud = loud / loud.max()
            f, m = render_video(s, F, 96, 128, color, scene=c, loudness=None if c is None else loud)
            frames.extend(resize_crop_frame(x, r["resolution"]) for x in f)
            masks.extend(resize_crop_mask(x, r["resolution"]) for x in m)
            ys.append(-1 if c is None else k)
            louds.append(loud)
    lat = vae.encode(np.stack(frames), chunk=64).float()
    n = len(ys)
    lat = lat.reshape(n, F, *lat.shape[1:]).transpose(1, 2).contiguous()
    loud = torch.tensor(np.stack(louds), dtype=torch.float32)
    return {"lat": lat, "masks": torch.from_numpy(np.stack(masks).astype(np.float32)).reshape(n, F, *masks[0].shape),
            "y": torch.tensor(ys), "loud": loud, "mag": torch.stack([magnitude_of(x) for x in louds]),
            "emb": _class_embeddings(encoder, seed, base + 50_000, r["clips_per_class"])}


def trains_in_base(name: str) -> bool:
    """What the toy base training trains: the whole 2D U-Net and the Magnitude Modulator (the other
    inflated parts keep their identity init for the pipeline's fine-tuning)."""
    from models.unet3d_io import _is_new_part

    return not _is_new_part(name) or ".magnitude_modulator." in name


def _condition(d: dict, idx: torch.Tensor, gen: torch.Generator, drop: float, klass=None, magnitude=None):
    """The AudioCondition of clips idx: a random clip's embedding of the class (klass, default the
    frames' own) and M_a; plain-world clips and a `drop` fraction are the zero condition."""
    from models.audio_conditioning import AudioCondition

    y = d["y"][idx] if klass is None else klass
    clip = torch.randint(d["emb"].shape[1], (len(idx),), generator=gen)
    keep = (d["y"][idx] >= 0) & (torch.rand(len(idx), generator=gen) >= drop)
    return AudioCondition(embedding=d["emb"][y.clamp(min=0), clip],
                          magnitude=d["mag"][idx] if magnitude is None else magnitude, active=keep)


def train_unet(seed: int, recipe: dict, root: Path, log=print):
    """The tiny preset's UNet2DConditionModel (models.unet3d_presets, class embedding 'projection' of
    2 x 1024), inflated, trained from its seeded init as the base model of the pipeline: v-prediction
    on the toy VAE's latents of short toy-world clips through the 3D forward, conditioned through the
    class embedding on TASI's label of the toy audio encoder's embedding of a clip of the frames' class
    and, per frame, on the M_a of the look's strength through the Magnitude Modulator (unCLIP's null
    condition for plain-world clips and, with probability cond_drop, for any clip, so classifier-free
    guidance and null-condition inversion work). Half the batches give SceneMasker the object masks,
    half give none. Trained: the 2D U-Net and the Magnitude Modulator (trains_in_base). Needs the
    trained toy audio encoder and VAE in `root`. Returns the inflated model."""
    from diffusers import DDIMScheduler

    from models.ddim import noisy_and_target, tiny_scheduler_config
    from models.unet3d import inflate
    from models.unet3d_presets import build_unet2d

    r = recipe
    t0 = time.time()
    enc, vae = toy.load_audio_encoder(root), toy.load_vae(root)
    d = unet_data(vae, enc, seed, r, TRAIN_BASE, r["videos_per_class"])
    n = len(d["y"])
    log(f"unet: {n} training clips of {r['frames_per_video']} frames, {d['emb'].shape[1]} audio clips per class "
        f"in {time.time() - t0:.1f} s")
    alphas = DDIMScheduler.from_config(tiny_scheduler_config()).alphas_cumprod
    ehs = _blank_prompt()
    model = inflate(build_unet2d("tiny", seed)).train()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains_in_base(name))
        if p.requires_grad:
            params.append(p)
    gen = torch.Generator().manual_seed(seed + 3)
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.05)
    t1 = time.time()
    for step in range(r["steps"]):
        idx = torch.randint(n, (r["batch"],), generator=gen)
        z0 = d["lat"][idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(1000, (len(idx),), generator=gen)
        x_t, target = noisy_and_target(alphas, z0, noise, t, "v_prediction")
        cond = _condition(d, idx, gen, r["cond_drop"])
        mask = d["masks"][idx] if float(torch.rand((), generator=gen)) < r["mask_fraction"] else None
        consistent = mask is not None and r.get("fg_consistency", 0) > 0
        if consistent:
            # SceneMasker's promise: the audio changes the scene only. Where the object is, the conditioned
            # output must equal the no-audio one, which guidance's u + w (c - u) then leaves untouched there.
            # (Run first: a forward with gradients keeps its state for the backward.)
            with torch.no_grad():
                u = model(x_t, t, ehs.expand(len(idx), -1, -1)).sample
        out = model(x_t, t, ehs.expand(len(idx), -1, -1), audio=cond, mask=mask).sample
        loss = torch.nn.functional.mse_loss(out, target)
        if consistent:
            fg = torch.nn.functional.adaptive_max_pool2d(mask, out.shape[-2:])[:, None]  # (B, 1, F, h, w)
            gap = (fg * (out - u)) ** 2
            loss = loss + r["fg_consistency"] * gap.sum() / (fg.sum() * out.shape[1]).clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == r["steps"] - 1:
            log(f"unet step {step:4d} loss {loss.item():.4f} ({time.time() - t1:.0f} s)")
    model.release_state()
    model.eval()
    figures = {"train_seconds": round(time.time() - t0, 1)}
    return model, figures


@torch.no_grad()
def denoising_losses(model3d, d: dict, seed: int, repeats: int = 4) -> dict:
    """Held-out v-prediction MSE (3D forward) at fixed (seeded) noise and timesteps, with the clip's own
    class and M_a ("own"), unCLIP's null condition ("null"), another class (y + 1 mod 4, "other"), and
    the own class with a flat M_a of ones ("flat": the loudness withheld); plain-world clips excluded."""
    from diffusers import DDIMScheduler

    from models.audio_conditioning import AudioCondition
    from models.ddim import noisy_and_target, tiny_scheduler_config

    alphas = DDIMScheduler.from_config(tiny_scheduler_config()).alphas_cumprod
    ehs = _blank_prompt()
    keep = torch.nonzero(d["y"] >= 0).flatten()
    lat, y, mag = d["lat"][keep], d["y"][keep], d["mag"][keep]
    clip = torch.arange(len(y)) % d["emb"].shape[1]
    conds = {"own": AudioCondition(embedding=d["emb"][y, clip], magnitude=mag), "null": None,
             "other": AudioCondition(embedding=d["emb"][(y + 1) % len(CLASSES), clip], magnitude=mag),
             "flat": AudioCondition(embedding=d["emb"][y, clip], magnitude=torch.ones_like(mag))}
    gen = torch.Generator().manual_seed(seed + 11)
    sums = dict.fromkeys(conds, 0.0)
    for _ in range(repeats):
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(1000, (len(lat),), generator=gen)
        x_t, target = noisy_and_target(alphas, lat, noise, t, "v_prediction")
        for name, cond in conds.items():
            for i in range(0, len(lat), 16):
                sl = slice(i, i + 16)
                c = None if cond is None else AudioCondition(embedding=cond.embedding[sl], magnitude=cond.magnitude[sl])
                out = model3d(x_t[sl], t[sl], ehs.expand(len(x_t[sl]), -1, -1), audio=c).sample
                sums[name] += float(((out - target[sl]) ** 2).sum())
    n = repeats * lat.numel()
    return {f"heldout_loss_{k}": v / n for k, v in sums.items()}


@torch.no_grad()
def edit_sem_a(model3d, vae, scorer, seed: int, recipe: dict, emb: torch.Tensor, base: int = HELDOUT_BASE) -> dict:
    """Edits of held-out toy videos through the inflated U-Net (models.unet3d, its 3D forward and the
    pipeline's DDIM, no fine-tuning): invert with the null condition, sample with a target class's audio
    (embedding, and the M_a of a held-out clip of that class) and classifier-free guidance, decode, and
    score with the toy scorer: Sem-A (target label vs the source video's class label) for every
    (source, target) pair of different classes, the masked SSIM over the object (tasks.metrics.masked_ssim)
    of the edit with the object mask given to SceneMasker ("masked") and without a mask ("unmasked", as
    "w/o SceneMasker"), and the correlation over frames of the scene's change with M_a. The control
    "none" samples from the same z_T with the null condition only (no audio): its Sem-A shows how much
    of the scene change the audio makes."""
    from models.audio_conditioning import AudioCondition
    from models.ddim import DDIM, tiny_scheduler_config
    from tasks.metrics import clip_scores, label_text, masked_ssim, scene_change_correlation
    from tasks.video import resize_crop_frame, resize_crop_mask

    r = recipe
    ddim = DDIM(tiny_scheduler_config(), r["edit_steps"])
    ehs = _blank_prompt()
    text = scorer.embed_texts([label_text(c) for c in CLASSES])
    F, w = r["edit_frames"], r["guidance"]
    kinds = ("masked", "unmasked", "none")
    sem, ssim, corr = ({k: {} for k in kinds} for _ in range(3))

    def decode(z):
        img = vae.vae.decode(z[0].permute(1, 0, 2, 3) / vae.scaling_factor).sample
        return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    target_mag = [magnitude_of(frame_loudness(synthesize_clip(c, _seeds(base, seed, b, 1)[0] + 99, SAMPLE_RATE),
                                              SAMPLE_RATE, F)) for b, c in enumerate(CLASSES)]
    for a, ca in enumerate(CLASSES):
        s = _seeds(base, seed, a, 1)[0] + 77
        loud = frame_loudness(synthesize_clip(ca, s, SAMPLE_RATE), SAMPLE_RATE, F)
        rng = np.random.default_rng(s)
        color = VIDEO_OBJECTS[int(rng.integers(len(VIDEO_OBJECTS)))][1]
        raw, raw_m = render_video(s, F, 96, 128, color, scene=ca, loudness=loud)
        frames = np.stack([resize_crop_frame(f, r["resolution"]) for f in raw])
        masks = np.stack([resize_crop_mask(m, r["resolution"]) for m in raw_m])
        z0 = vae.encode(frames, chunk=64).float().permute(1, 0, 2, 3)[None]  # (1, C, F, h, w)

        def null(x, t):
            return model3d(x, t, ehs).sample

        zT, _ = ddim.invert(null, z0)
        none8 = decode(ddim.sample(null, zT))
        none_emb = scorer.embed_images(none8)
        for b, cb in enumerate(CLASSES):
            if b != a:
                sem["none"][f"{ca}->{cb}"] = clip_scores(none_emb, text[b], text[a])["sem_a"]
                ssim["none"][f"{ca}->{cb}"] = float(masked_ssim(frames, none8, masks))
                corr["none"][f"{ca}->{cb}"] = scene_change_correlation(frames, none8, masks, target_mag[b])
        for b, cb in enumerate(CLASSES):
            if b == a:
                continue
            cond = AudioCondition(embedding=emb[b, :1], magnitude=target_mag[b][None])
            for kind, mask in (("masked", torch.from_numpy(masks).float()[None]), ("unmasked", None)):
                def guided(x, t, cond=cond, mask=mask):
                    u = model3d(x, t, ehs).sample
                    return u + w * (model3d(x, t, ehs, audio=cond, mask=mask).sample - u)

                out8 = decode(ddim.sample(guided, zT))
                sem[kind][f"{ca}->{cb}"] = clip_scores(scorer.embed_images(out8), text[b], text[a])["sem_a"]
                ssim[kind][f"{ca}->{cb}"] = float(masked_ssim(frames, out8, masks))
                corr[kind][f"{ca}->{cb}"] = scene_change_correlation(frames, out8, masks, target_mag[b])
    fig = {}
    for kind in kinds:
        v = list(sem[kind].values())
        fig[f"edit_{kind}_sem_a_min"], fig[f"edit_{kind}_sem_a_mean"] = float(np.min(v)), float(np.mean(v))
        fig[f"edit_{kind}_ssim_mean"] = float(np.mean(list(ssim[kind].values())))
        fig[f"edit_{kind}_corr_mean"] = float(np.nanmean(list(corr[kind].values())))
        fig[f"edit_{kind}_sem_a"] = sem[kind]
    return fig


# ----------------------------------------------------------------------------- saving


def save_audio(enc, out: Path) -> Path:
    from safetensors.torch import save_file

    p = toy.path("imagebind", out)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in enc.official_state_dict().items()}, str(p))
    return p


def save_vae(model, out: Path) -> Path:
    p = toy.path("vae", out)
    model.save_as_base(p)
    return p


def save_unet(model, out: Path) -> Path:
    """The base folder's unet/: the 2D U-Net of the inflated model as a standard diffusers U-Net folder, in
    float16 to halve the file (the loader upcasts to float32; the recorded figures are measured on the
    reloaded model); and beside it audioscenic_init.safetensors, the trained Magnitude Modulator
    (models.unet3d_io.PART_INIT_FILE), which models.unet3d.from_pretrained loads over the inflated parts."""
    from safetensors.torch import save_file

    from models.unet3d_io import PART_INIT_FILE, _is_new_part, save_part_init

    root = toy.path("unet", out)
    unet_dir = root / "unet"
    unet_dir.mkdir(parents=True, exist_ok=True)
    model.unet.save_config(str(unet_dir))
    base = {k: v.detach().to(torch.float16).contiguous() for k, v in model.unet.state_dict().items()
            if not _is_new_part("unet." + k)}
    save_file(base, str(unet_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_part_init({k: v for k, v in model.named_parameters() if ".magnitude_modulator." in k}, root / PART_INIT_FILE)
    return unet_dir


def evaluate_unet(seed: int, recipe: dict, root: Path, edits: bool = True) -> dict:
    """Figures of the U-Net saved in `root`, loaded through toy.load_unet (models.unet3d.from_pretrained),
    on held-out clips; the random tiny U-Net's denoising loss beside them."""
    from models.unet3d import preset

    enc, vae = toy.load_audio_encoder(root), toy.load_vae(root)
    model = toy.load_unet(root)
    d = unet_data(vae, enc, seed, recipe, HELDOUT_BASE, recipe["heldout_per_class"])
    fig = denoising_losses(model, d, seed)
    fig["tiny_heldout_loss_own"] = denoising_losses(preset("tiny", seed), d, seed)["heldout_loss_own"]
    if edits:
        fig.update(edit_sem_a(model, vae, toy.load_scorer(root), seed, recipe, d["emb"]))
    return fig


def short_unet_figures(seed: int, recipe: dict, root: Path, log=print) -> dict:
    """Train a U-Net with `recipe` (not saved) and measure its held-out denoising losses."""
    model, fig = train_unet(seed, recipe, root, log=log)
    enc, vae = toy.load_audio_encoder(root), toy.load_vae(root)
    d = unet_data(vae, enc, seed, recipe, HELDOUT_BASE, recipe["heldout_per_class"])
    fig.update(denoising_losses(model, d, seed))
    return fig


def save_scorer(scorer, out: Path) -> Path:
    p = toy.path("clip", out)
    scorer.save(p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=toy.TOY_DIR, help="output folder (default: models/toy)")
    ap.add_argument("--seed", type=int, default=RECIPE["seed"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--only", choices=["audio", "scorer", "vae", "unet"],
                    help="train one model only (unet needs the audio encoder and VAE in --out)")
    ap.add_argument("--evaluate", action="store_true",
                    help="with --only unet: do not train, re-measure the U-Net in --out and record its figures")
    ap.add_argument("--no-short-check", action="store_true", help="skip retraining the SHORT recipe for recipe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe_path = args.out / toy.RECIPE_FILE
    record = json.loads(recipe_path.read_text()) if recipe_path.exists() else {}
    record.update({"seed": args.seed, "threads": args.threads, "torch": torch.__version__,
                   "world": "tasks.sample_data toy world (render_video scene=, synthesize_clip)",
                   "seed_ranges": {"train": TRAIN_BASE, "heldout": HELDOUT_BASE}})
    if args.only in (None, "audio"):
        enc, fig = train_audio(args.seed, RECIPE["audio"])
        save_audio(enc, args.out)
        record["audio"] = {"recipe": RECIPE["audio"], "figures": fig, "threads": args.threads}
        print("audio:", json.dumps(fig))
    if args.only in (None, "scorer"):
        scorer, fig = train_scorer(args.seed, RECIPE["scorer"])
        save_scorer(scorer, args.out)
        record["scorer"] = {"recipe": RECIPE["scorer"], "figures": fig, "threads": args.threads}
        print("scorer:", json.dumps(fig))
    if args.only in (None, "vae"):
        model, fig = train_vae(args.seed, RECIPE["vae"])
        save_vae(model, args.out)
        record["vae"] = {"recipe": RECIPE["vae"], "figures": fig, "threads": args.threads}
        print("vae:", json.dumps(fig))
    if args.evaluate and args.only != "unet":
        ap.error("--evaluate needs --only unet")
    if args.only in (None, "unet"):
        if args.evaluate:
            fig = {k: v for k, v in record["unet"]["figures"].items() if k == "train_seconds"}
        else:
            unet, fig = train_unet(args.seed, RECIPE["unet"], args.out)
            save_unet(unet, args.out)
        fig.update(evaluate_unet(args.seed, RECIPE["unet"], args.out))
        trained_with = record["unet"].get("threads", args.threads) if args.evaluate else args.threads
        record["unet"] = {"recipe": RECIPE["unet"], "figures": fig, "threads": trained_with}
        print("unet:", json.dumps(fig))
    if not args.no_short_check:
        quiet = lambda *_: None  # noqa: E731
        check = record.setdefault("short_check", {})
        if args.only in (None, "audio"):
            check["audio"] = train_audio(args.seed, SHORT["audio"], log=quiet)[1]
        if args.only in (None, "scorer"):
            check["scorer"] = train_scorer(args.seed, SHORT["scorer"], log=quiet)[1]
        if args.only in (None, "vae"):
            check["vae"] = train_vae(args.seed, SHORT["vae"], log=quiet)[1]
        if args.only in (None, "unet"):
            check["unet"] = short_unet_figures(args.seed, SHORT["unet"], args.out, log=quiet)
        check["recipe"] = SHORT
        print("short check:", json.dumps(check))
    recipe_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
