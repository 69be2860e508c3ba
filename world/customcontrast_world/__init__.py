"""The synthetic subject world (docs/synthetic_world.md) and the tiny base model trained on it.

* :func:`write_world` / :func:`load_world`: train and held-out subjects on disk, with the ground truth of every
  frame (:meth:`World.frame_info`); :class:`WorldSpec` renders the same frames in memory.
* :func:`load_synthetic_base`: the shipped text-to-image ``StableDiffusionPipeline`` trained on the world
  (``python -m customcontrast_world.train_base`` reproduces it).
* :func:`world_training_config`: the recipe to train an adapter for it; :data:`ABLATIONS`, the benchmark's runs.
* :func:`evaluate_on_world`: held-out subjects in prompted scenes, scored by the shipped :class:`WorldJudge`
  (subject similarity, attributes) and the scene readers of :mod:`.metrics` (controllability).
* ``python -m customcontrast_world.benchmark``: the ablation benchmark (``docs/world_benchmark.md``).

See ``docs/synthetic_world.md``.
"""

from .base_model import SYNTHETIC_BASE_DIR, load_synthetic_base
from .dataset import SPLITS, FrameInfo, RenderedFrame, World, WorldSpec, load_world, write_world
from .evaluation import WorldPrompt, WorldScores, evaluate_on_world, evaluation_prompts
from .judge import WorldJudge, load_world_judge
from .recipe import ABLATIONS, world_training_config

__all__ = [
    "ABLATIONS",
    "SPLITS",
    "SYNTHETIC_BASE_DIR",
    "FrameInfo",
    "RenderedFrame",
    "World",
    "WorldJudge",
    "WorldPrompt",
    "WorldScores",
    "WorldSpec",
    "evaluate_on_world",
    "evaluation_prompts",
    "load_synthetic_base",
    "load_world",
    "load_world_judge",
    "world_training_config",
    "write_world",
]
