"""Fine-tune a CustomContrast adapter on a plain folder of photos of one subject (no masks, no captions needed).

    python examples/train_on_photos.py --photos my_dog_photos/ --class_name dog \\
        --adapter path/to/customcontrast-sd15 --max_train_steps 300 --output outputs/my-dog-adapter
    python examples/generate_sd15.py --adapter outputs/my-dog-adapter --subject my_dog_photos/IMG_0001.jpg \\
        --class_name dog --prompt "a {class_name} on the moon"

Steps:

1. The photos go through ``diffusers_customcontrast.prepare`` (``docs/data_preparation.md``): blurry photos and
   near-duplicates are left out, an open-vocabulary detector given the class name and SAM on its box mask the subject
   (``--detector``, ``--segmenter``; hub models, downloaded once), and photos where it is not found, too small or cut
   by the border are left out too. The result is the subject-folder format of ``docs/data_format.md``:
   ``<output>/train_data/<subject_id>/00.jpg, 01.png, ...``, ``masks/``, ``subject.json`` with the class name (and
   ``caption.txt`` with ``--caption``; without it every photo's caption is "a photo of a <class_name>"), with a
   ``summary.json`` and a ``contact_sheet.jpg`` of the masks to check. ``--no_masks`` skips the masks.
2. The training configuration is written to ``<output>/run.yaml``.
3. Training runs in this process through ``diffusers_customcontrast.training`` (``train(TrainingConfig...)``), exactly
   what ``python -m diffusers_customcontrast.train --config <output>/run.yaml`` does; ``--prepare_only`` stops before
   it, e.g. to start that command with ``accelerate launch`` on several GPUs. The adapter is exported to ``<output>``
   (with ``image_encoder/``, validation images in ``<output>/validation/``), ready for ``pipe.load_customcontrast``.

What training on one subject means. CustomContrast learns from many subjects: its contrastive losses (CSCL, MACL)
compare the subjects of a batch with each other, so with one subject they have nothing to work with and this script
switches them off. The location loss needs subject masks only: with the masks of step 1 it stays on, and keeps
teaching the adapter where the subject is in the image (with ``--no_masks`` it is off too). What remains besides is
the cross-view reconstruction loss: with one photo as the reference, denoise another photo of the same subject.
Starting from a pre-trained adapter (``--adapter``, required), a few hundred steps at a small learning rate
specialise it to this subject: closer likeness in details, like the per-subject tuning of DreamBooth-style methods,
at the cost of generality. The result is an adapter for this subject (keep the original for other subjects), and it
can overfit: when backgrounds or poses of the photos creep into every validation image, use fewer steps or a lower
learning rate. Use 3 to 10 photos with varied views and backgrounds and the subject large in the frame; with a single
photo the reconstruction target is the reference itself, which teaches copying. A general adapter is trained from
scratch on many subjects with ``python -m diffusers_customcontrast.train`` (``docs/training.md``).

Any field of the training configuration can be set with ``--set field=value`` (e.g. ``--set use_lora=true``,
values read as YAML), on top of ``--config base.yaml`` if given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import SD15_MODEL, add_runtime_arguments, make_parser, slug

from diffusers_customcontrast.data import DEFAULT_CAPTION_TEMPLATE, SubjectIndex, load_subject_folder
from diffusers_customcontrast.loaders.serialization import AdapterLoadError, resolve_file
from diffusers_customcontrast.prepare import (
    DEFAULT_DETECTOR,
    DEFAULT_SEGMENTER,
    PrepareConfig,
    PrepareConfigError,
    SubjectMasker,
    prepare_dataset,
)
from diffusers_customcontrast.training import ConfigError, TrainingConfig, TrainingResult, train

# What one subject allows, whatever --config says (--set can still change them); use_location follows the masks.
ONE_SUBJECT: dict[str, Any] = {
    "train_batch_size": 1,  # a batch never holds a subject twice
    "use_cscl": False,  # no other subject to contrast with
    "use_macl": False,
}

# Settings of a one-subject fine-tune (our choice, untuned); --config, the options below and --set override them.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-5,
    "max_train_steps": 300,
    "resolution": 512,
    "checkpointing_steps": 100,
    "checkpoints_total_limit": 2,
    "validation_steps": 100,
    "validation_prompts": ["a {class_name} on the beach", "a {class_name} in the snow, watercolor painting"],
}


def prepare_photos(
    photos: str | os.PathLike,
    data_root: str | os.PathLike,
    subject_id: str,
    class_name: str,
    caption: str | None,
    masks: bool = True,
    detector: str = DEFAULT_DETECTOR,
    segmenter: str = DEFAULT_SEGMENTER,
    device: str | None = None,
    masker: SubjectMasker | None = None,
) -> SubjectIndex:
    """Prepare the photos of ``photos`` into ``data_root/subject_id/`` (``diffusers_customcontrast.prepare``).

    Every usable photo is kept (``min_frames=1``, no cap on the number), masked unless ``masks`` is False (with
    ``masker``, or the ``detector`` and ``segmenter`` models), captioned with the ``caption`` template. Returns the
    index of the prepared subject; raises ``SystemExit`` with the summary when no photo is left. A subject prepared
    before with the same settings is not prepared again (the run resumes): delete ``data_root`` to start over after
    changing the photos themselves.
    """
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    listing = data_root.parent / "photos.jsonl"  # a one-line list: it names the subject
    listing.write_text(json.dumps({"subject_id": subject_id, "photos": str(Path(photos).resolve())}) + "\n")
    config = PrepareConfig(
        input=str(listing),
        output=str(data_root),
        class_name=class_name,
        min_frames=1,
        max_frames=10_000,
        masker="detect_segment" if masks else "none",
        detector=detector,
        segmenter=segmenter,
        caption_template=caption or DEFAULT_CAPTION_TEMPLATE,
        device=device,
    )
    try:
        summary = prepare_dataset(config, masker=masker if masks else None)
    except PrepareConfigError:  # prepared before with other photos, class name, caption or masks
        print(f"{data_root} was prepared with other settings: preparing it again.")
        shutil.rmtree(data_root)
        summary = prepare_dataset(config, masker=masker if masks else None)
    print(summary.format())
    if summary.subjects_kept == 0:
        raise SystemExit(f"No usable photo in {photos} (see {data_root / 'summary.json'}).")
    if summary.frames_kept == 1:
        print("warning: one photo only; the reconstruction target is then the reference itself (see --help).")
    return load_subject_folder(data_root)


def adapter_image_encoder(adapter: str) -> str | None:
    """The ``image_encoder`` folder the adapter was exported with (local folder or hub repository), if it has one."""
    try:
        resolve_file(adapter, "config.json", "image_encoder")
    except AdapterLoadError:
        return None
    return str(Path(adapter) / "image_encoder") if Path(adapter).is_dir() else f"{adapter}/image_encoder"


def mixed_precision(dtype: str, device: str | None) -> str:
    """accelerate's ``mixed_precision`` for ``--dtype``: auto is fp16 where CUDA is used, no mixed precision elsewhere."""
    if dtype == "auto":
        return "fp16" if torch.cuda.is_available() and device != "cpu" else "no"
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "no"}[dtype]


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["lora_rank=8", "validation_steps=null"]`` -> ``{"lora_rank": 8, "validation_steps": None}``."""
    values = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise SystemExit(f"--set expects field=value, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise SystemExit(
                f"--set {key.strip()}: the value is not valid YAML ({error.problem}); quote it."
            ) from None
    return values


@contextlib.contextmanager
def device_environment(device: str | None) -> Iterator[None]:
    """``--device cpu`` makes accelerate train on the CPU even where a GPU exists; otherwise accelerate chooses."""
    if device != "cpu":
        yield
        return
    previous = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous


def main(argv: Sequence[str] | None = None, masker: SubjectMasker | None = None) -> TrainingResult | Path:
    """Prepare the data and configuration, train, and return the ``TrainingResult`` (the YAML path with --prepare_only).

    ``masker`` replaces the detector and segmenter models (any ``diffusers_customcontrast.prepare.SubjectMasker``).
    """
    parser = make_parser(__doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--photos", required=True, help="Folder of photos (.jpg, .jpeg, .png, .webp) of ONE subject.")
    data.add_argument("--class_name", required=True, help="Class noun of the subject: dog, backpack, vase ...")
    data.add_argument("--subject_id", default=None, help="Name of the subject folder (default: from --photos).")
    data.add_argument(
        "--caption", default=None, help="Caption template of the photos, e.g. 'a photo of a {class_name}'."
    )
    data.add_argument("--no_masks", action="store_true", help="Do not mask the subject (the location loss is off).")
    data.add_argument(
        "--detector", default=DEFAULT_DETECTOR, help=f"Detector of the masks (default {DEFAULT_DETECTOR})."
    )
    data.add_argument(
        "--segmenter", default=DEFAULT_SEGMENTER, help=f"Segmenter of the masks (default {DEFAULT_SEGMENTER})."
    )
    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_model", default=SD15_MODEL, help=f"Base pipeline (default: {SD15_MODEL}).")
    models.add_argument("--adapter", required=True, help="Pre-trained CustomContrast adapter to start from.")
    models.add_argument(
        "--image_encoder",
        default=None,
        help="CLIP image encoder (hub id[/subfolder] or folder). Default: the adapter's image_encoder/, else the "
        "base model's.",
    )
    training = parser.add_argument_group("training (defaults: FINETUNE_DEFAULTS in this script)")
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps (default 300).")
    training.add_argument("--learning_rate", type=float, default=None, help="Learning rate (default 1e-5).")
    training.add_argument(
        "--resolution", type=int, default=None, help="Training image side (default 512; 1024 for SDXL)."
    )
    training.add_argument(
        "--validation_steps", type=int, default=None, help="Validation images every N steps (default 100)."
    )
    training.add_argument(
        "--validation_prompt", nargs="+", default=None, help="Validation prompts with '{class_name}'."
    )
    training.add_argument(
        "--config",
        default=None,
        help="A training YAML to start from: its keys replace FINETUNE_DEFAULTS; this script's options, ONE_SUBJECT "
        "and --set replace them.",
    )
    training.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="Any other TrainingConfig field."
    )
    training.add_argument("--prepare_only", action="store_true", help="Write the data and run.yaml, do not train.")
    add_runtime_arguments(
        parser,
        default_output="outputs/train_on_photos",
        device_help="cpu to train on the CPU; otherwise accelerate picks the device (CUDA_VISIBLE_DEVICES, "
        "accelerate launch).",
        dtype_help="becomes accelerate's mixed_precision (auto: fp16 on CUDA, none elsewhere); trained weights stay "
        "float32.",
        seed_help="Seed of the run: data order, augmentation and every random draw of a step.",
    )
    args = parser.parse_args(argv)

    output = Path(args.output)
    subject_id = args.subject_id or slug(Path(args.photos).resolve().name, max_length=60)
    base = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    options = {
        "max_train_steps": args.max_train_steps,
        "learning_rate": args.learning_rate,
        "resolution": args.resolution,
        "validation_steps": args.validation_steps,
        "validation_prompts": args.validation_prompt,
    }
    run = {
        **FINETUNE_DEFAULTS,
        **(base or {}),
        **{key: value for key, value in options.items() if value is not None},
        **ONE_SUBJECT,
        "use_location": not args.no_masks,
        "pretrained_model_name_or_path": args.pretrained_model,
        "pretrained_adapter_name_or_path": args.adapter,
        "train_data": str(output / "train_data"),
        "validation_class_name": args.class_name,
        "seed": args.seed,
        "mixed_precision": mixed_precision(args.dtype, args.device),
        "output_dir": str(output),
    }
    if args.image_encoder:
        run["image_encoder_path"] = args.image_encoder
    elif "image_encoder_path" not in run and (image_encoder := adapter_image_encoder(args.adapter)):
        run["image_encoder_path"] = image_encoder
    run.update(parse_set(args.set))
    try:
        TrainingConfig.from_dict(run).validate()  # a bad --set fails here, before any model loads
    except ConfigError as error:
        parser.error(str(error))

    with device_environment(args.device):  # accelerate's state, set up here, must agree with the training's
        index = prepare_photos(
            args.photos,
            output / "train_data",
            subject_id,
            args.class_name,
            args.caption,
            masks=not args.no_masks,
            detector=args.detector,
            segmenter=args.segmenter,
            device=args.device,
            masker=masker,
        )
    if not any(frame.has_mask for frame in index[subject_id]):
        run["use_location"] = False  # no photo has a mask: the location loss has nothing to learn from
    config_path = output / "run.yaml"
    config_path.write_text(yaml.safe_dump(run, sort_keys=False, allow_unicode=True), encoding="utf-8")
    config = TrainingConfig.from_yaml(config_path)
    print(f"wrote {config_path}; the same run: python -m diffusers_customcontrast.train --config {config_path}")
    if args.prepare_only:
        return config_path

    with device_environment(args.device):
        result = train(config)
    print(f"adapter: {result.output_dir} (pipe.load_customcontrast({str(result.output_dir)!r}))")
    for path in result.validation_images:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
