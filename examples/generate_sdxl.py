"""Subject-driven generation with Stable Diffusion XL and a CustomContrast adapter.

    python examples/generate_sdxl.py --adapter path/to/customcontrast-sdxl --subject my_dog.jpg \\
        --class_name dog --prompt "a {class_name} in a bucket, watercolor" --scale 0.6 1.0 \\
        --vae madebyollin/sdxl-vae-fp16-fix --output outputs/sdxl

The same as ``generate_sd15.py`` for SDXL (1024 px by default): ``pipe.load_customcontrast()`` with an adapter trained
on an SDXL base, then ``pipe.set_customcontrast_scale(scale, s_plus_scale=...)`` for each ``--scale``. SDXL's own VAE
overflows in float16 (diffusers then decodes in float32, slower); ``--vae madebyollin/sdxl-vae-fp16-fix`` avoids it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from _common import (
    SDXL_MODEL,
    add_generation_arguments,
    add_pipeline_arguments,
    add_runtime_arguments,
    generate_at_scales,
    hub_kwargs,
    load_image,
    load_model,
    load_pipeline,
    make_parser,
    report,
)
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

import diffusers_customcontrast  # noqa: F401  (adds load_customcontrast & co. to the IP-Adapter pipelines)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--subject", required=True, help="Image (file or URL) of the subject.")
    add_pipeline_arguments(parser, default_model=SDXL_MODEL)
    parser.add_argument(
        "--vae", default=None, help="Another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix."
    )
    add_generation_arguments(parser, default_size=1024)
    add_runtime_arguments(parser, default_output="outputs/generate_sdxl")
    args = parser.parse_args(argv)

    components = {"vae": load_model(AutoencoderKL, args.vae, args)} if args.vae else {}
    pipe = load_pipeline(StableDiffusionXLPipeline, args, **components)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    subject = load_image(args.subject)
    paths = generate_at_scales(pipe, args, ip_adapter_image=subject)
    report(paths)
    return paths


if __name__ == "__main__":
    main()
