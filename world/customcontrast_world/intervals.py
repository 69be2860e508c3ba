"""Means and 95 % bootstrap intervals of world metrics over subjects and seeds.

A benchmark run is repeated with several seeds (training and generation); each seed scores the same held-out
subjects. Images of one subject are not independent, nor are the subjects of one seed, so the unit of resampling
is the pair: a bootstrap sample draws seeds with replacement and, independently, subjects with replacement, and
takes every image of each drawn (seed, subject) cell. The interval is the 2.5-97.5 percentile range of the metric
over the samples; the reported mean is the metric on all the images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .evaluation import ImageScores

__all__ = ["METRICS", "bootstrap_intervals", "interval"]

# name -> (per-image value, which images it applies to)
Reading = Callable[[ImageScores], tuple[np.ndarray, np.ndarray]]

METRICS: dict[str, Reading] = {
    "similarity": lambda s: (s.similarity, np.ones_like(s.sketch)),
    "identity_acc": lambda s: (s.identified, np.ones_like(s.sketch)),
    "shape_acc": lambda s: (s.shape, np.ones_like(s.sketch)),
    "colour_acc": lambda s: (s.color, ~s.sketch),
    "texture_acc": lambda s: (s.texture, np.ones_like(s.sketch)),
    "controllability": lambda s: (s.obeyed, np.ones_like(s.sketch)),
    "background_acc": lambda s: (s.obeyed, ~s.sketch),
    "sketch_acc": lambda s: (s.obeyed, s.sketch),
}
"""The metric names of ``results.json`` and how each reads an :class:`ImageScores` (colour and background: photo
prompts only; sketch: sketch prompts only)."""


def bootstrap_intervals(
    per_seed: Sequence[ImageScores], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "low", "high"}}`` for every metric of :data:`METRICS` over seeds and subjects.

    ``per_seed`` holds one :class:`ImageScores` per seed, all of the same subjects.
    """
    subjects = list(dict.fromkeys(per_seed[0].subject_ids))
    if any(set(s.subject_ids) != set(subjects) for s in per_seed):
        raise ValueError("expected every seed to score the same subjects")
    return {
        name: interval(*_cells(per_seed, subjects, reading), resamples, seed, level)
        for name, reading in METRICS.items()
    }


def interval(
    sums: np.ndarray, counts: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean and bootstrap interval of a metric given per (seed, subject) cell sums and counts, ``[S, N]`` each.

    The mean is ``sums.sum() / counts.sum()``; a bootstrap sample draws seeds and subjects with replacement and
    holds each (seed, subject) cell as often as both were drawn.
    """
    rng = np.random.default_rng(seed)
    seed_weights = _draw_counts(rng, resamples, sums.shape[0])  # [R, S]: times each seed is drawn
    subject_weights = _draw_counts(rng, resamples, sums.shape[1])  # [R, N]
    total = np.einsum("rs,sn,rn->r", seed_weights, sums, subject_weights)
    number = np.einsum("rs,sn,rn->r", seed_weights, counts, subject_weights)
    samples = total[number > 0] / number[number > 0]
    if not counts.sum() or not len(samples):
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"mean": float(sums.sum() / counts.sum()), "low": float(low), "high": float(high)}


def _cells(per_seed: Sequence[ImageScores], subjects: list[str], reading: Reading) -> tuple[np.ndarray, np.ndarray]:
    """Per (seed, subject): the sum of the metric over the images it applies to, and their number."""
    sums = np.zeros((len(per_seed), len(subjects)))
    counts = np.zeros_like(sums)
    for s, scores in enumerate(per_seed):
        values, applies = reading(scores)
        column = np.array([subjects.index(sid) for sid in scores.subject_ids])
        np.add.at(sums[s], column[applies], values[applies].astype(float))
        np.add.at(counts[s], column[applies], 1.0)
    return sums, counts


def _draw_counts(rng: np.random.Generator, resamples: int, size: int) -> np.ndarray:
    """How many times each of ``size`` indices is drawn in each of ``resamples`` draws of ``size`` with replacement."""
    draws = rng.integers(0, size, (resamples, size))
    return np.stack([np.bincount(row, minlength=size) for row in draws]).astype(float)
