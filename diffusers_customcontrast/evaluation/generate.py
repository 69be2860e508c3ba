"""Generate the DreamBench evaluation images with a subject-adapter pipeline.

Images are written as ``<output_dir>/<subject>/<prompt_index:02d>_<image_index>.png`` and described in
``<output_dir>/manifest.jsonl``. Generation is resumable (images already on disk are kept) and can be split over
processes with `accelerate`; every image has its own seed, so the result does not depend on the split or on
the batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..loaders.injection import attached
from .dreambench import DreamBenchPrompt, DreamBenchSubject, References, dreambench_prompts, load_rgb, parse_references
from .manifest import merge_manifest_shards, shard_path, write_manifest
from .processes import ProcessSplitter, SingleProcess

logger = logging.getLogger(__name__)

SETTINGS_NAME = "generation_settings.json"


@dataclass(frozen=True)
class GenerationJob:
    """All images of one (subject, prompt) pair: the unit split between processes."""

    subject: DreamBenchSubject
    prompt_index: int
    prompt: DreamBenchPrompt


def build_jobs(subjects: Sequence[DreamBenchSubject], unique_token: str = "sks") -> list[GenerationJob]:
    """One job per (subject, prompt), subjects in the given order and prompts in file order."""
    return [
        GenerationJob(subject, index, prompt)
        for subject in subjects
        for index, prompt in enumerate(dreambench_prompts(subject, unique_token))
    ]


def image_seed(seed: int, subject: str, prompt_index: int, image_index: int) -> int:
    """Seed of one image, derived from the run seed and the image's identity alone.

    A hash (not Python's salted ``hash``) makes it stable across processes, runs and machines.
    """
    digest = hashlib.sha256(f"{seed}/{subject}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def image_relpath(subject: str, prompt_index: int, image_index: int) -> str:
    """Path of a generated image relative to the output folder."""
    return f"{subject}/{prompt_index:02d}_{image_index}.png"


def set_adapter_scale(pipe: Any, scale: float) -> None:
    """Set the subject-adapter scale: CustomContrast's when a CustomContrast adapter is loaded, else IP-Adapter's."""
    if uses_customcontrast(pipe):
        pipe.set_customcontrast_scale(scale)
    elif hasattr(pipe, "set_ip_adapter_scale"):
        pipe.set_ip_adapter_scale(scale)
    else:
        raise AttributeError("The pipeline has neither set_customcontrast_scale nor set_ip_adapter_scale.")


def uses_customcontrast(pipe: Any) -> bool:
    """Whether the pipeline's subject adapter is CustomContrast (rather than a plain IP-Adapter).

    ``import diffusers_customcontrast`` gives every diffusers pipeline ``set_customcontrast_scale``, so having the
    method says nothing; for a pipeline with a UNet, the attached adapter tells. Objects without a UNet (wrappers,
    test doubles) are judged by the method alone.
    """
    if not hasattr(pipe, "set_customcontrast_scale"):
        return False
    unet = getattr(pipe, "unet", None)
    return unet is None or attached(unet) is not None


def generate_dreambench(
    pipe: Any,
    subjects: Sequence[DreamBenchSubject],
    output_dir: str | os.PathLike,
    images_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    accelerator: ProcessSplitter | None = None,
    use_identifier: bool = False,
    unique_token: str = "sks",
    reference_index: int = 0,
    references: References = "first",
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``images_per_prompt`` images for every prompt of every subject.

    Each call is ``pipe(prompt, num_images_per_prompt=..., generator=..., **subject_condition(...))`` with the
    subject's fixed reference photo(s) (see :func:`subject_condition`) and one CPU generator per image.

    Args:
        pipe: A diffusers pipeline with a subject adapter loaded (CustomContrast or IP-Adapter), or any callable
            with that interface returning an object with an ``images`` list.
        subjects: Subjects from :func:`~.dreambench.load_dreambench`.
        output_dir: Folder for the images and ``manifest.jsonl``.
        images_per_prompt: Images per (subject, prompt).
        seed: Run seed; each image's seed is derived from it with :func:`image_seed`.
        num_inference_steps: Sampling steps.
        guidance_scale: Classifier-free guidance scale.
        scale: Adapter scale set before generating (see :func:`set_adapter_scale`); ``None`` keeps the pipe's.
        height: Image height; ``None`` uses the pipeline default.
        width: Image width; ``None`` uses the pipeline default.
        batch_size: Images per pipeline call.
        accelerator: An ``accelerate.Accelerator`` or ``PartialState`` to split the (subject, prompt) jobs over
            processes; ``None`` runs everything in this process.
        use_identifier: Prompt with the identifier ("a sks dog in the jungle") instead of the class prompt
            ("a dog in the jungle"). Encoder methods have no identifier token, hence the default.
        unique_token: The identifier used when ``use_identifier`` is set.
        reference_index: Which of the subject's sorted real images is the (first) reference photo.
        references: How many photos the adapter is given: ``"first"`` (the reference photo alone, the DreamBench
            protocol), ``"all"`` or a count ``N`` (see :meth:`~.dreambench.DreamBenchSubject.reference_image_paths`).
        pipeline_kwargs: Extra keyword arguments for every pipeline call, e.g. ``negative_prompt``.

    Returns:
        On the main process the records of every image (the merged manifest); on other processes the records of
        that process's images. Records hold absolute image paths; the manifest file holds relative ones.
    """
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError("images_per_prompt and batch_size must be at least 1.")
    state = accelerator if accelerator is not None else SingleProcess()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    call_kwargs = _call_kwargs(num_inference_steps, guidance_scale, height, width, pipeline_kwargs)
    identifier = unique_token if use_identifier else None
    image_settings = {"seed": seed, "scale": scale, "use_identifier": use_identifier, "unique_token": identifier}
    references = parse_references(references)
    image_settings.update(call_kwargs, reference_index=reference_index, references=references)
    check_generation_settings(output_dir, image_settings, write=state.is_main_process)
    if scale is not None:
        set_adapter_scale(pipe, scale)
    settings = _RunSettings(
        output_dir, images_per_prompt, seed, batch_size, use_identifier, reference_index, references, scale
    )

    jobs = build_jobs(subjects, unique_token)
    with state.split_between_processes(jobs) as local_jobs:
        records = _run_jobs(pipe, list(local_jobs), settings, call_kwargs, show_progress=state.is_local_main_process)
    write_manifest(shard_path(output_dir, state.process_index), records)
    # Every shard must be on disk before the main process merges them.
    state.wait_for_everyone()
    merged = None
    if state.is_main_process:
        merged = merge_manifest_shards(output_dir, state.num_processes, [subject.name for subject in subjects])
    # No process may start another run in this folder (writing a shard) while the main process still merges.
    state.wait_for_everyone()
    return merged if merged is not None else records


def check_generation_settings(output_dir: str | os.PathLike, settings: Mapping[str, Any], write: bool = True) -> None:
    """Refuse to resume into a folder whose images were made with other settings.

    Resuming keeps every image already on disk, so a second run with, say, another seed or step count would
    silently mix two experiments. The settings that change images are kept in ``generation_settings.json``;
    the number of images per prompt and the batch size are not among them (seeds are per image).

    Args:
        output_dir: The generation folder.
        settings: JSON-able settings that determine the images.
        write: Record the settings when the folder has none yet (the main process only, under accelerate).

    Raises:
        ValueError: If the folder records different settings.
    """
    path = Path(output_dir) / SETTINGS_NAME
    # A JSON round trip makes tuples, paths and other values compare as they are stored.
    current = json.loads(json.dumps(dict(settings), sort_keys=True, default=repr))
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
        if changed:
            details = ", ".join(f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in changed)
            raise ValueError(
                f"{output_dir} holds images generated with other settings ({details}); use another output_dir."
            )
    elif write:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, path)


@dataclass(frozen=True)
class _RunSettings:
    output_dir: Path
    images_per_prompt: int
    seed: int
    batch_size: int
    use_identifier: bool
    reference_index: int
    references: References
    scale: float | None

    def reference_paths(self, subject: DreamBenchSubject) -> tuple[Path, ...]:
        return subject.reference_image_paths(self.references, self.reference_index)


def _call_kwargs(
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    pipeline_kwargs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    # Only pass the size when given, so the pipeline's own default (its UNet's sample size) applies otherwise.
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    kwargs.update(pipeline_kwargs or {})
    return kwargs


def _run_jobs(
    pipe: Any,
    jobs: Sequence[GenerationJob],
    settings: _RunSettings,
    call_kwargs: Mapping[str, Any],
    show_progress: bool,
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    conditions: dict[str, dict[str, Any]] = {}
    total = len(jobs) * settings.images_per_prompt
    with tqdm(total=total, desc="DreamBench", unit="img", disable=not show_progress) as progress:
        for job in jobs:
            if job.subject.name not in conditions:
                photos = [load_rgb(path) for path in settings.reference_paths(job.subject)]
                conditions[job.subject.name] = subject_condition(pipe, photos, call_kwargs["guidance_scale"])
            _run_job(pipe, job, conditions[job.subject.name], settings, call_kwargs, progress)
            records.extend(_job_records(job, settings))
    return records


def subject_condition(pipe: Any, photos: Sequence[Image.Image], guidance_scale: float) -> dict[str, Any]:
    """The pipeline arguments that give it one subject's reference photos.

    * One photo: ``ip_adapter_image=photo``, for any adapter.
    * Several photos, CustomContrast: ``ip_adapter_image_embeds`` from
      ``pipe.encode_customcontrast_subjects([photos], combine="concat", ...)``: one subject whose Q-Former queries
      attend over the patches of all its photos (``ip_adapter_image=[[a, b]]`` would mean two subjects).
    * Several photos, plain IP-Adapter: ``ip_adapter_image=[photos]``, diffusers' own input for several images of
      one adapter (their image tokens are concatenated).

    The embeddings are computed once per subject with ``num_images_per_prompt=1``; the pipeline repeats them for
    the images of each call.
    """
    if len(photos) == 1:
        return {"ip_adapter_image": photos[0]}
    if not uses_customcontrast(pipe):
        return {"ip_adapter_image": [list(photos)]}
    encode = getattr(pipe, "encode_customcontrast_subjects", None)
    if encode is None:
        raise AttributeError(
            f"Giving the adapter {len(photos)} photos of a subject needs pipe.encode_customcontrast_subjects, which "
            f"this pipeline ({type(pipe).__name__}) lacks; use references='first'."
        )
    # The negative rows the embeddings carry must match what the pipeline does: diffusers guides when
    # guidance_scale > 1 and the UNet has no guidance embedding (time_cond_proj_dim).
    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    guided = guidance_scale > 1 and getattr(unet_config, "time_cond_proj_dim", None) is None
    embeds = encode([list(photos)], combine="concat", num_images_per_prompt=1, do_classifier_free_guidance=guided)
    return {"ip_adapter_image_embeds": embeds}


def _run_job(
    pipe: Any,
    job: GenerationJob,
    condition: Mapping[str, Any],
    settings: _RunSettings,
    call_kwargs: Mapping[str, Any],
    progress: tqdm,
) -> None:
    missing = [
        index
        for index in range(settings.images_per_prompt)
        if not (settings.output_dir / image_relpath(job.subject.name, job.prompt_index, index)).exists()
    ]
    progress.update(settings.images_per_prompt - len(missing))
    prompt = job.prompt.text if settings.use_identifier else job.prompt.clip_text
    for start in range(0, len(missing), settings.batch_size):
        indices = missing[start : start + settings.batch_size]
        # CPU generators give the same noise on any device; one per image makes each image independent of
        # which other images share its batch.
        generators = [
            torch.Generator("cpu").manual_seed(image_seed(settings.seed, job.subject.name, job.prompt_index, i))
            for i in indices
        ]
        output = pipe(prompt, num_images_per_prompt=len(indices), generator=generators, **condition, **call_kwargs)
        if len(output.images) != len(indices):
            raise RuntimeError(f"The pipeline returned {len(output.images)} images, expected {len(indices)}.")
        for index, image in zip(indices, output.images):
            _save_png(image, settings.output_dir / image_relpath(job.subject.name, job.prompt_index, index))
        progress.update(len(indices))


def _save_png(image: Image.Image, path: Path) -> None:
    # Write then rename, so an interrupted run never leaves a truncated file that resuming would take as done.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)


def _job_records(job: GenerationJob, settings: _RunSettings) -> list[dict[str, Any]]:
    subject = job.subject
    references = [str(path.resolve()) for path in settings.reference_paths(subject)]
    return [
        {
            "subject": subject.name,
            "class_name": subject.class_name,
            "prompt_index": job.prompt_index,
            "image_index": index,
            "prompt": job.prompt.text if settings.use_identifier else job.prompt.clip_text,
            "clip_text": job.prompt.clip_text,
            "kind": job.prompt.kind,
            "path": str((settings.output_dir / image_relpath(subject.name, job.prompt_index, index)).resolve()),
            "seed": image_seed(settings.seed, subject.name, job.prompt_index, index),
            "scale": settings.scale,
            "reference_images": references,
        }
        for index in range(settings.images_per_prompt)
    ]
