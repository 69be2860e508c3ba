"""Subject-driven generation with Stable Diffusion 1.5 and a CustomContrast adapter.

    python examples/generate_sd15.py --adapter path/to/customcontrast-sd15 --subject my_dog.jpg \\
        --class_name dog --prompt "a {class_name} on the beach" "a {class_name} wearing a santa hat" \\
        --scale 0.5 0.8 1.0 --output outputs/sd15

Loads the base pipeline, adds the adapter with ``pipe.load_customcontrast()`` (its folder's ``image_encoder/`` comes
along: SD1.5 ships none), and writes one PNG per prompt, image and ``--scale`` value. The scale is set with
``pipe.set_customcontrast_scale(scale, s_plus_scale=...)`` before each set: the same seeds at several scales show
the trade-off between likeness to the subject (high) and freedom of the prompt (low). In your own code::

    import diffusers_customcontrast  # adds pipe.load_customcontrast / set_customcontrast_scale
    pipe.load_customcontrast("path/to/adapter")
    pipe.set_customcontrast_scale(0.8, s_plus_scale=0.5)                 # visual branch, S+ tokens
    pipe.set_customcontrast_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})  # per block, InstantStyle-style
    image = pipe("a dog on the beach", ip_adapter_image=subject).images[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from _common import (
    SD15_MODEL,
    add_generation_arguments,
    add_pipeline_arguments,
    add_runtime_arguments,
    generate_at_scales,
    hub_kwargs,
    load_image,
    load_pipeline,
    make_parser,
    report,
)
from diffusers import StableDiffusionPipeline

import diffusers_customcontrast  # noqa: F401  (adds load_customcontrast & co. to the IP-Adapter pipelines)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--subject", required=True, help="Image (file or URL) of the subject.")
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    add_generation_arguments(parser, default_size=512)
    add_runtime_arguments(parser, default_output="outputs/generate_sd15")
    args = parser.parse_args(argv)

    pipe = load_pipeline(StableDiffusionPipeline, args)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    subject = load_image(args.subject)
    paths = generate_at_scales(pipe, args, ip_adapter_image=subject)
    report(paths)
    return paths


if __name__ == "__main__":
    main()
