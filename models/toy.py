"""The `toy` preset: tiny models *trained* on the toy world (issue 18), loaded from committed files.

The `tiny` preset has seeded random weights: fast, but its outputs mean nothing.
The toy preset has the same architectures as `tiny`, trained by
`scripts/train_toy.py` on the toy world of `tasks.sample_data` (every sound class
has a background look that pulses with its loudness), and its weights are
committed under `models/toy/` in the official formats, so they load through the
real loaders, exactly as real weights would:

    models/toy/imagebind_toy.safetensors  ImageBind audio branch, official key names
                                          (modality_*.audio.*), read by
                                          ImageBindAudioEncoder.from_checkpoint with the
                                          tiny config (width 32, 2 blocks, 2 heads, out 1024)
    models/toy/clip/                      a transformers CLIP folder (config.json,
                                          model.safetensors, tokenizer files,
                                          preprocessor_config.json), read by
                                          ClipScorer.from_folder
    models/toy/base/vae/                  an AutoencoderKL of the tiny blocks with three levels
                                          (latents 1/4 of the frame) as a diffusers base folder's
                                          vae/ (config.json with its scaling factor,
                                          diffusion_pytorch_model.safetensors), read by
                                          FrameVAE.from_base_folder
    models/toy/base/unet/                 the tiny UNet2DConditionModel (unCLIP-style class
                                          embedding) as the base folder's unet/ (float16
                                          safetensors), read by models.unet3d.from_pretrained
                                          (tasks.diffusion.load_unet), inflated as any base
    models/toy/base/audioscenic_init.safetensors
                                          the Magnitude Modulator trained with that U-Net,
                                          loaded over the inflated parts by from_pretrained
                                          (models.unet3d_io.PART_INIT_FILE)
    models/toy/recipe.json                how they were made: seed, steps, data recipe,
                                          the held-out figures measured after training

What is trained so far: the audio encoder (clips of one class embed together), the
CLIP-shaped scorer (knows the four class prompts "a photo of <label>"), the VAE
(reconstructs toy-world frames at the demo's 64 px) and the U-Net with its Magnitude
Modulator (denoises toy latents conditioned through TASI on the audio embedding and per
frame on M_a). The text encoder is the tiny one of
seed 0 (the U-Net was trained with its blank prompt), whatever models.seed says. Every other
model of the pipeline (ControlNet, depth, masks) is, under
the toy preset, still the tiny preset's seeded random model (the ControlNet's conditioning
sized to the toy VAE's latents, `vae_downsample`): `TRAINED` lists what is
trained, and the tasks fall back to the tiny builders for the rest.

Decision: the toy weights do not depend on `models.seed` (they are one committed
artifact); their identity in cache keys is the SHA-256 of their files' bytes, so a
retrained model changes every key downstream and a fresh checkout keeps its caches'
keys (no path or mtime in them).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent / "toy"
AUDIO_FILE = "imagebind_toy.safetensors"
CLIP_FOLDER = "clip"
RECIPE_FILE = "recipe.json"

BASE_FOLDER = "base"  # a diffusers base folder holding vae/ and unet/

# trained model -> its file or folder under TOY_DIR (imagebind and clip are models.paths names;
# vae and unet are the base folder's vae/ and unet/; the tasks' identity of the base is the whole folder)
TRAINED = {"imagebind": AUDIO_FILE, "clip": CLIP_FOLDER, "vae": BASE_FOLDER, "unet": BASE_FOLDER}


def path(name: str, root: str | Path | None = None) -> Path:
    """Where the toy weights of `name` (a key of TRAINED) live."""
    if name not in TRAINED:
        raise KeyError(f"the toy preset has no trained '{name}' (trained: {', '.join(TRAINED)})")
    return Path(root or TOY_DIR) / TRAINED[name]


@lru_cache(maxsize=None)
def _digest(p: str) -> str:
    h = hashlib.sha256()
    q = Path(p)
    files = sorted(f for f in q.rglob("*") if f.is_file()) if q.is_dir() else [q]
    for f in files:
        h.update(str(f.relative_to(q) if q.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def identity(name: str) -> dict:
    """Cache-key identity of a trained toy model (a name in TRAINED): its files' content hash."""
    p = path(name)
    if not p.exists():
        return {"preset": "toy", "path": str(p), "missing": True}
    return {"preset": "toy", "sha256": _digest(str(p))}


def vae_downsample(root: str | Path | None = None) -> int:
    """How much smaller than the frame the toy VAE's latents are (2^(levels - 1), from its config.json)."""
    import json

    cfg = json.loads((path("vae", root) / "vae" / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def load_audio_encoder(root: str | Path | None = None):
    """The trained toy ImageBind audio branch, through ImageBindAudioEncoder.from_checkpoint."""
    from models.imagebind_audio import TINY, ImageBindAudioEncoder

    return ImageBindAudioEncoder.from_checkpoint(path("imagebind", root), config=TINY)


def load_scorer(root: str | Path | None = None, device: str = "cpu"):
    """The trained toy CLIP scorer, through ClipScorer.from_folder."""
    from models.clip_scorer import ClipScorer

    return ClipScorer.from_folder(path("clip", root), device, setting="models.preset: toy")


def load_vae(root: str | Path | None = None, device: str = "cpu"):
    """The trained toy VAE, through FrameVAE.from_base_folder (the base folder's vae/)."""
    from models.vae import FrameVAE

    return FrameVAE.from_base_folder(path("vae", root), device, setting="models.preset: toy")


def load_unet(root: str | Path | None = None, config=None):
    """The trained toy U-Net, inflated, through models.unet3d.from_pretrained (the base folder's unet/)."""
    import torch

    from models.unet3d import from_pretrained

    return from_pretrained(path("unet", root), config=config, torch_dtype=torch.float32)
