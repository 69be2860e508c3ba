"""Community pipeline: Stable Diffusion 1.5 with CustomContrast's friendlier subject arguments.

Usage::

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="pipelines/pipeline_customcontrast_sd.py",
        trust_remote_code=True,
    )
    pipe.load_customcontrast("your-org/customcontrast-sd15")
    out = pipe("a dog on the beach", subject_image=dog, subject_scale=0.8, return_location_maps=True)
    out.images[0], out.location_maps  # one [batch, subjects, h, w] map per step
"""

from diffusers import StableDiffusionPipeline

from diffusers_customcontrast.community import CustomContrastPipelineMixin


class CustomContrastStableDiffusionPipeline(CustomContrastPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` taking ``subject_image=``, ``subject_scale=``, ``subject_start=``, ``subject_masks=``."""
