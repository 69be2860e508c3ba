"""A LoRA (a style or a fine-tune) and a CustomContrast subject in the same pipeline.

    python examples/lora_and_subject.py --adapter path/to/customcontrast-sd15 --subject my_dog.jpg \\
        --lora path/or/hub-id/of/a/sd15-lora --lora_weight_name pytorch_lora_weights.safetensors --lora_scale 0.8 \\
        --class_name dog --prompt "a {class_name} on the beach" --fuse_lora --output outputs/lora

``pipe.load_lora_weights()`` wraps the UNet's attention projections (``to_q``/``to_k``/``to_v``/``to_out``);
CustomContrast's processors call those projections, so the LoRA acts inside them and the two compose. The LoRA is
loaded first, then the adapter. ``--fuse_lora`` merges the LoRA into the UNet weights (``pipe.fuse_lora()``, then
``pipe.unload_lora_weights()`` drops the now-redundant LoRA layers): same images, no LoRA cost per step. The base
pipeline class comes from the checkpoint (``AutoPipelineForText2Image``), so SDXL LoRAs work with an SDXL base and
adapter.
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

LORA_NAME = "lora"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv`` (default: the command line), generate, and return the paths of the PNGs written."""
    parser = make_parser(__doc__)
    parser.add_argument("--subject", required=True, help="Image (file or URL) of the subject.")
    add_pipeline_arguments(parser, default_model=SD15_MODEL)
    lora = parser.add_argument_group("lora")
    lora.add_argument(
        "--lora", required=True, help="LoRA: hub id, local folder or .safetensors file (diffusers or kohya)."
    )
    lora.add_argument(
        "--lora_weight_name", default=None, help="File name of the LoRA inside its repository or folder."
    )
    lora.add_argument("--lora_scale", type=float, default=1.0, help="Strength of the LoRA.")
    lora.add_argument("--fuse_lora", action="store_true", help="Merge the LoRA into the UNet weights before sampling.")
    add_generation_arguments(parser, default_size=512)
    add_runtime_arguments(parser, default_output="outputs/lora_and_subject")
    args = parser.parse_args(argv)

    pipe = load_pipeline(AutoPipelineForText2Image, args)
    source, weight_name = args.lora, args.lora_weight_name
    if Path(source).is_file():  # a single file: load_lora_weights wants its folder and its name
        source, weight_name = str(Path(source).parent), Path(source).name
    pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=LORA_NAME, **hub_kwargs(args))
    pipe.set_adapters(LORA_NAME, adapter_weights=args.lora_scale)
    if args.fuse_lora:
        pipe.fuse_lora(adapter_names=[LORA_NAME])
        pipe.unload_lora_weights()  # the fused weights stay; only the LoRA layers go

    pipe.load_customcontrast(args.adapter, **hub_kwargs(args))
    subject = load_image(args.subject)
    paths = generate_at_scales(pipe, args, ip_adapter_image=subject)
    report(paths)
    return paths


if __name__ == "__main__":
    main()
