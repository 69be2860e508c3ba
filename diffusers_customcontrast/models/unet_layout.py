"""What an adapter needs to know about a UNet: its cross-attention layers, their widths and its family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

PROCESSOR_SUFFIX = ".processor"


@dataclass(frozen=True)
class CrossAttentionLayout:
    """The cross-attention layers of a UNet, in the order of ``unet.attn_processors``."""

    names: tuple[str, ...]  # processor names, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    hidden_sizes: tuple[int, ...]  # width of each layer's keys (the output of to_k)
    cross_attention_dim: int  # width of the context the layers read (D_ctx)
    family: str  # "sd15", "sdxl" or "custom"

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        """A short human description, used in error messages."""
        label = {"sd15": "SD1.5", "sdxl": "SDXL"}.get(self.family, "custom")
        return f"{label} ({self.num_layers} cross-attention layers, context width {self.cross_attention_dim})"


def attention_module(unet: nn.Module, processor_name: str) -> nn.Module:
    """The ``Attention`` module that owns the processor called ``processor_name``."""
    return unet.get_submodule(processor_name.removesuffix(PROCESSOR_SUFFIX))


def _family(unet: nn.Module, num_layers: int, cross_attention_dim: int) -> str:
    if cross_attention_dim == 768 and num_layers == 16:
        return "sd15"
    if cross_attention_dim == 2048 and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "custom"


def cross_attention_layout(unet: nn.Module) -> CrossAttentionLayout:
    """Read the cross-attention layers (processor names ending in ``attn2.processor``) of a diffusers UNet."""
    names = tuple(name for name in unet.attn_processors if name.endswith("attn2" + PROCESSOR_SUFFIX))
    if not names:
        raise ValueError(f"The UNet ({type(unet).__name__}) has no cross-attention layers named '*.attn2'.")
    modules = [attention_module(unet, name) for name in names]
    context_dims = {module.to_k.in_features for module in modules}
    if len(context_dims) != 1:
        raise ValueError(
            f"The UNet's cross-attention layers read contexts of different widths: {sorted(context_dims)}."
        )
    cross_attention_dim = context_dims.pop()
    return CrossAttentionLayout(
        names=names,
        hidden_sizes=tuple(module.to_k.out_features for module in modules),
        cross_attention_dim=cross_attention_dim,
        family=_family(unet, len(names), cross_attention_dim),
    )
