"""Subject shards: Parquet files that many machines read part by part, and the index that lists their subjects.

Layout of a shard folder (see ``docs/data_format.md``)::

    root/index.jsonl            one line per subject: {"subject_id", "class_name", "shard", "row_group",
                                "captions", "masks"}
    root/shard-00000.parquet    one row per frame, one row group per subject
    root/shard-00001.parquet    ...

A shard row has the columns of the ``datasets`` form (``subject_id``, ``class_name``, ``frame``, ``image``, ``mask``,
``caption``) with ``datasets.Image`` features recorded in the Parquet schema, so the shards are also a plain
Hugging Face dataset: ``datasets.load_dataset("parquet", data_files="root/shard-*.parquet", streaming=True)`` streams
them, and :func:`~diffusers_customcontrast.data.load_hf_subjects` indexes them once loaded.

The trainer reads them through :func:`load_subject_shards`: the index gives every subject's frames and captions
without opening a shard, and a frame's image is read from its shard's row group when a sample needs it.
:class:`~diffusers_customcontrast.data.ShardedSubjectBatchSampler` then gives each process its own shards, so a
process only ever reads those files.

``pyarrow`` is imported when shards are read, not with this module; :mod:`.shard_writer` writes them.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .formats import Frame, SubjectIndex, read_json_lines

SHARD_INDEX_NAME = "index.jsonl"
"""File name of a shard folder's subject index."""

SHARD_NAME = "shard-{:05d}.parquet"
"""File name pattern of the shards, numbered from 0."""

_INDEX_KEYS = ("subject_id", "class_name", "shard", "row_group", "captions", "masks")


class ShardedSubjectIndex(SubjectIndex):
    """A :class:`~diffusers_customcontrast.data.SubjectIndex` whose subjects live in shards.

    Args:
        subjects: Subject ids and their frames, in index order.
        subject_shards: For each subject (in index order), the position of its shard in ``shard_files``.
        shard_files: The shard files.
    """

    def __init__(
        self, subjects: Mapping[str, Sequence[Frame]], subject_shards: Sequence[int], shard_files: Sequence[Path]
    ):
        super().__init__(subjects)
        if len(subject_shards) != len(self):
            raise ValueError(f"expected one shard position per subject ({len(self)}), got {len(subject_shards)}")
        self.subject_shards: tuple[int, ...] = tuple(int(s) for s in subject_shards)
        self.shard_files: tuple[Path, ...] = tuple(Path(p) for p in shard_files)

    @property
    def num_shards(self) -> int:
        return len(self.shard_files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_subjects={len(self)}, num_frames={self.num_frames}, num_shards={self.num_shards})"


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def load_subject_shards(root: str | os.PathLike) -> ShardedSubjectIndex:
    """Index a shard folder from its ``index.jsonl`` (no shard is opened).

    Raises:
        FileNotFoundError: if the folder, its index or a shard the index names does not exist.
        ValueError: if the index is empty or a line is malformed (the message gives the line number).
    """
    root = Path(root)
    index_path = root / SHARD_INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"expected a shard index '{index_path}', found none")
    subjects: dict[str, list[Frame]] = {}
    subject_shards: list[int] = []
    shard_positions: dict[str, int] = {}
    for number, entry in read_shard_index(index_path):
        shard = root / entry["shard"]
        if entry["shard"] not in shard_positions:
            if not shard.is_file():
                raise FileNotFoundError(f"shard '{shard}' named at '{index_path}' line {number} does not exist")
            shard_positions[entry["shard"]] = len(shard_positions)
        if entry["subject_id"] in subjects:
            raise ValueError(
                f"subject '{entry['subject_id']}' appears twice in '{index_path}' (again at line {number})"
            )
        subjects[entry["subject_id"]] = [
            Frame(
                image=ShardCell(shard, entry["row_group"], row, "image"),
                mask=ShardCell(shard, entry["row_group"], row, "mask") if has_mask else None,
                caption=caption,
                class_name=entry["class_name"],
            )
            for row, (caption, has_mask) in enumerate(zip(entry["captions"], entry["masks"]))
        ]
        subject_shards.append(shard_positions[entry["shard"]])
    if not subjects:
        raise ValueError(f"expected one subject per line in '{index_path}', got an empty index")
    return ShardedSubjectIndex(subjects, subject_shards, [root / name for name in shard_positions])


def read_shard_index(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, entry in read_json_lines(path):
        where = f"'{path}' line {number}"
        if any(key not in entry for key in _INDEX_KEYS):
            raise ValueError(f"expected the keys {list(_INDEX_KEYS)} at {where}, got {sorted(entry)}")
        if len(entry["captions"]) != len(entry["masks"]) or not entry["captions"]:
            raise ValueError(f"expected as many captions as mask flags, at least one, at {where}")
        yield number, entry


class ShardCell:
    """Picklable loader of one image (or mask) cell of a shard: ``ShardCell(shard, row_group, row, column)()``.

    The row group's column is read once and kept (a few per process), since a sample decodes several frames of one
    subject and a subject is one row group.
    """

    def __init__(self, shard: Path, row_group: int, row: int, column: str):
        self.shard = Path(shard)
        self.row_group = row_group
        self.row = row
        self.column = column

    def __call__(self) -> Image.Image:
        cells = read_row_group_column(str(self.shard), self.row_group, self.column)
        cell = cells[self.row]
        if cell is None or cell.get("bytes") is None:
            raise ValueError(f"{self!r} holds no image")
        # The same EXIF handling as image files of the other forms.
        return ImageOps.exif_transpose(Image.open(io.BytesIO(cell["bytes"])))

    def __repr__(self) -> str:
        return f"shard '{self.shard}' row group {self.row_group}, row {self.row}, column '{self.column}'"


@functools.lru_cache(maxsize=8)
def read_row_group_column(shard: str, row_group: int, column: str) -> list[dict[str, Any] | None]:
    """The cells of one column of one row group of a shard (the last few are cached, as plain Python data: forked
    DataLoader workers may share them; no file stays open)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(shard).read_row_group(row_group, columns=[column]).column(column).to_pylist()
