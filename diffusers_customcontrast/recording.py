"""What the adapter computed during a UNet forward, kept for the training losses and for inspection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .models.mfi_encoder import SubjectTokens


@dataclass
class SubjectRecorder:
    """Shared by the image projection and the attention processors of one loaded adapter.

    While ``active``, the image projection stores the reference image's :class:`SubjectTokens` and each processor
    stores its location maps, keyed by layer index, as ``[B, num_subjects, h, w]`` tensors. Inactive (the default
    at inference) it costs nothing.
    """

    active: bool = False
    tokens: SubjectTokens | None = None
    location_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    sample_size: tuple[int, int] | None = None  # latent (height, width) of the current UNet call

    def clear(self) -> None:
        self.tokens = None
        self.location_maps = {}

    def feature_map_size(self, num_pixels: int) -> tuple[int, int]:
        """The (h, w) of a layer's feature map with ``num_pixels`` positions, from the latent's aspect ratio."""
        if self.sample_size is None:
            side = math.isqrt(num_pixels)
            return side, num_pixels // side
        height, width = self.sample_size
        factor = math.sqrt(height * width / num_pixels)
        h = max(1, round(height / factor))
        return h, num_pixels // h

    def record_location(self, layer_index: int, maps: torch.Tensor) -> None:
        """Store ``[B, num_subjects, N]`` maps of one layer as ``[B, num_subjects, h, w]``."""
        h, w = self.feature_map_size(maps.shape[-1])
        self.location_maps[layer_index] = maps.reshape(*maps.shape[:2], h, w)
