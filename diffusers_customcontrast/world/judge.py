"""The world's judge: a subject-identity embedding and attribute classifiers for whole scenes, trained on the world.

It plays the part DINO and CLIP play on DreamBench. The base model's image encoder cannot: it was trained on
subjects segmented on white (what the adapter reads), while a generated image is a whole scene. The judge is trained
on the train subjects' full frames (backgrounds, second objects, lighting, half of them blurred like a 64 px
generation) with InfoNCE between two frames of a subject plus linear classifiers of shape, texture and colours.
Held-out subjects are never seen; ``train_log.json`` next to the weights records how well it knows them.

::

    python -m diffusers_customcontrast.world.judge --output_dir runs/world-judge   # reproduces assets/world-judge
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from ..data.synthetic import COLORS, SHAPES, TEXTURES
from .dataset import WorldSpec
from .train_base import (
    TrainingFrames,
    _cosine_schedule,
    _flip_some,
    _seeded,
    _step,
    _view_pairs,
    _views_by_subject,
    first_frame_retrieval,
    render_training_frames,
)

__all__ = ["WORLD_JUDGE_DIR", "WorldJudge", "load_world_judge", "train_judge"]

WORLD_JUDGE_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "world-judge"
"""Folder of the shipped judge."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "texture": TEXTURES,
    "color": COLORS,
    "secondary_color": COLORS,
}
"""The intrinsic attributes the judge classifies, and their values (``secondary_color`` only for textured subjects)."""


class WorldJudge(ModelMixin, ConfigMixin):
    """A small CNN whose unit-norm embedding says who a subject is, with classifiers of its intrinsic attributes.

    The shape is read from a grey version of the image (and trained that way): on colour images a classifier
    learns a train subject's shape from its colours, which tells nothing about an unseen subject's shape.
    """

    @register_to_config
    def __init__(self, image_size: int = 64, channels: tuple[int, ...] = (32, 64, 128), embedding_dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for out in channels:
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1),
                nn.GroupNorm(8, out),
                nn.SiLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.GroupNorm(8, out),
                nn.SiLU(),
            ]
            width = out
        self.backbone = nn.Sequential(*layers)
        self.embedding = nn.Linear(width, embedding_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Whole images resized to the judge's input, in [-1, 1]: ``[N, 3, size, size]``."""
        size = self.config.image_size
        arrays = [np.asarray(i.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for i in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unit-norm identity embeddings ``[N, embedding_dim]`` and each attribute's logits (shape: feed grey)."""
        features = self.backbone(pixel_values.to(self.dtype)).mean(dim=(2, 3))
        logits = {name: head(features) for name, head in self.heads.items()}
        return F.normalize(self.embedding(features), dim=-1), logits

    @torch.no_grad()
    def judge(self, images: Sequence[Image.Image], batch_size: int = 256) -> tuple[torch.Tensor, dict[str, list[str]]]:
        """Embeddings and predicted attribute values (names) of PIL images."""
        embeddings, predicted = [], {name: [] for name in ATTRIBUTES}
        for start in range(0, len(images), batch_size):
            pixels = self.pixels(images[start : start + batch_size])
            embeds, logits = self(pixels)
            logits["shape"] = self(grey(pixels))[1]["shape"]
            embeddings.append(embeds.float())
            for name, values in ATTRIBUTES.items():
                predicted[name] += [values[i] for i in logits[name].argmax(dim=-1).tolist()]
        return torch.cat(embeddings), predicted


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """Luma of ``[N, 3, H, W]`` images, repeated over the three channels."""
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114], device=pixels.device)[:, None, None]).sum(1, keepdim=True)
    return luma.expand_as(pixels)


def load_world_judge(path: str | os.PathLike | None = None) -> WorldJudge:
    """Load the shipped judge (or one written by :func:`train_judge`), in eval mode."""
    folder = Path(path) if path is not None else WORLD_JUDGE_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"expected a WorldJudge folder with config.json at '{folder}'; re-create it with "
            "`python -m diffusers_customcontrast.world.judge --output_dir <folder>`"
        )
    return WorldJudge.from_pretrained(folder).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def _blur_some(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Down- and up-sample half of the images: generations at 64 px are softer than the world's renders."""
    soft = F.interpolate(F.interpolate(batch, scale_factor=0.5, mode="area"), size=batch.shape[-2:], mode="bilinear")
    chosen = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(chosen[:, None, None, None], soft, batch)


def _attribute_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    columns = list(ATTRIBUTES)
    return sum(F.cross_entropy(logits[n], labels[:, columns.index(n)], ignore_index=-1) for n in names)


@torch.no_grad()
def heldout_accuracy(judge: WorldJudge, frames: TrainingFrames) -> dict[str, float]:
    """On colour frames of unseen subjects: identity retrieval (frame 0 of each subject is the gallery) and the
    accuracy of each attribute classifier."""
    colour = torch.nonzero(~frames.is_sketch).flatten()
    pixels = judge.pixels([frames.pil_image(int(i)) for i in colour])
    embeds, logits = judge(pixels)
    logits["shape"] = judge(grey(pixels))[1]["shape"]
    usable = torch.ones(len(colour), dtype=torch.bool)
    scores = {"identity_retrieval": first_frame_retrieval(embeds, frames.subject_index[colour], usable)}
    labels = frames.attributes[colour]
    for k, name in enumerate(ATTRIBUTES):
        known = labels[:, k] >= 0
        scores[f"{name}_accuracy"] = float((logits[name].argmax(-1)[known] == labels[known, k]).float().mean())
    return scores


def train_judge(
    output_dir: str | os.PathLike,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    frames_per_subject: int = 16,
    threads: int = 1,
    num_train_subjects: int = 300,
    num_heldout_subjects: int = 50,
) -> WorldJudge:
    """Train a judge on the train subjects of the world of ``seed`` and save it with ``train_log.json``."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        spec = WorldSpec(num_train_subjects, num_heldout_subjects, frames_per_subject, seed=seed)
        frames = render_training_frames(spec)
        with _seeded(seed + 2):
            judge = WorldJudge()
        pixels = judge.pixels([frames.pil_image(n) for n in range(len(frames.captions))])
        views_of = _views_by_subject(frames)
        generator = torch.Generator().manual_seed(seed + 2)
        optimizer = torch.optim.AdamW(judge.parameters(), lr=learning_rate, weight_decay=0.01)
        schedule = _cosine_schedule(optimizer, steps, warmup=min(50, steps // 10))
        curves: dict[str, list[float]] = {"nce": [], "attributes": []}
        judge.train()
        for step in range(steps):
            first, second = _view_pairs(views_of, batch_size, generator)
            batch = _blur_some(_flip_some(torch.cat([pixels[first], pixels[second]]), generator), generator)
            # Any frame, sketches included, teaches shape and texture in grey.
            shapes = torch.randint(0, len(pixels), (batch_size,), generator=generator)
            greys = _blur_some(_flip_some(grey(pixels[shapes]), generator), generator)
            embeds, logits = judge(torch.cat([batch, greys]))
            n = len(batch)
            colour_logits = {name: values[:n] for name, values in logits.items()}
            grey_logits = {name: values[n:] for name, values in logits.items()}
            similarity = embeds[: len(first)] @ embeds[len(first) : n].T / 0.1
            targets = torch.arange(len(first))
            nce = (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2
            labels = frames.attributes[torch.cat([first, second])]
            attributes = _attribute_loss(colour_logits, labels, ("texture", "color", "secondary_color"))
            attributes = attributes + _attribute_loss(grey_logits, frames.attributes[shapes], ("shape", "texture"))
            _step(optimizer, schedule, nce + attributes, judge.parameters())
            curves["nce"].append(nce.item())
            curves["attributes"].append(attributes.item())
            if (step + 1) % 100 == 0:
                print(f"[judge] step {step + 1}/{steps}: nce {np.mean(curves['nce'][-100:]):.3f}, "
                      f"attributes {np.mean(curves['attributes'][-100:]):.3f}", flush=True)  # fmt: skip
        judge.eval().requires_grad_(False)
        metrics = heldout_accuracy(judge, render_training_frames(spec, "heldout"))
        print(f"[judge] held-out subjects: {metrics}")
    finally:
        torch.set_num_threads(previous_threads)
    output_dir = Path(output_dir)
    judge.save_pretrained(output_dir)
    log = {
        "config": {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                   "frames_per_subject": frames_per_subject, "threads": threads,
                   "num_train_subjects": num_train_subjects, "num_heldout_subjects": num_heldout_subjects},
        "heldout_metrics": metrics,
        "final_losses": {name: float(np.mean(values[-100:])) for name, values in curves.items()},
        "wall_and_cpu_time_s": {"total": time.perf_counter() - start, "total_cpu": time.process_time() - cpu_start},
    }  # fmt: skip
    (output_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    return judge


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    train_judge(args.output_dir, args.seed, args.steps, args.batch_size, args.learning_rate, threads=args.threads)


if __name__ == "__main__":
    main()
