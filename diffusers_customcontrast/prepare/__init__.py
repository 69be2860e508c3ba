"""From raw videos and photo folders to a CustomContrast training set: frames, subject masks, captions, filters.

```bash
python -m diffusers_customcontrast.prepare --input videos/ --output data/subjects --class_name dog
accelerate launch -m diffusers_customcontrast.prepare --input mvimgnet/ --output data/shards --output_format shards ...
```

```python
from diffusers_customcontrast.prepare import PrepareConfig, prepare_dataset

summary = prepare_dataset(PrepareConfig(input="videos/", output="data/subjects", class_name="dog"))
print(summary.format())
```

The models are transformers' own (an open-vocabulary detector and SAM, an image-to-text captioner); any callable with
the :class:`SubjectMasker` or :class:`Captioner` signature can replace them. See ``docs/data_preparation.md``.
"""

from .captioning import Captioner, ImageTextCaptioner, name_class, names_class
from .config import (
    DEFAULT_CAPTIONER,
    DEFAULT_DETECTOR,
    DEFAULT_SEGMENTATION_MODEL,
    DEFAULT_SEGMENTER,
    PrepareConfig,
    PrepareConfigError,
)
from .detection import Detection, Detector, ZeroShotDetector
from .filters import FRAME_REASONS, SUBJECT_REASONS, border_touch, check_mask
from .frames import difference_hash, sharpness
from .masking import DetectSegmentMasker, LabelSegmentationMasker, SubjectMask, SubjectMasker, build_masker
from .report import PrepareSummary, contact_sheet
from .run import prepare_dataset, prepare_subject
from .segmentation import BoxSegmenter, SamSegmenter
from .sources import InputError, SubjectSource, discover_subjects

__all__ = [
    "BoxSegmenter",
    "Captioner",
    "DEFAULT_CAPTIONER",
    "DEFAULT_DETECTOR",
    "DEFAULT_SEGMENTATION_MODEL",
    "DEFAULT_SEGMENTER",
    "DetectSegmentMasker",
    "Detection",
    "Detector",
    "FRAME_REASONS",
    "ImageTextCaptioner",
    "InputError",
    "LabelSegmentationMasker",
    "PrepareConfig",
    "PrepareConfigError",
    "PrepareSummary",
    "SUBJECT_REASONS",
    "SamSegmenter",
    "SubjectMask",
    "SubjectMasker",
    "SubjectSource",
    "ZeroShotDetector",
    "border_touch",
    "build_masker",
    "check_mask",
    "contact_sheet",
    "difference_hash",
    "discover_subjects",
    "name_class",
    "names_class",
    "prepare_dataset",
    "prepare_subject",
    "sharpness",
]
