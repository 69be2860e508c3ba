"""1 vs 3 vs 5 photos of a subject on the synthetic world: subject similarity and identity accuracy, per ``combine``.

Each held-out subject of a world is given its first N frames (frame 0, the plain photo, then other views, sizes and
positions) through ``pipe.encode_customcontrast_subjects([photos], combine=...)``; the world's evaluation prompts are
generated with the world's base model and an adapter trained on the world, and scored by the world's judge
(``customcontrast_world``: ``evaluation_prompts``, ``generate``-then-``score_world_images``). The identity
gallery leaves out the first 5 frames, so that no reference photo is what scores best.

    python benchmarks/several_photos.py --world path/to/world --adapter path/to/world-adapter \\
        --photos 1 3 5 --combine concat mean --output benchmarks/results/several_photos.json

Needs an adapter trained on the world (the shipped one is ``world.recipe.WORLD_ADAPTER_DIR``;
``python -m customcontrast_world.benchmark`` trains others, about 10 minutes of one CPU thread per run) and a
world written with at least 5 frames per subject (``write_world``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from customcontrast_world import evaluation_prompts, load_synthetic_base, load_world, load_world_judge
from customcontrast_world.evaluation import score_world_images
from customcontrast_world.metrics import SubjectGallery


def generate(pipe, world, prompts, photos: int, combine: str, steps: int, guidance_scale: float) -> tuple[list, list]:
    """One image per prompt (grouped by subject: the images and their prompts), each subject given its first
    ``photos`` frames."""
    images, by_subject = [], {}
    for prompt in prompts:
        by_subject.setdefault(prompt.subject_id, []).append(prompt)
    ordered = [prompt for group in by_subject.values() for prompt in group]
    for subject_id, group in by_subject.items():
        references = [world.reference_image(subject_id, frame) for frame in range(photos)]
        embeds = pipe.encode_customcontrast_subjects(
            [references], combine=combine, do_classifier_free_guidance=guidance_scale > 1
        )
        images += pipe(
            [p.prompt for p in group],
            ip_adapter_image_embeds=embeds,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(p.seed) for p in group],
        ).images
    return images, ordered


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="A world folder written by write_world.")
    parser.add_argument("--adapter", required=True, help="A CustomContrast adapter trained on the world.")
    parser.add_argument("--photos", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--combine", nargs="+", choices=("concat", "mean"), default=["concat", "mean"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/several_photos.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    world = load_world(args.world)
    pipe = load_synthetic_base()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_customcontrast(args.adapter)
    judge = load_world_judge()
    prompts = evaluation_prompts(world)
    gallery = SubjectGallery.from_world(
        world, judge, split=world.split_of(prompts[0].subject_id), exclude_frames=range(max(args.photos))
    )
    rows = []
    for combine in args.combine:
        for photos in args.photos:
            images, ordered = generate(pipe, world, prompts, photos, combine, args.steps, args.guidance_scale)
            scores = score_world_images(images, ordered, judge, gallery, world)
            rows.append({"combine": combine, "photos": photos, **scores.to_dict()})
            print(
                f"{combine:6s} {photos} photos: similarity {scores.subject_similarity:.3f} "
                f"(± {scores.subject_similarity_se:.3f}), identity {scores.identity_accuracy:.3f}, "
                f"controllability {scores.controllability:.3f}"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
