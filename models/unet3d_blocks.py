"""The inflated blocks of the 3D U-Net (models.unet3d): diffusers' ResnetBlock2D and
BasicTransformerBlock with the new temporal and audio parts, and the per-forward state
the swapped blocks share. `inflate_resnet` / `inflate_transformer_block` swap a block's
class in place and add the new parts as its children (see models.unet3d's docstring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .audio_conditioning import MagnitudeModulator
from .frequency import FrequencyFuser
from .unet3d_config import UNet3DConfig

__all__ = [
    "InflatedResnetBlock2D", "InflatedTransformerBlock", "TemporalAttention", "Runtime", "State",
    "inflate_resnet", "inflate_transformer_block",
]


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


# --------------------------------------------------------------------------- runtime state


class Runtime:
    """Shared by the swapped modules of one model; holds the current forward's state."""

    __slots__ = ("state",)

    def __init__(self):
        self.state: State | None = None


class State:
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

    def _fuse_frequency(self, hidden_states: torch.Tensor, st: State) -> torch.Tensor:
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

    def _fused(self, x: torch.Tensor, mel: torch.Tensor, st: State) -> torch.Tensor:
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


def inflate_resnet(block: ResnetBlock2D, cfg: UNet3DConfig, runtime: Runtime) -> None:
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


def inflate_transformer_block(block: BasicTransformerBlock, cfg: UNet3DConfig, runtime: Runtime) -> None:
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
