"""Metrics made for the synthetic world: subject similarity and prompt controllability, with known ground truth.

They play the roles DINO / CLIP-I and CLIP-T play on DreamBench:

* **Subject similarity** (:class:`SubjectGallery`): the cosine similarity between a generated image and the mean
  embedding of the subject's real frames, in the space of the :class:`~customcontrast_world.judge.
  WorldJudge`, which was trained on the train subjects' scenes to tell subjects apart across views, backgrounds
  and lighting, so it measures identity, not scene. **Identity accuracy** is the stricter twin: the fraction of
  generations whose nearest subject in the gallery is the right one. The judge's classifiers also say which
  intrinsic attribute came through: shape, texture, colour.
* **Controllability** (:func:`scene_obeyed`): whether the scene attribute the prompt names is in the image: the
  prompted background for photos (:func:`~customcontrast_world.evaluate_base.nearest_background`, right
  on 100 % of the world's photo frames), no colour for "a sketch of ..." (:func:`is_sketch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .dataset import World
from .evaluate_base import nearest_background
from .judge import WorldJudge

__all__ = [
    "SKETCH_MAX_CHROMA",
    "SubjectGallery",
    "chroma",
    "is_sketch",
    "scene_obeyed",
]

SKETCH_MAX_CHROMA = 12.0
"""Mean chroma (max - min of R, G, B, on 0-255) below which an image counts as a sketch. The world's sketches have
chroma 0; its photos have 2.5 (a grey subject on the gray background, dimly lit) to 180, and at least 35 on every
background but gray and snow. A coloured subject kept in colour inside a sketch lifts the mean far above 12."""


def chroma(image: Image.Image | np.ndarray) -> float:
    """Mean chroma of an image: how far its pixels are from grey, on the 0-255 scale."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return float((pixels.max(axis=-1) - pixels.min(axis=-1)).mean())


def is_sketch(image: Image.Image | np.ndarray) -> bool:
    """Whether an image is a colourless sketch (mean :func:`chroma` below :data:`SKETCH_MAX_CHROMA`)."""
    return chroma(image) < SKETCH_MAX_CHROMA


def scene_obeyed(image: Image.Image | np.ndarray, background: str, style: str = "photo") -> bool:
    """Whether ``image`` shows the prompted scene: a sketch when ``style == "sketch"``, else ``background``."""
    if style == "sketch":
        return is_sketch(image)
    return nearest_background(image) == background


@dataclass
class SubjectGallery:
    """The identity of each subject of a split: the normalised mean embedding of its real photo frames.

    Sketch frames are left out (they show no colour). ``exclude_frames`` leaves out frames by position, e.g. the
    reference frame 0, so that a copy of the reference is not what scores best.
    """

    subject_ids: tuple[str, ...]
    embeddings: torch.Tensor

    @classmethod
    def from_world(
        cls, world: World, judge: WorldJudge, split: str = "heldout", exclude_frames: Sequence[int] = (0,)
    ) -> SubjectGallery:
        subject_ids = world.splits[split]
        means = []
        for subject_id in subject_ids:
            frames = [
                f
                for position, f in enumerate(world.frames(subject_id))
                if position not in exclude_frames and f.view.style == "photo"
            ]
            if not frames:
                raise ValueError(f"subject {subject_id!r} has no photo frame outside frames {list(exclude_frames)}")
            means.append(judge.judge([Image.open(f.image_path) for f in frames])[0].mean(dim=0))
        return cls(tuple(subject_ids), torch.nn.functional.normalize(torch.stack(means), dim=-1))

    def _rows(self, subject_ids: Sequence[str]) -> torch.Tensor:
        position = {sid: i for i, sid in enumerate(self.subject_ids)}
        unknown = sorted(set(subject_ids) - position.keys())
        if unknown:
            raise KeyError(f"subjects not in the gallery: {unknown[:5]}")
        return torch.tensor([position[sid] for sid in subject_ids])

    def similarity(self, embeddings: torch.Tensor, subject_ids: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each embedding to its own subject's identity, ``[len(subject_ids)]``."""
        return (embeddings * self.embeddings[self._rows(subject_ids)]).sum(dim=-1)

    def identified(self, embeddings: torch.Tensor, subject_ids: Sequence[str]) -> torch.Tensor:
        """Whether each embedding's nearest identity in the gallery is its own subject's (bool tensor)."""
        nearest = (embeddings @ self.embeddings.T).argmax(dim=-1)
        return nearest == self._rows(subject_ids)
