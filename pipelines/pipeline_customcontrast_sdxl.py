"""Community pipeline: SDXL with CustomContrast's friendlier subject arguments.

Usage::

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        custom_pipeline="pipelines/pipeline_customcontrast_sdxl.py",
        trust_remote_code=True,
    )
    pipe.load_customcontrast("your-org/customcontrast-sdxl")
    out = pipe("a dog on the beach", subject_image=dog, subject_scale=0.8, return_location_maps=True)
"""

from diffusers import StableDiffusionXLPipeline

from diffusers_customcontrast.community import CustomContrastPipelineMixin


class CustomContrastStableDiffusionXLPipeline(CustomContrastPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` taking ``subject_image=``, ``subject_scale=``, ``subject_start=``, ``subject_masks=``."""
