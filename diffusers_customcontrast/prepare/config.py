"""Settings of a data preparation run (``python -m diffusers_customcontrast.prepare``), with their checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
"""Open-vocabulary detector given the class name (``zero-shot-object-detection``: OWLv2, OWL-ViT, Grounding DINO)."""

DEFAULT_SEGMENTER = "facebook/sam-vit-base"
"""Promptable segmenter run on the detected box (``SamModel``)."""

DEFAULT_SEGMENTATION_MODEL = "nvidia/segformer-b5-finetuned-ade-640-640"
"""Semantic segmenter of ``masker="segmentation"`` (``image-segmentation``; ADE20K labels include ``person``)."""

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
"""Image-to-text model of the captions (``AutoModelForImageTextToText``: BLIP, Florence-2, ...)."""

OBJECT_BORDER_TOUCH = 0.05
"""``max_border_touch`` of ``auto`` for objects."""

INPUT_KINDS = ("auto", "videos", "frame_folders", "photo_folders", "photos", "jsonl")
DOMAINS = ("object", "human")
MASKERS = ("detect_segment", "segmentation", "none")
OUTPUT_FORMATS = ("folders", "shards")
CAPTION_POLICIES = ("prefix", "check")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class PrepareConfigError(ValueError):
    """A setting of the preparation run is invalid; the message says which and what it expects."""


@dataclass
class PrepareConfig:
    """What ``prepare_dataset`` reads, how it selects, masks and captions frames, and what it writes.

    Inputs
        input: A folder of videos (one subject each), a folder of per-object frame folders, a folder of photo
            folders (e.g. one per person), a folder of photos of one subject, or a ``.jsonl`` list of those.
        input_kind: One of :data:`INPUT_KINDS`; ``auto`` tells them apart by their content.
        class_name: Class noun of the subjects (``dog``); a ``.jsonl`` line's ``class_name`` wins. Without either,
            ``person`` in the human domain, else the subject's folder or file name.
        domain: ``object``, or ``human`` (the person is detected and segmented; a folder of folders holds photo
            sets, not frame sequences; subjects may touch the border).

    Frames
        max_frames: Frames kept per subject at most; a video or frame folder is cut into this many stretches of time,
            and each stretch gives its sharpest frame, so that the frames cover the views.
        min_frames: Subjects with fewer frames left after the filters are dropped.
        candidates_per_frame: Frames read per stretch to choose the sharpest from.
        max_side: Frames are downscaled to this longer side at most.
        min_sharpness: Frames whose sharpness (variance of the Laplacian at 256 px) is below this are blurry.
        sharpness_ratio: Frames below this fraction of the subject's median sharpness are blurry too.
        duplicate_distance: Frames within this many bits (of 64) of a kept frame's difference hash are
            near-duplicates.

    Masks
        masker: ``detect_segment`` (detector box, then segmenter), ``segmentation`` (semantic segmenter, segments
            whose label names the subject) or ``none`` (no masks).
        detector, segmenter, segmentation_model: Hub ids or local folders.
        detector_prompt: Detector query; ``{class_name}`` is filled in.
        detection_threshold: Detections scoring below this are ignored.
        segmentation_labels: Labels of ``masker="segmentation"`` that make the mask (default: the class name).
        min_mask_area, max_mask_area: Kept masks cover this fraction of the frame, at least / at most.
        max_border_touch: A subject is cut by the border when its mask covers more than this fraction of one image
            side; ``None`` turns the check off; ``auto`` is 0.05 for objects and off in the human domain (people
            reach the bottom of the frame).

    Captions
        caption_template: Caption of every frame (``{class_name}`` filled in); no captioning model is loaded.
        captioner: Image-to-text model used without a template.
        caption_prompt: Text given to the captioner (Florence-2 needs a task, e.g. ``<CAPTION>``).
        caption_policy: A model caption that does not name the class is prefixed ``"a photo of a <class>, "``
            (``prefix``) or replaced by the default template (``check``).
        max_caption_tokens: New tokens a caption may have.

    Output and run
        output: The output folder.
        output_format: ``folders`` (the subject-folder form) or ``shards`` (Parquet shards with an index).
        subjects_per_shard: Subjects per shard.
        seed: Seed of the subjects' order over the shards.
        batch_size: Frames per model call.
        device: Torch device of the models (default: accelerate's device of the process).
        dtype: Model dtype; ``auto`` is float16 on CUDA, float32 elsewhere.
        contact_sheet_subjects: Subjects shown in the contact sheet.
        progress: Show progress bars.
    """

    input: str
    output: str
    class_name: str | None = None
    input_kind: str = "auto"
    domain: str = "object"
    max_frames: int = 16
    min_frames: int = 2
    candidates_per_frame: int = 3
    max_side: int = 1024
    min_sharpness: float = 10.0
    sharpness_ratio: float = 0.4
    duplicate_distance: int = 4
    masker: str = "detect_segment"
    detector: str = DEFAULT_DETECTOR
    detector_prompt: str = "a photo of a {class_name}"
    detection_threshold: float = 0.1
    segmenter: str = DEFAULT_SEGMENTER
    segmentation_model: str = DEFAULT_SEGMENTATION_MODEL
    segmentation_labels: list[str] | None = None
    min_mask_area: float = 0.02
    max_mask_area: float = 0.9
    max_border_touch: float | Literal["auto"] | None = "auto"
    caption_template: str | None = None
    captioner: str = DEFAULT_CAPTIONER
    caption_prompt: str | None = None
    caption_policy: str = "prefix"
    max_caption_tokens: int = 40
    output_format: str = "folders"
    subjects_per_shard: int = 64
    seed: int = 0
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    contact_sheet_subjects: int = 16
    progress: bool = True

    def validate(self) -> PrepareConfig:
        """Check every setting; returns ``self``.

        Raises:
            PrepareConfigError: naming the first invalid setting, what it expects and what it got.
        """
        for name, allowed in (
            ("input_kind", INPUT_KINDS),
            ("domain", DOMAINS),
            ("masker", MASKERS),
            ("output_format", OUTPUT_FORMATS),
            ("caption_policy", CAPTION_POLICIES),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise PrepareConfigError(
                    f"expected {name} to be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        for name in (
            "max_frames",
            "min_frames",
            "candidates_per_frame",
            "max_side",
            "subjects_per_shard",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise PrepareConfigError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.min_frames > self.max_frames:
            raise PrepareConfigError(
                f"expected min_frames <= max_frames, got min_frames={self.min_frames} > max_frames={self.max_frames}"
            )
        if not 0 <= self.min_mask_area < self.max_mask_area <= 1:
            raise PrepareConfigError(
                "expected 0 <= min_mask_area < max_mask_area <= 1, got "
                f"min_mask_area={self.min_mask_area}, max_mask_area={self.max_mask_area}"
            )
        border = self.max_border_touch
        if border not in (None, "auto") and not (isinstance(border, (int, float)) and 0 <= border <= 1):
            raise PrepareConfigError(f"expected max_border_touch in [0, 1], 'auto' or None, got {border!r}")
        if not 0 <= self.sharpness_ratio <= 1:
            raise PrepareConfigError(f"expected sharpness_ratio in [0, 1], got {self.sharpness_ratio}")
        if not 0 <= self.duplicate_distance <= 64:
            raise PrepareConfigError(f"expected duplicate_distance in [0, 64] bits, got {self.duplicate_distance}")
        if self.caption_template is not None and not self.caption_template.strip():
            raise PrepareConfigError("expected a non-empty caption_template (or none to caption with a model), got ''")
        return self

    def resolved(self) -> PrepareConfig:
        """A copy with the domain's defaults filled in: ``class_name`` (``person`` for humans) and
        ``max_border_touch``."""
        human = self.domain == "human"
        border = self.max_border_touch
        return replace(
            self,
            class_name=self.class_name or ("person" if human else None),
            max_border_touch=(None if human else OBJECT_BORDER_TOUCH) if border == "auto" else border,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
