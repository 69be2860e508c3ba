"""Training-state checkpoints: ``output_dir/checkpoint-<step>`` folders written by ``accelerator.save_state``.

accelerate would save the full state dict of the prepared module, frozen UNet included (gigabytes per checkpoint).
The hooks installed by :func:`register_checkpoint_hooks` replace it by the trainable weights only
(``trainable_state.safetensors``) and add a ready-to-load adapter folder (``adapter/``); optimizer, scheduler,
gradient scaler, RNG and :class:`TrainingProgress` states are saved by accelerate as usual.

Checkpoints are written atomically (:func:`save_checkpoint`): into ``checkpoint-<step>.tmp-<token>``, every file
fsynced, then a marker (``checkpoint_complete.json``, the file sizes) written last, then renamed. A save that is
interrupted (an exception, a kill, a power cut) leaves at most a ``*.tmp-*`` folder, which ``"latest"`` never picks
and the next run deletes; a ``checkpoint-<step>`` folder without a valid marker is not complete either.
"""

from __future__ import annotations

import json
import os
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
    "COMPLETE_MARKER",
    "TrainingProgress",
    "checkpoint_step",
    "is_complete_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "register_checkpoint_hooks",
    "remove_partial_checkpoints",
    "resolve_resume_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_STATE_NAME = "trainable_state.safetensors"
ADAPTER_FOLDER = "adapter"
COMPLETE_MARKER = "checkpoint_complete.json"
PARTIAL_INFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_PARTIAL_RE = re.compile(rf"^{CHECKPOINT_PREFIX}\d+{re.escape(PARTIAL_INFIX)}")


class TrainingProgress:
    """The run's position and fault counts, saved with the accelerator state (``register_for_checkpointing``).

    The counts are totals over all processes (every process holds the same values).
    """

    def __init__(self) -> None:
        self.global_step = 0
        self.skipped_samples = 0  # unusable samples replaced
        self.nonfinite_steps = 0  # steps skipped for a NaN / inf loss
        self.consecutive_nonfinite = 0  # of them, how many in a row up to global_step

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in vars(self):
            setattr(self, name, int(state.get(name, 0)))  # checkpoints from before the counts hold the step only


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, or ``None``."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path, complete_only: bool = False) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir``, oldest first (only complete ones if ``complete_only``)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    if complete_only:
        found = [p for p in found if is_complete_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a readable marker and every file it lists, at the listed size."""
    try:
        marker = json.loads((Path(path) / COMPLETE_MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return bool(files) and all((Path(path) / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(len(checkpoints) - total_limit, 0)]
    for path in removed:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d).", path, total_limit)
        shutil.rmtree(path)
    return removed


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the ``checkpoint-<step>.tmp-*`` folders that interrupted saves left; returns them."""
    root = Path(output_dir)
    removed = sorted(p for p in root.iterdir() if p.is_dir() and _PARTIAL_RE.match(p.name)) if root.is_dir() else []
    for path in removed:
        logger.warning("Removing %s, left by an interrupted checkpoint save.", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def resolve_resume_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: ``"latest"``, the newest complete one (``None`` if there is none yet), or an
    existing folder (refused if its marker lists files that are missing or of another size)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        complete = [p for p in checkpoints if is_complete_checkpoint(p)]
        for path in checkpoints:
            if path not in complete and (not complete or checkpoint_step(path) > checkpoint_step(complete[-1])):
                logger.warning(
                    "Not resuming from %s: it is incomplete (no valid %s; pass its path to use it anyway).",
                    path,
                    COMPLETE_MARKER,
                )
        return complete[-1] if complete else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        # A bare name is looked up in output_dir, as the diffusers training scripts do.
        candidate = Path(output_dir) / resume_from_checkpoint
        if not candidate.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint folder '{resume_from_checkpoint}'.")
        path = candidate
    if not is_complete_checkpoint(path):
        if (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"resume_from_checkpoint: '{path}' is damaged (files missing or truncated).")
        logger.warning("%s has no %s: it may be incomplete.", path, COMPLETE_MARKER)
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, token: str, total_limit: int | None = None
) -> Path:
    """``accelerator.save_state`` to ``output_dir/checkpoint-<step>``, atomically (see the module docstring).

    Call it on every process; ``token`` (the same on all) names the temporary folder. The oldest checkpoints beyond
    ``total_limit`` are deleted only once the new one is complete.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f"{final.name}{PARTIAL_INFIX}{token}"
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _seal(partial, step)
            _replace(partial, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _seal(folder: Path, step: int) -> None:
    """fsync every file of ``folder``, then write (and fsync) the marker listing them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
    with (folder / COMPLETE_MARKER).open("w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": sizes}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_directory(directory)


def _replace(partial: Path, final: Path) -> None:
    """Rename ``partial`` to ``final``; an existing ``final`` (a rerun of the same step) is moved aside first."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}{PARTIAL_INFIX}replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    _fsync_directory(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable; a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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
