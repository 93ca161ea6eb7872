#!/usr/bin/env python3
"""Train the `toy` preset (models/toy.py) on the toy world, reproducibly, on a few CPU cores.

    .venv/bin/python scripts/train_toy.py                 # the committed recipe -> models/toy/
    .venv/bin/python scripts/train_toy.py --out DIR --threads 2
    .venv/bin/python scripts/train_toy.py --only audio    # one model

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

3. The VAE: diffusers `AutoencoderKL` at the tiny preset's sizes (`models.vae.vae_config(tiny=True)`,
   latents 1/8 of the frame, 4 latent channels, widths 8-16; the recipe can widen it,
   but 16-32 for 600 steps did no better than 8-16 for 400, at 4x the time), seeded init, on toy-world and plain-world frames resized and
   centre-cropped to the demo's 64 px exactly as the frames stage does. Loss: MSE + L1 of
   the reconstruction of a posterior sample + a tiny KL term; afterwards the config's
   scaling factor is set to 1 / std of the training latents (as SD's 0.18215 was chosen).

Held-out figures (written into recipe.json, checked by tests/test_toy_preset.py):
nearest-centroid accuracy of held-out audio (centroids from the training audio,
whole-clip embeddings), and, for the scorer, Sem-A of held-out toy-world videos
(frames of class c, loudness of a held-out clip of c) for the target label c
against every other label as source: min and mean over the pairs; for the VAE, PSNR of
held-out frames through encode (posterior mean) and decode, and the masked SSIM
(tasks.metrics.masked_ssim) of the reconstruction over the object.

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
    "vae": {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4,
            "videos_per_class": 60, "frames_per_video": 2, "resolution": 64, "steps": 2000, "batch": 16,
            "lr": 2e-3, "weight_decay": 0.0, "kl_weight": 1e-6, "heldout_per_class": 4},
}

# A short budget of the same recipe, retrained by tests/test_toy_preset.py in well under a minute;
# recipe.json's "short_check" records the figures it gave when the weights were committed.
SHORT = {
    "audio": dict(RECIPE["audio"], clips_per_class=8, steps=40, batch=32, heldout_per_class=4),
    "scorer": dict(RECIPE["scorer"], videos_per_class=10, steps=60, heldout_per_class=2, heldout_frames=12),
    "vae": dict(RECIPE["vae"], videos_per_class=6, steps=30, heldout_per_class=1),
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
    from models.vae import FrameVAE, vae_config

    r = recipe
    t0 = time.time()
    frames, _ = vae_frames(seed, r["videos_per_class"], r["frames_per_video"], r["resolution"], TRAIN_BASE)
    x = _to_tensor(frames)
    log(f"vae: {len(x)} training frames rendered in {time.time() - t0:.1f} s")
    config = dict(vae_config(tiny=True), block_out_channels=tuple(r["block_out_channels"]),
                  norm_num_groups=r["norm_num_groups"])
    model = FrameVAE.random(seed, **config)
    vae = model.vae.train()
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    t1 = time.time()
    for step in range(r["steps"]):
        idx = torch.randint(len(x), (r["batch"],), generator=gen)
        xb = x[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, xb) + (rec - xb).abs().mean() + r["kl_weight"] * post.kl().mean()
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


def save_scorer(scorer, out: Path) -> Path:
    p = toy.path("clip", out)
    scorer.save(p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=toy.TOY_DIR, help="output folder (default: models/toy)")
    ap.add_argument("--seed", type=int, default=RECIPE["seed"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--only", choices=["audio", "scorer", "vae"], help="train one model only")
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
        record["audio"] = {"recipe": RECIPE["audio"], "figures": fig}
        print("audio:", json.dumps(fig))
    if args.only in (None, "scorer"):
        scorer, fig = train_scorer(args.seed, RECIPE["scorer"])
        save_scorer(scorer, args.out)
        record["scorer"] = {"recipe": RECIPE["scorer"], "figures": fig}
        print("scorer:", json.dumps(fig))
    if args.only in (None, "vae"):
        model, fig = train_vae(args.seed, RECIPE["vae"])
        save_vae(model, args.out)
        record["vae"] = {"recipe": RECIPE["vae"], "figures": fig}
        print("vae:", json.dumps(fig))
    if not args.no_short_check:
        quiet = lambda *_: None  # noqa: E731
        check = record.setdefault("short_check", {})
        if args.only in (None, "audio"):
            check["audio"] = train_audio(args.seed, SHORT["audio"], log=quiet)[1]
        if args.only in (None, "scorer"):
            check["scorer"] = train_scorer(args.seed, SHORT["scorer"], log=quiet)[1]
        if args.only in (None, "vae"):
            check["vae"] = train_vae(args.seed, SHORT["vae"], log=quiet)[1]
        check["recipe"] = SHORT
        print("short check:", json.dumps(check))
    recipe_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
