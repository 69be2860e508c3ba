"""Raw inputs of a preparation run, found on disk: one :class:`SubjectSource` per subject.

Kinds of input (``input_kind``):

* ``videos``: a folder of video files, one subject per video;
* ``frame_folders``: a folder of per-object frame folders (MVImgNet / CO3D style), frames in file-name order;
* ``photo_folders``: a folder of photo folders, e.g. one per person (CelebA / VGGFace2 style), in no order;
* ``photos``: a folder of photos of one subject;
* ``jsonl``: one JSON object per line and subject, ``{"video" | "frames" | "photos": path, "subject_id"?,
  "class_name"?}`` (paths relative to the list's folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data import IMAGE_EXTENSIONS
from ..data.formats import read_json_lines

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
"""File extensions (lower case) read as videos."""

SourceKind = Literal["video", "frames", "photos"]


class InputError(ValueError):
    """The input of the run cannot be read as any kind of subject input; the message says what was expected."""


@dataclass(frozen=True)
class DiscoveredInputs:
    """The subjects of an input (sorted by id), and the files of a video folder that are not videos."""

    subjects: list[SubjectSource]
    ignored: list[Path]


@dataclass(frozen=True)
class SubjectSource:
    """Where one subject's frames come from.

    Attributes:
        subject_id: Output name of the subject (letters, digits, ``.``, ``_`` and ``-``).
        class_name: Class noun of the subject.
        kind: ``video`` (one file in ``paths``), ``frames`` (an ordered sequence) or ``photos`` (an unordered set).
        location: The video file or the folder the subject was found at.
        paths: The video, or the image files in file-name order.
        ignored: Files next to them that are neither images nor videos.
    """

    subject_id: str
    class_name: str
    kind: SourceKind
    location: Path
    paths: tuple[Path, ...]
    ignored: tuple[Path, ...] = field(default=())


def discover_subjects(
    input: str | Path, input_kind: str = "auto", class_name: str | None = None, domain: str = "object"
) -> DiscoveredInputs:
    """The subjects of ``input``, sorted by subject id.

    Args:
        input: A folder or a ``.jsonl`` list (see the module docstring).
        input_kind: One of ``auto``, ``videos``, ``frame_folders``, ``photo_folders``, ``photos``, ``jsonl``.
        class_name: Class noun of every subject (a ``.jsonl`` line's own wins); default: the folder or file name.
        domain: ``human`` makes ``auto`` read a folder of folders as photo folders (identities) rather than frames.

    Raises:
        InputError: if ``input`` does not exist, is of no supported kind, holds no subject, or two subjects get the
            same id.
    """
    path = Path(input)
    if not path.exists():
        raise InputError(f"expected a folder or a .jsonl list as input, got '{path}', which does not exist")
    kind = _detect_kind(path, domain) if input_kind == "auto" else input_kind
    ignored: list[Path] = []
    if kind == "jsonl":
        sources = _read_list(path, class_name)
    elif not path.is_dir():
        raise InputError(f"expected a folder for input_kind={kind!r}, got the file '{path}'")
    elif kind == "videos":
        videos, ignored = _split_files(path, VIDEO_EXTENSIONS)
        sources = [_video_source(video, class_name) for video in videos]
    elif kind == "photos":
        sources = [_image_source(path, "photos", class_name)]
    else:
        folder_kind: SourceKind = "frames" if kind == "frame_folders" else "photos"
        sources = [_image_source(folder, folder_kind, class_name) for folder in _subfolders(path)]
    if not sources:
        raise InputError(f"expected subjects in '{path}' (read as {kind}), found none")
    seen: dict[str, Path] = {}
    for source in sources:
        if source.subject_id in seen:
            raise InputError(
                f"expected one subject per id, got '{source.subject_id}' for both '{seen[source.subject_id]}' and "
                f"'{source.location}'"
            )
        seen[source.subject_id] = source.location
    return DiscoveredInputs(sorted(sources, key=lambda source: source.subject_id), ignored)


def subject_id_from(name: str) -> str:
    """A file-name-safe subject id: ``"My Dog (2)"`` -> ``"My_Dog_2"``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "subject"


def _detect_kind(path: Path, domain: str) -> str:
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return "jsonl"
        raise InputError(f"expected a folder or a .jsonl list as input, got the file '{path}'")
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in VIDEO_EXTENSIONS for p in files):
        return "videos"
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        return "photos"
    if _subfolders(path):
        return "photo_folders" if domain == "human" else "frame_folders"
    raise InputError(
        f"expected videos ({', '.join(VIDEO_EXTENSIONS)}), images ({', '.join(IMAGE_EXTENSIONS)}) or sub-folders of "
        f"images in '{path}', got {'an empty folder' if not files else 'none of them'}"
    )


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_files(folder: Path, extensions: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """The files of ``folder`` with one of ``extensions`` (sorted), and the other files (hidden ones left out)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = [p for p in files if p.suffix.lower() in extensions]
    return kept, [p for p in files if p.suffix.lower() not in extensions]


def _default_class(name: str) -> str:
    return name.replace("_", " ")


def _video_source(video: Path, class_name: str | None, subject_id: str | None = None) -> SubjectSource:
    return SubjectSource(
        subject_id=subject_id or subject_id_from(video.stem),
        class_name=class_name or _default_class(video.stem),
        kind="video",
        location=video,
        paths=(video,),
    )


def _image_source(
    folder: Path, kind: SourceKind, class_name: str | None, subject_id: str | None = None
) -> SubjectSource:
    images, ignored = _split_files(folder, IMAGE_EXTENSIONS) if folder.is_dir() else ([], [])
    return SubjectSource(
        subject_id=subject_id or subject_id_from(folder.name),
        class_name=class_name or _default_class(folder.name),
        kind=kind,
        location=folder,
        paths=tuple(images),
        ignored=tuple(ignored),
    )


_LIST_KINDS = ("video", "frames", "photos")


def _read_list(path: Path, class_name: str | None) -> list[SubjectSource]:
    sources = []
    try:
        for number, entry in read_json_lines(path):
            sources.append(_list_entry(entry, path, number, class_name))
    except ValueError as error:
        raise InputError(str(error)) from None
    return sources


def _list_entry(entry: dict, path: Path, number: int, class_name: str | None) -> SubjectSource:
    where = f"'{path}' line {number}"
    given = [key for key in _LIST_KINDS if key in entry]
    if len(given) != 1 or not isinstance(entry[given[0]], str):
        raise InputError(f'expected exactly one of "video", "frames" or "photos" (a path) at {where}, got {entry}')
    location = Path(entry[given[0]])
    location = location if location.is_absolute() else path.parent / location
    if not location.exists():
        raise InputError(f"'{location}' named at {where} does not exist")
    subject_id = subject_id_from(str(entry["subject_id"])) if "subject_id" in entry else None
    line_class = entry.get("class_name") or class_name
    if given[0] == "video":
        return _video_source(location, line_class, subject_id)
    return _image_source(location, given[0], line_class, subject_id)
