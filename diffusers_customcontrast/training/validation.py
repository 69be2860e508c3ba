"""Validation images during training: the subject in new prompts, generated through the training attachment.

The pipeline is built from the run's own frozen modules and its UNet, to which the trainable adapter is already
attached. Loading the adapter a second time (``pipe.load_customcontrast``) would cast it to the UNet's half dtype
and replace the attachment the objective records from; going through the existing one changes nothing, so
training continues exactly as if no validation had run (the sampler uses its own seeded generator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import make_image_grid
from PIL import Image

from ..loaders import injection
from .components import BaseModel

logger = get_logger(__name__)

__all__ = ["build_validation_pipeline", "reference_to_image", "run_validation"]


def build_validation_pipeline(base: BaseModel, unet: torch.nn.Module) -> DiffusionPipeline:
    """A text-to-image pipeline of the base model's family around ``unet`` (with the adapter attached)."""
    common = {
        "vae": base.vae,
        "unet": unet,
        "scheduler": base.validation_scheduler(),
        "image_encoder": base.image_encoder,
        "feature_extractor": base.image_processor,
    }
    if base.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            text_encoder=base.text_encoders[0],
            text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt,
            **common,
        )
    else:
        pipe = StableDiffusionPipeline(
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            safety_checker=None,
            requires_safety_checker=False,
            **common,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_to_image(reference: torch.Tensor | Image.Image | str | Path) -> Image.Image:
    """A PIL image from a ``[3, H, W]`` tensor in [0, 1] (a dataset reference), a PIL image or an image file."""
    if isinstance(reference, Image.Image):
        return reference.convert("RGB")
    if isinstance(reference, (str, Path)):
        with Image.open(reference) as image:
            return image.convert("RGB")
    array = (reference.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@torch.no_grad()
def run_validation(
    accelerator: Accelerator,
    base: BaseModel,
    unet: torch.nn.Module,
    reference: Image.Image,
    prompts: list[str],
    output_dir: str | Path,
    step: int,
    *,
    resolution: int,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    images_per_prompt: int = 1,
    seed: int = 0,
) -> Path:
    """Generate ``images_per_prompt`` images per prompt for ``reference``; save a grid PNG and log it.

    Call on the main process only. The grid's first column is the reference; one row per prompt. Returns the
    path of the PNG, ``output_dir/validation/step-<step>.png``.
    """
    if injection.attached(unet) is None:
        raise RuntimeError("run_validation needs the UNet with the training adapter attached.")
    pipe = build_validation_pipeline(base, unet)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    # The adapter is float32 while the frozen UNet may be half: autocast, as in the training step.
    with accelerator.autocast():
        for prompt in prompts:
            images = pipe(
                prompt,
                ip_adapter_image=reference,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=images_per_prompt,
                height=resolution,
                width=resolution,
                generator=generator,
            ).images
            rows.append([reference.resize((resolution, resolution)), *images])
    grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0]))
    path = Path(output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    _log_images(accelerator, grid, prompts, step)
    logger.info("Saved validation images to %s.", path)
    return path


def _log_images(accelerator: Accelerator, grid: Image.Image, prompts: list[str], step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text("validation_prompts", "\n".join(f"- {p}" for p in prompts), step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
