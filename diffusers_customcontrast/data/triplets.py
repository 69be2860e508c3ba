"""The training dataset of CustomContrast: one (reference, positive, target) frame triplet per subject.

Paper figure 2b (right), docs/method.md: for a subject the sample holds

* the **reference** frame j, segmented on white and cropped to the subject: the image the adapter encodes;
* the **positive** frame i, another view of the same subject, segmented and augmented (random scale, position
  and horizontal flip): the positive of the contrastive losses (MACL);
* the **target** frame k, the full scene, with its mask and caption: what the diffusion loss reconstructs. It is
  a different frame than j whenever the subject has two (the cross-differential setting), so that the model
  cannot copy the reference's pose and background.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .formats import Frame, ImageReadError, ImageSource, SubjectIndex
from .sources import load_subjects
from .transforms import (
    binarize_mask,
    image_to_tensor,
    mask_to_tensor,
    place_on_canvas,
    resize_center_crop,
    subject_crop,
)

MIN_IMAGE_SIDE = 8
"""Frames whose shorter side is below this many pixels are unusable (upscaled to the resolution, they hold no detail)."""


class UnusableFrameError(ValueError):
    """A frame was read but cannot be trained on: an empty mask, or a tiny image. The message names the file."""


class BadDataError(RuntimeError):
    """The training data gives no usable sample: every sample tried in a row was unreadable or unusable."""


SKIPPED_ERRORS = (ImageReadError, UnusableFrameError)
"""Errors of one sample that :meth:`SubjectTripletDataset.__getitems__` skips (any other error is raised)."""


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
        min_image_side: Frames with a shorter side below this many pixels are unusable.
        max_consecutive_bad_samples: :meth:`__getitems__` gives up (:class:`BadDataError`) after this many unusable
            samples in a row for one batch slot.

    Unusable samples: an item whose frames cannot be read (:class:`~diffusers_customcontrast.data.ImageReadError`:
    corrupt or truncated file, missing file) or used (:class:`UnusableFrameError`: an all-zero mask, an image under
    ``min_image_side`` pixels) raises from ``dataset[index]``. A DataLoader fetches whole batches through
    :meth:`__getitems__`, which replaces such a sample by one of another subject (see there), so that one bad file
    does not stop a training run.

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
    ``caption`` (the target's), ``class_name``, ``subject_id`` (str), ``subject_index`` (int) and ``skipped`` (the
    errors of the unusable samples this item replaces, as strings naming the files; empty except from
    :meth:`__getitems__`).
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
        min_image_side: int = MIN_IMAGE_SIDE,
        max_consecutive_bad_samples: int = 20,
    ):
        if resolution <= 0 or reference_size <= 0:
            raise ValueError(f"expected positive sizes, got resolution={resolution}, reference_size={reference_size}")
        low, high = positive_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"expected 0 < positive_scale[0] <= positive_scale[1] <= 1, got {positive_scale}")
        if max_consecutive_bad_samples < 1:
            raise ValueError(f"expected max_consecutive_bad_samples >= 1, got {max_consecutive_bad_samples}")
        self.index: SubjectIndex = load_subjects(source)
        self.resolution = resolution
        self.reference_size = reference_size
        self.self_reconstruction = self_reconstruction
        self.seed = seed
        self.reference_margin = reference_margin
        self.positive_scale = (float(low), float(high))
        self.positive_flip_prob = positive_flip_prob
        self.min_image_side = min_image_side
        self.max_consecutive_bad_samples = max_consecutive_bad_samples
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
        # Sorted, so that the first unusable frame of a draw (the one an error names) does not depend on set order.
        positions = sorted({draw.reference, draw.positive, draw.target})
        decoded = {k: _decode(frames[k], self.min_image_side) for k in positions}

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
            "skipped": [],
        }

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """The items of one batch (what a DataLoader with a batch sampler fetches), unusable samples replaced.

        An item that raises one of :data:`SKIPPED_ERRORS` is replaced by the same draw (``index // len(self)``) of
        another subject, which is not in the batch yet (the batch stays subject-unique), taken in an order drawn
        from ``(seed, epoch, index)``. The replacements thus depend on the batch only, never on what was read
        before, so a resumed run replaces exactly as an uninterrupted one. The replacement's ``skipped`` lists the
        errors of the samples it replaces.

        Raises:
            BadDataError: if ``max_consecutive_bad_samples`` samples in a row (or every subject left) are unusable
                for one slot of the batch.
        """
        taken = {index % len(self) for index in indices}
        return [self._usable_item(index, taken) for index in indices]

    def _usable_item(self, index: int, taken: set[int]) -> dict[str, Any]:
        num_subjects = len(self)
        skipped: list[str] = []
        for candidate in self._candidates(index, taken):
            try:
                item = self[candidate]
            except SKIPPED_ERRORS as error:
                skipped.append(f"{error} (subject '{self.index.subject_ids[candidate % num_subjects]}')")
                if len(skipped) >= self.max_consecutive_bad_samples:
                    break
                continue
            taken.add(item["subject_index"])
            item["skipped"] = skipped
            return item
        raise BadDataError(
            f"No usable training sample: {len(skipped)} samples in a row could not be used "
            f"(of {num_subjects} subjects), the last: {skipped[-1]}. Check the training data (every skipped file is "
            "logged) or raise max_consecutive_bad_samples."
        )

    def _candidates(self, index: int, taken: set[int]) -> Iterator[int]:
        """``index``, then the same draw of the subjects not in ``taken``, in an order drawn from (seed, epoch, index)."""
        yield index
        num_subjects = len(self)
        draw = index // num_subjects
        # Drawn only once a sample failed: a permutation of a large subject set is not free.
        order = np.random.default_rng([self.seed, self.epoch, index, 1]).permutation(num_subjects)
        for subject in order.tolist():
            if subject != index % num_subjects and subject not in taken:
                yield subject + draw * num_subjects

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


def _decode(frame: Frame, min_side: int = MIN_IMAGE_SIDE) -> tuple[Image.Image, np.ndarray | None]:
    """RGB image and boolean mask (at the image's size) of a frame.

    Raises:
        ImageReadError: the image or mask cannot be read.
        UnusableFrameError: the image is smaller than ``min_side`` on a side, or the mask is empty.
    """
    image = frame.load_image()
    if min(image.size) < min_side:
        width, height = image.size
        raise UnusableFrameError(
            f"image {_describe(frame.image)} is {width} x {height} pixels, less than {min_side} on a side"
        )
    mask = frame.load_mask()
    if mask is None:
        return image, None
    binary = binarize_mask(mask, image.size)
    if not binary.any():
        raise UnusableFrameError(f"mask {_describe(frame.mask)} of image {_describe(frame.image)} is empty")
    return image, binary


def _describe(source: ImageSource | None) -> str:
    if isinstance(source, Image.Image):
        return "(an in-memory image)"
    return f"'{source}'" if isinstance(source, (str, os.PathLike)) else f"({source!r})"


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
