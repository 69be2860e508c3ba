"""The subject on some denoising steps only: ``pipe.set_customcontrast_scale(scale, start=..., end=...)``.

    python examples/step_range.py --adapter path/to/customcontrast-sd15 --subject my_dog.jpg --class_name dog \\
        --prompt "a {class_name} in the style of a stained glass window" --range 0:1 0:0.6 0.3:1 --output outputs/range

The early steps lay out the image (pose, composition), the late ones paint details. Giving the subject the early steps
only (``0:0.6``) keeps its shape and lets the prompt restyle it; starting late (``0.3:1``) lets the prompt choose the
layout and the subject fill it in. Each ``--range START:END`` (fractions of the noise schedule, 0 at pure noise and 1 at the clean
image, ``0 <= START < END <= 1``; see docs/api.md's "Step range") makes one set of images from the same seeds, named
``range<START>-<END>_...``. UNet calls outside the range are exactly the base model's. In your own code::

    import diffusers_customcontrast  # adds pipe.load_customcontrast / set_customcontrast_scale
    pipe.load_customcontrast("path/to/adapter")
    pipe.set_customcontrast_scale(0.8, start=0.0, end=0.6)    # every later call of this pipeline
    image = pipe("a dog, stained glass", ip_adapter_image=subject).images[0]

The community pipelines take a range per call instead: ``pipe(..., subject_image=dog, subject_end=0.6)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from _common import (
    SD15_MODEL,
    add_generation_arguments,
    add_pipeline_arguments,
    add_runtime_arguments,
    generate,
    hub_kwargs,
    load_image,
    load_pipeline,
    make_parser,
    report,
)
from diffusers import AutoPipelineForText2Image

import diffusers_customcontrast  # noqa: F401  (adds load_customcontrast & co. to the IP-Adapter pipelines)


def step_range(text: str) -> tuple[float, float]:
    """``"0.2:0.8"`` -> ``(0.2, 0.8)``."""
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected START:END such as 0:0.6, got {text!r}") from error
    return start, end


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--subject", required=True, help="Image (file or URL) of the subject.")
    parser.add_argument(
        "--range",
        type=step_range,
        nargs="+",
        default=[(0.0, 1.0), (0.0, 0.6), (0.3, 1.0)],
        metavar="START:END",
        help="Step ranges to compare (default: 0:1 0:0.6 0.3:1).",
    )
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    add_generation_arguments(parser, default_size=512)
    add_runtime_arguments(parser, default_output="outputs/step_range")
    args = parser.parse_args(argv)

    pipe = load_pipeline(AutoPipelineForText2Image, args)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    subject = load_image(args.subject)
    paths = []
    for start, end in args.range:
        pipe.set_customcontrast_scale(args.scale[0], s_plus_scale=args.s_plus_scale, start=start, end=end)
        paths += generate(pipe, args, tag=f"range{start:g}-{end:g}_", ip_adapter_image=subject)
    report(paths)
    return paths


if __name__ == "__main__":
    main()
