"""The paper's claims measured on the synthetic world: ablation runs with several seeds, intervals, sweeps, plots.

::

    python -m customcontrast_world.benchmark --output_dir runs/world-benchmark   # ~2 h on 2 CPU cores
    python -m customcontrast_world.benchmark --output_dir /tmp/smoke --smoke    # seconds

Each run of :data:`~customcontrast_world.recipe.ABLATIONS` trains an adapter with the real trainer on the
same world for the same budget, once per seed (the seed sets the training's draws and the generations' noise), and
is scored on the held-out subjects (:mod:`~customcontrast_world.evaluation`) at scale 1 (visual branch and
S+ tokens); the runs in ``--sweep`` are also scored at every ``--sweep_scales`` value (the similarity /
controllability trade-off). Every figure is a mean with a 95 % bootstrap interval over subjects and seeds
(:mod:`.intervals`). Two reference rows frame them: the base model without a subject and *real renders*, the world's
own pictures of each subject in the prompted scenes (what a perfect adapter would give).

The paper's t-SNE figure (S+ tokens of one subject cluster across views with MACL) becomes a number: for each run,
the held-out subjects' photo frames are encoded, and ``s_plus_retrieval`` is the fraction of frames whose nearest
other frame by each layer's pooled S+ tokens belongs to the same subject (averaged over layers; chance about 2 %).

The stage ceilings (:mod:`.ceilings`) frame every figure: real renders, the base pipeline's autoencoder
reconstructions of them, the base model from text (colours named, and not), each with the shape accuracy per class.
``--ceilings_only`` measures them (and, with ``--adapter``, an adapter's figures) without training anything::

    python -m customcontrast_world.benchmark --output_dir runs/ceilings --ceilings_only --adapter <folder>

Beside them, ``"autoencoder_latent_noise"`` scores the autoencoder's decodes of latents with noise added
(``--latent_noise``): how much of a UNet's leftover error its decoder absorbs.

Written to ``output_dir``: ``results.json`` (``{"seeds", "ceilings", "autoencoder_latent_noise", "runs",
"base_model", "real_renders", "sweeps", ...}``),
``results.md`` (the tables), ``tradeoff.png``, ``loss_curves.png``, ``samples.png`` and ``runs/<name>/seed_<s>/``
(each adapter and its generated images). Trainings and generations run in ``--workers`` processes; adapters and
images are reused when a rerun would make them the same way, so an interrupted benchmark continues where it stopped
and a change of metric costs only the scoring.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from diffusers_customcontrast import (
    CustomContrastAdapter,
    load_customcontrast,
    set_customcontrast_scale,
    unload_customcontrast,
)
from diffusers_customcontrast.loaders import WEIGHTS_NAME
from diffusers_customcontrast.training import TrainingConfig, train
from diffusers_customcontrast.training.export import LOSS_HISTORY_NAME, LossHistory
from diffusers_customcontrast.training.faults import StopRequest
from diffusers_customcontrast.training.trainer import TRAINING_CONFIG_NAME

from .base_model import SYNTHETIC_BASE_DIR, load_synthetic_base
from .ceilings import autoencoder_reconstructions, stage_figures
from .dataset import World, load_world, write_world
from .evaluation import (
    ImageScores,
    WorldPrompt,
    evaluation_prompts,
    generate_world_images,
    judge_world_images,
    render_prompt,
)
from .intervals import bootstrap_intervals, interval
from .judge import load_world_judge
from .metrics import SubjectGallery
from .recipe import ABLATIONS, world_training_config
from .report import (
    image_grid,
    intervals_table,
    per_layer_table,
    plot_intervals_tradeoff,
    plot_loss_curves,
    shape_class_table,
)

logger = logging.getLogger(__name__)

__all__ = ["BenchmarkSettings", "run_benchmark", "s_plus_retrieval"]

RESULTS_FILE = "results.json"
GENERATION_RECORD = "generation.json"
SAMPLE_SUBJECTS = 3
BASE_MODEL = "base model (no subject)"
BASE_MODEL_NAMED = "base model, colours named in the prompt"
REAL_RENDERS = "real renders"
AUTOENCODER = "autoencoder reconstructions"
ADAPTER = "adapter"
PROMPT_SEED_STRIDE = 100_000  # prompt seeds of benchmark seed s start at s * stride: no two seeds share a noise


@dataclass
class BenchmarkSettings:
    """Everything that fixes a benchmark (its defaults are the documented run)."""

    output_dir: Path
    variants: tuple[str, ...] = tuple(ABLATIONS)
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: int = 2
    max_train_steps: int = 1200
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
    world_seed: int = 0
    retrieval_timestep: int = 500
    """Diffusion timestep at which S+ tokens are compared for ``s_plus_retrieval``."""
    base_model: Path = SYNTHETIC_BASE_DIR
    """The base pipeline folder every run trains and generates on (default: the shipped synthetic base)."""
    adapter: Path | None = None
    """An adapter folder scored beside the runs, without training (``"adapter"`` in ``results.json``)."""
    latent_noise: tuple[float, ...] = (0.2, 0.4)
    """Stds of the noise added to the autoencoder's latents before decoding, each scored as
    ``"autoencoder_latent_noise"`` in ``results.json``: how much of a UNet's error its decoder absorbs."""

    @classmethod
    def smoke(cls, output_dir: Path) -> BenchmarkSettings:
        """A few seconds of everything: a tiny world, two seeds, two training steps per run, two inference steps."""
        return cls(
            output_dir=output_dir,
            seeds=(0, 1),
            workers=1,
            max_train_steps=2,
            num_train_subjects=8,
            num_heldout_subjects=3,
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

    def scales(self, run: str) -> list[float]:
        return sorted({1.0, *(self.sweep_scales if run in self.sweep else ())})

    def prompts(self, world: World, seed: int, name_colors: bool = False) -> list[WorldPrompt]:
        return evaluation_prompts(
            world,
            num_subjects=self.eval_subjects,
            scenes_per_subject=self.scenes_per_subject,
            seed=seed * PROMPT_SEED_STRIDE,
            name_colors=name_colors,
        )

    def run_dir(self, run: str, seed: int) -> Path:
        return Path(self.output_dir) / "runs" / _slug(run) / f"seed_{seed}"

    def load_base(self):
        return load_synthetic_base(path=self.base_model)

    def training_config(self, world: World, run: str, overrides: dict[str, Any], seed: int) -> TrainingConfig:
        """The trainer's config of one run and seed: on :attr:`base_model`, the model it is then scored on."""
        return world_training_config(
            world.split_dir("train"),
            self.run_dir(run, seed),
            pretrained_model_name_or_path=os.fspath(self.base_model),
            max_train_steps=self.max_train_steps,
            seed=seed,
            **{**self.training_overrides, **overrides},
        )


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
    """Train, generate and score every run and seed, then write the tables and figures; returns ``results.json``.

    A run already trained with the same configuration is not trained again, images already generated with the same
    prompts and settings are not generated again, and the scores are always computed afresh from the images.
    """
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    world = _world(output_dir / "world", settings)
    runs = settings.runs()
    # Seed-major, so that a benchmark cut off part-way has every run for its first seeds (``--seeds`` reports them).
    jobs = [(None, {}, seed) for seed in settings.seeds]
    jobs += [(name, overrides, seed) for seed in settings.seeds for name, overrides in runs.items()]
    _run_jobs(settings, jobs)

    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge)
    pipe = settings.load_base()

    def judged(run: str | None, seed: int, scale: float, name_colors: bool = False) -> ImageScores:
        images = _generations(settings, world, run, seed, scale, pipe=None, name_colors=name_colors)
        return judge_world_images(images, settings.prompts(world, seed, name_colors), judge, gallery, world)

    def judged_images(images_of: dict[int, list[Image.Image]]) -> list[ImageScores]:
        return [judge_world_images(images_of[s], settings.prompts(world, s), judge, gallery, world) for s in images_of]

    renders = {seed: [render_prompt(world, p) for p in settings.prompts(world, seed)] for seed in settings.seeds}
    reconstructions = {seed: autoencoder_reconstructions(pipe.vae, renders[seed]) for seed in settings.seeds}
    ceilings = {
        "real_renders": stage_figures(judged_images(renders), world),
        "autoencoder": stage_figures(judged_images(reconstructions), world),
        "base_model": stage_figures([judged(None, seed, 0.0) for seed in settings.seeds], world),
        "base_model_colours_named": stage_figures(
            [judged(None, seed, 0.0, name_colors=True) for seed in settings.seeds], world
        ),
    }
    tolerance = {
        f"{std:g}": stage_figures(
            judged_images({s: autoencoder_reconstructions(pipe.vae, renders[s], std, seed=s) for s in settings.seeds}),
            world,
        )
        for std in settings.latent_noise
    }
    results: dict[str, Any] = {
        "seeds": len(settings.seeds),
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "ceilings": ceilings,
        "autoencoder_latent_noise": tolerance,
        **{stage: ceilings[stage] for stage in ("base_model", "base_model_colours_named", "real_renders")},
        "runs": {},
        "sweeps": {},
    }
    if settings.adapter is not None:
        adapter_images = {seed: _generations(settings, world, ADAPTER, seed, 1.0, pipe) for seed in settings.seeds}
        results["adapter"] = stage_figures(judged_images(adapter_images), world)
    for name in tqdm(runs, desc="scoring runs"):
        per_scale = {
            scale: bootstrap_intervals([judged(name, seed, scale) for seed in settings.seeds])
            for scale in settings.scales(name)
        }
        retrieval = [s_plus_retrieval(settings.run_dir(name, seed), world, pipe, settings) for seed in settings.seeds]
        results["runs"][name] = {
            **per_scale[1.0],
            "s_plus_retrieval": interval(*_stack_cells(retrieval)),
            "s_plus_retrieval_per_layer": np.mean([r["per_layer"] for r in retrieval], axis=0).tolist(),
            **_run_summary([settings.run_dir(name, seed) for seed in settings.seeds]),
        }
        if len(per_scale) > 1:
            results["sweeps"][name] = [{"scale": scale, **point} for scale, point in per_scale.items()]
    _write_report(output_dir, results, runs, world, settings, renders)
    return results


# ------------------------------------------------------------------------------------------------------------------
# Jobs: one training (if needed) and the generations of one run and seed, in worker processes
# ------------------------------------------------------------------------------------------------------------------


def _run_jobs(settings: BenchmarkSettings, jobs: list[tuple[str | None, dict[str, Any], int]]) -> None:
    """Run every (run, overrides, seed) job, in ``settings.workers`` processes (``run=None``: the base model)."""
    if settings.workers <= 1:
        for job in tqdm(jobs, desc="benchmark jobs"):
            _job(settings, *job)
        return
    # spawn, not fork: a forked child would inherit this process's torch threads and accelerate state. A Pool, not a
    # ProcessPoolExecutor: leaving its block terminates the workers (SIGTERM, so a training saves its checkpoint),
    # where an executor would finish every running and queued job (hours) before an error or a stop reached the user.
    context = multiprocessing.get_context("spawn")
    with StopRequest() as stop, context.Pool(settings.workers) as pool:
        pending = [pool.apply_async(_job, (settings, *job)) for job in jobs]
        for result in tqdm(pending, desc="benchmark jobs"):
            while not (result.ready() or stop.requested):
                result.wait(timeout=1.0)
            if stop.requested:
                break
            result.get()
    if stop.requested:
        raise SystemExit(f"Stopped on {stop.received}; run the same command again to resume.")


def _job(settings: BenchmarkSettings, run: str | None, overrides: dict[str, Any], seed: int) -> None:
    torch.set_num_threads(1)  # one thread per process is fastest on these shared cores (docs/synthetic_world.md)
    world = load_world(Path(settings.output_dir) / "world")
    if run is None:
        pipe = settings.load_base()
        for name_colors in (False, True):
            _generations(settings, world, None, seed, 0.0, pipe, name_colors)
        return
    config = settings.training_config(world, run, overrides, seed)
    if not _trained_with(config) and train(config).interrupted:
        # SIGTERM: the trainer saved a checkpoint and returned; stop rather than go on with an unfinished adapter.
        raise SystemExit(f"Stopped while training {run!r} (seed {seed}); run the same command again to resume.")
    pipe = settings.load_base()
    for scale in settings.scales(run):
        _generations(settings, world, run, seed, scale, pipe)


def _generations(
    settings: BenchmarkSettings,
    world: World,
    run: str | None,
    seed: int,
    scale: float,
    pipe,
    name_colors: bool = False,
) -> list[Image.Image]:
    """The images of one run, seed and scale: read back if made the same way, else generated with ``pipe``.

    ``run=None`` is the base pipeline without a subject (``name_colors``: prompted with the subject's colours),
    ``run=ADAPTER`` the adapter of ``settings.adapter``. Images are stored as PNG (lossless), with a
    ``generation.json`` recording the prompts, sampler settings, base model and adapter weights they were made with.
    """
    prompts = settings.prompts(world, seed, name_colors)
    output_dir = Path(settings.output_dir)
    if run is None:
        adapter, kept = None, output_dir / ("base_model_colours_named" if name_colors else "base_model")
    elif run == ADAPTER:
        adapter, kept = settings.adapter, output_dir / "adapter"
    else:
        adapter, kept = settings.run_dir(run, seed), settings.run_dir(run, seed).parent
    folder = kept / f"seed_{seed}" / "generations" / f"scale_{scale:g}"
    record = {
        "prompts": [dataclasses.asdict(p) for p in prompts],
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "scaled": "visual branch and S+ tokens",
        "base_model": _file_digest(Path(settings.base_model) / "unet" / "diffusion_pytorch_model.safetensors"),
        "adapter_weights": _file_digest(Path(adapter) / WEIGHTS_NAME) if adapter else None,
    }
    stored = _stored_images(folder, record)
    if stored is not None:
        return stored
    if pipe is None:
        raise RuntimeError(f"expected generated images in '{folder}' (the benchmark's jobs write them), found none")
    if adapter is not None:
        load_customcontrast(pipe, adapter)
        set_customcontrast_scale(pipe, scale, s_plus_scale=scale)
    try:
        images = generate_world_images(
            pipe,
            world,
            prompts,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            use_subject=adapter is not None,
            progress=False,
        )
    finally:
        if adapter is not None:
            unload_customcontrast(pipe)
    _store_images(folder, images, record)
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
        seed=settings.world_seed,
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


def _run_summary(run_dirs: Sequence[Path], last: int = 50) -> dict[str, float]:
    """Mean over seeds of each loss term over the last ``last`` steps (``loss_<term>``) and of the training time."""
    histories = [LossHistory.read(run_dir) for run_dir in run_dirs]
    terms = [t for t in ("diffusion", "cscl", "macl", "location") if t in histories[0][-1]]
    summary = {f"loss_{t}": float(np.mean([e[t] for h in histories for e in h[-last:]])) for t in terms}
    summary["train_seconds"] = round(float(np.mean([sum(e.get("seconds", 0.0) for e in h) for h in histories])))
    return summary


# ------------------------------------------------------------------------------------------------------------------
# The S+ space: does a subject keep its tokens across views?
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def s_plus_retrieval(adapter_dir: Path, world: World, pipe, settings: BenchmarkSettings) -> dict[str, Any]:
    """Same-subject retrieval across frames from each layer's pooled S+ tokens, on the held-out photo frames.

    Every photo frame of the evaluated held-out subjects is segmented as a reference; for each layer, a frame's
    nearest other frame (cosine of the S+ tokens averaged over tokens) is a hit when it shows the same subject.
    Returns ``{"subject_ids", "hits"}`` (per frame, the fraction of layers with a hit) and ``"per_layer"``.
    """
    adapter = CustomContrastAdapter.from_pretrained(adapter_dir).eval()
    subject_ids = list(dict.fromkeys(p.subject_id for p in settings.prompts(world, 0)))
    frames = [
        (sid, position)
        for sid in subject_ids
        for position, info in enumerate(world.frames(sid))
        if info.view.style == "photo"
    ]
    images = [world.reference_image(sid, position) for sid, position in frames]
    pixels = pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
    features = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    timesteps = torch.full((len(images),), settings.retrieval_timestep)
    tokens = F.normalize(adapter(features, timesteps).s_plus.mean(dim=2), dim=-1)  # [frames, layers, D]
    similarity = torch.einsum("ild,jld->lij", tokens, tokens)
    similarity.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
    owners = torch.tensor([subject_ids.index(sid) for sid, _ in frames])
    hits = (owners[similarity.argmax(dim=-1)] == owners).float()  # [layers, frames]
    return {
        "subject_ids": [sid for sid, _ in frames],
        "hits": hits.mean(dim=0).tolist(),
        "per_layer": hits.mean(dim=1).tolist(),
    }


def _stack_cells(per_seed: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per (seed, subject) sums and counts of :func:`s_plus_retrieval` hits, for :func:`~.intervals.interval`."""
    subjects = list(dict.fromkeys(per_seed[0]["subject_ids"]))
    sums = np.zeros((len(per_seed), len(subjects)))
    counts = np.zeros_like(sums)
    for s, result in enumerate(per_seed):
        for sid, hit in zip(result["subject_ids"], result["hits"]):
            sums[s, subjects.index(sid)] += hit
            counts[s, subjects.index(sid)] += 1
    return sums, counts


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def _write_report(
    output_dir: Path,
    results: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    world: World,
    settings: BenchmarkSettings,
    renders: dict[int, list[Image.Image]],
) -> None:
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    ceilings = results["ceilings"]
    rows = [
        (BASE_MODEL_NAMED, ceilings["base_model_colours_named"]),
        (BASE_MODEL, ceilings["base_model"]),
        *results["runs"].items(),
        *([(ADAPTER, results["adapter"])] if "adapter" in results else []),
        *[(f"{AUTOENCODER}, latent noise {std}", entry) for std, entry in results["autoencoder_latent_noise"].items()],
        (AUTOENCODER, ceilings["autoencoder"]),
        (REAL_RENDERS, ceilings["real_renders"]),
    ]
    per_class = [(name, entry["shape_acc_per_class"]) for name, entry in rows if "shape_acc_per_class" in entry]
    tables = [
        intervals_table(rows, extra=(("S+ retrieval", "s_plus_retrieval"),) if runs else ()),
        shape_class_table(per_class),
    ]
    sweeps = [
        (f"{name} @ {point['scale']:g}", point) for name, points in results["sweeps"].items() for point in points
    ]
    if sweeps:
        tables.append(intervals_table(sweeps, first_column="run @ scale"))
    if runs:
        per_layer = [(name, run["s_plus_retrieval_per_layer"]) for name, run in results["runs"].items()]
        tables.append(per_layer_table(per_layer, first_column="S+ retrieval per layer"))
    table = "\n\n".join(tables)
    (output_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    first = settings.seeds[0]
    samples = {BASE_MODEL: _generations(settings, world, None, first, 0.0, pipe=None)}
    samples.update({name: _generations(settings, world, name, first, 1.0, pipe=None) for name in runs})
    if "adapter" in results:
        samples[ADAPTER] = _generations(settings, world, ADAPTER, first, 1.0, pipe=None)
    _sample_grid(output_dir / "samples.png", world, settings.prompts(world, first), renders[first], samples)
    if runs:
        curves = {name: results["sweeps"].get(name, [{"scale": 1.0, **results["runs"][name]}]) for name in runs}
        references = {BASE_MODEL: results["base_model"], REAL_RENDERS: results["real_renders"]}
        plot_intervals_tradeoff(curves, references, output_dir / "tradeoff.png", "controllability", "similarity")
        histories = {name: LossHistory.read(settings.run_dir(name, first)) for name in runs}
        plot_loss_curves(histories, output_dir / "loss_curves.png")
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
    references = [world.reference_image(sid) for sid in subject_ids]
    rows = [[*references, *(renders[i] for i in chosen)]]
    labels = [REAL_RENDERS]
    for name, images in samples.items():
        rows.append([*references, *(images[i] for i in chosen)])
        labels.append(name)
    columns = [f"ref {sid}" for sid in subject_ids] + [prompts[i].prompt for i in chosen]
    image_grid(rows, labels, columns, cell=72, label_height=40).save(path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    defaults = BenchmarkSettings(Path("world-benchmark"))
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], prog="python -m customcontrast_world.benchmark"
    )
    parser.add_argument("--output_dir", default="world-benchmark", help="where everything is written")
    parser.add_argument("--smoke", action="store_true", help="tiny world and two steps per run (checks the plumbing)")
    parser.add_argument("--variants", default=",".join(ABLATIONS), help="comma-separated runs of ABLATIONS")
    parser.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {defaults.seeds})")
    parser.add_argument("--workers", type=int, default=None, help=f"processes (default {defaults.workers})")
    parser.add_argument("--max_train_steps", type=int, default=None, help=f"default {defaults.max_train_steps}")
    parser.add_argument("--eval_subjects", type=int, default=None, help=f"default {defaults.eval_subjects}")
    parser.add_argument("--sweep", default=None, help="comma-separated runs also scored at every sweep scale")
    parser.add_argument("--sweep_scales", default=None, help="comma-separated adapter scales")
    parser.add_argument("--loss_weights", default="", help="comma-separated extra lambdas for the full method")
    parser.add_argument(
        "--ceilings_only", action="store_true", help="score the stage ceilings (and --adapter) only; train nothing"
    )
    parser.add_argument("--base_model", default=None, help="base pipeline folder (default: the shipped base)")
    parser.add_argument("--adapter", default=None, help="an adapter folder to score beside the runs, untrained")
    parser.add_argument(
        "--latent_noise", default=None, help=f"comma-separated latent noise stds (default {defaults.latent_noise})"
    )
    args = parser.parse_args(argv)
    settings = (
        BenchmarkSettings.smoke(Path(args.output_dir)) if args.smoke else BenchmarkSettings(Path(args.output_dir))
    )
    settings.variants = () if args.ceilings_only else tuple(v for v in args.variants.split(",") if v)
    if args.base_model is not None:
        settings.base_model = Path(args.base_model)
    if args.adapter is not None:
        settings.adapter = Path(args.adapter)
    settings.loss_weights = tuple(float(w) for w in args.loss_weights.split(",") if w)
    if args.seeds is not None:
        settings.seeds = tuple(int(s) for s in args.seeds.split(","))
    for name in ("workers", "max_train_steps", "eval_subjects"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.sweep is not None:
        settings.sweep = tuple(v for v in args.sweep.split(",") if v)
    if args.sweep_scales is not None:
        settings.sweep_scales = tuple(float(s) for s in args.sweep_scales.split(","))
    if args.latent_noise is not None:
        settings.latent_noise = tuple(float(s) for s in args.latent_noise.split(",") if s)
    torch.set_num_threads(1)
    return run_benchmark(settings)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
