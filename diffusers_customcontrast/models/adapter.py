"""``CustomContrastAdapter``: every trainable part of CustomContrast in one diffusers model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .adapter_layer import CustomContrastLayer
from .checkpoint import (
    CONFIG_NAME,
    EARLIER_LAYOUT_KEY,
    WEIGHTS_NAME,
    AdapterLoadError,
    check_flat,
    check_state_dict,
    read_config,
    read_state_dict,
    resolve_file,
)
from .config import CustomContrastAdapterConfig
from .mfi_encoder import MFIEncoder, SubjectTokens
from .unet_layout import CrossAttentionLayout, attention_module, cross_attention_layout


def select_image_features(hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """The features ``F``: the chosen hidden states of a CLIP vision model, concatenated along the channels."""
    return torch.cat([hidden_states[i] for i in layers], dim=-1)


class CustomContrastAdapter(ModelMixin, ConfigMixin):
    r"""The MFI encoder and the per-layer visual cross-attention and location heads of CustomContrast.

    The base model stays frozen; this module holds everything that is trained. Build a fresh one for a UNet with
    :meth:`from_unet`, load a trained one with :meth:`from_pretrained` (a local folder or a hub id, every file
    checked), and attach it to a pipeline with ``pipe.load_customcontrast(adapter)``.

    ``adapter(image_features, timesteps)`` computes the tokens of every cross-attention layer at once. Inside a
    pipeline the UNet calls it once per step; training calls it directly.

    Args:
        config: the adapter's shape and what it was built for. It is registered the diffusers way
            (``adapter.config``, what ``config.json`` holds: the one config); ``adapter.adapter_config`` is a
            read-only typed view of it.
    """

    config_name = CONFIG_NAME

    def __init__(self, config: CustomContrastAdapterConfig) -> None:
        super().__init__()
        if not isinstance(config, CustomContrastAdapterConfig):
            raise TypeError(
                f"CustomContrastAdapter takes a CustomContrastAdapterConfig, got {type(config).__name__}: use "
                "CustomContrastAdapter.from_config(dict) for the fields of a config.json."
            )
        self.register_to_config(**config.to_dict())
        self.encoder = MFIEncoder(config)
        self.layers = nn.ModuleList(
            CustomContrastLayer(
                config.cross_attention_dim, width, config.location_init_bias, config.location_gate_init
            )
            for width in config.layer_hidden_sizes
        )

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | FrozenDict | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> CustomContrastAdapter | tuple[CustomContrastAdapter, dict[str, Any]]:
        """An adapter from the fields of a ``config.json`` (``kwargs`` override them); what ``from_pretrained`` calls.

        Every folder saved by earlier versions holds the same keys, so they load unchanged.
        """
        if config is None:
            raise ValueError("CustomContrastAdapter.from_config needs the config dict (the fields of a config.json).")
        adapter = cls(CustomContrastAdapterConfig.from_dict({**config, **kwargs}))
        return (adapter, {}) if return_unused_kwargs else adapter

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        image_encoder: nn.Module | None = None,
        /,
        init_from_unet: bool = True,
        **options: Any,
    ) -> CustomContrastAdapter:
        """Build a fresh adapter sized for ``unet`` (any diffusers ``UNet2DConditionModel``).

        Layer names and widths and the context width are read from the UNet, the image feature width from
        ``image_encoder`` (a CLIP vision model, given by position) or from ``image_embed_dim`` in ``options``;
        ``options`` are any other :class:`CustomContrastAdapterConfig` fields (``image_encoder=`` among them is the
        config's informative hub id of that model). With ``init_from_unet`` the visual cross-attention starts as a
        copy of each layer's frozen ``to_k``/``to_v``, as IP-Adapter does. A UNet on the meta device gives an
        adapter on the meta device (for shape checks at no memory cost).
        """
        config = CustomContrastAdapterConfig.for_unet(unet, image_encoder, **options)
        on_meta = any(p.is_meta for p in unet.parameters())
        with torch.device("meta") if on_meta else nullcontext():
            adapter = cls(config)
        if init_from_unet and not on_meta:
            adapter.init_visual_attention_from(unet)
        return adapter

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        weight_name: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **hub_kwargs: Any,
    ) -> CustomContrastAdapter:
        """Load a saved adapter folder (``config.json`` + safetensors weights), local or a hub repository id.

        Every file is checked before an adapter is returned: the config's fields, the weights' keys and shapes
        against it, dense finite floating-point tensors, safetensors (or a ``.bin`` readable with
        ``torch.load(weights_only=True)``); any problem is a one-sentence :class:`AdapterLoadError`.

        Args:
            pretrained_model_name_or_path: a local folder or a hub repository id.
            subfolder: the adapter's folder inside it.
            weight_name: the weight file (default ``diffusion_pytorch_model.safetensors``).
            torch_dtype: the dtype of the returned adapter (default: the file's).
            **hub_kwargs: ``cache_dir``, ``force_download``, ``local_files_only``, ``token``, ``revision``.
        """
        config_path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, **hub_kwargs)
        weights = resolve_file(pretrained_model_name_or_path, weight_name or WEIGHTS_NAME, subfolder, **hub_kwargs)
        adapter = cls.from_state_dict(read_config(config_path), read_state_dict(weights))
        return adapter if torch_dtype is None else adapter.to(torch_dtype)

    @classmethod
    def from_state_dict(cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> CustomContrastAdapter:
        """An adapter from the fields of a ``config.json`` and its weights, checked as :meth:`from_pretrained` checks
        files; the tensors move in without a second copy (meta init + assign)."""
        check_flat(state_dict)
        try:
            # Every tensor the constructor makes is on the meta device: a config asking for huge sizes costs nothing.
            with torch.device("meta"):
                adapter = cls.from_config(config)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise AdapterLoadError(f"Invalid CustomContrast adapter config: {error}") from error
        if EARLIER_LAYOUT_KEY in state_dict:
            raise AdapterLoadError(
                "This adapter was saved in the layout of diffusers-customcontrast before format 2 (a visual Q-Former "
                "of learned-query blocks), which this version cannot read: the visual Q-Former is now "
                "IP-Adapter-Plus's Resampler, so retrain the adapter (e.g. starting from IP-Adapter-Plus, see "
                "docs/training.md)."
            )
        adapter.load_state_dict(check_state_dict(adapter.state_dict(), state_dict), strict=True, assign=True)
        return adapter.eval()

    @property
    def adapter_config(self) -> CustomContrastAdapterConfig:
        """The config as a typed, checked, read-only value: a view of ``self.config`` (the one config), rebuilt when
        ``register_to_config`` replaces it."""
        source = self.config
        cached = self.__dict__.get("_adapter_config_view")
        if cached is None or cached[0] is not source:
            cached = (source, CustomContrastAdapterConfig.from_dict(source))
            self.__dict__["_adapter_config_view"] = cached
        return cached[1]

    @property
    def layout(self) -> CrossAttentionLayout:
        """The cross-attention layout this adapter was built for."""
        return self.adapter_config.layout

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

    def record_s_plus_scale(self, value: float) -> None:
        """Make ``value`` the S+ scale the adapter is loaded with (its config's ``s_plus_scale``, which
        ``save_pretrained`` writes); a pipeline it is loaded into keeps its own scale."""
        checked = self.adapter_config.replace(s_plus_scale=value)  # one-sentence error for a bad value
        self.register_to_config(s_plus_scale=checked.s_plus_scale)

    def __repr__(self) -> str:
        # One line, not the module tree: load_customcontrast returns the adapter, and a notebook prints what a cell
        # returns. print(adapter.encoder) / adapter.layers show the modules.
        config = self.adapter_config
        parameters = sum(p.numel() for p in self.parameters()) / 1e6
        return (
            f"CustomContrastAdapter({parameters:.2f}M parameters, {self.num_layers} cross-attention layers, "
            f"{config.num_visual_tokens} visual and {config.num_textual_tokens} S+ tokens per layer, image features "
            f"of width {config.image_embed_dim})"
        )

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
        if image_encoder is None:
            return
        expected_width = self.config.image_encoder_hidden_size
        width = image_encoder.config.hidden_size
        if expected_width is not None and width != expected_width:
            raise ValueError(
                f"This CustomContrast adapter expects an image encoder of hidden size {expected_width}, but the "
                f"pipeline's image_encoder has hidden size {width}: use the image encoder the adapter was trained with."
            )
        embed_width = getattr(image_encoder.config, "projection_dim", None)
        if self.adapter_config.image_input == "image_embeds" and embed_width != self.config.image_embed_dim:
            raise ValueError(
                f"This CustomContrast adapter reads pooled image embeddings of width {self.config.image_embed_dim}, "
                f"but the pipeline's image_encoder projects to width {embed_width}: use the image encoder the adapter "
                "was trained with."
            )

    def image_features(self, image_encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features ``F`` of ``pixel_values``: the configured hidden states of a CLIP vision model, concatenated,
        or (``image_input="image_embeds"``) its pooled, projected ``image_embeds`` as a one-token sequence."""
        if self.adapter_config.image_input == "image_embeds":
            return image_encoder(pixel_values).image_embeds[:, None]
        hidden_states = image_encoder(pixel_values, output_hidden_states=True).hidden_states
        return select_image_features(hidden_states, self.adapter_config.image_feature_layers)

    def forward(self, image_features: torch.Tensor, timesteps: torch.Tensor) -> SubjectTokens:
        """Encode ``[B, P, image_embed_dim]`` image features at ``timesteps`` into every layer's tokens."""
        return self.encoder(image_features, timesteps)
