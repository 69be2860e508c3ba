"""``python -m customcontrast_world.app``: start the web app on a local port."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> None:
    """Load the pipeline and the adapter, then serve the page until interrupted."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Gradio is an optional extra: import it only once the arguments are known to be fine.
    from .layout import build_app, launch_app
    from .studio import load_studio

    try:
        studio = load_studio(args.base, args.adapter, device=args.device, torch_dtype=DTYPES.get(args.dtype))
    except (OSError, ValueError) as error:  # a missing or unfit model: one sentence, no traceback
        raise SystemExit(f"Cannot start the app: {error}") from None
    logging.getLogger(__name__).info(studio.description)
    launch_app(build_app(studio), args.host, args.port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m customcontrast_world.app",
        description="A local web page to try a CustomContrast adapter. Without --base and --adapter it runs offline, "
        "on the synthetic world's base model and its trained adapter.",
    )
    parser.add_argument(
        "--base", default=None, help="hub id or folder of an SD1.5 or SDXL pipeline (default: the world's base model)"
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="hub id or folder of a CustomContrast adapter (required with --base; default: the world's adapter)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of a --base pipeline (default: float16 on CUDA, else float32)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
