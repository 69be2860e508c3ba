"""The CustomContrast model: Q-Formers, the MFI encoder, per-layer heads and the adapter that holds them."""

from .adapter import CustomContrastAdapter
from .adapter_layer import CustomContrastLayer, SubjectLocationHead
from .mfi_encoder import ImageContext, MFIEncoder, SubjectTokens, TVFusion
from .qformer import QFormer, QFormerBlock
from .unet_layout import CrossAttentionLayout, cross_attention_layout

__all__ = [
    "CrossAttentionLayout",
    "CustomContrastAdapter",
    "CustomContrastLayer",
    "ImageContext",
    "MFIEncoder",
    "QFormer",
    "QFormerBlock",
    "SubjectLocationHead",
    "SubjectTokens",
    "TVFusion",
    "cross_attention_layout",
]
