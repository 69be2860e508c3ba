"""Attaching a :class:`CustomContrastAdapter` to a UNet and taking it off again, exactly.

Attaching installs one :class:`CustomContrastAttnProcessor2_0` per cross-attention layer, puts the adapter's image
side in ``unet.encoder_hid_proj`` (where every ``IPAdapterMixin`` pipeline feeds image features) and registers a
forward pre-hook that hands the step's timestep to it. Nothing is registered as a pipeline component. Detaching
restores the saved processors, projection, config value and hooks, so the UNet computes exactly what it did before.

Other calls replace attention processors wholesale (``enable_attention_slicing``, ``fuse_qkv_projections``,
``set_attn_processor``, ``unload_ip_adapter``). The pre-hook checks, before every UNet call, that the adapter is still
whole (:func:`reconcile`): processors replaced while the projection is still ours are put back, with a warning; an
adapter taken off by ``unload_ip_adapter`` (processors and projection gone) is unloaded fully; a projection replaced
under our processors is an error. The UNet never runs with half an adapter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..attention_processor import CustomContrastAttnProcessor2_0
from ..models.adapter import CustomContrastAdapter
from ..models.image_projection import CustomContrastImageProjection
from ..models.unet_layout import attention_module
from ..recording import SubjectRecorder

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
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the Attention module of each processor
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run by detach (e.g. input normalisation)


def attached(unet: nn.Module) -> AttachedAdapter | None:
    """The adapter attached to ``unet``, if any."""
    return getattr(unet, STATE_ATTRIBUTE, None)


def _owns_projection(unet: nn.Module, state: AttachedAdapter) -> bool:
    projection = unet.encoder_hid_proj
    layers = getattr(projection, "image_projection_layers", ())
    return isinstance(projection, MultiIPAdapterImageProjection) and any(p is state.projection for p in layers)


def check_can_attach(unet: nn.Module, adapter: CustomContrastAdapter) -> None:
    """Raise a one-sentence ``ValueError`` if :func:`attach` would fail; changes nothing."""
    adapter.check_compatible(unet)
    state = attached(unet)
    owned = state is not None and _owns_projection(unet, state)
    other = state.original_encoder_hid_proj if owned else unet.encoder_hid_proj
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
        hook=unet.register_forward_pre_hook(_before_unet_forward, with_kwargs=True),
        modules={name: attention_module(unet, name) for name in processors},
    )
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    setattr(unet, STATE_ATTRIBUTE, state)
    return state


def detach(unet: nn.Module) -> CustomContrastAdapter | None:
    """Take the CustomContrast adapter off ``unet``; returns it (or ``None`` if none was attached).

    Layers whose processor another call has replaced since (see :func:`reconcile`) keep that processor, and a
    projection that is no longer ours stays: what was changed after attaching is not undone.
    """
    state = attached(unet)
    if state is None:
        return None
    state.hook.remove()
    state.projection.clear_cache()
    current = unet.attn_processors
    unet.set_attn_processor(
        {
            name: state.original_processors[name] if processor is state.processors.get(name) else processor
            for name, processor in current.items()
        }
    )
    if _owns_projection(unet, state):
        unet.encoder_hid_proj = state.original_encoder_hid_proj
        unet.config.encoder_hid_dim_type = state.original_encoder_hid_dim_type
    for cleanup in reversed(state.cleanups):
        cleanup()
    delattr(unet, STATE_ATTRIBUTE)
    return state.adapter


def reconcile(unet: nn.Module) -> AttachedAdapter | None:
    """The attached adapter, made whole again if other calls replaced part of it; ``None`` if none is left.

    - Processors replaced (``enable_attention_slicing()``, ``fuse_qkv_projections()``, ``set_attn_processor()``)
      while ``encoder_hid_proj`` is still ours: ours go back on those layers, with a warning; the replacements
      become what :func:`detach` restores there, and every other layer keeps them.
    - Processors and projection both gone (``unload_ip_adapter()``, ``load_ip_adapter()``): the rest is taken off
      too (hook, input normalisation), with a warning; the UNet keeps what those calls installed.
    - ``encoder_hid_proj`` replaced under our processors: ``ValueError``, since the processors would get no subject.
    """
    state = attached(unet)
    if state is None:
        return None
    replaced = [name for name, processor in state.processors.items() if state.modules[name].processor is not processor]
    projection = _owns_projection(unet, state) and unet.config.encoder_hid_dim_type == "ip_image_proj"
    if projection and not replaced:
        return state
    if not projection and len(replaced) == len(state.processors):
        detach(unet)
        warnings.warn(
            "The CustomContrast adapter was taken off the UNet by another call (its attention processors and "
            "unet.encoder_hid_proj were replaced, e.g. by pipe.unload_ip_adapter()); it is now fully unloaded. "
            "Call pipe.load_customcontrast(...) again to use it.",
            UserWarning,
            stacklevel=3,
        )
        return None
    if not projection:
        raise ValueError(
            "unet.encoder_hid_proj (or unet.config.encoder_hid_dim_type) was changed after pipe.load_customcontrast(), "
            "so CustomContrast's attention processors would get no subject: call pipe.load_customcontrast(...) again, "
            "or pipe.unload_customcontrast() to run without it."
        )
    for name in replaced:
        state.original_processors[name] = state.modules[name].processor
        state.modules[name].set_processor(state.processors[name])
    warnings.warn(
        f"Another call (e.g. pipe.enable_attention_slicing(), pipe.fuse_qkv_projections() or "
        f"unet.set_attn_processor()) replaced {len(replaced)} of CustomContrast's {len(state.processors)} attention "
        "processors after pipe.load_customcontrast(): CustomContrast put its own back on those cross-attention layers "
        "(they do not slice or fuse); the other layers keep the new processors. To apply such a call to every layer, "
        "call pipe.unload_customcontrast(), then the call, then pipe.load_customcontrast(...) again.",
        UserWarning,
        stacklevel=3,
    )
    return state


def _before_unet_forward(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """UNet forward pre-hook: check that the adapter is whole and has a subject, and hand it the step's timestep."""
    state = reconcile(unet)
    if state is None:
        return
    added_cond_kwargs = args[7] if len(args) > 7 else kwargs.get("added_cond_kwargs")
    if not added_cond_kwargs or "image_embeds" not in added_cond_kwargs:
        raise ValueError(
            "A CustomContrast adapter is loaded, so the pipeline needs a subject: pass ip_adapter_image= (or "
            "ip_adapter_image_embeds=), or call pipe.unload_customcontrast() to generate without one."
        )
    state.projection.capture_step(unet, args, kwargs)


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
    state = reconcile(unet)
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
