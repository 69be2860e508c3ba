"""The offline demo: ``python -m diffusers_customcontrast.demo``.

Runs CustomContrast end to end on a tiny pipeline built in-process (no download): loads a fresh adapter, generates
with and without a subject image, checks that unloading restores the pipeline exactly, and writes an image grid.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .loading import load_customcontrast, unload_customcontrast
from .tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

logger = logging.getLogger(__name__)

PROMPTS = ("a photo of a toy on the beach", "a toy in the snow", "a sketch of a toy")


def _grid(rows: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    grid = Image.new("RGB", (cell * max(len(r) for r in rows), cell * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((cell, cell)), (x * cell, y * cell))
    return grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo-output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = tiny_sd15_pipeline(seed=args.seed)
    subject = make_subject_image(args.seed, size=128)

    def generate(prompt: str, **kwargs) -> Image.Image:
        generator = torch.Generator().manual_seed(args.seed)
        return pipe(prompt, num_inference_steps=args.steps, height=64, width=64, generator=generator, **kwargs).images[0]

    rows = []
    base = [generate(p) for p in tqdm(PROMPTS, desc="base pipeline")]
    load_customcontrast(pipe, tiny_adapter(pipe, seed=args.seed))
    rows.append([subject, *[generate(p, ip_adapter_image=subject) for p in tqdm(PROMPTS, desc="with subject")]])
    rows.append([Image.new("RGB", subject.size, "white"), *base])
    unload_customcontrast(pipe)
    restored = [generate(p) for p in PROMPTS]
    exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, restored))

    grid_path = output_dir / "grid.png"
    _grid(rows).save(grid_path)
    logger.info("Wrote %s (row 1: subject + generations; row 2: base pipeline).", grid_path)
    logger.info("Unload restores the base pipeline exactly: %s", exact)
    if not exact:
        raise SystemExit("unload_customcontrast did not restore the pipeline")
    return grid_path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
