"""The CustomContrast paper's DreamBench tables, and the two readings of its R- and E- columns.

The published rows are transcribed from the paper's tables (CustomContrast, AAAI 2025: the SD1.5 comparison and
the SDXL / other-bases comparison) so that a report can print a run's row under them. The paper does not say what
R- and E- mean; :data:`READINGS` maps each of the two readings onto our summary keys (docs/evaluation.md explains
why the reference / all-photos reading matches the published numbers better).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PAPER_CITATION = "CustomContrast (AAAI 2025)"

# The paper's column titles, in its order.
PAPER_COLUMNS = ("CLIP-T", "ImageReward", "R-CI", "E-CI", "R-DI", "E-DI")

# Reading -> paper column -> summary key (see .metrics). CLIP-T and ImageReward are over all images in both.
READINGS: dict[str, dict[str, str]] = {
    # R: similarity to the reference photo(s) the adapter was given; E: to all the subject's real photos.
    "reference": {
        "CLIP-T": "clip_t",
        "ImageReward": "image_reward",
        "R-CI": "clip_i_ref",
        "E-CI": "clip_i",
        "R-DI": "dino_ref",
        "E-DI": "dino",
    },
    # R: recontextualisation prompts; E: property / accessory edit prompts (both against all real photos).
    "prompt": {
        "CLIP-T": "clip_t",
        "ImageReward": "image_reward",
        "R-CI": "recontext_clip_i",
        "E-CI": "edit_clip_i",
        "R-DI": "recontext_dino",
        "E-DI": "edit_dino",
    },
}
READING_LABELS = {"reference": "R/E: reference / all photos", "prompt": "R/E: recontext. / edit prompts"}
# The reading whose numbers the paper's fit best, used for the main row and the sweep plot.
PREFERRED_READING = "reference"


def _row(*values: float) -> dict[str, float]:
    return dict(zip(PAPER_COLUMNS, values))


# Base model -> (method, paper columns) in the paper's order.
PAPER_TABLES: dict[str, tuple[tuple[str, dict[str, float]], ...]] = {
    "sd15": (
        ("Custom Diffusion", _row(0.258, -1.411, 0.863, 0.756, 0.661, 0.517)),
        ("DreamMatcher", _row(0.298, 0.157, 0.875, 0.781, 0.670, 0.540)),
        ("BLIP-Diffusion", _row(0.278, -0.801, 0.865, 0.768, 0.629, 0.535)),
        ("ELITE", _row(0.291, -0.664, 0.856, 0.762, 0.661, 0.533)),
        ("IP-Adapter-plus", _row(0.295, -0.611, 0.878, 0.766, 0.702, 0.558)),
        ("SSR-Encoder", _row(0.303, -0.894, 0.857, 0.767, 0.623, 0.524)),
        ("KOSMOS-G", _row(0.268, -1.446, 0.864, 0.753, 0.677, 0.531)),
        ("MoMA", _row(0.313, -0.243, 0.879, 0.772, 0.679, 0.550)),
        ("CustomContrast", _row(0.325, 0.454, 0.919, 0.788, 0.737, 0.591)),
    ),
    "sdxl": (
        ("lambda-ECLIPSE (Kandinsky 2.2)", _row(0.279, -1.031, 0.882, 0.773, 0.677, 0.511)),
        ("IP-Adapter-plus (SDXL)", _row(0.289, -0.714, 0.918, 0.790, 0.723, 0.570)),
        ("EMU2 (SDXL)", _row(0.298, -0.203, 0.914, 0.795, 0.719, 0.583)),
        ("MS-Diffusion (SDXL)", _row(0.312, -0.243, 0.901, 0.772, 0.682, 0.540)),
        ("CustomContrast (SDXL)", _row(0.329, 0.446, 0.927, 0.796, 0.742, 0.597)),
    ),
}
PAPER_TABLE_TITLES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL and other bases"}


def paper_row(summary: Mapping[str, Any], reading: str) -> dict[str, Any]:
    """A run's summary as a row of the paper's columns, under ``reading`` (a key of :data:`READINGS`)."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {sorted(READINGS)}, got {reading!r}.")
    return {column: summary.get(key) for column, key in READINGS[reading].items()}
