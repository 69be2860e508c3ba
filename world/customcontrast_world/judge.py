"""The world's judge: a subject-identity embedding and attribute classifiers for whole scenes, trained on the world.

It plays the part DINO and CLIP play on DreamBench. The base model's image encoder cannot: it was trained on
subjects segmented on white (what the adapter reads), while a generated image is a whole scene.
:mod:`.train_judge` trains it on the train subjects' full frames and reproduces the shipped weights; held-out
subjects are never seen, and ``train_log.json`` next to the weights records how well it reads them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from diffusers_customcontrast.data.synthetic import COLORS, SHAPES, TEXTURES, SyntheticSubject

from .palette import palette_colors

__all__ = ["ATTRIBUTES", "COLOR_READINGS", "WORLD_JUDGE_DIR", "WorldJudge", "colors_of", "grey", "load_world_judge"]

WORLD_JUDGE_DIR: Path = Path(__file__).resolve().parent / "assets" / "world-judge"
"""Folder of the shipped judge."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "texture": TEXTURES, "colors": COLORS}
"""The intrinsic attributes the judge reads, and their values. ``colors`` is multi-label: the set of colours the
subject shows (one when solid, two when textured), not which of them is the main one, which a 64 px image of a
checkered subject does not tell."""

COLOR_READINGS: tuple[str, ...] = ("palette", "head")
"""How :meth:`WorldJudge.judge` reads colours: by the world's palette (:mod:`.palette`, 97-98 % of held-out subjects'
colour sets on real renders) or by the trained colour head (58-67 %: it learns colours with the train identities)."""


class WorldJudge(ModelMixin, ConfigMixin):
    """A small residual CNN whose unit-norm embedding says who a subject is, with classifiers of its attributes.

    Shape and texture are read from a grey version of the image (and trained that way): on colour images a
    classifier learns a train subject's shape from its colours, which tells nothing about an unseen subject's shape,
    and reads texture worse than in grey (measured: 86 % against 100 % on real renders of held-out subjects).
    Colours are read by the world's palette unless ``color_reading="head"`` (see :data:`COLOR_READINGS`); the head
    is trained either way, its multi-label loss shaping the shared features.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        embedding_dim: int = 128,
        color_reading: str = "palette",
    ):
        super().__init__()
        if color_reading not in COLOR_READINGS:
            raise ValueError(f"color_reading must be one of {', '.join(COLOR_READINGS)}, got {color_reading!r}.")
        stages: list[nn.Module] = []
        width = 3
        for out in channels:
            stages.append(_DownStage(width, out))
            width = out
        self.backbone = nn.Sequential(*stages)
        self.embedding = nn.Linear(width, embedding_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Whole images resized to the judge's input, in [-1, 1]: ``[N, 3, size, size]``."""
        size = self.config.image_size
        arrays = [np.asarray(i.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for i in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unit-norm identity embeddings ``[N, embedding_dim]`` and each attribute's logits (shape, texture: feed grey)."""
        features = self.backbone(pixel_values.to(self.dtype)).mean(dim=(2, 3))
        logits = {name: head(features) for name, head in self.heads.items()}
        return F.normalize(self.embedding(features), dim=-1), logits

    @torch.no_grad()
    def judge(
        self, images: Sequence[Image.Image], batch_size: int = 256
    ) -> tuple[torch.Tensor, dict[str, list[str | tuple[str, ...]]]]:
        """Embeddings and the attributes read in PIL images.

        ``shape`` and ``texture`` are read from grey copies (``grey``); ``colors`` is the tuple (in
        :data:`~diffusers_customcontrast.data.synthetic.COLORS` order) of the colours read (``color_reading``), one
        for a subject read as solid and two for a textured one.
        """
        embeddings, predicted = [], {name: [] for name in ATTRIBUTES}
        for start in range(0, len(images), batch_size):
            pixels = self.pixels(images[start : start + batch_size])
            embeds, logits = self(pixels)
            grey_logits = self(grey(pixels))[1]
            embeddings.append(embeds.float())
            shapes, textures = grey_logits["shape"].argmax(-1).tolist(), grey_logits["texture"].argmax(-1).tolist()
            predicted["shape"] += [SHAPES[i] for i in shapes]
            predicted["texture"] += [TEXTURES[i] for i in textures]
            counts = [1 if TEXTURES[texture] == "solid" else 2 for texture in textures]
            if self.config.color_reading == "palette":
                rgb = pixels.add(1.0).mul(127.5).permute(0, 2, 3, 1).numpy()
                predicted["colors"] += [palette_colors(image, count) for image, count in zip(rgb, counts)]
            else:
                for row, count in zip(logits["colors"], counts):
                    predicted["colors"].append(tuple(COLORS[i] for i in sorted(row.topk(count).indices.tolist())))
        return torch.cat(embeddings), predicted


def colors_of(subject: SyntheticSubject) -> tuple[str, ...]:
    """A subject's visible colours as :meth:`WorldJudge.judge` reports them (in ``COLORS`` order)."""
    return tuple(sorted(subject.visible_colors, key=COLORS.index))


class _DownStage(nn.Module):
    """A stride-2 convolution, then a residual pair of 3 x 3 convolutions (GroupNorm, SiLU)."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU())
        self.block = nn.Sequential(
            nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(), nn.Conv2d(out, out, 3, padding=1)
        )
        self.norm = nn.Sequential(nn.GroupNorm(8, out), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return self.norm(x + self.block(x))


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """Luma of ``[N, 3, H, W]`` images, repeated over the three channels."""
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114], device=pixels.device)[:, None, None]).sum(1, keepdim=True)
    return luma.expand_as(pixels)


def load_world_judge(path: str | os.PathLike | None = None) -> WorldJudge:
    """Load the shipped judge (or one written by :mod:`.train_judge`), in eval mode."""
    folder = Path(path) if path is not None else WORLD_JUDGE_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"expected a WorldJudge folder with config.json at '{folder}'; re-create it with "
            "`python -m customcontrast_world.train_judge --output_dir <folder>`"
        )
    return WorldJudge.from_pretrained(folder).eval().requires_grad_(False)
