"""AudioScenic's 3D U-Net: a diffusers 2D U-Net inflated in place (paper 4.1-4.5, DESIGN 1).

Where things are (one concept per file, as diffusers splits a model)
--------------------------------------------------------------------
* this module: `AudioScenicUNet3D` (the model and its forward), `inflate`, `preset`,
  `from_pretrained`, `controlnet_residuals`; it re-exports the names below.
* models.unet3d_config: `UNet3DConfig` and the ablation switches.
* models.audio_conditioning: `AudioCondition`, `TASI`, `MagnitudeModulator`.
* models.unet3d_blocks: the inflated resnet and transformer blocks, temporal
  attention, and the per-forward state they share.
* models.frequency: the Frequency Fuser and its low-pass filters.
* models.unet3d_presets / models.unet3d_io: presets with random weights; save and load.
* models.windows: long spans in overlapping windows with an anchor frame (the
  model's `anchored=True` forward is what a window runs).

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

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import BaseOutput
from torch import nn

from .audio_conditioning import TASI, AudioCondition, MagnitudeModulator
from .unet3d_blocks import (
    InflatedResnetBlock2D,
    InflatedTransformerBlock,
    Runtime,
    State,
    TemporalAttention,
    inflate_resnet,
    inflate_transformer_block,
)
from .unet3d_config import STRUCTURAL, SWITCHES, UNet3DConfig
from .unet3d_io import (
    CONFIG_FILE,
    PART_INIT_FILE,
    TRAINABLE_FILE,
    find_unet_folder,
    load_part_init,
    load_tasi_components,
    load_trainable,
    load_unet2d,
    read_trainable_config,
    save_pretrained,
    save_trainable,
)
from .unet3d_presets import PRESET_PREDICTION_TYPE, PRESETS, build_controlnet, build_unet2d

__all__ = [
    "AudioCondition",
    "AudioScenicUNet3D",
    "InflatedResnetBlock2D",
    "InflatedTransformerBlock",
    "MagnitudeModulator",
    "TASI",
    "TemporalAttention",
    "PRESET_PREDICTION_TYPE",
    "read_trainable_config",
    "UNet3DConfig",
    "UNet3DOutput",
    "SWITCHES",
    "STRUCTURAL",
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


@dataclass
class UNet3DOutput(BaseOutput):
    sample: torch.Tensor


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
        self._runtime = Runtime()
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
                    inflate_resnet(m, cfg, self._runtime)
                elif isinstance(m, BasicTransformerBlock):
                    inflate_transformer_block(m, cfg, self._runtime)
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

        state = State(
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


def preset(name: str = "tiny", seed: int = 0, config: UNet3DConfig | None = None, **switches) -> AudioScenicUNet3D:
    """Inflated preset (random weights): 'tiny' for tests/demo, 'sd21-unclip-h' for benchmarks."""
    return inflate(build_unet2d(name, seed), config, **switches).eval()


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

    A root that holds audioscenic_init.safetensors (models.unet3d_io.PART_INIT_FILE) gives
    initial weights for (some of) the inflated parts, loaded before `trainable`.

    `trainable` (a save_trainable file) is loaded over the inflated base; its stored
    config is used when `config` is not given.
    """
    root = Path(path).expanduser()
    unet_dir, pipeline_root = find_unet_folder(root)
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
        load_tasi_components(model.tasi, pipeline_root)
    if (root / PART_INIT_FILE).is_file():
        load_part_init(model, root / PART_INIT_FILE)
    if trainable is not None:
        load_trainable(model, trainable)
    return model
