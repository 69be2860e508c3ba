"""The offline demo: ``python -m customcontrast_world.demo``.

Trains a CustomContrast adapter on the synthetic world with the real trainer, then puts subjects it has never seen
into prompted scenes, all offline on a CPU (see ``docs/synthetic_world.md`` for its time on 2 cores):

1. writes the world (``docs/synthetic_world.md``): 300 train and 50 held-out subjects, 8 frames each;
2. trains an adapter for the shipped tiny base model on the train subjects (the trainer of ``python -m
   diffusers_customcontrast.train`` with the recipe of :mod:`customcontrast_world.recipe`), or, with
   ``--pretrained``, takes the adapter that ships with the package (trained by the world benchmark's full run);
3. loads it with ``load_customcontrast`` and generates held-out subjects in prompted scenes, with and without it;
4. writes a report to ``<output_dir>/report``: ``grid.png`` (per subject: its reference, the world's own picture
   of each prompted scene, the generations with the adapter and those of the base model alone),
   ``loss_curves.png``, ``metrics.json`` and ``report.md``, which says what to look for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_customcontrast import load_customcontrast, unload_customcontrast
from diffusers_customcontrast.training import train
from diffusers_customcontrast.training.export import LossHistory

from .base_model import load_synthetic_base
from .ceilings import autoencoder_reconstructions
from .dataset import write_world
from .evaluation import (
    evaluate_on_world,
    evaluation_prompts,
    generate_world_images,
    render_prompt,
    score_world_images,
)
from .judge import load_world_judge
from .metrics import SubjectGallery
from .recipe import WORLD_ADAPTER_DIR, world_training_config
from .report import image_grid, plot_loss_curves, scores_table

logger = logging.getLogger(__name__)

SMOKE = {"num_train_subjects": 8, "num_heldout_subjects": 2, "frames_per_subject": 3}
ROWS = (
    "base model, no subject (scale 0)",
    "base model, colours named in the prompt",
    "CustomContrast (scale 1)",
    "autoencoder reconstructions (ceiling of the UNet)",
    "real renders (upper bound)",
)
"""The report's rows: the base model and the adapter, then the chain's stage ceilings (:mod:`.ceilings`)."""


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the demo; returns the report folder."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    report_dir = output_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)

    logger.info("[1/4] Writing the synthetic world to %s", output_dir / "world")
    world = write_world(output_dir / "world", seed=args.seed, **(SMOKE if args.smoke else {}))

    if args.pretrained is not None:
        adapter_dir = Path(args.pretrained)
        logger.info("[2/4] Using the trained adapter at %s (no training)", adapter_dir)
        training = {"train_steps": None, "seconds_per_step": None, "final_losses": {}}
        history = LossHistory.read(adapter_dir) if (adapter_dir / "loss_history.jsonl").is_file() else []
    else:
        logger.info("[2/4] Training an adapter on %d train subjects", len(world.splits["train"]))
        config = world_training_config(
            world.split_dir("train"),
            output_dir / "adapter",
            max_train_steps=args.max_train_steps,
            seed=args.seed,
            **({"train_batch_size": 4} if args.smoke else {}),
        )
        result = train(config)
        adapter_dir, history = result.output_dir, result.loss_history
        training = {
            "train_steps": result.global_step,
            "seconds_per_step": result.seconds_per_step,
            "final_losses": result.final_losses,
        }

    logger.info("[3/4] Generating held-out subjects in prompted scenes")
    pipe = load_synthetic_base()
    check_prompt = evaluation_prompts(world, num_subjects=1)[0]
    before = _generate_plain(pipe, check_prompt.prompt, args)
    load_customcontrast(pipe, adapter_dir)
    prompts = evaluation_prompts(world, num_subjects=args.eval_subjects, scenes_per_subject=args.scenes_per_subject)
    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge)
    scored = evaluate_on_world(
        pipe, world, (0.0, 1.0), prompts, judge, gallery, num_inference_steps=args.num_inference_steps
    )
    unload_customcontrast(pipe)
    restored = np.array_equal(np.asarray(before), np.asarray(_generate_plain(pipe, check_prompt.prompt, args)))
    named = evaluation_prompts(
        world, num_subjects=args.eval_subjects, scenes_per_subject=args.scenes_per_subject, name_colors=True
    )
    from_words = generate_world_images(
        pipe, world, named, num_inference_steps=args.num_inference_steps, use_subject=False, progress=False
    )

    logger.info("[4/4] Writing the report to %s", report_dir)
    renders = [render_prompt(world, p) for p in prompts]
    scored_images = (
        scored[0.0][1],
        from_words,
        scored[1.0][1],
        autoencoder_reconstructions(pipe.vae, renders),
        renders,
    )
    rows = {row: score_world_images(images, prompts, judge, gallery, world).to_dict()
            for row, images in zip(ROWS, scored_images)}  # fmt: skip
    metrics = {
        "rows": rows,
        **training,
        "adapter": os.fspath(adapter_dir),
        "unload_restores_base": restored,
        "seconds": round(time.perf_counter() - started),
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if history:
        plot_loss_curves({"full method": history}, report_dir / "loss_curves.png")
    _write_grid(report_dir / "grid.png", world, prompts, renders, scored[1.0][1], scored[0.0][1])
    table = scores_table(list(rows.items()))
    (report_dir / "report.md").write_text(_report_text(table, metrics, args, bool(history)), encoding="utf-8")
    logger.info("%s\nThe adapter is in %s; the report in %s", table, adapter_dir, report_dir / "report.md")
    if not restored:
        raise SystemExit("unload_customcontrast did not restore the base pipeline")
    return report_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a CustomContrast adapter on the synthetic world and put held-out subjects into prompted "
        "scenes, offline on a CPU.",
        prog="python -m customcontrast_world.demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", default="demo-output", help="where the world, the adapter and the report go")
    parser.add_argument(
        "--pretrained",
        nargs="?",
        const=os.fspath(WORLD_ADAPTER_DIR),
        default=None,
        help="skip training and use a trained adapter folder (without a value: the one shipped with the package)",
    )
    parser.add_argument("--max_train_steps", type=int, default=1000, help="adapter training steps")
    parser.add_argument("--eval_subjects", type=int, default=12, help="held-out subjects to generate")
    parser.add_argument("--scenes_per_subject", type=int, default=4, help="prompted scenes per subject (last: sketch)")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="DDIM steps per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the training and the generations")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (2: the quickstart machine's cores; 1 on cores other work shares)",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny world and a few steps (checks the plumbing)")
    args = parser.parse_args(argv)
    if args.pretrained is not None and not (Path(args.pretrained) / "config.json").is_file():
        if Path(args.pretrained) == WORLD_ADAPTER_DIR:
            parser.error(
                f"no trained world adapter ships in this checkout ({WORLD_ADAPTER_DIR} is missing): run the demo "
                "without --pretrained to train one, or pass --pretrained <adapter folder>"
            )
        parser.error(f"--pretrained expects an adapter folder holding config.json, got '{args.pretrained}'")
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
        reference = world.reference_image(subject_id)
        rows += [
            [reference, *(renders[i] for i in chosen)],
            [reference, *(adapted[i] for i in chosen)],
            [blank, *(base[i] for i in chosen)],
        ]
        labels += [f"{subject_id}: real", "CustomContrast", "base model"]
    # Backgrounds rotate over subjects, so a column is a scene number; the "real" row shows each subject's scene.
    scenes = [f"scene {k + 1}: {p.style}" for k, p in enumerate(q for q in prompts if q.subject_id == subject_ids[0])]
    image_grid(rows, labels, ["reference", *scenes], cell=64, label_width=130).save(path)


def _report_text(table: str, metrics: dict, args: argparse.Namespace, curves: bool) -> str:
    if metrics["train_steps"] is None:
        trained = f"The adapter was not trained here: it is the trained adapter at `{metrics['adapter']}`."
    else:
        trained = (
            f"The adapter was trained here for {metrics['train_steps']} steps "
            f"({metrics['seconds_per_step'] or 0:.2f} s/step) and written to `{metrics['adapter']}`."
        )
    losses = ", ".join(f"{k} {v:.3f}" for k, v in metrics["final_losses"].items())
    return "\n".join(
        [
            "# CustomContrast on the synthetic world",
            "",
            f"{trained} Load it into a pipeline with "
            f"`pipe.load_customcontrast({metrics['adapter']!r})` (after `import diffusers_customcontrast`).",
            "",
            "## What the grid shows",
            "",
            f"{args.eval_subjects} held-out subjects (never seen by the base model, the judge or the adapter) x "
            f"{args.scenes_per_subject} prompted scenes, {args.num_inference_steps} DDIM steps, the same seed in every "
            "row of a subject. Each subject has three rows:",
            "",
            "- **real**: its reference image (frame 0, segmented on white: what the adapter is given), then the "
            "world's own picture of the subject in each prompted scene, the best any adapter could do;",
            "- **CustomContrast**: the base model with the adapter at scale 1, given the reference;",
            "- **base model**: the same prompts and seeds without a subject.",
            "",
            "The prompts name the class, the texture and the scene (e.g. `a striped star on the beach`, `a sketch of "
            "a dotted heart in the snow`), never the colours, as on DreamBench, where the prompt names only the class. "
            "So look for: the subject's **colours** in the CustomContrast row and not in the base row (which draws "
            "random colours), its shape and texture in both, the **prompted background** in every photo column, and "
            "a grey, colourless **sketch** in the last column (the prompt, not the reference photo, decides the style).",
            "",
            "## The numbers",
            "",
            "Read by the world's judge (a classifier trained on train subjects only) and the scene readers: identity "
            "acc. is how often the nearest of the 50 held-out subjects to an image is its own subject (chance 2 %); "
            "colour acc. (photos only), texture and shape acc. how often the judge reads the subject's attribute; "
            "controllability how often the prompted scene is there (background for photos, no colour for sketches); "
            "subject similarity the judge's identity cosine. The last rows are the ceilings of the chain every "
            "generation passes through: the real renders (a perfect generation), the base pipeline's autoencoder "
            "reconstructions of them (the best any UNet on its latents can do) and the base model told the subject's "
            "colours in words (what the prompt alone reaches); an adapter can only be as good as the stages before it "
            "(docs/synthetic_world.md).",
            "",
            table,
            "",
            *([f"Final losses: {losses}", ""] if losses else []),
            f"unload_customcontrast restores the base pipeline exactly: {metrics['unload_restores_base']}. "
            f"The demo took {metrics['seconds']} s.",
            "",
            "![grid](grid.png)",
            "",
            *(["![loss curves](loss_curves.png)", ""] if curves else []),
        ]
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
