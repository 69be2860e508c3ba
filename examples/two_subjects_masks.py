"""Two subjects in one image, each confined to its own region by a mask.

    python examples/two_subjects_masks.py --adapter path/to/customcontrast-sd15 --subjects my_dog.jpg my_cat.jpg \\
        --prompt "a dog and a cat sitting on a sofa" --output outputs/two_subjects
    # your own regions: white (> 127) is where the subject goes, any size (resized to the image)
    python examples/two_subjects_masks.py ... --masks dog_region.png cat_region.png

Both subject images go to the pipeline as one group, ``ip_adapter_image=[[first, second]]``, and the masks as
``cross_attention_kwargs={"ip_adapter_masks": [masks]}`` with ``masks`` from diffusers' ``IPAdapterMaskProcessor``
(shape ``[1, 2, height, width]``). Without ``--masks`` the first subject gets the left half and the second the
right half. (Without any mask, ``ip_adapter_image=[[first, second]]`` alone also works: each subject is then placed by
its own timestep location map.) ``masks.png`` shows the two regions (red: first, blue: second). ``--scale`` sets
both subjects; in code, ``pipe.set_customcontrast_scale([[0.8, 0.6]] * adapter.num_layers)`` gives each subject
its own strength (one ``[first, second]`` pair per cross-attention layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    SD15_MODEL,
    add_generation_arguments,
    add_pipeline_arguments,
    add_runtime_arguments,
    generate_at_scales,
    hub_kwargs,
    load_image,
    load_mask,
    load_pipeline,
    make_parser,
    report,
    save_image,
)
from diffusers import AutoPipelineForText2Image
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

import diffusers_customcontrast  # noqa: F401  (adds load_customcontrast & co. to the IP-Adapter pipelines)


def half_masks(width: int, height: int) -> list[Image.Image]:
    """The default regions: the left half for the first subject, the right half for the second."""
    left = np.zeros((height, width), np.uint8)
    left[:, : width // 2] = 255
    return [Image.fromarray(left), Image.fromarray(255 - left)]


def mask_preview(masks: Sequence[Image.Image]) -> Image.Image:
    """The regions in one picture: the first subject's in red, the second's in blue."""
    first, second = (np.asarray(mask) > 127 for mask in masks)
    preview = np.full((*first.shape, 3), 255, np.uint8)
    preview[first] = (230, 60, 60)
    preview[second] = (60, 90, 230)
    preview[first & second] = (160, 60, 180)
    return Image.fromarray(preview)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument(
        "--subjects", nargs=2, required=True, metavar=("FIRST", "SECOND"), help="The two subject images."
    )
    parser.add_argument(
        "--masks",
        nargs=2,
        metavar=("FIRST", "SECOND"),
        help="Mask images of the two regions (default: left/right halves).",
    )
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    add_generation_arguments(parser, default_size=512)
    parser.set_defaults(prompt=["a dog and a cat sitting side by side on a sofa, photo"])
    add_runtime_arguments(parser, default_output="outputs/two_subjects_masks")
    args = parser.parse_args(argv)

    size = (args.width, args.height)
    masks = [load_mask(path, size) for path in args.masks] if args.masks else half_masks(*size)
    paths = [save_image(mask_preview(masks), args.output, "masks")]

    pipe = load_pipeline(AutoPipelineForText2Image, args)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    subjects = [load_image(path) for path in args.subjects]
    mask_tensor = IPAdapterMaskProcessor().preprocess(masks, height=args.height, width=args.width)
    mask_tensor = mask_tensor.reshape(1, len(masks), args.height, args.width)  # one adapter, two subjects
    paths += generate_at_scales(
        pipe,
        args,
        ip_adapter_image=[subjects],
        cross_attention_kwargs={"ip_adapter_masks": [mask_tensor.to(pipe.device, pipe.dtype)]},
    )
    report(paths)
    return paths


if __name__ == "__main__":
    main()
