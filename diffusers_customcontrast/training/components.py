"""The frozen base model of a training run and the trainable modules built on it.

:class:`BaseModel` holds the pipeline parts the objective needs (VAE, text encoder(s) and tokenizer(s), UNet, noise
scheduler, CLIP image encoder and its processor), loaded the way diffusers loads them: from a hub id or a local
folder, with ``revision`` and ``variant``. :func:`build_adapter` makes the adapter; :func:`add_unet_lora` the
optional LoRA.
"""

from __future__ import annotations

import importlib
import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import constants as hf_constants
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ..models.adapter import CustomContrastAdapter
from .config import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)

__all__ = ["BaseModel", "add_unet_lora", "build_adapter", "load_base_model", "weight_dtype_for"]


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion (1.5 or XL) pipeline plus the CLIP image encoder.

    ``text_encoders`` / ``tokenizers`` hold one entry for SD1.5 and two for SDXL (the second with projection, whose
    pooled output feeds the UNet's ``text_embeds``). ``pipeline_class`` and ``scheduler_class`` name the classes
    the base model ships with (for validation pipelines). ``source`` says where it was loaded from.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: DDPMScheduler
    image_encoder: CLIPVisionModelWithProjection
    image_processor: CLIPImageProcessor
    pipeline_class: str = "StableDiffusionPipeline"
    scheduler_class: str = "DDIMScheduler"
    scheduler_config: dict = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = False
    source: str | None = None
    image_encoder_source: str | None = None

    @property
    def is_sdxl(self) -> bool:
        """SDXL-style conditioning: two text encoders, pooled ``text_embeds`` and ``time_ids``."""
        return len(self.text_encoders) == 2

    @property
    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.unet, *self.text_encoders, self.image_encoder]

    @classmethod
    def from_pipeline(
        cls,
        pipe: DiffusionPipeline,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        image_processor: CLIPImageProcessor | None = None,
        source: str | None = None,
    ) -> BaseModel:
        """Take the modules of an in-memory pipeline (shared, not copied); e.g. one of :mod:`..testing.tiny_models`."""
        image_encoder = image_encoder if image_encoder is not None else getattr(pipe, "image_encoder", None)
        if image_encoder is None:
            raise ConfigError("The pipeline has no image_encoder: pass a CLIP vision model as image_encoder.")
        image_processor = image_processor or getattr(pipe, "feature_extractor", None)
        text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
        return cls(
            vae=pipe.vae,
            unet=pipe.unet,
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            image_encoder=image_encoder,
            image_processor=image_processor or _default_image_processor(image_encoder),
            pipeline_class=type(pipe).__name__,
            scheduler_class=type(pipe.scheduler).__name__,
            scheduler_config=dict(pipe.scheduler.config),
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
            source=source,
        )

    def freeze(
        self, device: torch.device | str, weight_dtype: torch.dtype, vae_dtype: torch.dtype | None = None
    ) -> None:
        """Freeze every module (no grad, eval mode) and move it to ``device`` in ``weight_dtype``.

        Call before the adapter is attached or LoRA is added: afterwards a dtype cast of the UNet would also cast
        the trainable modules that live inside it.
        """
        for module in self.frozen_modules:
            module.requires_grad_(False)
            module.eval()
        for module in (self.unet, *self.text_encoders, self.image_encoder):
            _move(module, device, weight_dtype)
        _move(self.vae, device, vae_dtype or weight_dtype)

    def validation_scheduler(self):
        """A fresh instance of the scheduler the base model ships with (for sampling), from its config."""
        import diffusers

        scheduler_cls = getattr(diffusers, self.scheduler_class, None) or diffusers.DDIMScheduler
        return scheduler_cls.from_config(self.scheduler_config)


def _move(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    # nn.Module.to rather than ModelMixin.to, which warns on every cast (diffusers 0.42); skip no-op casts.
    current = next(module.parameters(), None)
    if current is not None and (current.dtype != dtype or current.device != torch.device(device)):
        nn.Module.to(module, device=device, dtype=dtype)


def _default_image_processor(image_encoder: nn.Module) -> CLIPImageProcessor:
    # OpenAI CLIP normalisation at the encoder's resolution: what loaders/pipeline.py gives pipelines without one.
    size = image_encoder.config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The dtype of the frozen modules for accelerate's ``mixed_precision`` setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


# ---------------------------------------------------------------------------------------------------- loading


_TRUSTED_LIBRARIES = ("diffusers", "transformers")


def _component_class(spec: Any, default: type) -> type:
    """The class that ``model_index.json`` names for a component (``["transformers", "CLIPTextModel"]``).

    As diffusers does, a module other than ``diffusers`` or ``transformers`` is never imported on a file's word (that
    would run its code): its class is found only if the caller imported the module first (e.g. the synthetic world's
    autoencoder, ``["customcontrast_world.autoencoder", "PatchAutoencoder"]``).
    """
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
        library, name = spec
        module = importlib.import_module(library) if library in _TRUSTED_LIBRARIES else sys.modules.get(library)
        if module is None:
            raise ConfigError(
                f"The base model's model_index.json names {library}.{name}, from a module that is not imported: "
                f"import {library} before training (modules other than diffusers and transformers are never "
                "imported on a file's word)."
            )
        if isinstance(getattr(module, name, None), type):
            return getattr(module, name)
        logger.warning("Cannot find %s.%s named in model_index.json; using %s.", library, name, default.__name__)
    return default


def _split_hub_path(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """``org/repo/sub/folder`` (not a local path) -> (``org/repo``, ``sub/folder``): hub ids have two parts."""
    parts = path.split("/")
    if subfolder is None and not Path(path).exists() and len(parts) > 2 and not path.startswith((".", "/")):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return path, subfolder


def _require_reachable(source: str, revision: str | None) -> None:
    """Refuse, in one sentence, a base model that is neither a folder, nor cached, nor reachable on the hub.

    Without this check the hub client retries for half a minute before a long traceback.
    """
    if Path(source).is_dir():
        return
    try:
        DiffusionPipeline.load_config(source, revision=revision, local_files_only=True)
        return  # in the Hugging Face cache
    except OSError:
        pass
    host = urlparse(hf_constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise ConfigError(
            f"The base model '{source}' is not a local folder and not in the Hugging Face cache, and {host} cannot "
            "be reached from this machine: download it where there is network (hf download "
            f"{source} --local-dir <folder>) and pass that folder as pretrained_model_name_or_path."
        ) from None


def load_base_model(config: TrainingConfig) -> BaseModel:
    """Load the base pipeline's modules and the image encoder named by ``config`` (nothing frozen or moved yet)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = config.pretrained_model_name_or_path
    hub = {"revision": config.revision}
    _require_reachable(source, config.revision)
    try:
        index = DiffusionPipeline.load_config(source, **hub)
    except OSError as error:
        raise ConfigError(
            f"Cannot read model_index.json of the base model '{source}': give a diffusers pipeline folder or hub id "
            f"({error})."
        ) from error
    is_sdxl = isinstance(index.get("text_encoder_2"), (list, tuple)) and index["text_encoder_2"][0] is not None

    tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)]
    text_encoders = [
        _component_class(index.get("text_encoder"), CLIPTextModel).from_pretrained(
            source, subfolder="text_encoder", variant=config.variant, **hub
        )
    ]
    if is_sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub))
        text_encoders.append(
            _component_class(index.get("text_encoder_2"), CLIPTextModelWithProjection).from_pretrained(
                source, subfolder="text_encoder_2", variant=config.variant, **hub
            )
        )
    if config.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(config.pretrained_vae_model_name_or_path)
    else:
        vae = _component_class(index.get("vae"), AutoencoderKL).from_pretrained(
            source, subfolder="vae", variant=config.variant, **hub
        )
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=config.variant, **hub)

    scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler", **hub)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)

    image_encoder, encoder_source = _load_image_encoder(config, index)
    image_processor = _load_image_processor(source, index, image_encoder, hub)
    scheduler_spec = index.get("scheduler")
    return BaseModel(
        vae=vae,
        unet=unet,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        image_encoder=image_encoder,
        image_processor=image_processor,
        pipeline_class=index.get("_class_name", "StableDiffusionPipeline"),
        scheduler_class=scheduler_spec[1] if isinstance(scheduler_spec, (list, tuple)) else "DDIMScheduler",
        scheduler_config=dict(scheduler_config),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", is_sdxl)),
        source=source,
        image_encoder_source=encoder_source,
    )


def _load_image_encoder(config: TrainingConfig, index: dict) -> tuple[CLIPVisionModelWithProjection, str]:
    if config.image_encoder_path:
        path, subfolder = _split_hub_path(config.image_encoder_path, config.image_encoder_subfolder)
        encoder = CLIPVisionModelWithProjection.from_pretrained(path, subfolder=subfolder or "")
        return encoder, "/".join(p for p in (path, subfolder) if p)
    spec = index.get("image_encoder")
    if not (isinstance(spec, (list, tuple)) and spec[0] is not None):
        raise ConfigError(
            f"The base model '{config.pretrained_model_name_or_path}' has no image_encoder: set image_encoder_path "
            "(e.g. h94/IP-Adapter with image_encoder_subfolder models/image_encoder for SD1.5)."
        )
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        config.pretrained_model_name_or_path, subfolder="image_encoder", revision=config.revision
    )
    return encoder, f"{config.pretrained_model_name_or_path}/image_encoder"


def _load_image_processor(source: str, index: dict, image_encoder: nn.Module, hub: dict) -> CLIPImageProcessor:
    """The base pipeline's ``feature_extractor`` (what it preprocesses ``ip_adapter_image`` with), else CLIP's."""
    spec = index.get("feature_extractor")
    if isinstance(spec, (list, tuple)) and spec[0] is not None:
        try:
            processor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor", **hub)
            if (
                getattr(processor, "image_mean", None) is not None
                and getattr(processor, "image_std", None) is not None
            ):
                return processor
        except (OSError, ValueError) as error:
            logger.warning("Cannot read the base model's feature_extractor (%s); using CLIP's defaults.", error)
    return _default_image_processor(image_encoder)


# ---------------------------------------------------------------------------------------------------- trainables


def adapter_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """The :class:`~diffusers_customcontrast.models.CustomContrastAdapterConfig` options of a run's new adapter."""
    if config.image_feature_layers is None:  # unset: the adapter's default for its image input
        return dict(config.adapter)
    return {**config.adapter, "image_feature_layers": list(config.image_feature_layers)}


def build_adapter(config: TrainingConfig, base: BaseModel) -> CustomContrastAdapter:
    """A float32 adapter for ``base.unet``: new, converted from an IP-Adapter(-Plus) checkpoint, or pretrained.

    Build it after :func:`add_unet_lora`: the LoRA targets are matched by module name, and the adapter's own
    ``to_q``/``to_k`` projections must not get one once it lives inside the UNet.
    """
    if config.pretrained_adapter_name_or_path:
        from ..loaders.serialization import load_adapter

        adapter = load_adapter(config.pretrained_adapter_name_or_path)
        adapter.check_compatible(base.unet, base.image_encoder)
    elif config.init_from_ip_adapter:
        from ..loaders.convert import adapter_from_ip_adapter

        # IP-Adapter-Plus converts whole (the run starts at its loss); plain IP-Adapter gives its to_k_ip / to_v_ip.
        adapter = adapter_from_ip_adapter(
            base.unet,
            config.init_from_ip_adapter,
            base.image_encoder,
            config.ip_adapter_weight_name,
            hub_kwargs={"subfolder": config.ip_adapter_subfolder} if config.ip_adapter_subfolder else None,
            image_encoder=base.image_encoder_source,
            **adapter_kwargs(config),
        )
    else:
        adapter = CustomContrastAdapter.from_unet(
            base.unet,
            base.image_encoder,
            # Informative: the model card and a later load say which encoder the adapter was trained with.
            image_encoder=base.image_encoder_source,
            **adapter_kwargs(config),
        )
    return nn.Module.to(adapter, device=base.unet.device, dtype=torch.float32).train()


def add_unet_lora(unet: UNet2DConditionModel, config: TrainingConfig) -> list[nn.Parameter]:
    """Add a trainable LoRA (peft) to the frozen UNet's attention projections; returns its parameters (fp32)."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_target_modules),
        )
    )
    parameters = [p for p in unet.parameters() if p.requires_grad]
    for p in parameters:
        # peft creates them in the base layer's dtype; fp16 trainables would break the gradient scaler.
        p.data = p.data.float()
    return parameters
