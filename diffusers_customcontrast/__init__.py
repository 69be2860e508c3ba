"""CustomContrast (AAAI 2025) subject-driven text-to-image customization as a plugin for Hugging Face diffusers.

Importing the package adds ``load_customcontrast``, ``unload_customcontrast``, ``set_customcontrast_scale`` and
``encode_customcontrast_subjects`` to every diffusers pipeline that can take a subject image (those with
``IPAdapterMixin``, each with a UNet), and changes nothing else in diffusers::

    import diffusers_customcontrast
    pipe.load_customcontrast("org/customcontrast-sd15")
    image = pipe("a dog on the beach", ip_adapter_image=subject_image).images[0]
"""

from .attention_processor import CustomContrastAttnProcessor2_0
from .conditioning import StepRecord, SubjectConditioning, SubjectOptions, SubjectRecording
from .loaders.image_projection import CustomContrastImageProjection
from .loaders.injection import attach, detach
from .loaders.pipeline import (
    encode_customcontrast_subjects,
    load_customcontrast,
    record_customcontrast,
    register_pipeline_methods,
    set_customcontrast_scale,
    unload_customcontrast,
)
from .loaders.serialization import AdapterLoadError, load_adapter
from .models import CustomContrastAdapter, CustomContrastAdapterConfig, MFIEncoder, SubjectTokens

__version__ = "0.1.0"

register_pipeline_methods()

__all__ = [
    "AdapterLoadError",
    "CustomContrastAdapter",
    "CustomContrastAdapterConfig",
    "CustomContrastAttnProcessor2_0",
    "CustomContrastImageProjection",
    "MFIEncoder",
    "StepRecord",
    "SubjectConditioning",
    "SubjectOptions",
    "SubjectRecording",
    "SubjectTokens",
    "attach",
    "detach",
    "encode_customcontrast_subjects",
    "load_adapter",
    "load_customcontrast",
    "record_customcontrast",
    "set_customcontrast_scale",
    "unload_customcontrast",
]
