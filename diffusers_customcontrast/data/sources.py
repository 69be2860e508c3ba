"""One entry point for every kind of subject source: folders, shard folders, manifests, ``datasets``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .formats import SubjectIndex, load_hf_subjects, load_subject_folder, load_subject_manifest
from .shards import SHARD_INDEX_NAME, load_subject_shards

__all__ = ["load_subjects"]


def load_subjects(source: Any, **hf_columns: str | None) -> SubjectIndex:
    """Index subjects from any supported source.

    Args:
        source: a subject folder, a shard folder (one with an ``index.jsonl``, see
            :func:`~diffusers_customcontrast.data.load_subject_shards`), a ``.jsonl`` manifest, a ``datasets.Dataset``
            or an existing :class:`SubjectIndex` (returned unchanged).
        **hf_columns: column names for a ``datasets.Dataset`` (see :func:`load_hf_subjects`).

    Raises:
        FileNotFoundError: if a path does not exist.
        ValueError: if the source is of no supported kind, empty or malformed.
    """
    if hasattr(source, "column_names"):
        return load_hf_subjects(source, **hf_columns)
    if hf_columns:
        raise TypeError(f"column names {sorted(hf_columns)} only apply to a datasets.Dataset source")
    if isinstance(source, SubjectIndex):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return load_subject_shards(path) if (path / SHARD_INDEX_NAME).is_file() else load_subject_folder(path)
        if path.suffix.lower() == ".jsonl":
            return load_subject_manifest(path)
        if not path.exists():
            raise FileNotFoundError(f"subject source '{path}' does not exist")
        raise ValueError(f"expected a subject folder or a .jsonl manifest, got the file '{path}'")
    raise ValueError(
        f"expected a subject folder, a .jsonl manifest, a datasets.Dataset or a SubjectIndex, got {type(source).__name__}"
    )
