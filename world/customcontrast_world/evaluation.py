"""Evaluate a CustomContrast adapter on the world's held-out subjects: prompted scenes, generations, scores.

The protocol (our choice, DreamBench's shape at the world's scale): each held-out subject is generated in
``scenes_per_subject`` prompted scenes, photos on backgrounds taken in turn from every background, and one
"a sketch of ..." prompt. The reference is the subject's frame 0, segmented on white and cropped to the subject,
as the trainer prepares references. Prompts name the class and the texture (the caption vocabulary), never the
colours, and the base model draws neither shape nor texture from words (``docs/synthetic_world.md``), so whatever
identity a generation has comes from the adapter.

::

    pipe = load_synthetic_base()
    load_customcontrast(pipe, "runs/world-adapter")
    scores = evaluate_on_world(pipe, load_world("data/world"), scales=(0.0, 0.5, 1.0))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from diffusers_customcontrast import set_customcontrast_scale
from diffusers_customcontrast.data.synthetic import BACKGROUNDS, caption_for, render_view, sample_scene

from .dataset import World
from .judge import WorldJudge, colors_of, load_world_judge
from .metrics import SubjectGallery, scene_obeyed

__all__ = [
    "ImageScores",
    "WorldPrompt",
    "WorldScores",
    "evaluate_on_world",
    "evaluation_prompts",
    "generate_world_images",
    "judge_world_images",
    "render_prompt",
    "score_world_images",
]


@dataclass(frozen=True)
class WorldPrompt:
    """One evaluation generation: whose subject, which scene, the prompt, and the seed of its initial noise."""

    subject_id: str
    background: str
    style: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class WorldScores:
    """Scores of a set of generations (means over them)."""

    subject_similarity: float
    """Cosine similarity to the subject's identity embedding (the role of DINO / CLIP-I)."""
    subject_similarity_se: float
    """Standard error of ``subject_similarity`` over subjects (spread of the per-subject means / sqrt(subjects))."""
    identity_accuracy: float
    """Fraction of generations whose nearest identity among the split's subjects is their own."""
    controllability: float
    """Fraction of generations showing the prompted scene (the role of CLIP-T)."""
    background_accuracy: float
    """Controllability of the photo prompts: the prompted background."""
    sketch_accuracy: float
    """Controllability of the sketch prompts: no colour."""
    color_accuracy: float
    """Fraction of photo generations in which the judge reads the subject's colours (all of them, and no other)."""
    shape_accuracy: float
    """Fraction of generations whose shape the judge reads as the subject's (the base model draws no shapes)."""
    texture_accuracy: float
    """Fraction of generations whose texture the judge reads as the subject's."""
    num_images: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluation_prompts(
    world: World,
    split: str = "heldout",
    num_subjects: int | None = None,
    scenes_per_subject: int = 4,
    seed: int = 0,
    name_colors: bool = False,
) -> list[WorldPrompt]:
    """The evaluation prompts: per subject ``scenes_per_subject - 1`` photos and one sketch.

    Backgrounds are taken in turn over subjects, so every background appears about equally often. The prompts name
    the class, the texture and the scene; ``name_colors`` also names the subject's colours (the captions the base
    model can be asked to draw a subject from, without any subject image).
    """
    if scenes_per_subject < 2:
        raise ValueError(f"expected scenes_per_subject >= 2 (photos and a sketch), got {scenes_per_subject}")
    subject_ids = world.splits[split][:num_subjects]
    prompts = []
    for i, subject_id in enumerate(subject_ids):
        subject = world.subjects[subject_id]
        for k in range(scenes_per_subject):
            background = BACKGROUNDS[(i * scenes_per_subject + k) % len(BACKGROUNDS)].name
            style = "sketch" if k == scenes_per_subject - 1 else "photo"
            prompt = caption_for(subject, background, style=style, name_colors=name_colors)
            prompts.append(WorldPrompt(subject_id, background, style, prompt, seed + len(prompts)))
    return prompts


def render_prompt(world: World, prompt: WorldPrompt) -> Image.Image:
    """The world's own picture of the prompt's subject in the prompted scene: what a perfect generation shows.

    Irrelevant attributes (view, size, position, lighting) are drawn from the prompt's seed; no second object.
    """
    subject = world.subjects[prompt.subject_id]
    rng = np.random.default_rng(prompt.seed)
    view = sample_scene(subject, rng, background=prompt.background, companion=None, style=prompt.style)
    return render_view(subject, view, size=world.spec.size)[0]


@torch.no_grad()
def generate_world_images(
    pipe: DiffusionPipeline,
    world: World,
    prompts: Sequence[WorldPrompt],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    progress: bool = True,
    use_subject: bool = True,
    output_type: str = "pil",
) -> list:
    """Generate one image per prompt with its subject's reference (:meth:`World.reference_image`), one call per subject.

    One call per subject because diffusers' pipelines give every prompt of a call the same subject image.
    ``use_subject=False`` generates without one (a pipeline with no adapter loaded: the base model). ``output_type``
    is the pipeline's: ``"pil"`` images, or ``"np"`` float arrays in [0, 1] (before 8-bit rounding).
    """
    images: list = []
    for subject_id, group in tqdm(_by_subject(prompts), desc="generating", disable=not progress, leave=False):
        subject = {"ip_adapter_image": world.reference_image(subject_id)} if use_subject else {}
        images.extend(
            pipe(
                [p.prompt for p in group],
                **subject,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(p.seed) for p in group],
                output_type=output_type,
            ).images
        )
    return images


@dataclass(frozen=True)
class ImageScores:
    """What the judge and the scene readers read in each image of a set of generations (one entry per image).

    The unit for statistics: :meth:`summary` averages it into :class:`WorldScores`, and
    :mod:`~customcontrast_world.intervals` resamples its subjects for confidence intervals.
    """

    subject_ids: tuple[str, ...]
    sketch: np.ndarray  # bool: the prompt asked for a sketch
    similarity: np.ndarray  # cosine to the subject's identity embedding
    identified: np.ndarray  # bool: the nearest identity is the subject's own
    obeyed: np.ndarray  # bool: the prompted scene is there
    color: np.ndarray  # bool: the subject's colours read right (meaningful for photos only)
    shape: np.ndarray  # bool
    texture: np.ndarray  # bool

    def summary(self) -> WorldScores:
        photo = ~self.sketch
        return WorldScores(
            subject_similarity=float(self.similarity.mean()),
            subject_similarity_se=_standard_error_over_subjects(self.similarity, self.subject_ids),
            identity_accuracy=float(self.identified.mean()),
            controllability=float(self.obeyed.mean()),
            background_accuracy=_mean(self.obeyed[photo]),
            sketch_accuracy=_mean(self.obeyed[self.sketch]),
            color_accuracy=_mean(self.color[photo]),
            shape_accuracy=float(self.shape.mean()),
            texture_accuracy=float(self.texture.mean()),
            num_images=len(self.subject_ids),
        )


def judge_world_images(
    images: Sequence[Image.Image],
    prompts: Sequence[WorldPrompt],
    judge: WorldJudge,
    gallery: SubjectGallery,
    world: World,
) -> ImageScores:
    """Per-image identity, attribute and scene readings of generations for ``prompts``."""
    if len(images) != len(prompts):
        raise ValueError(f"expected one image per prompt, got {len(images)} images for {len(prompts)} prompts")
    subject_ids = tuple(p.subject_id for p in prompts)
    embeddings, predicted = judge.judge(images)
    subjects = [world.subjects[sid] for sid in subject_ids]

    def agree(attribute: str, truth=getattr) -> np.ndarray:
        return np.array([guess == truth(s, attribute) for guess, s in zip(predicted[attribute], subjects)])

    return ImageScores(
        subject_ids=subject_ids,
        sketch=np.array([p.style == "sketch" for p in prompts]),
        similarity=gallery.similarity(embeddings, subject_ids).numpy(),
        identified=gallery.identified(embeddings, subject_ids).numpy(),
        obeyed=np.array([scene_obeyed(image, p.background, p.style) for image, p in zip(images, prompts)]),
        color=agree("colors", lambda subject, _: colors_of(subject)),
        shape=agree("shape"),
        texture=agree("texture"),
    )


def score_world_images(
    images: Sequence[Image.Image],
    prompts: Sequence[WorldPrompt],
    judge: WorldJudge,
    gallery: SubjectGallery,
    world: World,
) -> WorldScores:
    """Subject similarity, identity and attribute accuracy, and controllability of generations for ``prompts``."""
    return judge_world_images(images, prompts, judge, gallery, world).summary()


def evaluate_on_world(
    pipe: DiffusionPipeline,
    world: World,
    scales: Sequence[float] = (1.0,),
    prompts: Sequence[WorldPrompt] | None = None,
    judge: WorldJudge | None = None,
    gallery: SubjectGallery | None = None,
    **generate_kwargs,
) -> dict[float, tuple[WorldScores, list[Image.Image]]]:
    """Generate and score the held-out prompts at each subject strength (the pipeline has an adapter loaded).

    A scale sets both the visual branch and the S+ tokens (``set_customcontrast_scale(pipe, s, s_plus_scale=s)``),
    so that scale 0 is exactly the base model and the sweep runs from it to the full subject.

    Returns:
        For each scale, the scores and the generated images (in the order of ``prompts``). The adapter is left at
        the last scale.
    """
    prompts = evaluation_prompts(world) if prompts is None else prompts
    judge = judge or load_world_judge()
    gallery = gallery or SubjectGallery.from_world(world, judge, split=world.split_of(prompts[0].subject_id))
    results = {}
    for scale in scales:
        set_customcontrast_scale(pipe, scale, s_plus_scale=scale)
        images = generate_world_images(pipe, world, prompts, **generate_kwargs)
        results[scale] = (score_world_images(images, prompts, judge, gallery, world), images)
    return results


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _standard_error_over_subjects(values: np.ndarray, subject_ids: Sequence[str]) -> float:
    """Standard error of the mean of ``values`` with subjects as the unit (images of a subject are not independent)."""
    groups = np.array(subject_ids)
    means = [values[groups == sid].mean() for sid in dict.fromkeys(subject_ids)]
    return float(np.std(means, ddof=1) / np.sqrt(len(means))) if len(means) > 1 else float("nan")


def _by_subject(prompts: Sequence[WorldPrompt]) -> list[tuple[str, list[WorldPrompt]]]:
    """Consecutive runs of prompts of one subject, in order (so images come back in the order of ``prompts``)."""
    return [(sid, list(group)) for sid, group in itertools.groupby(prompts, key=lambda p: p.subject_id)]
