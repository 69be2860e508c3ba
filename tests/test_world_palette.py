"""The judge's colour reading by the world's palette, on hand-built scenes and on the world's own renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from customcontrast_world.judge import WorldJudge
from customcontrast_world.palette import palette_colors
from diffusers_customcontrast.data.synthetic import COLORS, SyntheticSubject, View, render_view


def _render(subject: SyntheticSubject, background: str, brightness: float = 1.0, companion: str | None = None):
    view = View(rotation=20.0, scale=0.6, center=(0.5, 0.5), background=background, brightness=brightness,
                companion=companion)  # fmt: skip
    return np.asarray(render_view(subject, view)[0])


@pytest.mark.parametrize(
    ("subject", "background", "brightness", "companion", "expected"),
    [
        (SyntheticSubject("square", "solid", "red", "red"), "blue", 1.0, None, ("red",)),
        (SyntheticSubject("star", "stripes", "yellow", "purple"), "grass", 0.82, None, ("yellow", "purple")),
        (SyntheticSubject("heart", "checker", "black", "pink"), "night", 1.12, "ball", ("pink", "black")),
        (SyntheticSubject("hexagon", "dots", "brown", "gray"), "snow", 1.0, "cone", ("brown", "gray")),
        # The background hides the subject's red stripes: the background's colour stands in for them.
        (SyntheticSubject("circle", "stripes", "red", "cyan"), "red", 1.0, None, ("red", "cyan")),
    ],
)
def test_palette_colors_reads_the_subjects_colours_under_any_lighting(
    subject, background, brightness, companion, expected
):
    count = len(subject.visible_colors)
    assert palette_colors(_render(subject, background, brightness, companion), count) == expected


def test_palette_colors_of_an_empty_scene_is_no_subject():
    sky = np.tile(np.linspace(60, 200, 64)[:, None, None], (1, 64, 3))  # a grey gradient, no object
    assert len(palette_colors(sky, 2)) < 2


def test_the_judge_reads_colours_by_palette_unless_told_to_use_its_head():
    subject = SyntheticSubject("cross", "solid", "green", "green")
    image = render_view(subject, View(0.0, 0.6, (0.5, 0.5), "desert"))[0]
    torch.manual_seed(0)
    judge = WorldJudge(channels=(8, 8), embedding_dim=8).eval()
    head = WorldJudge(channels=(8, 8), embedding_dim=8, color_reading="head").eval()
    head.load_state_dict(judge.state_dict())
    read = judge.judge([image])[1]
    count = 1 if read["texture"][0] == "solid" else 2
    assert read["colors"][0] == palette_colors(np.asarray(image), count)
    logits = head(head.pixels([image]))[1]["colors"][0]
    assert head.judge([image])[1]["colors"][0] == tuple(COLORS[i] for i in sorted(logits.topk(count).indices.tolist()))
    with pytest.raises(ValueError, match="color_reading must be one of palette, head, got 'hsv'"):
        WorldJudge(color_reading="hsv")
