"""Training-state checkpoints: ``output_dir/checkpoint-<step>`` folders written by ``accelerator.save_state``.

accelerate would save the full state dict of the prepared module, frozen UNet included (gigabytes per checkpoint).
The hooks installed by :func:`register_checkpoint_hooks` replace it by the trainable weights only
(``trainable_state.safetensors``) and add a ready-to-load adapter folder (``adapter/``); optimizer, scheduler,
gradient scaler, RNG and :class:`TrainingProgress` states are saved by accelerate as usual.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file

from .objective import CustomContrastObjective

logger = get_logger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "TrainingProgress",
    "checkpoint_step",
    "list_checkpoints",
    "prune_checkpoints",
    "register_checkpoint_hooks",
    "resolve_resume_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_STATE_NAME = "trainable_state.safetensors"
ADAPTER_FOLDER = "adapter"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class TrainingProgress:
    """The run's position, saved with the accelerator state (``register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.global_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step = int(state["global_step"])


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, or ``None``."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that one more fits within ``total_limit``; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) + 1 - total_limit
    removed = checkpoints[: max(excess, 0)]
    for path in removed:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d).", path, total_limit)
        shutil.rmtree(path)
    return removed


def resolve_resume_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (``None`` if there is none yet) or an existing folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        # A bare name is looked up in output_dir, as the diffusers training scripts do.
        candidate = Path(output_dir) / resume_from_checkpoint
        if not candidate.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint folder '{resume_from_checkpoint}'.")
        path = candidate
    return path


def register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` store only the trainable weights of the :class:`CustomContrastObjective`."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        # DeepSpeed and FSDP save the model themselves and leave `weights` empty.
        if weights:
            weights.clear()
        for model in models:
            objective = accelerator.unwrap_model(model)
            if not isinstance(objective, CustomContrastObjective) or not accelerator.is_main_process:
                continue
            state = {name: t.contiguous().clone() for name, t in objective.trainable_state_dict().items()}
            save_file(state, Path(output_dir) / TRAINABLE_STATE_NAME)
            objective.adapter.save_pretrained(Path(output_dir) / ADAPTER_FOLDER)

    def load_hook(models: list, input_dir: str) -> None:
        path = Path(input_dir) / TRAINABLE_STATE_NAME
        while models:
            objective = accelerator.unwrap_model(models.pop())
            if not path.is_file():
                raise FileNotFoundError(f"The checkpoint '{input_dir}' has no {TRAINABLE_STATE_NAME}.")
            state = load_file(path, device=str(next(objective.parameters()).device))
            objective.load_trainable_state_dict(state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
