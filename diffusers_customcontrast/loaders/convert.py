"""Convert an IP-Adapter-Plus or IP-Adapter checkpoint into a CustomContrast adapter that computes exactly what it
computes.

The original IP-Adapter files (``ip-adapter-plus_sd15.bin``, ``ip-adapter-plus_sdxl_vit-h.safetensors``, ...) hold
two parts: ``image_proj``, the image projection, and ``ip_adapter``, one ``to_k_ip``/``to_v_ip`` pair per
cross-attention layer under ``{1,3,5,...}`` (the processors are numbered over all attention layers, and every
cross-attention layer follows its self-attention layer). The ``.bin`` files nest them (``{"image_proj": {...},
"ip_adapter": {...}}``); the ``.safetensors`` files flatten them with ``image_proj.`` / ``ip_adapter.`` prefixes.

IP-Adapter-Plus's image projection is a Resampler, which CustomContrast's visual Q-Former holds key for key
(:class:`~diffusers_customcontrast.models.qformer.VisualQFormer`). Plain IP-Adapter's is a linear projection of CLIP's
pooled image embedding, which an adapter with ``image_input="image_embeds"`` and ``visual_projection="linear"`` holds
key for key (:class:`~diffusers_customcontrast.models.qformer.LinearVisualProjection`); pipelines then feed it the
pooled embedding, with zeros as the negative, as they feed plain IP-Adapter. The ``to_k_ip``/``to_v_ip`` pairs are the
layers' visual cross-attention. What CustomContrast adds starts as a no-op (TV fusion ``identity``, location gates
open, S+ scale 0), so the converted adapter reproduces the IP-Adapter it comes from, and training starts from there.

:func:`ip_adapter_state_dict` goes the other way: an adapter's IP-Adapter(-Plus) part as a checkpoint of the original
flat layout, which diffusers' ``load_ip_adapter`` reads.

Command line::

    python -m diffusers_customcontrast.convert --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --ip_adapter h94/IP-Adapter --subfolder models --weight_name ip-adapter-plus_sd15.safetensors \\
        --image_encoder h94/IP-Adapter --output_dir cc-from-ip-adapter-plus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.adapter import CustomContrastAdapter
from ..models.config import CustomContrastAdapterConfig
from ..models.unet_layout import cross_attention_layout
from .serialization import AdapterLoadError, read_state_dict, resolve_file, safe_torch_load

logger = logging.getLogger(__name__)

HEAD_DIM = 64  # IP-Adapter-Plus's Resampler heads are 64 wide (the checkpoints do not record it; diffusers assumes it)

# How a converted adapter starts: everything CustomContrast adds to IP-Adapter(-Plus) is a no-op.
CONVERTED_OPTIONS: dict[str, Any] = {"tv_fusion_init": "identity", "location_gate_init": 0.0, "s_plus_scale": 0.0}

# Original Resampler keys -> the visual Q-Former's (``latents`` is handled apart: it is rows 1.. of the queries).
_RESAMPLER_KEYS = (
    (re.compile(r"^(proj_in|proj_out|norm_out)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^layers\.(\d+)\.0\.(norm1|norm2|to_q|to_kv|to_out)\.(weight|bias)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^layers\.(\d+)\.1\.([013])\.(weight|bias)$"), r"blocks.\1.ff.\2.\3"),
)
# The visual Q-Former's keys -> the original Resampler's: the inverse of _RESAMPLER_KEYS, for the export.
_RESAMPLER_EXPORT_KEYS = (
    (re.compile(r"^(proj_in|proj_out|norm_out)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2|to_q|to_kv|to_out)\.(weight|bias)$"), r"layers.\1.0.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.ff\.([013])\.(weight|bias)$"), r"layers.\1.1.\2.\3"),
)


def _renamed(key: str, patterns: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    """``key`` rewritten by the first of ``patterns`` that matches it; None when none does."""
    return next((pattern.sub(repl, key) for pattern, repl in patterns if pattern.match(key)), None)


def _attention_key(index: int, projection: str) -> str:
    """The checkpoint key of cross-attention layer ``index``'s projection (1, 3, 5, ...: see the module docstring)."""
    return f"{2 * index + 1}.{projection}.weight"


def split_ip_adapter_checkpoint(state_dict: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The ``(image_proj, ip_adapter)`` parts of an IP-Adapter checkpoint, nested (``.bin``) or flat (``.safetensors``)."""
    if isinstance(state_dict.get("ip_adapter"), Mapping):
        return dict(state_dict.get("image_proj") or {}), dict(state_dict["ip_adapter"])
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state_dict.items():
        part, _, name = str(key).partition(".")
        if part in parts:
            parts[part][name] = value
    if not parts["ip_adapter"]:
        raise AdapterLoadError("This is not an IP-Adapter checkpoint: it has no 'ip_adapter' weights.")
    return parts["image_proj"], parts["ip_adapter"]


def ip_adapter_kind(image_proj: Mapping, ip_adapter: Mapping) -> str:
    """``"plus"`` (a Resampler image projection) or ``"plain"`` (a linear one); a one-sentence error for the kinds
    CustomContrast cannot start from (FaceID, Full)."""
    if any("lora" in key for key in ip_adapter) or "perceiver_resampler.proj_in.weight" in image_proj:
        raise AdapterLoadError(
            "This is an IP-Adapter-FaceID checkpoint (it reads InsightFace face embeddings, with LoRA in the UNet), "
            "but CustomContrast starts only from IP-Adapter or IP-Adapter-Plus checkpoints, which read CLIP image "
            "features."
        )
    if "latents" in image_proj:
        return "plus"
    if "proj.weight" in image_proj:
        return "plain"
    if "proj.3.weight" in image_proj or "norm.weight" in image_proj:
        raise AdapterLoadError(
            "This IP-Adapter checkpoint has an MLP image projection (IP-Adapter-Full or FaceID), but CustomContrast "
            "starts only from IP-Adapter or IP-Adapter-Plus checkpoints."
        )
    raise AdapterLoadError(
        f"This IP-Adapter checkpoint's image projection is of no known kind (keys {sorted(image_proj)[:4]}): "
        "expected IP-Adapter-Plus's Resampler ('latents', 'proj_in', ...) or IP-Adapter's 'proj' and 'norm'."
    )


def linear_projection_options(image_proj: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The adapter options whose values a plain IP-Adapter's linear projection fixes (its input width, token count)."""
    try:
        weight, width = image_proj["proj.weight"], image_proj["norm.weight"].shape[-1]
    except KeyError as error:
        raise AdapterLoadError(
            f"This IP-Adapter checkpoint's image projection is incomplete (no {error}): the file is damaged."
        ) from error
    if weight.ndim != 2 or weight.shape[0] % width:
        raise AdapterLoadError(
            f"This IP-Adapter checkpoint's projection has shape {tuple(weight.shape)}, which makes no whole number "
            f"of {width}-wide tokens: the file is damaged."
        )
    return {
        "image_input": "image_embeds",
        "visual_projection": "linear",
        "image_embed_dim": weight.shape[1],
        "num_visual_tokens": weight.shape[0] // width,
    }


def resampler_options(image_proj: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The adapter options whose values an IP-Adapter-Plus Resampler fixes (its widths, depth and token count)."""
    try:
        latents = image_proj["latents"]
        hidden = latents.shape[-1]
        inner = image_proj["layers.0.0.to_q.weight"].shape[0]  # first: a Resampler without layers fails here
        depth = 1 + max(int(m.group(1)) for k in image_proj if (m := re.match(r"layers\.(\d+)\.", k)))
        ff_width = image_proj["layers.0.1.1.weight"].shape[0]
        image_embed_dim = image_proj["proj_in.weight"].shape[1]
    except (KeyError, IndexError) as error:
        raise AdapterLoadError(
            f"This IP-Adapter-Plus checkpoint's Resampler is incomplete (no {error}): the file is damaged."
        ) from error
    if latents.ndim != 3 or inner != hidden or inner % HEAD_DIM:
        raise AdapterLoadError(
            f"This IP-Adapter-Plus Resampler has {inner}-wide attention on {hidden}-wide latents of shape "
            f"{tuple(latents.shape)}, but the visual Q-Former holds only equal widths in {HEAD_DIM}-wide heads."
        )
    return {
        "image_embed_dim": image_embed_dim,
        "hidden_size": hidden,
        "num_heads": hidden // HEAD_DIM,
        "visual_depth": depth,
        "num_visual_tokens": latents.shape[1],
        "mlp_ratio": ff_width / hidden,
    }


def _read_checkpoint(source: str | os.PathLike | Mapping, weight_name: str | None, **hub_kwargs) -> Mapping:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        if weight_name is None:
            raise AdapterLoadError(f"'{source}' is not a file: give weight_name to read it from a folder or hub repo.")
        path = resolve_file(source, weight_name, hub_kwargs.pop("subfolder", None), **hub_kwargs)
    checkpoint = read_state_dict(path) if path.suffix == ".safetensors" else safe_torch_load(path)
    if not isinstance(checkpoint, Mapping):
        raise AdapterLoadError(f"'{path}' holds a {type(checkpoint).__name__}, not an IP-Adapter state dict.")
    return checkpoint


def _copy(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if value.shape != target.shape:
        raise AdapterLoadError(
            f"The IP-Adapter weight '{name}' has shape {tuple(value.shape)}, but the adapter needs "
            f"{tuple(target.shape)} there: the checkpoint is for another base model."
        )
    target.copy_(value)


@torch.no_grad()
def load_ip_adapter_attention(
    adapter: CustomContrastAdapter,
    ip_adapter: str | os.PathLike | Mapping,
    weight_name: str | None = None,
    **hub_kwargs,
) -> CustomContrastAdapter:
    """Copy an IP-Adapter checkpoint's ``to_k_ip``/``to_v_ip`` weights into ``adapter`` (in place; returned).

    ``ip_adapter`` is a checkpoint file, a folder or hub repository with ``weight_name`` (and ``subfolder``), or an
    already-loaded state dict. Raises a one-sentence error when a layer is missing or of another shape (e.g. an SDXL
    IP-Adapter for an SD1.5 adapter).
    """
    _, weights = split_ip_adapter_checkpoint(_read_checkpoint(ip_adapter, weight_name, **hub_kwargs))
    for index, (name, layer) in enumerate(zip(adapter.config.layer_names, adapter.layers, strict=True)):
        for projection in ("to_k_ip", "to_v_ip"):
            key = _attention_key(index, projection)
            if key not in weights:
                raise AdapterLoadError(
                    f"The IP-Adapter checkpoint has no 'ip_adapter.{key}' for layer {index} ('{name}'): it was made "
                    f"for a UNet with fewer cross-attention layers than this one ({adapter.num_layers})."
                )
            _copy(getattr(layer, projection).weight, weights[key], f"ip_adapter.{key}")
    extra = len({k.split(".")[0] for k in weights}) - adapter.num_layers
    if extra > 0:
        logger.warning("The IP-Adapter checkpoint has %d more layers than the adapter; they were ignored.", extra)
    return adapter


def _load_image_projection(
    targets: dict[str, torch.Tensor],
    image_proj: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None],
    kind: str,
) -> None:
    """Copy every ``image_proj`` weight into ``targets`` (the adapter's tensors, by the name ``rename`` gives a
    checkpoint key); a one-sentence error for a weight with no place and for a place with no weight."""
    targets = dict(targets)
    for key, value in image_proj.items():
        name = rename(key)
        if name not in targets:
            raise AdapterLoadError(
                f"The {kind} has a weight 'image_proj.{key}' that the adapter has no place for: the checkpoint is not "
                f"an {kind} of the original layout."
            )
        _copy(targets.pop(name), value, f"image_proj.{key}")
    if targets:
        raise AdapterLoadError(
            f"The {kind} has no weight for the adapter's '{sorted(targets)[0]}' ({len(targets)} missing): the file "
            "is incomplete."
        )


@torch.no_grad()
def load_resampler(adapter: CustomContrastAdapter, image_proj: Mapping[str, torch.Tensor]) -> CustomContrastAdapter:
    """Copy an IP-Adapter-Plus Resampler into the adapter's visual Q-Former (in place; returned)."""
    qformer = adapter.encoder.visual_qformer
    targets = {name: p for name, p in qformer.named_parameters() if name != "queries"}
    # The latents are the queries' rows 1..; row 0, the CLS query, keeps its initial value.
    targets["latents"] = qformer.queries[1:].unsqueeze(0)

    def rename(key: str) -> str | None:
        return key if key == "latents" else _renamed(key, _RESAMPLER_KEYS)

    _load_image_projection(targets, image_proj, rename, "IP-Adapter-Plus Resampler")
    return adapter


@torch.no_grad()
def load_linear_projection(
    adapter: CustomContrastAdapter, image_proj: Mapping[str, torch.Tensor]
) -> CustomContrastAdapter:
    """Copy a plain IP-Adapter's image projection (``proj``, ``norm``) into the adapter's (in place; returned)."""
    projection = adapter.encoder.visual_qformer
    targets = {
        f"{module}.{name}": p
        for module in ("proj", "norm")
        for name, p in getattr(projection, module).named_parameters()
    }
    _load_image_projection(targets, image_proj, lambda key: key, "IP-Adapter image projection")
    return adapter


def _options(derived: Mapping[str, Any], given: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The converted adapter's options: the no-op starts, the user's other choices, and what the checkpoint fixes
    (which the user may repeat but not change)."""
    for name, value in given.items():
        if value is None or name not in derived:  # not chosen, or the checkpoint leaves it free
            continue
        if (list(value) if isinstance(value, (list, tuple)) else value) != derived[name]:
            raise ValueError(
                f"'{name}' is fixed by the {kind} checkpoint ({derived[name]!r}), but {value!r} was given: "
                "leave it out."
            )
    return {**CONVERTED_OPTIONS, **{k: v for k, v in given.items() if v is not None}, **derived}


def adapter_from_ip_adapter(
    unet: nn.Module,
    ip_adapter: str | os.PathLike | Mapping,
    image_encoder: nn.Module | None = None,
    /,
    weight_name: str | None = None,
    hub_kwargs: dict | None = None,
    **config,
) -> CustomContrastAdapter:
    """A new adapter for ``unet`` converted from an IP-Adapter-Plus or IP-Adapter checkpoint.

    The image projection (IP-Adapter-Plus's Resampler as the visual Q-Former; plain IP-Adapter's linear projection
    with ``image_input="image_embeds"``) and the visual cross-attention come from the checkpoint, and the parts
    CustomContrast adds start as no-ops (:data:`CONVERTED_OPTIONS`): loaded with ``load_customcontrast`` at its
    default settings the adapter gives the images of that IP-Adapter loaded with ``load_ip_adapter``.

    Args:
        unet: the base model's UNet.
        ip_adapter: a checkpoint file, a folder or hub repository (with ``weight_name``), or a loaded state dict.
        image_encoder: the CLIP vision model the checkpoint was trained with; checked against the checkpoint. Like
            ``unet`` and ``ip_adapter``, given by position (``image_encoder=`` is the config's informative hub id).
        weight_name: the checkpoint's file name in a folder or repository.
        hub_kwargs: where to find it (``subfolder``, ``revision``, ``local_files_only``, ...).
        **config: other :class:`~diffusers_customcontrast.models.CustomContrastAdapterConfig` options (the
            textual Q-Former's shape, ...); those the checkpoint fixes cannot be given otherwise.

    Raises:
        AdapterLoadError: the checkpoint is of another kind (FaceID, Full), for another base model or image encoder,
            incomplete or damaged, each in one sentence.
    """
    CustomContrastAdapterConfig.for_unet(unet, image_encoder, **config)  # bad options fail before any download
    image_proj, ip_weights = split_ip_adapter_checkpoint(
        _read_checkpoint(ip_adapter, weight_name, **dict(hub_kwargs or {}))
    )
    context = cross_attention_layout(unet).cross_attention_dim
    if ip_adapter_kind(image_proj, ip_weights) == "plain":
        kind, derived = "IP-Adapter", linear_projection_options(image_proj)
        width, read, encoder_width = image_proj["norm.weight"].shape[-1], "pooled image embeddings", "projection_dim"
        encoders = "ViT-H/14: 1024, ViT-bigG/14: 1280"
    else:
        # The Resampler has no QK-norm: its blocks compute what the checkpoint's did only without it.
        derived = {**resampler_options(image_proj), "image_feature_layers": [-2], "qformer_qk_norm": False}
        kind = "IP-Adapter-Plus"
        width, read, encoder_width = image_proj["proj_out.weight"].shape[0], "image features", "hidden_size"
        encoders = "ViT-H/14: 1280, ViT-bigG/14: 1664"
    if width != context:
        raise AdapterLoadError(
            f"This {kind} checkpoint makes tokens of width {width} ({_family_of_width(width)}), but the UNet's "
            f"cross-attention reads width {context}: use the checkpoint made for this base model."
        )
    actual = getattr(image_encoder.config, encoder_width, None) if image_encoder is not None else None
    if actual is not None and actual != derived["image_embed_dim"]:
        raise AdapterLoadError(
            f"This {kind} checkpoint reads {read} of width {derived['image_embed_dim']}, but the image encoder has "
            f"{encoder_width} {actual}: use the image encoder it was trained with ({encoders})."
        )
    adapter = CustomContrastAdapter.from_unet(
        unet, image_encoder, init_from_unet=False, **_options(derived, config, kind)
    )
    load_projection = load_linear_projection if kind == "IP-Adapter" else load_resampler
    load_projection(adapter, image_proj)
    return load_ip_adapter_attention(adapter, {"ip_adapter": ip_weights})


@torch.no_grad()
def ip_adapter_state_dict(adapter: CustomContrastAdapter) -> dict[str, torch.Tensor]:
    """The adapter's IP-Adapter(-Plus) part as an original-layout checkpoint: the inverse of
    :func:`adapter_from_ip_adapter`.

    The flat layout of h94/IP-Adapter's ``.safetensors`` files, which diffusers' ``load_ip_adapter`` reads and
    :func:`adapter_from_ip_adapter` converts back: ``image_proj.*`` (from a Resampler visual Q-Former, IP-Adapter-Plus's
    Resampler without the visual CLS query; from a linear visual projection, plain IP-Adapter's ``proj`` and
    ``norm``) and ``ip_adapter.{2i+1}.to_k_ip.weight`` / ``.to_v_ip.weight`` for cross-attention layer i. Write it
    with ``safetensors.torch.save_file``. diffusers' loader builds Resamplers of depth 4 only (``visual_depth``).

    The checkpoint computes what the adapter computes while everything CustomContrast adds is still a no-op (TV
    fusion projection zero, location gates open, S+ scale 0): a converted adapter, or one trained with those parts
    frozen. Otherwise it is the IP-Adapter inside the adapter, without what the added parts do.

    Raises:
        ValueError: the visual Q-Former's heads are not 64 wide (IP-Adapter-Plus checkpoints do not record the head
            count, and every reader of them assumes 64-wide heads), or it has QK-norm (``qformer_qk_norm``).
    """
    config = adapter.adapter_config
    projection = adapter.encoder.visual_qformer
    if config.visual_projection == "linear":
        image_proj = dict(projection.proj.named_parameters("proj")) | dict(projection.norm.named_parameters("norm"))
    else:
        if config.hidden_size != config.num_heads * HEAD_DIM:
            raise ValueError(
                f"IP-Adapter-Plus checkpoints are read with {HEAD_DIM}-wide Resampler heads, but this adapter's visual "
                f"Q-Former has {config.num_heads} heads of {config.hidden_size // config.num_heads}: export an adapter "
                f"with num_heads = hidden_size / {HEAD_DIM}."
            )
        if config.qformer_qk_norm:
            raise ValueError(
                "This adapter's visual Q-Former RMS-normalises its queries and keys (qformer_qk_norm=True), which "
                "IP-Adapter-Plus's Resampler does not: only an adapter built with qformer_qk_norm=False (as converted "
                "ones are) exports to an IP-Adapter-Plus checkpoint."
            )
        # The latents are the queries' rows 1..; row 0, the visual CLS, is CustomContrast's own.
        image_proj = {"latents": projection.queries[1:].unsqueeze(0)}
        for name, parameter in projection.named_parameters():
            if name != "queries":
                image_proj[_renamed(name, _RESAMPLER_EXPORT_KEYS)] = parameter
    state_dict = {f"image_proj.{key}": value for key, value in image_proj.items()}
    for index, layer in enumerate(adapter.layers):
        for name in ("to_k_ip", "to_v_ip"):
            state_dict[f"ip_adapter.{_attention_key(index, name)}"] = getattr(layer, name).weight
    # Copies: safetensors writes only contiguous tensors that share no memory (the latents are a view).
    return {key: value.detach().clone().contiguous() for key, value in state_dict.items()}


def _family_of_width(width: int) -> str:
    return {768: "an SD1.5 checkpoint", 1024: "an SD2 checkpoint", 2048: "an SDXL checkpoint"}.get(
        width, "another base model's"
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the example kept as written."""


def main(argv: list[str] | None = None) -> Path:
    """Command line: write a converted adapter folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    parser = argparse.ArgumentParser(
        prog="python -m diffusers_customcontrast.convert",
        description=" ".join(__doc__.split("\n\n")[0].split()).replace("``", ""),
        epilog="example (IP-Adapter-Plus for SD1.5 from h94/IP-Adapter):\n"
        "  python -m diffusers_customcontrast.convert --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\\n"
        "      --ip_adapter h94/IP-Adapter --subfolder models --weight_name ip-adapter-plus_sd15.safetensors \\\n"
        "      --image_encoder h94/IP-Adapter --output_dir customcontrast-from-plus\n"
        "(plain IP-Adapter the same way: --weight_name ip-adapter_sd15.safetensors)",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--base_model", required=True, help="hub id or folder of the base pipeline (its unet/ is read)"
    )
    parser.add_argument(
        "--ip_adapter",
        required=True,
        help="the IP-Adapter checkpoint: a .bin / .safetensors file, or a hub repository or folder with --weight_name",
    )
    parser.add_argument("--weight_name", default=None, help="file name of the checkpoint inside --ip_adapter")
    parser.add_argument(
        "--subfolder", default=None, help="folder of the checkpoint inside --ip_adapter (hub: 'models')"
    )
    parser.add_argument(
        "--image_encoder",
        default=None,
        help="hub id or folder of the CLIP image encoder the checkpoint was trained with; saved beside the adapter",
    )
    parser.add_argument(
        "--image_encoder_subfolder", default="models/image_encoder", help="folder of the encoder in --image_encoder"
    )
    parser.add_argument("--output_dir", required=True, help="where the converted adapter folder is written")
    parser.add_argument(
        "--adapter_config",
        default="{}",
        help="JSON object of further CustomContrastAdapterConfig options (shapes come from the checkpoint)",
    )
    parser.add_argument("--local_files_only", action="store_true", help="use only local files and the hub cache")
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
    logger.info("Wrote a CustomContrast adapter converted from IP-Adapter to %s", args.output_dir)
    return Path(args.output_dir)
