"""How the audio reaches the inflated U-Net (paper 4.2 and 4.4; models.unet3d's docstring).

- `AudioCondition`: E_a, M_a and F_a of a batch of videos, and the zero ("no audio") rows.
- `TASI`: unCLIP's noise augmentation of E_a into the U-Net's class label (4.2).
- `MagnitudeModulator`: eq. 8, the per-frame loudness shift inside each residual block.
The Frequency Fuser (4.5) lives in models.frequency.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

__all__ = ["AudioCondition", "MagnitudeModulator", "TASI"]


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
