"""The offline demo: ``python -m diffusers_customcontrast.demo``.

Trains a CustomContrast adapter on the synthetic world with the real trainer, then puts subjects it has never seen
into prompted scenes, all offline on a CPU (about 7 minutes on 2 cores with the defaults):

1. writes the world (``docs/synthetic_world.md``): 300 train and 50 held-out subjects, 8 frames each;
2. trains an adapter for the shipped tiny base model on the train subjects (``python -m
   diffusers_customcontrast.train`` with the recipe of :mod:`diffusers_customcontrast.world.recipe`);
3. loads it with ``load_customcontrast`` and generates held-out subjects in prompted scenes;
4. writes a report to ``<output_dir>/report``: ``grid.png`` (per subject: its reference, the world's own picture
   of each prompted scene, the generations with the adapter and those of the base model alone),
   ``loss_curves.png``, ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .loading import load_customcontrast, unload_customcontrast
from .training import train
from .world import load_synthetic_base, write_world
from .world.evaluation import evaluate_on_world, evaluation_prompts, reference_image, render_prompt, score_world_images
from .world.judge import load_world_judge
from .world.metrics import SubjectGallery
from .world.recipe import world_training_config
from .world.report import image_grid, plot_loss_curves, scores_table

logger = logging.getLogger(__name__)

SMOKE = {"num_train_subjects": 8, "num_heldout_subjects": 2, "frames_per_subject": 3}


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the demo; returns the report folder."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    report_dir = output_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)

    logger.info("[1/4] Writing the synthetic world to %s", output_dir / "world")
    world_size = SMOKE if args.smoke else {}
    world = write_world(output_dir / "world", seed=args.seed, **world_size)

    logger.info("[2/4] Training an adapter on %d train subjects", len(world.splits["train"]))
    overrides = {"train_batch_size": 4} if args.smoke else {}
    config = world_training_config(
        world.split_dir("train"),
        output_dir / "adapter",
        max_train_steps=args.max_train_steps,
        seed=args.seed,
        **overrides,
    )
    result = train(config)

    logger.info("[3/4] Generating held-out subjects in prompted scenes")
    pipe = load_synthetic_base()
    check_prompt = evaluation_prompts(world, num_subjects=1)[0]
    before = _generate_plain(pipe, check_prompt.prompt, args)
    load_customcontrast(pipe, result.output_dir)
    prompts = evaluation_prompts(world, num_subjects=args.eval_subjects, scenes_per_subject=args.scenes_per_subject)
    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge)
    scored = evaluate_on_world(
        pipe, world, (0.0, 1.0), prompts, judge, gallery, num_inference_steps=args.num_inference_steps
    )
    unload_customcontrast(pipe)
    restored = np.array_equal(np.asarray(before), np.asarray(_generate_plain(pipe, check_prompt.prompt, args)))

    logger.info("[4/4] Writing the report to %s", report_dir)
    renders = [render_prompt(world, p) for p in prompts]
    rows = {
        "base model, no subject (scale 0)": scored[0.0][0].to_dict(),
        "CustomContrast (scale 1)": scored[1.0][0].to_dict(),
        "real renders (upper bound)": score_world_images(renders, prompts, judge, gallery, world).to_dict(),
    }
    metrics = {
        "rows": rows,
        "final_losses": result.final_losses,
        "train_steps": result.global_step,
        "seconds_per_step": result.seconds_per_step,
        "unload_restores_base": restored,
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_loss_curves({"full method": result.loss_history}, report_dir / "loss_curves.png")
    _write_grid(report_dir / "grid.png", world, prompts, renders, scored[1.0][1], scored[0.0][1])
    table = scores_table(list(rows.items()))
    (report_dir / "report.md").write_text(_report_text(table, metrics, args), encoding="utf-8")
    logger.info("%s\nunload_customcontrast restores the base pipeline exactly: %s", table, restored)
    if not restored:
        raise SystemExit("unload_customcontrast did not restore the base pipeline")
    return report_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo-output")
    parser.add_argument("--max_train_steps", type=int, default=500)
    parser.add_argument("--eval_subjects", type=int, default=12, help="held-out subjects to generate")
    parser.add_argument("--scenes_per_subject", type=int, default=4, help="prompted scenes per subject (last: sketch)")
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/synthetic_world.md)")
    parser.add_argument("--smoke", action="store_true", help="a tiny world and a few steps (checks the plumbing)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_train_steps, args.eval_subjects, args.scenes_per_subject = 2, 2, 2
        args.num_inference_steps = 2
    return args


def _generate_plain(pipe, prompt: str, args: argparse.Namespace) -> Image.Image:
    generator = torch.Generator().manual_seed(args.seed)
    return pipe(prompt, num_inference_steps=args.num_inference_steps, generator=generator).images[0]


def _write_grid(path: Path, world, prompts, renders, adapted, base) -> None:
    """Per subject three rows: reference + real renders, reference + adapter generations, blank + base model."""
    rows, labels = [], []
    blank = Image.new("RGB", (64, 64), "white")
    subject_ids = list(dict.fromkeys(p.subject_id for p in prompts))
    for subject_id in subject_ids:
        chosen = [i for i, p in enumerate(prompts) if p.subject_id == subject_id]
        reference = reference_image(world, subject_id)
        rows += [
            [reference, *(renders[i] for i in chosen)],
            [reference, *(adapted[i] for i in chosen)],
            [blank, *(base[i] for i in chosen)],
        ]
        labels += [f"{subject_id}: real", "CustomContrast", "base model"]
    # Backgrounds rotate over subjects, so a column is a scene number; the "real" row shows each subject's scene.
    scenes = [f"scene {k + 1}: {p.style}" for k, p in enumerate(q for q in prompts if q.subject_id == subject_ids[0])]
    image_grid(rows, labels, ["reference", *scenes], cell=64, label_width=130).save(path)


def _report_text(table: str, metrics: dict, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            "# CustomContrast on the synthetic world",
            "",
            f"Adapter trained for {metrics['train_steps']} steps ({metrics['seconds_per_step'] or 0:.2f} s/step); "
            f"{args.eval_subjects} held-out subjects x {args.scenes_per_subject} prompted scenes, "
            f"{args.num_inference_steps} DDIM steps.",
            "",
            table,
            "",
            "Final losses: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["final_losses"].items()),
            "",
            f"unload_customcontrast restores the base pipeline exactly: {metrics['unload_restores_base']}",
            "",
            "![grid](grid.png)",
            "",
            "![loss curves](loss_curves.png)",
            "",
        ]
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
