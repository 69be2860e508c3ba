"""A batch sampler over subject shards: each process reads its own shards, one after another.

With a map-style dataset, accelerate hands batch ``b`` of a batch sampler to process ``b % num_processes``
(``BatchSamplerShard``). This sampler builds every process's batches from that process's shards only and interleaves
them in that order, so that under accelerate (or alone, with ``num_processes=1``) a process reads only the shard
files given to it, and reads them one at a time. Resuming works as for any batch sampler: the order is a function of
``(seed, epoch)``, and ``accelerator.skip_first_batches`` skips batches without reading them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .shards import ShardedSubjectIndex


class ShardedSubjectBatchSampler(Sampler[list[int]]):
    """Subject-unique batches, each process's from its own shards, with the same number of batches per process.

    Each epoch the shards are shuffled (from ``(seed, epoch)``) and dealt to the processes in turn: process ``p``
    gets shards ``p, p + num_processes, ...`` of that order. Within a repeat of the epoch, a process's subjects are its
    shards in turn, each shard's subjects shuffled, cut into batches. A subject is in one process's shards only, so
    no subject is seen by two processes, nor twice in a repeat.

    Every process must make the same number of optimizer steps (DDP waits for all of them), so each process takes,
    per repeat, the number of full batches that the smallest possible share of shards gives:
    ``floor(S / P)`` shards (S shards, P processes) of the smallest sizes. The few subjects past that in a larger
    share are left out of that repeat, different ones each epoch. With equal shards and S a multiple of P, nothing is
    left out but the subjects of a last incomplete batch.

    Occurrence ``r`` of subject ``s`` (``r`` the repeat) is yielded as index ``s + r * num_subjects``, which
    :class:`~diffusers_customcontrast.data.SubjectTripletDataset` reads as draw ``r`` of subject ``s``, as with
    :class:`~diffusers_customcontrast.data.UniqueSubjectBatchSampler`. Batches are always full (``drop_last`` is
    True): accelerate completes short ones with subjects already seen.

    Args:
        index: The shard index (or, for each subject in index order, the number of its shard).
        batch_size: Subjects per batch of one process.
        num_processes: Processes the batches are for (accelerate's ``num_processes``).
        repeats_per_epoch: How many times each subject appears per epoch.
        shuffle: Shuffle the shards and the subjects within a shard (otherwise both stay in index order).
        seed: Base seed; the epoch's order is drawn from ``numpy.random.default_rng([seed, epoch])``.

    Raises:
        ValueError: if there are fewer shards than processes, or no full batch for a process.
    """

    drop_last = True

    def __init__(
        self,
        index: ShardedSubjectIndex | Sequence[int],
        batch_size: int,
        *,
        num_processes: int = 1,
        repeats_per_epoch: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ):
        subject_shards = index.subject_shards if isinstance(index, ShardedSubjectIndex) else tuple(index)
        if batch_size < 1 or num_processes < 1 or repeats_per_epoch < 1:
            raise ValueError(
                "expected batch_size, num_processes and repeats_per_epoch >= 1, got "
                f"{batch_size}, {num_processes} and {repeats_per_epoch}"
            )
        num_shards = max(subject_shards) + 1 if subject_shards else 0
        self.shard_subjects: list[list[int]] = [[] for _ in range(num_shards)]
        for subject, shard in enumerate(subject_shards):
            self.shard_subjects[shard].append(subject)
        if num_shards < num_processes:
            raise ValueError(
                f"expected at least one shard per process, got {num_shards} shards for {num_processes} processes: "
                "write the data in more shards (a smaller subjects_per_shard)"
            )
        sizes = sorted(len(subjects) for subjects in self.shard_subjects)
        smallest_share = sum(sizes[: num_shards // num_processes])
        self.batches_per_repeat = smallest_share // batch_size
        if self.batches_per_repeat == 0:
            raise ValueError(
                f"expected at least {batch_size} subjects (one batch) in every process's shards, got {smallest_share} "
                f"in the smallest share of {num_shards} shards over {num_processes} processes: lower the batch size "
                "or write fewer, larger shards"
            )
        self.num_subjects = len(subject_shards)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.repeats_per_epoch = repeats_per_epoch
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"expected a non-negative epoch, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_processes * self.repeats_per_epoch * self.batches_per_repeat

    def process_shards(self) -> list[list[int]]:
        """The shards of each process this epoch (the same in every repeat)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        num_shards = len(self.shard_subjects)
        order = rng.permutation(num_shards).tolist() if self.shuffle else list(range(num_shards))
        return [order[process :: self.num_processes] for process in range(self.num_processes)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        shares = self.process_shards()
        used = self.batches_per_repeat * self.batch_size
        for repeat in range(self.repeats_per_epoch):
            streams = []
            for shards in shares:
                subjects = []
                for shard in shards:
                    members = self.shard_subjects[shard]
                    subjects += [members[i] for i in rng.permutation(len(members))] if self.shuffle else members
                streams.append([subject + repeat * self.num_subjects for subject in subjects[:used]])
            for start in range(0, used, self.batch_size):
                for stream in streams:  # batch b goes to process b % num_processes
                    yield stream[start : start + self.batch_size]
