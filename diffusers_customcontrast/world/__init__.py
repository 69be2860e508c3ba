"""The synthetic subject world (DESIGN.md section 6) and the tiny base model trained on it.

* :func:`write_world` / :func:`load_world`: train and held-out subjects on disk, with the ground truth of every
  frame (:meth:`World.frame_info`); :class:`WorldSpec` renders the same frames in memory.
* :func:`load_synthetic_base`: the shipped text-to-image ``StableDiffusionPipeline`` trained on the world
  (``python -m diffusers_customcontrast.world.train_base`` reproduces it).

See ``docs/synthetic_world.md``.
"""

from .base_model import SYNTHETIC_BASE_DIR, load_synthetic_base
from .dataset import SPLITS, FrameInfo, RenderedFrame, World, WorldSpec, load_world, write_world

__all__ = [
    "SPLITS",
    "SYNTHETIC_BASE_DIR",
    "FrameInfo",
    "RenderedFrame",
    "World",
    "WorldSpec",
    "load_synthetic_base",
    "load_world",
    "write_world",
]
