"""Per-frame depth with MiDaS DPT-hybrid (DESIGN 1 "Depth"), via transformers `DPTForDepthEstimation`.

The SD depth ControlNets were trained on this estimator's output, so the real model
is the `dpt-hybrid-midas` folder (ViT-B/16 on a BiT-ResNet-50 stem, 384x384 input).
MiDaS predicts relative inverse depth (larger = nearer); each frame is upsampled
back to its own size (bicubic, as the DPT processor's post-processing) and min-max
normalised to [0, 1] on its own, so near is 1 and far is 0 (a constant frame gives
all zeros).

Tiny preset: the same hybrid architecture (BiT bottleneck stem with dynamic 'same'
padding, ViT, DPT neck and head) at a 64x64 input with small widths; built offline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.local_folders import require_model_folder


def normalize_depth(depth: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-frame min-max to [0, 1] of (F, H, W); a frame without range becomes all zeros."""
    d = depth.float()
    flat = d.reshape(d.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    out = (d - lo) / span.clamp(min=eps)
    return torch.where(span > eps, out, torch.zeros_like(out)).clamp_(0, 1)


def hybrid_config(tiny: bool = True, image_size: int | None = None):
    """DPT-hybrid config: full size is dpt-hybrid-midas's architecture; tiny keeps its structure, small widths."""
    from transformers import BitConfig, DPTConfig

    if not tiny:
        size = image_size or 384
        backbone = BitConfig(
            global_padding="same", layer_type="bottleneck", depths=[3, 4, 9], out_features=["stage1", "stage2", "stage3"],
            embedding_dynamic_padding=True,
        )
        return DPTConfig(
            is_hybrid=True, backbone_config=backbone, image_size=size, patch_size=16, hidden_size=768,
            num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, backbone_out_indices=[2, 5, 8, 11],
            reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768], fusion_hidden_size=256,
            backbone_featmap_shape=[1, 1024, size // 16, size // 16], readout_type="project",
            use_batch_norm_in_fusion_residual=False,
        )
    size = image_size or 64
    backbone = BitConfig(
        global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64, 128],
        embedding_size=8, num_groups=4, out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
    )
    return DPTConfig(
        is_hybrid=True, backbone_config=backbone, image_size=size, patch_size=16, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=64, backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, size // 16, size // 16],
        readout_type="project",
    )


def processor_for(config):
    """MiDaS preprocessing: square resize to the model's input (bicubic), mean = std = 0.5."""
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    size = int(config.image_size)
    return DPTImageProcessorPil(
        size={"height": size, "width": size}, keep_aspect_ratio=False, ensure_multiple_of=1, do_pad=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


class DepthEstimator:
    """uint8 frames (F, H, W, 3) -> float32 (F, H, W) normalised depth in [0, 1]."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def random(cls, config, seed: int = 0) -> DepthEstimator:
        from transformers import DPTForDepthEstimation

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DPTForDepthEstimation(config)
        return cls(model, processor_for(config))

    @classmethod
    def tiny(cls, seed: int = 0) -> DepthEstimator:
        return cls.random(hybrid_config(tiny=True), seed)

    @classmethod
    def from_folder(cls, path, device: str = "cpu", setting: str | None = None) -> DepthEstimator:
        """A local dpt-hybrid-midas folder (config.json, weights, preprocessor config)."""
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        p = require_model_folder(path, "depth (DPT-hybrid MiDaS)", needs=("config.json",), setting=setting)
        model = DPTForDepthEstimation.from_pretrained(p, local_files_only=True).to(device)
        try:
            processor = AutoImageProcessor.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError):
            processor = processor_for(model.config)  # folders without a preprocessor file: MiDaS defaults
        return cls(model, processor)

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def raw(self, frames: np.ndarray, batch_size: int = 4) -> torch.Tensor:
        """The model's relative inverse depth, upsampled to each frame's size: float32 (F, H, W)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        h, w = frames.shape[1:3]
        outs = []
        for i in range(0, len(frames), max(1, int(batch_size))):
            pixels = self.processor(images=list(frames[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            pred = self.model(pixel_values=pixels.to(self.device, next(self.model.parameters()).dtype)).predicted_depth
            pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)[:, 0]
            outs.append(pred.cpu())
        return torch.cat(outs)

    def __call__(self, frames: np.ndarray, batch_size: int = 4) -> torch.Tensor:
        return normalize_depth(self.raw(frames, batch_size))
