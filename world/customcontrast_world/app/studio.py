"""What the web app computes, apart from its page: a loaded pipeline and the generations one page asks for.

:class:`SubjectStudio` holds a pipeline with a CustomContrast adapter loaded and never changes it after loading:
each generation passes its scales in the call (:class:`~diffusers_customcontrast.SubjectOptions`), so several
browser sessions can share one pipeline. The base model's image for the same seed is the same call with both
scales 0, which computes exactly what the pipeline computed before the adapter was loaded.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image

from diffusers_customcontrast.conditioning import OPTIONS_KEY, StepRecord, SubjectOptions
from diffusers_customcontrast.data.synthetic import BACKGROUNDS, caption_for
from diffusers_customcontrast.evaluation.generate import subject_condition
from diffusers_customcontrast.loaders.pipeline import load_customcontrast, record_customcontrast
from diffusers_customcontrast.models.adapter import CustomContrastAdapter

from ..base_model import SYNTHETIC_BASE_DIR, load_synthetic_base
from ..dataset import WorldSpec
from ..recipe import WORLD_ADAPTER, WORLD_ADAPTER_DIR

__all__ = [
    "MAX_LOCATION_FRAMES",
    "SCALE_STRIP_FACTORS",
    "Generation",
    "GenerationRequest",
    "ProgressCallback",
    "SubjectExample",
    "SubjectStudio",
    "load_studio",
    "location_strip",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
"""Called with the fraction of the work done (0 to 1) and what is being computed."""

SCALE_STRIP_FACTORS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
"""Multiples of the chosen scales in the scale strip: from the base model (0) to past the chosen strength."""

MAX_LOCATION_FRAMES = 10
"""Most steps shown in the location-map strip; more are sampled evenly."""


@dataclass(frozen=True)
class GenerationRequest:
    """What the page asks for: one image of the subject.

    Attributes:
        prompt: the text prompt.
        negative_prompt: the negative prompt (used when ``guidance_scale > 1``).
        scale: the visual branch's scale (``lambda``), every layer.
        s_plus_scale: the S+ tokens' scale (``beta``), every layer.
        seed: seed of the initial noise (drawn by a CPU generator: the same noise on any device).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance.
    """

    prompt: str
    negative_prompt: str = ""
    scale: float = 1.0
    s_plus_scale: float = 1.0
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 4.0

    def __post_init__(self) -> None:
        for name in ("scale", "s_plus_scale", "guidance_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"expected a finite {name}, got {getattr(self, name)}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"expected a whole, non-negative seed, got {self.seed}")
        if int(self.num_inference_steps) != self.num_inference_steps or self.num_inference_steps < 1:
            raise ValueError(f"expected at least one whole inference step, got {self.num_inference_steps}")


@dataclass
class Generation:
    """What one generation gives the page.

    Attributes:
        image: the image with the subject.
        base_image: the base model's image for the same prompt and seed (both scales 0).
        location_maps: the subject's timestep location maps over the steps, each with its caption: the mean over
            the cross-attention layers, white where the subject acts.
        notes: what the page should tell the user about this generation.
    """

    image: Image.Image
    base_image: Image.Image
    location_maps: list[tuple[Image.Image, str]]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SubjectExample:
    """A subject the page offers in one click: its reference image and a prompt that puts it in a scene."""

    name: str
    image: Image.Image
    prompt: str


def world_examples(count: int = 4) -> list[SubjectExample]:
    """The first ``count`` held-out subjects of the default world (never seen in training), each in a scene.

    The prompts name the class and the texture as the world's captions do, never the colours: those come from the
    reference.
    """
    spec = WorldSpec(num_train_subjects=0, num_heldout_subjects=count)
    scenes = [b.name for b in BACKGROUNDS]
    examples = []
    for n, subject_id in enumerate(spec.subject_ids("heldout")):
        subject = spec.subjects[subject_id][1]
        prompt = caption_for(subject, scenes[(3 * n + 2) % len(scenes)])
        examples.append(
            SubjectExample(f"{subject_id}: {' '.join(subject.identity)}", spec.reference_image(subject_id), prompt)
        )
    return examples


class SubjectStudio:
    """A pipeline with a CustomContrast adapter loaded, and the generations of the web app.

    Args:
        pipe: a pipeline with ``adapter`` loaded (``load_customcontrast``).
        adapter: the loaded adapter.
        description: one line for the page saying which base model and adapter these are.
        defaults: the request the page starts with (prompt, steps and guidance suited to the base model).
        examples: subjects the page offers in one click, each a reference image and a prompt for it.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        adapter: CustomContrastAdapter,
        description: str,
        defaults: GenerationRequest,
        examples: Sequence[SubjectExample] = (),
    ) -> None:
        self.pipe = pipe
        self.adapter = adapter
        self.description = description
        self.defaults = defaults
        self.examples = tuple(examples)

    def generate(
        self, subjects: Sequence[Image.Image], request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> Generation:
        """The subject in the prompted scene, the base model's image for the same seed, and the location maps.

        Args:
            subjects: photos of one subject; several are encoded together (``pipe.encode_customcontrast_subjects``
                with ``combine="concat"``: the Q-Formers' queries attend over the patches of all of them).
            request: the prompt, scales, seed and steps.
            progress: told how far the two generations have got after every step.
        """
        condition = self._condition(subjects, request)
        tracker = _Progress(progress, total_steps=2 * request.num_inference_steps)
        with record_customcontrast(self.pipe) as recording:
            image = self._call(condition, request, request.scale, request.s_plus_scale, tracker, "with the subject")
        base_image = self._call(condition, request, 0.0, 0.0, tracker, "base model")
        maps = location_strip(recording.steps, image.size)
        notes = []
        if not maps:
            notes.append("This adapter computed no location maps (it was configured without them).")
        return Generation(image, base_image, maps, notes)

    def scale_strip(
        self,
        subjects: Sequence[Image.Image],
        request: GenerationRequest,
        factors: Sequence[float] = SCALE_STRIP_FACTORS,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[Image.Image, str]]:
        """The same seed at several strengths: for each factor, both scales of ``request`` times the factor.

        Returns one ``(image, caption)`` per factor; factor 0 is the base model, factor 1 the request itself.
        """
        condition = self._condition(subjects, request)
        tracker = _Progress(progress, total_steps=len(factors) * request.num_inference_steps)
        strip = []
        for factor in factors:
            scale, s_plus_scale = factor * request.scale, factor * request.s_plus_scale
            caption = f"{scale:.2f} / {s_plus_scale:.2f}"
            strip.append((self._call(condition, request, scale, s_plus_scale, tracker, caption), caption))
        return strip

    def _condition(self, subjects: Sequence[Image.Image], request: GenerationRequest) -> dict:
        """The pipeline arguments that carry the subject (several photos: encoded together, ``combine="concat"``)."""
        if not subjects:
            raise ValueError("expected at least one photo of the subject, got none")
        return subject_condition(self.pipe, subjects, request.guidance_scale)

    def _call(
        self,
        condition: dict,
        request: GenerationRequest,
        scale: float,
        s_plus_scale: float,
        tracker: _Progress,
        label: str,
    ) -> Image.Image:
        layers = self.adapter.num_layers
        options = SubjectOptions(scale=(scale,) * layers, s_plus_scale=(s_plus_scale,) * layers)
        return self.pipe(
            request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=torch.Generator().manual_seed(int(request.seed)),
            cross_attention_kwargs={OPTIONS_KEY: options},
            callback_on_step_end=tracker.step_callback(label),
            **condition,
        ).images[0]


class _Progress:
    """Turns pipeline step callbacks over several generations into one fraction for a progress bar."""

    def __init__(self, report: ProgressCallback | None, total_steps: int) -> None:
        self.report, self.total_steps, self.done = report, total_steps, 0

    def step_callback(self, label: str) -> Callable:
        def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            self.done += 1
            if self.report is not None:
                self.report(min(self.done / self.total_steps, 1.0), label)
            return callback_kwargs

        return on_step_end


def location_strip(
    steps: Sequence[StepRecord], size: tuple[int, int], max_frames: int = MAX_LOCATION_FRAMES
) -> list[tuple[Image.Image, str]]:
    """The subject's location map at each recorded UNet call, as grey images of ``size`` (white: subject here).

    Each map is the mean over the cross-attention layers (upsampled to the finest layer's resolution) of the last
    batch row, the prompt's under classifier-free guidance; with several subjects, their maximum. At most
    ``max_frames`` calls are shown, evenly spaced and always with the first and the last.
    """
    recorded = [(i, step) for i, step in enumerate(steps) if step.location_maps]
    if len(recorded) > max_frames:
        last = len(recorded) - 1
        recorded = [recorded[round(k * last / (max_frames - 1))] for k in range(max_frames)]
    strip = []
    for index, step in recorded:
        layer_maps = [maps[-1:].float() for maps in step.location_maps.values()]
        finest = max((maps.shape[-2:] for maps in layer_maps), key=lambda hw: hw[0] * hw[1])
        mean = torch.stack([F.interpolate(maps, size=finest, mode="bilinear") for maps in layer_maps]).mean(0)
        pixels = (mean[0].amax(0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        frame = Image.fromarray(pixels, mode="L").resize(size, Image.Resampling.BILINEAR)
        timestep = f" · t={int(step.timesteps[-1])}" if step.timesteps is not None else ""
        strip.append((frame, f"step {index + 1}{timestep}"))
    return strip


def load_studio(
    base: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
) -> SubjectStudio:
    """Load a base pipeline and a CustomContrast adapter for the app.

    Args:
        base: a hub id or folder of an SD1.5 or SDXL pipeline; ``None``: the synthetic world's shipped base model
            (offline).
        adapter: a hub id or folder of a CustomContrast adapter. ``None`` with the world's base: the world's trained
            adapter (``assets/world-adapter``), or, if this checkout has none, an untrained adapter with random
            weights, which the description and the log say in so many words.
        device: where to run (default: CUDA when available, else the CPU).
        torch_dtype: dtype of a hub pipeline (default: float16 on CUDA, else float32); the world's tiny base model
            always runs in float32.

    Raises:
        ValueError: ``base`` is given without ``adapter``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if base is None:
        pipe = load_synthetic_base(device)
        base_name = f"the synthetic world's base model ({SYNTHETIC_BASE_DIR})"
        defaults = GenerationRequest("a striped star on the beach", num_inference_steps=20, guidance_scale=4.0)
        examples = world_examples()
    else:
        if adapter is None:
            raise ValueError(
                f"expected --adapter (a CustomContrast adapter for {base}) with --base; only the synthetic world's "
                "base model has a default adapter"
            )
        dtype = torch_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        pipe = AutoPipelineForText2Image.from_pretrained(base, torch_dtype=dtype).to(device)
        base_name = os.fspath(base)
        defaults = GenerationRequest("a photo of a dog on the beach", num_inference_steps=30, guidance_scale=7.5)
        examples = []
    pipe.set_progress_bar_config(disable=True)

    if adapter is not None:
        loaded = load_customcontrast(pipe, adapter)
        adapter_name = f"adapter {os.fspath(adapter)}"
    elif (WORLD_ADAPTER_DIR / "config.json").is_file():
        loaded = load_customcontrast(pipe, WORLD_ADAPTER_DIR)
        adapter_name = f"the world's trained adapter ({WORLD_ADAPTER_DIR})"
    else:
        adapter_name = (
            f"an UNTRAINED adapter with random weights: the world's trained adapter ({WORLD_ADAPTER_DIR}) "
            "is not in this checkout, so the images show how the app works, not what the method does "
            "(train one with `python -m customcontrast_world.demo` and pass --adapter demo-output/adapter)"
        )
        logger.warning("No trained adapter at %s: using an UNTRAINED adapter with random weights.", WORLD_ADAPTER_DIR)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            untrained = CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, **WORLD_ADAPTER["adapter"])
        loaded = load_customcontrast(pipe, untrained)
    return SubjectStudio(pipe, loaded, f"Base: {base_name}. Subject: {adapter_name}.", defaults, examples)
