"""Subject data sources and the in-memory index they load into.

Three on-disk / in-memory forms are supported (see ``docs/data_format.md``):

* a folder with one sub-folder per subject (:func:`load_subject_folder`),
* a JSON-lines manifest with one line per frame (:func:`load_subject_manifest`),
* a Hugging Face ``datasets.Dataset`` with one row per frame (:func:`load_hf_subjects`).

All of them produce a :class:`SubjectIndex`, so that the sampling logic of the training data is written once.
Images are not decoded while indexing: a :class:`Frame` keeps a path or a loader and decodes on demand.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
"""File extensions (lower case) recognised as frames in the folder form."""

DEFAULT_CAPTION_TEMPLATE = "a photo of a {class_name}"
"""Caption of a frame that has neither its own caption nor a subject caption template."""

MASK_THRESHOLD = 127
"""A mask pixel belongs to the subject when its L value is above this threshold."""

ImageSource = str | os.PathLike | Image.Image | Callable[[], Image.Image]
"""Where a frame's image (or mask) comes from: a file path, an in-memory PIL image, or a zero-argument loader.

Loaders must be picklable (a module-level function or a callable object, not a lambda) for DataLoader workers.
"""


class ImageReadError(OSError):
    """An image or mask of the training data could not be read; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Frames and the index
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One view of a subject: an image, an optional subject mask, a caption and the subject's class name.

    Args:
        image: Path, PIL image or loader of the frame's image.
        mask: Path, PIL image or loader of the subject mask (L mode, subject where the value is > 127), or
            ``None`` when the frame has no mask.
        caption: Caption of the frame (the prompt used when the frame is a reconstruction target).
        class_name: Class noun of the subject, e.g. ``"dog"``.
    """

    image: ImageSource
    mask: ImageSource | None = None
    caption: str = ""
    class_name: str = ""

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    def load_image(self) -> Image.Image:
        """Decode the image as RGB (transparent pixels composited on white)."""
        return _to_rgb(read_image(self.image, what="image"))

    def load_mask(self) -> Image.Image | None:
        """Decode the mask as an L image, or return ``None`` for a frame without mask."""
        if self.mask is None:
            return None
        return read_image(self.mask, what="mask").convert("L")


class SubjectIndex(Mapping[str, tuple[Frame, ...]]):
    """Subjects and their frames, in a fixed order: ``index[subject_id] -> (Frame, ...)``.

    The position of a subject in :attr:`subject_ids` is its integer index, used by the datasets and samplers.

    Raises:
        ValueError: if there is no subject, or a subject has no frame.
    """

    def __init__(self, subjects: Mapping[str, Sequence[Frame]]):
        if not subjects:
            raise ValueError("expected at least one subject, got an empty subject mapping")
        empty = [subject_id for subject_id, frames in subjects.items() if len(frames) == 0]
        if empty:
            raise ValueError(f"expected at least one frame per subject, got none for subjects {empty}")
        self._subjects: dict[str, tuple[Frame, ...]] = {str(k): tuple(v) for k, v in subjects.items()}
        self._ids: tuple[str, ...] = tuple(self._subjects)

    @property
    def subject_ids(self) -> tuple[str, ...]:
        """Subject ids in index order."""
        return self._ids

    @property
    def num_frames(self) -> int:
        """Total number of frames over all subjects."""
        return sum(len(frames) for frames in self._subjects.values())

    def frames_at(self, position: int) -> tuple[Frame, ...]:
        """Frames of the subject at integer position ``position``."""
        return self._subjects[self._ids[position]]

    def class_name(self, subject_id: str) -> str:
        """Class name of a subject (the one of its first frame)."""
        return self._subjects[subject_id][0].class_name

    def __getitem__(self, subject_id: str) -> tuple[Frame, ...]:
        return self._subjects[subject_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_subjects={len(self)}, num_frames={self.num_frames})"


# --------------------------------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------------------------------


def read_image(source: ImageSource, what: str = "image") -> Image.Image:
    """Decode an :data:`ImageSource` into a PIL image (EXIF orientation applied for files).

    Raises:
        ImageReadError: if the file or loader fails; the message names the file (or the loader).
    """
    if isinstance(source, Image.Image):
        return source
    if callable(source):
        try:
            image = source()
            if isinstance(image, Image.Image):
                image.load()  # decode now: a lazily opened, corrupt image must fail here, with the loader's name
        except Exception as err:
            raise ImageReadError(f"cannot read {what} from {source!r}: {err}") from err
        if not isinstance(image, Image.Image):
            raise ImageReadError(f"expected {source!r} to return a PIL image, got {type(image).__name__}")
        return image
    path = Path(source)
    try:
        with Image.open(path) as opened:
            # exif_transpose returns a loaded copy, so the file can be closed here.
            return ImageOps.exif_transpose(opened)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError or DecompressionBombError
        raise ImageReadError(f"cannot read {what} file '{path}': {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``, read exactly as inference reads a subject image (one reader for both, so training and
    inference see the same pixels: transparency on white, 16-bit images scaled rather than clipped to white)."""
    from ..loaders.inputs import to_rgb  # imported on first use: importing the data package stays free of diffusers

    return to_rgb(image)


def _value_to_image(value: Any, where: str) -> Image.Image:
    """Decode a cell of a ``datasets`` image column: a PIL image, a path, an array or ``{"bytes", "path"}``."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read_image(value)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path") is not None:
            return read_image(value["path"])
    raise ImageReadError(f"expected a PIL image, a path or a {{'bytes', 'path'}} dict at {where}, got {value!r:.80}")


class _DatasetCellLoader:
    """Picklable loader of one image cell of a ``datasets.Dataset`` (decoded only when a sample needs it)."""

    def __init__(self, dataset: Any, row: int, column: str):
        self.dataset = dataset
        self.row = row
        self.column = column

    def __call__(self) -> Image.Image:
        return _value_to_image(self.dataset[self.row][self.column], where=repr(self))

    def __repr__(self) -> str:
        return f"datasets.Dataset row {self.row}, column '{self.column}'"


# --------------------------------------------------------------------------------------------------------------
# Folder form
# --------------------------------------------------------------------------------------------------------------


def load_subject_folder(root: str | os.PathLike) -> SubjectIndex:
    """Index a folder with one sub-folder per subject.

    Layout (see ``docs/data_format.md``)::

        root/<subject_id>/<stem>.jpg|.jpeg|.png|.webp    frames
        root/<subject_id>/masks/<stem>.png               optional masks (L mode, subject > 127)
        root/<subject_id>/<stem>.txt                     optional per-frame captions
        root/<subject_id>/caption.txt                    optional caption template ("{class_name}" is filled in)
        root/<subject_id>/subject.json                   {"class_name": "..."} (optional: defaults to the folder name)

    Sub-folders without frames and hidden folders are skipped.

    Raises:
        FileNotFoundError: if ``root`` does not exist.
        ValueError: if ``root`` is not a folder, has no subject with frames, or a ``subject.json`` is malformed.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"subject folder '{root}' does not exist")
    if not root.is_dir():
        raise ValueError(f"expected a folder of subject sub-folders, got the file '{root}'")
    subjects: dict[str, list[Frame]] = {}
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        frames = _load_subject_dir(subject_dir)
        if frames:
            subjects[subject_dir.name] = frames
        else:
            logger.warning("Skipping '%s': it holds no %s frame.", subject_dir, "|".join(IMAGE_EXTENSIONS))
    if not subjects:
        raise ValueError(
            f"expected subject folders '{root}/<subject_id>/' holding {'|'.join(IMAGE_EXTENSIONS)} frames, "
            f"got no frame in any sub-folder of '{root}'"
        )
    return SubjectIndex(subjects)


def _load_subject_dir(subject_dir: Path) -> list[Frame]:
    class_name = _read_class_name(subject_dir)
    template_file = subject_dir / "caption.txt"
    template = template_file.read_text(encoding="utf-8").strip() if template_file.is_file() else None
    template = template or DEFAULT_CAPTION_TEMPLATE
    frames = []
    for image_path in sorted(p for p in subject_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        mask_path = subject_dir / "masks" / f"{image_path.stem}.png"
        caption_path = image_path.with_suffix(".txt")
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
        frames.append(
            Frame(
                image=image_path,
                mask=mask_path if mask_path.is_file() else None,
                caption=_fill_caption(caption or template, class_name),
                class_name=class_name,
            )
        )
    return frames


def _read_class_name(subject_dir: Path) -> str:
    meta_path = subject_dir / "subject.json"
    if not meta_path.is_file():
        return subject_dir.name.replace("_", " ")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"expected a JSON object in '{meta_path}', got invalid JSON: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str) or not meta["class_name"].strip():
        raise ValueError(f'expected {{"class_name": "<noun>", ...}} in \'{meta_path}\', got {meta!r:.120}')
    return meta["class_name"].strip()


def _fill_caption(caption: str, class_name: str) -> str:
    # str.replace rather than str.format: captions may contain other braces.
    return caption.replace("{class_name}", class_name)


# --------------------------------------------------------------------------------------------------------------
# JSON-lines manifest form
# --------------------------------------------------------------------------------------------------------------


def load_subject_manifest(path: str | os.PathLike) -> SubjectIndex:
    """Index a JSON-lines manifest with one frame per line.

    Each line is an object ``{"subject_id", "image", "mask"?, "caption"?, "class_name"?}``; relative paths are
    relative to the manifest's folder. A line without ``class_name`` takes the one another line gives its subject
    (else the subject id); a line without ``caption`` gets ``"a photo of a {class_name}"``. Blank lines are
    skipped, unknown keys ignored. Subjects keep the order of their first line.

    Raises:
        FileNotFoundError: if the manifest, or an image / mask it names, does not exist.
        ValueError: if the manifest is empty or a line is malformed (the message gives the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest '{path}' does not exist")
    records = [(number, _parse_manifest_record(record, path, number)) for number, record in read_json_lines(path)]
    if not records:
        raise ValueError(f"expected one JSON object per line in '{path}', got an empty manifest")

    class_names: dict[str, str] = {}
    for _, record in records:
        if "class_name" in record:
            class_names.setdefault(record["subject_id"], record["class_name"])

    subjects: dict[str, list[Frame]] = {}
    for number, record in records:
        subject_id = record["subject_id"]
        class_name = record.get("class_name", class_names.get(subject_id, subject_id))
        image = _resolve_manifest_path(record["image"], path, number)
        mask = _resolve_manifest_path(record["mask"], path, number) if record.get("mask") else None
        caption = _fill_caption(record.get("caption") or DEFAULT_CAPTION_TEMPLATE, class_name)
        subjects.setdefault(subject_id, []).append(Frame(image, mask, caption, class_name))
    return SubjectIndex(subjects)


def read_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a JSON-lines file with their line numbers (blank lines skipped), read as they are iterated.

    Raises:
        ValueError: at a line that is not a JSON object (the message names the file and the line).
    """
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"'{path}' line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"expected a JSON object at {where}, got invalid JSON: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object at {where}, got {type(record).__name__}")
            yield number, record


_MANIFEST_STRING_KEYS = ("subject_id", "image", "mask", "caption", "class_name")


def _parse_manifest_record(record: dict[str, Any], path: Path, number: int) -> dict[str, str]:
    where = f"'{path}' line {number}"
    missing = [key for key in ("subject_id", "image") if key not in record]
    if missing:
        raise ValueError(
            f'expected keys "subject_id" and "image" at {where}, got {sorted(record)} (missing {missing})'
        )
    if isinstance(record["subject_id"], int) and not isinstance(record["subject_id"], bool):
        record["subject_id"] = str(record["subject_id"])
    for key in _MANIFEST_STRING_KEYS:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f'expected a string for "{key}" at {where}, got {value!r:.80}')
    return {key: record[key] for key in _MANIFEST_STRING_KEYS if record.get(key) is not None}


def _resolve_manifest_path(value: str, manifest: Path, number: int) -> Path:
    resolved = Path(value) if Path(value).is_absolute() else manifest.parent / value
    if not resolved.is_file():
        raise FileNotFoundError(f"'{resolved}' named at '{manifest}' line {number} does not exist")
    return resolved


# --------------------------------------------------------------------------------------------------------------
# Hugging Face datasets form
# --------------------------------------------------------------------------------------------------------------


def load_hf_subjects(
    dataset: Any,
    subject_column: str = "subject_id",
    image_column: str = "image",
    mask_column: str | None = "mask",
    caption_column: str | None = "caption",
    class_column: str | None = "class_name",
) -> SubjectIndex:
    """Index a ``datasets.Dataset`` with one row per frame.

    The subject and image columns are required. The mask, caption and class columns are used when the dataset
    has them (a row whose mask is ``None`` has no mask); pass ``None`` to ignore one. Images stay in the dataset
    and are decoded only when a sample uses them. Cells may hold PIL images (the ``datasets.Image`` feature),
    paths, or arrays.

    Raises:
        ValueError: if ``dataset`` is not a ``datasets.Dataset``, is empty, or lacks a required column (or an
            optional column named explicitly, i.e. other than its default name).
    """
    columns = _dataset_columns(dataset)
    defaults = {"mask": "mask", "caption": "caption", "class_name": "class_name"}
    for role, column in (("subject", subject_column), ("image", image_column)):
        if column not in columns:
            raise ValueError(f"expected a {role} column '{column}' in the dataset, got columns {columns}")
    optional = {}
    for role, column in (("mask", mask_column), ("caption", caption_column), ("class_name", class_column)):
        if column is not None and column not in columns and column != defaults[role]:
            raise ValueError(f"expected a {role} column '{column}' in the dataset, got columns {columns}")
        optional[role] = column if column in columns else None
    if len(dataset) == 0:
        raise ValueError("expected a dataset with at least one row, got an empty dataset")

    subject_ids = [str(value) for value in dataset[subject_column]]
    captions = list(dataset[optional["caption"]]) if optional["caption"] else [None] * len(subject_ids)
    classes = list(dataset[optional["class_name"]]) if optional["class_name"] else [None] * len(subject_ids)
    image_data = dataset.select_columns([image_column])
    mask_data = dataset.select_columns([optional["mask"]]) if optional["mask"] else None
    mask_present = (
        _non_null_cells(mask_data, optional["mask"]) if mask_data is not None else [False] * len(subject_ids)
    )

    class_names: dict[str, str] = {}
    for subject_id, class_name in zip(subject_ids, classes):
        if class_name:
            class_names.setdefault(subject_id, str(class_name))
    subjects: dict[str, list[Frame]] = {}
    for row, subject_id in enumerate(subject_ids):
        class_name = str(classes[row]) if classes[row] else class_names.get(subject_id, subject_id)
        frame = Frame(
            image=_DatasetCellLoader(image_data, row, image_column),
            mask=_DatasetCellLoader(mask_data, row, optional["mask"]) if mask_present[row] else None,
            caption=_fill_caption(str(captions[row] or DEFAULT_CAPTION_TEMPLATE), class_name),
            class_name=class_name,
        )
        subjects.setdefault(subject_id, []).append(frame)
    return SubjectIndex(subjects)


def _dataset_columns(dataset: Any) -> list[str]:
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, dict):  # a DatasetDict maps split names to column lists
        raise ValueError(
            f"expected a datasets.Dataset, got a DatasetDict with splits {sorted(column_names)}: pick one, "
            "e.g. dataset['train']"
        )
    if not isinstance(column_names, list) or not hasattr(dataset, "select_columns"):
        raise ValueError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    return column_names


def _non_null_cells(dataset: Any, column: str) -> list[bool]:
    """Which cells of ``column`` hold a value, without decoding images."""
    feature = dataset.features[column]
    if getattr(feature, "decode", False):
        dataset = dataset.cast_column(column, type(feature)(decode=False))
    return [value is not None for value in dataset[column]]
