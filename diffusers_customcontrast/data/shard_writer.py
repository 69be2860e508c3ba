"""Writing subject shards (the layout is described in :mod:`.shards`, which reads them).

``pyarrow`` and ``datasets`` are imported when shards are written, not with this module.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .formats import IMAGE_EXTENSIONS, Frame, ImageSource, read_image
from .shards import SHARD_INDEX_NAME, SHARD_NAME, read_shard_index
from .sources import load_subjects

__all__ = ["shard_features", "write_subject_shards"]


def shard_features() -> Any:
    """The ``datasets.Features`` of a shard row (recorded in each shard's Parquet schema)."""
    import datasets

    return datasets.Features(
        {
            "subject_id": datasets.Value("string"),
            "class_name": datasets.Value("string"),
            "frame": datasets.Value("int32"),
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "caption": datasets.Value("string"),
        }
    )


def write_subject_shards(
    source: Any, root: str | os.PathLike, subjects_per_shard: int = 64, seed: int = 0
) -> list[Path]:
    """Append the subjects of ``source`` that ``root`` does not hold yet to new shards of ``root``.

    Subjects are spread over the new shards in an order drawn from ``seed`` (so that a shard, and thus a batch read
    from it, mixes subjects of every kind even when the source is sorted by class). Image and mask files in a
    standard format are copied byte for byte; other images are stored as PNG. Each shard is written to a temporary
    name and renamed, and the index is rewritten (atomically) after the shards: a run stopped at any point leaves
    ``root`` as it was or complete, and running it again writes the same files.

    Args:
        source: A :class:`~diffusers_customcontrast.data.SubjectIndex` or anything
            :func:`~diffusers_customcontrast.data.load_subjects` accepts.
        root: The shard folder (created if needed).
        subjects_per_shard: Subjects per shard (the last new shard may hold fewer).
        seed: Seed of the order of the new subjects over the shards.

    Returns:
        The shard files written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if subjects_per_shard < 1:
        raise ValueError(f"expected subjects_per_shard >= 1, got {subjects_per_shard}")
    index = load_subjects(source)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / SHARD_INDEX_NAME
    entries = [entry for _, entry in read_shard_index(index_path)] if index_path.is_file() else []
    known = {entry["subject_id"] for entry in entries}
    first_shard = len(dict.fromkeys(entry["shard"] for entry in entries))
    new = [subject_id for subject_id in index.subject_ids if subject_id not in known]
    order = [new[i] for i in np.random.default_rng(seed).permutation(len(new))]

    schema = shard_features().arrow_schema
    written = []
    for offset in range(0, len(order), subjects_per_shard):
        name = SHARD_NAME.format(first_shard + offset // subjects_per_shard)
        temporary = root / f".{name}.tmp"
        with pq.ParquetWriter(temporary, schema) as writer:
            for row_group, subject_id in enumerate(order[offset : offset + subjects_per_shard]):
                frames = index[subject_id]
                writer.write_table(pa.Table.from_pylist(_subject_rows(subject_id, frames), schema=schema))
                entries.append(
                    {
                        "subject_id": subject_id,
                        "class_name": index.class_name(subject_id),
                        "shard": name,
                        "row_group": row_group,
                        "captions": [frame.caption for frame in frames],
                        "masks": [frame.has_mask for frame in frames],
                    }
                )
        os.replace(temporary, root / name)
        written.append(root / name)
    temporary_index = root / f".{SHARD_INDEX_NAME}.tmp"
    temporary_index.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    os.replace(temporary_index, index_path)
    return written


def _subject_rows(subject_id: str, frames: Sequence[Frame]) -> list[dict[str, Any]]:
    return [
        {
            "subject_id": subject_id,
            "class_name": frame.class_name,
            "frame": position,
            "image": _encoded(frame.image, "RGB"),
            "mask": _encoded(frame.mask, "L") if frame.mask is not None else None,
            "caption": frame.caption,
        }
        for position, frame in enumerate(frames)
    ]


def _encoded(source: ImageSource, mode: str) -> dict[str, Any]:
    """``{"bytes", "path"}`` of an image: a file's own bytes when it is in a standard format, else a PNG."""
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in IMAGE_EXTENSIONS:
        path = Path(source)
        return {"bytes": path.read_bytes(), "path": path.name}
    buffer = io.BytesIO()
    read_image(source).convert(mode).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}
