"""Reading a saved adapter folder: one load path, :meth:`CustomContrastAdapter.from_pretrained
<diffusers_customcontrast.models.adapter.CustomContrastAdapter.from_pretrained>`, which runs every check of
:mod:`diffusers_customcontrast.models.checkpoint` (kept importable from here, where it was)."""

from __future__ import annotations

import os

import torch

from ..models.adapter import CustomContrastAdapter
from ..models.checkpoint import (
    CONFIG_NAME,
    EARLIER_LAYOUT_KEY,
    HUB_KWARGS,
    WEIGHTS_NAME,
    AdapterLoadError,
    read_config,
    read_state_dict,
    resolve_file,
    safe_torch_load,
)

__all__ = [
    "CONFIG_NAME",
    "EARLIER_LAYOUT_KEY",
    "HUB_KWARGS",
    "WEIGHTS_NAME",
    "AdapterLoadError",
    "adapter_from_state_dict",
    "load_adapter",
    "read_config",
    "read_state_dict",
    "resolve_file",
    "safe_torch_load",
]


def adapter_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor]) -> CustomContrastAdapter:
    """Build an adapter from its config and weights, checked (:meth:`CustomContrastAdapter.from_state_dict`)."""
    return CustomContrastAdapter.from_state_dict(config, state_dict)


def load_adapter(
    pretrained_model_name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    weight_name: str | None = None,
    **hub_kwargs,
) -> CustomContrastAdapter:
    """Load a saved adapter folder (local or on the hub): the same as ``CustomContrastAdapter.from_pretrained``."""
    return CustomContrastAdapter.from_pretrained(pretrained_model_name_or_path, subfolder, weight_name, **hub_kwargs)
