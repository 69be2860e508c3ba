"""Image operations of the triplet sampler: segmentation on white, subject crops, placement, tensors.

Pure functions on PIL images and numpy masks (no torchvision: installing it pulls a CUDA torch over the pinned CPU build), so that each step can be
tested and reused (e.g. by the evaluation code, which segments reference images the same way).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .formats import MASK_THRESHOLD

WHITE = (255, 255, 255)
RESAMPLE = Image.Resampling.BICUBIC


def binarize_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Boolean subject mask of shape ``(height, width)`` for an image of PIL ``size`` (width, height).

    A mask of another size is resized bilinearly before thresholding, which keeps its edges smooth.
    """
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(mask) > MASK_THRESHOLD


def segment_on_white(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with every pixel outside the boolean ``mask`` set to white."""
    pixels = np.array(image.convert("RGB"))
    pixels[~mask] = WHITE
    return Image.fromarray(pixels)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(left, top, right, bottom)`` (right / bottom exclusive) of a boolean mask; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def expand_box(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int, int]:
    """Grow ``box`` by ``margin`` times its longer side on every side (it may then extend past the image)."""
    left, top, right, bottom = box
    pad = round(margin * max(right - left, bottom - top))
    return left - pad, top - pad, right + pad, bottom + pad


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side, filled with ``fill``."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def subject_crop(image: Image.Image, mask: np.ndarray | None, margin: float = 0.1) -> Image.Image:
    """Square view of the subject: segmented on white, cropped to the mask's box plus ``margin``, padded.

    Without a mask (or with an empty one) the whole image is used, unsegmented, padded to a square.
    """
    box = mask_bbox(mask) if mask is not None else None
    if box is None:
        return pad_to_square(image.convert("RGB"))
    segmented = segment_on_white(image, mask)
    # Crop the grown box on a white canvas, so that a subject touching the border keeps its margin.
    left, top, right, bottom = expand_box(box, margin)
    canvas = Image.new("RGB", (right - left, bottom - top), WHITE)
    canvas.paste(segmented, (-left, -top))
    return pad_to_square(canvas)


def resize_center_crop(image: Image.Image, size: int, resample: Image.Resampling = RESAMPLE) -> Image.Image:
    """Resize so that the shorter side is ``size``, then take the central ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_width, new_height), resample)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def place_on_canvas(
    image: Image.Image, canvas_size: int, scale: float, position: tuple[float, float], flip: bool
) -> Image.Image:
    """Paste a square ``image``, resized to ``scale * canvas_size``, on a white square canvas.

    Args:
        image: Square subject view (e.g. from :func:`subject_crop`).
        canvas_size: Side of the output canvas.
        scale: Side of the pasted image as a fraction of ``canvas_size`` (0 < scale <= 1).
        position: Fractions in [0, 1] of the free room left of and above the pasted image.
        flip: Mirror the image horizontally.
    """
    side = max(1, min(canvas_size, round(scale * canvas_size)))
    resized = image.resize((side, side), RESAMPLE)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    room = canvas_size - side
    canvas = Image.new("RGB", (canvas_size, canvas_size), WHITE)
    canvas.paste(resized, (round(position[0] * room), round(position[1] * room)))
    return canvas


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float tensor in [0, 1] from an RGB image."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div_(255.0)


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """``[1, H, W]`` float tensor of 0 / 1 from a boolean mask."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
