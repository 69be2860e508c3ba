"""The CustomContrast model: its config, Q-Formers, the MFI encoder, per-layer heads and the adapter that holds them."""

from .adapter import CustomContrastAdapter, select_image_features
from .adapter_layer import CustomContrastLayer, LocationGate, SubjectLocationHead
from .config import (
    ARCHITECTURE_OPTIONS,
    BASE_FAMILIES,
    FORMAT_VERSION,
    IMAGE_INPUTS,
    TV_FUSION_INITS,
    TV_FUSION_RESIDUALS,
    VISUAL_PROJECTIONS,
    CustomContrastAdapterConfig,
)
from .mfi_encoder import ImageContext, MFIEncoder, SubjectTokens, TVFusion
from .qformer import LinearVisualProjection, PerceiverBlock, QFormer, QFormerBlock, VisualQFormer
from .unet_layout import CrossAttentionLayout, cross_attention_layout

__all__ = [
    "ARCHITECTURE_OPTIONS",
    "BASE_FAMILIES",
    "FORMAT_VERSION",
    "CrossAttentionLayout",
    "CustomContrastAdapter",
    "CustomContrastAdapterConfig",
    "CustomContrastLayer",
    "IMAGE_INPUTS",
    "ImageContext",
    "LinearVisualProjection",
    "LocationGate",
    "MFIEncoder",
    "PerceiverBlock",
    "QFormer",
    "QFormerBlock",
    "SubjectLocationHead",
    "SubjectTokens",
    "TVFusion",
    "TV_FUSION_INITS",
    "TV_FUSION_RESIDUALS",
    "VISUAL_PROJECTIONS",
    "VisualQFormer",
    "cross_attention_layout",
    "select_image_features",
]
