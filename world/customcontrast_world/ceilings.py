"""The ceiling of each stage of the world's chain: what the judge reads in the images each stage can give.

Every image an adapter makes passes through the stages before it, so a stage can only be as good as the ones
before it. The chain, scored by the same judge on the same prompted held-out scenes:

1. ``real_renders``: the world's own pictures of each prompt (what a perfect generation shows);
2. ``autoencoder``: those renders encoded and decoded by the base pipeline's autoencoder (the best any UNet on its
   latents can do);
3. ``base_model`` / ``base_model_colours_named``: the base pipeline from text alone, with prompts that name the
   class and texture, and also the subject's colours (what words alone reach);
4. the adapter: the base pipeline given the subject's reference image.

``python -m customcontrast_world.benchmark --ceilings_only`` measures them (and the shipped adapter's
figures) without training anything; the full benchmark writes them into ``results.json`` under ``"ceilings"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusers_customcontrast.data.synthetic import SHAPES

from .dataset import World
from .evaluation import ImageScores
from .intervals import bootstrap_intervals

__all__ = ["CEILING_STAGES", "autoencoder_reconstructions", "shape_accuracy_per_class", "stage_figures"]

CEILING_STAGES: tuple[str, ...] = ("real_renders", "autoencoder", "base_model", "base_model_colours_named")
"""The keys of ``results.json``'s ``"ceilings"``, in the chain's order."""


@torch.no_grad()
def autoencoder_reconstructions(
    vae: torch.nn.Module, images: Sequence[Image.Image], latent_noise: float = 0.0, seed: int = 0
) -> list[Image.Image]:
    """``images`` encoded (the posterior's mode) and decoded by ``vae``, rounded to 8 bits as a pipeline's output is.

    With ``latent_noise``, Gaussian noise of that std (drawn from ``seed``) is added to the latents in the units the
    UNet sees (after ``scaling_factor``) before decoding: how much of the error a UNet leaves in its latents the
    decoder turns back into a clean scene (a decoder that absorbs none passes every error on as pixel noise).
    """
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
    pixels = pixels.permute(0, 3, 1, 2).to(vae.dtype).div(127.5).sub(1.0)
    scaling = vae.config.scaling_factor
    latents = vae.encode(pixels).latent_dist.mode() * scaling
    if latent_noise:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        latents = latents + latent_noise * noise.to(latents)
    decoded = vae.decode(latents / scaling).sample
    values = decoded.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(v.permute(1, 2, 0).numpy()) for v in values]


def shape_accuracy_per_class(per_seed: Sequence[ImageScores], world: World) -> dict[str, float]:
    """Fraction of images whose shape the judge reads right, per class of the subject shown (all seeds pooled).

    A blob passes for a ring or a circle far more often than for a star or a cross, so the mean alone hides
    whether a stage draws shapes at all.
    """
    classes = np.array([world.subjects[sid].shape for scores in per_seed for sid in scores.subject_ids])
    right = np.concatenate([scores.shape for scores in per_seed])
    return {shape: float(right[classes == shape].mean()) for shape in SHAPES if (classes == shape).any()}


def stage_figures(per_seed: Sequence[ImageScores], world: World) -> dict[str, Any]:
    """A stage's entry of ``"ceilings"``: every metric's mean and 95 % interval, and the shape accuracy per class."""
    return {**bootstrap_intervals(per_seed), "shape_acc_per_class": shape_accuracy_per_class(per_seed, world)}
