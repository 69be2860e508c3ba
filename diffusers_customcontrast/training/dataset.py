"""The training data of a run: subjects from ``config.train_data`` and a subject-unique, resumable DataLoader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState
from torch.utils.data import DataLoader

from ..data import (
    ShardedSubjectBatchSampler,
    ShardedSubjectIndex,
    SubjectIndex,
    SubjectTripletDataset,
    UniqueSubjectBatchSampler,
    collate_triplets,
    load_subjects,
)
from .config import ConfigError, TrainingConfig

__all__ = ["TrainingData", "build_training_data", "load_training_subjects"]

# Files that datasets.Dataset.save_to_disk / DatasetDict.save_to_disk write at the top of their folder.
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def load_training_subjects(config: TrainingConfig) -> SubjectIndex:
    """Index ``config.train_data``: a subject folder, a shard folder, a ``.jsonl`` manifest, a ``save_to_disk`` folder,
    or a dataset name for ``datasets.load_dataset`` (see ``docs/data_format.md``)."""
    source = config.train_data
    if not source:
        raise ConfigError("set train_data (a subject folder, a .jsonl manifest or a dataset).")
    path = Path(source)
    columns = {
        "subject_column": config.subject_column,
        "image_column": config.image_column,
        "mask_column": config.mask_column,
        "caption_column": config.caption_column,
        "class_column": config.class_column,
    }
    if path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[config.dataset_split]
        return load_subjects(dataset, **columns)
    if path.exists():
        return load_subjects(path)
    import datasets

    dataset = datasets.load_dataset(source, config.dataset_config_name, split=config.dataset_split)
    return load_subjects(dataset, **columns)


@dataclass
class TrainingData:
    """The dataset, its batch sampler and the DataLoader over them (both need ``set_epoch`` every epoch)."""

    dataset: SubjectTripletDataset
    sampler: UniqueSubjectBatchSampler | ShardedSubjectBatchSampler
    loader: DataLoader

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's data order and random draws (call before iterating, also before skipping batches)."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)


def build_training_data(config: TrainingConfig, index: SubjectIndex, reference_size: int) -> TrainingData:
    """Triplet dataset, subject-unique batches (``drop_last``: a padded last batch could repeat a subject).

    Subjects in shards get a :class:`~diffusers_customcontrast.data.ShardedSubjectBatchSampler`, so that each
    process reads only its own shards.
    """
    if config.train_batch_size > len(index):
        raise ConfigError(
            f"train_batch_size ({config.train_batch_size}) is larger than the number of subjects ({len(index)}): "
            "a batch holds each subject at most once (it would be its own negative)."
        )
    dataset = SubjectTripletDataset(
        index,
        resolution=config.resolution,
        reference_size=reference_size,
        self_reconstruction=config.self_reconstruction,
        seed=config.seed,
        max_consecutive_bad_samples=config.max_consecutive_bad_samples,
    )
    if isinstance(index, ShardedSubjectIndex):
        # The accelerate state the trainer's Accelerator set up (a single process when there is none).
        sampler = ShardedSubjectBatchSampler(
            index,
            batch_size=config.train_batch_size,
            num_processes=PartialState().num_processes,
            repeats_per_epoch=config.repeats_per_epoch,
            seed=config.seed,
        )
    else:
        sampler = UniqueSubjectBatchSampler(
            dataset,
            batch_size=config.train_batch_size,
            repeats_per_epoch=config.repeats_per_epoch,
            drop_last=True,
            seed=config.seed,
        )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_triplets,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
    )
    return TrainingData(dataset=dataset, sampler=sampler, loader=loader)
