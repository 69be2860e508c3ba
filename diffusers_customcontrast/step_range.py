"""The step range of a subject: which UNet calls of a generation it acts on, decided from the call's noise level.

``pipe.set_customcontrast_scale(scale, start=0.2, end=0.8)`` (or one call's ``SubjectOptions(start=, end=)``) lets the
subject act only on the UNet calls whose noise level lies in ``[start, end)``, as ComfyUI's ``start_at`` / ``end_at``
do: a fraction of the *training* schedule, 0 at pure noise (timestep ``T``, the scheduler's ``num_train_timesteps``,
1000 for SD1.5 and SDXL) and 1 at the clean image (timestep 0). A call at timestep ``t`` sits at position
``1 - t / T``; ``end = 1`` includes the last position. On the other calls the UNet computes exactly what the base model
computes: the adapter does not run and every cross-attention layer computes what it computes without a subject.

Why the noise level and not the step count: every UNet call receives its timestep, so the decision needs nothing from
the pipeline (no scheduler, no pipeline ``__call__``) and holds for every scheduler, for img2img and for the UNet
called directly. What it means for the usual schedulers (``docs/api.md`` has the table):

- DDIM, Euler, DPM-Solver++: one UNet call per step; ``start = 0.5`` acts on the steps at timesteps below ``T / 2``,
  about the second half of the steps with their default spacing.
- Heun (and PNDM's doubled first step): a step's second call is evaluated at the next step's timestep, so it follows
  the next step's noise level.
- img2img with ``strength = s`` starts at position about ``1 - s``: ``start = 0.5`` with ``strength = 0.5`` acts on
  every step it runs, and ``end = 0.4`` on none.

A range other than the full one reads the call's timestep on the host (one scalar per UNet call); the full range,
the default, reads nothing.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["DEFAULT_TRAIN_TIMESTEPS", "FULL_RANGE", "check_step_range", "in_step_range", "noise_position"]

FULL_RANGE = (0.0, 1.0)
DEFAULT_TRAIN_TIMESTEPS = 1000  # every SD1.5 / SDXL scheduler's num_train_timesteps


def check_step_range(start: Any, end: Any) -> tuple[float, float]:
    """``(start, end)`` as floats, or a one-sentence ``ValueError`` unless ``0 <= start < end <= 1``."""
    numbers_given = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (start, end))
    if not numbers_given or not 0 <= start < end <= 1:
        raise ValueError(
            "The subject's step range must be two numbers with 0 <= start < end <= 1 (fractions of the noise "
            f"schedule, e.g. start=0.0, end=0.6 for the noisiest 60 %), got start={start!r}, end={end!r}."
        )
    return float(start), float(end)


def noise_position(timestep: torch.Tensor | float, num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS) -> float:
    """The position ``1 - t / T`` of a UNet call at ``timestep`` (the first row's, as every row of a pipeline's call
    shares it) in the training schedule: 0 at pure noise, 1 at the clean image."""
    value = timestep.reshape(-1)[0].item() if isinstance(timestep, torch.Tensor) else timestep
    return 1.0 - float(value) / num_train_timesteps


def in_step_range(position: float, step_range: tuple[float, float]) -> bool:
    """Whether a call at ``position`` lies in ``[start, end)`` (``end = 1`` included)."""
    start, end = step_range
    return start <= position and (position < end or end == 1.0)
