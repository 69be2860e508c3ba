"""Warm start from IP-Adapter-Plus on the synthetic world: loss curves, how the added parts open, held-out scores.

Issue 13 asks that a run started with ``TrainingConfig.init_from_ip_adapter`` begin at IP-Adapter-Plus's own
diffusion loss, and that the parts CustomContrast adds (TV fusion, location gates, S+ tokens) open as it trains. No
public IP-Adapter-Plus exists for the world's base model, so this script trains one first.

1. **IP-Adapter-Plus for the world.** IP-Adapter-Plus training is the diffusion loss alone, on self-reconstruction
   (the target is the reference frame itself), through the Resampler and each layer's decoupled ``to_k_ip`` /
   ``to_v_ip``. The trainer's own step computes exactly that when its adapter starts as a converted one does
   (``tv_fusion_init="identity"``, ``location_gate_init=0``, ``s_plus_scale=0``: the added parts are exact no-ops,
   tested against diffusers' ``load_ip_adapter`` to 1e-6) and the contrastive terms are off; here it updates only
   IP-Adapter-Plus's weights and freezes the rest, since the diffusion loss has a gradient on the TV fusion and on
   the gates (``train()`` would open them). We take this route rather than training diffusers'
   ``IPAdapterPlusImageProjection`` with ``IPAdapterAttnProcessor2_0`` because it is the same maths with the
   trainer's data, dropout and per-step draws, so the runs below see the same batches. The Resampler has the shape
   diffusers loads (depth 4, 64-wide heads: width 64, one head, 8 tokens). ``ip_adapter_state_dict`` writes it as an
   original flat-layout checkpoint (``image_proj.*`` / ``ip_adapter.*``), and the script checks that diffusers'
   ``load_ip_adapter`` of that file gives the trained adapter's images.
2. **Three runs of the same length on the same batches** (the recipe's cross-frame triplets, seed 0):
   ``warm start`` (``train()`` with ``init_from_ip_adapter`` set to that file, every objective of the world recipe,
   ``s_plus_warmup_steps`` half the run), ``from scratch`` (``train()``, a new adapter of the same shape) and
   ``IP-Adapter-Plus continued`` (step 1's loop: diffusion loss only, IP-Adapter-Plus's weights only). Each step logs
   every loss term, the S+ scale in use, the gates' strength (mean over layers) and the norm of the TV fusion's output
   projection. The first step's diffusion loss is compared with diffusers' IP-Adapter-Plus on the same batch.
3. **Scores** on held-out subjects (``world.evaluation`` at the world benchmark's prompt settings), every adapter at
   the settings it loads with: the base model, IP-Adapter-Plus (diffusers' ``load_ip_adapter``), the converted adapter
   at step 0 (S+ scale 0), and the three runs.

Writes ``<output_dir>/warm_start.json`` and ``warm_start.png``. A full run (neither ``--quick`` nor ``--smoke``) also
writes ``benchmarks/results/warm_start.json`` and ``docs/images/warm_start.png``, the figure in docs/training.md.

    python benchmarks/warm_start.py --threads 1                   # the documented run (about 15 min on one core)
    python benchmarks/warm_start.py --threads 1 --quick           # fewer steps and subjects (development)
    python benchmarks/warm_start.py --smoke --output_dir /tmp/ws  # seconds: a tiny world (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from common import machine_info, markdown_table, parse_args, stage, write_results
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file

from customcontrast_world import World, load_synthetic_base, load_world_judge, write_world
from customcontrast_world.benchmark import BenchmarkSettings
from customcontrast_world.evaluation import WorldPrompt, generate_world_images, score_world_images
from customcontrast_world.metrics import SubjectGallery
from customcontrast_world.recipe import world_training_config
from customcontrast_world.report import smoothed
from diffusers_customcontrast import load_customcontrast, unload_customcontrast
from diffusers_customcontrast.loaders.convert import CONVERTED_OPTIONS, ip_adapter_state_dict
from diffusers_customcontrast.losses import diffusion_loss, diffusion_target
from diffusers_customcontrast.training import (
    BatchEncoder,
    CustomContrastObjective,
    ObjectiveSettings,
    TrainingConfig,
    build_adapter,
    load_base_model,
    step_generator,
    train,
)
from diffusers_customcontrast.training.dataset import build_training_data, load_training_subjects

REPO = Path(__file__).resolve().parent.parent
FIGURE = REPO / "docs" / "images" / "warm_start.png"
BASE_MODEL_FOLDER = "world/customcontrast_world/assets/synthetic-base"
CHECKPOINT_NAME = "world-ip-adapter-plus.safetensors"

# IP-Adapter-Plus's shape for the world's base model (diffusers builds Resamplers of depth 4 with 64-wide heads) and
# the world recipe's textual part (docs/synthetic_world.md, section 4). Every run has this shape: they differ only in
# how they start and what they train.
ADAPTER_SHAPE = {
    "hidden_size": 64,
    "num_heads": 1,
    "visual_depth": 4,
    "num_visual_tokens": 8,
    "textual_depth": 1,
    "num_textual_tokens": 4,
    "timestep_embed_dim": 64,
    # What an IP-Adapter-Plus's Resampler computes (the first run is exported as one), for every run alike.
    "qformer_qk_norm": False,
}
DIFFUSION_ONLY = {"use_cscl": False, "use_macl": False, "use_location": False}
OPENING = ("s_plus_scale", "gate_strength", "tv_fusion_norm")
LOGGED = ("step", "diffusion", "cscl", "macl", "location", "total", *OPENING)  # per step in the json
RUNS = ("warm start", "from scratch", "IP-Adapter-Plus continued")


@dataclass(frozen=True)
class Budget:
    """Steps of each phase and the size of the evaluation (``--quick`` and ``--smoke`` shrink them)."""

    ip_adapter_steps: int
    steps: int
    settings: BenchmarkSettings
    check_subjects: int = 2
    """Held-out subjects whose float images diffusers' IP-Adapter-Plus and our adapters must give alike."""
    curve_window: int = 25
    """Moving-average window of the figure, and the table's first steps."""

    @property
    def last_steps(self) -> int:
        """The table's last steps: the last quarter of a run."""
        return max(1, self.steps // 4)

    @property
    def s_plus_warmup_steps(self) -> int:
        return max(1, self.steps // 2)


def make_budget(args: argparse.Namespace) -> Budget:
    output_dir = Path(args.output_dir)
    if args.smoke:
        return Budget(2, 3, BenchmarkSettings.smoke(output_dir), check_subjects=1, curve_window=1)
    if args.quick:
        settings = BenchmarkSettings(output_dir=output_dir, eval_subjects=8)
        return Budget(args.ip_adapter_steps or 60, args.steps or 30, settings, curve_window=5)
    return Budget(args.ip_adapter_steps or 1200, args.steps or 400, BenchmarkSettings(output_dir=output_dir))


@contextmanager
def phase(times: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Print the phase as ``common.stage`` does and record its wall-clock and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    with stage(name):
        yield
    times[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


# ---------------------------------------------------------------------------------------------------- training


def setup(config: TrainingConfig) -> tuple[CustomContrastObjective, BatchEncoder]:
    """The objective and batch encoder that ``train(config)`` builds (one process, CPU, float32)."""
    set_seed(config.seed)  # as train() does before building the adapter
    base = load_base_model(config)
    base.freeze("cpu", torch.float32)
    adapter = build_adapter(config, base)
    objective = CustomContrastObjective(
        base.unet, adapter, base.noise_scheduler, ObjectiveSettings.from_config(config)
    )
    return objective.train(), BatchEncoder.from_config(base, config, adapter.adapter_config)


def batches(config: TrainingConfig, encoder: BatchEncoder) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(step, batch)`` in the trainer's order: its dataset and sampler, re-seeded every epoch."""
    reference_size = encoder.base.image_encoder.config.image_size
    data = build_training_data(config, load_training_subjects(config), reference_size=reference_size)
    step, epoch = 0, 0
    while True:
        data.set_epoch(epoch)
        for batch in data.loader:
            batch.pop("skipped", None)
            yield step, batch
            step += 1
        epoch += 1


def ip_adapter_parameters(objective: CustomContrastObjective) -> list[torch.nn.Parameter]:
    """IP-Adapter-Plus's weights in the adapter: the Resampler (visual Q-Former) and each layer's to_k_ip / to_v_ip."""
    adapter = objective.adapter
    attention = [p for layer in adapter.layers for p in (layer.to_k_ip.weight, layer.to_v_ip.weight)]
    return [*adapter.encoder.visual_qformer.parameters(), *attention]


def train_ip_adapter_plus(config: TrainingConfig) -> tuple[CustomContrastObjective, list[dict[str, float]]]:
    """``config.max_train_steps`` trainer steps that update IP-Adapter-Plus's weights only; the rest stays frozen.

    The optimizer, learning-rate schedule, clipping and per-step draws are the trainer's (``train()``), so with the
    same config both see the same batches, noise and timesteps. Returns the objective and one log entry per step.
    """
    objective, encoder = setup(config)
    objective.adapter.requires_grad_(False)
    parameters = ip_adapter_parameters(objective)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    history = []
    last = time.perf_counter()
    for step, batch in batches(config, encoder):
        if step == config.max_train_steps:
            break
        output = objective(encoder(batch, step_generator(config.seed, step, 0, 0)), step=step)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        history.append({"step": step + 1, **{k: v.item() for k, v in output.terms.items()}, "seconds": now - last})
        last = now
    return objective, history


def reference_diffusion_loss(config: TrainingConfig, checkpoint: Path) -> float:
    """diffusers' IP-Adapter-Plus (``load_ip_adapter`` of ``checkpoint``) on the first batch of ``config``'s run:
    its diffusion loss, on the noise, timesteps and dropout that the run's first step draws."""
    objective, encoder = setup(config)
    _, batch = next(batches(config, encoder))
    inputs = encoder(batch, step_generator(config.seed, 0, 0, 0))
    pipe = load_synthetic_base()
    pipe.load_ip_adapter(str(checkpoint.parent), subfolder="", weight_name=checkpoint.name, image_encoder_folder=None)
    scheduler = objective.noise_scheduler
    with torch.no_grad():
        prediction = pipe.unet(
            scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps),
            inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            added_cond_kwargs={"image_embeds": [inputs.reference_features[:, None]]},  # one image per row
        ).sample
    return diffusion_loss(
        prediction, diffusion_target(scheduler, inputs.latents, inputs.noise, inputs.timesteps)
    ).item()


# ---------------------------------------------------------------------------------------------------- images


def ip_adapter_pipeline(checkpoint: Path):
    """The world's base pipeline with diffusers' own IP-Adapter-Plus of ``checkpoint`` loaded (scale 1)."""
    pipe = load_synthetic_base()
    pipe.load_ip_adapter(str(checkpoint.parent), subfolder="", weight_name=checkpoint.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    return pipe


def float_images(pipe, world: World, prompts: list[WorldPrompt], settings: BenchmarkSettings) -> np.ndarray:
    """The prompts' images in float32 [0, 1] (before the 8-bit rounding of PIL images)."""
    generation = {"num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale}
    return np.stack(generate_world_images(pipe, world, prompts, progress=False, output_type="np", **generation))


def export_check(
    world: World, prompts: list[WorldPrompt], checkpoint: Path, adapters: dict[str, Path], settings: BenchmarkSettings
) -> dict[str, float]:
    """Max abs difference of each adapter folder's images from diffusers' IP-Adapter-Plus of ``checkpoint``, and
    IP-Adapter-Plus's own effect (its images against the base model's: what a difference of 0 is to be read against)."""
    expected = float_images(ip_adapter_pipeline(checkpoint), world, prompts, settings)
    pipe = load_synthetic_base()
    differences = {}
    for name, folder in adapters.items():
        load_customcontrast(pipe, str(folder))
        differences[name] = float(np.abs(float_images(pipe, world, prompts, settings) - expected).max())
        unload_customcontrast(pipe)
    generation = {"num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale}
    base = np.stack(
        [
            np.asarray(image, dtype=np.float32) / 255
            for image in generate_world_images(pipe, world, prompts, progress=False, use_subject=False, **generation)
        ]
    )
    differences["IP-Adapter-Plus on vs off (8-bit)"] = float(np.abs(expected - base).max())
    return differences


def scores(
    world: World, checkpoint: Path, adapters: dict[str, Path], settings: BenchmarkSettings
) -> dict[str, dict[str, float]]:
    """Judge scores of the base model, diffusers' IP-Adapter-Plus and each adapter folder (at the settings it loads
    with) on the world benchmark's held-out prompts."""
    prompts = settings.prompts(world, seed=0)
    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge, split="heldout")
    generation = {
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "progress": False,
    }

    def judged(pipe, **kwargs) -> dict[str, float]:
        images = generate_world_images(pipe, world, prompts, **generation, **kwargs)
        return score_world_images(images, prompts, judge, gallery, world).to_dict()

    pipe = load_synthetic_base()
    results = {"base model (no subject)": judged(pipe, use_subject=False)}
    results["IP-Adapter-Plus (diffusers' load_ip_adapter)"] = judged(ip_adapter_pipeline(checkpoint))
    for name, folder in adapters.items():
        load_customcontrast(pipe, str(folder))
        results[name] = judged(pipe)
        unload_customcontrast(pipe)
    return results


# ---------------------------------------------------------------------------------------------------- report


def curve_summary(
    history: list[dict[str, float]], first: int, last: int, reference: list[dict[str, float]] | None = None
) -> dict[str, float]:
    """Mean diffusion loss over the ``first`` and the ``last`` steps and the added parts' state at the last step;
    with ``reference`` (a run on the same batches), the mean and standard error over the ``last`` steps of the
    per-step difference from it, in which the batch-to-batch noise cancels."""
    diffusion = np.array([entry["diffusion"] for entry in history])
    summary = {
        "diffusion_first": float(diffusion[:first].mean()),
        "diffusion_last": float(diffusion[-last:].mean()),
        **{name: history[-1][name] for name in OPENING},
    }
    if reference is not None:
        paired = diffusion[-last:] - np.array([entry["diffusion"] for entry in reference])[-last:]
        summary["minus_continued_last"] = float(paired.mean())
        summary["minus_continued_last_se"] = float(paired.std(ddof=1) / np.sqrt(last)) if last > 1 else float("nan")
    return summary


def plot_curves(histories: dict[str, list[dict[str, float]]], path: Path, window: int) -> Path:
    """The three runs' diffusion loss, the warm start's and from-scratch's difference from IP-Adapter-Plus continued
    on the same batches (moving averages over ``window`` steps), and the warm start's added parts opening."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(run: str, term: str) -> np.ndarray:
        return np.array([entry[term] for entry in histories[run]])

    figure = Figure(figsize=(16, 3.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 5)
    steps = series("warm start", "step")
    continued = series("IP-Adapter-Plus continued", "diffusion")
    for run in RUNS:
        axes[0].plot(steps, smoothed(series(run, "diffusion"), window), label=run, linewidth=1.2)
        if run != "IP-Adapter-Plus continued":
            axes[1].plot(steps, smoothed(series(run, "diffusion") - continued, window), linewidth=1.2)
    axes[1].axhline(0.0, color="C2", linewidth=1.0)
    # From scratch nothing opens (gates start at 1, the TV fusion random, S+ at 1), and IP-Adapter-Plus continued
    # keeps them shut: only the warm start's are drawn.
    for ax, term in zip(axes[2:], OPENING):
        ax.plot(steps, series("warm start", term), color="C0", linewidth=1.2)
    titles = (
        f"diffusion loss ({window}-step mean)",
        "minus IP-Adapter-Plus continued's",
        "warm start: S+ scale",
        "warm start: gate strength",
        "warm start: TV fusion norm",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def columns(history: list[dict[str, float]], terms: tuple[str, ...]) -> dict[str, list[float]]:
    """The per-step values of ``terms`` (those the run logged), one list each, to 5 significant digits."""
    logged = [term for term in terms if term in history[0]]
    return {term: [float(f"{entry[term]:.5g}") for entry in history] for term in logged}


def base_model_commit() -> dict[str, Any]:
    """The last commit that changed the shipped base model, and whether the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {
        "folder": BASE_MODEL_FOLDER,
        "commit": git("log", "-1", "--format=%h %cI %s", "--", BASE_MODEL_FOLDER),
        "modified_in_working_tree": bool(git("status", "--porcelain", "--", BASE_MODEL_FOLDER)),
        "repository_head": git("rev-parse", "--short", "HEAD"),
    }


def tables(result: dict[str, Any]) -> str:
    """The curves' table and the scores' table (markdown), as docs/training.md shows them."""
    first, last = result["budget"]["curve_window"], result["budget"]["last_steps"]

    def paired(curve: dict[str, float]) -> str:
        if "minus_continued_last" not in curve:
            return "-"
        return f"{curve['minus_continued_last']:+.4f} ± {curve['minus_continued_last_se']:.4f}"

    header = [
        "run",
        f"L_diff, first {first} steps",
        f"L_diff, last {last}",
        f"minus continued's, last {last}",
        "gate strength",
        "TV fusion norm",
        "S+ scale",
    ]
    opening = [[c["gate_strength"], c["tv_fusion_norm"], c["s_plus_scale"]] for c in result["curves"].values()]
    rows = [
        [name, c["diffusion_first"], c["diffusion_last"], paired(c), *state]
        for (name, c), state in zip(result["curves"].items(), opening)
    ]
    metrics = ("identity_accuracy", "shape_accuracy", "color_accuracy", "texture_accuracy", "controllability")
    score_header = ["adapter", "identity", "shape", "colour", "texture", "controllability", "similarity ± s.e."]
    score_rows = [
        [name, *(s[m] for m in metrics), f"{s['subject_similarity']:.3f} ± {s['subject_similarity_se']:.3f}"]
        for name, s in result["scores"].items()
    ]
    return markdown_table(header, rows) + "\n\n" + markdown_table(score_header, score_rows)


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--smoke", action="store_true", help="a tiny world and a few steps (seconds; the test)")
        parser.add_argument("--output_dir", default="runs/warm-start", help="world, adapters, json and figure")
        parser.add_argument("--ip_adapter_steps", type=int, default=None, help="IP-Adapter-Plus training steps")
        parser.add_argument("--steps", type=int, default=None, help="steps of each of the three runs")

    args = parse_args(__doc__.split("\n\n")[0], extra)
    budget = make_budget(args)
    settings = budget.settings
    output_dir = Path(args.output_dir)
    times: dict[str, dict[str, float]] = {}
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    machine = machine_info()
    base_model = base_model_commit()

    with phase(times, "world"):
        world = write_world(
            output_dir / "world",
            num_train_subjects=settings.num_train_subjects,
            num_heldout_subjects=settings.num_heldout_subjects,
            frames_per_subject=settings.frames_per_subject,
            seed=settings.world_seed,
        )
    train_data = world.split_dir("train")

    def config(name: str, **overrides: Any) -> TrainingConfig:
        return world_training_config(train_data, output_dir / name, **settings.training_overrides, **overrides)

    with phase(times, f"IP-Adapter-Plus: {budget.ip_adapter_steps} steps"):
        ip_config = config(
            "ip-adapter-plus",
            self_reconstruction=True,
            max_train_steps=budget.ip_adapter_steps,
            adapter={**ADAPTER_SHAPE, **CONVERTED_OPTIONS},
            **DIFFUSION_ONLY,
        )
        objective, ip_history = train_ip_adapter_plus(ip_config)
        objective.adapter.save_pretrained(output_dir / "ip-adapter-plus")
        checkpoint = output_dir / CHECKPOINT_NAME
        save_file(ip_adapter_state_dict(objective.adapter), checkpoint)

    warm = config(
        "warm-start",
        init_from_ip_adapter=str(checkpoint),
        s_plus_warmup_steps=budget.s_plus_warmup_steps,
        max_train_steps=budget.steps,
        adapter=ADAPTER_SHAPE,
    )
    histories = {}
    with phase(times, f"warm start: {budget.steps} steps"):
        histories["warm start"] = train(warm).loss_history
    with phase(times, f"from scratch: {budget.steps} steps"):
        scratch = config("from-scratch", max_train_steps=budget.steps, adapter=ADAPTER_SHAPE)
        histories["from scratch"] = train(scratch).loss_history
    with phase(times, f"IP-Adapter-Plus continued: {budget.steps} steps"):
        continued = warm.replace(output_dir=str(output_dir / "continued"), s_plus_warmup_steps=0, **DIFFUSION_ONLY)
        objective, histories["IP-Adapter-Plus continued"] = train_ip_adapter_plus(continued)
        objective.adapter.save_pretrained(output_dir / "continued")

    with phase(times, "first step: diffusers' IP-Adapter-Plus on the same batch"):
        reference = reference_diffusion_loss(warm, checkpoint)
        first = {name: histories[name][0]["diffusion"] for name in ("warm start", "IP-Adapter-Plus continued")}
        first_step = {
            "ip_adapter_plus_diffusers": reference,
            **first,
            "max_relative_difference": max(abs(v - reference) / reference for v in first.values()),
        }

    with phase(times, "converted adapter at step 0"):
        objective, _ = setup(warm)  # what the warm start starts from: init_from_ip_adapter's conversion
        objective.adapter.save_pretrained(output_dir / "converted")

    check_prompts = settings.prompts(world, seed=0)[: budget.check_subjects * settings.scenes_per_subject]
    with phase(times, "export check: diffusers' load_ip_adapter of the written checkpoint"):
        differences = export_check(
            world,
            check_prompts,
            checkpoint,
            {
                "trained IP-Adapter-Plus": output_dir / "ip-adapter-plus",
                "converted at step 0": output_dir / "converted",
            },
            settings,
        )

    scored = {
        "converted at step 0 (S+ scale 0)": output_dir / "converted",
        f"IP-Adapter-Plus continued, {budget.steps} steps": output_dir / "continued",
        f"warm start, {budget.steps} steps": output_dir / "warm-start",
        f"from scratch, {budget.steps} steps": output_dir / "from-scratch",
    }
    with phase(times, f"scores: {settings.eval_subjects} subjects x {settings.scenes_per_subject} scenes each"):
        world_scores = scores(world, checkpoint, scored, settings)

    result = {
        "machine": machine,
        "base_model": {**base_model, "changed_during_run": base_model_commit()["commit"] != base_model["commit"]},
        "budget": {
            "ip_adapter_steps": budget.ip_adapter_steps,
            "steps": budget.steps,
            "s_plus_warmup_steps": budget.s_plus_warmup_steps,
            "curve_window": budget.curve_window,
            "last_steps": budget.last_steps,
        },
        "evaluation": {
            "eval_subjects": settings.eval_subjects,
            "scenes_per_subject": settings.scenes_per_subject,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
        },
        "adapter_shape": ADAPTER_SHAPE,
        "first_step_diffusion_loss": first_step,
        "export_check_max_abs_difference": differences,
        "curves": {
            "IP-Adapter-Plus training": curve_summary(ip_history, budget.curve_window, budget.last_steps),
            **{
                name: curve_summary(
                    histories[name],
                    budget.curve_window,
                    budget.last_steps,
                    None if name == "IP-Adapter-Plus continued" else histories["IP-Adapter-Plus continued"],
                )
                for name in RUNS
            },
        },
        "scores": world_scores,
        "times": times,
        "total": {"wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu},
        "histories": {
            "IP-Adapter-Plus training": columns(ip_history, ("step", "diffusion")),
            **{name: columns(history, LOGGED) for name, history in histories.items()},
        },
    }
    figure = plot_curves(histories, output_dir / "warm_start.png", budget.curve_window)
    (output_dir / "warm_start.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    if not (args.quick or args.smoke):
        write_results("warm_start", dict(result))
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, FIGURE)
    print(tables(result))
    print(f"first step: {json.dumps(first_step)}")
    print(f"export check: {json.dumps(differences)}")
    print(f"total: {result['total']['wall_s']:.0f} s wall, {result['total']['cpu_s']:.0f} s CPU")


if __name__ == "__main__":
    main()
