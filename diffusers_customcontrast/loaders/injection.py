"""Attaching a :class:`CustomContrastAdapter` to a UNet and taking it off again, exactly.

Attaching installs one :class:`CustomContrastAttnProcessor2_0` per cross-attention layer, puts the adapter's image
side in ``unet.encoder_hid_proj`` (where every ``IPAdapterMixin`` pipeline feeds image features) and registers a
forward pre-hook. Nothing is registered as a pipeline component. Detaching restores the saved processors, projection,
config value and hooks, so the UNet computes exactly what it did before.

The pre-hook gives each UNet call its own subject: it returns the call's arguments with the adapter's entry of
``added_cond_kwargs["image_embeds"]`` wrapped, together with the call's timesteps and options, into a
:class:`~diffusers_customcontrast.conditioning.SubjectConditioning` (new dicts and lists: the caller's stay as they
were). It also checks the call's subject inputs before any layer runs: shapes on every call, values once per tensor
(a pipeline hands every step the same tensors; the loading pipeline's ``prepare_ip_adapter_image_embeds`` has
checked the features before the loop, so only masks are read, in the first call: no device -> host sync per step),
and its options (scales expanded to one value per layer), which it lays over the adapter's settings (one frozen
:class:`SubjectOptions` per attached adapter, that :func:`set_scale` replaces whole); and it decides the step range
from the call's own timestep.

Other calls replace attention processors wholesale (``enable_attention_slicing``, ``fuse_qkv_projections``,
``set_attn_processor``, ``unload_ip_adapter``). The pre-hook checks, before every UNet call, that the adapter is still
whole (:func:`reconcile`): processors replaced while the projection is still ours are put back, with a warning; an
adapter taken off by ``unload_ip_adapter`` (processors and projection gone) is unloaded fully; a projection replaced
under our processors is an error. The UNet never runs with half an adapter.

Beside diffusers' IP-Adapters, CustomContrast's projection and entry come after theirs and its processors compute
their branches too (keeping their processors whole for detaching). diffusers' ``load_ip_adapter`` and, beside
IP-Adapters, ``unload_ip_adapter`` run inside :func:`lifted` (the loading pipeline's own per-instance methods, set by
``load_customcontrast`` and removed at unload, call them so), so CustomContrast stays.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..attention_processor import CustomContrastAttnProcessor2_0
from ..conditioning import OPTIONS_KEY, LayerScale, StepRecord, SubjectConditioning, SubjectOptions, SubjectRecording
from ..models.adapter import CustomContrastAdapter
from ..models.unet_layout import attention_module
from ..step_range import DEFAULT_TRAIN_TIMESTEPS, FULL_RANGE, check_step_range, in_step_range, noise_position
from .image_projection import CustomContrastImageProjection, MultiSubjectImageProjection, image_projection

STATE_ATTRIBUTE = "_customcontrast"

ScaleSpec = float | dict | Sequence[LayerScale]


@dataclass
class AttachedAdapter:
    """What :func:`attach` changed on a UNet, so that :func:`detach` can undo exactly that."""

    adapter: CustomContrastAdapter
    projection: CustomContrastImageProjection
    processors: dict[str, CustomContrastAttnProcessor2_0]
    original_processors: dict[str, object]
    original_encoder_hid_proj: nn.Module | None
    original_encoder_hid_dim_type: str | None
    hook: RemovableHandle
    forward_parameters: tuple[str, ...]  # the UNet's forward arguments in order, to read positional ones by name
    settings: SubjectOptions  # the adapter's scales and step range (adapter_settings): replaced whole, never edited
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the Attention module of each processor
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run by detach (e.g. input normalisation)
    entry_index: int = 0  # position of the adapter's projection in encoder_hid_proj and its entry in image_embeds
    num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS  # T of the noise position 1 - t / T (the scheduler's)
    pooled: bool = False  # the adapter reads pooled image embeddings (image_input="image_embeds"), one per subject

    @property
    def step_range(self) -> tuple[float, float]:
        """``(start, end)``: the noise levels the subject acts on when a call does not say (step_range.py)."""
        return self.settings.start, self.settings.end


def adapter_settings(adapter: CustomContrastAdapter, scale: LayerScale = 1.0) -> SubjectOptions:
    """The settings an adapter is attached with: every field of :class:`SubjectOptions` that a call may override.

    One frozen value per attached adapter: ``scale`` and ``s_plus_scale`` one value per layer, the full step range.
    :func:`set_scale` replaces it whole; a call's own options are laid over it (:func:`call_options`).
    """
    count = len(adapter.config.layer_names)
    return SubjectOptions(
        scale=(scale,) * count, s_plus_scale=(adapter.config.s_plus_scale,) * count, start=0.0, end=1.0
    )


def call_options(state: AttachedAdapter, options: SubjectOptions | None) -> SubjectOptions:
    """What one call acts with: the adapter's settings, with every field the call's (checked) options give."""
    if options is None:
        return state.settings
    given = {
        f.name: getattr(options, f.name) for f in dataclasses.fields(options) if getattr(options, f.name) is not None
    }
    return dataclasses.replace(state.settings, **given)


def attached(unet: nn.Module) -> AttachedAdapter | None:
    """The adapter attached to ``unet``, if any."""
    return getattr(unet, STATE_ATTRIBUTE, None)


def _owns_projection(unet: nn.Module, state: AttachedAdapter) -> bool:
    projection = unet.encoder_hid_proj
    layers = getattr(projection, "image_projection_layers", ())
    return isinstance(projection, MultiIPAdapterImageProjection) and any(p is state.projection for p in layers)


def _ip_adapter_processors(
    unet: nn.Module, projection: nn.Module | None, processors: Mapping[str, object], names: Sequence[str]
) -> dict[str, IPAdapterAttnProcessor2_0] | None:
    """The cross-attention processors of diffusers' IP-Adapters, if ``projection`` and ``processors`` are theirs."""
    if type(projection) is not MultiIPAdapterImageProjection or unet.config.encoder_hid_dim_type != "ip_image_proj":
        return None
    count = len(projection.image_projection_layers)
    found = {name: processors.get(name) for name in names}
    if all(type(p) is IPAdapterAttnProcessor2_0 and len(p.scale) == count for p in found.values()):
        return found
    return None


def check_can_attach(unet: nn.Module, adapter: CustomContrastAdapter) -> None:
    """Raise a one-sentence ``ValueError`` if :func:`attach` would fail; changes nothing.

    The UNet may carry diffusers' IP-Adapters (``pipe.load_ip_adapter``): CustomContrast then sits beside them.
    """
    adapter.check_compatible(unet)
    state = attached(unet)
    owned = state is not None and _owns_projection(unet, state)
    other = state.original_encoder_hid_proj if owned else unet.encoder_hid_proj
    processors = state.original_processors if owned else unet.attn_processors
    if other is not None and _ip_adapter_processors(unet, other, processors, adapter.config.layer_names) is None:
        raise ValueError(
            f"The UNet already has an encoder_hid_proj ({type(other).__name__}) that is not diffusers' IP-Adapter "
            "(a MultiIPAdapterImageProjection with an IPAdapterAttnProcessor2_0 on every cross-attention layer), "
            "so CustomContrast cannot sit beside it: call pipe.unload_ip_adapter() before loading CustomContrast."
        )


def attach(unet: nn.Module, adapter: CustomContrastAdapter, scale: float = 1.0) -> AttachedAdapter:
    """Attach ``adapter`` to ``unet`` (replacing a CustomContrast adapter already there) and return the record.

    Beside diffusers' IP-Adapters, CustomContrast's projection and image embeddings entry come after theirs (load
    order), and its processors compute their branches too.
    """
    check_can_attach(unet, adapter)
    detach(unet)

    projection = image_projection(adapter.encoder, adapter.adapter_config.image_input)
    original_processors = dict(unet.attn_processors)
    ip_processors = _ip_adapter_processors(
        unet, unet.encoder_hid_proj, original_processors, adapter.config.layer_names
    )
    ip_projections = list(unet.encoder_hid_proj.image_projection_layers) if ip_processors else []
    state = AttachedAdapter(
        adapter=adapter,
        projection=projection,
        processors={},
        original_processors=original_processors,
        original_encoder_hid_proj=unet.encoder_hid_proj,
        original_encoder_hid_dim_type=unet.config.encoder_hid_dim_type,
        hook=unet.register_forward_pre_hook(_before_unet_forward, with_kwargs=True),
        forward_parameters=tuple(inspect.signature(type(unet).forward).parameters)[1:],
        settings=adapter_settings(adapter, scale),
        entry_index=len(ip_projections),
        pooled=adapter.adapter_config.image_input == "image_embeds",
    )
    state.processors = {
        name: CustomContrastAttnProcessor2_0(
            layer,
            index,
            adapter.config.num_textual_tokens,
            entry_index=state.entry_index,
            ip_adapter=ip_processors[name] if ip_processors else None,
            attached=state,
        )
        for index, (name, layer) in enumerate(zip(adapter.config.layer_names, adapter.layers, strict=True))
    }
    state.modules = {name: attention_module(unet, name) for name in state.processors}
    # set_attn_processor empties the dict it is given: hand it a copy.
    unet.set_attn_processor({**original_processors, **state.processors})
    unet.encoder_hid_proj = MultiSubjectImageProjection(
        [*ip_projections, projection], ip_adapter_features=_penultimate_features(adapter)
    )
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    setattr(unet, STATE_ATTRIBUTE, state)
    return state


def _penultimate_features(adapter: CustomContrastAdapter) -> slice | None:
    """Where the penultimate hidden state lies in the features of an adapter that reads several hidden states.

    The loading pipeline's ``encode_image`` hands every image adapter those concatenated features where diffusers'
    hands the penultimate hidden state; diffusers' IP-Adapters beside it are given back their own slice (``None``:
    the adapter reads the penultimate hidden state alone, or no hidden states at all).
    """
    layers = adapter.adapter_config.image_feature_layers
    if layers is None or tuple(layers) == (-2,) or -2 not in layers:
        return None
    width = adapter.config.image_embed_dim // len(layers)
    start = list(layers).index(-2) * width
    return slice(start, start + width)


@contextmanager
def lifted(unet: nn.Module) -> Iterator[None]:
    """Take CustomContrast off ``unet`` for the block, then put it back on top of what the block left there (e.g.
    diffusers' IP-Adapters, loaded or unloaded), with the same scales, step range and input handling."""
    state = attached(unet)
    cleanups, state.cleanups = state.cleanups, []  # input normalisation and feature hooks stay installed
    detach(unet)
    try:
        yield
    finally:
        try:
            restored = attach(unet, state.adapter)
        except Exception:
            for cleanup in reversed(cleanups):
                cleanup()
            raise
        restored.settings, restored.cleanups = state.settings, cleanups
        restored.num_train_timesteps = state.num_train_timesteps


def detach(unet: nn.Module) -> CustomContrastAdapter | None:
    """Take the CustomContrast adapter off ``unet``; returns it (or ``None`` if none was attached).

    Layers whose processor another call has replaced since (see :func:`reconcile`) keep that processor, and a
    projection that is no longer ours stays: what was changed after attaching is not undone.
    """
    state = attached(unet)
    if state is None:
        return None
    state.hook.remove()
    current = unet.attn_processors
    unet.set_attn_processor(
        {
            name: state.original_processors[name] if processor is state.processors.get(name) else processor
            for name, processor in current.items()
        }
    )
    if _owns_projection(unet, state):
        _restore_projection(unet, state.original_encoder_hid_proj)
        unet.config.encoder_hid_dim_type = state.original_encoder_hid_dim_type
    for cleanup in reversed(state.cleanups):
        cleanup()
    delattr(unet, STATE_ATTRIBUTE)
    return state.adapter


def _restore_projection(unet: nn.Module, original: nn.Module | None) -> None:
    """Put ``encoder_hid_proj`` back as it was: a UNet built without one holds ``None`` as a plain attribute, and
    assigning ``None`` to a registered submodule would leave an empty entry in its ``_modules`` instead."""
    if original is None:
        del unet.encoder_hid_proj
    unet.encoder_hid_proj = original


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


def _before_unet_forward(unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """UNet forward pre-hook: the call's arguments, with this call's :class:`SubjectConditioning` in them."""
    state = reconcile(unet)
    if state is None:
        return None
    call = {**dict(zip(state.forward_parameters, args)), **kwargs}
    added_cond_kwargs = call.get("added_cond_kwargs") or {}
    if "image_embeds" not in added_cond_kwargs:
        raise ValueError(
            "A CustomContrast adapter is loaded, so the pipeline needs a subject: pass ip_adapter_image= (or "
            "ip_adapter_image_embeds=), or call pipe.unload_customcontrast() to generate without one."
        )
    image_embeds = added_cond_kwargs["image_embeds"]
    num_adapters = len(unet.encoder_hid_proj.image_projection_layers)
    if not isinstance(image_embeds, list) or len(image_embeds) != num_adapters:
        got = f"{len(image_embeds)} entries" if isinstance(image_embeds, list) else f"a {type(image_embeds).__name__}"
        raise ValueError(
            f"added_cond_kwargs['image_embeds'] must be a list with one entry per loaded image adapter "
            f"({num_adapters}), got {got}."
        )
    cross_attention_kwargs = dict(call.get("cross_attention_kwargs") or {})
    options = checked_options(state, cross_attention_kwargs.pop(OPTIONS_KEY, None))
    conditioning = _conditioning(state, image_embeds[state.entry_index], call["sample"], call["timestep"], options)
    if cross_attention_kwargs.get("ip_adapter_masks") is not None:
        cross_attention_kwargs["ip_adapter_masks"] = _checked_masks(
            cross_attention_kwargs["ip_adapter_masks"], num_adapters, state.entry_index, conditioning
        )
    entries = list(image_embeds)
    entries[state.entry_index] = conditioning
    call["added_cond_kwargs"] = {**added_cond_kwargs, "image_embeds": entries}
    if call.get("cross_attention_kwargs") is not None or cross_attention_kwargs:
        call["cross_attention_kwargs"] = cross_attention_kwargs
    return (), call


def with_recording(state: AttachedAdapter, args: tuple, kwargs: dict, recording: SubjectRecording) -> tuple:
    """A UNet call's ``(args, kwargs)`` with ``recording`` added to its options (``record_customcontrast``)."""
    call = {**dict(zip(state.forward_parameters, args)), **kwargs}
    cross_attention_kwargs = dict(call.get("cross_attention_kwargs") or {})
    options = cross_attention_kwargs.get(OPTIONS_KEY) or SubjectOptions()
    if not isinstance(options, SubjectOptions):
        return args, kwargs  # the adapter's own pre-hook refuses it in one sentence
    recordings = (*options.recordings, recording)
    cross_attention_kwargs[OPTIONS_KEY] = dataclasses.replace(options, recording=recordings)
    call["cross_attention_kwargs"] = cross_attention_kwargs
    return (), call


def checked_options(state: AttachedAdapter, options: Any) -> SubjectOptions | None:
    """A call's :class:`SubjectOptions`, checked and with its scales expanded to one value per layer, before any layer
    runs (a processor only reads them)."""
    if options is None:
        return None
    if not isinstance(options, SubjectOptions):
        raise ValueError(
            f"cross_attention_kwargs['{OPTIONS_KEY}'] must be a SubjectOptions, got {type(options).__name__}."
        )
    names = state.adapter.config.layer_names
    changes = {}
    if options.scale is not None and not _is_expanded(options.scale, len(names)):
        changes["scale"] = tuple(expand_scale(names, options.scale, "scale"))
    if options.s_plus_scale is not None and not _is_expanded(options.s_plus_scale, len(names)):
        changes["s_plus_scale"] = tuple(_s_plus_scales(names, options.s_plus_scale))
    recordings = options.recordings
    if not all(isinstance(r, SubjectRecording) for r in recordings):
        raise ValueError("SubjectOptions.recording must be a SubjectRecording (or a tuple of them) or None.")
    resolved = call_options(state, options)
    check_step_range(resolved.start, resolved.end)  # a bad range fails here, before the adapter runs
    return dataclasses.replace(options, **changes) if changes else options


def _is_expanded(values: Any, count: int) -> bool:
    """Whether per-call scales are already one checked value per layer (as :func:`subject_options` makes them)."""
    return (
        isinstance(values, tuple)
        and len(values) == count
        and all(_is_number(v) or (isinstance(v, list) and all(map(_is_number, v))) for v in values)
    )


def _conditioning(
    state: AttachedAdapter,
    entry: torch.Tensor | SubjectConditioning,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    options: SubjectOptions | None,
) -> SubjectConditioning:
    """The adapter's entry of one call's image embeddings, with everything its processors need from the call."""
    batch = sample.shape[0]
    timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(batch)
    elif timesteps.numel() != batch:
        raise ValueError(
            f"Got {timesteps.numel()} timesteps for a batch of {batch} latents: pass one timestep, or one per latent."
        )
    if isinstance(entry, SubjectConditioning):
        conditioning = entry
        if entry.tokens is not None and entry.tokens.s_plus.shape[0] != batch * entry.num_subjects:
            raise ValueError(
                f"The given subject tokens have {entry.tokens.s_plus.shape[0]} rows, but a batch of {batch} latents "
                f"with {entry.num_subjects} subjects each needs {batch * entry.num_subjects}."
            )
    else:
        check_feature_values(entry)  # before any reshape: the pipeline hands every call this very tensor
        if state.pooled and getattr(entry, "ndim", None) == 3:
            entry = entry[:, :, None]  # pooled embeddings [batch, num_subjects, width]: one token per subject
        features = _checked_features(entry, state.adapter.config.image_embed_dim, batch)
        conditioning = SubjectConditioning(image_embeds=features, num_subjects=features.shape[1])
    context = options.image_context if options is not None else None
    if context is not None and context.visual_cls.shape[0] != batch * conditioning.num_subjects:
        raise ValueError(
            f"The image context has {context.visual_cls.shape[0]} rows, but a batch of {batch} latents with "
            f"{conditioning.num_subjects} subjects each needs {batch * conditioning.num_subjects}: encode the "
            "call's own subject features (the negative rows first under guidance)."
        )
    options = call_options(state, options if options is not None else conditioning.options)
    record = _step_record(conditioning.record, options, timesteps)
    step_range = check_step_range(options.start, options.end)
    active = step_range == FULL_RANGE or in_step_range(noise_position(timestep, state.num_train_timesteps), step_range)
    return dataclasses.replace(
        conditioning,
        timesteps=timesteps if conditioning.timesteps is None else conditioning.timesteps,
        sample_size=tuple(sample.shape[-2:]),
        options=options,
        record=record,
        active=active,
    )


def _step_record(
    record: StepRecord | None, options: SubjectOptions | None, timesteps: torch.Tensor
) -> StepRecord | None:
    """The call's record (given with the call, or a new one for the recordings its options carry), if any."""
    recordings = options.recordings if options is not None else ()
    if record is None and recordings:
        record = StepRecord()
    for recording in recordings:
        recording.steps.append(record)
    if record is not None:
        record.timesteps = timesteps
    return record


# Tensors whose values were checked, so that a check runs once per generation: a pipeline hands every UNet call of its
# denoising loop the same subject features and masks (made before the loop), and reading values is a device -> host
# sync. Weak: a checked tensor is forgotten when it is freed (a new tensor at the same id is checked again).
_CHECKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _needs_check(tensor: torch.Tensor) -> bool:
    """Whether a check should read ``tensor``'s values now: not while torch.compile traces (a data-dependent branch
    would break the graph), not on the meta device (shape-only runs, e.g. FLOP counts), not twice."""
    if torch.compiler.is_compiling() or tensor.device.type == "meta":
        return False
    return _CHECKED.get(id(tensor)) is not tensor


def _checked(tensor: torch.Tensor) -> None:
    _CHECKED[id(tensor)] = tensor


def check_feature_values(features: Any) -> None:
    """Refuse subject features holding NaN or infinite values; reads a tensor's values once (then remembers it).

    The loading pipeline's ``prepare_ip_adapter_image_embeds`` calls it on the features it hands the denoising loop,
    so that no UNet call reads them on the host; the UNet pre-hook calls it too (a no-op for those), for callers that
    build the features otherwise.
    """
    if not isinstance(features, torch.Tensor) or not _needs_check(features):
        return
    if not torch.isfinite(features).all():
        raise ValueError(
            "The subject features hold NaN or infinite values (from ip_adapter_image_embeds, or an image encoder "
            "that overflowed, e.g. in float16): CustomContrast would produce a NaN image."
        )
    _checked(features)


def _checked_features(features: Any, width: int, batch: int) -> torch.Tensor:
    """The subject features of a call, ``[batch, num_subjects, tokens, width]``, one row per latent."""
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[-1] != width:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(
            f"The subject features must be a [batch, num_subjects, tokens, {width}] tensor (ip_adapter_image_embeds: "
            f"a list with one such tensor, the negative rows first under guidance, as "
            f"pipe.prepare_ip_adapter_image_embeds returns), got {shape}."
        )
    rows = features.shape[0]
    if rows != batch and batch % rows:
        raise ValueError(
            f"The subject embeddings have batch size {rows}, which does not divide the prompt batch size "
            f"{batch}: pass one subject image per prompt, or one for all prompts."
        )
    # Pipelines order rows as [negative prompts..., positive prompts...] and the image rows the same way, so each
    # image row serves a contiguous run of prompt rows.
    return features if rows == batch else features.repeat_interleave(batch // rows, dim=0)


def _checked_masks(
    masks: Any, num_adapters: int, entry_index: int, conditioning: SubjectConditioning
) -> list[torch.Tensor | None]:
    """``ip_adapter_masks`` as diffusers reads them (one entry per image adapter), with CustomContrast's checked."""
    if isinstance(masks, torch.Tensor):  # diffusers' older form: [num_adapters, 1, height, width]
        masks = list(masks.unsqueeze(1))
    if not isinstance(masks, list) or len(masks) != num_adapters:
        got = f"{len(masks)} entries" if isinstance(masks, list) else f"a {type(masks).__name__}"
        raise ValueError(
            f"ip_adapter_masks must be a list with one mask tensor (or None) per loaded image adapter, in load order "
            f"({num_adapters}: {', '.join(['IP-Adapter'] * entry_index + ['CustomContrast'])}), got {got}."
        )
    mask = masks[entry_index]
    if mask is None:
        return masks
    num_subjects = conditioning.num_subjects
    batch = conditioning.timesteps.shape[0]
    if (
        not isinstance(mask, torch.Tensor)
        or mask.ndim != 4
        or mask.shape[1] != num_subjects
        or mask.shape[0] not in (1, batch)
    ):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"ip_adapter_masks must hold one [1, num_subjects, height, width] tensor with num_subjects = "
            f"{num_subjects} (from IPAdapterMaskProcessor().preprocess), got {shape}."
        )
    if _needs_check(mask):
        # A NaN or 0..255 mask would scale the subject's branches without a word. One read of both bounds.
        low, high = (float(v) for v in mask.float().nan_to_num(nan=-1.0).aminmax())
        if low < 0 or high > 1:
            raise ValueError(
                "ip_adapter_masks values must lie in [0, 1] (IPAdapterMaskProcessor().preprocess gives 0 or 1), "
                f"got [{mask.min().item():.4g}, {mask.max().item():.4g}]."
            )
        _checked(mask)
    return masks


# ---------------------------------------------------------------------------------------------------- scales

_PARTS = ("down", "mid", "up")
_POSITION = re.compile(r"^(?:(?P<part>down|up)_blocks\.(?P<block>\d+)|mid_block)\.attentions\.(?P<attention>\d+)\.")
_BLOCK_KEY = re.compile(r"^block_(\d+)$")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _block_scales(names: Sequence[str], scale: Mapping[str, Any], what: str) -> list[float]:
    """One value per layer from an InstantStyle-style dict (``{"down": ..., "mid": ..., "up": {"block_1": [...]}}``).

    A part is a number (every layer in it) or, for ``down`` and ``up``, a dict of ``block_<i>`` entries, each a number
    or a list with one value per attention module of the block. Unnamed parts and blocks get 0: the subject reaches
    only the blocks the user chose.
    """
    positions = []
    for name in names:
        match = _POSITION.match(name)
        if match is None:
            raise ValueError(
                f"A per-block {what} dict needs diffusers' layer names ('down_blocks.<i>.attentions.<j>...'), but "
                f"this UNet has '{name}': pass a float or a per-layer list."
            )
        block = match["block"]
        positions.append((match["part"] or "mid", None if block is None else int(block), int(match["attention"])))
    attentions: dict[tuple[str, int | None], int] = {}
    for part, block, attention in positions:
        attentions[part, block] = max(attentions.get((part, block), 0), attention + 1)

    chosen: dict[tuple[str, int | None], float | list] = {}
    for part, value in scale.items():
        if part not in _PARTS:
            raise ValueError(
                f"Unknown key {part!r} in the per-block {what} dict: expected 'down', 'mid' or 'up' "
                "(e.g. {'up': {'block_0': [0.0, 1.0, 0.0]}})."
            )
        blocks = sorted(b for p, b in attentions if p == part)
        if _is_number(value):
            chosen.update({(part, b): value for b in blocks})
            continue
        if part == "mid" or not isinstance(value, Mapping):
            kinds = "a number" if part == "mid" else "a number or a dict of 'block_<i>' entries"
            raise ValueError(f"The {what} of '{part}' must be {kinds}, got {value!r}.")
        for key, block_value in value.items():
            match = _BLOCK_KEY.match(key) if isinstance(key, str) else None
            if match is None or int(match[1]) not in blocks:
                known = ", ".join(f"block_{b}" for b in blocks) or "none"
                raise ValueError(
                    f"Unknown block {key!r} in the {what} of '{part}': this UNet's {part} blocks with "
                    f"cross-attention are {known}."
                )
            count = attentions[part, int(match[1])]
            values = block_value if isinstance(block_value, (list, tuple)) else [block_value]
            if not all(map(_is_number, values)) or (isinstance(block_value, (list, tuple)) and len(values) != count):
                raise ValueError(
                    f"The {what} of {part} {key} must be a number or a list of {count} numbers (one per attention "
                    f"module of the block), got {block_value!r}."
                )
            chosen[part, int(match[1])] = block_value
    result = []
    for part, block, attention in positions:
        value = chosen.get((part, block), 0.0)
        result.append(float(value[attention] if isinstance(value, (list, tuple)) else value))
    return result


def expand_scale(names: Sequence[str], scale: ScaleSpec, what: str) -> list[LayerScale]:
    """One value per cross-attention layer from a float, a per-block dict (InstantStyle) or a per-layer list."""
    if isinstance(scale, Mapping):
        return _block_scales(names, scale, what)
    if isinstance(scale, (list, tuple)):
        if len(scale) != len(names):
            raise ValueError(
                f"A per-layer {what} list needs one value per cross-attention layer ({len(names)}), got {len(scale)}."
            )
        return list(scale)
    if _is_number(scale):
        return [float(scale)] * len(names)
    raise ValueError(f"{what} must be a float, a per-block dict or a per-layer list, got {type(scale).__name__}.")


def subject_options(
    unet: nn.Module,
    scale: ScaleSpec | None = None,
    s_plus_scale: ScaleSpec | None = None,
    start: float | None = None,
    end: float | None = None,
    recording: SubjectRecording | None = None,
) -> SubjectOptions:
    """:class:`SubjectOptions` for one call, from the same specifications as :func:`set_scale` (``None``: the
    adapter's), checked and expanded now, before the pipeline runs."""
    state = loaded(unet)
    options = SubjectOptions(scale=scale, s_plus_scale=s_plus_scale, start=start, end=end, recording=recording)
    return checked_options(state, options)


def _s_plus_scales(names: Sequence[str], s_plus_scale: ScaleSpec) -> list[float]:
    values = expand_scale(names, s_plus_scale, "s_plus_scale")
    for name, value in zip(names, values, strict=True):
        if not _is_number(value) or value < 0:
            raise ValueError(f"s_plus_scale must be a number >= 0 for every layer, got {value!r} at '{name}'.")
    return [float(v) for v in values]


def loaded(unet: nn.Module) -> AttachedAdapter:
    """The attached adapter (made whole, see :func:`reconcile`), or a one-sentence ``ValueError`` if none is."""
    state = reconcile(unet)
    if state is None:
        raise ValueError("No CustomContrast adapter is loaded: call load_customcontrast() first.")
    return state


def set_scale(
    unet: nn.Module,
    scale: ScaleSpec | None = None,
    s_plus_scale: ScaleSpec | None = None,
    start: float | None = None,
    end: float | None = None,
) -> None:
    """Set ``lambda_l`` (visual branch) and/or ``beta_l`` (S+ tokens) of every layer, and the step range
    ``[start, end)`` the subject acts on. ``None`` keeps a value, for every argument; everything is checked before
    anything changes."""
    state = loaded(unet)
    names = state.adapter.config.layer_names
    changes = SubjectOptions(
        scale=None if scale is None else tuple(expand_scale(names, scale, "scale")),
        s_plus_scale=None if s_plus_scale is None else tuple(_s_plus_scales(names, s_plus_scale)),
        start=start,
        end=end,
    )
    settings = call_options(state, changes)
    check_step_range(settings.start, settings.end)
    state.settings = settings
