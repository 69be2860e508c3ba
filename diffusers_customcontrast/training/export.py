"""The outputs of a training run: the adapter folder, its model card, the loss history, the Hub upload.

The adapter folder is what ``pipe.load_customcontrast(output_dir)`` reads: ``config.json`` and
``diffusion_pytorch_model.safetensors`` (diffusers' layout), optionally ``image_encoder/`` (so a pipeline without an
image encoder can load it) and ``pytorch_lora_weights.safetensors`` when a UNet LoRA was trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from .components import BaseModel
from .config import TrainingConfig
from .objective import CustomContrastObjective

logger = get_logger(__name__)

__all__ = ["LOSS_HISTORY_NAME", "LossHistory", "export_adapter", "model_card", "push_folder_to_hub"]

LOSS_HISTORY_NAME = "loss_history.jsonl"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class LossHistory:
    """The per-step logged values of a run, mirrored line by line in ``output_dir/loss_history.jsonl``.

    On resume the file is read back and cut at the resumed step, so it always describes one continuous run.
    ``path=None`` keeps the history in memory only (processes other than the main one).
    """

    def __init__(self, path: str | Path | None, resume_step: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: list[dict[str, Any]] = []
        if self.path is None:
            return
        if resume_step is not None and self.path.is_file():
            self.entries = [e for e in self.read(self.path) if e["step"] <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(e) + "\n" for e in self.entries)

    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        """The entries of a ``loss_history.jsonl`` file (or of the one in an output folder), one per step."""
        path = Path(path)
        if path.is_dir():
            path = path / LOSS_HISTORY_NAME
        with path.open(encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]

    def append(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")

    @property
    def last(self) -> dict[str, Any]:
        return self.entries[-1] if self.entries else {}


def export_adapter(
    objective: CustomContrastObjective,
    base: BaseModel,
    config: TrainingConfig,
    output_dir: str | Path,
    global_step: int,
    final_losses: dict[str, float],
    num_subjects: int,
    effective_batch_size: int,
    skipped_samples: int = 0,
    nonfinite_steps: int = 0,
) -> Path:
    """Write the adapter folder (adapter, image encoder copy, LoRA, model card) into ``output_dir``."""
    output_dir = Path(output_dir)
    if config.s_plus_warmup_steps:  # trained with a ramp: the adapter loads with the S+ scale it reached
        objective.adapter.record_s_plus_scale(objective.s_plus_scale(global_step))
    objective.adapter.save_pretrained(output_dir)
    if config.export_image_encoder:
        base.image_encoder.save_pretrained(output_dir / "image_encoder")
    if config.use_lora:
        _save_lora(objective, base, output_dir)
    card = model_card(
        config,
        base,
        global_step,
        final_losses,
        num_subjects,
        effective_batch_size,
        base_family=objective.adapter.config.base_family,
        skipped_samples=skipped_samples,
        nonfinite_steps=nonfinite_steps,
    )
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    logger.info("Exported the CustomContrast adapter to %s.", output_dir)
    return output_dir


def _save_lora(objective: CustomContrastObjective, base: BaseModel, output_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(objective.unet))
    pipeline_cls = StableDiffusionXLPipeline if base.is_sdxl else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(output_dir, unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME)


def model_card(
    config: TrainingConfig,
    base: BaseModel,
    global_step: int,
    final_losses: dict[str, float],
    num_subjects: int,
    effective_batch_size: int,
    base_family: str = "custom",
    skipped_samples: int = 0,
    nonfinite_steps: int = 0,
) -> str:
    """A Hub model card (README.md with YAML front matter) describing the run and how to load the adapter."""
    family = {"sd15": "SD1.5", "sdxl": "SDXL"}.get(base_family, "a custom UNet")
    pipeline = "StableDiffusionXLPipeline" if base.is_sdxl else "StableDiffusionPipeline"
    repo = config.hub_model_id or "path/to/this/folder"
    tags = ["diffusers", "customcontrast", "subject-driven-generation", "ip-adapter", "text-to-image"]
    tags.append("stable-diffusion-xl" if base.is_sdxl else "stable-diffusion")
    tag_lines = "\n".join(f"- {t}" for t in tags)
    enabled = {
        "L_CSCL": (config.use_cscl, f"lambda_cscl = {config.lambda_cscl}"),
        "L_MACL": (
            config.use_macl,
            f"lambda_macl = {config.lambda_macl}, tau = {config.macl_temperature}, "
            f"appearance scaling = {config.macl_appearance_scaling}, tau_a = {config.appearance_temperature}",
        ),
        "L_loc": (config.use_location, f"lambda_loc = {config.lambda_loc}"),
    }
    loss_rows = "\n".join(
        f"| {name} | {'on' if on else 'off'} | {detail if on else '-'} |" for name, (on, detail) in enabled.items()
    )
    final_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in final_losses.items())
    lora = ""
    if config.use_lora:
        lora = f'pipe.load_lora_weights("{repo}", weight_name="{LORA_WEIGHT_NAME}")  # the UNet LoRA trained with it\n'
    return f"""---
base_model: {base.source or config.pretrained_model_name_or_path}
library_name: diffusers
tags:
{tag_lines}
inference: false
---

# CustomContrast adapter for {base.source or config.pretrained_model_name_or_path}

A CustomContrast (AAAI 2025) subject adapter for {family}, trained with
`diffusers-customcontrast` (multilevel contrastive learning). It takes one image of a subject and a prompt. This card
records how it was trained and its final training losses, nothing more: how well it keeps a subject's identity and
follows the prompt has not been measured here; measure it with `python -m diffusers_customcontrast.evaluate` (DreamBench
CLIP-T, CLIP-I, DINO).

## How to use

```python
import torch
import diffusers_customcontrast  # adds load_customcontrast() to every diffusers pipeline
from diffusers import {pipeline}
from diffusers.utils import load_image

pipe = {pipeline}.from_pretrained("{base.source or config.pretrained_model_name_or_path}", torch_dtype=torch.float16).to("cuda")
pipe.load_customcontrast("{repo}")  # also loads ./image_encoder if the pipeline has none
{lora}subject = load_image("my_subject.png")
image = pipe("a photo of it on the beach", ip_adapter_image=subject).images[0]
pipe.set_customcontrast_scale(0.8)  # less subject, more prompt
```

## Training

| setting | value |
|---|---|
| base model | `{base.source or config.pretrained_model_name_or_path}` |
| image encoder | `{base.image_encoder_source or "base model's image_encoder"}` |
| data | `{config.train_data}` ({num_subjects} subjects) |
| steps | {global_step} |
| unusable samples skipped (replaced by other subjects') | {skipped_samples} |
| steps skipped for a non-finite loss | {nonfinite_steps} |
| batch size (total, per optimizer step) | {effective_batch_size} |
| learning rate | {config.learning_rate} ({config.lr_scheduler}) |
| resolution | {config.resolution} |
| mixed precision | {config.mixed_precision or "accelerate default"} |
| image / text / both dropout | {config.image_dropout} / {config.text_dropout} / {config.both_dropout} |
| min-SNR gamma | {config.snr_gamma} |
| UNet LoRA | {f"rank {config.lora_rank}" if config.use_lora else "no"} |
| seed | {config.seed} |

| loss | | weights and temperatures |
|---|---|---|
| L_diff | on | 1 |
{loss_rows}

Final logged losses (step {global_step}):

| term | value |
|---|---|
{final_rows}
"""


def push_folder_to_hub(output_dir: str | Path, hub_model_id: str | None, global_step: int) -> str:
    """Upload the exported adapter folder (not the checkpoints or logs); returns the repository id."""
    from huggingface_hub import create_repo, upload_folder

    output_dir = Path(output_dir)
    repo_id = create_repo(hub_model_id or output_dir.name, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=f"CustomContrast adapter after {global_step} steps",
        ignore_patterns=_ignored(output_dir),
    )
    logger.info("Pushed %s to the Hub as %s.", output_dir, repo_id)
    return repo_id


def _ignored(output_dir: Path) -> list[str]:
    patterns: Iterable[str] = ("checkpoint-*", "checkpoint-*/**", "logs/**", "rank_states/**", "*.yaml.tmp")
    return [*patterns, *(f"{p.name}/**" for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("."))]
