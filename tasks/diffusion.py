"""What the inversion, fine-tuning and edit stages share: variants, model identities and loaders.

Variants (the top-level `variants` of the config) are U-Net switch overrides by name;
stages.finetune.variants picks the ones a run fine-tunes and edits with. A switch
that acts only through the SceneMasker mask (`scene_masker`, `fuser_scene_masked`)
plays no part in fine-tuning or inversion, which never pass a mask: variants that
differ only there share one fine-tuned model (`training_variant`), so the "w/o
SceneMasker" and "Frequency Fuser unmasked" ablations edit with the full model's
weights instead of training identical copies.

Models come from the tiny preset (seeded random weights, built offline) or from the
base diffusers folder (models.paths.base: unet/, scheduler/, tokenizer/,
text_encoder/, vae/, image_normalizer/, image_noising_scheduler/) and the ControlNet
folder (models.paths.controlnet). Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.stage_lazy import torch  # imported on first use: planning needs no torch

from storage.hashing import canonical_json
from storage.state import memo
from tasks.config import BUILTIN_PRESETS, ConfigError
from models import toy as toy_models
from tasks.video import model_identity

# U-Net switches that act only through the mask, which fine-tuning and inversion never pass.
EDIT_ONLY_SWITCHES = ("scene_masker", "fuser_scene_masked")

_PROMPTS: dict[str, torch.Tensor] = {}  # blank-prompt encodings by model identity, per process


# ----------------------------------------------------------------------------- variants


def variant_overrides(cfg, name: str) -> dict[str, Any]:
    if name not in cfg.variants:
        known = ", ".join(sorted(cfg.variants)) or "none defined"
        raise ConfigError(f"stages.finetune.variants: unknown variant {name!r} (defined in `variants`: {known})")
    return dict(cfg.variants[name])


def unet_config(cfg, name: str | None, training: bool = False) -> dict[str, Any]:
    """The UNet3DConfig (as a dict) of a variant; None = the paper's model (all parts on).

    n_mels follows the audio stage, the new parts' init seed models.seed. With
    `training`, the edit-only switches keep their defaults (they do not change training).
    """
    overrides = {} if name is None else variant_overrides(cfg, name)
    if training:
        overrides = {k: v for k, v in overrides.items() if k not in EDIT_ONLY_SWITCHES}
    d = {"n_mels": cfg.stages.audio.n_mels, "seed": cfg.models.seed, **overrides}

    def build():
        from models.unet3d import UNet3DConfig

        return UNet3DConfig.from_dict(d).to_dict()

    try:
        return memo("models.unet3d.UNet3DConfig", d, build)  # planning needs no torch
    except (TypeError, ValueError) as e:
        raise ConfigError(f"variants.{name}: {e}") from None


def edit_switches(unet3d: dict[str, Any]) -> dict[str, Any]:
    """The edit-only switches of a variant's UNet3DConfig dict (set on the shared fine-tuned model
    by `apply_edit_switches` before that variant edits with it)."""
    missing = [k for k in EDIT_ONLY_SWITCHES if k not in unet3d]
    if not missing:  # a full UNet3DConfig dict (unet_config's): planning needs no torch
        return {k: unet3d[k] for k in EDIT_ONLY_SWITCHES}

    def build():
        from models.unet3d import UNet3DConfig

        return UNet3DConfig().to_dict()

    defaults = memo("models.unet3d.UNet3DConfig.defaults", {}, build)
    return {k: unet3d.get(k, defaults[k]) for k in EDIT_ONLY_SWITCHES}


def apply_edit_switches(model, switches: dict[str, Any]):
    """Set a variant's edit-only switches on a loaded U-Net (built from the training config,
    which leaves them at their defaults); they are read at every forward. Returns the model."""
    import dataclasses

    if switches and any(getattr(model.config, k) != v for k, v in switches.items()):
        model.config = dataclasses.replace(model.config, **switches)
    return model


def selected_variants(cfg) -> list[str]:
    names = list(cfg.stages.finetune.variants)
    for n in names:
        unet_config(cfg, n)  # unknown names and bad overrides are config errors, named
    return names


def training_variant(cfg, name: str) -> str:
    """The variant whose fine-tuned weights `name` uses: the first defined variant with the same
    training configuration, preferring one without edit-only switches (so "no_scene_masker" -> "full")."""
    want = canonical_json(unet_config(cfg, name, training=True))
    same = [v for v in cfg.variants if canonical_json(unet_config(cfg, v, training=True)) == want]
    pure = [v for v in same if not set(cfg.variants[v]) & set(EDIT_ONLY_SWITCHES)]
    return (pure or same or [name])[0]


# ----------------------------------------------------------------------------- identities


def base_identity(cfg) -> dict[str, Any]:
    """The base model in cache keys: tiny preset + seed, or the base folder's fingerprint (every file)."""
    return model_identity(cfg, "base")


def controlnet_identity(cfg) -> dict[str, Any]:
    return model_identity(cfg, "controlnet")


def scheduler_identity(cfg) -> dict[str, Any]:
    """The tiny preset's scheduler settings; for a base folder its fingerprint already covers scheduler/."""
    if cfg.models.preset in BUILTIN_PRESETS:
        def build():
            from models.ddim import config_for_key

            return config_for_key(load_scheduler_config(cfg))

        return memo("models.ddim.config_for_key/tiny", None, build)  # planning needs no torch
    return {"from": "base/scheduler"}


# ----------------------------------------------------------------------------- loaders


def windows(cfg) -> dict[str, Any]:
    """Denoising windows (stages.windows) as keyword arguments of the sampling/inversion loops."""
    w = cfg.stages.windows
    return {"window": w.window, "overlap": w.overlap}


def inference_autocast(cfg):
    """The precision context of inversion and editing forwards (models.precision)."""
    import contextlib

    if cfg.models.precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.models.device).type, dtype=torch.bfloat16)


def load_scheduler_config(cfg) -> dict[str, Any]:
    from models.checkpoints import MissingWeightsError
    from models.ddim import tiny_scheduler_config
    from models.unet3d import PRESET_PREDICTION_TYPE

    if cfg.models.preset in BUILTIN_PRESETS:
        return tiny_scheduler_config(PRESET_PREDICTION_TYPE["tiny"])
    base = cfg.models.paths.base
    path = None if base is None else Path(base) / "scheduler" / "scheduler_config.json"
    if path is None or not path.is_file():
        raise MissingWeightsError(
            f"scheduler: '{path}' not found (config: models.paths.base); the base diffusers folder must hold "
            "scheduler/scheduler_config.json (nothing is downloaded)"
        )
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def blank_prompt(cfg) -> torch.Tensor:
    """(1, N, D) encoding of "" by the base's text encoder; encoded once per process and model."""
    from models.text import encode_prompt, load_text_encoder, tiny_text_encoder
    from models.unet3d import PRESETS

    ident = canonical_json({"base": base_identity(cfg), "device": cfg.models.device})
    if ident not in _PROMPTS:
        if cfg.models.preset in BUILTIN_PRESETS:
            # toy: the toy U-Net was trained with the seed-0 tiny text encoder's "" (scripts/train_toy.py)
            seed = 0 if cfg.models.preset == "toy" else cfg.models.seed
            tok, enc = tiny_text_encoder(seed, hidden_size=PRESETS["tiny"]["cross_attention_dim"])
            enc.to(cfg.models.device)
        else:
            tok, enc = load_text_encoder(cfg.models.paths.base, cfg.models.device, setting="models.paths.base")
        _PROMPTS[ident] = encode_prompt(tok, enc, "")
        del enc
    return _PROMPTS[ident]


def load_unet(cfg, config: dict[str, Any], trainable: str | Path | None = None):
    """The inflated U-Net for a UNet3DConfig dict (new parts at init), with fine-tuned weights when given."""
    from models.unet3d import UNet3DConfig, from_pretrained, preset

    conf = UNet3DConfig.from_dict(config)
    m = cfg.models
    if m.preset == "toy":
        from models import toy

        # the trained toy base (models/toy/base: unet/ and vae/) through the real loader
        model = from_pretrained(toy.path("unet"), trainable=trainable, config=conf, torch_dtype=torch.float32)
    elif m.preset in BUILTIN_PRESETS:
        model = preset("tiny", seed=m.seed, config=conf)
        if trainable is not None:
            model.load_trainable(trainable)
    else:
        if m.paths.base is None:
            from models.checkpoints import MissingWeightsError

            raise MissingWeightsError("U-Net: models.paths.base is not set; expected the base diffusers folder")
        model = from_pretrained(m.paths.base, trainable=trainable, config=conf, torch_dtype=torch.float32)
    return model.to(m.device).eval()


def load_controlnet(cfg):
    from models.unet3d import build_controlnet

    m = cfg.models
    if m.preset in BUILTIN_PRESETS:
        # toy: still tiny's random ControlNet, its conditioning sized to the toy VAE's latents
        down = toy_models.vae_downsample() if m.preset == "toy" else 8
        return build_controlnet("tiny", seed=m.seed, latent_downsample=down).to(m.device).eval()
    from diffusers import ControlNetModel

    from models.local_folders import DIFFUSERS_WEIGHTS, require_model_folder

    path = require_model_folder(m.paths.controlnet, "depth ControlNet (diffusers folder)", weights=DIFFUSERS_WEIGHTS,
                                setting="models.paths.controlnet")
    return ControlNetModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32).to(m.device).eval()


def load_vae(cfg):
    from tasks.latents import load_vae as _load

    return _load(cfg)


# ----------------------------------------------------------------------------- layout helpers


def to_model_layout(latents) -> torch.Tensor:
    """Stored (F, C, h, w) -> the U-Net's (1, C, F, h, w)."""
    z = torch.as_tensor(latents)
    return z.permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def to_stored_layout(z: torch.Tensor):
    """(1, C, F, h, w) -> float32 numpy (F, C, h, w)."""
    return z[0].permute(1, 0, 2, 3).detach().float().cpu().contiguous().numpy()


def read_required(store, path: str, key: str, names: list[str], what: str, video_id: str | None) -> dict:
    """Arrays of an upstream artifact that must be complete under `key`, or an error naming it."""
    from tasks.video import VideoItemError

    data = store.read(path, key, names=names)
    if data is None:
        raise VideoItemError(
            video_id or "?", f"its {what} artifact {path} is {store.status(path, key)} (not complete under the "
            f"expected key); the {what} stage must succeed first"
        )
    return data
