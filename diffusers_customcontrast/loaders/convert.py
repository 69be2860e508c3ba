"""Warm-start a CustomContrast adapter's visual cross-attention from an IP-Adapter / IP-Adapter-Plus checkpoint.

The original IP-Adapter files (``ip-adapter_sd15.bin``, ``ip-adapter-plus_sdxl_vit-h.safetensors``, ...) store one
``to_k_ip``/``to_v_ip`` pair per cross-attention layer under ``ip_adapter.{1,3,5,...}``: the processors are numbered
over all attention layers, and every cross-attention layer follows its self-attention layer. Their shapes are the
shapes of CustomContrast's visual cross-attention, so those weights transfer as they are; the image projection of
IP-Adapter does not (CustomContrast has its own encoder) and is ignored.

Command line::

    python -m diffusers_customcontrast.convert --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --ip_adapter ip-adapter-plus_sd15.safetensors --image_encoder h94/IP-Adapter --output_dir cc-warm-start
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..models.adapter import CustomContrastAdapter
from .serialization import AdapterLoadError, read_state_dict, resolve_file, safe_torch_load

logger = logging.getLogger(__name__)


def ip_adapter_attention_weights(state_dict: dict) -> dict[str, torch.Tensor]:
    """The ``ip_adapter`` part of an IP-Adapter checkpoint, keyed ``"{id}.to_k_ip.weight"``.

    Accepts the nested form of the ``.bin`` files (``{"image_proj": ..., "ip_adapter": ...}``) and the flat form
    of the ``.safetensors`` files (``"ip_adapter.1.to_k_ip.weight"``, ...).
    """
    if isinstance(state_dict.get("ip_adapter"), dict):
        return dict(state_dict["ip_adapter"])
    prefix = "ip_adapter."
    weights = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not weights:
        raise AdapterLoadError("This is not an IP-Adapter checkpoint: it has no 'ip_adapter' weights.")
    return weights


def _read_checkpoint(source: str | os.PathLike | dict, weight_name: str | None, **hub_kwargs) -> dict:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        if weight_name is None:
            raise AdapterLoadError(f"'{source}' is not a file: give weight_name to read it from a folder or hub repo.")
        path = resolve_file(source, weight_name, hub_kwargs.pop("subfolder", None), **hub_kwargs)
    return read_state_dict(path) if path.suffix == ".safetensors" else safe_torch_load(path)


@torch.no_grad()
def load_ip_adapter_attention(
    adapter: CustomContrastAdapter,
    ip_adapter: str | os.PathLike | dict,
    weight_name: str | None = None,
    **hub_kwargs,
) -> CustomContrastAdapter:
    """Copy an IP-Adapter checkpoint's ``to_k_ip``/``to_v_ip`` weights into ``adapter`` (in place; returned).

    ``ip_adapter`` is a checkpoint file, a folder or hub repository with ``weight_name``, or an already-loaded
    state dict. Raises a one-sentence error when a layer is missing or of another shape (e.g. an SDXL IP-Adapter
    for an SD1.5 adapter).
    """
    weights = ip_adapter_attention_weights(_read_checkpoint(ip_adapter, weight_name, **hub_kwargs))
    for index, (name, layer) in enumerate(zip(adapter.config.layer_names, adapter.layers, strict=True)):
        key_id = 2 * index + 1
        for projection in ("to_k_ip", "to_v_ip"):
            key = f"{key_id}.{projection}.weight"
            target = getattr(layer, projection).weight
            if key not in weights:
                raise AdapterLoadError(
                    f"The IP-Adapter checkpoint has no 'ip_adapter.{key}' for layer {index} ('{name}'): it was made "
                    f"for a UNet with fewer cross-attention layers than this one ({adapter.num_layers})."
                )
            if weights[key].shape != target.shape:
                raise AdapterLoadError(
                    f"The IP-Adapter weight 'ip_adapter.{key}' has shape {tuple(weights[key].shape)}, but layer "
                    f"'{name}' needs {tuple(target.shape)}: the checkpoint is for another base model."
                )
            target.copy_(weights[key])
    extra = len({k.split(".")[0] for k in weights}) - adapter.num_layers
    if extra > 0:
        logger.warning("The IP-Adapter checkpoint has %d more layers than the adapter; they were ignored.", extra)
    return adapter


def adapter_from_ip_adapter(
    unet: nn.Module,
    ip_adapter: str | os.PathLike | dict,
    image_encoder: nn.Module | None = None,
    weight_name: str | None = None,
    hub_kwargs: dict | None = None,
    **config,
) -> CustomContrastAdapter:
    """A new adapter for ``unet`` whose visual cross-attention comes from an IP-Adapter checkpoint.

    ``config`` holds :class:`CustomContrastAdapter` options; ``hub_kwargs`` (``subfolder``, ``revision``, ...) say
    where to find ``weight_name`` when ``ip_adapter`` is a hub repository.
    """
    adapter = CustomContrastAdapter.from_unet(unet, image_encoder, init_from_unet=False, **config)
    return load_ip_adapter_attention(adapter, ip_adapter, weight_name, **(hub_kwargs or {}))


def main(argv: list[str] | None = None) -> Path:
    """Command line: write a warm-started adapter folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", required=True, help="hub id or folder of the base pipeline (its unet/)")
    parser.add_argument(
        "--ip_adapter", required=True, help="IP-Adapter checkpoint file, or repo/folder with --weight_name"
    )
    parser.add_argument("--weight_name", default=None)
    parser.add_argument("--subfolder", default=None, help="subfolder of the IP-Adapter checkpoint in its repo")
    parser.add_argument("--image_encoder", default=None, help="hub id or folder of the CLIP image encoder")
    parser.add_argument("--image_encoder_subfolder", default="models/image_encoder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--adapter_config", default="{}", help="JSON of CustomContrastAdapter options")
    parser.add_argument("--local_files_only", action="store_true")
    args = parser.parse_args(argv)

    hub = {"local_files_only": args.local_files_only}
    unet = UNet2DConditionModel.from_pretrained(args.base_model, subfolder="unet", **hub)
    image_encoder = None
    if args.image_encoder:
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            args.image_encoder, subfolder=args.image_encoder_subfolder or None, **hub
        )
    adapter = adapter_from_ip_adapter(
        unet,
        args.ip_adapter,
        image_encoder,
        args.weight_name,
        hub_kwargs={"subfolder": args.subfolder, **hub},
        **json.loads(args.adapter_config),
    )
    adapter.save_pretrained(args.output_dir)
    if image_encoder is not None:
        image_encoder.save_pretrained(Path(args.output_dir, "image_encoder"))
    logger.info("Wrote a warm-started CustomContrast adapter to %s", args.output_dir)
    return Path(args.output_dir)
