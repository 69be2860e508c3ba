"""Putting a CustomContrast adapter into diffusers: pipeline methods, attaching to a UNet, files, conversion, inputs."""

from .convert import adapter_from_ip_adapter, ip_adapter_state_dict, load_ip_adapter_attention
from .injection import attach, detach
from .pipeline import (
    encode_customcontrast_subjects,
    load_customcontrast,
    record_customcontrast,
    register_pipeline_methods,
    set_customcontrast_scale,
    unload_customcontrast,
)
from .serialization import WEIGHTS_NAME, AdapterLoadError, load_adapter

__all__ = [
    "WEIGHTS_NAME",
    "AdapterLoadError",
    "adapter_from_ip_adapter",
    "attach",
    "detach",
    "encode_customcontrast_subjects",
    "ip_adapter_state_dict",
    "load_adapter",
    "load_customcontrast",
    "load_ip_adapter_attention",
    "record_customcontrast",
    "register_pipeline_methods",
    "set_customcontrast_scale",
    "unload_customcontrast",
]
