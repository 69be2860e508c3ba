"""Friendlier pipeline arguments for CustomContrast, shared by the community pipelines in ``pipelines/``.

``pipe(prompt, subject_image=..., subject_scale=..., subject_start=..., subject_masks=..., return_location_maps=True)``
instead of ``ip_adapter_image=`` and ``cross_attention_kwargs={"ip_adapter_masks": ...}``, with the timestep location
maps of every step returned for inspection (like the paper's figure of location maps over the sampling steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.utils import BaseOutput
from PIL import Image

from .conditioning import OPTIONS_KEY, StepRecord, SubjectRecording
from .loaders import injection


@dataclass
class CustomContrastPipelineOutput(BaseOutput):
    """The pipeline's images, and with ``return_location_maps`` one ``[batch, num_subjects, h, w]`` map per step.

    Each step's map is the mean over the cross-attention layers, resized to the latent resolution.
    """

    images: list[Image.Image] | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    location_maps: list[torch.Tensor] | None = None


def mean_location_map(step: StepRecord) -> torch.Tensor:
    """The layer-mean of one UNet call's location maps, at the largest layer's resolution."""
    maps = list(step.location_maps.values())
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    resized = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.stack(resized).mean(dim=0).cpu()


class CustomContrastPipelineMixin:
    """Adds ``subject_image``, ``subject_scale``, ``s_plus_scale``, ``subject_start``, ``subject_end``,
    ``subject_masks`` and ``return_location_maps``.

    Mix it in before a diffusers pipeline class with ``IPAdapterMixin``. Scales and a step range given to a call apply
    to that call only (they travel with its UNet calls; the pipeline's own are not touched, so threads sharing the
    pipeline do not see them). ``subject_start`` / ``subject_end`` are fractions of the call's denoising steps, as
    ``set_customcontrast_scale``'s ``start`` / ``end``; one left out is the pipeline's.
    """

    def __call__(
        self,
        *args,
        subject_image: Image.Image | list[Image.Image] | None = None,
        subject_scale: injection.ScaleSpec | None = None,
        s_plus_scale: injection.ScaleSpec | None = None,
        subject_start: float | None = None,
        subject_end: float | None = None,
        subject_masks: list[Image.Image] | torch.Tensor | None = None,
        return_location_maps: bool = False,
        **kwargs,
    ) -> CustomContrastPipelineOutput:
        if injection.attached(self.unet) is None and (subject_image is not None or return_location_maps):
            raise ValueError("Load an adapter first: pipe.load_customcontrast(...).")
        if subject_image is not None:
            kwargs["ip_adapter_image"] = [list(subject_image)] if isinstance(subject_image, list) else subject_image
        extra = {}
        if subject_masks is not None:
            extra["ip_adapter_masks"] = [self._subject_mask_tensor(subject_masks, kwargs)]
        per_call = (subject_scale, s_plus_scale, subject_start, subject_end)
        recording = SubjectRecording(self.unet) if return_location_maps else None
        if recording is not None or any(option is not None for option in per_call):
            extra[OPTIONS_KEY] = injection.subject_options(self.unet, *per_call, recording=recording)
        if extra:
            kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}), **extra}

        output = super().__call__(*args, **kwargs)
        maps = [mean_location_map(step) for step in recording.steps if step.location_maps] if recording else None

        images, nsfw = (
            (output[0], output[1] if len(output) > 1 else None)
            if isinstance(output, tuple)
            else (
                output.images,
                getattr(output, "nsfw_content_detected", None),
            )
        )
        return CustomContrastPipelineOutput(images=images, nsfw_content_detected=nsfw, location_maps=maps or None)

    def _subject_mask_tensor(self, masks: list[Image.Image] | torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``[1, num_subjects, H, W]`` masks at the output resolution."""
        if torch.is_tensor(masks):
            return masks if masks.ndim == 4 else masks.reshape(1, -1, *masks.shape[-2:])
        height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
        processed = IPAdapterMaskProcessor().preprocess(list(masks), height=height, width=width)
        return processed.reshape(1, len(masks), height, width)
