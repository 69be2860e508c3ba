"""The adapter's image side as an entry of ``unet.encoder_hid_proj``, where diffusers' pipelines feed subject images."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from torch import nn

from ..conditioning import SubjectConditioning
from ..models.mfi_encoder import MFIEncoder


class CustomContrastImageProjection(nn.Module):
    """One UNet call's subject features in, every cross-attention layer's tokens for that call out.

    The UNet calls ``encoder_hid_proj`` once per forward; its pre-hook has wrapped this call's features and
    timesteps into a :class:`~diffusers_customcontrast.conditioning.SubjectConditioning`. This runs the MFI encoder
    once for all layers and subjects (only its timestep-dependent half when the call's options carry the image
    context) and returns the conditioning with the tokens, which diffusers hands on to the attention processors.
    Tokens given with the call (training computes them with the adapter itself) pass through.
    """

    def __init__(self, encoder: MFIEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, conditioning: SubjectConditioning) -> SubjectConditioning:
        if conditioning.tokens is not None or not conditioning.active:  # given, or outside the step range
            return conditioning
        features = conditioning.image_embeds.flatten(0, 1)  # rows: batch x subjects
        timesteps = conditioning.timesteps.repeat_interleave(conditioning.num_subjects)
        image_context = conditioning.options.image_context if conditioning.options is not None else None
        return conditioning.with_tokens(self.encoder(features, timesteps, image_context=image_context))


class PooledCustomContrastImageProjection(CustomContrastImageProjection, ImageProjection):
    """:class:`CustomContrastImageProjection` of an adapter that reads CLIP's pooled image embedding
    (``image_input="image_embeds"``).

    An ``ImageProjection`` by class only: diffusers' pipelines choose what to encode for each entry of
    ``encoder_hid_proj`` with ``isinstance(layer, ImageProjection)`` (pooled ``image_embeds``, with zeros as the
    negative, the inputs of plain IP-Adapter); no other test tells them. It holds none of ``ImageProjection``'s layers
    and computes what :class:`CustomContrastImageProjection` computes.
    """

    def __init__(self, encoder: MFIEncoder) -> None:
        nn.Module.__init__(self)  # not ImageProjection's __init__, which would build a projection of its own
        self.encoder = encoder


def image_projection(encoder: MFIEncoder, image_input: str) -> CustomContrastImageProjection:
    """The ``encoder_hid_proj`` entry for an adapter's MFI encoder: one that makes pipelines compute the adapter's
    ``image_input`` (its config's field)."""
    if image_input == "image_embeds":
        return PooledCustomContrastImageProjection(encoder)
    return CustomContrastImageProjection(encoder)


class MultiSubjectImageProjection(MultiIPAdapterImageProjection):
    """``unet.encoder_hid_proj`` while a CustomContrast adapter is loaded: diffusers' list of image projections (one
    per adapter, in load order; pipelines read it to encode ``ip_adapter_image``), each given its own entry of the
    call's ``image_embeds``: CustomContrast's as it stands, a :class:`~diffusers_customcontrast.conditioning.
    SubjectConditioning`; a diffusers IP-Adapter's (``[batch, num_images, ...]``) as ``MultiIPAdapterImageProjection``
    gives it, one image at a time.

    ``ip_adapter_features``: for an adapter that reads several hidden states of the image encoder (which
    the loading pipeline's ``encode_image`` hands every image adapter in place of the penultimate one), the channels
    of the penultimate hidden state in them: diffusers' IP-Adapters beside it get those back.
    """

    def __init__(self, layers: list[nn.Module], ip_adapter_features: slice | None = None) -> None:
        super().__init__(layers)
        self.ip_adapter_features = ip_adapter_features

    def forward(self, image_embeds: list) -> list:
        return [
            layer(embeds)
            if isinstance(embeds, SubjectConditioning)
            else layer(self._own_features(embeds).flatten(0, 1)).unflatten(0, embeds.shape[:2])
            for layer, embeds in zip(self.image_projection_layers, image_embeds, strict=True)
        ]

    def _own_features(self, embeds: torch.Tensor) -> torch.Tensor:
        """An IP-Adapter's entry as its own projection reads it: the penultimate hidden state's channels of
        concatenated hidden states (pooled embeddings, 3-D, pass as they are)."""
        part = self.ip_adapter_features
        if part is None or embeds.ndim != 4 or embeds.shape[-1] < part.stop:
            return embeds
        return embeds[..., part]
