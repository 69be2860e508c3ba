"""The synthetic subject world on disk: train and held-out subjects, their frames, and the ground truth of each frame.

A world is fixed by a :class:`WorldSpec` (counts, image size, seed, how often a second object or a sketch appears).
:func:`write_world` writes it as two subject folders (the folder form of ``docs/data_format.md``, which
:func:`~diffusers_customcontrast.data.load_subject_folder` reads) plus ``world.json``::

    root/world.json                         spec, vocabularies, splits, every subject's intrinsic attributes
    root/train/<subject_id>/frame_00.png    frames (frame 00 is a plain photo: the natural reference image)
    root/train/<subject_id>/masks/...       exact subject masks
    root/train/<subject_id>/frame_00.txt    captions naming the class and the scene
    root/train/<subject_id>/subject.json    class name, intrinsic attributes and every frame's view and scene
    root/heldout/<subject_id>/...           subjects never used for training

:func:`load_world` reads it back as a :class:`World`, which answers "what is in this frame" for metrics
(:meth:`World.frame_info`). The same frames can be rendered in memory, with no files, through
:meth:`WorldSpec.iter_frames` (the base model trainer does so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from diffusers_customcontrast.data.formats import SubjectIndex, load_subject_folder
from diffusers_customcontrast.data.synthetic import (
    BACKGROUNDS,
    BRIGHTNESS,
    COLOR_VALUES,
    COMPANIONS,
    SHAPES,
    STYLES,
    TEXTURE_ADJECTIVES,
    TEXTURES,
    VIEW_SCALE,
    SyntheticSubject,
    View,
    caption_for_view,
    make_distinct_subjects,
    render_view,
    sample_scene,
)
from diffusers_customcontrast.data.transforms import binarize_mask, subject_crop

SPLITS: tuple[str, ...] = ("train", "heldout")
WORLD_FILE = "world.json"
WORLD_FORMAT = "customcontrast-synthetic-world"
WORLD_VERSION = 1


@dataclass(frozen=True)
class RenderedFrame:
    """One frame of the world in memory: the subject, its view and scene, and the rendered image, mask, caption."""

    subject_id: str
    split: str
    frame: int
    subject: SyntheticSubject
    view: View
    image: Image.Image
    mask: Image.Image
    caption: str

    @property
    def stem(self) -> str:
        return frame_stem(self.frame)


@dataclass(frozen=True)
class WorldSpec:
    """Everything that fixes a world; the same spec always renders the same pixels.

    Attributes:
        num_train_subjects: Subjects of the ``train`` split.
        num_heldout_subjects: Subjects of the ``heldout`` split, visually distinct from every train subject.
            They are drawn first, so the held-out set does not change when the train split grows.
        frames_per_subject: Frames per subject. Frame 0 is a plain photo (no second object, no sketch, neutral
            lighting) of a random background: the natural reference image of the subject.
        size: Side of the square images in pixels.
        seed: Seed of the subjects and of every view.
        companion_prob: Probability that a frame shows a second object.
        sketch_prob: Probability that a frame is a sketch (which shows no colour, so a trainer that takes
            references from any frame sees some colourless ones).
    """

    num_train_subjects: int = 300
    num_heldout_subjects: int = 50
    frames_per_subject: int = 8
    size: int = 64
    seed: int = 0
    companion_prob: float = 0.3
    sketch_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.num_train_subjects < 0 or self.num_heldout_subjects < 0:
            raise ValueError(
                f"expected non-negative subject counts, got {self.num_train_subjects} train and "
                f"{self.num_heldout_subjects} held-out"
            )
        if self.frames_per_subject < 1:
            raise ValueError(f"expected frames_per_subject >= 1, got {self.frames_per_subject}")

    @cached_property
    def subjects(self) -> dict[str, tuple[str, SyntheticSubject]]:
        """``subject_id -> (split, subject)``; held-out subjects first, then train subjects."""
        drawn = make_distinct_subjects(self.num_heldout_subjects + self.num_train_subjects, self.seed)
        heldout = {
            f"heldout_{n:04d}": ("heldout", subject) for n, subject in enumerate(drawn[: self.num_heldout_subjects])
        }
        train = {f"train_{n:04d}": ("train", subject) for n, subject in enumerate(drawn[self.num_heldout_subjects :])}
        return {**heldout, **train}

    def subject_ids(self, split: str | None = None) -> list[str]:
        """Ids of a split's subjects (all subjects when ``split`` is ``None``)."""
        _check_split(split)
        return [sid for sid, (s, _) in self.subjects.items() if split is None or s == split]

    def views(self, subject_id: str) -> list[View]:
        """The views of a subject's frames, drawn from a generator of the seed and the subject's position."""
        position = list(self.subjects).index(subject_id)
        subject = self.subjects[subject_id][1]
        rng = np.random.default_rng([self.seed, position])
        views = []
        for frame in range(self.frames_per_subject):
            if frame == 0:  # the reference frame: the draws are still made, so later frames do not depend on it
                view = sample_scene(subject, rng, companion=None, style="photo")
                view = View(view.rotation, view.scale, view.center, view.background)
            else:
                view = sample_scene(subject, rng, companion_prob=self.companion_prob, sketch_prob=self.sketch_prob)
            views.append(view)
        return views

    def reference_image(self, subject_id: str) -> Image.Image:
        """A subject's reference rendered in memory: frame 0 segmented on white and cropped, as
        :meth:`World.reference_image` gives it from the files."""
        image, mask = render_view(self.subjects[subject_id][1], self.views(subject_id)[0], self.size)
        return subject_crop(image, binarize_mask(mask, image.size))

    def iter_frames(self, split: str | None = None) -> Iterator[RenderedFrame]:
        """Render every frame of a split (or of all subjects), subject by subject."""
        for subject_id in self.subject_ids(split):
            subject_split, subject = self.subjects[subject_id]
            for frame, view in enumerate(self.views(subject_id)):
                image, mask = render_view(subject, view, self.size)
                caption = caption_for_view(subject, view)
                yield RenderedFrame(subject_id, subject_split, frame, subject, view, image, mask, caption)


@dataclass(frozen=True)
class FrameInfo:
    """Ground truth of one frame on disk: where it is, its subject's identity, its view and scene."""

    subject_id: str
    split: str
    stem: str
    image_path: Path
    mask_path: Path
    caption: str
    subject: SyntheticSubject
    view: View

    @property
    def scene(self) -> dict[str, str | None]:
        """The attributes the caption names: background, companion (or ``None``) and style."""
        return self.view.scene

    @property
    def identity(self) -> tuple[str, ...]:
        """The subject's visible intrinsic attributes (shape, texture, colours)."""
        return self.subject.identity


@dataclass
class World:
    """A world written by :func:`write_world` (use :func:`load_world`)."""

    root: Path
    spec: WorldSpec
    subjects: dict[str, SyntheticSubject]
    splits: dict[str, tuple[str, ...]]
    _frames: dict[str, tuple[FrameInfo, ...]] = field(default_factory=dict, repr=False)

    def split_dir(self, split: str) -> Path:
        """The subject folder of a split (``root/train`` or ``root/heldout``)."""
        _check_split(split)
        return self.root / split

    def index(self, split: str) -> SubjectIndex:
        """A split as a :class:`~diffusers_customcontrast.data.SubjectIndex` (what the trainer reads)."""
        return load_subject_folder(self.split_dir(split))

    def split_of(self, subject_id: str) -> str:
        for split, ids in self.splits.items():
            if subject_id in ids:
                return split
        raise KeyError(f"expected a subject id of this world, got {subject_id!r}")

    def frames(self, subject_id: str) -> tuple[FrameInfo, ...]:
        """Ground truth of a subject's frames, in frame order (read from its ``subject.json`` once)."""
        if subject_id not in self._frames:
            self._frames[subject_id] = self._read_frames(subject_id)
        return self._frames[subject_id]

    def reference_frame(self, subject_id: str) -> FrameInfo:
        """Ground truth of frame 0 of a subject: a plain photo, the natural reference (see :meth:`reference_image`)."""
        return self.frames(subject_id)[0]

    def reference_image(self, subject_id: str, frame: int = 0) -> Image.Image:
        """The reference image of a subject, as the trainer prepares references and the evaluation passes them:
        frame ``frame`` (default the plain photo) segmented on white and cropped to the subject."""
        info = self.frames(subject_id)[frame]
        image = Image.open(info.image_path).convert("RGB")
        return subject_crop(image, binarize_mask(Image.open(info.mask_path), image.size))

    def frame_info(self, image_path: str | os.PathLike) -> FrameInfo:
        """Ground truth of the frame stored at ``image_path`` (``<split>/<subject_id>/<stem>.png``)."""
        path = Path(image_path)
        subject_id, stem = path.parent.name, path.stem
        for info in self.frames(subject_id):
            if info.stem == stem:
                return info
        raise KeyError(f"expected a frame of subject {subject_id!r}, got {stem!r} ('{path}')")

    def _read_frames(self, subject_id: str) -> tuple[FrameInfo, ...]:
        subject_dir = self.split_dir(self.split_of(subject_id)) / subject_id
        meta = json.loads((subject_dir / "subject.json").read_text(encoding="utf-8"))
        subject = self.subjects[subject_id]
        return tuple(
            FrameInfo(
                subject_id=subject_id,
                split=meta["split"],
                stem=stem,
                image_path=subject_dir / f"{stem}.png",
                mask_path=subject_dir / "masks" / f"{stem}.png",
                caption=record["caption"],
                subject=subject,
                view=View.from_dict(record["view"]),
            )
            for stem, record in meta["frames"].items()
        )


def write_world(
    root: str | os.PathLike,
    num_train_subjects: int = 300,
    num_heldout_subjects: int = 50,
    frames_per_subject: int = 8,
    size: int = 64,
    seed: int = 0,
    **spec_kwargs,
) -> World:
    """Write the world of a :class:`WorldSpec` under ``root`` (see the module docstring) and return it.

    ``spec_kwargs`` are the other :class:`WorldSpec` fields (``companion_prob``, ``sketch_prob``). The output
    depends only on the arguments. 300 + 50 subjects x 8 frames at 64 px take about 5 s.
    """
    spec = WorldSpec(num_train_subjects, num_heldout_subjects, frames_per_subject, size, seed, **spec_kwargs)
    root = Path(root)
    records: dict[str, dict] = {}
    for rendered in spec.iter_frames():
        subject_dir = root / rendered.split / rendered.subject_id
        if rendered.subject_id not in records:
            (subject_dir / "masks").mkdir(parents=True, exist_ok=True)
            records[rendered.subject_id] = _subject_record(rendered)
        rendered.image.save(subject_dir / f"{rendered.stem}.png")
        rendered.mask.save(subject_dir / "masks" / f"{rendered.stem}.png")
        (subject_dir / f"{rendered.stem}.txt").write_text(rendered.caption + "\n", encoding="utf-8")
        records[rendered.subject_id]["frames"][rendered.stem] = {
            "caption": rendered.caption,
            "view": rendered.view.to_dict(),
        }
    for subject_id, record in records.items():
        path = root / record["split"] / subject_id / "subject.json"
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (root / WORLD_FILE).write_text(json.dumps(_world_record(spec), indent=1) + "\n", encoding="utf-8")
    return load_world(root)


def load_world(root: str | os.PathLike) -> World:
    """Read a world written by :func:`write_world`.

    Raises:
        FileNotFoundError: if ``root/world.json`` does not exist.
        ValueError: if it is not a world description of a known version.
    """
    root = Path(root)
    path = root / WORLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"expected a synthetic world at '{root}' (written by write_world), got no '{path}'")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != WORLD_FORMAT or record.get("version") != WORLD_VERSION:
        raise ValueError(
            f"expected '{path}' to describe a {WORLD_FORMAT} version {WORLD_VERSION}, "
            f"got format {record.get('format')!r} version {record.get('version')!r}"
        )
    subjects = {
        sid: SyntheticSubject(meta["shape"], meta["texture"], meta["color"], meta["secondary_color"])
        for sid, meta in record["subjects"].items()
    }
    splits = {split: tuple(ids) for split, ids in record["splits"].items()}
    return World(root=root, spec=WorldSpec(**record["spec"]), subjects=subjects, splits=splits)


def vocabularies() -> dict:
    """The world's vocabularies as JSON-ready data (what ``world.json`` records under ``"vocabularies"``)."""
    return {
        "shapes": list(SHAPES),
        "textures": list(TEXTURES),
        "texture_adjectives": dict(TEXTURE_ADJECTIVES),
        "colors": {name: list(rgb) for name, rgb in COLOR_VALUES.items()},
        "backgrounds": [asdict(background) for background in BACKGROUNDS],
        "companions": [asdict(companion) for companion in COMPANIONS],
        "styles": dict(STYLES),
        "brightness": list(BRIGHTNESS),
        "view_scale": list(VIEW_SCALE),
    }


def frame_stem(frame: int) -> str:
    return f"frame_{frame:02d}"


def _subject_record(rendered: RenderedFrame) -> dict:
    # class_name first: it is what load_subject_folder reads.
    return {
        **rendered.subject.to_dict(),
        "subject_id": rendered.subject_id,
        "split": rendered.split,
        "identity": list(rendered.subject.identity),
        "frames": {},
    }


def _world_record(spec: WorldSpec) -> dict:
    return {
        "format": WORLD_FORMAT,
        "version": WORLD_VERSION,
        "spec": asdict(spec),
        "vocabularies": vocabularies(),
        "splits": {split: spec.subject_ids(split) for split in SPLITS},
        "subjects": {
            sid: {"split": split, **subject.to_dict(), "identity": list(subject.identity)}
            for sid, (split, subject) in spec.subjects.items()
        },
    }


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"expected a split in {SPLITS} (or None for all), got {split!r}")
