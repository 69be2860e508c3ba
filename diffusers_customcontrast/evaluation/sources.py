"""Telling a local model path from a hub id, so that a mistyped path fails at once instead of going to the hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

# "name" or "org/name", as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json")


def looks_like_local_path(value: str | os.PathLike) -> bool:
    """Whether ``value`` names a local file or folder (existing or not) rather than a hub repository id.

    Anything that exists is local; otherwise an absolute path, a path starting with ``.`` or ``~``, one with more
    than one ``/`` or a backslash, and a name ending in a weights or config suffix cannot be a hub id.
    """
    text = os.fspath(value)
    if Path(text).expanduser().exists():
        return True
    return not _HUB_ID.match(text) or text.endswith(_FILE_SUFFIXES)


def check_model_source(value: str | os.PathLike, option: str) -> None:
    """Raise if ``value`` looks like a local path that does not exist.

    Args:
        value: A hub id or a local file / folder.
        option: What the value is for, named in the error (e.g. ``"--clip_model"``).

    Raises:
        FileNotFoundError: If ``value`` is local-looking and missing.
    """
    if looks_like_local_path(value) and not Path(os.fspath(value)).expanduser().exists():
        raise FileNotFoundError(f"{option}: {os.fspath(value)!r} does not exist (expected a hub id or a local path).")
