"""Look at what the synthetic base model does with prompts: sample grids and a background-control score.

::

    python -m customcontrast_world.evaluate_base --grid /tmp/base_grid.png

writes a grid (one row per background, one column per seed) of ``"a <shape> <background phrase>"`` generations and
prints how often the generated background is the prompted one (:func:`nearest_background` of each image).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_customcontrast.data.synthetic import BACKGROUNDS, BRIGHTNESS, caption_for

BAND = 0.2
"""Height of the top and bottom bands, as a fraction of the image, that :func:`nearest_background` compares."""


def background_distances(image: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """RGB distance of an image's top and bottom bands to each background's two gradient ends.

    Each band is summarised by its median colour over the pixels outside ``mask`` (a boolean subject mask; without
    one the median alone keeps a subject or a second object in the band from swaying it). A background is compared
    under the lighting (within :data:`~diffusers_customcontrast.data.synthetic.BRIGHTNESS`) that fits it best, so
    that dim snow is still snow.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() <= 1.0:  # a float image in [0, 1], as pipelines return with output_type="np"
        pixels = pixels * 255.0
    height = pixels.shape[0]
    band = max(1, round(BAND * height))
    keep = ~mask if mask is not None else np.ones(pixels.shape[:2], dtype=bool)
    top = _band_median(pixels[:band], keep[:band])
    bottom = _band_median(pixels[-band:], keep[-band:])
    lighting = np.linspace(*BRIGHTNESS, 8)[:, None]
    distances = {}
    for b in BACKGROUNDS:
        lit_top = np.clip(lighting * np.array(b.top), 0, 255)
        lit_bottom = np.clip(lighting * np.array(b.bottom), 0, 255)
        both = np.linalg.norm(top - lit_top, axis=-1) + np.linalg.norm(bottom - lit_bottom, axis=-1)
        distances[b.name] = float(both.min()) / 2
    return distances


def nearest_background(image: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> str:
    """Name of the background whose colours are nearest to the image's (see :func:`background_distances`)."""
    distances = background_distances(image, mask)
    return min(distances, key=distances.get)


def _band_median(band: np.ndarray, keep: np.ndarray) -> np.ndarray:
    pixels = band[keep] if keep.any() else band.reshape(-1, 3)
    return np.median(pixels, axis=0)


@torch.no_grad()
def background_grid(
    pipe: StableDiffusionPipeline,
    subject: str = "star",
    seeds: Sequence[int] = (0, 1, 2, 3),
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
) -> tuple[Image.Image, float]:
    """Generate ``"a <subject> <background>"`` for every background and seed.

    Returns:
        A grid (a row per background, a column per seed) and the fraction of images whose
        :func:`nearest_background` is the prompted background.
    """
    rows, hits = [], 0
    for background in BACKGROUNDS:
        prompt = caption_for(subject, background.name)
        images = pipe(
            [prompt] * len(seeds),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="np",
        ).images
        hits += sum(nearest_background(image) == background.name for image in images)
        rows.append(np.concatenate(list(images), axis=1))
    grid = np.round(np.concatenate(rows, axis=0) * 255).astype(np.uint8)
    return Image.fromarray(grid), hits / (len(BACKGROUNDS) * len(seeds))


def main(argv: Sequence[str] | None = None) -> None:
    from .base_model import load_synthetic_base

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped synthetic base)")
    parser.add_argument("--grid", default="base_grid.png", help="where to write the grid PNG")
    parser.add_argument("--subjects", default="star,circle", help="comma-separated class names, one grid each")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/synthetic_world.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_synthetic_base(path=args.model)
    grids = []
    for subject in args.subjects.split(","):
        grid, accuracy = background_grid(pipe, subject, range(args.seeds), args.steps, args.guidance_scale)
        print(f"{subject}: prompted background generated in {accuracy:.0%} of {grid.height // 64 * args.seeds} images")
        grids.append(np.asarray(grid))
    Image.fromarray(np.concatenate(grids, axis=1)).save(args.grid)
    print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
