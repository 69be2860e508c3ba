"""``CustomContrastAdapter``: every trainable part of CustomContrast in one diffusers model."""

from __future__ import annotations

import logging
import math
import numbers
from contextlib import nullcontext

import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .adapter_layer import CustomContrastLayer
from .mfi_encoder import MFIEncoder, SubjectTokens
from .unet_layout import CrossAttentionLayout, attention_module, cross_attention_layout

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BASE_FAMILIES = ("sd15", "sdxl", "custom")
MAX_SIZE = 2**31 - 1  # widths, depths and counts above this are a damaged config, not a model


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(value) <= MAX_SIZE


def _is_number(value: object) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _validate_config(config: dict) -> None:
    """Raise a one-sentence ``ValueError`` naming the first field of a config (e.g. a damaged ``config.json``) that
    has the wrong type or an impossible value. The format version is checked first: a newer format may differ."""
    version = config["format_version"]
    if not _is_int(version) or version < 1:
        raise ValueError(f"format_version must be a positive integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"This adapter uses config format version {version}, but this version of "
            f"diffusers-customcontrast reads up to version {FORMAT_VERSION}: upgrade diffusers-customcontrast."
        )

    def fail(name: str, what: str) -> ValueError:
        return ValueError(f"{name} must be {what}, got {config[name]!r}.")

    positive = (
        "image_embed_dim", "cross_attention_dim", "hidden_size", "num_heads", "visual_depth", "textual_depth",
        "num_visual_tokens", "num_textual_tokens", "timestep_embed_dim",
    )  # fmt: skip
    for name in positive:
        if not _is_int(config[name]) or config[name] < 1:
            raise fail(name, f"a positive integer up to {MAX_SIZE}")
    if config["image_encoder_hidden_size"] is not None and (
        not _is_int(config["image_encoder_hidden_size"]) or config["image_encoder_hidden_size"] < 1
    ):
        raise fail("image_encoder_hidden_size", f"a positive integer up to {MAX_SIZE} or null")
    names, sizes = config["layer_names"], config["layer_hidden_sizes"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise fail("layer_names", "a non-empty list of cross-attention processor names")
    if len(set(names)) != len(names):
        raise fail("layer_names", "a list of distinct names")
    if not isinstance(sizes, (list, tuple)) or not all(_is_int(w) and w >= 1 for w in sizes):
        raise fail("layer_hidden_sizes", f"a list of positive integers up to {MAX_SIZE}")
    if len(sizes) != len(names):
        raise ValueError(
            "CustomContrastAdapter needs one hidden size per cross-attention layer; got "
            f"{len(names)} layer names and {len(sizes)} hidden sizes "
            "(build it with CustomContrastAdapter.from_unet(unet, image_encoder))."
        )
    if config["base_family"] not in BASE_FAMILIES:
        raise fail("base_family", f"one of {', '.join(BASE_FAMILIES)}")
    layers = config["image_feature_layers"]
    if layers is not None and (not isinstance(layers, (list, tuple)) or not layers or not all(map(_is_int, layers))):
        raise fail("image_feature_layers", "a non-empty list of hidden-state indices or null")
    if config["image_encoder"] is not None and not isinstance(config["image_encoder"], str):
        raise fail("image_encoder", "a hub id or path or null")
    mlp_width = config["hidden_size"] * config["mlp_ratio"] if _is_number(config["mlp_ratio"]) else 0
    if not 1 <= mlp_width <= MAX_SIZE:
        raise fail("mlp_ratio", f"a number with hidden_size * mlp_ratio in [1, {MAX_SIZE}]")
    if not _is_number(config["location_init_bias"]):
        raise fail("location_init_bias", "a finite number")
    if config["hidden_size"] % config["num_heads"]:
        raise ValueError(
            f"hidden_size ({config['hidden_size']}) must be divisible by num_heads ({config['num_heads']})."
        )


class CustomContrastAdapter(ModelMixin, ConfigMixin):
    r"""The MFI encoder and the per-layer visual cross-attention and location heads of CustomContrast.

    The base model stays frozen; this module holds everything that is trained. Build a fresh one for a UNet with
    :meth:`from_unet`, load a trained one with ``from_pretrained`` (a local folder or a hub id, as every diffusers
    model), and attach it to a pipeline with ``pipe.load_customcontrast(adapter)``.

    Args:
        image_embed_dim: width of the image features the encoder reads (the CLIP vision hidden size times the
            number of hidden layers in ``image_feature_layers``).
        cross_attention_dim: the UNet's context width (768 for SD1.5, 2048 for SDXL).
        layer_names: the UNet's cross-attention processor names, in ``unet.attn_processors`` order.
        layer_hidden_sizes: the key width of each of those layers.
        base_family: ``"sd15"``, ``"sdxl"`` or ``"custom"``, recorded to explain mismatches.
        image_encoder_hidden_size: hidden size of the CLIP vision model the adapter expects.
        image_feature_layers: which hidden states of the image encoder are concatenated into the features; the
            default, the penultimate layer, is what diffusers' IP-Adapter route computes.
        image_encoder: optional hub id or path of the image encoder the adapter was trained with (informative).
        hidden_size, num_heads, visual_depth, textual_depth, num_visual_tokens, num_textual_tokens,
        timestep_embed_dim, mlp_ratio: the encoder's shape (see :class:`MFIEncoder`).
        location_init_bias: initial bias of the location heads (how open the gate starts).
        format_version: version of this config format; newer versions are refused by older code.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 1280,
        cross_attention_dim: int = 768,
        layer_names: list[str] | None = None,
        layer_hidden_sizes: list[int] | None = None,
        base_family: str = "custom",
        image_encoder_hidden_size: int | None = None,
        image_feature_layers: list[int] | None = None,
        image_encoder: str | None = None,
        hidden_size: int = 768,
        num_heads: int = 12,
        visual_depth: int = 4,
        textual_depth: int = 2,
        num_visual_tokens: int = 16,
        num_textual_tokens: int = 8,
        timestep_embed_dim: int = 256,
        mlp_ratio: float = 4.0,
        location_init_bias: float = 3.0,
        format_version: int = FORMAT_VERSION,
    ) -> None:
        super().__init__()
        _validate_config(
            {
                "image_embed_dim": image_embed_dim,
                "cross_attention_dim": cross_attention_dim,
                "layer_names": [] if layer_names is None else layer_names,
                "layer_hidden_sizes": [] if layer_hidden_sizes is None else layer_hidden_sizes,
                "base_family": base_family,
                "image_encoder_hidden_size": image_encoder_hidden_size,
                "image_feature_layers": image_feature_layers,
                "image_encoder": image_encoder,
                "hidden_size": hidden_size,
                "num_heads": num_heads,
                "visual_depth": visual_depth,
                "textual_depth": textual_depth,
                "num_visual_tokens": num_visual_tokens,
                "num_textual_tokens": num_textual_tokens,
                "timestep_embed_dim": timestep_embed_dim,
                "mlp_ratio": mlp_ratio,
                "location_init_bias": location_init_bias,
                "format_version": format_version,
            }
        )
        self.encoder = MFIEncoder(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=cross_attention_dim,
            num_layers=len(layer_names),
            hidden_size=hidden_size,
            num_heads=num_heads,
            visual_depth=visual_depth,
            textual_depth=textual_depth,
            num_visual_tokens=num_visual_tokens,
            num_textual_tokens=num_textual_tokens,
            timestep_embed_dim=timestep_embed_dim,
            mlp_ratio=mlp_ratio,
        )
        self.layers = nn.ModuleList(
            CustomContrastLayer(cross_attention_dim, width, location_init_bias) for width in layer_hidden_sizes
        )

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        image_encoder: nn.Module | None = None,
        init_from_unet: bool = True,
        **config,
    ) -> CustomContrastAdapter:
        """Build a fresh adapter sized for ``unet`` (any diffusers ``UNet2DConditionModel``).

        Layer names and widths and the context width are read from the UNet, the image feature width from
        ``image_encoder`` (a CLIP vision model) or from ``image_embed_dim`` in ``config``. With ``init_from_unet``
        the visual cross-attention starts as a copy of each layer's frozen ``to_k``/``to_v``, as IP-Adapter does.
        A UNet on the meta device gives an adapter on the meta device (for shape checks at no memory cost).
        """
        layout = cross_attention_layout(unet)
        feature_layers = list(config.pop("image_feature_layers", None) or [-2])
        if image_encoder is not None:
            encoder_width = image_encoder.config.hidden_size
            config.setdefault("image_encoder_hidden_size", encoder_width)
            config.setdefault("image_embed_dim", encoder_width * len(feature_layers))
        on_meta = any(p.is_meta for p in unet.parameters())
        with init_empty_weights() if on_meta else nullcontext():
            adapter = cls(
                cross_attention_dim=layout.cross_attention_dim,
                layer_names=list(layout.names),
                layer_hidden_sizes=list(layout.hidden_sizes),
                base_family=layout.family,
                image_feature_layers=feature_layers,
                **config,
            )
        if init_from_unet and not on_meta:
            adapter.init_visual_attention_from(unet)
        return adapter

    @property
    def layout(self) -> CrossAttentionLayout:
        """The cross-attention layout this adapter was built for."""
        return CrossAttentionLayout(
            names=tuple(self.config.layer_names),
            hidden_sizes=tuple(self.config.layer_hidden_sizes),
            cross_attention_dim=self.config.cross_attention_dim,
            family=self.config.base_family,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def init_visual_attention_from(self, unet: nn.Module) -> None:
        """Copy each layer's frozen text ``to_k``/``to_v`` into the visual ``to_k_ip``/``to_v_ip``."""
        for name, layer in zip(self.config.layer_names, self.layers, strict=True):
            attn = attention_module(unet, name)
            # peft's LoRA wraps the projections; the frozen weight is the base layer's.
            layer.to_k_ip.weight.copy_(getattr(attn.to_k, "base_layer", attn.to_k).weight)
            layer.to_v_ip.weight.copy_(getattr(attn.to_v, "base_layer", attn.to_v).weight)

    def check_compatible(self, unet: nn.Module, image_encoder: nn.Module | None = None) -> None:
        """Raise a one-sentence ``ValueError`` if this adapter does not fit ``unet`` or ``image_encoder``."""
        expected, actual = self.layout, cross_attention_layout(unet)
        if expected.describe() == actual.describe() and expected.names != actual.names:
            name, other = next((e, a) for e, a in zip(expected.names, actual.names) if e != a)
            raise ValueError(
                f"This CustomContrast adapter was built for a {expected.describe()} UNet with other layer names "
                f"('{name}' where the pipeline's UNet has '{other}'): load an adapter trained for this base model."
            )
        if expected.names != actual.names or expected.cross_attention_dim != actual.cross_attention_dim:
            raise ValueError(
                f"This CustomContrast adapter was built for a {expected.describe()} UNet, but the pipeline's UNet "
                f"is {actual.describe()}: load an adapter trained for this base model."
            )
        if expected.hidden_sizes != actual.hidden_sizes:
            mismatch = next(
                (n, e, a) for n, e, a in zip(expected.names, expected.hidden_sizes, actual.hidden_sizes) if e != a
            )
            raise ValueError(
                f"This CustomContrast adapter expects width {mismatch[1]} at layer '{mismatch[0]}', but the "
                f"pipeline's UNet has width {mismatch[2]} there: load an adapter trained for this base model."
            )
        expected_width = self.config.image_encoder_hidden_size
        if image_encoder is not None and expected_width is not None:
            width = image_encoder.config.hidden_size
            if width != expected_width:
                raise ValueError(
                    f"This CustomContrast adapter expects an image encoder of hidden size {expected_width}, but the "
                    f"pipeline's image_encoder has hidden size {width}: use the image encoder the adapter was "
                    "trained with."
                )

    def image_features(self, image_encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features ``F`` of ``pixel_values``: the configured hidden states of a CLIP vision model, concatenated."""
        hidden_states = image_encoder(pixel_values, output_hidden_states=True).hidden_states
        layers = self.config.image_feature_layers or [-2]
        return torch.cat([hidden_states[i] for i in layers], dim=-1)

    def forward(self, image_features: torch.Tensor, timesteps: torch.Tensor) -> SubjectTokens:
        """Encode ``[B, P, image_embed_dim]`` image features at ``timesteps`` into every layer's tokens."""
        return self.encoder(image_features, timesteps)
