"""The UNet configurations of the full-size base models, for shape checks and benchmarks without downloads.

The values are those of the public ``unet/config.json`` of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from diffusers import UNet2DConditionModel

SD15_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SDXL_UNET_CONFIG: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

UNET_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}

# Hidden size of the CLIP ViT-H/14 image encoder that IP-Adapter-Plus (and our default adapter) reads.
VIT_H_HIDDEN_SIZE = 1280


def full_size_unet(family: str, meta: bool = True, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A full-size SD1.5 (``"sd15"``) or SDXL (``"sdxl"``) UNet with random weights, on the meta device by default."""
    if family not in UNET_CONFIGS:
        raise ValueError(f"family must be one of {sorted(UNET_CONFIGS)}, got {family!r}.")
    with torch.device("meta") if meta else nullcontext():
        unet = UNet2DConditionModel(**UNET_CONFIGS[family])
    return unet if meta else unet.to(dtype)
