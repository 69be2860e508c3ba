"""``TrainingConfig``: every setting of a CustomContrast training run, from YAML and ``--key value`` overrides.

A run is described by one YAML file whose keys are the field names of :class:`TrainingConfig`; any field can be
overridden on the command line (``--learning_rate 5e-5``). Values are checked against the field types, and an
unknown key is an error that names the valid ones, so a typo never trains silently with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..losses import APPEARANCE_SCALINGS, DEFAULT_LOSS_WEIGHT
from ..models.config import ARCHITECTURE_OPTIONS, CustomContrastAdapterConfig

__all__ = ["ConfigError", "TrainingConfig", "parse_args"]


class ConfigError(ValueError):
    """A training configuration is invalid: an unknown key, a value of the wrong type, or an impossible setting."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation in ``metadata["help"]`` (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


MIXED_PRECISION = (None, "no", "fp16", "bf16")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)


# The adapter options a training configuration may name (image_feature_layers is a field of its own: the batch
# encoder reads it too).
ADAPTER_OPTIONS = tuple(name for name in ARCHITECTURE_OPTIONS if name != "image_feature_layers")
# They were flat fields once (adapter_hidden_size: 768, ...): configurations written that way still load.
LEGACY_ADAPTER_KEYS = {f"adapter_{name}": name for name in ADAPTER_OPTIONS}


@dataclass
class TrainingConfig:
    """Settings of a CustomContrast training run (docs/training.md). Defaults marked "our choice" are untuned.

    The loss weights were tuned on the synthetic world (``docs/world_benchmark.md``)."""

    # ------------------------------------------------------------------------------------------------ base model
    pretrained_model_name_or_path: str | None = _f(
        None, "Base pipeline: hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) or local folder. Required."
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: str | None = _f(None, "Weight variant of the base model files, e.g. 'fp16'.")
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "Another VAE (hub id or folder with the VAE at its root), e.g. madebyollin/sdxl-vae-fp16-fix."
    )
    image_encoder_path: str | None = _f(
        None,
        "CLIP vision encoder: hub id or folder. Default: the base model's image_encoder subfolder if it has one.",
    )
    image_encoder_subfolder: str | None = _f(
        None, "Subfolder of image_encoder_path holding the encoder, e.g. 'models/image_encoder' for h94/IP-Adapter."
    )
    prediction_type: str | None = _f(
        None, "Override the scheduler's prediction type ('epsilon' or 'v_prediction'); default: the base model's."
    )

    # ------------------------------------------------------------------------------------------------ adapter
    adapter: dict[str, Any] = _f(
        {},
        "Shape of a new adapter: a mapping of CustomContrastAdapterConfig options ("
        + ", ".join(ADAPTER_OPTIONS)
        + "); unnamed options take their defaults, e.g. 'adapter: {hidden_size: 768, num_heads: 12}'.",
    )
    image_feature_layers: list[int] | None = _f(
        None,
        "Hidden states of the image encoder concatenated into F (unset: the penultimate, as diffusers feeds; leave "
        "unset for an adapter with image_input 'image_embeds').",
    )
    pretrained_adapter_name_or_path: str | None = _f(
        None, "Start from a trained CustomContrast adapter (hub id or folder) instead of a new one."
    )
    init_from_ip_adapter: str | None = _f(
        None,
        "Start from an IP-Adapter-Plus or IP-Adapter checkpoint (a file, or a folder / hub repo with "
        "ip_adapter_weight_name): the adapter is converted whole and starts as that IP-Adapter (its image projection "
        "sets the visual Q-Former's shape; TV fusion identity, location gates open, S+ scale 0).",
    )
    ip_adapter_weight_name: str | None = _f(
        None, "File name of the IP-Adapter checkpoint inside init_from_ip_adapter (a folder or hub repo)."
    )
    ip_adapter_subfolder: str | None = _f(None, "Subfolder of that file, e.g. 'models' for h94/IP-Adapter.")
    s_plus_warmup_steps: int = _f(
        0,
        "Ramp the S+ scale used in training linearly from the adapter's s_plus_scale to 1 over this many steps "
        "(0: the adapter's own scale throughout). A converted adapter's S+ tokens start at scale 0, where the "
        "diffusion loss gives them no gradient; the exported adapter loads with the scale the ramp reached.",
    )

    # ------------------------------------------------------------------------------------------------ data
    train_data: str | None = _f(
        None,
        "Training subjects: a subject folder, a .jsonl manifest, a datasets.save_to_disk folder, or a Hugging Face "
        "dataset name for datasets.load_dataset (see docs/data_format.md). Required.",
    )
    dataset_config_name: str | None = _f(None, "Configuration name of a Hugging Face dataset.")
    dataset_split: str = _f("train", "Split of a Hugging Face dataset.")
    subject_column: str = _f("subject_id", "Hugging Face dataset column with the subject id.")
    image_column: str = _f("image", "Hugging Face dataset column with the frame image.")
    mask_column: str = _f("mask", "Hugging Face dataset column with the subject mask (optional in the data).")
    caption_column: str = _f("caption", "Hugging Face dataset column with the caption (optional in the data).")
    class_column: str = _f("class_name", "Hugging Face dataset column with the class noun (optional in the data).")
    resolution: int = _f(512, "Side of the target images (1024 for SDXL).")
    repeats_per_epoch: int = _f(1, "How many times each subject appears per epoch (small subject sets).")
    self_reconstruction: bool = _f(
        False, "Ablation: reconstruct the reference frame itself (IP-Adapter regime) instead of another frame."
    )
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0: load in the main process).")
    max_consecutive_bad_samples: int = _f(
        20,
        "An unusable sample (unreadable file, empty mask, tiny image) is skipped, logged and replaced by another "
        "subject's; this many in a row for one batch slot stop the run with an error (the data is broken).",
    )

    # ------------------------------------------------------------------------------------------------ objective
    lambda_cscl: float = _f(
        DEFAULT_LOSS_WEIGHT, "Weight of L_CSCL, the visual/textual CLS contrast (tuned on the synthetic world)."
    )
    lambda_macl: float = _f(
        DEFAULT_LOSS_WEIGHT, "Weight of L_MACL, the per-layer S+ contrast (tuned on the synthetic world)."
    )
    lambda_loc: float = _f(
        DEFAULT_LOSS_WEIGHT, "Weight of L_loc, the location-map BCE (tuned on the synthetic world)."
    )
    use_cscl: bool = _f(True, "Compute L_CSCL (switch off for the ablation).")
    use_macl: bool = _f(True, "Compute L_MACL (switch off for the ablation).")
    use_location: bool = _f(True, "Compute L_loc (switch off for the ablation).")
    macl_temperature: float = _f(0.1, "Temperature tau of L_MACL.")
    appearance_temperature: float = _f(
        0.05, "Temperature tau_a of MACL's soft targets (macl_appearance_scaling 'soft_targets'; 0: plain InfoNCE)."
    )
    macl_appearance_scaling: str = _f(
        "similarity",
        "How L_MACL uses the appearance similarity S of the segmented references (docs/method.md): 'similarity' "
        "multiplies each negative's cosine by S (the paper's reading), 'soft_targets' takes softmax([1, S...] / "
        "tau_a) as targets, 'none' is plain InfoNCE.",
    )
    cscl_init_logit_scale: float = _f(
        math.log(1 / 0.07), "Initial log inverse temperature of L_CSCL (learned; CLIP's initial value)."
    )
    snr_gamma: float | None = _f(None, "Min-SNR-gamma weighting of L_diff (5.0 is the usual value); none if unset.")
    noise_offset: float = _f(0.0, "Offset noise strength (0 disables).")
    image_dropout: float = _f(0.05, "Probability that a row gets the blank image instead of the reference (CFG).")
    text_dropout: float = _f(0.05, "Probability that a row gets the empty prompt (CFG).")
    both_dropout: float = _f(0.05, "Probability that a row gets both (CFG).")

    # ------------------------------------------------------------------------------------------------ optimisation
    train_batch_size: int = _f(8, "Subjects per batch and process (at most the number of subjects).")
    gradient_accumulation_steps: int = _f(1, "Batches accumulated per optimizer step.")
    max_train_steps: int = _f(10000, "Optimizer steps of the run.")
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    scale_lr: bool = _f(False, "Multiply learning_rate by batch size x accumulation x processes.")
    lr_scheduler: str = _f("constant", "diffusers.optimization.get_scheduler name, e.g. constant, cosine, linear.")
    lr_warmup_steps: int = _f(0, "Warm-up steps of the learning rate schedule.")
    lr_num_cycles: int = _f(1, "Cycles of cosine_with_restarts.")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay (not applied to the CSCL logit scale).")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _f(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    max_consecutive_nonfinite: int = _f(
        5,
        "A step whose loss (or, with max_grad_norm on, gradient norm) is NaN or infinite is skipped (no update); "
        "this many in a row stop the run with an error (the last checkpoint holds the last good weights).",
    )
    mixed_precision: str | None = _f(
        None, "'no', 'fp16' or 'bf16' (frozen modules in that dtype, trainables fp32); default: accelerate's config."
    )
    gradient_checkpointing: bool = _f(False, "Recompute the UNet's activations in the backward pass (saves memory).")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    seed: int = _f(0, "Seed of the adapter initialisation, the data order and every per-step random draw.")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms for bit-exact reruns (slower on GPU).")
    use_lora: bool = _f(False, "Also train a LoRA on the UNet's attention projections (peft).")
    lora_rank: int = _f(4, "LoRA rank.")
    lora_alpha: int | None = _f(None, "LoRA alpha (default: the rank).")
    lora_target_modules: list[str] = _f(["to_k", "to_q", "to_v", "to_out.0"], "UNet modules that get a LoRA.")
    ddp_find_unused_parameters: bool = _f(False, "DDP find_unused_parameters (only if a custom setup needs it).")

    # ------------------------------------------------------------------------------------------------ outputs
    output_dir: str = _f("customcontrast-output", "Where checkpoints, logs, validation images and the adapter go.")
    logging_dir: str = _f("logs", "Tracker logs, relative to output_dir.")
    report_to: str | None = _f("tensorboard", "Tracker: 'tensorboard', 'wandb', 'all' or 'none'.")
    tracker_project_name: str = _f("customcontrast", "Project name given to the trackers.")
    checkpointing_steps: int | None = _f(500, "Save the training state (accelerate save_state) every N steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints (the oldest are deleted).")
    resume_from_checkpoint: str | None = _f(None, "'latest' (the newest in output_dir) or a checkpoint folder.")
    validation_steps: int | None = _f(None, "Generate validation images every N steps (and at the end).")
    validation_prompts: list[str] = _f(
        ["a photo of a {class_name} on the beach", "a {class_name} in the snow"],
        "Validation prompts; '{class_name}' is filled with the validation subject's class.",
    )
    validation_reference: str | None = _f(
        None, "Image file of the validation subject (default: the first subject's reference frame)."
    )
    validation_class_name: str | None = _f(
        None, "Class name of validation_reference (default: the first subject's class, or 'object')."
    )
    validation_num_inference_steps: int = _f(30, "Denoising steps of the validation images.")
    validation_guidance_scale: float = _f(7.5, "Classifier-free guidance scale of the validation images.")
    validation_images_per_prompt: int = _f(1, "Validation images per prompt.")
    export_image_encoder: bool = _f(
        True, "Copy the image encoder to output_dir/image_encoder, so load_customcontrast works without one."
    )
    push_to_hub: bool = _f(False, "Upload the exported adapter folder to the Hub (log in first).")
    hub_model_id: str | None = _f(None, "Hub repository for push_to_hub (default: the name of output_dir).")
    debug_save_rank_states: bool = _f(
        False, "Debug: each process saves its trainable weights to output_dir/rank_states/ at the end."
    )

    # -------------------------------------------------------------------------------------------- construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build a config from a mapping (e.g. parsed YAML); keys are checked and values converted to field types."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"A training configuration must be a mapping of field names to values, got {values!r:.80}."
            )
        values = _nest_legacy_adapter_keys(values)
        _check_keys(values)
        hints = _field_types()
        values = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
        if "adapter" in values:
            values["adapter"] = _coerce_adapter_options(values["adapter"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainingConfig:
        """Read a YAML file of ``field: value`` pairs; ``overrides`` take precedence."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError as error:
            raise ConfigError(f"The configuration file '{path}' does not exist.") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"'{path}' is not valid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"'{path}' must hold a mapping of field names to values, got {type(values).__name__}.")
        return cls.from_dict({**values, **overrides})

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some fields changed (keys and values checked like :meth:`from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")

    def tracker_config(self) -> dict[str, Any]:
        """Flat scalar values for the trackers' hyper-parameter tables (tensorboard rejects lists and None)."""
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.to_dict().items()}

    # -------------------------------------------------------------------------------------------- validation

    def validate(self) -> TrainingConfig:
        """Raise :class:`ConfigError` for settings no run can use; returns ``self``."""
        problems = []
        if not self.pretrained_model_name_or_path:
            problems.append("set pretrained_model_name_or_path (a hub id or a local pipeline folder)")
        if not self.train_data:
            problems.append("set train_data (a subject folder, a .jsonl manifest or a dataset)")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "resolution",
            "lora_rank",
            "max_consecutive_bad_samples",
            "max_consecutive_nonfinite",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpointing_steps", "validation_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or null, got {value}")
        for name in ("image_dropout", "text_dropout", "both_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.image_dropout + self.text_dropout + self.both_dropout > 1:
            problems.append("image_dropout + text_dropout + both_dropout must be at most 1")
        if self.s_plus_warmup_steps < 0:
            problems.append(f"s_plus_warmup_steps must be >= 0, got {self.s_plus_warmup_steps}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if self.macl_temperature <= 0:
            problems.append(f"macl_temperature must be positive, got {self.macl_temperature}")
        if self.appearance_temperature < 0:
            problems.append(f"appearance_temperature must be >= 0, got {self.appearance_temperature}")
        if self.macl_appearance_scaling not in APPEARANCE_SCALINGS:
            problems.append(
                f"macl_appearance_scaling must be one of {', '.join(map(repr, APPEARANCE_SCALINGS))}, "
                f"got {self.macl_appearance_scaling!r}"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"snr_gamma must be positive or null, got {self.snr_gamma}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(
                f"mixed_precision must be one of 'no', 'fp16', 'bf16' or null, got {self.mixed_precision!r}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            problems.append(f"prediction_type must be 'epsilon', 'v_prediction' or null, got {self.prediction_type!r}")
        if self.resume_from_checkpoint == "":
            problems.append("resume_from_checkpoint must be 'latest', a checkpoint folder, or null")
        try:
            CustomContrastAdapterConfig.check_options(self.adapter, exclude=("image_feature_layers",))
            # Together: image_feature_layers must stay unset for an adapter that reads pooled image embeddings.
            CustomContrastAdapterConfig.check_options(
                {**self.adapter, "image_feature_layers": self.image_feature_layers}
            )
        except ValueError as error:
            problems.append(str(error).rstrip("."))
        if problems:
            raise ConfigError("Invalid training configuration: " + "; ".join(problems) + ".")
        return self

    @property
    def trackers(self) -> str | None:
        """``report_to`` as accelerate's ``log_with`` (``None`` when reporting is off)."""
        return None if self.report_to in (None, "none", "") else self.report_to


# ---------------------------------------------------------------------------------------------------- typing


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainingConfig)


def _nest_legacy_adapter_keys(values: dict[str, Any]) -> dict[str, Any]:
    """``adapter_hidden_size: 768`` (the old flat form) as ``adapter: {hidden_size: 768}``."""
    legacy = {LEGACY_ADAPTER_KEYS[key]: value for key, value in values.items() if key in LEGACY_ADAPTER_KEYS}
    if not legacy:
        return values
    nested = values.get("adapter") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"'adapter' must be a mapping of adapter options, got {nested!r}.")
    both = sorted(set(legacy) & set(nested))
    if both:
        raise ConfigError(f"'adapter_{both[0]}' and 'adapter: {{{both[0]}: ...}}' both set the adapter's {both[0]}.")
    rest = {key: value for key, value in values.items() if key not in LEGACY_ADAPTER_KEYS}
    return {**rest, "adapter": {**nested, **legacy}}


def _coerce_adapter_options(options: dict[str, Any]) -> dict[str, Any]:
    """Adapter option values (from YAML or the command line) as the types of CustomContrastAdapterConfig."""
    hints = typing.get_type_hints(CustomContrastAdapterConfig)
    return {
        name: _coerce(f"adapter.{name}", value, hints[name]) if name in ADAPTER_OPTIONS else value
        for name, value in options.items()
    }


def _check_keys(keys: Sequence[str] | dict) -> None:
    valid = TrainingConfig.field_names()
    unknown = [key for key in keys if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"Unknown training configuration key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}. "
            f"Valid keys: {', '.join(valid)}."
        )


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, is optional)`` of ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NULL = {"none", "null", "~", ""}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command line string) to the field type ``tp``, or raise ConfigError."""
    inner, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NULL):
        if optional:
            return None
        raise ConfigError(f"'{name}' cannot be null.")
    if typing.get_origin(inner) is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a mapping, got {value!r}.")
        return dict(value)
    if typing.get_origin(inner) is list:
        (element,) = typing.get_args(inner)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}.")
        return [_coerce(f"{name}[{i}]", v, element) for i, v in enumerate(value)]
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            # PyYAML reads 1e-4 (no dot) as a string: accept it here.
            return float(value)
        if inner is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"'{name}' must be {'a ' + kind if kind != 'int' else 'an int'}, got {value!r}.") from None
    return value


# ---------------------------------------------------------------------------------------------------- command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_customcontrast.train",
        description="Train a CustomContrast adapter (multilevel contrastive learning) on a frozen diffusers base "
        "model. Any configuration field can be given as --field value and overrides the YAML file.",
        allow_abbrev=False,  # '--max_train' must not silently mean '--max_train_steps'
    )
    parser.add_argument("--config", help="YAML file of configuration fields.")
    hints = _field_types()
    for f in dataclasses.fields(TrainingConfig):
        inner, _ = _split_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata['help']} (default: {default!r})",
        }
        if typing.get_origin(inner) is list:
            kwargs.update(nargs="*", metavar="VALUE")
        elif typing.get_origin(inner) is dict:
            kwargs.update(metavar="MAPPING")
        elif inner is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=getattr(inner, "__name__", "VALUE").upper())
        parser.add_argument(f"--{f.name}", **kwargs)
    for key in LEGACY_ADAPTER_KEYS:
        parser.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainingConfig:
    """``--config run.yaml`` plus ``--field value`` overrides -> a validated :class:`TrainingConfig`.

    Raises:
        ConfigError: an unknown option or key (the message lists the valid ones), a value of the wrong type, or an
            invalid setting.
        SystemExit: for ``--help``.
    """
    parser = _build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        keys = [u.removeprefix("--").split("=")[0] for u in unknown if u.startswith("--")]
        if keys:
            _check_keys(keys)
        raise ConfigError(f"Unexpected command line arguments {unknown}: give options as --field value.")
    overrides = {k: v for k, v in vars(namespace).items() if k != "config"}
    config_file = getattr(namespace, "config", None)
    config = TrainingConfig.from_yaml(config_file, **overrides) if config_file else TrainingConfig.from_dict(overrides)
    return config.validate()
