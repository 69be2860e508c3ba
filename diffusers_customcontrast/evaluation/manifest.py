"""The manifest of a generation run: one JSON line per generated image.

Records hold absolute image paths in memory and paths relative to the manifest's folder on disk, so that an output
folder can be moved or copied to another machine and scored there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


def shard_path(output_dir: str | os.PathLike, process_index: int) -> Path:
    """The manifest shard one process writes before the main process merges them."""
    return Path(output_dir) / f"manifest.rank{process_index}.jsonl"


def write_manifest(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records as JSON lines, with image paths relative to the manifest's folder."""
    path = Path(path)
    root = path.parent.resolve()
    with path.open("w", encoding="utf-8") as stream:
        for record in records:
            relative = dict(record, path=Path(os.path.relpath(Path(record["path"]).resolve(), root)).as_posix())
            stream.write(json.dumps(relative) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a manifest written by :func:`write_manifest`, resolving image paths to absolute ones."""
    path = Path(path)
    root = path.parent.resolve()
    records = []
    with path.open(encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                record = json.loads(line)
                record["path"] = str((root / record["path"]).resolve())
                records.append(record)
    return records


def merge_manifest_shards(
    output_dir: str | os.PathLike, num_processes: int, subject_order: Sequence[str]
) -> list[dict[str, Any]]:
    """Merge the per-process manifest shards into ``manifest.jsonl`` and delete them.

    Only the shards of ranks below ``num_processes`` are read: a resumed run with fewer processes must not pick
    up a stale shard of an earlier run (which this function would have deleted anyway, unless it crashed).
    """
    output_dir = Path(output_dir)
    shards = [shard_path(output_dir, index) for index in range(num_processes)]
    # Keyed by path, so an image listed by two shards (an accelerator that pads its split) is kept once.
    by_path = {record["path"]: record for shard in shards for record in read_manifest(shard)}
    records = list(by_path.values())
    rank = {name: position for position, name in enumerate(subject_order)}
    records.sort(key=lambda r: (rank.get(r["subject"], len(rank)), r["subject"], r["prompt_index"], r["image_index"]))
    write_manifest(output_dir / MANIFEST_NAME, records)
    for shard in shards:
        shard.unlink()
    logger.info("Wrote %s (%d images)", output_dir / MANIFEST_NAME, len(records))
    return records
