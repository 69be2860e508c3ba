"""One subject from several photos: ``pipe.encode_customcontrast_subjects([photos], combine=...)``.

    python examples/several_photos.py --adapter path/to/customcontrast-sd15 --class_name dog \\
        --photos dog_front.jpg dog_side.jpg dog_sitting.jpg --prompt "a {class_name} on the beach" --output outputs/photos

Several photos of the same subject (other views, poses, light) tell the adapter more about what belongs to the subject
and what to the photo. ``encode_customcontrast_subjects`` encodes them into the features ``ip_adapter_image_embeds=``
takes. ``--combine concat`` (the default) lets the adapter's Q-Former queries attend over the patches of every photo;
``--combine mean`` averages the photos' features patch by patch (cheaper: one photo's tokens, but it blends photos
whose subject sits in different places). In your own code::

    import diffusers_customcontrast  # adds pipe.load_customcontrast / encode_customcontrast_subjects
    pipe.load_customcontrast("path/to/adapter")
    embeds = pipe.encode_customcontrast_subjects([[front, side, sitting]], combine="concat")
    image = pipe("a dog on the beach", ip_adapter_image_embeds=embeds).images[0]

``subjects`` holds one entry per subject (``[[dog_1, dog_2], [cat_1, cat_2]]`` for two, as ``ip_adapter_image=[[dog,
cat]]``). The embeddings hold the negative rows for classifier-free guidance: with ``guidance_scale <= 1`` pass
``do_classifier_free_guidance=False``.
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
from diffusers import AutoPipelineForText2Image

import diffusers_customcontrast  # noqa: F401  (adds load_customcontrast & co. to the IP-Adapter pipelines)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--photos", nargs="+", required=True, help="Photos (files or URLs) of the one subject.")
    parser.add_argument(
        "--combine",
        choices=("concat", "mean"),
        default="concat",
        help="concat: attend over every photo's patches (default); mean: average the photos' features.",
    )
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    add_generation_arguments(parser, default_size=512)
    add_runtime_arguments(parser, default_output="outputs/several_photos")
    args = parser.parse_args(argv)

    pipe = load_pipeline(AutoPipelineForText2Image, args)
    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    photos = [load_image(path) for path in args.photos]
    embeds = pipe.encode_customcontrast_subjects(
        [photos], combine=args.combine, do_classifier_free_guidance=args.guidance_scale > 1
    )
    paths = generate_at_scales(pipe, args, ip_adapter_image_embeds=embeds)
    report(paths)
    return paths


if __name__ == "__main__":
    main()
