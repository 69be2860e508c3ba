"""Finding the subject: an open-vocabulary detector given the class name.

:class:`ZeroShotDetector` wraps transformers' ``zero-shot-object-detection`` pipeline, so any model it takes works
(OWLv2, OWL-ViT, Grounding DINO, OmDet-Turbo). Anything with the :class:`Detector` call works in its place (a test's
stand-in, another library's detector).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image


@dataclass(frozen=True)
class Detection:
    """The subject's box in pixels, ``(xmin, ymin, xmax, ymax)`` within the image, and its detector score."""

    box: tuple[float, float, float, float]
    score: float


class Detector(Protocol):
    """Finds the subject a text prompt names in each image."""

    def __call__(self, images: Sequence[Image.Image], prompt: str) -> list[Detection | None]:
        """The best detection of ``prompt`` in each image, or ``None`` where there is none."""


class ZeroShotDetector:
    """The highest-scoring box for a prompt, from a ``zero-shot-object-detection`` pipeline.

    Args:
        pipeline: A transformers ``ZeroShotObjectDetectionPipeline``.
        threshold: Detections scoring below this are ignored.
    """

    def __init__(self, pipeline: Any, threshold: float = 0.1):
        self.pipeline = pipeline
        self.threshold = threshold

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        threshold: float = 0.1,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ZeroShotDetector:
        """Load the detector ``model`` (hub id or folder) into a pipeline on ``device``."""
        from transformers import pipeline

        return cls(pipeline("zero-shot-object-detection", model=model, device=device, dtype=dtype), threshold)

    def __call__(self, images: Sequence[Image.Image], prompt: str) -> list[Detection | None]:
        inputs = [{"image": image, "candidate_labels": [prompt]} for image in images]
        outputs = self.pipeline(inputs, threshold=self.threshold)
        return [_best(found, image.size) for found, image in zip(outputs, images)]


def _best(found: list[dict[str, Any]], size: tuple[int, int]) -> Detection | None:
    """The highest-scoring detection whose box, clipped to the image, has an area."""
    width, height = size
    best = None
    for detection in found:
        box = detection["box"]
        xmin, xmax = max(0.0, float(box["xmin"])), min(float(width), float(box["xmax"]))
        ymin, ymax = max(0.0, float(box["ymin"])), min(float(height), float(box["ymax"]))
        if xmax - xmin < 1 or ymax - ymin < 1:
            continue
        if best is None or detection["score"] > best.score:
            best = Detection((xmin, ymin, xmax, ymax), float(detection["score"]))
    return best
