"""Command line of ``python -m diffusers_customcontrast.prepare`` (and ``accelerate launch -m ...``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields

from .config import (
    CAPTION_POLICIES,
    DOMAINS,
    DTYPES,
    INPUT_KINDS,
    MASKERS,
    OUTPUT_FORMATS,
    PrepareConfig,
    PrepareConfigError,
)
from .report import PrepareSummary
from .run import prepare_dataset
from .sources import InputError

DESCRIPTION = """Turn raw videos, multi-view frame folders, photo folders or a JSONL list of them into a CustomContrast
training set: frames that cover the views, subject masks, captions, filters, and subject folders or shards.
See docs/data_preparation.md. Several processes: accelerate launch -m diffusers_customcontrast.prepare ..."""


def _border(value: str) -> float | str | None:
    """``--max_border_touch``: a fraction, ``auto`` or ``none``."""
    if value.lower() == "auto":
        return "auto"
    if value.lower() == "none":
        return None
    return float(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one option per :class:`PrepareConfig` field)."""
    defaults = PrepareConfig(input="", output="")
    parser = argparse.ArgumentParser(prog="python -m diffusers_customcontrast.prepare", description=DESCRIPTION)

    def add(group: argparse._ArgumentGroup, name: str, help: str, **kwargs) -> None:
        default = getattr(defaults, name)
        group.add_argument(f"--{name}", default=default, help=f"{help} (default: {default})", **kwargs)

    inputs = parser.add_argument_group("input and output")
    inputs.add_argument(
        "--input", required=True, help="Folder of videos / frame folders / photo folders / photos, or a .jsonl list."
    )
    inputs.add_argument("--output", required=True, help="Output folder (a run started again continues in it).")
    add(inputs, "class_name", "Class noun of the subjects, e.g. dog (a .jsonl line's class_name wins)")
    add(inputs, "input_kind", "Kind of input", choices=INPUT_KINDS)
    add(inputs, "domain", "object, or human (person detected and segmented, no border check)", choices=DOMAINS)
    add(inputs, "output_format", "Subject folders, or Parquet shards with an index", choices=OUTPUT_FORMATS)
    add(inputs, "subjects_per_shard", "Subjects per shard", type=int)
    add(inputs, "seed", "Seed of the subjects' order over the shards", type=int)

    frames = parser.add_argument_group("frames")
    add(frames, "max_frames", "Frames kept per subject at most", type=int)
    add(frames, "min_frames", "Subjects with fewer frames left are dropped", type=int)
    add(
        frames,
        "candidates_per_frame",
        "Frames read per kept frame of a video / sequence (the sharpest wins)",
        type=int,
    )
    add(frames, "max_side", "Longer side of the written frames at most", type=int)
    add(frames, "min_sharpness", "Frames below this variance of the Laplacian (at 256 px) are blurry", type=float)
    add(
        frames,
        "sharpness_ratio",
        "Frames below this fraction of the subject's median sharpness are blurry",
        type=float,
    )
    add(
        frames,
        "duplicate_distance",
        "Frames within this many bits of a kept frame's hash are near-duplicates",
        type=int,
    )

    masks = parser.add_argument_group("masks")
    add(masks, "masker", "detector + promptable segmenter, a semantic segmenter, or no masks", choices=MASKERS)
    add(masks, "detector", "zero-shot-object-detection model (OWLv2, OWL-ViT, Grounding DINO)")
    add(masks, "detector_prompt", "Detector query ({class_name} is filled in)")
    add(masks, "detection_threshold", "Detections scoring below this are ignored", type=float)
    add(masks, "segmenter", "SAM model segmenting the detected box")
    add(masks, "segmentation_model", "image-segmentation model of --masker segmentation")
    add(
        masks,
        "segmentation_labels",
        "Labels of --masker segmentation that make the mask (default: the class name)",
        nargs="+",
    )
    add(masks, "min_mask_area", "Masks covering less of the frame are too small", type=float)
    add(masks, "max_mask_area", "Masks covering more of the frame are too large", type=float)
    add(
        masks,
        "max_border_touch",
        "Subjects covering more of one image side are cut by the border; auto or none",
        type=_border,
    )

    captions = parser.add_argument_group("captions")
    add(captions, "caption_template", "Caption of every frame, e.g. 'a photo of a {class_name}' (no model loaded)")
    add(captions, "captioner", "Image-to-text model (BLIP, Florence-2)")
    add(captions, "caption_prompt", "Text given to the captioner (Florence-2: <CAPTION>)")
    add(
        captions,
        "caption_policy",
        "Captions not naming the class: prefix them, or replace them by the template",
        choices=CAPTION_POLICIES,
    )
    add(captions, "max_caption_tokens", "Tokens of a caption at most", type=int)

    runtime = parser.add_argument_group("runtime")
    add(runtime, "batch_size", "Frames per model call", type=int)
    add(runtime, "device", "Torch device of the models (default: accelerate's for this process)")
    add(runtime, "dtype", "Model dtype (auto: float16 on CUDA)", choices=DTYPES)
    add(runtime, "contact_sheet_subjects", "Subjects shown in contact_sheet.jpg", type=int)
    runtime.add_argument("--no_progress", dest="progress", action="store_false", help="No progress bars.")
    return parser


def main(argv: Sequence[str] | None = None) -> PrepareSummary:
    """Parse ``argv``, prepare the data, print the summary (main process) and return it."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config = PrepareConfig(**{f.name: args[f.name] for f in fields(PrepareConfig)})
    try:
        summary = prepare_dataset(config)
    except (PrepareConfigError, InputError) as error:
        parser.error(str(error))
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(summary.format())
    return summary
