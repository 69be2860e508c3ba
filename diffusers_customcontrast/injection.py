"""Attaching a :class:`CustomContrastAdapter` to a UNet and taking it off again, exactly.

Attaching installs one :class:`CustomContrastAttnProcessor2_0` per cross-attention layer, puts the adapter's image
side in ``unet.encoder_hid_proj`` (where every ``IPAdapterMixin`` pipeline feeds image features) and registers a
forward pre-hook that hands the step's timestep to it. Nothing is registered as a pipeline component. Detaching
restores the saved processors, projection, config value and hooks, so the UNet computes exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from torch import nn
from torch.utils.hooks import RemovableHandle

from .attention_processor import CustomContrastAttnProcessor2_0
from .image_projection import CustomContrastImageProjection
from .modeling.adapter import CustomContrastAdapter
from .recording import SubjectRecorder

STATE_ATTRIBUTE = "_customcontrast"

LayerScale = float | list[float]
ScaleSpec = float | dict | Sequence[LayerScale]


@dataclass
class AttachedAdapter:
    """What :func:`attach` changed on a UNet, so that :func:`detach` can undo exactly that."""

    adapter: CustomContrastAdapter
    recorder: SubjectRecorder
    projection: CustomContrastImageProjection
    processors: dict[str, CustomContrastAttnProcessor2_0]
    original_processors: dict[str, object]
    original_encoder_hid_proj: nn.Module | None
    original_encoder_hid_dim_type: str | None
    hook: RemovableHandle


def attached(unet: nn.Module) -> AttachedAdapter | None:
    """The adapter attached to ``unet``, if any."""
    return getattr(unet, STATE_ATTRIBUTE, None)


def check_can_attach(unet: nn.Module, adapter: CustomContrastAdapter) -> None:
    """Raise a one-sentence ``ValueError`` if :func:`attach` would fail; changes nothing."""
    adapter.check_compatible(unet)
    state = attached(unet)
    other = state.original_encoder_hid_proj if state is not None else unet.encoder_hid_proj
    if other is not None:
        raise ValueError(
            f"The UNet already has an encoder_hid_proj ({type(other).__name__}, e.g. an IP-Adapter): "
            "call pipe.unload_ip_adapter() before loading CustomContrast."
        )


def attach(unet: nn.Module, adapter: CustomContrastAdapter, scale: float = 1.0) -> AttachedAdapter:
    """Attach ``adapter`` to ``unet`` (replacing a CustomContrast adapter already there) and return the record."""
    check_can_attach(unet, adapter)
    detach(unet)

    recorder = SubjectRecorder()
    projection = CustomContrastImageProjection(adapter.encoder, recorder)
    original_processors = dict(unet.attn_processors)
    processors = {
        name: CustomContrastAttnProcessor2_0(
            layer, index, adapter.config.num_textual_tokens, scale=scale, recorder=recorder
        )
        for index, (name, layer) in enumerate(zip(adapter.config.layer_names, adapter.layers, strict=True))
    }
    # set_attn_processor empties the dict it is given: hand it a copy.
    unet.set_attn_processor({**original_processors, **processors})

    state = AttachedAdapter(
        adapter=adapter,
        recorder=recorder,
        projection=projection,
        processors=processors,
        original_processors=original_processors,
        original_encoder_hid_proj=unet.encoder_hid_proj,
        original_encoder_hid_dim_type=unet.config.encoder_hid_dim_type,
        hook=unet.register_forward_pre_hook(projection.capture_step, with_kwargs=True),
    )
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    setattr(unet, STATE_ATTRIBUTE, state)
    return state


def detach(unet: nn.Module) -> CustomContrastAdapter | None:
    """Take the CustomContrast adapter off ``unet``; returns it (or ``None`` if none was attached)."""
    state = attached(unet)
    if state is None:
        return None
    state.hook.remove()
    state.projection.clear_cache()
    unet.set_attn_processor(dict(state.original_processors))
    unet.encoder_hid_proj = state.original_encoder_hid_proj
    unet.config.encoder_hid_dim_type = state.original_encoder_hid_dim_type
    delattr(unet, STATE_ATTRIBUTE)
    return state.adapter


def _expand_scale(unet: nn.Module, names: Sequence[str], scale: ScaleSpec, what: str) -> list[LayerScale]:
    """One value per cross-attention layer from a float, a per-block dict (InstantStyle) or a per-layer list."""
    if isinstance(scale, dict):
        # Blocks a dict does not name get 0: the subject reaches only the blocks the user chose.
        by_block = _maybe_expand_lora_scales(unet, [scale], default_scale=0.0)[0]
        return [next((v for block, v in by_block.items() if name.startswith(block)), 0.0) for name in names]
    if isinstance(scale, (list, tuple)):
        if len(scale) != len(names):
            raise ValueError(
                f"A per-layer {what} list needs one value per cross-attention layer ({len(names)}), got {len(scale)}."
            )
        return list(scale)
    if isinstance(scale, (int, float)):
        return [float(scale)] * len(names)
    raise ValueError(f"{what} must be a float, a per-block dict or a per-layer list, got {type(scale).__name__}.")


def set_scale(unet: nn.Module, scale: ScaleSpec | None = None, s_plus_scale: ScaleSpec | None = None) -> None:
    """Set ``lambda_l`` (visual branch) and/or ``beta_l`` (S+ tokens) of every layer; ``None`` keeps a value."""
    state = attached(unet)
    if state is None:
        raise ValueError("No CustomContrast adapter is loaded: call load_customcontrast() first.")
    names = list(state.processors)
    if scale is not None:
        for name, value in zip(names, _expand_scale(unet, names, scale, "scale"), strict=True):
            state.processors[name].scale = [value]
    if s_plus_scale is not None:
        for name, value in zip(names, _expand_scale(unet, names, s_plus_scale, "s_plus_scale"), strict=True):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"s_plus_scale must be a number >= 0 for every layer, got {value!r} at '{name}'.")
            state.processors[name].s_plus_scale = float(value)
