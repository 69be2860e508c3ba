"""A subject placed by a Canny edge map: StableDiffusionControlNetPipeline + CustomContrast.

    pip install -e ".[controlnet]"     # from the checkout, on a GPU machine with torchvision (README: Installation)
    python examples/controlnet_canny.py --adapter path/to/customcontrast-sd15 --subject my_dog.jpg \\
        --layout room.jpg --class_name dog --prompt "a {class_name} in a living room, photo" --output outputs/canny

controlnet_aux's ``CannyDetector`` turns ``--layout`` (any photo or drawing) into an edge map, which
``lllyasviel/sd-controlnet-canny`` follows, while the subject comes through the same ``ip_adapter_image=`` as with
a plain pipeline: CustomContrast needs nothing ControlNet-specific. The edge map is saved as ``control.png`` next to
the images. Lower ``--controlnet_conditioning_scale`` when the layout fights the subject's shape.
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
    load_model,
    load_pipeline,
    make_parser,
    report,
    save_image,
)
from controlnet_aux import CannyDetector
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

import diffusers_customcontrast  # noqa: F401  (adds load_customcontrast & co. to the IP-Adapter pipelines)

CANNY_CONTROLNET = "lllyasviel/sd-controlnet-canny"


def canny_map(layout: Image.Image, width: int, height: int, low: int, high: int) -> Image.Image:
    """The Canny edge map of ``layout`` at the generation size (white edges on black, RGB)."""
    # CannyDetector resizes so that the shorter side is the resolution and both sides are multiples of 64: give it
    # the layout at the final size already, so the edges line up with the image.
    resized = layout.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    resolution = min(width, height)
    edges = CannyDetector()(
        resized, low_threshold=low, high_threshold=high, detect_resolution=resolution, image_resolution=resolution
    )
    return edges if edges.size == (width, height) else edges.resize((width, height), Image.Resampling.NEAREST)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--subject", required=True, help="Image (file or URL) of the subject.")
    parser.add_argument("--layout", required=True, help="Image (file or URL) whose edges lay out the scene.")
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    control = parser.add_argument_group("controlnet")
    control.add_argument(
        "--controlnet", default=CANNY_CONTROLNET, help=f"Canny ControlNet (default: {CANNY_CONTROLNET})."
    )
    control.add_argument("--low_threshold", type=int, default=100, help="Canny's lower hysteresis threshold.")
    control.add_argument("--high_threshold", type=int, default=200, help="Canny's upper hysteresis threshold.")
    control.add_argument("--controlnet_conditioning_scale", type=float, default=1.0)
    add_generation_arguments(parser, default_size=512)
    add_runtime_arguments(parser, default_output="outputs/controlnet_canny")
    args = parser.parse_args(argv)

    edges = canny_map(load_image(args.layout), args.width, args.height, args.low_threshold, args.high_threshold)
    paths = [save_image(edges, args.output, "control")]

    controlnet = load_model(ControlNetModel, args.controlnet, args)
    pipe = load_pipeline(StableDiffusionControlNetPipeline, args, controlnet=controlnet)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    subject = load_image(args.subject)
    paths += generate_at_scales(
        pipe,
        args,
        ip_adapter_image=subject,
        image=edges,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale,
    )
    report(paths)
    return paths


if __name__ == "__main__":
    main()
