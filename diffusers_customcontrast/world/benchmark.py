"""The paper's claims measured on the synthetic world: ablation runs of one budget, scale sweeps, table and plots.

::

    python -m diffusers_customcontrast.world.benchmark --output_dir runs/world-benchmark       # ~50 min, 1 CPU thread
    python -m diffusers_customcontrast.world.benchmark --output_dir /tmp/smoke --smoke        # seconds

Each run of :data:`~diffusers_customcontrast.world.recipe.ABLATIONS` trains an adapter with the real trainer on the
same world, for the same number of steps with the same seed, and is scored on the held-out subjects
(:mod:`~diffusers_customcontrast.world.evaluation`) at scale 1 (visual branch and S+ tokens); the runs in
``--sweep`` are also scored at every ``--sweep_scales`` value, which draws their similarity / controllability
trade-off curves. Two reference rows frame the numbers: the base model without a subject and *real renders*, the
world's own pictures of each held-out subject in the prompted scenes (what a perfect adapter would give).

Written to ``output_dir``: ``results.json``, ``results.md`` (the table), ``tradeoff.png``, ``loss_curves.png``,
``samples.png`` (reference and generations of a few subjects per run) and ``runs/<name>/`` (each adapter and its
generated images). Trained adapters and generated images are reused when a rerun would make them the same way, so
an interrupted benchmark continues where it stopped and a change of metric costs only the scoring.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..evaluation.report import plot_scale_sweep
from ..loading import load_customcontrast, set_customcontrast_scale, unload_customcontrast
from ..serialization import WEIGHTS_NAME
from ..training import TrainingConfig, train
from ..training.export import LOSS_HISTORY_NAME, LossHistory
from ..training.trainer import TRAINING_CONFIG_NAME
from .base_model import load_synthetic_base
from .dataset import World, load_world, write_world
from .evaluation import (
    WorldPrompt,
    evaluation_prompts,
    generate_world_images,
    reference_image,
    render_prompt,
    score_world_images,
)
from .judge import load_world_judge
from .metrics import SubjectGallery
from .recipe import ABLATIONS, world_training_config
from .report import image_grid, plot_loss_curves, scores_table

logger = logging.getLogger(__name__)

__all__ = ["BenchmarkSettings", "run_benchmark"]

RESULTS_FILE = "results.json"
GENERATION_RECORD = "generation.json"
SAMPLE_SUBJECTS = 3


@dataclass
class BenchmarkSettings:
    """Everything that fixes a benchmark (its defaults are the documented run)."""

    output_dir: Path
    variants: tuple[str, ...] = tuple(ABLATIONS)
    max_train_steps: int = 400
    num_train_subjects: int = 300
    num_heldout_subjects: int = 50
    frames_per_subject: int = 8
    eval_subjects: int = 32
    scenes_per_subject: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 4.0
    sweep: tuple[str, ...] = ("self_reconstruction", "full")
    sweep_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    loss_weights: tuple[float, ...] = ()
    """Extra runs of the full method with lambda_cscl = lambda_macl = lambda_loc set to each value (tuning)."""
    training_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def smoke(cls, output_dir: Path) -> BenchmarkSettings:
        """A few seconds of everything: a tiny world, two training steps per run, two inference steps."""
        return cls(
            output_dir=output_dir,
            max_train_steps=2,
            num_train_subjects=8,
            num_heldout_subjects=2,
            frames_per_subject=3,
            eval_subjects=2,
            scenes_per_subject=2,
            num_inference_steps=2,
            sweep_scales=(0.5, 1.0),
            training_overrides={"train_batch_size": 4},
        )

    def runs(self) -> dict[str, dict[str, Any]]:
        """Name -> training config overrides of every run (the ablations, then the loss-weight runs)."""
        unknown = sorted(set(self.variants) - ABLATIONS.keys())
        if unknown:
            raise ValueError(f"unknown benchmark runs {unknown}; expected some of {list(ABLATIONS)}")
        runs = {name: ABLATIONS[name] for name in self.variants}
        for weight in self.loss_weights:
            runs[f"full (lambda={weight:g})"] = {"lambda_cscl": weight, "lambda_macl": weight, "lambda_loc": weight}
        return runs


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
    """Train, generate and score every run, then write the table and figures. Returns what ``results.json`` holds.

    Adapters and generated images are kept in ``output_dir``: a run already trained with the same configuration is
    not trained again, images already generated with the same prompts and settings are not generated again, and
    the scores are always computed afresh from the images (so a better metric only needs a rerun).
    """
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    world = _world(output_dir / "world", settings)
    prompts = evaluation_prompts(
        world, num_subjects=settings.eval_subjects, scenes_per_subject=settings.scenes_per_subject
    )
    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge)
    pipe = load_synthetic_base()

    def scores(images: list[Image.Image]) -> dict[str, Any]:
        return score_world_images(images, prompts, judge, gallery, world).to_dict()

    runs = settings.runs()
    renders = [render_prompt(world, p) for p in prompts]
    base = _generations(pipe, world, prompts, output_dir / "base_model", (0.0,), settings)[0.0]
    results: dict[str, Any] = {
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "rows": {"base model (no subject)": {"scale": 0.0, **scores(base)}},
        "sweeps": {},
    }
    samples = {"base model (no subject)": base}
    for name, overrides in tqdm(runs.items(), desc="benchmark runs"):
        run_dir = output_dir / "runs" / _slug(name)
        config = world_training_config(
            world.split_dir("train"),
            run_dir,
            max_train_steps=settings.max_train_steps,
            seed=settings.seed,
            **{**settings.training_overrides, **overrides},
        )
        if not _trained_with(config) and train(config).interrupted:
            # SIGTERM: the trainer saved a checkpoint and returned; stop here rather than go on to the next run.
            raise SystemExit(f"Stopped while training {name!r}; run the same command again to start it over.")
        scales = sorted({1.0, *(settings.sweep_scales if name in settings.sweep else ())})
        generated = _generations(pipe, world, prompts, run_dir / "generations", scales, settings, adapter=run_dir)
        scored = {scale: scores(images) for scale, images in generated.items()}
        results["rows"][name] = {"scale": 1.0, **scored[1.0], **_run_summary(run_dir)}
        results["sweeps"][name] = [{"scale": scale, **point} for scale, point in scored.items()]
        samples[name] = generated[1.0]
    results["rows"]["real renders"] = {"scale": None, **scores(renders)}
    _write_report(output_dir, results, runs, world, prompts, renders, samples)
    return results


def _generations(
    pipe,
    world: World,
    prompts: Sequence[WorldPrompt],
    folder: Path,
    scales: Sequence[float],
    settings: BenchmarkSettings,
    adapter: Path | None = None,
) -> dict[float, list[Image.Image]]:
    """The images of ``prompts`` at each adapter scale: read from ``folder`` if made the same way, else generated.

    Without ``adapter`` the base pipeline generates (no subject). Images are stored as PNG (lossless), with a
    ``generation.json`` that records the prompts and sampler settings they were made with.
    """
    record = {
        "prompts": [dataclasses.asdict(p) for p in prompts],
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "scaled": "visual branch and S+ tokens",
        "adapter_weights": _file_digest(adapter / WEIGHTS_NAME) if adapter else None,
    }
    images = {scale: _stored_images(folder / f"scale_{scale:g}", record) for scale in scales}
    missing = [scale for scale, stored in images.items() if stored is None]
    if not missing:
        return images
    if adapter is not None:
        load_customcontrast(pipe, adapter)
    try:
        for scale in missing:
            if adapter is not None:
                set_customcontrast_scale(pipe, scale, s_plus_scale=scale)
            images[scale] = generate_world_images(
                pipe,
                world,
                prompts,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                use_subject=adapter is not None,
            )
            _store_images(folder / f"scale_{scale:g}", images[scale], record)
    finally:
        if adapter is not None:
            unload_customcontrast(pipe)
    return images


def _stored_images(folder: Path, record: dict[str, Any]) -> list[Image.Image] | None:
    path = folder / GENERATION_RECORD
    if not path.is_file() or json.loads(path.read_text(encoding="utf-8")) != record:
        return None
    return [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in range(len(record["prompts"]))]


def _store_images(folder: Path, images: Sequence[Image.Image], record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GENERATION_RECORD).unlink(missing_ok=True)  # the record is written last: it vouches for the images
    for i, image in enumerate(images):
        image.save(folder / f"{i:04d}.png")
    (folder / GENERATION_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _world(root: Path, settings: BenchmarkSettings) -> World:
    if (root / "world.json").is_file():
        return load_world(root)
    return write_world(
        root,
        num_train_subjects=settings.num_train_subjects,
        num_heldout_subjects=settings.num_heldout_subjects,
        frames_per_subject=settings.frames_per_subject,
        seed=settings.seed,
    )


def _trained_with(config: TrainingConfig) -> bool:
    """Whether ``config.output_dir`` holds an adapter exported by a finished run of exactly ``config``."""
    run_dir = Path(config.output_dir)
    stored = run_dir / TRAINING_CONFIG_NAME
    if not (run_dir / WEIGHTS_NAME).is_file() or not (run_dir / LOSS_HISTORY_NAME).is_file() or not stored.is_file():
        return False
    same = _effective(TrainingConfig.from_yaml(stored)) == _effective(config)
    # The config is written when a run starts: only a full loss history says that these weights come from it.
    return same and len(LossHistory.read(run_dir)) == config.max_train_steps


def _effective(config: TrainingConfig) -> dict[str, Any]:
    """The settings that shape a run: the weight of a term that is switched off does not (checked bit for bit)."""
    settings = config.to_dict()
    for switch, weight in (("use_cscl", "lambda_cscl"), ("use_macl", "lambda_macl"), ("use_location", "lambda_loc")):
        if not settings[switch]:
            settings.pop(weight)
    return settings


def _run_summary(run_dir: Path, last: int = 50) -> dict[str, float]:
    """Mean of each loss term over the last ``last`` steps of a run (``loss_<term>``) and its training time."""
    history = LossHistory.read(run_dir)
    terms = ("diffusion", "cscl", "macl", "location")
    summary = {f"loss_{t}": float(np.mean([e[t] for e in history[-last:]])) for t in terms if t in history[-1]}
    summary["train_seconds"] = round(sum(e.get("seconds", 0.0) for e in history))
    return summary


def _write_report(
    output_dir: Path,
    results: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    world: World,
    prompts: Sequence[WorldPrompt],
    renders: Sequence[Image.Image],
    samples: dict[str, list[Image.Image]],
) -> None:
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = results["rows"]
    order = ["base model (no subject)", *runs, "real renders"]
    table = scores_table(
        [(name, rows[name]) for name in order if name in rows],
        extra=(("L_diff (last 50)", "loss_diffusion"), ("train s", "train_seconds")),
    )
    (output_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    curves = {name: results["sweeps"][name] for name in runs if name in results["sweeps"]}
    for name in ("base model (no subject)", "real renders"):
        curves[name] = [{**rows[name], "scale": None}]
    plot_scale_sweep(
        curves,
        output_dir / "tradeoff.png",
        "controllability",
        "subject_similarity",
        "subject_similarity",
        title="Synthetic world: held-out subjects",
    )
    histories = {name: LossHistory.read(output_dir / "runs" / _slug(name)) for name in runs}
    plot_loss_curves(histories, output_dir / "loss_curves.png")
    _sample_grid(output_dir / "samples.png", world, prompts, renders, samples)
    logger.info("Results:\n%s\nwritten to %s", table, output_dir)


def _sample_grid(
    path: Path,
    world: World,
    prompts: Sequence[WorldPrompt],
    renders: Sequence[Image.Image],
    samples: dict[str, list[Image.Image]],
) -> None:
    """References and images of the first subjects' prompts: the real renders, then a row per run."""
    subject_ids = list(dict.fromkeys(p.subject_id for p in prompts))[:SAMPLE_SUBJECTS]
    chosen = [i for i, p in enumerate(prompts) if p.subject_id in subject_ids]
    references = [reference_image(world, sid) for sid in subject_ids]
    rows = [[*references, *(renders[i] for i in chosen)]]
    labels = ["real renders"]
    for name, images in samples.items():
        rows.append([*references, *(images[i] for i in chosen)])
        labels.append(name)
    columns = [f"ref {sid}" for sid in subject_ids] + [prompts[i].prompt for i in chosen]
    image_grid(rows, labels, columns, cell=72, label_height=40).save(path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="world-benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny world and two steps per run (checks the plumbing)")
    parser.add_argument("--variants", default=",".join(ABLATIONS), help="comma-separated runs of ABLATIONS")
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--eval_subjects", type=int, default=None)
    parser.add_argument("--sweep", default=None, help="comma-separated runs also scored at every sweep scale")
    parser.add_argument("--sweep_scales", default=None, help="comma-separated adapter scales")
    parser.add_argument("--loss_weights", default="", help="comma-separated extra lambdas for the full method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/synthetic_world.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = (
        BenchmarkSettings.smoke(Path(args.output_dir)) if args.smoke else BenchmarkSettings(Path(args.output_dir))
    )
    settings.variants = tuple(v for v in args.variants.split(",") if v)
    settings.loss_weights = tuple(float(w) for w in args.loss_weights.split(",") if w)
    if args.max_train_steps is not None:
        settings.max_train_steps = args.max_train_steps
    if args.eval_subjects is not None:
        settings.eval_subjects = args.eval_subjects
    if args.sweep is not None:
        settings.sweep = tuple(v for v in args.sweep.split(",") if v)
    if args.sweep_scales is not None:
        settings.sweep_scales = tuple(float(s) for s in args.sweep_scales.split(","))
    return run_benchmark(settings)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
