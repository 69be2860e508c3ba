"""Generate-and-score runs: one adapter scale, or a sweep of scales drawing the similarity / controllability curve.

The paper sweeps IP-Adapter's scale to trace how subject similarity (E-DI) trades against text controllability
(CLIP-T), and places CustomContrast above that curve. :func:`scale_sweep` produces such a curve for any pipeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .dreambench import DreamBenchSubject
from .generate import generate_dreambench
from .manifest import write_manifest
from .metrics import DreamBenchScorer, score_generations, summarize
from .processes import ProcessSplitter

logger = logging.getLogger(__name__)

SCORES_NAME = "scores.jsonl"


def scale_dir(output_dir: str | os.PathLike, scale: float) -> Path:
    """Folder of one sweep point: ``<output_dir>/scale_<scale>`` (``scale_0.5``, ``scale_1``)."""
    return Path(output_dir) / f"scale_{scale:g}"


def evaluate_pipeline(
    pipe: Any,
    subjects: Sequence[DreamBenchSubject],
    output_dir: str | os.PathLike,
    scorer: DreamBenchScorer | None,
    accelerator: ProcessSplitter | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any] | None:
    """Generate DreamBench images, score them and summarise the scores.

    Generation runs on every process; scoring runs on the main process only, which also writes
    ``<output_dir>/scores.jsonl`` (one scored record per image).

    Args:
        pipe: The pipeline, see :func:`~.generate.generate_dreambench`.
        subjects: Subjects to evaluate.
        output_dir: Folder for images, manifest and scores.
        scorer: The metric models; only needed on the main process.
        accelerator: Optional process splitter, see :func:`~.generate.generate_dreambench`.
        **generate_kwargs: Passed to :func:`~.generate.generate_dreambench` (``scale``, ``images_per_prompt``...).

    Returns:
        The summary from :func:`~.metrics.summarize` on the main process, ``None`` on the others.
    """
    records = generate_dreambench(pipe, subjects, output_dir, accelerator=accelerator, **generate_kwargs)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    if scorer is None:
        raise ValueError("The main process needs a scorer.")
    real_images = {subject.name: list(subject.image_paths) for subject in subjects}
    scored = score_generations(scorer, records, real_images)
    # Same format as the manifest (relative paths), so read_manifest() reads it back.
    write_manifest(Path(output_dir) / SCORES_NAME, scored)
    summary = summarize(scored)
    logger.info("%s: %s", output_dir, _format_summary(summary))
    return summary


def scale_sweep(
    pipe: Any,
    subjects: Sequence[DreamBenchSubject],
    scales: Sequence[float],
    output_dir: str | os.PathLike,
    scorer: DreamBenchScorer | None,
    accelerator: ProcessSplitter | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Evaluate the pipeline at each adapter scale, each into ``<output_dir>/scale_<s>/``.

    Args:
        pipe: The pipeline; its scale is set with ``set_customcontrast_scale`` or ``set_ip_adapter_scale``.
        subjects: Subjects to evaluate.
        scales: Adapter scales, evaluated in this order.
        output_dir: Parent folder of the per-scale folders.
        scorer: The metric models; only needed on the main process.
        accelerator: Optional process splitter.
        **generate_kwargs: Passed to :func:`~.generate.generate_dreambench` (not ``scale``).

    Returns:
        The curve: one ``{"scale": s, **summary}`` per scale on the main process, an empty list on the others.
    """
    if "scale" in generate_kwargs:
        raise TypeError("Pass the scales as `scales`, not `scale`.")
    curve = []
    for scale in scales:
        summary = evaluate_pipeline(
            pipe,
            subjects,
            scale_dir(output_dir, scale),
            scorer,
            accelerator=accelerator,
            scale=scale,
            **generate_kwargs,
        )
        if summary is not None:
            curve.append({"scale": scale, **summary})
    return curve


def _format_summary(summary: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in summary.items()
    )
