"""Subject images as users have them, made into what CLIP's image processor expects, before diffusers encodes them.

diffusers' IP-Adapter route (``encode_image`` of every ``IPAdapterMixin`` pipeline) hands ``ip_adapter_image`` to
``pipe.feature_extractor`` (CLIP's image processor), except a ``torch.Tensor``, which goes straight to
``pipe.image_encoder`` as preprocessed pixel values. Left alone, that gets several inputs wrong without a word
(measured with transformers 5.24): 16- and 32-bit images (``I;16``, ``I``) are clipped to 255, so a 16-bit photo
becomes white; float arrays in [0, 1] are taken as [0, 255] and come out black; the EXIF orientation of a photo
is ignored; a 1 x 4000 image is upscaled to 224 x 896000 pixels (17 s, 2 GB) before the crop keeps 224 x 224 of
it; an empty list fails deep inside; a tensor of the wrong shape gives "not enough values to unpack".

While an adapter is loaded, the loading pipeline's ``encode_image`` hands its input through
:func:`prepare_subject_images` first: every subject image becomes a plain RGB ``PIL.Image`` (:func:`to_rgb`), and a
tensor that is not pixel values of the image encoder's size is refused (:func:`check_pixel_values`).

Where it hooks, and why there. Only ``encode_image`` and the feature extractor see the raw images, and diffusers
offers no extension point on either. The feature extractor is not touched: anything set on it lands in its
``__dict__``, which ``to_dict`` serialises (``save_pretrained`` would fail while loaded), and changing its class
would change what every holder of it sees; a hook on the image encoder would act for every other user of that
encoder too. So the loading pipeline gets its own ``encode_image`` (an instance attribute shadowing the class's
method, removed at unload; ``loaders/pipeline.py``), as it gets its own ``load_ip_adapter``. A pipeline made
with ``from_pipe`` after loading shares the UNet, so the subject applies there too, but it has diffusers' own
``encode_image``: give it raw images that CLIP reads right (8-bit RGB), or load the adapter on it (which moves the
per-pipeline methods there).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

__all__ = ["check_pixel_values", "normalise_subject_images", "prepare_subject_images", "to_rgb"]

# Center-cropping processors keep only the middle square of an image; a longer image is cropped to this aspect
# ratio before them, so that they never upscale a 1 x 4000 strip to 224 x 896000 pixels (our choice of bound).
MAX_ASPECT_RATIO = 4.0

_HINT = "pass a PIL image, an HxWxC uint8 array or a float array in [0, 1]"


def _fail(what: str) -> ValueError:
    return ValueError(f"Cannot use this subject image: {what} ({_HINT}).")


def _from_array(array: np.ndarray) -> Image.Image:
    """One image from a numpy array: HxW, HxWxC (C in 1..4, last) or CxHxW; uint8, uint16, bool or float in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4) and array.shape[0] in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first (torch's layout)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise _fail(f"an array of shape {array.shape} is not an HxW, HxWxC or CxHxW image")
    if array.size == 0:
        raise _fail(f"the image is empty (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.uint32) // 257).astype(np.uint8)  # 65535 -> 255
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise _fail(
                f"integer pixel values must lie in [0, 255] (uint16: [0, 65535]), got [{array.min()}, {array.max()}]"
            )
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise _fail("the image holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise _fail(f"float pixel values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise _fail(f"arrays of dtype {array.dtype} are not images")
    return Image.fromarray(np.ascontiguousarray(array))  # uint8: L, LA, RGB or RGBA from the shape


def _high_bit_depth(image: Image.Image) -> Image.Image:
    """``I;16*``, ``I`` and ``F`` images as 8-bit ``L``, scaled rather than clipped (PIL's own conversion clips)."""
    array = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(array).all():
            raise _fail("the image holds NaN or infinite values")
        # Our choice: a float image with nothing above 1 is taken as [0, 1] (Image.fromarray of a float array);
        # otherwise as PIL's own scale for F images, [0, 255].
        scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8), mode="L")
    array = array.astype(np.int64)
    # 16-bit modes span [0, 65535]; a 32-bit "I" image is 16-bit data (as PIL opens 16-bit PNGs) if any value is
    # above 255, else 8-bit data.
    sixteen_bit = image.mode.startswith("I;16") or (array.size and int(array.max()) > 255)
    array = np.clip(array, 0, 65535) // 257 if sixteen_bit else np.clip(array, 0, 255)
    return Image.fromarray(array.astype(np.uint8), mode="L")


def _crop_extreme_aspect(image: Image.Image, processor: Any) -> Image.Image:
    """Center-crop a very long image for a processor that keeps only its center square anyway."""
    size = getattr(processor, "size", None)
    shortest = size.get("shortest_edge") if hasattr(size, "get") else None
    if not getattr(processor, "do_center_crop", False) or not shortest:
        return image
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= MAX_ASPECT_RATIO * short:
        return image
    keep = math.ceil(MAX_ASPECT_RATIO * short)
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def to_rgb(image: Any, processor: Any = None) -> Image.Image:
    """One subject image as an RGB ``PIL.Image``, the way a user sees it.

    The EXIF orientation is applied; transparency is composited on white (the background of the segmented reference
    images CustomContrast is trained with); 1-bit, palette, CMYK, YCbCr, LAB and HSV images are converted; 16- and
    32-bit images are scaled to 8 bits. numpy arrays and tensors (inside a list; a tensor alone is pixel values, see
    :func:`prepare_subject_images`) may be HxW, HxWxC or CxHxW, uint8 (or uint16, bool) or float in [0, 1]. Anything
    else raises a one-sentence ``ValueError``. With a center-cropping ``processor``, images longer than 4:1 are
    center-cropped to 4:1 first (the crop keeps less than that anyway).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        image = image.numpy()
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if not isinstance(image, Image.Image):
        raise _fail(f"a {type(image).__name__} is not an image")
    if image.width == 0 or image.height == 0:
        raise _fail(f"the image is empty ({image.width} x {image.height} pixels)")
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth(image)
    if image.mode != "RGB" or image.has_transparency_data:
        try:
            if image.has_transparency_data:
                rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            else:
                image = image.convert("RGB")
        except ValueError as error:
            raise _fail(f"PIL cannot convert mode {image.mode} to RGB ({error})") from error
    return _crop_extreme_aspect(image, processor)


def normalise_subject_images(images: Any, processor: Any = None) -> Any:
    """:func:`to_rgb` applied to each image of a single image, a list (or tuple) or nested lists; lists stay lists.

    A 4-D array or tensor is a list of images. Raises ``ValueError`` for an empty list.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(
                "Got an empty list of subject images: pass at least one (ip_adapter_image=image, or "
                "ip_adapter_image=[[image_a, image_b]] for several subjects)."
            )
        return [normalise_subject_images(image, processor) for image in images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return normalise_subject_images(list(images), processor)
    return to_rgb(images, processor)


def prepare_subject_images(images: Any, processor: Any = None, image_encoder: torch.nn.Module | None = None) -> Any:
    """``ip_adapter_image`` as the loading pipeline's ``encode_image`` hands it on: raw images through
    :func:`normalise_subject_images`; a tensor, which diffusers takes as CLIP pixel values, checked as such
    (:func:`check_pixel_values`) and passed unchanged."""
    if isinstance(images, torch.Tensor):
        check_pixel_values(images, image_encoder)
        return images
    return normalise_subject_images(images, processor)


def check_pixel_values(pixel_values: torch.Tensor, image_encoder: torch.nn.Module | None = None) -> None:
    """A tensor ``ip_adapter_image`` must be finite pixel values ``[batch, 3, size, size]`` (``size``: the image
    encoder's ``image_size``); warns when it looks like an image in [0, 1] rather than CLIP-normalised values."""
    size = getattr(getattr(image_encoder, "config", None), "image_size", None)
    expected = (3, size, size) if isinstance(size, numbers.Integral) else None
    if pixel_values.ndim != 4 or (expected is not None and tuple(pixel_values.shape[1:]) != expected):
        want = f"[batch, {', '.join(map(str, expected))}]" if expected else "[batch, 3, height, width]"
        raise ValueError(
            f"A torch.Tensor ip_adapter_image goes straight to the image encoder as CLIP pixel values {want} "
            f"(diffusers' convention, what pipe.feature_extractor returns), got shape {list(pixel_values.shape)}: "
            "pass a raw image as a PIL image or numpy array, or as a tensor inside a list (ip_adapter_image=[[tensor]])."
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError("The ip_adapter_image pixel values hold NaN or infinite values.")
    low, high = pixel_values.aminmax()
    if low >= 0 and high <= 1 and high > 0:  # diffusers' negative image is all zeros
        warnings.warn(
            "The ip_adapter_image tensor holds values in [0, 1] only: diffusers takes a tensor as CLIP-normalised "
            "pixel values, not as an image. If it is an image, pass it inside a list (ip_adapter_image=[[tensor]]) "
            "or as a PIL image, so that it is preprocessed.",
            UserWarning,
            stacklevel=2,
        )
