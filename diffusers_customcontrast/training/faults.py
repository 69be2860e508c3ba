"""Faults of a training run that must not lose work: a stop request (SIGTERM), non-finite losses, bad samples.

The loop reads them at every optimizer step through :func:`agree_on_step`, one all-reduce that makes every process
take the same decision at the same step: stop (any process got SIGTERM), skip the update (the loss was not finite on
some process or micro-batch), and how many unusable samples the step's batches replaced (all processes together).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from types import FrameType

import torch
from accelerate import Accelerator

__all__ = ["NonFiniteLossError", "StepFaults", "StopRequest", "agree_on_step"]


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss (``max_consecutive_nonfinite``)."""


class StopRequest:
    """While entered, SIGTERM only sets :attr:`requested`: the loop saves a checkpoint at the next step and returns.

    A second SIGTERM gets the handler that was there before (by default: terminate at once). The handler can only be
    installed from the main thread; elsewhere the context does nothing.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.requested = False
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        # No logging here: a handler runs between two bytecodes of the main thread, which may hold logging's lock.
        self.requested = True
        self.received = signal.Signals(number).name
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))


@dataclass(frozen=True)
class StepFaults:
    """What all processes agreed on at the end of an optimizer step."""

    stop: bool  # some process was asked to stop
    nonfinite: bool  # some micro-batch of some process had a NaN / inf loss: skip the update
    skipped_samples: int  # unusable samples replaced in this step's batches, all processes together


def agree_on_step(accelerator: Accelerator, stop: bool, nonfinite: torch.Tensor, skipped_samples: int) -> StepFaults:
    """Sum the processes' flags in one all-reduce (``nonfinite``: a bool tensor on the device, not synced before)."""
    local = torch.tensor([float(stop), float(skipped_samples)], device=nonfinite.device)
    flags = accelerator.reduce(torch.cat([local, nonfinite.reshape(1).float()]), reduction="sum")
    stop_count, skipped, nonfinite_count = flags.tolist()
    return StepFaults(stop=stop_count > 0, nonfinite=nonfinite_count > 0, skipped_samples=int(skipped))
