"""What a preparation run writes, and how it is made safe to stop at any point.

A finished subject is a folder in the subject-folder form of ``docs/data_format.md`` (``NN.jpg|png``,
``masks/NN.png``, ``NN.txt`` or ``caption.txt``, ``subject.json``), written under a temporary name and renamed into
place, then a *record* (``.prepare/records/<subject_id>.json``) that says what was kept and dropped and why. A
subject with a record is finished: a run started again skips it, and a folder without a record (the run stopped
between the two) is written again. Shards are packed from the finished folders (see ``run.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import DEFAULT_CAPTION_TEMPLATE

STATE_DIR = ".prepare"
"""Hidden folder of the run's state inside the output (the subject-folder reader skips hidden folders)."""

JPEG_QUALITY = 95


@dataclass
class PreparedFrame:
    """A frame ready to be written.

    Attributes:
        image: RGB frame.
        mask: Boolean subject mask, or ``None`` (no masker).
        caption: Its caption, or ``None`` when the subject's template applies.
        lossless: Store as PNG (the source was lossless) rather than JPEG.
        origin: The file or video frame it comes from.
        sharpness: Its sharpness (see ``frames.sharpness``).
        score: The masker's confidence, if masked.
    """

    image: Image.Image
    mask: np.ndarray | None
    caption: str | None
    lossless: bool
    origin: str
    sharpness: float
    score: float | None = None


@dataclass
class SubjectRecord:
    """What happened to one subject (the JSON of ``.prepare/records/<subject_id>.json``).

    Attributes:
        subject_id: The subject.
        class_name: Its class noun.
        source: Its video or folder.
        kept: Whether the subject was written.
        reason: Why it was dropped (a subject reason of ``filters``), else ``None``.
        message: A sentence about an unreadable input, else ``None``.
        candidates: Frames read.
        frame_drops: Dropped frames by reason.
        frames: The written frames: ``{"file", "origin", "sharpness", "score"}``.
        captions_fixed: Model captions changed to name the class.
        notes: Sentences about single files (e.g. an unreadable image).
    """

    subject_id: str
    class_name: str
    source: str
    kept: bool
    reason: str | None = None
    message: str | None = None
    candidates: int = 0
    frame_drops: dict[str, int] = field(default_factory=dict)
    frames: list[dict[str, Any]] = field(default_factory=list)
    captions_fixed: int = 0
    notes: list[str] = field(default_factory=list)


class RecordStore:
    """The records of finished subjects in ``<output>/.prepare/records/``."""

    def __init__(self, output: str | os.PathLike):
        self.folder = Path(output) / STATE_DIR / "records"

    def path(self, subject_id: str) -> Path:
        return self.folder / f"{subject_id}.json"

    def finished(self) -> set[str]:
        """Ids of the subjects that have a record."""
        if not self.folder.is_dir():
            return set()
        return {path.stem for path in self.folder.glob("*.json")}

    def write(self, record: SubjectRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path(record.subject_id), json.dumps(asdict(record), indent=1) + "\n")

    def read(self, subject_id: str) -> SubjectRecord:
        return SubjectRecord(**json.loads(self.path(subject_id).read_text(encoding="utf-8")))


def write_subject_folder(
    subject_id: str,
    class_name: str,
    frames: list[PreparedFrame],
    caption_template: str | None,
    root: Path,
    staging: Path,
) -> list[str]:
    """Write one subject as ``root/<subject_id>/`` (replacing one left by a stopped run); returns the frame files.

    The folder is written in ``staging`` first and renamed, so ``root/<subject_id>`` is either absent or complete.
    ``caption.txt`` holds ``caption_template`` unless it is the reader's default; frames with their own caption get
    ``NN.txt``.
    """
    partial = staging / subject_id
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "masks").mkdir(parents=True)
    names = []
    for position, frame in enumerate(frames):
        stem = f"{position:02d}"
        name = f"{stem}.png" if frame.lossless else f"{stem}.jpg"
        if frame.lossless:
            frame.image.save(partial / name, format="PNG")
        else:
            frame.image.save(partial / name, format="JPEG", quality=JPEG_QUALITY)
        if frame.mask is not None:
            Image.fromarray(frame.mask.astype(np.uint8) * 255).save(partial / "masks" / f"{stem}.png")
        if frame.caption is not None:
            (partial / f"{stem}.txt").write_text(frame.caption + "\n", encoding="utf-8")
        names.append(name)
    if not any((partial / "masks").iterdir()):
        (partial / "masks").rmdir()
    if caption_template is not None and caption_template != DEFAULT_CAPTION_TEMPLATE:
        (partial / "caption.txt").write_text(caption_template, encoding="utf-8")
    (partial / "subject.json").write_text(json.dumps({"class_name": class_name}), encoding="utf-8")
    target = root / subject_id
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    return names


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
