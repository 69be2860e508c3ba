"""Training data of CustomContrast: subject sources, frame triplets, subject-unique batches, a synthetic world.

```python
from torch.utils.data import DataLoader
from diffusers_customcontrast.data import SubjectTripletDataset, UniqueSubjectBatchSampler, collate_triplets

dataset = SubjectTripletDataset("data/subjects", resolution=512)          # folder, .jsonl or datasets.Dataset
sampler = UniqueSubjectBatchSampler(dataset, batch_size=8, drop_last=True)
loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_triplets, num_workers=4)
for epoch in range(num_epochs):
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    for batch in loader:
        ...
```

The formats are described in ``docs/data_format.md``; shards for many machines (``write_subject_shards``,
``load_subject_shards``, ``ShardedSubjectBatchSampler``) in its section "Shards".
"""

from .formats import (
    DEFAULT_CAPTION_TEMPLATE,
    IMAGE_EXTENSIONS,
    Frame,
    ImageReadError,
    ImageSource,
    SubjectIndex,
    load_hf_subjects,
    load_subject_folder,
    load_subject_manifest,
)
from .sampler import UniqueSubjectBatchSampler
from .shard_sampler import ShardedSubjectBatchSampler
from .shard_writer import write_subject_shards
from .shards import ShardedSubjectIndex, load_subject_shards
from .sources import load_subjects
from .synthetic import SyntheticSubject, make_subject, render_frame, write_synthetic_dataset
from .triplets import BadDataError, SubjectTripletDataset, TripletDraw, UnusableFrameError, collate_triplets

__all__ = [
    "BadDataError",
    "DEFAULT_CAPTION_TEMPLATE",
    "IMAGE_EXTENSIONS",
    "Frame",
    "ImageReadError",
    "ImageSource",
    "ShardedSubjectBatchSampler",
    "ShardedSubjectIndex",
    "SubjectIndex",
    "SubjectTripletDataset",
    "SyntheticSubject",
    "TripletDraw",
    "UniqueSubjectBatchSampler",
    "UnusableFrameError",
    "collate_triplets",
    "load_hf_subjects",
    "load_subject_folder",
    "load_subject_manifest",
    "load_subject_shards",
    "load_subjects",
    "make_subject",
    "render_frame",
    "write_subject_shards",
    "write_synthetic_dataset",
]
