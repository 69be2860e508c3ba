"""Train the world's judge (:class:`~customcontrast_world.judge.WorldJudge`) and measure how well it reads
held-out subjects. Reproduces the shipped ``customcontrast_world/assets/world-judge``::

    python -m customcontrast_world.train_judge --output_dir runs/world-judge

Data: ``frames_per_subject`` random scenes of each train subject (backgrounds, second objects, lighting, sketches),
rendered once, each also available as a sketch. Each step draws ``batch_size`` subjects, in pairs that share shape
and texture where possible, and two frames of each (a quarter of them turned into sketches):

* **identity**: symmetric InfoNCE between the two frames' embeddings (a sketch and a photo of a subject are
  positives too, so that a sketch is still recognised by what it keeps: shape, texture, brightness; the paired
  subjects make colour, or its brightness, the only way to tell a pair apart);
* **attributes**: the set of colours on photos (multi-label), and shape and texture on grey copies of other frames
  (see :class:`WorldJudge` for why they are read in grey).

Half the images are blurred (down- and up-sampled by 2) and all get a little pixel noise, because generations are
softer and noisier than renders. After training, ``train_log.json`` records the judge's readings of the held-out
subjects: on their stored frames, and on the world's own renders of the benchmark's prompted scenes (the
"real renders" of ``docs/world_benchmark.md``). The run is resumable (:mod:`.resumable`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_customcontrast.data.synthetic import COLORS, SHAPES, TEXTURES, sketch_pixels

from .dataset import WorldSpec, write_world
from .judge import WorldJudge, grey
from .resumable import RunCheckpoints, run_steps, torch_threads
from .train_base import (
    TrainingFrames,
    _cosine_schedule,
    _flip_some,
    _seeded,
    _step,
    _to_unit_range,
    _views_by_subject,
    first_frame_retrieval,
    render_training_frames,
)

__all__ = ["TrainJudgeConfig", "heldout_accuracy", "real_render_scores", "train_judge"]


@dataclass
class TrainJudgeConfig:
    """Arguments of :func:`train_judge` (the command-line flags have the same names)."""

    output_dir: str
    seed: int = 0
    threads: int = 1
    num_train_subjects: int = 300
    num_heldout_subjects: int = 50
    frames_per_subject: int = 64
    steps: int = 5000
    batch_size: int = 64
    learning_rate: float = 2e-3
    noise_std: float = 0.03
    sketch_prob: float = 0.25
    checkpoint_every: int = 500
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.frames_per_subject < 2:
            raise ValueError(f"expected frames_per_subject >= 2 (pairs of frames), got {self.frames_per_subject}")

    def run_settings(self) -> dict:
        """The fields that decide the weights (what a resumed run must share with the run it continues)."""
        settings = asdict(self)
        for name in ("output_dir", "checkpoint_every", "log_every"):
            settings.pop(name)
        return settings


def _soften(batch: torch.Tensor, generator: torch.Generator, noise_std: float) -> torch.Tensor:
    """Blur half of the images (down- and up-sampling by 2) and add pixel noise to all."""
    soft = F.interpolate(F.interpolate(batch, scale_factor=0.5, mode="area"), size=batch.shape[-2:], mode="bilinear")
    chosen = torch.rand(len(batch), generator=generator) < 0.5
    batch = torch.where(chosen[:, None, None, None], soft, batch)
    return batch + noise_std * torch.randn(batch.shape, generator=generator)


def _colour_targets(frames: TrainingFrames) -> torch.Tensor:
    """Multi-hot ``[N, len(COLORS)]`` of the colours each frame's subject shows."""
    targets = torch.zeros(len(frames.attributes), len(COLORS))
    rows = torch.arange(len(targets))
    targets[rows, frames.attributes[:, 2]] = 1.0
    textured = frames.attributes[:, 3] >= 0
    targets[rows[textured], frames.attributes[textured, 3]] = 1.0
    return targets


def _subject_groups(frames: TrainingFrames) -> list[list[int]]:
    """Subjects (positions) grouped by shape and texture: the subjects only colour tells apart."""
    groups: dict[tuple[int, int], list[int]] = {}
    for subject in range(int(frames.subject_index.max()) + 1):
        first = int(torch.nonzero(frames.subject_index == subject)[0])
        groups.setdefault(tuple(frames.attributes[first, :2].tolist()), []).append(subject)
    return list(groups.values())


def _hard_batch(groups: list[list[int]], batch_size: int, generator: torch.Generator) -> list[int]:
    """``batch_size`` distinct subjects drawn in pairs from the same shape-and-texture group where one has two.

    With random subjects, two of a batch rarely share shape and texture, and an identity embedding need not learn
    the colours (or, for sketches, their brightness); with pairs it must.
    """
    chosen: list[int] = []
    for g in torch.randperm(len(groups), generator=generator).tolist():
        members = [groups[g][i] for i in torch.randperm(len(groups[g]), generator=generator).tolist()]
        chosen += members[: min(2, batch_size - len(chosen))]
        if len(chosen) == batch_size:
            break
    return chosen


def train_judge(config: TrainJudgeConfig, log: Callable[[str], None] = print) -> WorldJudge:
    """Train a judge on the train subjects of the world of ``config.seed``; save it with ``train_log.json``."""
    with torch_threads(config.threads):
        return _train_and_save(config, log)


def _train_and_save(config: TrainJudgeConfig, log: Callable[[str], None]) -> WorldJudge:
    checkpoints = RunCheckpoints(config.output_dir, config.run_settings())
    spec = WorldSpec(
        config.num_train_subjects, config.num_heldout_subjects, config.frames_per_subject, seed=config.seed
    )
    frames = render_training_frames(spec)
    log(f"rendered {len(frames.captions)} frames of {config.num_train_subjects} train subjects")
    with _seeded(config.seed + 3):
        judge = WorldJudge()
    generator = torch.Generator().manual_seed(config.seed + 3)
    # Every frame also as a sketch (the exact style of the world's sketches), for sketch views on demand.
    sketches = torch.from_numpy(
        np.stack([sketch_pixels(np.asarray(frames.pil_image(n))) for n in range(len(frames.images))])
    )
    sketches = sketches.permute(0, 3, 1, 2).contiguous()
    colours = _colour_targets(frames)
    groups = _subject_groups(frames)
    views_of = _views_by_subject(frames, colour_only=False)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = _cosine_schedule(optimizer, config.steps, warmup=min(100, config.steps // 10))

    def views(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames of ``rows``, some turned into sketches; and which rows are sketches."""
        as_sketch = torch.rand(len(rows), generator=generator) < config.sketch_prob
        images = torch.where(as_sketch[:, None, None, None], sketches[rows], frames.images[rows])
        return _soften(_flip_some(_to_unit_range(images), generator), generator, config.noise_std), (
            as_sketch | frames.is_sketch[rows]
        )

    def step(index: int) -> dict[str, float]:
        subjects = _hard_batch(groups, config.batch_size, generator)
        pairs = [views_of[s][torch.randperm(len(views_of[s]), generator=generator)[:2]] for s in subjects]
        rows = torch.cat([torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])])
        pixels, sketch = views(rows)
        grey_rows = torch.randint(0, len(frames.images), (config.batch_size,), generator=generator)
        grey_pixels = grey(views(grey_rows)[0])
        embeds, logits = judge(torch.cat([pixels, grey_pixels]))
        n = len(rows)
        similarity = embeds[: n // 2] @ embeds[n // 2 : n].T / 0.1
        targets = torch.arange(n // 2)
        nce = (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2
        photo = ~sketch
        colour = F.binary_cross_entropy_with_logits(logits["colors"][:n][photo], colours[rows][photo])
        shape = F.cross_entropy(logits["shape"][n:], frames.attributes[grey_rows, 0])
        texture = F.cross_entropy(logits["texture"][n:], frames.attributes[grey_rows, 1])
        _step(optimizer, schedule, nce + colour + shape + texture, judge.parameters())
        return {"nce": nce.item(), "colors": colour.item(), "shape": shape.item(), "texture": texture.item()}

    judge.train()
    state = {"judge": judge, "optimizer": optimizer, "schedule": schedule}
    curves, seconds = run_steps(
        checkpoints, "judge", config.steps, step, state, generator, config.checkpoint_every, log, config.log_every
    )
    judge.eval().requires_grad_(False)
    metrics = {
        "heldout_frames": heldout_accuracy(judge, render_training_frames(spec, "heldout")),
        "real_renders": real_render_scores(judge, config.num_heldout_subjects, config.seed),
    }
    log(f"[judge] held-out subjects: {json.dumps(metrics)}")
    output_dir = Path(config.output_dir)
    judge.save_pretrained(output_dir)
    record = {
        "config": asdict(config),
        "heldout_metrics": metrics,
        "final_losses": {name: sum(v[-100:]) / len(v[-100:]) for name, v in curves.items()},
        "wall_and_cpu_time_s": seconds,
    }
    (output_dir / "train_log.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return judge


@torch.no_grad()
def heldout_accuracy(judge: WorldJudge, frames: TrainingFrames) -> dict[str, float]:
    """On the stored colour frames of unseen subjects: identity retrieval (frame 0 of each subject is the gallery)
    and how often each attribute is read right."""
    colour = torch.nonzero(~frames.is_sketch).flatten()
    embeds, predicted = judge.judge([frames.pil_image(int(i)) for i in colour])
    usable = torch.ones(len(colour), dtype=torch.bool)
    labels = frames.attributes[colour]
    truth = {
        "shape": [SHAPES[i] for i in labels[:, 0]],
        "texture": [TEXTURES[i] for i in labels[:, 1]],
        "colors": [tuple(COLORS[i] for i in sorted({int(c) for c in row[2:] if c >= 0})) for row in labels],
    }
    scores = {"identity_retrieval": first_frame_retrieval(embeds, frames.subject_index[colour], usable)}
    for name, values in truth.items():
        scores[f"{name}_accuracy"] = float(np.mean([p == t for p, t in zip(predicted[name], values)]))
    return scores


def real_render_scores(judge: WorldJudge, num_heldout_subjects: int = 50, seed: int = 0) -> dict[str, float]:
    """The judge's scores of the world's own renders of the benchmark's prompted scenes, for every held-out subject.

    What a perfect generation would score (``docs/world_benchmark.md``: "real renders"), on the held-out subjects of
    the world of ``seed`` (written to a temporary folder: the gallery reads their stored frames).
    """
    from .evaluation import evaluation_prompts, render_prompt, score_world_images
    from .metrics import SubjectGallery

    with tempfile.TemporaryDirectory() as root:
        # Held-out subjects and their frames do not depend on the number of train subjects.
        world = write_world(root, num_train_subjects=0, num_heldout_subjects=num_heldout_subjects, seed=seed)
        prompts = evaluation_prompts(world, "heldout")
        renders = [render_prompt(world, prompt) for prompt in prompts]
        scores = score_world_images(renders, prompts, judge, SubjectGallery.from_world(world, judge), world)
    return scores.to_dict()


def parse_args(argv: Sequence[str] | None = None) -> TrainJudgeConfig:
    defaults = TrainJudgeConfig(output_dir="")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        prog="python -m customcontrast_world.train_judge",
    )
    parser.add_argument("--output_dir", required=True, help="where the judge folder is written")
    for name, value in asdict(defaults).items():
        if name != "output_dir":
            parser.add_argument(f"--{name}", type=type(value), default=value, help=f"default: {value}")
    return TrainJudgeConfig(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> None:
    train_judge(parse_args(argv))


if __name__ == "__main__":
    main()
