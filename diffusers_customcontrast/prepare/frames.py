"""Frames of a subject: read from its video or image files, then chosen to cover its views, sharp and distinct.

Selection (:func:`select_frames`):

1. **Candidates.** A video or frame sequence is cut into ``max_frames`` equal stretches of time, and
   ``candidates_per_frame`` frames are read, evenly spaced, in each: an orbit around an object then gives frames from
   all around it. A photo set is read whole.
2. **Blur.** A frame is blurry when its sharpness (variance of the Laplacian of the grey image at 256 px on the
   longer side, so that it does not depend on resolution) is below ``min_sharpness``, or below ``sharpness_ratio``
   times the subject's median (motion blur in a video that is otherwise sharp).
3. **One per stretch.** Each stretch keeps its sharpest frame that is not blurry; a photo set keeps its
   ``max_frames`` sharpest photos, in file-name order.
4. **Near-duplicates.** A frame whose 64-bit difference hash is within ``duplicate_distance`` bits of a frame
   kept before it is dropped (a camera that stopped moving, the same photo twice).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import Frame, ImageReadError
from .filters import BLURRY, NEAR_DUPLICATE, UNREADABLE
from .sources import InputError, SubjectSource

SHARPNESS_SIDE = 256
"""Longer side at which sharpness is measured."""


@dataclass
class Candidate:
    """A frame read from a subject's input.

    Attributes:
        image: The frame, RGB, at most ``max_side`` on its longer side.
        origin: Where it comes from: an image file, or ``<video>#frame=<n>``.
        stretch: The stretch of time it was read in (its position for a photo set).
        sharpness: Variance of the Laplacian at :data:`SHARPNESS_SIDE` px.
        lossless: The source was lossless (PNG, WebP), so the frame is best stored as PNG.
    """

    image: Image.Image
    origin: str
    stretch: int
    sharpness: float
    lossless: bool


def read_candidates(
    source: SubjectSource, max_frames: int, candidates_per_frame: int, max_side: int, drops: Counter, notes: list[str]
) -> list[Candidate]:
    """The candidate frames of ``source`` (step 1 of the module docstring).

    Unreadable image files are counted in ``drops`` and named in ``notes``, and the others are read.

    Raises:
        InputError: if the subject has no frame at all: an empty folder, or a video no frame of which decodes.
    """
    if source.kind == "video":
        frames = list(_video_candidates(source.paths[0], max_frames, candidates_per_frame))
        if not frames:
            raise InputError(
                f"cannot decode any frame of the video '{source.location}': the file is corrupt or in a codec "
                "OpenCV cannot read"
            )
        return [_candidate(image, origin, stretch, max_side, lossless=False) for image, origin, stretch in frames]
    if not source.paths:
        raise InputError(
            f"expected .jpg, .jpeg, .png or .webp images in '{source.location}', got "
            f"{'an empty folder' if not source.ignored else f'only other files ({source.ignored[0].name}, ...)'}"
        )
    if source.kind == "frames":
        positions = _spread(len(source.paths), max_frames * candidates_per_frame)
        chosen = [(source.paths[p], p * max_frames // len(source.paths)) for p in positions]
    else:
        chosen = [(path, position) for position, path in enumerate(source.paths)]
    candidates = []
    for path, stretch in chosen:
        try:
            image = Frame(path).load_image()
        except ImageReadError as error:
            drops[UNREADABLE] += 1
            notes.append(str(error))
            continue
        lossless = path.suffix.lower() in (".png", ".webp")
        candidates.append(_candidate(image, str(path), stretch, max_side, lossless))
    if not candidates:
        raise InputError(f"no image of '{source.location}' could be read ({len(chosen)} tried)")
    return candidates


def select_frames(
    candidates: list[Candidate],
    ordered: bool,
    max_frames: int,
    min_sharpness: float,
    sharpness_ratio: float,
    duplicate_distance: int,
    drops: Counter,
) -> list[Candidate]:
    """Steps 2 to 4 of the module docstring; the drops are counted in ``drops``."""
    median = float(np.median([c.sharpness for c in candidates]))
    threshold = max(min_sharpness, sharpness_ratio * median)
    sharp = [c for c in candidates if c.sharpness >= threshold]
    drops[BLURRY] += len(candidates) - len(sharp)
    if ordered:
        best: dict[int, Candidate] = {}
        for candidate in sharp:
            if candidate.stretch not in best or candidate.sharpness > best[candidate.stretch].sharpness:
                best[candidate.stretch] = candidate
        chosen = [best[stretch] for stretch in sorted(best)]
    else:
        sharpest = sorted(sharp, key=lambda c: -c.sharpness)[:max_frames]
        chosen = sorted(sharpest, key=lambda c: c.stretch)
    kept: list[Candidate] = []
    hashes: list[int] = []
    for candidate in chosen:
        code = difference_hash(candidate.image)
        if any(bin(code ^ other).count("1") <= duplicate_distance for other in hashes):
            drops[NEAR_DUPLICATE] += 1
            continue
        kept.append(candidate)
        hashes.append(code)
    return kept


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey image at :data:`SHARPNESS_SIDE` px on the longer side."""
    import cv2

    grey = np.asarray(image.convert("L"))
    scale = SHARPNESS_SIDE / max(grey.shape)
    grey = cv2.resize(
        grey,
        (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
        interpolation=cv2.INTER_AREA,
    )
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def difference_hash(image: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: whether each pixel of a ``(size + 1) x size`` grey thumbnail is brighter than its
    right neighbour. Views of a subject a few degrees apart differ in many bits; copies and re-encodings in few."""
    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def _candidate(image: Image.Image, origin: str, stretch: int, max_side: int, lossless: bool) -> Candidate:
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return Candidate(image, origin, stretch, sharpness(image), lossless)


def _spread(total: int, count: int) -> list[int]:
    """``count`` positions evenly spread over ``range(total)`` (all of them when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return sorted({round(x) for x in np.linspace(0, total - 1, count)})


def _video_candidates(
    path: Path, max_frames: int, candidates_per_frame: int
) -> Iterator[tuple[Image.Image, str, int]]:
    """``(frame, origin, stretch)`` of evenly spaced frames of a video, read in one pass (``grab`` skips frames
    without converting them)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:  # some containers do not record it: count by reading through once
            while capture.grab():
                total += 1
            capture.release()
            capture = cv2.VideoCapture(str(path))
        wanted = _spread(total, max_frames * candidates_per_frame)
        position = 0
        for target in wanted:
            while position < target and capture.grab():
                position += 1
            if position < target or not capture.grab():
                return  # the video ends before its recorded length (truncated)
            ok, frame = capture.retrieve()
            position += 1
            if ok and frame is not None:
                image = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                yield image, f"{path}#frame={target}", target * max_frames // total
    finally:
        capture.release()
