"""The run's summary (subjects, frames, what was dropped and why) and a contact sheet of masks over frames."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..data import SubjectIndex
from .filters import FRAME_REASONS, SUBJECT_REASONS
from .output import SubjectRecord

SUMMARY_NAME = "summary.json"
CONTACT_SHEET_NAME = "contact_sheet.jpg"

MASK_COLOR = (255, 40, 40)
"""Tint of the subject in the contact sheet."""


@dataclass
class PrepareSummary:
    """Totals of a run, over all processes.

    Attributes:
        output: The output folder.
        subjects_found: Subjects in the input.
        subjects_kept: Subjects written.
        frames_read: Candidate frames read.
        frames_kept: Frames written.
        frame_drops: Dropped frames by reason (every reason of ``filters.FRAME_REASONS``, zeros included).
        subject_drops: Dropped subjects by reason (``filters.SUBJECT_REASONS``).
        captions_fixed: Model captions changed to name the class.
        ignored_files: Files of the input that are neither images nor videos.
        messages: One sentence per unreadable input or file.
    """

    output: str
    subjects_found: int = 0
    subjects_kept: int = 0
    frames_read: int = 0
    frames_kept: int = 0
    frame_drops: dict[str, int] = field(default_factory=dict)
    subject_drops: dict[str, int] = field(default_factory=dict)
    captions_fixed: int = 0
    ignored_files: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @classmethod
    def from_records(
        cls, output: str | Path, records: Sequence[SubjectRecord], ignored_files: Sequence[str] = ()
    ) -> PrepareSummary:
        frame_drops = Counter({reason: 0 for reason in FRAME_REASONS})
        subject_drops = Counter({reason: 0 for reason in SUBJECT_REASONS})
        messages = []
        for record in records:
            frame_drops.update(record.frame_drops)
            if record.reason is not None:
                subject_drops[record.reason] += 1
            messages += ([record.message] if record.message else []) + record.notes
        return cls(
            output=str(output),
            subjects_found=len(records),
            subjects_kept=sum(record.kept for record in records),
            frames_read=sum(record.candidates for record in records),
            frames_kept=sum(len(record.frames) for record in records if record.kept),
            frame_drops=dict(frame_drops),
            subject_drops=dict(subject_drops),
            captions_fixed=sum(record.captions_fixed for record in records),
            ignored_files=list(ignored_files),
            messages=messages,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def format(self) -> str:
        """A few lines for a person: totals, then each drop reason that occurred, then the messages."""
        lines = [
            f"{self.subjects_kept} of {self.subjects_found} subjects kept, {self.frames_kept} frames "
            f"(of {self.frames_read} read), in {self.output}"
        ]
        lines += [f"  subjects dropped, {reason}: {count}" for reason, count in self.subject_drops.items() if count]
        lines += [f"  frames dropped, {reason}: {count}" for reason, count in self.frame_drops.items() if count]
        if self.captions_fixed:
            lines.append(f"  captions changed to name the class: {self.captions_fixed}")
        if self.ignored_files:
            lines.append(f"  files ignored (neither images nor videos): {len(self.ignored_files)}")
        lines += [f"  {message}" for message in self.messages]
        return "\n".join(lines)


def contact_sheet(
    index: SubjectIndex, max_subjects: int = 16, max_frames: int = 8, thumbnail: int = 128
) -> Image.Image:
    """One row per subject (its id above it), its first frames with the mask tinted and outlined.

    Frames without mask are shown as they are; a person checks at a glance that each mask covers the subject.
    """
    subject_ids = index.subject_ids[:max_subjects]
    label = 14
    width = max(1, min(max_frames, max(len(index[s]) for s in subject_ids))) * thumbnail
    sheet = Image.new("RGB", (width, len(subject_ids) * (thumbnail + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, subject_id in enumerate(subject_ids):
        top = row * (thumbnail + label)
        draw.text(
            (2, top), f"{subject_id} ({index.class_name(subject_id)}, {len(index[subject_id])} frames)", fill="black"
        )
        for column, frame in enumerate(index[subject_id][:max_frames]):
            tile = ImageOps.contain(frame.load_image(), (thumbnail, thumbnail))
            sheet.paste(_overlay(tile, frame.load_mask()), (column * thumbnail, top + label))
    return sheet


def _overlay(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    if mask is None:
        return image
    inside = np.asarray(mask.resize(image.size, Image.Resampling.NEAREST)) > 127
    pixels = np.asarray(image, dtype=np.float32)
    pixels[inside] = 0.55 * pixels[inside] + 0.45 * np.asarray(MASK_COLOR, dtype=np.float32)
    # The outline: mask pixels with a neighbour outside the mask.
    padded = np.pad(inside, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    pixels[inside & ~interior] = MASK_COLOR
    return Image.fromarray(pixels.astype(np.uint8))
