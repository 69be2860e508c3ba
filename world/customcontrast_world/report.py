"""Figures and tables of world runs: image grids, loss curves, score tables (shared by the demo and the benchmark)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from diffusers_customcontrast.data.synthetic import SHAPES
from diffusers_customcontrast.evaluation.report import markdown_table

__all__ = ["image_grid", "intervals_table", "plot_intervals_tradeoff", "plot_loss_curves", "scores_table", "smoothed"]

SCORE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("subject similarity", "subject_similarity"),
    ("± s.e.", "subject_similarity_se"),
    ("identity acc.", "identity_accuracy"),
    ("controllability", "controllability"),
    ("background acc.", "background_accuracy"),
    ("sketch acc.", "sketch_accuracy"),
    ("colour acc.", "color_accuracy"),
    ("texture acc.", "texture_accuracy"),
    ("shape acc.", "shape_accuracy"),
)
"""(title, key) of the score columns of :func:`scores_table`."""


INTERVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("identity acc.", "identity_acc"),
    ("shape acc.", "shape_acc"),
    ("colour acc.", "colour_acc"),
    ("texture acc.", "texture_acc"),
    ("controllability", "controllability"),
    ("background acc.", "background_acc"),
    ("sketch acc.", "sketch_acc"),
    ("similarity", "similarity"),
)
"""(title, metric) of the columns of :func:`intervals_table`: the metric names of the benchmark's ``results.json``."""


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell: int = 96,
    label_width: int = 150,
    label_height: int = 28,
) -> Image.Image:
    """Paste images into a grid of ``cell`` px squares, with optional text labels left of rows and above columns."""
    left = label_width if row_labels else 0
    top = label_height if column_labels else 0
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (left + cell * columns, top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for x, label in enumerate(column_labels or ()):
        _draw_label(draw, label, (left + x * cell + 3, 2), cell - 6)
    for y, row in enumerate(rows):
        if row_labels:
            _draw_label(draw, row_labels[y], (3, top + y * cell + cell // 2 - 6), label_width - 6)
        for x, image in enumerate(row):
            grid.paste(
                image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (left + x * cell, top + y * cell)
            )
    return grid


def _draw_label(draw: ImageDraw.ImageDraw, text: str, origin: tuple[int, int], width: int) -> None:
    """Draw ``text`` wrapped to ``width`` px (the default bitmap font: about 6 px a character)."""
    per_line = max(1, width // 6)
    lines = [text[i : i + per_line] for i in range(0, len(text), per_line)][:2]
    draw.multiline_text(origin, "\n".join(lines), fill="black", spacing=1)


def smoothed(values: Sequence[float], window: int = 25) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot_loss_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    terms: Sequence[str] = ("diffusion", "cscl", "macl", "location"),
    window: int = 25,
) -> Path:
    """One panel per loss term, one line per run (moving average over ``window`` steps); writes a PNG.

    ``histories`` maps a run's name to its ``loss_history`` (:class:`~diffusers_customcontrast.training.
    TrainingResult`, or ``loss_history.jsonl`` of an exported adapter). Terms a run did not compute are skipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    terms = [t for t in terms if any(t in entry for history in histories.values() for entry in history)]
    figure = Figure(figsize=(3.2 * len(terms), 3.0))
    FigureCanvasAgg(figure)
    for i, term in enumerate(terms):
        axes = figure.add_subplot(1, len(terms), i + 1)
        for name, history in histories.items():
            points = [(entry["step"], entry[term]) for entry in history if term in entry]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, smoothed(values, window), label=name, linewidth=1.2)
        axes.set_title(term)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    if terms:
        figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def scores_table(rows: Sequence[tuple[str, Mapping[str, Any]]], extra: Sequence[tuple[str, str]] = ()) -> str:
    """A markdown table: one row per (name, scores) pair, the :data:`SCORE_COLUMNS` then ``extra`` (title, key)."""
    return markdown_table(rows, (*SCORE_COLUMNS, *extra), first_column="run", formatter=_cell).rstrip("\n")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def intervals_table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], extra: Sequence[tuple[str, str]] = (), first_column: str = "run"
) -> str:
    """A markdown table of ``{metric: {"mean", "low", "high"}}`` rows: each cell ``mean [low, high]``."""
    return markdown_table(
        rows, (*INTERVAL_COLUMNS, *extra), first_column=first_column, formatter=_interval_cell
    ).rstrip("\n")


def per_layer_table(rows: Sequence[tuple[str, Sequence[float]]], first_column: str = "run") -> str:
    """A markdown table of one fraction per cross-attention layer: a row per (name, values), a column per layer."""
    columns = [(f"layer {i}", i) for i in range(max(len(values) for _, values in rows))]
    return markdown_table(
        [(name, dict(enumerate(values))) for name, values in rows],
        columns,
        first_column=first_column,
        formatter=lambda value: "-" if value is None else f"{value:.3f}",
    ).rstrip("\n")


def shape_class_table(rows: Sequence[tuple[str, Mapping[str, float]]], first_column: str = "shape accuracy") -> str:
    """A markdown table of per-class shape accuracy: a row per (name, ``{shape: fraction}``), a column per shape."""
    return markdown_table(
        rows,
        [(shape, shape) for shape in SHAPES],
        first_column=first_column,
        formatter=lambda value: "-" if value is None else f"{value:.0%}",
    ).rstrip("\n")


def _interval_cell(value: Any) -> str:
    if not isinstance(value, Mapping):
        return "-"
    if np.isnan(value["mean"]):
        return "-"
    return f"{value['mean']:.3f} [{value['low']:.2f}, {value['high']:.2f}]"


def plot_intervals_tradeoff(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    references: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    x_key: str,
    y_key: str,
) -> Path:
    """Similarity against controllability with 95 % intervals as error bars, one line per run over its scales.

    ``curves`` maps a run to its points ``{"scale", x_key: {"mean", "low", "high"}, ...}``; ``references`` are
    single points (the base model, real renders).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def bars(points: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[list[float]]]:
        means = [p[key]["mean"] for p in points]
        return means, [
            [m - p[key]["low"] for m, p in zip(means, points)],
            [p[key]["high"] - m for m, p in zip(means, points)],
        ]

    figure = Figure(figsize=(6.5, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, points in [*curves.items(), *((n, [p]) for n, p in references.items())]:
        (xs, xerr), (ys, yerr) = bars(points, x_key), bars(points, y_key)
        style = {"marker": "o"} if name in curves else {"marker": "s", "linestyle": "none"}
        axes.errorbar(xs, ys, xerr=xerr, yerr=yerr, label=name, capsize=2, linewidth=1.2, **style)
        for point, x, y in zip(points, xs, ys):
            if point.get("scale") is not None and len(points) > 1:
                axes.annotate(f"{point['scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel(f"{x_key} (prompted scene present)")
    axes.set_ylabel(f"{y_key} (identity cosine)")
    axes.set_title("Synthetic world, held-out subjects (95 % intervals)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=140)
    return path
