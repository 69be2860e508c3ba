"""Shared code of the example scripts: arguments, device and dtype choice, loading, subject images, saving.

Not an example itself. The scripts import it as ``_common`` (Python puts a script's own folder on ``sys.path``,
so ``python examples/generate_sd15.py`` finds it from any working directory).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}

SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_PROMPTS = ("a photo of a {class_name} on the beach", "a {class_name} in the snow, watercolor painting")


# ---------------------------------------------------------------------------------------------------- arguments


def make_parser(module_doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose description is the script's docstring (so ``--help`` shows the example command)."""
    return argparse.ArgumentParser(
        description=module_doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )


def add_runtime_arguments(
    parser: argparse.ArgumentParser,
    default_output: str,
    device_help: str = "torch device, e.g. cuda, cuda:1, mps, cpu (default: cuda if available).",
    dtype_help: str = "auto: float16 on CUDA, float32 elsewhere.",
    seed_help: str = "Seed of the first image of each prompt; image i uses seed + i.",
) -> None:
    """``--device``, ``--dtype``, ``--seed`` and ``--output`` (the folder the script writes to)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=None, help=device_help)
    group.add_argument(
        "--dtype",
        default="auto",
        type=_dtype_name,
        help=f"auto, float16, bfloat16 or float32 (fp16, bf16, fp32 also accepted); {dtype_help}",
    )
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--output", default=default_output, help="Output folder (created if missing).")


def add_pipeline_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """``--pretrained_model``, ``--adapter`` and the hub options every pipeline load takes."""
    group = parser.add_argument_group("models")
    group.add_argument(
        "--pretrained_model",
        default=default_model,
        help=f"Base pipeline: hub id or local folder (default: {default_model}).",
    )
    group.add_argument(
        "--adapter",
        required=True,
        help="CustomContrast adapter: hub id or local folder (what the trainer's output_dir holds).",
    )
    group.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    group.add_argument("--local_files_only", action="store_true", help="Use the local Hugging Face cache only.")


def add_generation_arguments(parser: argparse.ArgumentParser, default_size: int) -> None:
    """Prompts, sampling settings and the CustomContrast scales."""
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--prompt",
        nargs="+",
        default=list(DEFAULT_PROMPTS),
        help="One or more prompts; '{class_name}' is replaced by --class_name.",
    )
    group.add_argument("--class_name", default="dog", help="Class noun of the subject, for '{class_name}' in prompts.")
    group.add_argument("--negative_prompt", default="lowres, blurry, low quality", help="Negative prompt.")
    group.add_argument("--num_inference_steps", type=int, default=30)
    group.add_argument("--guidance_scale", type=float, default=7.5)
    group.add_argument("--height", type=int, default=default_size)
    group.add_argument("--width", type=int, default=default_size)
    group.add_argument("--num_images_per_prompt", type=int, default=1)
    group.add_argument(
        "--scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="Scale of the visual subject branch. Several values make one set of images per value (same seeds), "
        "to pick the trade-off between subject similarity (high) and prompt control (low).",
    )
    group.add_argument(
        "--s_plus_scale", type=float, default=1.0, help="Scale of the S+ subject tokens in the text attention."
    )


def _dtype_name(text: str) -> str:
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name != "auto" and name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: use auto, {', '.join(DTYPES)}")
    return name


def resolve_device(name: str | None) -> torch.device:
    """The device to run on: ``name`` if given, else CUDA, else Apple's MPS, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (what the models are published for) and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": dtype}`` for ``from_pretrained``.

    ``torch_dtype``, its older name, before diffusers 0.42 (which still accepts it, with a deprecation warning).
    """
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The hub options of ``add_pipeline_arguments`` as ``from_pretrained`` keyword arguments."""
    return {"local_files_only": args.local_files_only}


# ---------------------------------------------------------------------------------------------------- loading


def load_pipeline(pipeline_class: Any, args: argparse.Namespace, **components: Any) -> Any:
    """``pipeline_class.from_pretrained(args.pretrained_model)`` in the chosen dtype, on the chosen device.

    ``components`` replace or add pipeline modules (e.g. ``controlnet=``); they should already be in that dtype.
    """
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = pipeline_class.from_pretrained(
        args.pretrained_model, variant=args.variant, **dtype_kwarg(dtype), **hub_kwargs(args), **components
    )
    return pipe.to(device)


def load_model(model_class: Any, path: str, args: argparse.Namespace, **kwargs: Any) -> Any:
    """A pipeline component (``ControlNetModel``, ``AutoencoderKL`` ...) from a hub id or folder, in the chosen dtype."""
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    return model_class.from_pretrained(path, **dtype_kwarg(dtype), **hub_kwargs(args), **kwargs)


def load_image(path_or_url: str | os.PathLike) -> Image.Image:
    """An RGB image from a file or URL, EXIF orientation applied, transparent pixels composited on white.

    White is what the adapter saw during training (subjects are segmented onto white), so cut-outs with an alpha
    channel work as they are.
    """
    from diffusers.utils import load_image as diffusers_load_image

    return diffusers_load_image(str(path_or_url), convert_method=_on_white)


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> Image.Image:
    """A single-channel mask resized to ``size`` (width, height); white (> 127) is inside."""
    with Image.open(path) as mask:
        return mask.convert("L").resize(size, Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------------- generating


def generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image (seed, seed + 1, ...): the same seeds give the same images on any device."""
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(count)]


def prompts(args: argparse.Namespace) -> list[str]:
    """``args.prompt`` with ``{class_name}`` filled in."""
    return [prompt.replace("{class_name}", args.class_name) for prompt in args.prompt]


def generate(pipe: Any, args: argparse.Namespace, tag: str = "", **call_kwargs: Any) -> list[Path]:
    """Run ``pipe`` on every prompt with the generation arguments and save the images as PNGs in ``args.output``.

    ``call_kwargs`` are the script-specific pipeline arguments (``ip_adapter_image=``, ``image=`` ...). Files are
    named ``<tag><prompt index>_<image index>_<prompt>.png``. Returns their paths.
    """
    paths = []
    for prompt_index, prompt in enumerate(prompts(args)):
        images = pipe(
            prompt,
            negative_prompt=args.negative_prompt or None,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images_per_prompt,
            generator=generators(args.seed, args.num_images_per_prompt),
            **call_kwargs,
        ).images
        for image_index, image in enumerate(images):
            paths.append(save_image(image, args.output, f"{tag}{prompt_index:02d}_{image_index}_{slug(prompt)}"))
    return paths


def generate_at_scales(pipe: Any, args: argparse.Namespace, **call_kwargs: Any) -> list[Path]:
    """:func:`generate` once per ``--scale`` value, after ``pipe.set_customcontrast_scale(value, s_plus_scale)``.

    With several scales the files are prefixed ``scale<value>_``.
    """
    paths = []
    for scale in args.scale:
        pipe.set_customcontrast_scale(scale, s_plus_scale=args.s_plus_scale)
        tag = f"scale{scale:g}_" if len(args.scale) > 1 else ""
        paths += generate(pipe, args, tag=tag, **call_kwargs)
    return paths


# ---------------------------------------------------------------------------------------------------- saving


def slug(text: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt: ``a-dog-on-the-beach``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].rstrip("-") or "image"


def save_image(image: Image.Image, folder: str | os.PathLike, stem: str) -> Path:
    """Save ``image`` as ``folder/stem.png`` (creating the folder) and return the path."""
    path = Path(folder) / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def report(paths: Sequence[Path]) -> None:
    """Print what a script wrote."""
    for path in paths:
        print(f"wrote {path}")
