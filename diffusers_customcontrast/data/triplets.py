"""The training dataset of CustomContrast: one (reference, positive, target) frame triplet per subject.

Paper figure 2b (right) and DESIGN.md section 4: for a subject the sample holds

* the **reference** frame j, segmented on white and cropped to the subject: the image the adapter encodes;
* the **positive** frame i, another view of the same subject, segmented and augmented (random scale, position
  and horizontal flip): the positive of the contrastive losses (MACL);
* the **target** frame k, the full scene, with its mask and caption: what the diffusion loss reconstructs. It is
  a different frame than j whenever the subject has two (the cross-differential setting), so that the model
  cannot copy the reference's pose and background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .formats import Frame, SubjectIndex, load_subjects
from .transforms import (
    binarize_mask,
    image_to_tensor,
    mask_to_tensor,
    place_on_canvas,
    resize_center_crop,
    subject_crop,
)


@dataclass(frozen=True)
class TripletDraw:
    """The random choices behind one item (frame positions within the subject and the positive's augmentation)."""

    reference: int
    positive: int
    target: int
    positive_scale: float
    positive_position: tuple[float, float]
    positive_flip: bool


class SubjectTripletDataset(Dataset):
    """One item per subject: reference / positive / target frames of that subject (see the module docstring).

    Args:
        source: A :class:`~diffusers_customcontrast.data.SubjectIndex` or anything
            :func:`~diffusers_customcontrast.data.load_subjects` accepts (folder, ``.jsonl`` manifest,
            ``datasets.Dataset``); for custom ``datasets`` column names, pass ``load_hf_subjects(...)``'s index.
        resolution: Side of the target image and mask.
        reference_size: Side of the reference and positive images.
        self_reconstruction: Use the reference frame as positive and target too (the IP-Adapter training regime,
            a baseline of the paper) instead of other frames.
        seed: Base seed of all random choices.
        reference_margin: Margin around the subject's mask box in the reference / positive crops, as a fraction
            of the box's longer side.
        positive_scale: Range of the positive's size as a fraction of ``reference_size``.
        positive_flip_prob: Probability of mirroring the positive.

    Determinism: item ``index`` of epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e, index])``, so it
    does not depend on the order of access, the worker that loads it, or a resume. Call :meth:`set_epoch` at the
    start of every epoch (accelerate's prepared DataLoader does it for the dataset). The epoch is kept in shared
    memory, so persistent DataLoader workers see it change.

    Indices past ``len(self)`` are further draws of the same subjects: index ``s + r * len(self)`` is draw ``r``
    of subject ``s``. :class:`~diffusers_customcontrast.data.UniqueSubjectBatchSampler` uses them when a subject
    appears several times per epoch, so that its repeats are not identical samples.

    Items are dicts: ``reference`` and ``positive`` ``[3, reference_size, reference_size]`` float in [0, 1] (white
    background), ``target`` ``[3, resolution, resolution]`` float in [-1, 1], ``target_mask``
    ``[1, resolution, resolution]`` float in {0, 1} (zeros when the target frame has no mask), ``has_mask`` bool
    tensor, ``frame_indices`` long tensor (reference, positive, target positions in the subject's frames),
    ``caption`` (the target's), ``class_name``, ``subject_id`` (str) and ``subject_index`` (int).
    """

    def __init__(
        self,
        source: Any,
        resolution: int = 512,
        reference_size: int = 224,
        self_reconstruction: bool = False,
        seed: int = 0,
        reference_margin: float = 0.1,
        positive_scale: tuple[float, float] = (0.5, 1.0),
        positive_flip_prob: float = 0.5,
    ):
        if resolution <= 0 or reference_size <= 0:
            raise ValueError(f"expected positive sizes, got resolution={resolution}, reference_size={reference_size}")
        low, high = positive_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"expected 0 < positive_scale[0] <= positive_scale[1] <= 1, got {positive_scale}")
        self.index: SubjectIndex = load_subjects(source)
        self.resolution = resolution
        self.reference_size = reference_size
        self.self_reconstruction = self_reconstruction
        self.seed = seed
        self.reference_margin = reference_margin
        self.positive_scale = (float(low), float(high))
        self.positive_flip_prob = positive_flip_prob
        # A shared-memory scalar rather than an int: DataLoader workers (persistent ones included) hold a copy
        # of the dataset, and only shared memory lets set_epoch in the main process reach them.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    # ---------------------------------------------------------------------------------------------------------
    # Epoch and random draws
    # ---------------------------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws the items use."""
        if epoch < 0:
            raise ValueError(f"expected a non-negative epoch, got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def draw(self, index: int) -> TripletDraw:
        """The random choices of item ``index`` at the current epoch (frames and positive augmentation)."""
        if index < 0:
            raise IndexError(f"expected a non-negative index, got {index}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        num_frames = len(self.index.frames_at(index % len(self)))
        reference = int(rng.integers(num_frames))
        if self.self_reconstruction or num_frames == 1:
            positive = target = reference
        else:
            # Offsets in [1, num_frames) pick uniformly among the frames other than the reference.
            target = (reference + 1 + int(rng.integers(num_frames - 1))) % num_frames
            positive = (reference + 1 + int(rng.integers(num_frames - 1))) % num_frames
        scale = float(rng.uniform(*self.positive_scale))
        position = (float(rng.random()), float(rng.random()))
        flip = bool(rng.random() < self.positive_flip_prob)
        return TripletDraw(reference, positive, target, scale, position, flip)

    # ---------------------------------------------------------------------------------------------------------
    # Items
    # ---------------------------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        draw = self.draw(index)
        subject_index = index % len(self)
        subject_id = self.index.subject_ids[subject_index]
        frames = self.index[subject_id]
        decoded = {k: _decode(frames[k]) for k in {draw.reference, draw.positive, draw.target}}

        reference_view = subject_crop(*decoded[draw.reference], margin=self.reference_margin)
        positive_view = subject_crop(*decoded[draw.positive], margin=self.reference_margin)
        target_image, target_mask = decoded[draw.target]
        target_frame = frames[draw.target]
        return {
            "reference": image_to_tensor(reference_view.resize((self.reference_size,) * 2, Image.Resampling.BICUBIC)),
            "positive": image_to_tensor(
                place_on_canvas(
                    positive_view, self.reference_size, draw.positive_scale, draw.positive_position, draw.positive_flip
                )
            ),
            "target": image_to_tensor(resize_center_crop(target_image, self.resolution)).mul_(2.0).sub_(1.0),
            "target_mask": mask_to_tensor(self._target_mask(target_mask)),
            "has_mask": torch.tensor(target_mask is not None),
            "frame_indices": torch.tensor([draw.reference, draw.positive, draw.target], dtype=torch.long),
            "caption": target_frame.caption,
            "class_name": target_frame.class_name,
            "subject_id": subject_id,
            "subject_index": subject_index,
        }

    def _target_mask(self, mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            return np.zeros((self.resolution, self.resolution), dtype=bool)
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
        return binarize_mask(
            resize_center_crop(mask_image, self.resolution, Image.Resampling.BILINEAR), (self.resolution,) * 2
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_subjects={len(self)}, num_frames={self.index.num_frames}, "
            f"resolution={self.resolution}, reference_size={self.reference_size}, "
            f"self_reconstruction={self.self_reconstruction}, seed={self.seed}, epoch={self.epoch})"
        )


def _decode(frame: Frame) -> tuple[Image.Image, np.ndarray | None]:
    """RGB image and boolean mask (at the image's size) of a frame."""
    image = frame.load_image()
    mask = frame.load_mask()
    return image, (binarize_mask(mask, image.size) if mask is not None else None)


def collate_triplets(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of :class:`SubjectTripletDataset`: tensors stacked along a new first dimension, integers
    (``subject_index``) as a long tensor, strings (``caption``, ``class_name``, ``subject_id``) kept as lists."""
    if not items:
        raise ValueError("expected at least one item to collate, got none")
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, int) and not isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch
