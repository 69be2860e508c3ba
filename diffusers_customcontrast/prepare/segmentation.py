"""Segmenting the subject in its box: SAM through transformers' ``SamModel`` and ``SamProcessor``.

Anything with the :class:`BoxSegmenter` call works in place of :class:`SamSegmenter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image


class BoxSegmenter(Protocol):
    """Segments the object inside a box of each image."""

    def __call__(
        self, images: Sequence[Image.Image], boxes: Sequence[tuple[float, float, float, float]]
    ) -> list[np.ndarray]:
        """A boolean mask (``height x width``) per image, of the object in its box ``(xmin, ymin, xmax, ymax)``."""


class SamSegmenter:
    """SAM prompted with one box per image (a single mask per box: a box leaves little ambiguity).

    Args:
        model: A transformers ``SamModel`` (in eval mode, on its device and dtype).
        processor: Its ``SamProcessor``.
    """

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, model: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> SamSegmenter:
        """Load SAM ``model`` (hub id or folder, e.g. ``facebook/sam-vit-base``) on ``device``."""
        from transformers import SamModel, SamProcessor

        loaded = SamModel.from_pretrained(model, dtype=dtype).to(device or "cpu").eval()
        return cls(loaded, SamProcessor.from_pretrained(model))

    @torch.no_grad()
    def __call__(
        self, images: Sequence[Image.Image], boxes: Sequence[tuple[float, float, float, float]]
    ) -> list[np.ndarray]:
        inputs = self.processor(images=list(images), input_boxes=[[list(box)] for box in boxes], return_tensors="pt")
        parameter = next(self.model.parameters())
        model_inputs = {
            name: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()
            if name in ("pixel_values", "input_boxes")
        }
        outputs = self.model(**model_inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        return [mask[0, 0].numpy().astype(bool) for mask in masks]
