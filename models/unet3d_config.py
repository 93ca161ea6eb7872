"""Configuration of the inflated U-Net's new parts (models.unet3d): switches for the ablations and sizes."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from .frequency import FILTER_KINDS, FUSER_ALIGNMENTS

__all__ = ["SWITCHES", "STRUCTURAL", "UNet3DConfig"]

SWITCHES = (
    "tasi",
    "scene_masker",
    "magnitude_modulator",
    "frequency_fuser",
    "temporal_conv",
    "temporal_attention",
    "sparse_causal_attention",
)

# Fields that change which parameters exist or their shapes; a trainable checkpoint
# only fits a model whose structural fields match. SceneMasker has no parameters (it
# only gates where the audio acts), so weights trained with it load into a model without it.
STRUCTURAL = tuple(s for s in SWITCHES if s != "scene_masker") + (
    "embed_dim", "n_mels", "ff_hidden", "mm_hidden", "temporal_kernel")


@dataclass(frozen=True)
class UNet3DConfig:
    """Switches (one per part, for ablations) and sizes of the new parts."""

    tasi: bool = True
    scene_masker: bool = True
    magnitude_modulator: bool = True
    frequency_fuser: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    sparse_causal_attention: bool = True
    embed_dim: int = 1024  # E_a (ImageBind huge, OpenCLIP ViT-H space)
    n_mels: int = 128  # F_a bins per frame
    noise_level: int = 0  # TASI noise augmentation level (0 .. 999), as unCLIP's default
    noise_seed: int = 0  # the fixed TASI noise vector when the caller gives none
    temporal_kernel: int = 3
    filter_kind: str = "gaussian"
    d_s: float = 0.25
    d_t: float = 0.25
    butterworth_n: int = 4
    # Frequency Fuser under SceneMasker: fused features only in the scene (False: the
    # "unmasked Frequency Fuser" ablation). No parameters: not structural.
    fuser_scene_masked: bool = True
    # F_a^w from the audio's temporal spectrum ("spectrum") or per frame by index ("index").
    fuser_alignment: str = "spectrum"
    ff_hidden: int = 128
    mm_hidden: int | None = None  # None: the block's channel count
    seed: int = 0  # init of the new parts that are not zero/identity-initialised

    def __post_init__(self):
        if self.filter_kind not in FILTER_KINDS:
            raise ValueError(f"filter_kind must be one of {FILTER_KINDS}, got '{self.filter_kind}'")
        if self.fuser_alignment not in FUSER_ALIGNMENTS:
            raise ValueError(f"fuser_alignment must be one of {FUSER_ALIGNMENTS}, got '{self.fuser_alignment}'")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd and >= 1, got {self.temporal_kernel}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> UNet3DConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNet3DConfig fields: {', '.join(unknown)}")
        return cls(**dict(d))
