"""Reports of DreamBench results: ``results.json``, a markdown table laid out like the paper's, and the sweep plot.

The results object is the dict returned by :func:`~.cli.run_evaluation`::

    {"method": "CustomContrast", "config": {...}, "summary": {...} | None, "sweep": [{"scale": 0.5, ...}, ...]}

where a summary is the output of :func:`~.metrics.summarize`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
SWEEP_PLOT = "scale_sweep.png"

# The paper's columns, minus ImageReward (not computed: image-reward does not run with transformers 5).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("CLIP-T", "clip_t"),
    ("R-CI", "r_clip_i"),
    ("E-CI", "e_clip_i"),
    ("R-DI", "r_dino"),
    ("E-DI", "e_dino"),
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
    """A markdown table with one row per (label, summary): ``first_column`` then each (title, key) of ``columns``.

    The default is the paper's table, ``Method | CLIP-T | R-CI | E-CI | R-DI | E-DI``.
    """
    lines = [
        f"| {first_column} | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, summary in rows:
        lines.append(f"| {label} | " + " | ".join(formatter(summary.get(key)) for _, key in columns) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(results: Sequence[Mapping[str, Any]]) -> str:
    """The ``results.md`` document: the table of all given results objects, with the protocol in a note."""
    rows = [row for result in results for row in result_rows(result)]
    counts = ", ".join(
        f"{label}: {summary.get('count', 0)} images ({summary.get('r_count', 0)} R / {summary.get('e_count', 0)} E)"
        for label, summary in rows
    )
    return (
        "# DreamBench results\n\n"
        + markdown_table(rows)
        + "\nCLIP-T: CLIP ViT-B/32 image-text cosine with the prompt without identifier. CI: CLIP ViT-B/32 and "
        "DI: DINO ViT-S/16 image-image cosine, mean over the subject's real images. R-: recontextualisation "
        "prompts, E-: property / accessory edit prompts. ImageReward is not computed (image-reward does not work "
        "with transformers 5).\n\n" + f"Images: {counts}.\n"
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
    x_key: str = "clip_t",
    y_key: str = "e_dino",
    fallback_y_key: str = "dino",
    title: str = "DreamBench adapter-scale sweep",
) -> Path:
    """Plot similarity against controllability, one line per method, each point labelled with its scale.

    Args:
        curves: Method name -> sweep points (``{"scale": s, **summary}``), in sweep order.
        path: PNG file to write.
        x_key: Summary key on the x axis (controllability, CLIP-T).
        y_key: Summary key on the y axis (similarity, E-DI).
        fallback_y_key: Used instead of ``y_key`` when some point lacks it (no edit prompts evaluated).
        title: Title of the plot.

    Returns:
        The path written.
    """
    # The object-oriented API with the Agg canvas neither needs a display nor changes the global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [point for curve in curves.values() for point in curve]
    if any(point.get(y_key) is None for point in points):
        y_key = fallback_y_key
    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method, curve in curves.items():
        xs = [point[x_key] for point in curve]
        ys = [point[y_key] for point in curve]
        axes.plot(xs, ys, marker="o", label=method)
        for point, x, y in zip(curve, xs, ys):
            if point.get("scale") is not None:  # reference points (no adapter) have no scale
                axes.annotate(f"{point['scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(f"{_axis_name(x_key)} (controllability)")
    axes.set_ylabel(f"{_axis_name(y_key)} (subject similarity)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=150)
    return path


def _axis_name(key: str) -> str:
    names = {key: name for name, key in TABLE_COLUMNS}
    names.update({"clip_i": "CLIP-I", "dino": "DINO"})
    # The synthetic world's metrics (diffusers_customcontrast.world.metrics).
    names.update({"subject_similarity": "identity cosine", "controllability": "prompted scene present"})
    return names.get(key, key)


def write_report(
    output_dir: str | os.PathLike,
    results: Mapping[str, Any],
    compare: Sequence[Mapping[str, Any]] = (),
) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and, when any results hold a sweep, ``scale_sweep.png``.

    Args:
        output_dir: Folder for the files.
        results: This run's results object (the only one written to ``results.json``).
        compare: Results objects of other runs (e.g. an IP-Adapter sweep) added to the table and plot.

    Returns:
        File kind -> path of each file written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    everything = [results, *compare]
    files = {
        "json": str(write_results_json(output_dir / RESULTS_JSON, results)),
        "markdown": str(output_dir / RESULTS_MARKDOWN),
    }
    Path(files["markdown"]).write_text(markdown_report(everything), encoding="utf-8")
    curves = {result.get("method", "method"): result["sweep"] for result in everything if result.get("sweep")}
    if curves:
        files["plot"] = str(plot_scale_sweep(curves, output_dir / SWEEP_PLOT))
    logger.info("Wrote %s", ", ".join(files.values()))
    return files
