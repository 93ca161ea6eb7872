"""Presets of the base 2D U-Net and ControlNet: same diffusers classes, small or real sizes,
seeded random weights ('tiny' for tests and the demo, 'sd21-unclip-h' for benchmarks)."""
from __future__ import annotations

import contextlib

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

__all__ = ["PRESETS", "PRESET_PREDICTION_TYPE", "build_unet2d", "build_controlnet"]

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


def build_controlnet(name: str = "tiny", seed: int = 0, latent_downsample: int = 8) -> ControlNetModel:
    """A ControlNet matching the tiny U-Net's blocks, without class embedding (like
    the SD 2.1 depth ControlNets), seeded random weights (zero convs stay zero).

    latent_downsample: how much smaller than the frame the VAE's latents are (8 for SD's VAE);
    the conditioning embedding halves the depth map that many times over, so the depth at frame
    resolution lands on the latent grid."""
    if name != "tiny":
        raise ValueError("only the 'tiny' ControlNet preset exists; load real ControlNets from a diffusers folder")
    halvings = int(latent_downsample).bit_length() - 1
    if latent_downsample < 1 or 2 ** halvings != latent_downsample or halvings > 3:
        raise ValueError(f"latent_downsample must be 1, 2, 4 or 8, got {latent_downsample}")
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
            conditioning_embedding_out_channels=(8, 16, 16, 16)[: halvings + 1],
        )
    return cn.eval()
