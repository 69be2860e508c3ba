"""The pipeline methods: ``load_customcontrast``, ``unload_customcontrast``, ``set_customcontrast_scale``,
``encode_customcontrast_subjects``.

They work on any diffusers pipeline with ``IPAdapterMixin`` (SD1.5 and SDXL: txt2img, img2img, inpaint, ControlNet;
the T2I-Adapter pipeline of SDXL, not SD1.5's ``StableDiffusionAdapterPipeline``, which has no IP-Adapter support):
the subject image then travels through the pipeline's own ``ip_adapter_image=`` argument. Importing
``diffusers_customcontrast`` makes them methods of ``IPAdapterMixin`` (every such pipeline has a UNet) and changes
nothing else in diffusers: no method of diffusers is wrapped, and pipelines without ``IPAdapterMixin`` (FLUX, SD3,
SD1.5's T2I-Adapter pipeline) gain nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import IPAdapterMixin
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ..conditioning import SubjectRecording
from ..models.adapter import CustomContrastAdapter
from . import injection, inputs
from .serialization import AdapterLoadError, load_adapter, resolve_file

logger = logging.getLogger(__name__)


def _check_pipeline(pipe: DiffusionPipeline) -> None:
    if not isinstance(pipe, IPAdapterMixin):
        raise ValueError(
            f"{type(pipe).__name__} has no IP-Adapter support (IPAdapterMixin), which CustomContrast uses to take the "
            "subject image: use a pipeline that accepts ip_adapter_image, such as StableDiffusionPipeline."
        )


def _load_image_encoder(
    pipe: DiffusionPipeline, source: str | os.PathLike, subfolder: str | None, folder: str, **hub_kwargs
) -> CLIPVisionModelWithProjection | None:
    """The CLIP image encoder shipped with the adapter, as ``load_ip_adapter`` finds it (not yet registered)."""
    location = folder if "/" in folder else Path(subfolder or "", folder).as_posix()
    try:
        resolve_file(source, "config.json", location, **hub_kwargs)
    except AdapterLoadError:
        logger.warning(
            "No image encoder at '%s/%s' and the pipeline has none: pass ip_adapter_image_embeds= to the pipeline, "
            "or load one into pipe.image_encoder.",
            source,
            location,
        )
        return None
    hub = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "local_files_only", "token", "revision")}
    return CLIPVisionModelWithProjection.from_pretrained(source, subfolder=location, dtype=pipe.dtype, **hub)


def _ensure_feature_extractor(pipe: DiffusionPipeline) -> None:
    if getattr(pipe, "feature_extractor", None) is None and getattr(pipe, "image_encoder", None) is not None:
        size = pipe.image_encoder.config.image_size
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))


def load_customcontrast(
    pipe: DiffusionPipeline,
    pretrained_model_name_or_path_or_adapter: str | os.PathLike | CustomContrastAdapter,
    subfolder: str | None = None,
    weight_name: str | None = None,
    image_encoder_folder: str | None = "image_encoder",
    scale: float = 1.0,
    **kwargs,
) -> CustomContrastAdapter:
    """Load a CustomContrast adapter into ``pipe`` (a pipeline with IP-Adapter support).

    Args:
        pipe: the pipeline.
        pretrained_model_name_or_path_or_adapter: a hub repository id, a local folder saved with
            ``CustomContrastAdapter.save_pretrained``, or a :class:`CustomContrastAdapter`.
        subfolder: folder of the adapter inside the repository or folder.
        weight_name: weight file name (default ``diffusion_pytorch_model.safetensors``).
        image_encoder_folder: where to find the CLIP image encoder if the pipeline has none: a folder name inside
            ``subfolder``, or a path inside the repository. ``None`` loads no image encoder (then pass
            ``ip_adapter_image_embeds=``).
        scale: initial scale of the visual branch.
        **kwargs: hub arguments (``cache_dir``, ``force_download``, ``local_files_only``, ``token``, ``revision``),
            and ``torch_dtype`` (default: the UNet's dtype).

    Returns:
        The loaded adapter (its weights are shared with the pipeline, not copied).

    Raises:
        ValueError: the pipeline has no IP-Adapter support, or the adapter does not fit its UNet or image encoder.
        AdapterLoadError: a file is missing, corrupt or unsafe (an ``OSError`` and a ``ValueError``).

    Everything is checked before the pipeline is changed: when loading fails, the pipeline (and an adapter loaded
    before) is left exactly as it was. While the adapter is loaded, this pipeline's ``encode_image`` normalises
    subject images before its feature extractor sees them (see :mod:`diffusers_customcontrast.loaders.inputs`) and
    gives an adapter trained on other image encoder hidden states than the penultimate those; the image encoder and
    feature extractor themselves are not changed.
    """
    _check_pipeline(pipe)
    unet = pipe.unet
    dtype = kwargs.pop("torch_dtype", None) or unet.dtype
    if isinstance(pretrained_model_name_or_path_or_adapter, CustomContrastAdapter):
        adapter = pretrained_model_name_or_path_or_adapter
    else:
        adapter = load_adapter(pretrained_model_name_or_path_or_adapter, subfolder, weight_name, **kwargs)
    adapter.check_compatible(unet, getattr(pipe, "image_encoder", None))
    injection.check_can_attach(unet, adapter)

    from_files = not isinstance(pretrained_model_name_or_path_or_adapter, CustomContrastAdapter)
    image_encoder = None
    if getattr(pipe, "image_encoder", None) is None and image_encoder_folder is not None and from_files:
        image_encoder = _load_image_encoder(
            pipe, pretrained_model_name_or_path_or_adapter, subfolder, image_encoder_folder, **kwargs
        )
        if image_encoder is not None:
            adapter.check_compatible(unet, image_encoder)

    # Everything is checked: from here on the pipeline changes.
    if image_encoder is not None:
        pipe.register_modules(image_encoder=image_encoder.to(pipe.device))
    _ensure_feature_extractor(pipe)
    # ModelMixin.to warns about fp32-pinned modules whenever a dtype is given, even with none (diffusers 0.42).
    torch.nn.Module.to(adapter, device=_weights_device(pipe), dtype=dtype)
    state = injection.attach(unet, adapter, scale=scale)
    state.num_train_timesteps = _num_train_timesteps(pipe)
    state.cleanups.append(_install_instance_methods(pipe))
    logger.info("Loaded CustomContrast adapter (%d layers) into %s.", adapter.num_layers, type(pipe).__name__)
    return adapter


def unload_customcontrast(pipe: DiffusionPipeline) -> CustomContrastAdapter | None:
    """Remove the CustomContrast adapter; the pipeline computes exactly what it did before loading it.

    The image encoder stays (unlike ``unload_ip_adapter``), so another adapter can be loaded right away.
    Returns the removed adapter, or ``None`` if none was loaded.
    """
    return injection.detach(pipe.unet)


def set_customcontrast_scale(
    pipe: DiffusionPipeline,
    scale: injection.ScaleSpec | None = None,
    s_plus_scale: injection.ScaleSpec | None = None,
    start: float | None = None,
    end: float | None = None,
) -> None:
    """Set how strongly the subject acts: the visual branch (``scale``) and the S+ tokens (``s_plus_scale``), and on
    which denoising steps (``start``, ``end``).

    Each scale takes a float (all layers), an InstantStyle-style per-block dict such as
    ``{"up": {"block_0": [0.0, 1.0, 0.0]}}`` (unnamed blocks get 0), or a list with one value per cross-attention
    layer. ``scale`` values may be per-subject lists when several subject images are given. 0 for both gives exactly
    the base pipeline.

    The subject acts on the UNet calls whose noise level lies in ``[start, end)``, with ``0 <= start < end <= 1``:
    a call at timestep ``t`` sits at ``1 - t / T`` of the training schedule (``T``: the scheduler's
    ``num_train_timesteps``), 0 at pure noise, 1 at the clean image, as ComfyUI's ``start_at`` / ``end_at``
    (:mod:`~diffusers_customcontrast.step_range`, docs/api.md); the other calls are exactly the base model's.

    ``None`` keeps the current value, for every argument (the scales and the range are set independently); at load
    the range is every step.
    """
    injection.set_scale(pipe.unet, scale, s_plus_scale, start, end)


def encode_customcontrast_subjects(
    pipe: DiffusionPipeline,
    subjects: Sequence[Any],
    combine: str = "concat",
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
) -> list[torch.Tensor]:
    """The image encoder's features of each subject, from one photo or several, as ``ip_adapter_image_embeds=`` takes
    them.

    Args:
        pipe: a pipeline with a CustomContrast adapter loaded (its image encoder encodes the photos, as
            ``ip_adapter_image=`` would be).
        subjects: one entry per subject: an image, or a list of photos of that subject (a single image alone is one
            subject). Several subjects are placed as ``ip_adapter_image=[[a, b]]`` places them.
        combine: how several photos make one subject. ``"concat"``: the photos' patch features are concatenated, so
            the adapter's Q-Former queries attend over the patches of all of them (every subject then needs the same
            number of photos). ``"mean"``: the photos' features are averaged patch by patch.
        num_images_per_prompt: rows per subject, as the pipeline's argument of that name.
        do_classifier_free_guidance: also give the negative rows (the features of diffusers' blank image, one per
            photo), first, as the pipeline expects when it guides (``guidance_scale > 1``).

    Returns:
        A list with CustomContrast's entry, ``[(2 x) num_images_per_prompt, num_subjects, tokens, width]``: pass it as
        ``ip_adapter_image_embeds=``. Beside diffusers' IP-Adapters, put it at CustomContrast's place among their
        entries (load order). With one photo per subject it is what the pipeline computes from
        ``ip_adapter_image=``. For an adapter with ``image_input="image_embeds"`` each photo is one token (its pooled
        embedding) and the negative rows are zeros, as diffusers gives that kind of adapter.
    """
    state = injection.loaded(pipe.unet)
    if combine not in ("concat", "mean"):
        raise ValueError(f"combine must be 'concat' or 'mean', got {combine!r}.")
    if (
        not isinstance(num_images_per_prompt, int)
        or isinstance(num_images_per_prompt, bool)
        or num_images_per_prompt < 1
    ):
        raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}.")
    groups = _photo_groups(subjects)
    if combine == "concat" and len({len(group) for group in groups}) > 1:
        raise ValueError(
            "combine='concat' needs the same number of photos for every subject (their features are stacked), got "
            f"{[len(group) for group in groups]}: give each subject as many photos, or use combine='mean'."
        )
    # One batch, as diffusers encodes ip_adapter_image=[[a, b]]: with one photo per subject, the same numbers.
    pooled = state.adapter.adapter_config.image_input == "image_embeds"
    photos, blanks = pipe.encode_image(
        [photo for group in groups for photo in group], pipe._execution_device, 1, not pooled
    )
    if pooled:  # one pooled embedding per photo, as a one-token sequence (the negative: zeros, as diffusers gives)
        photos, blanks = photos[:, None], blanks[:, None]
    sizes = [len(group) for group in groups]

    def per_subject(features: torch.Tensor) -> torch.Tensor:
        merged = [f.flatten(0, 1) if combine == "concat" else f.mean(dim=0) for f in features.split(sizes)]
        return torch.stack(merged)[None].repeat(num_images_per_prompt, 1, 1, 1)

    embeds = per_subject(photos)
    return [torch.cat([per_subject(blanks), embeds]) if do_classifier_free_guidance else embeds]


def _photo_groups(subjects: Any) -> list[list[Any]]:
    """``subjects`` as one list of photos per subject."""
    if not isinstance(subjects, (list, tuple)):
        subjects = [subjects]
    if not subjects:
        raise ValueError("subjects is empty: give one entry per subject, each an image or a list of its photos.")
    groups = [list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in subjects]
    empty = [index for index, group in enumerate(groups) if not group]
    if empty:
        raise ValueError(f"Subject {empty[0]} has no photos: give each subject an image or a non-empty list of them.")
    return groups


@contextmanager
def record_customcontrast(pipe_or_unet: DiffusionPipeline | torch.nn.Module) -> Iterator[SubjectRecording]:
    """Within the block, keep what the adapter computes in each UNet call made by this thread.

    ``recording.steps`` holds one :class:`~diffusers_customcontrast.conditioning.StepRecord` per UNet call, in
    order: its ``tokens`` and ``location_maps`` (layer index -> ``[batch, num_subjects, h, w]`` maps in (0, 1)).
    ``recording.location_maps`` and ``recording.tokens`` are the last call's. Other threads' calls are not recorded.

    A shorthand for passing ``SubjectOptions(recording=SubjectRecording())`` in every call's
    ``cross_attention_kwargs["customcontrast"]``: for the block, a UNet forward pre-hook adds the recording to the
    options of this thread's calls (removed when the block ends).
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    injection.loaded(unet)
    opened = SubjectRecording(unet)
    thread = threading.get_ident()

    def add_recording(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = injection.attached(module)
        if state is None or threading.get_ident() != thread:
            return None
        return injection.with_recording(state, args, kwargs, opened)

    # prepend: the adapter's own pre-hook then finds the recording among the call's options.
    handle = unet.register_forward_pre_hook(add_recording, with_kwargs=True, prepend=True)
    try:
        yield opened
    finally:
        handle.remove()


def _num_train_timesteps(pipe: DiffusionPipeline) -> int:
    """``T`` of the noise position ``1 - t / T`` that step ranges are given in: the pipeline's scheduler's."""
    value = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    return value if isinstance(value, int) and value > 0 else injection.DEFAULT_TRAIN_TIMESTEPS


def _weights_device(pipe: DiffusionPipeline) -> torch.device:
    """Where the adapter's weights go: beside the UNet's, or, when accelerate's sequential offload keeps every UNet
    weight on the meta device, on the device the pipeline computes on."""
    device = next((p.device for p in pipe.unet.parameters() if not p.is_meta), None)
    # diffusers has no public accessor for the device an offloaded pipeline computes on; its pipelines' own
    # __call__ reads this property.
    return device if device is not None else pipe._execution_device


def _encoding_subjects(encode_image: Callable) -> Callable:
    """diffusers' ``encode_image``, as the loading pipeline's own: the input goes through
    :func:`inputs.prepare_subject_images` first, and for an adapter trained on other hidden states of the image
    encoder than the penultimate (``image_feature_layers``), those, concatenated, are the hidden-state features of
    every image adapter of the pipeline (``MultiSubjectImageProjection`` gives diffusers' IP-Adapters their
    penultimate channels back). Only what this method returns differs: the image encoder's other users see its own
    outputs."""

    @functools.wraps(encode_image)
    def wrapper(self, image, device, num_images_per_prompt, output_hidden_states=None):
        image = inputs.prepare_subject_images(image, self.feature_extractor, self.image_encoder)
        state = injection.attached(self.unet)
        layers = state.adapter.adapter_config.image_feature_layers if state is not None else None
        if not output_hidden_states or layers in (None, (-2,)):  # None: the adapter reads pooled image_embeds
            return encode_image(self, image, device, num_images_per_prompt, output_hidden_states)
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=next(self.image_encoder.parameters()).dtype)
        positive, negative = (  # diffusers' negative: the features of an all-zero image
            state.adapter.image_features(self.image_encoder, pixels).repeat_interleave(num_images_per_prompt, dim=0)
            for pixels in (image, torch.zeros_like(image))
        )
        return positive, negative

    return wrapper


def _checking_subject_features(prepare: Callable) -> Callable:
    """diffusers' ``prepare_ip_adapter_image_embeds``, as the loading pipeline's own: the values of CustomContrast's
    entry of what it returns are checked here (:func:`injection.check_feature_values`), once per generation before
    the denoising loop, so that no UNet call reads them on the host."""

    @functools.wraps(prepare)
    def wrapper(self, *args, **kwargs):
        image_embeds = prepare(self, *args, **kwargs)
        state = injection.attached(self.unet)
        if state is not None and isinstance(image_embeds, list) and state.entry_index < len(image_embeds):
            injection.check_feature_values(image_embeds[state.entry_index])
        return image_embeds

    return wrapper


def _beside_ip_adapters(method: Callable) -> Callable:
    """diffusers' ``load_ip_adapter`` or ``unload_ip_adapter``, made to leave CustomContrast loaded.

    diffusers' loading replaces every cross-attention processor and ``encoder_hid_proj``, and its unloading removes
    every IP-Adapter processor (CustomContrast's are ones) and the image encoder. So the method runs on the UNet as it
    is without CustomContrast, which is then put back on top of what it left (:func:`injection.lifted`), with the
    image encoder and feature extractor it uses. Unloading with CustomContrast alone (no IP-Adapter beside it) keeps
    diffusers' meaning, every image adapter off: CustomContrast is then unloaded in full at the next call.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        unet = getattr(self, "unet", None)
        state = injection.attached(unet) if unet is not None else None
        if state is None or (method.__name__ == "unload_ip_adapter" and state.entry_index == 0):
            return method(self, *args, **kwargs)
        kept = {name: getattr(self, name, None) for name in ("image_encoder", "feature_extractor")}
        with injection.lifted(unet):
            result = method(self, *args, **kwargs)
            self.register_modules(**{name: module for name, module in kept.items() if getattr(self, name) is None})
        return result

    return wrapper


_INSTANCE_METHODS: dict[str, Callable[[Callable], Callable]] = {
    "load_ip_adapter": _beside_ip_adapters,
    "unload_ip_adapter": _beside_ip_adapters,
    "encode_image": _encoding_subjects,
    "prepare_ip_adapter_image_embeds": _checking_subject_features,
}
"""The pipeline methods a load shadows on the loading pipeline, and how each is wrapped."""


def _install_instance_methods(pipe: DiffusionPipeline) -> Callable[[], None]:
    """Give ``pipe`` its own ``load_ip_adapter`` / ``unload_ip_adapter`` that keep CustomContrast loaded, its own
    ``encode_image`` that normalises subject images and reads the adapter's image features, and its own
    ``prepare_ip_adapter_image_embeds`` that checks the features' values before the denoising loop; returns the undo.

    Why per instance: diffusers has no extension point around these methods (the first two replace every processor
    and ``encoder_hid_proj``; the third is the only one that sees raw subject images and picks the image encoder's
    hidden state; the fourth is the last step before the loop), and changing a class would change every pipeline in
    the process, loaded or not. The instance attributes shadow the class's methods until unload; a pipeline made with
    ``from_pipe`` has diffusers' own methods (for an adapter with ``image_feature_layers`` other than ``[-2]`` it is
    refused in one sentence until the adapter is loaded on it).
    """
    for name, wrap in _INSTANCE_METHODS.items():
        setattr(pipe, name, types.MethodType(wrap(getattr(type(pipe), name)), pipe))

    def undo() -> None:
        for name in _INSTANCE_METHODS:
            pipe.__dict__.pop(name, None)

    return undo


PIPELINE_METHODS: dict[str, Callable] = {
    "load_customcontrast": load_customcontrast,
    "unload_customcontrast": unload_customcontrast,
    "set_customcontrast_scale": set_customcontrast_scale,
    "encode_customcontrast_subjects": encode_customcontrast_subjects,
}
"""The methods importing the package adds to ``IPAdapterMixin``, and nothing else."""


def register_pipeline_methods() -> None:
    """Make :data:`PIPELINE_METHODS` methods of ``IPAdapterMixin``, so every pipeline that can take a subject (each
    has a UNet) has them, including subclasses defined later; nothing else in diffusers changes (done on import)."""
    for name, method in PIPELINE_METHODS.items():
        setattr(IPAdapterMixin, name, method)
