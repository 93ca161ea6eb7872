"""Saving and loading the inflated U-Net (models.unet3d): trainable weights as safetensors,
and whole-model folders in the diffusers layout. Never downloads; loads with safetensors."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from .audio_conditioning import TASI
from .checkpoints import CheckpointMismatchError, MissingWeightsError, load_state_dict, require_folder
from .unet3d_config import STRUCTURAL, UNet3DConfig

if TYPE_CHECKING:
    from .unet3d import AudioScenicUNet3D

__all__ = [
    "TRAINABLE_FORMAT", "TRAINABLE_FILE", "CONFIG_FILE", "save_trainable", "read_trainable_config",
    "load_trainable", "find_unet_folder", "load_unet2d", "load_tasi_components", "save_pretrained",
    "PART_INIT_FILE", "save_part_init", "load_part_init",
]

TRAINABLE_FORMAT = "audioscenic-unet3d-trainable/1"
TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "audioscenic_unet3d.json"
# Initial weights for the inflated parts, shipped beside a base's unet/ (a base whose Magnitude
# Modulator was trained with it, as the toy preset's). Unlike trainable.safetensors it may hold
# any subset of the new parts and fits every variant; what it lacks keeps the identity init.
PART_INIT_FILE = "audioscenic_init.safetensors"
PART_INIT_FORMAT = "audioscenic-unet3d-part-init/1"
_WEIGHT_GLOBS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin", "*.index.json")


def save_trainable(model: AudioScenicUNet3D, path: str | Path) -> Path:
    """The trainable weights only, as safetensors, with the model config in the metadata."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": TRAINABLE_FORMAT, "config": json.dumps(model.config.to_dict())})
    tmp.replace(p)  # a crash never leaves a half-written file under the final name
    return p


def read_trainable_config(path: str | Path) -> UNet3DConfig | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return UNet3DConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None


def _check_structural(given: UNet3DConfig, stored: UNet3DConfig, source) -> None:
    diff = [k for k in STRUCTURAL if getattr(given, k) != getattr(stored, k)]
    if diff:
        raise CheckpointMismatchError(
            f"trainable weights '{source}' were saved with a different model structure: "
            + ", ".join(f"{k}={getattr(stored, k)!r} (model {getattr(given, k)!r})" for k in diff)
        )


def load_trainable(model: AudioScenicUNet3D, path: str | Path) -> None:
    """Load trainable weights saved by save_trainable; keys and shapes must match exactly."""
    what = "AudioScenic U-Net trainable weights"
    state = load_state_dict(path, what)
    stored = read_trainable_config(path)
    if stored is not None:
        _check_structural(model.config, stored, path)
    own = dict(model.named_parameters())
    expected = set(model.trainable_parameter_names())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    bad = sorted(k for k in expected & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad:
        raise CheckpointMismatchError(
            f"{what}: '{path}' does not fit the model; missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad[:5]}"
        )
    with torch.no_grad():
        for k in expected:
            own[k].copy_(state[k].to(own[k].device, own[k].dtype))


def save_part_init(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Initial weights of new parts (names as in the inflated model, e.g.
    `unet.down_blocks.0.resnets.0.magnitude_modulator.proj.weight`), written atomically."""
    from safetensors.torch import save_file

    bad = sorted(k for k in tensors if not _is_new_part(k))
    if bad:
        raise ValueError(f"part init holds only the inflated parts' weights, not {bad[:3]}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": PART_INIT_FORMAT})
    tmp.replace(p)
    return p


def load_part_init(model: AudioScenicUNet3D, path: str | Path) -> list[str]:
    """Load a part-init file over the inflated model; returns the names loaded.

    Every tensor must name an inflated part of a block this model has, with the model's shape where
    the model has that part. Parts this variant switched off (e.g. no Magnitude Modulator) are
    skipped; a tensor whose block the model lacks is an error (the file is another architecture's)."""
    what = "AudioScenic U-Net part init"
    state = load_state_dict(path, what)
    own = dict(model.named_parameters())
    blocks = {name for name, _ in model.named_modules()}
    foreign = sorted(k for k in state if not _is_new_part(k))
    alien = sorted(k for k in state if k not in foreign and k[:_NEW_PART.search(k).start()] not in blocks)
    bad = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if foreign or alien or bad:
        raise CheckpointMismatchError(
            f"{what}: '{path}' does not fit the model; not inflated parts {foreign[:5]}, blocks the model "
            f"lacks {alien[:5]}, shape mismatch {bad[:5]}"
        )
    used = sorted(k for k in state if k in own)
    with torch.no_grad():
        for k in used:
            own[k].copy_(state[k].to(own[k].device, own[k].dtype))
    return used


def find_unet_folder(path: Path) -> tuple[Path, Path | None]:
    """-> (unet folder, pipeline root or None)."""
    if (path / "unet" / "config.json").is_file():
        return path / "unet", path
    if (path / "config.json").is_file():
        return path, None
    require_folder(path, ["unet/config.json or config.json"], "AudioScenic U-Net (diffusers folder)")
    raise MissingWeightsError(
        f"AudioScenic U-Net: '{path}' is neither a diffusers pipeline folder (unet/config.json) "
        f"nor a U-Net folder (config.json)"
    )


def load_unet2d(path: str | Path, torch_dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """UNet2DConditionModel from a local diffusers folder (pipeline root or its unet/); never downloads."""
    unet_dir, _ = find_unet_folder(Path(path).expanduser())
    if not any(any(unet_dir.glob(g)) for g in _WEIGHT_GLOBS):
        raise MissingWeightsError(
            f"AudioScenic U-Net: '{unet_dir}' has config.json but no weights "
            f"(diffusion_pytorch_model.safetensors or .bin)"
        )
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return UNet2DConditionModel.from_pretrained(str(unet_dir), **kwargs).eval()


def load_tasi_components(tasi: TASI, root: Path) -> None:
    norm_dir, sched_dir = root / "image_normalizer", root / "image_noising_scheduler"
    if (norm_dir / "config.json").is_file():
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

        normalizer = StableUnCLIPImageNormalizer.from_pretrained(str(norm_dir), local_files_only=True)
        tasi.set_normalizer(normalizer.mean.detach(), normalizer.std.detach())
    if (sched_dir / "scheduler_config.json").is_file():
        tasi.set_noise_schedule(DDPMScheduler.from_pretrained(str(sched_dir), local_files_only=True))


def save_pretrained(model: AudioScenicUNet3D, directory: str | Path) -> Path:
    """Write a folder that from_pretrained reads back: unet/ (the untouched 2D base, a
    standard diffusers U-Net folder), image_normalizer/, image_noising_scheduler/,
    audioscenic_unet3d.json and trainable.safetensors."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from safetensors.torch import save_file

    out = Path(directory)
    unet_dir = out / "unet"
    unet_dir.mkdir(parents=True, exist_ok=True)
    model.unet.save_config(str(unet_dir))
    # Only the 2D U-Net's own tensors (to_q included, as fine-tuned), so unet/ is a
    # plain diffusers folder; the new parts go to trainable.safetensors.
    base = {
        k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items() if not _is_new_part("unet." + k)
    }
    save_file(base, str(unet_dir / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=model.config.embed_dim)
    with torch.no_grad():
        normalizer.mean.copy_(model.tasi.mean.cpu())
        normalizer.std.copy_(model.tasi.std.cpu())
    normalizer.save_pretrained(str(out / "image_normalizer"))
    DDPMScheduler.from_config(model.tasi.noise_schedule_config).save_pretrained(str(out / "image_noising_scheduler"))
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    save_trainable(model, out / TRAINABLE_FILE)
    return out


_NEW_PART = re.compile(r"\.(temporal_attention|temporal_conv1|temporal_conv2|magnitude_modulator|frequency_fuser)\.")


def _is_new_part(name: str) -> bool:
    return _NEW_PART.search(name) is not None
