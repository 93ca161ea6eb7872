"""XMem video object segmentation (Cheng & Schwing, ECCV 2022), as in-project torch code.

Used by the mask stage (DESIGN 1 "Masks"): a first-frame mask (from Grounded-SAM or a
dataset) is propagated through the video.

- `XMem`: the network. Its `state_dict()` keys and shapes equal the official `XMem.pth`
  (prefixes `key_encoder.`, `value_encoder.`, `key_proj.`, `decoder.`), so
  `XMem.from_checkpoint("XMem.pth")` loads it strictly. `XMem()` is the full-size
  architecture with random weights; `XMem.tiny(seed)` the same class with small widths.
- `InferenceCore`: frame-by-frame propagation with XMem's memory schedule.
- `propagate(model, frames, first_mask, **memory_config)`: the public seam (DESIGN 7).

Tiny preset: the ResNet depths of the official design (ResNet-50 blocks (3, 4, 6) for
keys, ResNet-18 blocks (2, 2, 2) for values) are kept; only channel widths shrink
(ResNet base widths 64 -> 8, key 64 -> 16, value 512 -> 32, hidden 64 -> 8, decoder
(512, 256, 256) -> (32, 16, 16)). Depths are constructor arguments too, for experiments.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import check_state_dict, load_state_dict
from models.xmem_memory import MemoryConfig, MemoryManager
from models.xmem_modules import Decoder, KeyEncoder, KeyProjection, ValueEncoder

__all__ = ["XMem", "InferenceCore", "MemoryConfig", "propagate", "aggregate", "processing_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SHORT_SIDE = 480  # XMem's evaluation resolution (shorter side)
STRIDE = 16  # feature stride of the key encoder; inputs must be multiples of it


def aggregate(prob: torch.Tensor, dim: int) -> torch.Tensor:
    """Soft aggregation (from STM): per-object probabilities -> [background, objects...] summing to 1.

    Background = product of (1 - p_i); then a softmax over the odds so the result is normalised.
    """
    with_bg = torch.cat([torch.prod(1 - prob, dim=dim, keepdim=True), prob], dim).clamp(1e-7, 1 - 1e-7)
    return torch.softmax(torch.log(with_bg / (1 - with_bg)), dim=dim)


class XMem(nn.Module):
    """The XMem network (multi-object variant: 5-channel value encoder)."""

    # Small widths, official depths (see module docstring).
    TINY: Mapping[str, object] = dict(
        key_dim=16, value_dim=32, hidden_dim=8, key_width=8, value_width=8, decoder_dims=(32, 16, 16)
    )

    def __init__(
        self,
        key_dim: int = 64,
        value_dim: int = 512,
        hidden_dim: int = 64,
        key_width: int = 64,
        key_blocks: Sequence[int] = (3, 4, 6),
        value_width: int = 64,
        value_blocks: Sequence[int] = (2, 2, 2),
        decoder_dims: Sequence[int] = (512, 256, 256),
    ):
        super().__init__()
        self.key_dim, self.value_dim, self.hidden_dim = key_dim, value_dim, hidden_dim
        self.arch = dict(
            key_dim=key_dim,
            value_dim=value_dim,
            hidden_dim=hidden_dim,
            key_width=key_width,
            key_blocks=tuple(key_blocks),
            value_width=value_width,
            value_blocks=tuple(value_blocks),
            decoder_dims=tuple(decoder_dims),
        )
        self.key_encoder = KeyEncoder(key_width, key_blocks)
        f16_ch, f8_ch, f4_ch = self.key_encoder.channels
        self.value_encoder = ValueEncoder(f16_ch, value_dim, hidden_dim, value_width, value_blocks)
        self.key_proj = KeyProjection(f16_ch, key_dim)
        self.decoder = Decoder((f16_ch, f8_ch, f4_ch), value_dim, hidden_dim, decoder_dims)
        self.eval()

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> XMem:
        """Small widths, seeded random weights; same class and forward as the full model."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**{**cls.TINY, **overrides})

    @classmethod
    def from_checkpoint(cls, path: str | Path, **arch) -> XMem:
        """Load an official XMem.pth (or a file saved from `XMem(...).state_dict()`).

        key_dim, value_dim and hidden_dim are read from the checkpoint (as XMem does, so
        variants such as the no-sensory-memory model load); other sizes default to full
        size and can be given in `arch` (e.g. `**XMem.TINY`). Loading is strict: missing,
        unexpected or mis-shaped keys raise CheckpointMismatchError naming them.
        """
        state = dict(load_state_dict(path, "XMem"))
        arch = {**_dims_from_state(state), **arch}
        model = cls(**arch)
        own = model.state_dict()
        _pad_value_conv1(state, own)
        # BatchNorm step counters carry no information at inference; accept files without them.
        for k, v in own.items():
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = v.clone()
        check_state_dict(model, state, path, "XMem")
        model.load_state_dict(state)
        return model.eval()

    # -- the four operations of XMem -------------------------------------------------------

    def encode_key(self, image: torch.Tensor, need_shrinkage: bool = True, need_selection: bool = True):
        """image (B, 3, H, W) normalised -> key, shrinkage, selection (at 1/16), f16, f8, f4."""
        f16, f8, f4 = self.key_encoder(image)
        key, shrinkage, selection = self.key_proj(f16, need_shrinkage, need_selection)
        return key, shrinkage, selection, f16, f8, f4

    def encode_value(
        self,
        image: torch.Tensor,
        f16: torch.Tensor,
        hidden: torch.Tensor | None,
        masks: torch.Tensor,
        deep_update: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """masks (B, N, H, W) object probabilities -> value (B, N, Cv, H/16, W/16), hidden."""
        n = masks.shape[1]
        # Each object also sees the union of the others (zeros for a single object).
        others = masks.sum(dim=1, keepdim=True) - masks if n > 1 else torch.zeros_like(masks)
        return self.value_encoder(image, f16, hidden, masks, others, deep_update)

    def segment(
        self,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        readout: torch.Tensor,
        hidden: torch.Tensor | None,
        update_hidden: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """-> (new hidden or None, logits (B, N, H, W), prob (B, 1 + N, H, W) with background first)."""
        hidden, logits = self.decoder(*features, hidden, readout, update_hidden)
        return hidden, logits, aggregate(torch.sigmoid(logits), dim=1)

    def forward(self, mode: str, *args, **kwargs):
        # Same dispatch as the reference network, for callers that use model(mode, ...).
        ops = {"encode_key": self.encode_key, "encode_value": self.encode_value, "segment": self.segment}
        if mode not in ops:
            raise ValueError(f"unknown XMem mode {mode!r}; one of {sorted(ops)}")
        return ops[mode](*args, **kwargs)


def _dims_from_state(state: Mapping[str, torch.Tensor]) -> dict:
    dims = {}
    if "key_proj.key_proj.weight" in state:
        dims["key_dim"] = state["key_proj.key_proj.weight"].shape[0]
    if "value_encoder.fuser.block2.conv2.weight" in state:
        dims["value_dim"] = state["value_encoder.fuser.block2.conv2.weight"].shape[0]
    if "decoder.hidden_update.transform.weight" in state:
        dims["hidden_dim"] = state["decoder.hidden_update.transform.weight"].shape[0] // 3
    elif not any(k.startswith(("decoder.hidden_update.", "value_encoder.hidden_reinforce.")) for k in state):
        dims["hidden_dim"] = 0  # a model trained without sensory memory
    return dims


def _pad_value_conv1(state: dict, own: Mapping[str, torch.Tensor]) -> None:
    # Older single-object XMem checkpoints have 4 input channels (image + mask); the
    # "other objects" channel is appended with zero weights, as XMem does when loading.
    k = "value_encoder.conv1.weight"
    if k in state and k in own and state[k].shape[1] == 4 and own[k].shape[1] == 5:
        w = state[k]
        state[k] = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], dim=1)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


class InferenceCore:
    """Frame-by-frame propagation with XMem's schedule (reference: inference/inference_core.py).

    Each `step` takes one normalised frame (3, H, W) with H, W multiples of 16 and, on the
    first frame, the object masks (N, H, W); it returns probabilities (1 + N, H, W) over
    [background, objects...] that sum to 1. A frame becomes a memory frame every mem_every
    frames (and whenever a mask is given); the last frame (end=True) is never memorised.
    """

    def __init__(self, model: XMem, config: MemoryConfig | None = None):
        self.model = model
        self.config = config or MemoryConfig.from_kwargs({})
        self.deep_update_sync = self.config.deep_update_every < 0
        self.memory = MemoryManager(self.config, model.hidden_dim)
        self.t = -1
        self.last_mem_t = 0
        self.last_deep_update_t = -self.config.deep_update_every
        self.num_objects: int | None = None

    @torch.inference_mode()
    def step(self, image: torch.Tensor, mask: torch.Tensor | None = None, end: bool = False) -> torch.Tensor:
        h, w = image.shape[-2:]
        if h % STRIDE or w % STRIDE:
            raise ValueError(f"frame size {h}x{w} must be a multiple of {STRIDE}; pad it first (see propagate)")
        self.t += 1
        if mask is None and self.num_objects is None:
            raise ValueError("the first step needs the object masks")
        if mask is not None:
            if self.num_objects is not None and mask.shape[0] != self.num_objects:
                raise ValueError(f"expected {self.num_objects} object masks, got {mask.shape[0]}")
            self.num_objects = mask.shape[0]
        cfg = self.config
        image = image.unsqueeze(0)

        is_mem = (self.t - self.last_mem_t >= cfg.mem_every or mask is not None) and not end
        need_segment = self.t > 0 and mask is None
        is_deep = (
            (is_mem if self.deep_update_sync else self.t - self.last_deep_update_t >= cfg.deep_update_every)
            and not end
        )
        # In sync mode the decoder's own hidden update is skipped when the value encoder does one.
        is_normal_update = (not self.deep_update_sync or not is_deep) and not end

        key, shrinkage, selection, f16, f8, f4 = self.model.encode_key(
            image, need_shrinkage=is_mem, need_selection=cfg.enable_long_term or need_segment
        )

        if need_segment:
            readout = self.memory.match_memory(key, selection).unsqueeze(0)
            hidden, _, prob = self.model.segment((f16, f8, f4), readout, self.memory.hidden, is_normal_update)
            prob = prob[0]
            if is_normal_update:
                self.memory.hidden = hidden
        else:
            prob = aggregate(mask.to(image.dtype), dim=0)
            self.memory.create_hidden_state(self.num_objects, key)

        if is_mem:
            value, hidden = self.model.encode_value(image, f16, self.memory.hidden, prob[1:].unsqueeze(0), is_deep)
            self.memory.add_memory(key, shrinkage, value, selection if cfg.enable_long_term else None)
            self.last_mem_t = self.t
            if is_deep:
                self.memory.hidden = hidden
                self.last_deep_update_t = self.t
        return prob


def processing_size(height: int, width: int, max_short_side: int = MAX_SHORT_SIDE) -> tuple[int, int]:
    """Size a frame is resized to before padding: unchanged when the short side <= max_short_side,
    else scaled so the short side equals it (as XMem's evaluation with --size 480; never upscaled)."""
    short = min(height, width)
    if short <= max_short_side:
        return height, width
    s = max_short_side / short
    return int(height * s), int(width * s)


def _pad16(h: int, w: int) -> tuple[int, int, int, int]:
    # Centred zero padding to the next multiple of 16 (XMem's pad_divide_by): (left, right, top, bottom).
    ph, pw = -h % STRIDE, -w % STRIDE
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def propagate(
    model: XMem,
    frames,
    first_mask,
    *,
    progress: Callable[[int, int], None] | None = None,
    **memory_config,
) -> torch.Tensor:
    """Propagate a first-frame mask through a video.

    frames: uint8 (F, H, W, 3) (numpy or torch); first_mask: bool (H, W).
    Returns float32 (F, H, W) foreground probability on the CPU; frame 0 is `first_mask`
    itself. memory_config: XMem's option names (see MemoryConfig), defaults as DESIGN 1.

    Resolution: frames whose short side is <= 480 keep their size; larger ones are resized
    (bilinear, antialiased) so the short side is 480, the mask with nearest neighbour. Sides
    that are not multiples of 16 are zero-padded symmetrically (after normalisation, as XMem).
    Outputs are un-padded and resized back (bilinear) to (H, W).
    Runs on the device of the model's parameters. `progress(done, total)` is called per frame.
    """
    frames_t = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    mask_t = torch.as_tensor(np.asarray(first_mask)) if not isinstance(first_mask, torch.Tensor) else first_mask
    if frames_t.ndim != 4 or frames_t.shape[-1] != 3 or frames_t.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames_t.dtype} {tuple(frames_t.shape)}")
    n, h, w = frames_t.shape[:3]
    if n == 0:
        raise ValueError("frames is empty")
    if tuple(mask_t.shape) != (h, w):
        raise ValueError(f"first_mask must be (H, W) = ({h}, {w}), got {tuple(mask_t.shape)}")
    mask_t = mask_t.bool()

    cfg = MemoryConfig.from_kwargs(memory_config, num_frames=n)
    device = next(model.parameters()).device
    ph, pw = processing_size(h, w)
    resized = (ph, pw) != (h, w)
    pad = _pad16(ph, pw)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    def prepare(frame: torch.Tensor) -> torch.Tensor:
        x = (frame.to(device).permute(2, 0, 1).float() / 255 - mean) / std
        if resized:
            x = F.interpolate(x[None], (ph, pw), mode="bilinear", align_corners=False, antialias=True)[0]
        return F.pad(x, pad)

    def restore(p: torch.Tensor) -> torch.Tensor:
        p = p[pad[2] : p.shape[0] - pad[3], pad[0] : p.shape[1] - pad[1]]
        if resized:
            p = F.interpolate(p[None, None], (h, w), mode="bilinear", align_corners=False)[0, 0]
        return p.clamp(0, 1).float().cpu()

    m = mask_t.to(device).float()
    if resized:
        m = F.interpolate(m[None, None], (ph, pw), mode="nearest")[0, 0]
    m = F.pad(m, pad)[None]  # (1 object, H', W')

    model.eval()
    core = InferenceCore(model, cfg)
    out = torch.empty(n, h, w, dtype=torch.float32)
    out[0] = mask_t.float()
    for i in range(n):
        prob = core.step(prepare(frames_t[i]), m if i == 0 else None, end=i == n - 1)
        if i > 0:
            out[i] = restore(prob[1])
        if progress is not None:
            progress(i + 1, n)
    return out
