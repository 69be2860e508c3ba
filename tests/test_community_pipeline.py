"""The community pipelines in pipelines/, loaded the way users load them: custom_pipeline=<file>."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_customcontrast.testing.tiny_models import tiny_adapter

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
STEPS = dict(num_inference_steps=3, height=64, width=64, output_type="np")


@pytest.fixture
def community_sd(sd15_pipe, tmp_path):
    sd15_pipe.save_pretrained(tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "base", custom_pipeline=str(PIPELINES / "pipeline_customcontrast_sd.py"), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_customcontrast(tiny_adapter(pipe))
    return pipe


def run(pipe, **kwargs):
    return pipe("a toy on the beach", generator=torch.Generator().manual_seed(0), **{**STEPS, **kwargs})


def test_subject_arguments_match_the_ip_adapter_route(community_sd, subject_image):
    assert type(community_sd).__name__ == "CustomContrastStableDiffusionPipeline"
    friendly = run(community_sd, subject_image=subject_image, subject_scale=0.5).images
    community_sd.set_customcontrast_scale(0.5)
    plain = run(community_sd, ip_adapter_image=subject_image).images
    np.testing.assert_array_equal(friendly, plain)


def test_call_scales_are_restored(community_sd, subject_image):
    community_sd.set_customcontrast_scale(0.7, s_plus_scale=0.9)
    run(community_sd, subject_image=subject_image, subject_scale=0.0, s_plus_scale=0.0)
    ours = [p for p in community_sd.unet.attn_processors.values() if hasattr(p, "s_plus_scale")]
    assert ours and all(p.scale == [0.7] and p.s_plus_scale == 0.9 for p in ours)


def test_location_maps_per_step(community_sd, subject_image):
    out = run(community_sd, subject_image=subject_image, return_location_maps=True)
    assert len(out.location_maps) == STEPS["num_inference_steps"]
    for maps in out.location_maps:
        assert maps.shape == (2, 1, 32, 32) and ((maps > 0) & (maps < 1)).all()


def test_subject_masks(community_sd, subject_image, subject_image_b):
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    right = Image.eval(left, lambda v: 255 - v)
    a = run(community_sd, subject_image=[subject_image, subject_image_b], subject_masks=[left, right]).images
    b = run(community_sd, subject_image=[subject_image, subject_image_b], subject_masks=[right, left]).images
    assert np.abs(a - b).max() > 1e-5


def test_sdxl_community_pipeline(sdxl_pipe, subject_image, tmp_path):
    sdxl_pipe.save_pretrained(tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "base", custom_pipeline=str(PIPELINES / "pipeline_customcontrast_sdxl.py"), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_customcontrast(tiny_adapter(pipe))
    out = run(pipe, subject_image=subject_image, return_location_maps=True)
    assert np.isfinite(out.images).all() and len(out.location_maps) == STEPS["num_inference_steps"]
