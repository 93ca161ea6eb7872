"""AudioScenic's 3D U-Net: a diffusers 2D U-Net inflated in place (paper 4.1-4.5, DESIGN 1).

How the inflation works
-----------------------
`inflate(unet2d)` keeps the diffusers `UNet2DConditionModel` and every one of its
modules and weights. Frames are folded into the batch (B*F) and the U-Net's own
forward runs unchanged (so ControlNet residuals, SDPA / sliced attention processors
and gradient checkpointing keep working). Two diffusers classes get a subclass
swapped in place (`module.__class__`), which adds the new parts as child modules:

* every `ResnetBlock2D`: temporal convolutions after conv1 and after conv2
  (`temporal_conv1/2`, 1D over frames per pixel, zero-init, residual), SceneMasker
  (eq. 7) on the block's temb projection, and the Magnitude Modulator (eq. 8,
  `magnitude_modulator`) between the two temporal convolutions;
* every `BasicTransformerBlock`: sparse-causal self-attention (attn1 reads keys and
  values from frames 0 and i-1 by being handed them as `encoder_hidden_states`, so
  any attention processor works), the Frequency Fuser (eq. 9, `frequency_fuser`)
  after the cross-attention residual and before the feed-forward, and a temporal
  attention layer (`temporal_attention`, zero-init output) after the feed-forward.

Original parameter names are untouched, so a base diffusers state dict loads as is;
new parameters sit beside them (e.g. `unet.down_blocks.0.resnets.0.temporal_conv1.weight`).
The per-call data the blocks need (frames, the two timestep embeddings, masks, audio
features) is put on a runtime object shared by the swapped modules. When no 3D
forward is in progress the swapped modules run the plain 2D code, so
`model.unet(...)` still is the 2D U-Net with the same weights.

The state of a forward made with gradients enabled is kept until the next forward
(or `release_state()`), because gradient checkpointing re-runs blocks during
backward and they must see the same state. Forwards without gradients drop it.

At initialisation every new part with weights is the identity (zero-init outputs;
Frequency Fuser weights exactly 1), so the inflated model equals the 2D U-Net run
frame by frame. Sparse-causal attention has no weights of its own; it changes
frames 1.. (they attend to frames 0 and i-1 instead of themselves) while frame 0
attends to [frame 0, frame 0], i.e. exactly plain self-attention. So with it on the
equality holds for frame 0, and for all frames of a static clip.

The audio condition
-------------------
`AudioCondition(embedding (B, 1024), magnitude (B, F), mel (B, F, n_mels))`, each
field optional, plus `noise_level`, `noise` for TASI and `active` (B,) for mixing
real rows and zero-condition rows in one batch. `audio=None` is the zero ("no
audio") condition: Magnitude Modulator and Frequency Fuser inactive, and unCLIP's own
null class label, zeros over the whole 2 * embed_dim label (noise-level half
included). SD 2.1 unCLIP learnt that label through embedding dropout, and diffusers'
StableUnCLIPImg2ImgPipeline uses `torch.zeros_like(image_embeds)` of the augmented
label as its negative; a noise-augmented zero *embedding* ([aug(0), emb(level)], what
an earlier version used) is a label the model never saw. The null label is used
wherever the model runs without audio (inversion, the unconditional rows of
guidance, condition dropout in fine-tuning, inactive rows) and gives temb_uf,
SceneMasker's foreground embedding. On a base without class embedding (TASI's own
`class_proj`) the null condition adds nothing to temb (not even class_proj's bias).
Audio labels are `TASI.augment(E_a)`, equal to diffusers'
`StableUnCLIPImg2ImgPipeline.noise_image_embeddings(E_a, noise_level, noise)`.
`AudioCondition.with_unconditional()` stacks the zero rows in front for batched
classifier-free guidance.

Forward
-------
    model(sample (B, C, F, H, W), timestep, encoder_hidden_states (B, N, D),
          audio=AudioCondition(...), mask=(B, F, h, w) with 1 = foreground (any h, w),
          down_block_additional_residuals=..., mid_block_additional_residual=...)
    -> UNet3DOutput(sample=(B, C, F, H, W))

ControlNet residuals are computed per frame with the frames folded
(`controlnet_residuals` does it) and are given folded (B*F, ...) or as (B, C, F, h, w).

Decisions where the paper is silent
-----------------------------------
* Resnet order: conv1 -> temporal_conv1 -> + temb (SceneMasker) -> + Magnitude
  Modulator -> norm2 -> conv2 -> temporal_conv2. The temporal convolutions are full
  (C x C x 3) 1D convolutions; the MM's MLP is SiLU-Linear-SiLU per block and W is
  bias-free, so a zero magnitude is exactly a no-op.
* SceneMasker (paper: "constrain the influence of audio conditions only on the scene
  areas") covers every audio path: it blends temb (eq. 7), masks the MM with (1 - M),
  and, with `fuser_scene_masked` (default), lets the Frequency Fuser's output replace
  the block's features only in the scene: x + (1 - M) (fused - x). So mask = 1
  everywhere equals the no-audio output exactly. fuser_scene_masked=False (the
  "unmasked Frequency Fuser" ablation) lets the fuser act on the whole clip.
  scene_masker=False ignores the mask altogether (the "w/o SceneMasker" ablation).
* The mask reaches coarse U-Net levels by max-pooling (adaptive_max_pool2d to the
  block's (h, w)), so a foreground pixel at full resolution stays foreground at every
  level: thin foreground (limbs, poles) gets no share of the audio's temb. (The
  edit stage's latent mask max-pools in the same way.)
* Frequency Fuser: gains from the audio's temporal spectrum, bounded to [0, 2]
  (models.frequency's docstring: normalisation, alignment, bound). Taking the real
  part after the inverse FFT makes the weight of temporal bin k act as the mean of
  the weights of bins k and -k (equal for the 'spectrum' alignment).
* TASI noise: one fixed noise vector (config.noise_seed) unless the caller passes
  one, so calls are deterministic; temb_f and temb_uf use the same noise.
* "w/o TASI": E_a goes through a trainable Linear (identity-initialised when the
  widths match) as one extra cross-attention token; the unCLIP class slot gets the
  zero condition.
* Trainable set (requires_grad is set by inflate): attn1.to_q, attn2.to_q,
  temporal_attention, temporal_conv1/2, magnitude_modulator, frequency_fuser.encoder,
  plus tasi.class_proj (bases without class embedding) and audio_token_proj
  ("w/o TASI"). For sd21-unclip-h that is 257.7 M parameters (temporal convolutions
  133 M, temporal attention 50 M, MM 48 M, to_q 25 M, fuser encoders 1.9 M).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import BaseOutput
from torch import nn

from .checkpoints import CheckpointMismatchError, MissingWeightsError, load_state_dict, require_folder
from .frequency import FILTER_KINDS, FUSER_ALIGNMENTS, FrequencyFuser

__all__ = [
    "AudioCondition",
    "AudioScenicUNet3D",
    "InflatedResnetBlock2D",
    "InflatedTransformerBlock",
    "TASI",
    "PRESET_PREDICTION_TYPE",
    "read_trainable_config",
    "UNet3DConfig",
    "UNet3DOutput",
    "SWITCHES",
    "TRAINABLE_PATTERN",
    "PRESETS",
    "inflate",
    "is_trainable_name",
    "build_unet2d",
    "build_controlnet",
    "preset",
    "controlnet_residuals",
    "save_trainable",
    "load_trainable",
    "load_unet2d",
    "from_pretrained",
    "save_pretrained",
]

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
_STRUCTURAL = tuple(s for s in SWITCHES if s != "scene_masker") + (
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


@dataclass
class AudioCondition:
    """Audio features for one batch of videos (B videos of F frames).

    embedding: (B, embed_dim) ImageBind E_a; None = unCLIP's null label (no audio semantics).
    magnitude: (B, F) M_a; None = Magnitude Modulator inactive (same as all zeros).
    mel: (B, F, n_mels) F_a; None = Frequency Fuser inactive (identity).
    noise_level: TASI noise level; None = the model config's.
    noise: (B, embed_dim) or (embed_dim,) TASI noise; None = the model's fixed noise
        vector (seeded by config.noise_seed), so repeated calls are deterministic.
    active: (B,) bool; False rows are the zero condition (null label, no MM, no fuser)
        whatever the other fields hold (for batching conditional and unconditional rows).
    """

    embedding: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    mel: torch.Tensor | None = None
    noise_level: int | None = None
    noise: torch.Tensor | None = None
    active: torch.Tensor | None = None

    def with_unconditional(self) -> AudioCondition:
        """[zero condition rows; these rows] (batch 2B), for one-pass classifier-free guidance."""
        B = self._batch()
        if B is None:
            raise ValueError("with_unconditional needs at least one of embedding, magnitude, mel")

        def two(x):
            return None if x is None else torch.cat([torch.zeros_like(x), x])

        noise = self.noise
        if noise is not None and noise.dim() == 2:
            noise = torch.cat([noise, noise])
        dev = next(x for x in (self.embedding, self.magnitude, self.mel) if x is not None).device
        active = self.active if self.active is not None else torch.ones(B, dtype=torch.bool, device=dev)
        return AudioCondition(
            embedding=two(self.embedding),
            magnitude=two(self.magnitude),
            mel=two(self.mel),
            noise_level=self.noise_level,
            noise=noise,
            active=torch.cat([torch.zeros_like(active, dtype=torch.bool), active.bool()]),
        )

    def frames(self, index: torch.Tensor) -> AudioCondition:
        """The condition of the frames `index` (a window of a span; models.windows)."""
        return dataclasses.replace(
            self,
            magnitude=None if self.magnitude is None else self.magnitude.index_select(1, index.to(self.magnitude.device)),
            mel=None if self.mel is None else self.mel.index_select(1, index.to(self.mel.device)),
        )

    def _batch(self) -> int | None:
        for x in (self.embedding, self.magnitude, self.mel):
            if x is not None:
                return x.shape[0]
        return None


@dataclass
class UNet3DOutput(BaseOutput):
    sample: torch.Tensor


# --------------------------------------------------------------------------- new parts


class TemporalAttention(nn.Module):
    """Self-attention over frames for each spatial token (Tune-A-Video's attn_temp), zero-init output."""

    def __init__(self, dim: int, heads: int, dim_head: int, upcast_attention: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(
            query_dim=dim, heads=heads, dim_head=dim_head, bias=False, upcast_attention=upcast_attention
        )
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, n, c = x.shape
        b = bf // frames
        y = self.norm(x).view(b, frames, n, c).transpose(1, 2).reshape(b * n, frames, c)
        y = self.attn(y)
        return y.view(b, n, frames, c).transpose(1, 2).reshape(bf, n, c)


class MagnitudeModulator(nn.Module):
    """Eq. 8: W(M_a[f] * MLP(temb_f)) -> a per-frame, per-channel shift.

    W has no bias, so a zero magnitude is exactly a no-op; W starts at zero, so the
    module is exactly a no-op at initialisation too.
    """

    def __init__(self, temb_dim: int, channels: int, hidden: int):
        super().__init__()
        # SiLU first: temb is pre-activation, as the resnets' own time_emb_proj sees it.
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, hidden), nn.SiLU())
        self.proj = nn.Linear(hidden, channels, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, temb_f: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """temb_f (B*F, T), magnitude (B*F, 1) -> (B*F, C)."""
        return self.proj(magnitude * self.mlp(temb_f))


class TASI(nn.Module):
    """Temporal-aware audio semantic injection (4.2): unCLIP's noise augmentation of E_a.

    label = [unscale(sqrt(a) * scale(E) + sqrt(1 - a) * noise), sinusoid(noise_level)]
    with scale/unscale the image_normalizer's (x - mean) / std and its inverse and a
    the noising schedule's alphas_cumprod[noise_level]; the U-Net's class embedding
    (projection, input 2 * embed_dim) turns it into a temb offset. For a base with no
    class embedding, `class_proj` (zero-init, embed_dim -> temb dim) projects the
    noise-augmented embedding instead. The "no audio" label is not an augmented zero
    embedding but unCLIP's null, zeros over all 2 * embed_dim (AudioScenicUNet3D).
    """

    def __init__(self, embed_dim: int, class_proj_dim: int | None, noise_seed: int = 0):
        super().__init__()
        self.embed_dim = embed_dim
        # The normaliser's statistics come from the pipeline's image_normalizer
        # folder; the defaults (0, 1) are those of a fresh StableUnCLIPImageNormalizer.
        self.register_buffer("mean", torch.zeros(1, embed_dim))
        self.register_buffer("std", torch.ones(1, embed_dim))
        self.noise_schedule_config: dict = {}
        self.register_buffer("alphas_cumprod", torch.ones(1))
        self.set_noise_schedule(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
        g = torch.Generator().manual_seed(noise_seed)
        self.register_buffer("default_noise", torch.randn(embed_dim, generator=g), persistent=False)
        self.class_proj = None
        if class_proj_dim is not None:
            self.class_proj = nn.Linear(embed_dim, class_proj_dim)
            nn.init.zeros_(self.class_proj.weight)
            nn.init.zeros_(self.class_proj.bias)

    def set_noise_schedule(self, scheduler: DDPMScheduler) -> None:
        """Take alphas_cumprod from a DDPMScheduler (SD 2.1 unCLIP: 1000 steps, squaredcos_cap_v2)."""
        self.noise_schedule_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().clone().float().to(self.mean.device)

    def set_normalizer(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(1, -1))
        self.std.copy_(std.reshape(1, -1))

    def augment(
        self, embedding: torch.Tensor, noise_level: int | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, D) -> (B, 2D) class label, computed in float32."""
        B, D = embedding.shape
        if D != self.embed_dim:
            raise ValueError(f"audio embedding must have {self.embed_dim} features, got {D}")
        dev = embedding.device
        level = torch.as_tensor(noise_level, device=dev).long().reshape(-1).expand(B)
        if int(level.min()) < 0 or int(level.max()) >= self.alphas_cumprod.numel():
            raise ValueError(f"noise_level must be in [0, {self.alphas_cumprod.numel() - 1}], got {noise_level}")
        if noise is None:
            noise = self.default_noise
        noise = noise.to(dev, torch.float32).expand(B, D)
        a = self.alphas_cumprod.to(dev)[level][:, None]
        x = (embedding.float() - self.mean) / self.std
        x = a.sqrt() * x + (1 - a).sqrt() * noise
        x = x * self.std + self.mean
        level_emb = get_timestep_embedding(level, D, flip_sin_to_cos=True, downscale_freq_shift=0)
        return torch.cat([x, level_emb.to(x.dtype)], dim=1)


# --------------------------------------------------------------------------- runtime state


class _Runtime:
    """Shared by the swapped modules of one model; holds the current forward's state."""

    __slots__ = ("state",)

    def __init__(self):
        self.state: _State | None = None


class _State:
    def __init__(self, *, config, frames, temb_f, temb_uf, mask, mm_scale, mel, active, level_sizes, anchored=False):
        self.config: UNet3DConfig = config
        self.frames: int = frames
        # Frame 0 of each sample is the span's anchor (models.windows): a clip of its own for
        # every temporal part, and the key/value frame 0 of the window's sparse-causal attention.
        self.anchored: bool = anchored
        self.temb_f = temb_f  # (B*F, T) with the audio
        self.temb_uf = temb_uf  # (B*F, T) with the null label (no audio)
        self.mask = mask  # (B*F, 1, H, W) or None, 1 = foreground
        self.mm_scale = mm_scale  # (B*F, 1) magnitude (0 on inactive rows) or None
        self.mel = mel  # (B, F, n_mels) or None
        self.active = active  # (B,) bool or None
        self.hw_by_tokens = {h * w: (h, w) for h, w in level_sizes}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def mask_at(self, hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """The mask resized to a block's (h, w) by max-pooling: a foreground pixel at full
        resolution stays foreground at every level (a binary mask stays binary)."""
        if self.mask is None:
            return None
        key = (int(hw[0]), int(hw[1]))
        m = self._masks.get(key)
        if m is None:
            m = self.mask if tuple(self.mask.shape[-2:]) == key else F.adaptive_max_pool2d(self.mask, key)
            self._masks[key] = m
        return m.to(dtype)

    def spatial(self, tokens: int) -> tuple[int, int]:
        try:
            return self.hw_by_tokens[tokens]
        except KeyError:
            raise RuntimeError(
                f"cannot map {tokens} tokens to a U-Net level (known sizes: {sorted(self.hw_by_tokens.values())})"
            ) from None


def _temporal_conv(conv: nn.Conv3d, h: torch.Tensor, frames: int) -> torch.Tensor:
    """A (k, 1, 1) Conv3d over frames, run as the equivalent (k, 1) conv2d on (B, C, F, H*W):
    same weights, but CPU conv3d takes a slow path that conv2d avoids."""
    bf, c, H, W = h.shape
    y = h.view(bf // frames, frames, c, H * W).transpose(1, 2)
    w = conv.weight.view(*conv.weight.shape[:3], 1)
    y = F.conv2d(y, w, conv.bias, padding=(conv.padding[0], 0))
    return y.transpose(1, 2).reshape(bf, c, H, W)


def _sparse_causal_kv(x: torch.Tensor, frames: int, anchored: bool = False) -> torch.Tensor:
    """(B*F, N, C) -> (B*F, 2N, C): for frame i the tokens of frame 0 and frame max(i-1, 0).

    Anchored (frame 0 is the span's anchor, frames 1.. a window): the window's first
    frame has no previous frame in the window and takes itself, as frame 0 of a span does.
    """
    bf, n, c = x.shape
    v = x.view(bf // frames, frames, n, c)
    first = v[:, :1].expand(-1, frames, -1, -1)
    prev_idx = torch.arange(frames, device=x.device) - 1
    if anchored:
        prev_idx[1:] = prev_idx[1:].clamp(min=1)
    prev = v[:, prev_idx.clamp(min=0)]
    return torch.cat([first, prev], dim=2).reshape(bf, 2 * n, c)


def _per_clip(h: torch.Tensor, frames: int, anchored: bool, op) -> torch.Tensor:
    """op(h (b*f, ...), f) over each clip: with an anchor, frame 0 of each sample is a 1-frame clip
    of its own and frames 1.. are the window, so no temporal part mixes the anchor into the window."""
    if not anchored:
        return op(h, frames)
    b, rest = h.shape[0] // frames, h.shape[1:]
    v = h.view(b, frames, *rest)
    a = op(v[:, :1].reshape(b, *rest), 1)
    w = op(v[:, 1:].reshape(b * (frames - 1), *rest), frames - 1)
    return torch.cat([a.view(b, 1, *rest), w.view(b, frames - 1, *rest)], 1).view(h.shape)


# --------------------------------------------------------------------------- swapped blocks


class InflatedResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D plus temporal convolutions, SceneMasker and Magnitude Modulator.

    Mirrors ResnetBlock2D.forward (diffusers 0.42) with the new steps inserted:
    conv1 -> temporal_conv1 -> temb (SceneMasker blend) -> Magnitude Modulator ->
    norm2 -> conv2 -> temporal_conv2 -> residual.
    """

    temporal_conv1: nn.Conv3d | None
    temporal_conv2: nn.Conv3d | None
    magnitude_modulator: MagnitudeModulator | None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self._as_runtime.state
        if st is None:
            return super().forward(input_tensor, temb, *args, **kwargs)
        f = st.frames
        x = input_tensor
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            if h.shape[0] >= 64:  # same workaround as diffusers for large batches
                x, h = x.contiguous(), h.contiguous()
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        if self.temporal_conv1 is not None:
            h = h + _per_clip(h, f, st.anchored, lambda y, n: _temporal_conv(self.temporal_conv1, y, n))

        m = st.mask_at(h.shape[-2:], h.dtype)
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(st.temb_f if self.skip_time_act else self.nonlinearity(st.temb_f))[:, :, None, None]
            if m is not None:
                tu = self.time_emb_proj(st.temb_uf if self.skip_time_act else self.nonlinearity(st.temb_uf))
                # Eq. 7, written literally so that M = 1 gives exactly proj(temb_uf).
                t = m * tu[:, :, None, None] + (1 - m) * t
            if self.time_embedding_norm == "default":
                h = h + t
            else:  # scale_shift
                scale, shift = torch.chunk(t, 2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            if self.magnitude_modulator is not None and st.mm_scale is not None:
                mod = self.magnitude_modulator(st.temb_f, st.mm_scale)[:, :, None, None]
                h = h + (mod if m is None else (1 - m) * mod)
            if self.time_embedding_norm == "default":
                h = self.norm2(h)
        else:
            h = self.norm2(h)

        h = self.dropout(self.nonlinearity(h))
        h = self.conv2(h)
        if self.temporal_conv2 is not None:
            h = h + _per_clip(h, f, st.anchored, lambda y, n: _temporal_conv(self.temporal_conv2, y, n))

        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return (x + h) / self.output_scale_factor


class InflatedTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock (layer_norm variant) with sparse-causal attn1, Frequency Fuser, temporal attention.

    Order: attn1 (sparse-causal) -> attn2 (cross) -> Frequency Fuser -> feed-forward
    -> temporal attention, each with its residual.
    """

    frequency_fuser: FrequencyFuser | None
    temporal_attention: TemporalAttention | None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        st = self._as_runtime.state
        if st is None:
            return super().forward(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                timestep,
                cross_attention_kwargs,
                class_labels,
                added_cond_kwargs,
            )
        f = st.frames
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.pop("gligen", None) is not None:
            raise NotImplementedError("GLIGEN is not supported by the inflated U-Net")

        norm = self.norm1(hidden_states)
        if self.pos_embed is not None:
            norm = self.pos_embed(norm)
        kv = None
        if st.config.sparse_causal_attention:
            if attention_mask is not None:
                raise NotImplementedError("attention_mask cannot be combined with sparse-causal attention")
            kv = _sparse_causal_kv(norm, f, st.anchored)
        attn = self.attn1(norm, encoder_hidden_states=kv, attention_mask=attention_mask, **kwargs)
        hidden_states = attn + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        if self.attn2 is not None:
            norm = self.norm2(hidden_states)
            if self.pos_embed is not None:
                norm = self.pos_embed(norm)
            attn = self.attn2(
                norm, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs
            )
            hidden_states = attn + hidden_states

        if self.frequency_fuser is not None and st.mel is not None:
            hidden_states = self._fuse_frequency(hidden_states, st)

        norm = self.norm3(hidden_states)
        if self._chunk_size is not None:
            ff = _chunked_feed_forward(self.ff, norm, self._chunk_dim, self._chunk_size)
        else:
            ff = self.ff(norm)
        hidden_states = ff + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        if self.temporal_attention is not None:
            hidden_states = hidden_states + _per_clip(hidden_states, f, st.anchored, self.temporal_attention)
        return hidden_states

    def _fuse_frequency(self, hidden_states: torch.Tensor, st: _State) -> torch.Tensor:
        bf, n, c = hidden_states.shape
        f = st.frames
        h, w = st.spatial(n)
        x = hidden_states.view(bf // f, f, h, w, c)
        fused = self._fused(x, st.mel, st)
        m = st.mask_at((h, w), fused.dtype) if st.config.fuser_scene_masked else None
        if m is not None:
            # SceneMasker over the fuser: its output replaces the block's features only in
            # the scene; exactly x where M = 1.
            m = m.view(bf // f, f, h, w, 1)
            fused = x + (1 - m) * (fused - x)
        return fused.reshape(bf, n, c)

    def _fused(self, x: torch.Tensor, mel: torch.Tensor, st: _State) -> torch.Tensor:
        """x (B, F, h, w, C), mel (B, F, n_mels) -> the fuser's output. The FFT (and the audio's
        temporal spectrum) act within a clip: the window, and the anchor (if any) on its own."""
        clips = [(0, 1), (1, st.frames)] if st.anchored else [(0, st.frames)]
        out = []
        for a, b in clips:
            weights = self.frequency_fuser.weights(mel[:, a:b])
            if st.active is not None:
                # Zero-condition rows: weights 1, i.e. the fuser is the identity there.
                weights = torch.where(st.active[:, None, None], weights, torch.ones_like(weights))
            out.append(self.frequency_fuser(x[:, a:b], weights))
        return out[0] if len(out) == 1 else torch.cat(out, 1)


def _new_temporal_conv(channels: int, kernel: int, like: torch.Tensor) -> nn.Conv3d:
    conv = nn.Conv3d(channels, channels, kernel_size=(kernel, 1, 1), padding=(kernel // 2, 0, 0))
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv.to(like.device, like.dtype)


def _inflate_resnet(block: ResnetBlock2D, cfg: UNet3DConfig, runtime: _Runtime) -> None:
    if type(block) is not ResnetBlock2D:
        raise NotImplementedError(f"cannot inflate {type(block).__name__}")
    like = block.conv1.weight
    block.__class__ = InflatedResnetBlock2D
    block._as_runtime = runtime
    out_ch = block.conv1.out_channels
    conv2_ch = block.conv2.out_channels
    block.temporal_conv1 = _new_temporal_conv(out_ch, cfg.temporal_kernel, like) if cfg.temporal_conv else None
    block.temporal_conv2 = _new_temporal_conv(conv2_ch, cfg.temporal_kernel, like) if cfg.temporal_conv else None
    block.magnitude_modulator = None
    if cfg.magnitude_modulator and block.time_emb_proj is not None:
        temb_dim = block.time_emb_proj.in_features
        mm = MagnitudeModulator(temb_dim, out_ch, cfg.mm_hidden or out_ch)
        block.magnitude_modulator = mm.to(like.device, like.dtype)


def _inflate_transformer_block(block: BasicTransformerBlock, cfg: UNet3DConfig, runtime: _Runtime) -> None:
    if type(block) is not BasicTransformerBlock:
        raise NotImplementedError(f"cannot inflate {type(block).__name__}")
    if block.norm_type != "layer_norm" or block.only_cross_attention or block.double_self_attention:
        raise NotImplementedError(
            "only Stable Diffusion style transformer blocks (layer_norm, self + cross attention) can be inflated"
        )
    like = block.norm1.weight if block.norm1.weight is not None else next(block.parameters())
    block.__class__ = InflatedTransformerBlock
    block._as_runtime = runtime
    dim = block.dim
    block.frequency_fuser = None
    if cfg.frequency_fuser:
        ff = FrequencyFuser(
            dim, cfg.n_mels, cfg.ff_hidden, cfg.filter_kind, cfg.d_s, cfg.d_t, cfg.butterworth_n, cfg.fuser_alignment
        )
        block.frequency_fuser = ff.to(like.device, like.dtype)
    block.temporal_attention = None
    if cfg.temporal_attention:
        ta = TemporalAttention(dim, block.num_attention_heads, block.attention_head_dim, block.attn1.upcast_attention)
        block.temporal_attention = ta.to(like.device, like.dtype)


# --------------------------------------------------------------------------- the model

TRAINABLE_PATTERN = re.compile(
    r"(^|\.)(attn1\.to_q|attn2\.to_q|temporal_attention|temporal_conv1|temporal_conv2|magnitude_modulator"
    r"|frequency_fuser\.encoder)\."
    r"|^tasi\.class_proj\.|^audio_token_proj\."
)


def is_trainable_name(name: str) -> bool:
    """DESIGN 1's trainable set: attn1.to_q, attn2.to_q, temporal attention, temporal
    convolutions, Magnitude Modulator, Frequency Fuser encoders, plus TASI's class
    projection (bases without class embedding) and the audio-token projection of the
    "w/o TASI" ablation."""
    return TRAINABLE_PATTERN.search(name) is not None


def _fold(x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W); folded tensors pass through."""
    if x.dim() == 5:
        if x.shape[0] != batch or x.shape[2] != frames:
            raise ValueError(f"expected (B={batch}, C, F={frames}, H, W), got {tuple(x.shape)}")
        return x.transpose(1, 2).reshape(batch * frames, *x.shape[1:2], *x.shape[3:])
    if x.dim() == 4 and x.shape[0] == batch * frames:
        return x
    raise ValueError(f"expected (B*F={batch * frames}, C, H, W) or (B, C, F, H, W), got {tuple(x.shape)}")


class AudioScenicUNet3D(nn.Module):
    """The inflated U-Net. Build it with `inflate`, `preset` or `from_pretrained`."""

    def __init__(self, unet: UNet2DConditionModel, config: UNet3DConfig | None = None):
        super().__init__()
        cfg = config or UNet3DConfig()
        self.config = cfg
        uc = unet.config
        if uc.addition_embed_type is not None or uc.time_cond_proj_dim is not None:
            raise NotImplementedError("U-Nets with addition embeddings or timestep conditions are not supported")
        if unet.class_embedding is not None and uc.class_embed_type != "projection":
            raise NotImplementedError(
                f"TASI needs a 'projection' class embedding (unCLIP) or none at all, got '{uc.class_embed_type}'"
            )
        if unet.class_embedding is not None and uc.projection_class_embeddings_input_dim != 2 * cfg.embed_dim:
            raise ValueError(
                f"the U-Net's class projection takes {uc.projection_class_embeddings_input_dim} inputs; "
                f"TASI gives 2 * embed_dim = {2 * cfg.embed_dim}"
            )
        self.unet = unet
        self._runtime = _Runtime()
        like = unet.conv_in.weight
        temb_dim = unet.time_embedding.linear_2.out_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            class_proj_dim = temb_dim if (cfg.tasi and unet.class_embedding is None) else None
            self.tasi = TASI(cfg.embed_dim, class_proj_dim, cfg.noise_seed).to(like.device)
            if self.tasi.class_proj is not None:
                self.tasi.class_proj.to(like.dtype)
            self.audio_token_proj = None
            if not cfg.tasi:
                proj = nn.Linear(cfg.embed_dim, uc.cross_attention_dim)
                if cfg.embed_dim == uc.cross_attention_dim:
                    # Same width (SD 2.1: 1024): start by handing E_a over unchanged.
                    nn.init.eye_(proj.weight)
                    nn.init.zeros_(proj.bias)
                self.audio_token_proj = proj.to(like.device, like.dtype)
            targets = list(unet.modules())
            for m in targets:
                if isinstance(m, ResnetBlock2D):
                    _inflate_resnet(m, cfg, self._runtime)
                elif isinstance(m, BasicTransformerBlock):
                    _inflate_transformer_block(m, cfg, self._runtime)
        self.freeze_base()

    # ---- trainable set

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if is_trainable_name(n)]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if is_trainable_name(n))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if is_trainable_name(n)}

    def freeze_base(self) -> None:
        """requires_grad on exactly the trainable set (done by inflate)."""
        for n, p in self.named_parameters():
            p.requires_grad_(is_trainable_name(n))

    def save_trainable(self, path: str | Path) -> Path:
        return save_trainable(self, path)

    def load_trainable(self, path: str | Path) -> None:
        load_trainable(self, path)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> AudioScenicUNet3D:
        return from_pretrained(path, **kwargs)

    # ---- conveniences that a diffusers U-Net offers

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    def release_state(self) -> None:
        """Drop the kept state of the last forward (see the module docstring)."""
        self._runtime.state = None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # ---- forward

    def _level_sizes(self, H: int, W: int) -> list[tuple[int, int]]:
        sizes = [(H, W)]
        for _ in range(len(self.unet.down_blocks) - 1):
            H, W = (H + 1) // 2, (W + 1) // 2  # Downsample2D: stride 2, padding 1, kernel 3
            sizes.append((H, W))
        return sizes

    def _temb(
        self,
        base: torch.Tensor,
        labels: torch.Tensor | None,
        frames: int,
        x: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """temb for (B, label_dim) labels; labels None = the null condition. rows (B,) bool:
        the rows that carry audio (None = all); the others are the null condition."""
        unet = self.unet
        emb = base
        if unet.class_embedding is not None:
            if labels is None:
                labels = self._null_labels(base.shape[0] // frames, x.device)
            ce = unet.get_class_embed(sample=x, class_labels=labels.to(x.dtype)).repeat_interleave(frames, 0)
            emb = torch.cat([emb, ce], dim=-1) if unet.config.class_embeddings_concat else emb + ce
        elif self.tasi.class_proj is not None and labels is not None:
            # No class embedding: the null condition adds nothing (not even class_proj's bias).
            ce = self.tasi.class_proj(labels[:, : self.config.embed_dim].to(x.dtype))
            if rows is not None:
                ce = ce * rows[:, None].to(ce.dtype)
            emb = emb + ce.repeat_interleave(frames, 0)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    def _null_labels(self, batch: int, device: torch.device) -> torch.Tensor:
        """unCLIP's null class label: zeros over all 2 * embed_dim (module docstring)."""
        return torch.zeros(batch, 2 * self.config.embed_dim, device=device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        audio: AudioCondition | None = None,
        mask: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        *,
        anchored: bool = False,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> UNet3DOutput | tuple[torch.Tensor]:
        """sample (B, C, F, H, W) -> (B, C, F, H, W).

        timestep: scalar or (B,). encoder_hidden_states: (B, N, D) (or (1, N, D), shared).
        class_labels: optional (B, label_dim) TASI labels for temb_f, already noise-augmented
            (overrides audio.embedding; label_dim = 2 * embed_dim).
        audio: AudioCondition or None (the zero condition: unCLIP's null label, zeros).
        mask: (B, F, h, w) or (B, 1, F, h, w) foreground mask (1 = foreground) at any
            resolution; None = no SceneMasker (everything is scene).
        ControlNet residuals: per-frame results, folded (B*F, ...) or (B, C, F, h, w);
            give both or neither.
        anchored: frame 0 is the span's anchor and frames 1.. a window of the span
            (models.windows): the anchor is a clip of its own for the temporal parts and
            frame 0 of the window's sparse-causal attention; its output is to be dropped.
        """
        if sample.dim() != 5:
            raise ValueError(f"sample must be (B, C, F, H, W), got {tuple(sample.shape)}")
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("give both ControlNet residual arguments or neither")
        cfg = self.config
        B, C, Fr, H, W = sample.shape
        if anchored and Fr < 2:
            raise ValueError(f"an anchored window needs the anchor and at least one frame, got {Fr} frames")
        dev, dtype = sample.device, sample.dtype
        x = sample.transpose(1, 2).reshape(B * Fr, C, H, W)

        # Timesteps per folded frame.
        t = torch.as_tensor(timestep, device=dev)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(B * Fr)
        elif t.shape == (B,):
            t = t.repeat_interleave(Fr)
        else:
            raise ValueError(f"timestep must be a scalar or (B,)=({B},), got {tuple(t.shape)}")

        ehs = encoder_hidden_states
        if ehs.shape[0] == 1 and B > 1:
            ehs = ehs.expand(B, *ehs.shape[1:])
        if ehs.shape[0] != B:
            raise ValueError(f"encoder_hidden_states batch {ehs.shape[0]} != B = {B}")

        audio = audio if audio is not None else AudioCondition()
        emb, magnitude, mel, active = self._check_audio(audio, B, Fr, dev)
        level = audio.noise_level if audio.noise_level is not None else cfg.noise_level
        noise = audio.noise
        if noise is not None and noise.dim() == 2 and noise.shape[0] != B:
            raise ValueError(f"audio.noise must be (B={B}, {cfg.embed_dim}) or ({cfg.embed_dim},)")

        # Class labels of temb_f; None = unCLIP's null label (zeros), which temb_uf always has.
        labels_f = class_labels
        if cfg.tasi:
            if labels_f is None and audio.embedding is not None:
                labels_f = self.tasi.augment(emb, level, noise)
        else:
            # "w/o TASI": E_a becomes one extra cross-attention token.
            token = self.audio_token_proj(emb.to(self.audio_token_proj.weight.dtype))[:, None, :]
            ehs = torch.cat([ehs, token.to(ehs.dtype)], dim=1)
        if labels_f is not None:
            if labels_f.shape[0] != B:
                raise ValueError(f"class_labels batch {labels_f.shape[0]} != B = {B}")
            if active is not None:  # inactive rows: the null label
                labels_f = labels_f * active[:, None].to(labels_f.dtype)

        base = self.unet.time_embedding(self.unet.get_time_embed(sample=x, timestep=t), None)
        temb_uf = self._temb(base, None, Fr, x)
        temb_f = temb_uf if labels_f is None else self._temb(base, labels_f, Fr, x, active)

        m = None
        if mask is not None:
            m = self._check_mask(mask, B, Fr).to(dev, dtype)
            if not cfg.scene_masker:
                m = None  # the "w/o SceneMasker" ablation: the mask plays no part
        mm_scale = None
        if magnitude is not None:
            mm_scale = (magnitude * active[:, None] if active is not None else magnitude).reshape(B * Fr, 1).to(dtype)

        state = _State(
            config=cfg,
            frames=Fr,
            temb_f=temb_f,
            temb_uf=temb_uf,
            mask=m,
            mm_scale=mm_scale,
            mel=mel,
            active=active,
            level_sizes=self._level_sizes(H, W),
            anchored=bool(anchored),
        )
        down = mid = None
        if down_block_additional_residuals is not None:
            down = [_fold(r, B, Fr) for r in down_block_additional_residuals]
            mid = _fold(mid_block_additional_residual, B, Fr)

        unet_labels = None
        if self.unet.class_embedding is not None:
            lab = labels_f if labels_f is not None else self._null_labels(B, dev)
            unet_labels = lab.repeat_interleave(Fr, 0).to(dtype)
        self._runtime.state = state
        ok = False
        try:
            out = self.unet(
                x,
                t,
                ehs.repeat_interleave(Fr, 0),
                class_labels=unet_labels,
                cross_attention_kwargs=cross_attention_kwargs,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
            ok = True
        finally:
            # Keep the state for gradient checkpointing's recomputation in backward.
            if not (ok and torch.is_grad_enabled()):
                self._runtime.state = None
        out = out.view(B, Fr, *out.shape[1:]).transpose(1, 2).contiguous()
        return UNet3DOutput(sample=out) if return_dict else (out,)

    def _check_audio(self, audio: AudioCondition, B: int, Fr: int, dev: torch.device):
        cfg = self.config
        emb = audio.embedding
        if emb is None:
            emb = torch.zeros(B, cfg.embed_dim, device=dev)
        elif emb.shape != (B, cfg.embed_dim):
            raise ValueError(f"audio.embedding must be (B={B}, {cfg.embed_dim}), got {tuple(emb.shape)}")
        active = audio.active
        if active is not None:
            if active.shape != (B,):
                raise ValueError(f"audio.active must be (B={B},), got {tuple(active.shape)}")
            active = active.to(dev).bool()
            emb = emb * active[:, None].to(emb.dtype)
        magnitude = audio.magnitude
        if magnitude is not None and magnitude.shape != (B, Fr):
            raise ValueError(f"audio.magnitude must be (B={B}, F={Fr}), got {tuple(magnitude.shape)}")
        mel = audio.mel
        if mel is not None and mel.shape != (B, Fr, cfg.n_mels):
            raise ValueError(f"audio.mel must be (B={B}, F={Fr}, n_mels={cfg.n_mels}), got {tuple(mel.shape)}")
        magnitude = None if magnitude is None else magnitude.to(dev)
        mel = None if mel is None else mel.to(dev)
        return emb.to(dev), magnitude, mel, active

    @staticmethod
    def _check_mask(mask: torch.Tensor, B: int, Fr: int) -> torch.Tensor:
        if mask.dim() == 5 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 4 or mask.shape[:2] != (B, Fr):
            raise ValueError(f"mask must be (B={B}, F={Fr}, h, w) or (B, 1, F, h, w), got {tuple(mask.shape)}")
        return mask.float().reshape(B * Fr, 1, *mask.shape[2:])


def inflate(unet2d: UNet2DConditionModel, config: UNet3DConfig | None = None, **switches) -> AudioScenicUNet3D:
    """Inflate a diffusers UNet2DConditionModel in place (its modules and weights are reused).

    `switches` are UNet3DConfig fields (tasi=False, frequency_fuser=False, filter_kind=..., ...),
    applied over `config`. The result has requires_grad set on exactly the trainable set.
    """
    if getattr(unet2d, "_audioscenic_inflated", False):
        raise ValueError("this U-Net is already inflated")
    cfg = config or UNet3DConfig()
    if switches:
        cfg = dataclasses.replace(cfg, **switches)
    model = AudioScenicUNet3D(unet2d, cfg)
    unet2d._audioscenic_inflated = True
    return model


def controlnet_residuals(
    controlnet: ControlNetModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    controlnet_cond: torch.Tensor,
    conditioning_scale: float = 1.0,
    class_labels: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a diffusers ControlNet on every frame (frames folded into the batch).

    sample (B, C, F, H, W); controlnet_cond (B, 3, F, 8H, 8W) or folded (B*F, 3, 8H, 8W);
    class_labels (B, ...) only for ControlNets with a class embedding. Returns the
    folded (down residuals, mid residual) for AudioScenicUNet3D.forward.
    """
    B, C, Fr, H, W = sample.shape
    x = sample.transpose(1, 2).reshape(B * Fr, C, H, W)
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.reshape(1).expand(B * Fr) if t.numel() == 1 else t.repeat_interleave(Fr)
    ehs = encoder_hidden_states
    if ehs.shape[0] == 1 and B > 1:
        ehs = ehs.expand(B, *ehs.shape[1:])
    labels = class_labels.repeat_interleave(Fr, 0) if class_labels is not None else None
    down, mid = controlnet(
        x,
        t,
        ehs.repeat_interleave(Fr, 0),
        controlnet_cond=_fold(controlnet_cond, B, Fr),
        conditioning_scale=conditioning_scale,
        class_labels=labels,
        return_dict=False,
    )
    return list(down), mid


# --------------------------------------------------------------------------- presets

_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

PRESETS: dict[str, dict] = {
    # Small, fast, same classes; class embedding as unCLIP's (input 2 * 1024) so that
    # real ImageBind embeddings and the tiny encoder both plug in.
    "tiny": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),  # diffusers' name; it is the number of heads (head size 16)
        norm_num_groups=8,
        use_linear_projection=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2048,
    ),
    # stabilityai/stable-diffusion-2-1-unclip (H) unet/config.json; the original
    # v2-1-stable-unclip-h-inference.yaml: model_channels 320, channel_mult 1,2,4,4,
    # num_head_channels 64, context_dim 1024, linear transformer in/out, adm_in_channels 2048.
    "sd21-unclip-h": dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        **_SD_BLOCKS,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        center_input_sample=False,
        dual_cross_attention=False,
        only_cross_attention=False,
        use_linear_projection=True,
        upcast_attention=True,
        resnet_time_scale_shift="default",
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2048,
        num_class_embeds=None,
    ),
}

# Both presets are v-prediction models (SD 2.1 768 / unCLIP); the scheduler reads this.
PRESET_PREDICTION_TYPE = {"tiny": "v_prediction", "sd21-unclip-h": "v_prediction"}


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_unet2d(name: str = "tiny", seed: int = 0, class_embedding: bool = True, **overrides) -> UNet2DConditionModel:
    """A preset's 2D U-Net with seeded random weights. class_embedding=False drops
    the unCLIP class projection (an SD 2.1-like base; TASI then adds its own)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {sorted(PRESETS)}")
    cfg = dict(PRESETS[name])
    if not class_embedding:
        cfg.update(class_embed_type=None, projection_class_embeddings_input_dim=None)
    cfg.update(overrides)
    with _seeded(seed):
        unet = UNet2DConditionModel(**cfg)
    return unet.eval()


def build_controlnet(name: str = "tiny", seed: int = 0) -> ControlNetModel:
    """A ControlNet matching the tiny U-Net's blocks, without class embedding (like
    the SD 2.1 depth ControlNets), seeded random weights (zero convs stay zero)."""
    if name != "tiny":
        raise ValueError("only the 'tiny' ControlNet preset exists; load real ControlNets from a diffusers folder")
    p = PRESETS["tiny"]
    with _seeded(seed):
        cn = ControlNetModel(
            in_channels=p["in_channels"],
            down_block_types=p["down_block_types"],
            block_out_channels=p["block_out_channels"],
            layers_per_block=p["layers_per_block"],
            cross_attention_dim=p["cross_attention_dim"],
            attention_head_dim=p["attention_head_dim"],
            norm_num_groups=p["norm_num_groups"],
            use_linear_projection=p["use_linear_projection"],
            conditioning_embedding_out_channels=(8, 16, 16, 16),
        )
    return cn.eval()


def preset(name: str = "tiny", seed: int = 0, config: UNet3DConfig | None = None, **switches) -> AudioScenicUNet3D:
    """Inflated preset (random weights): 'tiny' for tests/demo, 'sd21-unclip-h' for benchmarks."""
    return inflate(build_unet2d(name, seed), config, **switches).eval()


# --------------------------------------------------------------------------- save / load

TRAINABLE_FORMAT = "audioscenic-unet3d-trainable/1"
TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "audioscenic_unet3d.json"
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
    diff = [k for k in _STRUCTURAL if getattr(given, k) != getattr(stored, k)]
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


def _find_unet_folder(path: Path) -> tuple[Path, Path | None]:
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
    unet_dir, _ = _find_unet_folder(Path(path).expanduser())
    if not any(any(unet_dir.glob(g)) for g in _WEIGHT_GLOBS):
        raise MissingWeightsError(
            f"AudioScenic U-Net: '{unet_dir}' has config.json but no weights "
            f"(diffusion_pytorch_model.safetensors or .bin)"
        )
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return UNet2DConditionModel.from_pretrained(str(unet_dir), **kwargs).eval()


def from_pretrained(
    path: str | Path,
    trainable: str | Path | None = None,
    config: UNet3DConfig | None = None,
    torch_dtype: torch.dtype | None = None,
    **switches,
) -> AudioScenicUNet3D:
    """The whole model from a local folder:

    * a diffusers pipeline root (unet/, and if present image_normalizer/ and
      image_noising_scheduler/, whose statistics and schedule TASI then uses),
    * a bare diffusers U-Net folder,
    * or a folder written by save_pretrained (adds audioscenic_unet3d.json and
      trainable.safetensors).

    `trainable` (a save_trainable file) is loaded over the inflated base; its stored
    config is used when `config` is not given.
    """
    root = Path(path).expanduser()
    unet_dir, pipeline_root = _find_unet_folder(root)
    if config is None and (root / CONFIG_FILE).is_file():
        config = UNet3DConfig.from_dict(json.loads((root / CONFIG_FILE).read_text()))
    if trainable is None and (root / TRAINABLE_FILE).is_file():
        trainable = root / TRAINABLE_FILE
    if trainable is not None:
        stored = read_trainable_config(Path(trainable)) if Path(trainable).is_file() else None
        if config is None:
            config = stored
    unet = load_unet2d(unet_dir, torch_dtype)
    model = inflate(unet, config, **switches).eval()
    if pipeline_root is not None:
        _load_tasi_components(model.tasi, pipeline_root)
    if trainable is not None:
        load_trainable(model, trainable)
    return model


def _load_tasi_components(tasi: TASI, root: Path) -> None:
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
