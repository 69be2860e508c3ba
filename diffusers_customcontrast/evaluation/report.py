"""Reports of DreamBench results: ``results.json``, ``results.md`` (the paper's table with this run's rows under the
published ones, and every metric under unambiguous names) and the scale-sweep plot.

The results object is the dict returned by :func:`~.cli.run_evaluation`::

    {"method": "CustomContrast", "config": {...}, "metric_models": {"clip": ..., "dino": ..., "image_reward": ...},
     "paper_table": "sd15", "summary": {...} | None, "sweep": [{"scale": 0.5, ...}, ...], "files": {...}}

where a summary is the output of :func:`~.metrics.summarize`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .paper import (
    PAPER_CITATION,
    PAPER_COLUMNS,
    PAPER_TABLE_TITLES,
    PAPER_TABLES,
    PREFERRED_READING,
    READING_LABELS,
    READINGS,
    paper_row,
)

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
SWEEP_PLOT = "scale_sweep.png"

# Every summary column of a run, named so that the two readings of the paper's R-/E- cannot be confused.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("CLIP-T", "clip_t"),
    ("ImageReward", "image_reward"),
    ("CI ref", "clip_i_ref"),
    ("CI all", "clip_i"),
    ("DI ref", "dino_ref"),
    ("DI all", "dino"),
    ("CI recontext", "recontext_clip_i"),
    ("CI edit", "edit_clip_i"),
    ("DI recontext", "recontext_dino"),
    ("DI edit", "edit_dino"),
)
_COLUMN_NOTE = (
    "CI: CLIP-I, DI: DINO (image-image cosines). *ref*: with the reference photo(s) the adapter was given; *all*: "
    "mean over all the subject's real photos (the DreamBench protocol); *recontext* / *edit*: the *all* value over "
    "recontextualisation / property-and-accessory edit prompts only. CLIP-T and ImageReward use the prompt "
    "without identifier."
)


def format_metric(value: float | None) -> str:
    """Format a metric as the paper does: three decimals without the leading zero (``.325``, ``-.611``)."""
    if value is None:
        return "-"
    text = f"{value:.3f}"
    return text.replace("0.", ".", 1) if text.lstrip("-").startswith("0.") else text


def result_rows(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Table rows of one results object: one per sweep point, or a single row for a single run."""
    method = results.get("method", "method")
    sweep = results.get("sweep") or []
    if sweep:
        return [(f"{method} (scale {point['scale']:g})", point) for point in sweep]
    return [(method, results["summary"])] if results.get("summary") else []


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
    first_column: str = "Method",
    formatter: Callable[[Any], str] = format_metric,
) -> str:
    """A markdown table with one row per (label, summary): ``first_column`` then each (title, key) of ``columns``."""
    lines = [
        f"| {first_column} | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, summary in rows:
        lines.append(f"| {label} | " + " | ".join(formatter(summary.get(key)) for _, key in columns) + " |")
    return "\n".join(lines) + "\n"


def paper_layout_table(results: Sequence[Mapping[str, Any]], paper_table: str = "sd15") -> str:
    """The paper's table (``sd15`` or ``sdxl``) with the given runs' rows under the published ones.

    Each run gets one row per reading of R-/E-, the preferred reading first and in bold.
    """
    if paper_table not in PAPER_TABLES:
        raise ValueError(f"paper_table must be one of {sorted(PAPER_TABLES)}, got {paper_table!r}.")
    columns = [(title, title) for title in PAPER_COLUMNS]
    rows: list[tuple[str, Mapping[str, Any]]] = [
        (f"{method} (paper)", row) for method, row in PAPER_TABLES[paper_table]
    ]
    readings = [PREFERRED_READING, *(name for name in READINGS if name != PREFERRED_READING)]
    for result in results:
        for label, summary in result_rows(result):
            for reading in readings:
                name = f"**{label}**" if reading == PREFERRED_READING else label
                rows.append((f"{name}, {READING_LABELS[reading]}", paper_row(summary, reading)))
    return markdown_table(rows, columns)


def markdown_report(results: Sequence[Mapping[str, Any]], paper_table: str | None = "sd15") -> str:
    """The ``results.md`` document for the given results objects (this run first, then compared runs).

    Args:
        results: Results objects.
        paper_table: Which of the paper's tables to print the runs under (``sd15`` or ``sdxl``); ``None`` for none.
    """
    rows = [row for result in results for row in result_rows(result)]
    parts = ["# DreamBench results\n"]
    if paper_table is not None:
        parts.append(
            f"## Beside the paper ({PAPER_TABLE_TITLES[paper_table]})\n\n"
            + paper_layout_table(results, paper_table)
            + f"\nRows marked (paper) are the published numbers of {PAPER_CITATION}, not measured here. The paper "
            "does not define R- and E-, so each run is shown under both readings: R/E as similarity to the "
            "reference photo(s) vs to all real photos (in bold: the reading that fits the published numbers, see "
            "docs/evaluation.md), and R/E as recontextualisation vs edit prompts.\n"
        )
    parts.append("## All metrics\n\n" + markdown_table(rows) + "\n" + _COLUMN_NOTE + "\n")
    parts.append("Metric models: " + "; ".join(_models_note(result) for result in results) + ".\n")
    counts = ", ".join(
        f"{label}: {summary.get('count', 0)} images ({summary.get('recontext_count', 0)} recontext. / "
        f"{summary.get('edit_count', 0)} edit)"
        for label, summary in rows
    )
    parts.append(f"Images: {counts}.\n")
    return "\n".join(parts)


def _models_note(results: Mapping[str, Any]) -> str:
    models = results.get("metric_models")
    if not models:
        return f"{results.get('method', 'method')}: not recorded"
    reward = models.get("image_reward")
    reward_text = f"ImageReward `{reward}`" if reward else "ImageReward not computed (no --imagereward_model)"
    return (
        f"{results.get('method', 'method')}: CLIP `{models.get('clip')}` (CLIP-T, CI), DINO `{models.get('dino')}` "
        f"(DI), {reward_text}"
    )


def write_results_json(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write a results object as indented JSON."""
    path = Path(path)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def load_results_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results object written by :func:`write_results_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def plot_scale_sweep(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    x_keys: Sequence[str] = ("clip_t", "image_reward"),
    y_key: str = READINGS[PREFERRED_READING]["E-DI"],
    title: str = "DreamBench adapter-scale sweep",
) -> Path:
    """Plot similarity against controllability, one line per method, each point labelled with its scale.

    Args:
        curves: Method name -> sweep points (``{"scale": s, **summary}``), in sweep order.
        path: PNG file to write.
        x_keys: Controllability keys, one panel each (CLIP-T, ImageReward); a key some point lacks gets no panel.
        y_key: Similarity key on the y axis (default DINO over all real photos: E-DI in the preferred reading).
        title: Title of the figure.

    Returns:
        The path written.
    """
    # The object-oriented API with the Agg canvas neither needs a display nor changes the global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [point for curve in curves.values() for point in curve]
    panels = [key for key in x_keys if points and all(point.get(key) is not None for point in points)]
    if not panels:
        raise ValueError(f"No sweep point has all of {list(x_keys)}; nothing to plot.")
    figure = Figure(figsize=(6 * len(panels), 4.5))
    FigureCanvasAgg(figure)
    for position, x_key in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        for method, curve in curves.items():
            xs = [point[x_key] for point in curve]
            ys = [math.nan if point.get(y_key) is None else point[y_key] for point in curve]
            axes.plot(xs, ys, marker="o", label=method)
            for point, x, y in zip(curve, xs, ys):
                if point.get("scale") is not None:  # reference points (no adapter) have no scale
                    axes.annotate(f"{point['scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel(f"{_axis_name(x_key)} (controllability)")
        axes.set_ylabel(f"{_axis_name(y_key)} (subject similarity)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=150)
    return path


def _axis_name(key: str) -> str:
    return {key: title for title, key in TABLE_COLUMNS}.get(key, key)


def write_report(
    output_dir: str | os.PathLike,
    results: Mapping[str, Any],
    compare: Sequence[Mapping[str, Any]] = (),
) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and, when any results hold a sweep, ``scale_sweep.png``.

    Args:
        output_dir: Folder for the files.
        results: This run's results object (the only one written to ``results.json``, with a ``files`` entry
            naming the files written). Its ``paper_table`` (default ``sd15``) picks the paper's table in
            ``results.md``.
        compare: Results objects of other runs (e.g. an IP-Adapter sweep) added to the tables and the plot.

    Returns:
        File kind -> path of each file written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    everything = [results, *compare]
    files = {"json": str(output_dir / RESULTS_JSON), "markdown": str(output_dir / RESULTS_MARKDOWN)}
    Path(files["markdown"]).write_text(
        markdown_report(everything, results.get("paper_table", "sd15")), encoding="utf-8"
    )
    curves = {result.get("method", "method"): result["sweep"] for result in everything if result.get("sweep")}
    if curves:
        files["plot"] = str(plot_scale_sweep(curves, output_dir / SWEEP_PLOT))
    write_results_json(files["json"], {**results, "files": files})
    logger.info("Wrote %s", ", ".join(files.values()))
    return files
