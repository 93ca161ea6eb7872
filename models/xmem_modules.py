"""Network blocks of XMem (Cheng & Schwing, ECCV 2022), written for this project.

Attribute names are chosen so that `state_dict()` keys equal those of the
official `XMem.pth`; that is the only reason for names such as `res2` (the
key encoder's first ResNet stage) or `ChannelGate.mlp.1`.

Shape conventions:
- "main" features depend on the image only: (B, C, H, W);
- "group" features also depend on an object's mask and carry an object axis:
  (B, num_objects, C, H, W). Group layers treat objects independently.

Nothing here downloads weights: ResNet stages are built locally and start from
random values; real weights come from a checkpoint.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# ResNet pieces (no torchvision)
# --------------------------------------------------------------------------------------------


def _he_init(module: nn.Module) -> None:
    # The classic ResNet initialisation, so random full-size models have sane activations.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    # Index 0/1 inside a Sequential give the official `downsample.0` / `downsample.1` keys.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 block)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50 block, stride on the 3x3)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


def _stage(block: type[nn.Module], in_ch: int, width: int, n_blocks: int, stride: int) -> nn.Sequential:
    blocks = [block(in_ch, width, stride)]
    out_ch = width * block.expansion
    blocks += [block(out_ch, width, 1) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


class KeyEncoder(nn.Module):
    """ResNet-50 trunk up to layer3: returns f16, f8, f4 (strides 16, 8, 4).

    Full size: widths 64 -> channels f4=256, f8=512, f16=1024; blocks (3, 4, 6).
    """

    def __init__(self, width: int = 64, blocks: Sequence[int] = (3, 4, 6)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        e = Bottleneck.expansion
        self.res2 = _stage(Bottleneck, width, width, blocks[0], 1)
        self.layer2 = _stage(Bottleneck, width * e, width * 2, blocks[1], 2)
        self.layer3 = _stage(Bottleneck, width * 2 * e, width * 4, blocks[2], 2)
        self.channels = (width * 4 * e, width * 2 * e, width * e)  # f16, f8, f4
        _he_init(self)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(image))))
        f4 = self.res2(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return f16, f8, f4


# --------------------------------------------------------------------------------------------
# Group (per-object) layers
# --------------------------------------------------------------------------------------------


def _per_object(fn, g: torch.Tensor) -> torch.Tensor:
    """Apply a 4D op to (B, N, C, H, W) by folding objects into the batch."""
    b, n = g.shape[:2]
    out = fn(g.flatten(0, 1))
    return out.view(b, n, *out.shape[1:])


def resize_groups(g: torch.Tensor, ratio: float) -> torch.Tensor:
    # Upsampling is bilinear and downsampling area-averaged, as in XMem.
    if ratio > 1:
        fn = lambda x: F.interpolate(x, scale_factor=ratio, mode="bilinear", align_corners=False)  # noqa: E731
    else:
        fn = lambda x: F.interpolate(x, scale_factor=ratio, mode="area")  # noqa: E731
    return _per_object(fn, g)


def broadcast_main(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Repeat an image feature (B, C, H, W) along g's object axis."""
    return x.unsqueeze(1).expand(-1, g.shape[1], -1, -1, -1)


class GConv2D(nn.Conv2d):
    """A Conv2d that takes group tensors (B, N, C, H, W); same parameters as nn.Conv2d."""

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _per_object(super().forward, g)


class GroupResBlock(nn.Module):
    """Pre-activation residual block on group tensors; a 3x3 conv adapts the skip path."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.downsample = None if in_ch == out_ch else GConv2D(in_ch, out_ch, 3, padding=1)
        self.conv1 = GConv2D(in_ch, out_ch, 3, padding=1)
        self.conv2 = GConv2D(out_ch, out_ch, 3, padding=1)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(F.relu(g))))
        skip = g if self.downsample is None else self.downsample(g)
        return y + skip


class _SpatialConv(nn.Module):
    # Wrapper only so the key reads `SpatialGate.spatial.conv.weight` as in the official file.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ChannelGate(nn.Module):
    """CBAM channel attention: a shared MLP over global average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(att)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: 7x7 conv over the channel-wise max and mean maps."""

    def __init__(self):
        super().__init__()
        self.spatial = _SpatialConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.ChannelGate = ChannelGate(channels, reduction)
        self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class FeatureFusionBlock(nn.Module):
    """Fuse an image feature with per-object features: concat -> res block -> CBAM residual -> res block."""

    def __init__(self, x_ch: int, g_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.block1 = GroupResBlock(x_ch + g_ch, mid_ch)
        self.attention = CBAM(mid_ch)
        self.block2 = GroupResBlock(mid_ch, out_ch)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = self.block1(torch.cat([broadcast_main(x, g), g], dim=2))
        g = g + _per_object(self.attention, g)
        return self.block2(g)


def _gru_step(values: torch.Tensor, h: torch.Tensor, hidden_dim: int) -> torch.Tensor:
    # XMem's GRU variant: the candidate is not reset-gated; instead the old state is scaled
    # by both a "forget" gate and (1 - update). Kept exactly so trained weights behave.
    forget = torch.sigmoid(values[:, :, :hidden_dim])
    update = torch.sigmoid(values[:, :, hidden_dim : 2 * hidden_dim])
    candidate = torch.tanh(values[:, :, 2 * hidden_dim :])
    return forget * h * (1 - update) + update * candidate


class HiddenReinforcer(nn.Module):
    """Value-encoder side sensory-memory update ("deep update"): one GRU step on the value."""

    def __init__(self, g_ch: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.transform = GConv2D(g_ch + hidden_dim, hidden_dim * 3, 3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return _gru_step(self.transform(torch.cat([g, h], dim=2)), h, self.hidden_dim)


class HiddenUpdater(nn.Module):
    """Decoder side sensory-memory update from the three decoder scales (pooled to 1/16)."""

    def __init__(self, g_chs: Sequence[int], mid_ch: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.g16_conv = GConv2D(g_chs[0], mid_ch, 1)
        self.g8_conv = GConv2D(g_chs[1], mid_ch, 1)
        self.g4_conv = GConv2D(g_chs[2], mid_ch, 1)
        self.transform = GConv2D(mid_ch + hidden_dim, hidden_dim * 3, 3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, g16: torch.Tensor, g8: torch.Tensor, g4: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        g = self.g16_conv(g16) + self.g8_conv(resize_groups(g8, 0.5)) + self.g4_conv(resize_groups(g4, 0.25))
        return _gru_step(self.transform(torch.cat([g, h], dim=2)), h, self.hidden_dim)


# --------------------------------------------------------------------------------------------
# XMem's encoders, key projection and decoder
# --------------------------------------------------------------------------------------------


class ValueEncoder(nn.Module):
    """ResNet-18 trunk up to layer3 on (image, object mask, other objects' mask) = 5 channels,
    fused with the key encoder's f16, plus the optional sensory-memory (hidden) update.

    Full size: width 64 -> layer3 has 256 channels; blocks (2, 2, 2).
    """

    IN_CHANNELS = 5

    def __init__(
        self,
        f16_ch: int = 1024,
        value_dim: int = 512,
        hidden_dim: int = 64,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2),
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(self.IN_CHANNELS, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(BasicBlock, width, width, blocks[0], 1)
        self.layer2 = _stage(BasicBlock, width, width * 2, blocks[1], 2)
        self.layer3 = _stage(BasicBlock, width * 2, width * 4, blocks[2], 2)
        _he_init(self)
        self.fuser = FeatureFusionBlock(f16_ch, width * 4, value_dim, value_dim)
        self.hidden_reinforce = HiddenReinforcer(value_dim, hidden_dim) if hidden_dim > 0 else None

    def forward(
        self,
        image: torch.Tensor,
        f16: torch.Tensor,
        hidden: torch.Tensor | None,
        masks: torch.Tensor,
        others: torch.Tensor,
        deep_update: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # image (B,3,H,W); masks/others (B,N,H,W) -> value (B,N,Cv,H/16,W/16), hidden
        g = torch.stack([masks, others], dim=2)
        g = torch.cat([broadcast_main(image, g), g], dim=2)
        b, n = g.shape[:2]
        x = g.flatten(0, 1)
        # XMem pools before the ReLU here (same result: ReLU and max commute).
        x = F.relu(self.maxpool(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        g = self.fuser(f16, x.view(b, n, *x.shape[1:]))
        if deep_update and self.hidden_reinforce is not None and hidden is not None:
            hidden = self.hidden_reinforce(g, hidden)
        return g, hidden


class KeyProjection(nn.Module):
    """f16 -> key (Ck), shrinkage (1 channel, >= 1) and selection (Ck, in (0, 1))."""

    def __init__(self, in_ch: int = 1024, key_dim: int = 64):
        super().__init__()
        self.key_proj = nn.Conv2d(in_ch, key_dim, 3, padding=1)
        self.d_proj = nn.Conv2d(in_ch, 1, 3, padding=1)
        self.e_proj = nn.Conv2d(in_ch, key_dim, 3, padding=1)
        nn.init.orthogonal_(self.key_proj.weight)
        nn.init.zeros_(self.key_proj.bias)

    def forward(
        self, f16: torch.Tensor, need_shrinkage: bool = True, need_selection: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        shrinkage = self.d_proj(f16) ** 2 + 1 if need_shrinkage else None
        selection = torch.sigmoid(self.e_proj(f16)) if need_selection else None
        return self.key_proj(f16), shrinkage, selection


class UpsampleBlock(nn.Module):
    """x2 upsampling of group features plus a projected skip feature, then a res block."""

    def __init__(self, skip_ch: int, up_ch: int, out_ch: int):
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_ch, up_ch, 3, padding=1)
        self.out_conv = GroupResBlock(up_ch, out_ch)

    def forward(self, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = resize_groups(g, 2.0) + broadcast_main(self.skip_conv(skip), g)
        return self.out_conv(g)


class Decoder(nn.Module):
    """Memory readout (+ hidden state) fused with f16, upsampled with f8 and f4 skips to logits.

    Full size: dims (512, 256, 256) at strides 16, 8, 4.
    """

    def __init__(
        self,
        f_chs: Sequence[int] = (1024, 512, 256),
        value_dim: int = 512,
        hidden_dim: int = 64,
        dims: Sequence[int] = (512, 256, 256),
    ):
        super().__init__()
        d16, d8, d4 = dims
        self.fuser = FeatureFusionBlock(f_chs[0], value_dim + hidden_dim, d16, d16)
        # The GRU also sees the (single-channel) logits at 1/4, hence d4 + 1.
        self.hidden_update = HiddenUpdater((d16, d8, d4 + 1), d4, hidden_dim) if hidden_dim > 0 else None
        self.up_16_8 = UpsampleBlock(f_chs[1], d16, d8)
        self.up_8_4 = UpsampleBlock(f_chs[2], d8, d4)
        self.pred = nn.Conv2d(d4, 1, 3, padding=1)

    def forward(
        self,
        f16: torch.Tensor,
        f8: torch.Tensor,
        f4: torch.Tensor,
        hidden: torch.Tensor | None,
        readout: torch.Tensor,
        update_hidden: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        # readout (B,N,Cv,h,w) -> (new hidden or None, logits (B,N,H,W) at full resolution)
        b, n = readout.shape[:2]
        g = readout if self.hidden_update is None else torch.cat([readout, hidden], dim=2)
        g16 = self.fuser(f16, g)
        g8 = self.up_16_8(f8, g16)
        g4 = self.up_8_4(f4, g8)
        logits = self.pred(F.relu(g4.flatten(0, 1)))
        new_hidden = None
        if update_hidden and self.hidden_update is not None:
            g4 = torch.cat([g4, logits.view(b, n, 1, *logits.shape[-2:])], dim=2)
            new_hidden = self.hidden_update(g16, g8, g4, hidden)
        logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        return new_hidden, logits.view(b, n, *logits.shape[-2:])
