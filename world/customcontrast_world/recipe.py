"""How a CustomContrast adapter is trained on the synthetic world: one place for the demo and the benchmark.

:func:`world_training_config` is an ordinary :class:`~diffusers_customcontrast.training.TrainingConfig` for the
shipped base model (``assets/synthetic-base``) and a world's train split; :data:`ABLATIONS` are the runs of the
benchmark, each a set of config overrides on top of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusers_customcontrast.training import TrainingConfig

from .base_model import IMAGE_SIZE, SYNTHETIC_BASE_DIR

__all__ = ["ABLATIONS", "WORLD_ADAPTER", "WORLD_ADAPTER_DIR", "world_training_config"]

WORLD_ADAPTER_DIR: Path = Path(__file__).resolve().parent / "assets" / "world-adapter"
"""Folder of the shipped trained adapter: the world benchmark's ``full`` run, seed 0 (``docs/world_benchmark.md``)."""

WORLD_ADAPTER: dict[str, Any] = {
    "adapter": {
        "hidden_size": 64,
        "num_heads": 4,
        "visual_depth": 2,
        "textual_depth": 1,
        "num_visual_tokens": 8,
        "num_textual_tokens": 4,
        "timestep_embed_dim": 64,
        # The fusion the shipped adapter, the demo's figures and the benchmark were measured with. The library's
        # default for new adapters ("normalised", issue 29) gave in one demo run identity 20.8 % / colour set 5.6 %
        # against 19.4 % / 16.7 % (36 photos); the world benchmark has not compared them yet.
        "tv_fusion_residual": "capped",
        # Likewise: the shipped adapter's Q-Formers have plain attention (the library's default for new adapters is
        # QK-norm, issue 29; not yet compared on the world benchmark).
        "qformer_qk_norm": False,
    }
}
"""Adapter size for the world's base model (width 64 like its text encoder and image encoder): 0.30 M parameters,
against 80 M for SD1.5's default, so that a run fits in minutes on a CPU."""

ABLATIONS: dict[str, dict[str, Any]] = {
    # Reference = target frame, diffusion loss only: how IP-Adapter-style adapters are trained.
    "self_reconstruction": {"self_reconstruction": True, "use_cscl": False, "use_macl": False, "use_location": False},
    # Reference and target are different frames of the subject (the paper's cross-differential setting).
    "cross_frame": {"use_cscl": False, "use_macl": False, "use_location": False},
    "cross_frame+cscl": {"use_cscl": True, "use_macl": False, "use_location": False},
    "cross_frame+macl": {"use_cscl": False, "use_macl": True, "use_location": False},
    "cross_frame+location": {"use_cscl": False, "use_macl": False, "use_location": True},
    "full": {},
    # The full method with MACL's soft-target appearance scaling (our first reading, issue 18), beside the paper's.
    "full (MACL: soft targets)": {"macl_appearance_scaling": "soft_targets"},
}
"""The benchmark's runs: config overrides (on top of :func:`world_training_config`) that switch the paper's terms."""


def world_training_config(
    train_data: str | os.PathLike, output_dir: str | os.PathLike, **overrides: Any
) -> TrainingConfig:
    """A training config for the shipped synthetic base model on ``train_data`` (a world's ``train`` folder).

    The defaults are the demo's and the benchmark's budget (our choice): batches of 16 subjects, AdamW at 1e-3
    (the adapter is small and new), no checkpoints or trackers. ``overrides`` are any :class:`TrainingConfig`
    fields, e.g. ``max_train_steps`` or an entry of :data:`ABLATIONS`.
    """
    settings: dict[str, Any] = {
        "pretrained_model_name_or_path": os.fspath(SYNTHETIC_BASE_DIR),
        "train_data": os.fspath(train_data),
        "output_dir": os.fspath(output_dir),
        "resolution": IMAGE_SIZE,
        "train_batch_size": 16,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 20,
        "lr_scheduler": "constant_with_warmup",
        "max_train_steps": 500,
        "checkpointing_steps": None,
        "report_to": None,
        "seed": 0,
        **WORLD_ADAPTER,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)
