"""What one UNet call carries for a CustomContrast adapter, and what it gives back.

A pipeline calls the UNet once per denoising step. Before each call the UNet's forward pre-hook
(:mod:`diffusers_customcontrast.loaders.injection`) wraps the call's subject features, timesteps and options into a
:class:`SubjectConditioning` and puts it in this call's ``added_cond_kwargs["image_embeds"]``, the list that diffusers
hands to ``unet.encoder_hid_proj``. There the adapter runs once for all layers and returns the conditioning with
their tokens; diffusers passes it on to every cross-attention processor inside ``encoder_hidden_states``, and each
processor reads its own layer's slice. Nothing about a call is kept on the UNet or the adapter, so calls from several
threads, under ``torch.inference_mode``, behind accelerate's offload hooks or inside ``torch.compile`` cannot see
each other's subject.

Location maps come back explicitly, in the call's own arguments: a :class:`StepRecord` that belongs to one UNet call
(training passes one), or a :class:`SubjectRecording` passed in the call's options (``SubjectOptions(recording=...)``),
which gets one record per UNet call of the generation. Nothing is found through global or context state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models.mfi_encoder import ImageContext, SubjectTokens

__all__ = [
    "OPTIONS_KEY",
    "LayerScale",
    "StepRecord",
    "SubjectConditioning",
    "SubjectOptions",
    "SubjectRecording",
]

LayerScale = float | list[float]  # one value for every subject image, or one per subject

OPTIONS_KEY = "customcontrast"
"""The ``cross_attention_kwargs`` key of a call's :class:`SubjectOptions` (taken out before diffusers sees them)."""


def layer_setting(options: SubjectOptions | None, name: str, layer_index: int) -> Any:
    """One layer's ``scale`` or ``s_plus_scale`` (``name``) in ``options``, one value per layer; 1 where they give none.

    Values equal on every layer (the usual case) are read without the index: torch.compile guards on int attributes,
    so indexing would make diffusers' regional compilation (one graph for every block) recompile for each layer.
    """
    values = getattr(options, name) if options is not None else None
    if values is None:
        return 1.0
    first = values[0]
    return first if all(value == first for value in values) else values[layer_index]


@dataclass(frozen=True)
class SubjectOptions:
    """What a caller gives the UNet calls of one pipeline call, beside the subject features.

    Pass them as ``cross_attention_kwargs={"customcontrast": SubjectOptions(...)}``.

    Attributes:
        scale: ``lambda_l`` of the visual branch, one value per cross-attention layer, overriding the adapter's
            (``set_customcontrast_scale``) for this call only; ``None`` keeps the adapter's.
        s_plus_scale: ``beta_l`` of the S+ tokens, the same way.
        start, end: the step range of this call (fractions of its denoising steps, see
            :mod:`~diffusers_customcontrast.step_range`), overriding the adapter's; ``None`` keeps the adapter's.
        image_context: the timestep-independent half of the encoding of the call's subject features
            (``adapter.encoder.encode_image`` of them, rows batch x subjects), computed once for a generation so
            that each step runs only the other half.
        recording: where each UNet call of the generation puts its :class:`StepRecord` (tokens and location maps),
            or a tuple of them; ``None`` records nothing.

    ``scale`` and ``s_plus_scale`` may be given as ``set_customcontrast_scale`` takes them (a float, a per-block dict
    or a per-layer list); the UNet call checks and expands them to one value per layer before any layer runs.
    """

    scale: Any = None
    s_plus_scale: Any = None
    start: float | None = None
    end: float | None = None
    image_context: ImageContext | None = None
    recording: SubjectRecording | tuple[SubjectRecording, ...] | None = None

    @property
    def recordings(self) -> tuple[SubjectRecording, ...]:
        """``recording`` as a tuple (empty for none)."""
        if self.recording is None:
            return ()
        return self.recording if isinstance(self.recording, tuple) else (self.recording,)


@dataclass
class StepRecord:
    """What the adapter computed in one UNet call.

    ``tokens``: every layer's tokens of the call's subject images (rows: batch x subjects); ``location_maps``: layer
    index -> ``[batch, num_subjects, h, w]`` maps in (0, 1), for the layers that computed one (none where user masks
    gate the subjects).
    """

    timesteps: torch.Tensor | None = None
    tokens: SubjectTokens | None = None
    location_maps: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class SubjectRecording:
    """The :class:`StepRecord` of every UNet call it was passed to (``SubjectOptions(recording=...)``), in call order.

    ``unet`` is informative (the UNet :func:`~diffusers_customcontrast.record_customcontrast` opened it for).
    """

    unet: nn.Module | None = None
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def location_maps(self) -> dict[int, torch.Tensor]:
        """The location maps of the last call (empty before the first)."""
        return self.steps[-1].location_maps if self.steps else {}

    @property
    def tokens(self) -> SubjectTokens | None:
        """The tokens of the last call."""
        return self.steps[-1].tokens if self.steps else None


@dataclass
class SubjectConditioning:
    """One UNet call's subject for a CustomContrast adapter: what its processors read.

    A pipeline gives subject features (``image_embeds``); training gives the tokens the adapter computed
    (``tokens``, with gradients). The UNet's pre-hook fills in the rest from the call's own arguments.

    Attributes:
        image_embeds: ``[batch, num_subjects, tokens, image_embed_dim]`` CLIP features of the subject images, one
            row per prompt row of the call (the negative rows first under classifier-free guidance).
        timesteps: ``[batch]``, the call's timestep of each row.
        tokens: every layer's tokens, rows ``batch x num_subjects`` (row ``b * num_subjects + k``: subject ``k`` of
            prompt row ``b``); computed by the adapter's image projection when not given.
        num_subjects: subject images per prompt row.
        sample_size: the latent's ``(height, width)``, to lay location maps out as images.
        options: this call's :class:`SubjectOptions`.
        record: where this call's tokens and location maps go, if anywhere.
        active: whether the subject acts in this call; ``False`` outside its step range, where the adapter does not
            run and every layer computes what the base model computes.
    """

    image_embeds: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    tokens: SubjectTokens | None = None
    num_subjects: int = 1
    sample_size: tuple[int, int] | None = None
    options: SubjectOptions | None = None
    record: StepRecord | None = None
    active: bool = True

    def with_tokens(self, tokens: SubjectTokens) -> SubjectConditioning:
        """The same call with ``tokens`` computed."""
        if self.record is not None:
            self.record.tokens = tokens
        return dataclasses.replace(self, tokens=tokens)

    def layer_tokens(self, layer_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's S+ and visual tokens, each ``[batch, num_subjects, Ns, D]``.

        ``layer_index`` is a one-element tensor, not an int: torch.compile guards on ints, and one graph for every
        layer (diffusers' regional compilation) needs the index to be data.
        """
        index = layer_index.to(self.tokens.s_plus.device)
        s_plus, visual = (t.index_select(1, index).squeeze(1) for t in (self.tokens.s_plus, self.tokens.visual))
        return s_plus.unflatten(0, (-1, self.num_subjects)), visual.unflatten(0, (-1, self.num_subjects))

    def layer_scales(self, layer_index: int) -> tuple[LayerScale, float]:
        """The layer's ``(lambda_l, beta_l)`` for this call: its options' (which the UNet's pre-hook completes with the
        adapter's settings), 1 where they give none (a processor called without the pre-hook)."""
        scale = layer_setting(self.options, "scale", layer_index)
        return scale, layer_setting(self.options, "s_plus_scale", layer_index)

    def record_location(self, layer_index: int, maps: torch.Tensor) -> None:
        """Keep one layer's ``[batch, num_subjects, N]`` maps as ``[batch, num_subjects, h, w]`` in the record."""
        if self.record is None:
            return
        h, w = self.feature_map_size(maps.shape[-1])
        self.record.location_maps[layer_index] = maps.reshape(*maps.shape[:2], h, w)

    def feature_map_size(self, num_pixels: int) -> tuple[int, int]:
        """The ``(h, w)`` of a layer's feature map with ``num_pixels`` positions, from the latent's aspect ratio."""
        if self.sample_size is None:
            side = math.isqrt(num_pixels)
            return side, num_pixels // side
        height, width = self.sample_size
        factor = math.sqrt(height * width / num_pixels)
        h = max(1, round(height / factor))
        return h, num_pixels // h
