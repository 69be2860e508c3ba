"""A batch sampler whose batches never hold the same subject twice.

The contrastive losses (CSCL, MACL) use the other rows of a batch as negatives; a subject present twice would be
pushed away from itself. Dataset items are subjects, so a shuffled permutation chunked into batches already has
distinct subjects; the work here is in keeping that true when a subject appears several times per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
from torch.utils.data import Sampler


class UniqueSubjectBatchSampler(Sampler[list[int]]):
    """Batches of subject indices with no subject twice in a batch, deterministic given ``(seed, epoch)``.

    Each epoch is ``repeats_per_epoch`` permutations of the subjects, concatenated and cut into batches. Where a
    batch straddles two permutations, the head of the second one is reordered to avoid the subjects of the first
    one's tail, so every batch holds distinct subjects and every subject appears exactly ``repeats_per_epoch``
    times per epoch (minus those of a dropped last batch).

    Occurrence ``r`` of subject ``s`` is yielded as index ``s + r * num_subjects``, which
    :class:`~diffusers_customcontrast.data.SubjectTripletDataset` reads as draw ``r`` of subject ``s`` (so repeats
    are different samples). With ``repeats_per_epoch=1`` the indices are plain subject indices.

    It is a plain batch sampler (lists of indices, ``__len__``, ``batch_size`` and ``drop_last`` attributes), so
    ``DataLoader(dataset, batch_sampler=sampler)`` and accelerate's ``prepare`` (which wraps it in
    ``BatchSamplerShard``) take it. Notes for multi-process training:

    * accelerate does not call this sampler's :meth:`set_epoch` once it is wrapped for several processes: call it
      yourself at the start of every epoch (before iterating, and before ``skip_first_batches`` on resume).
    * With ``drop_last=False`` and ``even_batches=True`` (accelerate's default), accelerate completes the last
      batches with indices of the first ones, which can repeat a subject in those batches: use ``drop_last=True``.
    * Uniqueness holds within a batch, i.e. within one process; if the losses gather negatives across processes,
      subjects of different processes' batches may coincide.

    Args:
        data_source: The dataset (its length is the number of subjects) or the number of subjects.
        batch_size: Subjects per batch; at most the number of subjects.
        repeats_per_epoch: How many times each subject appears per epoch.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.
        shuffle: Shuffle the subjects (otherwise each permutation is in index order, up to the reordering above).
        seed: Base seed; the epoch's order is drawn from ``numpy.random.default_rng([seed, epoch])``.

    Raises:
        ValueError: if ``batch_size`` exceeds the number of subjects, or an argument is not positive.
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int,
        *,
        repeats_per_epoch: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ):
        num_subjects = data_source if isinstance(data_source, int) else len(data_source)
        if batch_size < 1 or repeats_per_epoch < 1:
            raise ValueError(
                f"expected batch_size >= 1 and repeats_per_epoch >= 1, got {batch_size} and {repeats_per_epoch}"
            )
        if batch_size > num_subjects:
            raise ValueError(
                f"expected batch_size <= number of subjects, got batch_size={batch_size} for {num_subjects} "
                "subjects: a batch cannot hold that many distinct subjects"
            )
        self.num_subjects = num_subjects
        self.batch_size = batch_size
        self.repeats_per_epoch = repeats_per_epoch
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"expected a non-negative epoch, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        total = self.num_subjects * self.repeats_per_epoch
        return total // self.batch_size if self.drop_last else math.ceil(total / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._epoch_order()
        for batch_index in range(len(self)):
            start = batch_index * self.batch_size
            yield order[start : start + self.batch_size]

    def _epoch_order(self) -> list[int]:
        """The epoch's index stream; every aligned ``batch_size`` chunk holds distinct subjects."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order: list[int] = []
        for repeat in range(self.repeats_per_epoch):
            permutation = rng.permutation(self.num_subjects) if self.shuffle else np.arange(self.num_subjects)
            permutation = self._avoid_open_batch(permutation.tolist(), order, rng)
            order.extend(subject + repeat * self.num_subjects for subject in permutation)
        return order

    def _avoid_open_batch(self, permutation: list[int], order: list[int], rng: np.random.Generator) -> list[int]:
        """Reorder ``permutation`` so that its first elements complete the open batch of ``order`` with new subjects.

        Possible because batch_size <= num_subjects: the open batch holds fewer than batch_size subjects, so at
        least ``batch_size - open`` subjects of the permutation are not in it.
        """
        open_count = len(order) % self.batch_size
        if open_count == 0:
            return permutation
        taken = {index % self.num_subjects for index in order[-open_count:]}
        fresh = [subject for subject in permutation if subject not in taken]
        clashing = [subject for subject in permutation if subject in taken]
        head_length = self.batch_size - open_count
        rest = fresh[head_length:] + clashing
        if self.shuffle:
            # Shuffle again so that the clashing subjects are not always placed last.
            rest = [rest[i] for i in rng.permutation(len(rest))]
        return fresh[:head_length] + rest
