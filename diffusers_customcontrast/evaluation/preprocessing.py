"""Image preprocessing of the metric models, written out so that it matches the reference protocols exactly.

DINO (DreamBooth's evaluation) and ImageReward both use torchvision's ``Resize(n, bicubic)``, ``CenterCrop`` and
``Normalize`` on PIL images; torchvision cannot be installed next to a CPU torch here, so the same steps are done
with PIL and numpy, with torchvision's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_crop_normalize(
    images: Sequence[Image.Image],
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (bicubic), centre-crop ``crop`` x ``crop``, scale to [0, 1], normalise.

    Returns:
        A float32 tensor of shape ``(len(images), 3, crop, crop)``.
    """
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    arrays = []
    for image in images:
        image = _center_crop(_resize_shorter_side(image.convert("RGB"), resize), crop)
        arrays.append((np.asarray(image, dtype=np.float32) / 255.0 - mean_array) / std_array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    # Same rounding as torchvision's Resize(int): the longer side is truncated, not rounded.
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    # Same offsets as torchvision's CenterCrop.
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
