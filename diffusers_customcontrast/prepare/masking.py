"""Subject masks of a subject's frames: the :class:`SubjectMasker` interface and its two implementations.

* :class:`DetectSegmentMasker`: an open-vocabulary detector finds the box of the class name, a promptable segmenter
  (SAM) segments the box (the default: it works for any class noun);
* :class:`LabelSegmentationMasker`: a semantic segmenter's segments whose label names the subject (e.g. ``person``
  for the human domain with an ADE20K model).

A test, or another tool, can give ``prepare_dataset`` any callable with the :class:`SubjectMasker` signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .config import PrepareConfig
from .detection import Detector, ZeroShotDetector
from .segmentation import BoxSegmenter, SamSegmenter


@dataclass(frozen=True)
class SubjectMask:
    """A boolean subject mask (``height x width`` of its frame) and the confidence it came with."""

    mask: np.ndarray
    score: float


class SubjectMasker(Protocol):
    """Masks the subject of class ``class_name`` in each frame."""

    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[SubjectMask | None]:
        """One mask per image, or ``None`` where the subject was not found."""


class DetectSegmentMasker:
    """Detector box for ``prompt`` (``{class_name}`` filled in), then the segmenter's mask inside that box.

    A frame where the detector finds nothing, or the segmenter returns an empty mask, gets ``None``.
    """

    def __init__(self, detector: Detector, segmenter: BoxSegmenter, prompt: str = "a photo of a {class_name}"):
        self.detector = detector
        self.segmenter = segmenter
        self.prompt = prompt

    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[SubjectMask | None]:
        detections = self.detector(images, self.prompt.replace("{class_name}", class_name))
        found = [i for i, detection in enumerate(detections) if detection is not None]
        results: list[SubjectMask | None] = [None] * len(images)
        if found:
            masks = self.segmenter([images[i] for i in found], [detections[i].box for i in found])
            for i, mask in zip(found, masks):
                results[i] = SubjectMask(mask, detections[i].score) if mask.any() else None
        return results


class LabelSegmentationMasker:
    """The union of an ``image-segmentation`` pipeline's segments whose label is one of ``labels``.

    Args:
        pipeline: A transformers ``ImageSegmentationPipeline``.
        labels: Labels that make the mask (compared case-insensitively); ``None``: the class name.
    """

    def __init__(self, pipeline: Any, labels: Sequence[str] | None = None):
        self.pipeline = pipeline
        self.labels = [label.lower() for label in labels] if labels else None

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        labels: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LabelSegmentationMasker:
        """Load the segmenter ``model`` (hub id or folder) into an ``image-segmentation`` pipeline on ``device``."""
        from transformers import pipeline

        return cls(pipeline("image-segmentation", model=model, device=device, dtype=dtype), labels)

    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[SubjectMask | None]:
        wanted = self.labels or [class_name.lower()]
        results: list[SubjectMask | None] = []
        for image, segments in zip(images, self.pipeline(list(images))):
            mask = np.zeros((image.height, image.width), dtype=bool)
            scores = []
            for segment in segments:
                if str(segment["label"]).lower() in wanted:
                    mask |= np.asarray(segment["mask"].convert("L")) > 127
                    scores.append(1.0 if segment.get("score") is None else float(segment["score"]))
            results.append(SubjectMask(mask, max(scores)) if mask.any() else None)
        return results


def build_masker(
    config: PrepareConfig, device: str | torch.device | None, dtype: torch.dtype | None
) -> SubjectMasker | None:
    """The masker ``config.masker`` names, with its models loaded on ``device`` (``None`` for ``masker="none"``)."""
    if config.masker == "none":
        return None
    if config.masker == "segmentation":
        return LabelSegmentationMasker.from_pretrained(
            config.segmentation_model, config.segmentation_labels, device=device, dtype=dtype
        )
    detector = ZeroShotDetector.from_pretrained(
        config.detector, config.detection_threshold, device=device, dtype=dtype
    )
    segmenter = SamSegmenter.from_pretrained(config.segmenter, device=device, dtype=dtype)
    return DetectSegmentMasker(detector, segmenter, config.detector_prompt)
