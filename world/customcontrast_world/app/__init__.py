"""The web app: ``python -m customcontrast_world.app`` (install with ``pip install -e ".[app]"``).

A local Gradio page to try a CustomContrast adapter: upload photos of a subject, prompt a scene, and see the result
beside the base model's image for the same seed, the subject's location maps over the steps and a scale strip.
:mod:`.studio` computes (no Gradio needed), :mod:`.uploads` checks uploaded files, :mod:`.layout` is the page.
"""

from .studio import SCALE_STRIP_FACTORS, Generation, GenerationRequest, SubjectStudio, load_studio, location_strip
from .uploads import UploadError, read_subject_images

__all__ = [
    "SCALE_STRIP_FACTORS",
    "Generation",
    "GenerationRequest",
    "SubjectStudio",
    "UploadError",
    "load_studio",
    "location_strip",
    "read_subject_images",
]
