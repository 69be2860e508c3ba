"""DreamBench evaluation of a CustomContrast adapter: a thin wrapper around ``python -m diffusers_customcontrast.evaluate``.

    git clone https://github.com/google/dreambooth        # DreamBench: 30 subjects, their prompts
    python examples/evaluate_dreambench.py --dreambench_root dreambooth --adapter path/to/customcontrast-sd15 \\
        --output eval/customcontrast
    # the similarity / controllability trade-off, one run per adapter scale:
    python examples/evaluate_dreambench.py --dreambench_root dreambooth --adapter path/to/customcontrast-sd15 \\
        --scales 0.4,0.6,0.8,1.0 --output eval/customcontrast-sweep
    # the plain IP-Adapter baseline, in the same table (the command itself, no wrapper needed):
    python -m diffusers_customcontrast.evaluate --dreambench_root dreambooth \\
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --ip_adapter h94/IP-Adapter models ip-adapter-plus_sd15.safetensors --output_dir eval/ip-adapter \\
        --compare_results eval/customcontrast/results.json

The wrapper turns its options into the evaluation command line, prints that command (to rerun or to start with
``accelerate launch`` on several GPUs: generation is split over the processes) and runs it in this process
(``diffusers_customcontrast.evaluation.cli.main``). Options it does not know go to the command unchanged, e.g.
``--clip_model``, ``--dino_model``, ``--imagereward_model THUDM/ImageReward``, ``--references all``,
``--use_identifier``, ``--batch_size``, ``--height``; see ``python -m diffusers_customcontrast.evaluate --help``.
Images already written are skipped, so an interrupted run resumes. ``--output`` receives the images,
``results.json``, ``results.md`` (the paper's table with this run's rows under the published ones, under both
readings of its R-/E- columns, then every metric: CLIP-T, ImageReward, CLIP-I and DINO against the reference photo
and against all photos, and split into recontextualisation and edit prompts) and, with ``--scales``,
``scale_sweep.png``. The paper's protocol is 4 images per prompt and 50 steps (the defaults here); ``--quick``
(1 image, 25 steps, 2 subjects) gives a first look in minutes.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from _common import SD15_MODEL, add_runtime_arguments, make_parser

from diffusers_customcontrast.evaluation.cli import main as evaluate

QUICK = {"images_per_prompt": 1, "num_inference_steps": 25, "subjects": "backpack,dog"}


def evaluation_argv(args: argparse.Namespace, passthrough: Sequence[str]) -> list[str]:
    """The ``python -m diffusers_customcontrast.evaluate`` arguments for the wrapper's options."""
    settings = {
        "images_per_prompt": args.images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "subjects": args.subjects,
    }
    if args.quick:
        settings.update({k: v for k, v in QUICK.items() if k != "subjects" or args.subjects is None})
    argv = [
        "--dreambench_root", args.dreambench_root,
        "--pretrained_model", args.pretrained_model,
        "--adapter", args.adapter,
        "--output_dir", args.output,
        "--seed", str(args.seed),
        "--dtype", args.dtype,
        "--images_per_prompt", str(settings["images_per_prompt"]),
        "--num_inference_steps", str(settings["num_inference_steps"]),
    ]  # fmt: skip
    if settings["subjects"]:
        argv += ["--subjects", settings["subjects"]]
    if args.scales:
        argv += ["--scales", args.scales]
    if args.device:
        argv += ["--device", args.device]
    return [*argv, *passthrough]


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (default: the command line), run the evaluation and return its results (``results.json``)."""
    parser = make_parser(__doc__)
    parser.add_argument("--dreambench_root", required=True, help="google/dreambooth checkout or its dataset/ folder.")
    parser.add_argument("--pretrained_model", default=SD15_MODEL, help=f"Base pipeline (default: {SD15_MODEL}).")
    parser.add_argument("--adapter", required=True, help="CustomContrast adapter: hub id or local folder.")
    parser.add_argument("--subjects", default=None, help="Comma-separated subjects (default: all).")
    parser.add_argument("--scales", default=None, help="Comma-separated adapter scales for a trade-off sweep.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument(
        "--quick", action="store_true", help="1 image per prompt, 25 steps, subjects backpack and dog."
    )
    add_runtime_arguments(
        parser,
        default_output="outputs/evaluate_dreambench",
        device_help="torch device (default: the accelerate process's device).",
        seed_help="Base seed: each image's seed derives from it, the subject, the prompt and the image's index.",
    )
    args, passthrough = parser.parse_known_args(argv)

    command = evaluation_argv(args, passthrough)
    print("python -m diffusers_customcontrast.evaluate " + shlex.join(command))
    return evaluate(command)


if __name__ == "__main__":
    main()
