"""Subject photos as a browser uploads them: files that may be anything, checked before a pipeline sees them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_SUBJECT_PIXELS", "MAX_SUBJECTS", "UploadError", "read_subject_images"]

MAX_SUBJECT_PIXELS = 40_000_000
"""Largest subject photo accepted, in pixels (our choice: a 48-megapixel phone photo scaled to 8 bits would take
about 150 MB decoded; the image encoder sees 224 px anyway). Checked from the header, before decoding."""

MAX_SUBJECTS = 8
"""Most photos of one subject accepted at once (our choice: DreamBench has 4-6 a subject)."""


class UploadError(ValueError):
    """An uploaded subject photo cannot be used; the message says why, in one sentence for the page."""


def read_subject_images(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    """Open and decode uploaded subject photos.

    Args:
        paths: the uploaded files, in upload order.

    Returns:
        One decoded ``PIL.Image`` per file (mode as stored; the pipeline's loaded adapter makes them RGB).

    Raises:
        UploadError: no file, too many, or a file that is empty, not an image, damaged, or larger than
            :data:`MAX_SUBJECT_PIXELS`.
    """
    if not paths:
        raise UploadError("Upload at least one photo of the subject (PNG, JPEG or WebP).")
    if len(paths) > MAX_SUBJECTS:
        raise UploadError(f"Upload at most {MAX_SUBJECTS} photos of the subject, got {len(paths)}.")
    return [_read_one(Path(path)) for path in paths]


def _read_one(path: Path) -> Image.Image:
    name = path.name
    if path.stat().st_size == 0:
        raise UploadError(f"'{name}' is an empty file: expected a photo of the subject.")
    try:
        # Opening reads the header only. PIL warns about images above 89 megapixels and refuses those above 179;
        # the bound here is lower, so its warning says nothing new.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        raise UploadError(f"'{name}' is not an image file: expected a photo (PNG, JPEG or WebP).") from None
    except Image.DecompressionBombError:
        raise UploadError(_too_large(name, "over 179 megapixels")) from None
    width, height = image.size
    if width * height > MAX_SUBJECT_PIXELS:
        raise UploadError(_too_large(name, f"{width} x {height} pixels"))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        # PIL reports truncated and corrupt files as OSError (some decoders as SyntaxError or ValueError).
        raise UploadError(f"'{name}' could not be decoded as an image ({error}).") from None
    return image


def _too_large(name: str, size: str) -> str:
    return (
        f"'{name}' is {size}, more than the {MAX_SUBJECT_PIXELS // 1_000_000} megapixels accepted: "
        "upload a smaller photo."
    )
