"""The base model's VAE (diffusers `AutoencoderKL`) for frame latents (DESIGN 1 "Inversion").

Loaded from the base diffusers folder's `vae/` subfolder. Latents are the posterior
*mean* times the config's `scaling_factor` (minus `shift_factor` first when a VAE
defines one), never a hard-coded 0.18215: the mean makes latents a deterministic
function of the frames, so a cached artifact means the same thing on every run.
Frames go through the encoder a few at a time (`chunk`) to bound memory at 768 px.

Tiny preset: same class, four down blocks (so latents are 1/8 of the frame, as SD)
with 8-16 channels, seeded random weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.local_folders import DIFFUSERS_WEIGHTS, require_model_folder

DOWN = ("DownEncoderBlock2D",) * 4
UP = ("UpDecoderBlock2D",) * 4


def vae_config(tiny: bool = True) -> dict:
    """AutoencoderKL kwargs: tiny, or the SD 2.x VAE architecture (full size)."""
    if tiny:
        return dict(
            down_block_types=DOWN, up_block_types=UP, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
        )
    return dict(
        down_block_types=DOWN, up_block_types=UP, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
    )


class FrameVAE:
    """uint8 frames (F, H, W, 3) -> float32 latents (F, C, H/8, W/8), scaled as the base model expects."""

    def __init__(self, vae):
        self.vae = vae.eval()

    @classmethod
    def random(cls, seed: int = 0, **config) -> FrameVAE:
        from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoencoderKL(**config))

    @classmethod
    def tiny(cls, seed: int = 0) -> FrameVAE:
        return cls.random(seed, **vae_config(tiny=True))

    @classmethod
    def from_base_folder(cls, path, device: str = "cpu", setting: str | None = None) -> FrameVAE:
        """The `vae/` subfolder of a local diffusers model folder (e.g. SD 2.1 unCLIP H)."""
        from diffusers import AutoencoderKL

        base = Path(path).expanduser() if path is not None else None
        require_model_folder(
            None if base is None else base / "vae", "VAE (base model's vae/ subfolder)", needs=("config.json",),
            weights=DIFFUSERS_WEIGHTS, setting=setting,
        )
        variant = None
        vae_dir = base / "vae"
        if not any((vae_dir / w).exists() for w in DIFFUSERS_WEIGHTS if ".fp16." not in w):
            variant = "fp16"  # only half-precision weights were shipped; they are upcast below
        vae = AutoencoderKL.from_pretrained(
            base, subfolder="vae", local_files_only=True, variant=variant, torch_dtype=torch.float32
        )
        return cls(vae.to(device))

    def save_as_base(self, base_dir: str | Path) -> None:
        """Write a diffusers folder holding this VAE under vae/ (what `from_base_folder` reads)."""
        self.vae.save_pretrained(Path(base_dir) / "vae")

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, chunk: int = 4) -> torch.Tensor:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        h, w = frames.shape[1:3]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the VAE's downsampling ({self.downsample})")
        param = next(self.vae.parameters())
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        out = []
        for i in range(0, len(frames), max(1, int(chunk))):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + chunk])).permute(0, 3, 1, 2)
            x = x.to(param.device, param.dtype) / 127.5 - 1.0  # [0, 255] -> [-1, 1], the SD convention
            mean = self.vae.encode(x).latent_dist.mean
            out.append(((mean - shift) * self.scaling_factor).float().cpu())
        return torch.cat(out)
