"""The step range of a subject: which denoising steps of a generation it acts on.

``pipe.set_customcontrast_scale(scale, start=0.2, end=0.8)`` (or one call's ``SubjectOptions(start=, end=)``) lets the
subject act only on the steps whose position in the schedule, ``i / N`` for step ``i`` of the ``N`` steps the call
runs, lies in ``[start, end)``. On the other steps the UNet call is exactly the base model's: the adapter does not run
and every cross-attention layer computes what it computes without a subject.

How a UNet call learns its step, with nothing stored on the UNet. A step is the scheduler's, not a UNet call: Heun's
and KDPM2's steps call the UNet twice (at the step's timestep, then at the next one), PNDM's first step calls it twice,
and img2img runs only the tail of the schedule (``strength``). A timestep value alone cannot tell Heun's second call of
step ``i`` from the first call of step ``i + 1`` (both are at the same timestep). The pipeline's scheduler knows: the
index of the current call in ``scheduler.timesteps`` is ``scheduler.step_index`` for the schedulers that count their
calls (Euler, Heun, DPM-Solver, UniPC, LMS...), ``begin_index`` on img2img's first call before they have counted,
PNDM's ``counter``, and the position of the call's timestep among the distinct timesteps of DDIM or DDPM. The pipeline
knows how many of those timesteps it runs (``pipe.num_timesteps``); ``scheduler.order`` and the pipeline's own count of
warm-up calls turn calls into steps, as diffusers' progress bar does.

The UNet's pre-hook sees only the UNet, so it finds the pipeline call in progress through a context variable that
every IP-Adapter pipeline's ``__call__`` sets for its duration (:func:`pipeline_call`, installed by
:func:`~diffusers_customcontrast.loaders.pipeline.register_pipeline_methods`). It is per thread and per asyncio task,
so pipelines that share one UNet from several threads (``from_pipe`` with a scheduler each) count their own steps, and
a ``callback_on_step_end`` that changes the pipeline between steps changes nothing here. Outside a pipeline call
(training, the UNet called directly) there are no steps: the subject acts on every call.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

__all__ = ["FULL_RANGE", "check_step_range", "in_step_range", "pipeline_call", "step_position"]

FULL_RANGE = (0.0, 1.0)

_PIPELINE_CALLS: ContextVar[tuple[Any, ...]] = ContextVar("customcontrast_pipeline_calls", default=())


def check_step_range(start: Any, end: Any) -> tuple[float, float]:
    """``(start, end)`` as floats, or a one-sentence ``ValueError`` unless ``0 <= start < end <= 1``."""
    numbers_given = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (start, end))
    if not numbers_given or not 0 <= start < end <= 1:
        raise ValueError(
            "The subject's step range must be two numbers with 0 <= start < end <= 1 (fractions of the denoising "
            f"steps, e.g. start=0.0, end=0.6 for the first 60 %), got start={start!r}, end={end!r}."
        )
    return float(start), float(end)


def in_step_range(position: float | None, step_range: tuple[float, float]) -> bool:
    """Whether a call at ``position`` (``None``: outside a pipeline call) is inside ``[start, end)``."""
    start, end = step_range
    return position is None or start <= position < end


@contextmanager
def pipeline_call(pipe: Any) -> Iterator[None]:
    """Within the block, UNet calls of ``pipe.unet`` learn their step from ``pipe``'s scheduler."""
    token = _PIPELINE_CALLS.set((*_PIPELINE_CALLS.get(), pipe))
    try:
        yield
    finally:
        _PIPELINE_CALLS.reset(token)


# Eager only: dynamo cannot read a context variable. Under torch.compile of the whole UNet this breaks the graph
# (with fullgraph=True, dynamo refuses); diffusers' regional compilation runs the pre-hook eagerly anyway.
@torch.compiler.disable
def step_position(unet: nn.Module, timestep: torch.Tensor | float) -> float | None:
    """The position ``i / N`` of the step that the current call of ``unet`` belongs to, in the pipeline call in
    progress; ``None`` outside a pipeline call, or for a timestep that is not in its scheduler's schedule."""
    pipe = next((p for p in reversed(_PIPELINE_CALLS.get()) if getattr(p, "unet", None) is unet), None)
    if pipe is None:
        return None
    scheduler = pipe.scheduler
    timesteps = scheduler.timesteps
    total = len(timesteps)
    # The timesteps the pipeline runs are the tail of the scheduler's (img2img cuts the head off).
    run = getattr(pipe, "num_timesteps", None)
    if not isinstance(run, int) or not 0 < run <= total:
        run = total - (getattr(scheduler, "begin_index", None) or 0)
    first = total - run
    call = _call_index(scheduler, timesteps, first, timestep)
    if call is None:
        return None
    order = getattr(scheduler, "order", 1)
    steps = max(1, (getattr(scheduler, "num_inference_steps", None) or -(-total // order)) - first // order)
    # Calls beyond steps * order are warm-up calls at the start (PNDM's doubled first step); Heun's last step has a
    # single call (warmup -1). A step is done after each `order`-th call past the warm-up, as diffusers' progress bar
    # counts it.
    warmup = max(run - steps * order, 0)
    done = max(min(call, run - 1) // order - warmup // order, 0)
    return min(done, steps - 1) / steps


def _call_index(scheduler: Any, timesteps: torch.Tensor, first: int, timestep: torch.Tensor | float) -> int | None:
    """The index of the current call among the calls the pipeline runs (0 for the first)."""
    step_index = getattr(scheduler, "step_index", None)  # counts from begin_index: an index in scheduler.timesteps
    if step_index is None:
        step_index = getattr(scheduler, "begin_index", None)  # img2img's first call, before the scheduler counts
    if isinstance(step_index, int):
        return step_index - first
    counter = getattr(scheduler, "counter", None)  # PNDM: calls of step() in this generation
    if isinstance(counter, int):
        return counter
    value = torch.as_tensor(timestep).reshape(-1)[0].to(timesteps.device, timesteps.dtype)
    matches = (timesteps[first:] == value).nonzero()
    return int(matches[0]) if len(matches) else None
