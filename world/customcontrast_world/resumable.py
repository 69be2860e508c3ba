"""Checkpoints of a long CPU training run (the synthetic base model, the judge) that resume exactly where it stopped.

A run keeps ``<output_dir>/checkpoints/``:

* ``config.json``: the run's settings; resuming with other settings is refused, since the weights would then come
  from two different runs.
* ``record.json``: loss curves, metrics and times of the stages done so far.
* ``<stage>/``: a finished stage's model, written by the stage (``save_pretrained``).
* ``<stage>.progress.pt``: an unfinished stage's state (model, optimizer, schedule, generator, curves, step).

Every file is written to a temporary name and renamed, so a run killed at any moment leaves the last complete
checkpoint. :func:`run_steps` saves progress every ``every`` steps and when the process gets SIGTERM (or Ctrl-C),
then raises :class:`TrainingInterrupted`; calling the same command again continues from that step with the same
random draws, so the weights are those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["RunCheckpoints", "TrainingInterrupted", "run_steps", "torch_threads"]


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after saving its progress; the same command resumes it."""


class RunCheckpoints:
    """The ``checkpoints/`` folder of one run (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, settings: Mapping[str, Any]) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.settings = json.loads(json.dumps(dict(settings)))  # as JSON reads it back: tuples become lists
        config = self.root / "config.json"
        if config.is_file():
            saved = json.loads(config.read_text(encoding="utf-8"))
            changed = sorted(k for k in {*saved, *self.settings} if saved.get(k) != self.settings.get(k))
            if changed:
                raise ValueError(
                    f"expected the settings of the run checkpointed in '{self.root}' to resume it, got different "
                    f"{', '.join(changed)}: use another --output_dir, or delete that folder to start over."
                )
        else:
            _write_text(config, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")

    # ---------------------------------------------------------------------------------------- finished stages
    def stage_dir(self, stage: str) -> Path | None:
        """The folder of a finished stage, or ``None`` if it has not finished."""
        path = self.root / stage
        return path if path.is_dir() else None

    def save_stage(self, stage: str, save: Callable[[Path], None]) -> Path:
        """Write a finished stage with ``save(folder)`` and drop its progress file."""
        temporary = self.root / f".{stage}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        save(temporary)
        temporary.rename(self.root / stage)
        (self.root / f"{stage}.progress.pt").unlink(missing_ok=True)
        return self.root / stage

    # ------------------------------------------------------------------------------------------------ record
    def load_record(self) -> dict:
        path = self.root / "record.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def save_record(self, record: Mapping[str, Any]) -> None:
        _write_text(self.root / "record.json", json.dumps(record) + "\n")

    # -------------------------------------------------------------------------------------- stage progress
    def load_progress(self, stage: str) -> dict | None:
        path = self.root / f"{stage}.progress.pt"
        # Our own file, and weights_only refuses anything but tensors and plain containers all the same.
        # Read onto the CPU: a run checkpointed on a GPU resumes anywhere (load_state_dict moves each tensor back).
        return torch.load(path, weights_only=True, map_location="cpu") if path.is_file() else None

    def save_progress(self, stage: str, state: dict) -> None:
        path = self.root / f"{stage}.progress.pt"
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)


def run_steps(
    checkpoints: RunCheckpoints,
    stage: str,
    total: int,
    step: Callable[[int], dict[str, float]],
    stateful: Mapping[str, Stateful],
    generator: torch.Generator,
    every: int,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run ``step(i)`` for the steps of ``stage`` not yet done, resumable; return its loss curves and its wall and
    CPU seconds (``{"wall", "cpu"}``, summed over every session of the run).

    ``step`` returns the step's losses by name. ``stateful`` (models, optimizer, schedule: anything with
    ``state_dict``) and ``generator`` (every random draw of a step must come from it) are saved with the curves
    every ``every`` steps and on SIGTERM / Ctrl-C, which then raises :class:`TrainingInterrupted`.
    """
    curves: dict[str, list[float]] = {}
    start, spent = 0, {"wall": 0.0, "cpu": 0.0}
    saved = checkpoints.load_progress(stage)
    if saved is not None:
        for name, value in stateful.items():
            value.load_state_dict(saved["state"][name])
        generator.set_state(saved["generator"])
        curves, start, spent = saved["curves"], saved["step"], saved["seconds"]
        log(f"[{stage}] resuming at step {start}/{total} from '{checkpoints.root}'")

    def seconds() -> dict[str, float]:
        return {"wall": spent["wall"] + time.perf_counter() - began, "cpu": spent["cpu"] + time.process_time() - cpu}

    def save(done: int) -> None:
        state = {name: value.state_dict() for name, value in stateful.items()}
        progress = {"state": state, "generator": generator.get_state(), "curves": curves, "step": done}
        checkpoints.save_progress(stage, {**progress, "seconds": seconds()})

    began, cpu = time.perf_counter(), time.process_time()
    with _stop_requested() as stop:
        for index in range(start, total):
            for name, value in step(index).items():
                curves.setdefault(name, []).append(value)
            done = index + 1
            if done % log_every == 0 or done == total:
                recent = ", ".join(f"{n} {sum(v[-log_every:]) / len(v[-log_every:]):.4f}" for n, v in curves.items())
                log(f"[{stage}] step {done}/{total}: {recent}")
            if stop.is_set() or (done % every == 0 and done < total):
                save(done)
            if stop.is_set():
                raise TrainingInterrupted(
                    f"[{stage}] stopped at step {done}/{total}; run the same command again to resume."
                )
    return curves, seconds()


@contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while the block runs (signal handlers only exist in the main thread)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then give back the count it had."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
