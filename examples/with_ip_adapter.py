"""A style IP-Adapter and a CustomContrast subject in one pipeline.

    python examples/with_ip_adapter.py --adapter path/to/customcontrast-sd15 --subject my_dog.jpg --style van_gogh.jpg \\
        --ip_adapter h94/IP-Adapter --ip_adapter_subfolder models --ip_adapter_weight_name ip-adapter_sd15.safetensors \\
        --class_name dog --prompt "a {class_name} in a field" --ip_adapter_scale 0.6 --output outputs/style_and_subject

diffusers' ``pipe.load_ip_adapter(...)`` and ``pipe.load_customcontrast(...)`` work in either order; the IP-Adapter's
entry always comes first, so ``ip_adapter_image=[style, subject]``. ``pipe.set_ip_adapter_scale`` sets the
IP-Adapter (a float, or InstantStyle's per-block dict, e.g. ``{"up": {"block_0": [0.0, 1.0, 0.0]}}`` on SDXL for style
only), ``pipe.set_customcontrast_scale`` the subject. ``pipe.unload_customcontrast()`` leaves the IP-Adapter exactly
as if CustomContrast had never been loaded; ``pipe.unload_ip_adapter()`` leaves CustomContrast (and the image encoder
it needs) in place. Both share the pipeline's image encoder: use an IP-Adapter made for the same CLIP model. Writes
``style_and_subject_...`` images, plus ``subject_only_...`` with the IP-Adapter unloaded, from the same seeds.
"""

from __future__ import annotations

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


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--subject", required=True, help="Image (file or URL) of the subject.")
    parser.add_argument("--style", required=True, help="Image (file or URL) for the IP-Adapter, e.g. a painting.")
    parser.add_argument("--ip_adapter", default="h94/IP-Adapter", help="IP-Adapter repository or folder.")
    parser.add_argument("--ip_adapter_subfolder", default="models")
    parser.add_argument("--ip_adapter_weight_name", default="ip-adapter_sd15.safetensors")
    parser.add_argument("--ip_adapter_scale", type=float, default=0.6)
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    add_generation_arguments(parser, default_size=512)
    add_runtime_arguments(parser, default_output="outputs/with_ip_adapter")
    args = parser.parse_args(argv)

    pipe = load_pipeline(AutoPipelineForText2Image, args)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))  # the image encoder comes with the adapter
    pipe.load_ip_adapter(
        args.ip_adapter,
        subfolder=args.ip_adapter_subfolder,
        weight_name=args.ip_adapter_weight_name,
        image_encoder_folder=None,  # the pipeline's, which CustomContrast uses
        **hub_kwargs(args),
    )
    pipe.set_ip_adapter_scale(args.ip_adapter_scale)
    pipe.set_customcontrast_scale(args.scale[0], s_plus_scale=args.s_plus_scale)
    style, subject = load_image(args.style), load_image(args.subject)
    paths = generate(pipe, args, tag="style_and_subject_", ip_adapter_image=[style, subject])
    pipe.unload_ip_adapter()
    paths += generate(pipe, args, tag="subject_only_", ip_adapter_image=subject)
    report(paths)
    return paths


if __name__ == "__main__":
    main()
