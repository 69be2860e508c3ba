"""Command line of the trainer: ``python -m diffusers_customcontrast.train --config run.yaml [--field value ...]``.

The same module runs under ``accelerate launch`` for several processes, GPUs or nodes (DDP, DeepSpeed or FSDP as
accelerate's own configuration says); see ``docs/training.md``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .config import ConfigError, parse_args
from .trainer import TrainingResult, train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    """Parse the configuration (YAML + overrides), train, and return the :class:`TrainingResult`.

    A configuration error (including a base model that cannot be found) is reported in one line on stderr with exit
    status 2, like other usage errors.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        return train(parse_args(argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
