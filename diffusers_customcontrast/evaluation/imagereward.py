"""ImageReward (Xu et al., NeurIPS 2023), the paper's second controllability metric, on transformers' BLIP modules.

The published reward model (hub ``THUDM/ImageReward``: ``ImageReward.pt`` and ``med_config.json``) is BLIP:

* a ViT image encoder (ViT-L/16 at 224 px) whose last hidden states, after its final layer norm, are the image
  tokens;
* a BERT text encoder (configured by ``med_config.json``, no token-type embeddings) in which every layer
  cross-attends to all image tokens;
* an MLP head on the text encoder's first token ([CLS]): five ``Linear`` layers with dropout and no activation
  between them;

and the reward is the head's output normalised by the mean and std the authors published. The ``image-reward``
package that ships it does not run with transformers 5, so this module maps the checkpoint onto
``BlipVisionModel`` and ``BlipTextModel`` (which have the same maths) by renaming keys. The checkpoint is read
with ``torch.load(weights_only=True)``, which loads tensors and never unpickles code, or from the safetensors file
that :func:`convert_image_reward_checkpoint` writes (``python -m diffusers_customcontrast.evaluation.imagereward``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from .preprocessing import CLIP_MEAN, CLIP_STD, resize_crop_normalize
from .sources import check_model_source

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_REWARD_MODEL = "THUDM/ImageReward"
DEFAULT_IMAGE_REWARD_TOKENIZER = "bert-base-uncased"
CHECKPOINT_NAME = "ImageReward.pt"
SAFETENSORS_NAME = "ImageReward.safetensors"
MED_CONFIG_NAME = "med_config.json"

# The published normalisation of the raw head output.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# Prompts are padded / truncated to this many tokens.
MAX_TEXT_LENGTH = 35
# The original tokenizer is bert-base-uncased plus these two tokens (ids 30522 and 30523; 30524 rows in the
# checkpoint's word embeddings). Scoring uses neither, but the vocabulary must match the embeddings.
ADDED_SPECIAL_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}
# Positions of the head's Linear layers in the original nn.Sequential (dropouts sit at 1, 3 and 5).
HEAD_LINEAR_POSITIONS = (0, 2, 4, 6, 7)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)
# BLIP's ViTs (base 768 / 12 heads, large 1024 / 16 heads) have 64-wide attention heads; the head count is not
# visible in the checkpoint's shapes.
VISION_HEAD_WIDTH = 64
VISION_LAYER_NORM_EPS = 1e-6

# Original key prefix <-> prefix in this module's state dict ("{}" is a layer number); the rest of a key is kept.
_KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{}.norm1.", "vision_model.encoder.layers.{}.layer_norm1."),
    ("blip.visual_encoder.blocks.{}.norm2.", "vision_model.encoder.layers.{}.layer_norm2."),
    ("blip.visual_encoder.blocks.{}.attn.qkv.", "vision_model.encoder.layers.{}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{}.attn.proj.", "vision_model.encoder.layers.{}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{}.mlp.", "vision_model.encoder.layers.{}.mlp."),
    ("blip.visual_encoder.norm.", "vision_model.post_layernorm."),
    # BLIP's BERT and transformers' BlipTextModel share their key names.
    ("blip.text_encoder.", "text_model."),
    ("mlp.layers.", "head."),
)
# Parts of the checkpoint that scoring does not use: BLIP's contrastive projections and an old position-id buffer.
_UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def _rename(key: str, to_original: bool) -> str | None:
    for original, ours in _KEY_PREFIXES:
        source, target = (ours, original) if to_original else (original, ours)
        match = re.match(re.escape(source).replace(r"\{\}", r"(\d+)"), key)
        if match:
            return target.format(*match.groups()) + key[match.end() :]
    return None


class ImageReward(nn.Module):
    """The ImageReward model: BLIP image and text encoders and the reward head.

    Args:
        vision_config: Configuration of the ViT image encoder.
        text_config: Configuration of the text encoder; ``is_decoder=True`` (which gives ``BlipTextModel`` its
            cross-attention layers) and ``encoder_hidden_size`` equal to the image encoder's width.
        head_widths: Output widths of the head's first four Linear layers (published: 1024, 128, 64, 16).
        reward_mean: Mean subtracted from the raw head output.
        reward_std: Std the centred output is divided by.
    """

    def __init__(
        self,
        vision_config: BlipVisionConfig,
        text_config: BlipTextConfig,
        head_widths: Sequence[int] = (1024, 128, 64, 16),
        reward_mean: float = REWARD_MEAN,
        reward_std: float = REWARD_STD,
    ) -> None:
        super().__init__()
        if not text_config.is_decoder or text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(
                "text_config needs is_decoder=True and encoder_hidden_size equal to the image encoder's width "
                f"({vision_config.hidden_size}); got is_decoder={text_config.is_decoder}, "
                f"encoder_hidden_size={text_config.encoder_hidden_size}."
            )
        if len(head_widths) != 4:
            raise ValueError(f"head_widths must have the 4 hidden widths of the published head, got {head_widths}.")
        self.vision_model = BlipVisionModel(vision_config)
        self.text_model = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = _reward_head(text_config.hidden_size, head_widths)
        self.reward_mean = reward_mean
        self.reward_std = reward_std

    @property
    def image_size(self) -> int:
        """Side of the square input images."""
        return self.vision_model.config.image_size

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised rewards, shape ``(batch,)``, float32.

        Args:
            pixel_values: Preprocessed images (:func:`image_reward_preprocess`), ``(batch, 3, size, size)``.
            input_ids: Prompt tokens padded to a common length, ``(batch, length)``.
            attention_mask: 1 for prompt tokens, 0 for padding, ``(batch, length)``.
        """
        image_tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state
        # Every image token is attended to (the original passes an all-ones mask), so no encoder mask is needed;
        # is_decoder=False runs the text model bidirectionally, as the original's encoder mode does.
        text_tokens = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            is_decoder=False,
        ).last_hidden_state
        raw = self.head(text_tokens[:, 0].float()).squeeze(-1)
        return (raw - self.reward_mean) / self.reward_std

    @classmethod
    def from_original_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        med_config: Mapping[str, Any],
        vision_num_attention_heads: int | None = None,
    ) -> ImageReward:
        """Build the model from a state dict in the layout of the published ``ImageReward.pt``.

        Args:
            state_dict: The original keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``).
            med_config: The contents of ``med_config.json`` (a BERT configuration).
            vision_num_attention_heads: Heads of the image encoder; default its width / 64, as in BLIP's ViTs.

        Raises:
            ValueError: If the state dict is not an ImageReward checkpoint or does not match ``med_config``.
        """
        vision_config = _vision_config(state_dict, vision_num_attention_heads)
        text_config = _text_config(med_config, vision_config.hidden_size)
        head_widths = [_require(state_dict, f"mlp.layers.{i}.weight").shape[0] for i in HEAD_LINEAR_POSITIONS[:4]]
        model = cls(vision_config, text_config, head_widths)
        model.load_state_dict(_checked(convert_original_keys(state_dict), model.state_dict()))
        return model.eval()

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the key names of the published ``ImageReward.pt``."""
        return {_rename(key, to_original=True): tensor for key, tensor in self.state_dict().items()}

    def med_config(self) -> dict[str, Any]:
        """The ``med_config.json`` (BERT configuration) of this model's text encoder."""
        config = self.text_model.config
        names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        extra = ("max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            **{name: getattr(config, name) for name in (*names, *extra)},
            "encoder_width": config.encoder_hidden_size,
            "add_cross_attention": True,
        }


def _reward_head(in_features: int, widths: Sequence[int]) -> nn.Sequential:
    # The published layout: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (the ReLUs of the
    # aesthetic-predictor head it was derived from are commented out in the original, so the head is affine).
    sizes = [in_features, *widths, 1]
    linears = [nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]
    layers: list[nn.Module] = []
    for index, linear in enumerate(linears):
        layers.append(linear)
        if index < len(HEAD_DROPOUTS):
            layers.append(nn.Dropout(HEAD_DROPOUTS[index]))
    return nn.Sequential(*layers)


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"Not an ImageReward checkpoint: it has no {key!r}.")
    return state_dict[key]


def _vision_config(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None) -> BlipVisionConfig:
    prefix = "blip.visual_encoder."
    patch_weight = _require(state_dict, prefix + "patch_embed.proj.weight")
    hidden_size, patch_size = patch_weight.shape[0], patch_weight.shape[-1]
    num_patches = _require(state_dict, prefix + "pos_embed").shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"The image encoder's {num_patches} position embeddings (+ [CLS]) are not a square grid.")
    blocks = {key.split(".")[3] for key in state_dict if key.startswith(prefix + "blocks.")}
    return BlipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=_require(state_dict, prefix + "blocks.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=num_attention_heads or hidden_size // VISION_HEAD_WIDTH,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def _text_config(med_config: Mapping[str, Any], encoder_hidden_size: int) -> BlipTextConfig:
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [name for name in required if name not in med_config]
    if missing:
        raise ValueError(f"med_config.json lacks {missing}: expected the BERT configuration ImageReward ships.")
    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config.get("max_position_embeddings", 512),
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med_config.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med_config.get("attention_probs_dropout_prob", 0.0),
        pad_token_id=med_config.get("pad_token_id", 0),
        # BLIP sets the cross-attention width to the image encoder's, whatever med_config.json says.
        encoder_hidden_size=encoder_hidden_size,
        is_decoder=True,
        # Generation token ids: unused by an encoder, and the defaults name ids of BLIP's captioning vocabulary.
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )


def convert_original_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of an original ImageReward state dict to those of :class:`ImageReward`.

    Keys scoring does not use (BLIP's contrastive projections, position-id buffers) are dropped.

    Raises:
        ValueError: If a key is neither known nor unused.
    """
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        if _UNUSED_KEYS.search(key):
            continue
        new_key = _rename(key, to_original=False)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = tensor
    if unknown:
        raise ValueError(f"Not an ImageReward checkpoint: unknown keys {unknown[:5]} ({len(unknown)} in all).")
    return converted


def _checked(converted: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = sorted(expected.keys() - converted.keys())
    if missing:
        raise ValueError(f"The ImageReward checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}.")
    wrong = [
        f"{key} {tuple(converted[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if converted[key].shape != value.shape
    ]
    if wrong:
        raise ValueError(f"The ImageReward checkpoint does not match med_config.json: {', '.join(wrong[:3])}.")
    return converted


def image_reward_preprocess(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """ImageReward's preprocessing: shorter side to ``size`` (bicubic), centre crop, CLIP mean / std."""
    return resize_crop_normalize(images, resize=size, crop=size, mean=CLIP_MEAN, std=CLIP_STD)


def with_image_reward_tokens(tokenizer: Any) -> Any:
    """Add ImageReward's two special tokens (``[DEC]``, ``[ENC]``) to a BERT tokenizer, as the original does."""
    tokenizer.add_special_tokens(dict(ADDED_SPECIAL_TOKENS))
    return tokenizer


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an ImageReward checkpoint: ``.safetensors``, or a ``torch.save`` file read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} cannot be read as a tensors-only torch checkpoint: {error}") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a state dict of tensors.")
    return dict(state_dict)


def resolve_image_reward_files(
    model: str | os.PathLike = DEFAULT_IMAGE_REWARD_MODEL,
    med_config: str | os.PathLike | None = None,
    *,
    local_files_only: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Find the checkpoint and ``med_config.json`` of an ImageReward model.

    Args:
        model: A checkpoint file (``.pt`` or ``.safetensors``), a folder holding ``ImageReward.safetensors`` or
            ``ImageReward.pt``, or a hub repository id (downloads ``ImageReward.pt``).
        med_config: ``med_config.json``; default the one beside the checkpoint (or in the hub repository).
        local_files_only: Use only the hub cache.
        revision: Hub revision.
        cache_dir: Hub cache folder.

    Returns:
        ``(checkpoint, med_config)`` paths.
    """
    from huggingface_hub import hf_hub_download

    check_model_source(model, "ImageReward model")
    path = Path(os.fspath(model)).expanduser()
    hub_kwargs = {"local_files_only": local_files_only, "revision": revision, "cache_dir": cache_dir}
    if path.exists():
        checkpoint = path if path.is_file() else _checkpoint_in(path)
    else:
        checkpoint = Path(hf_hub_download(os.fspath(model), CHECKPOINT_NAME, **hub_kwargs))
    if med_config is not None:
        config = Path(med_config)
    elif path.exists():
        config = checkpoint.parent / MED_CONFIG_NAME
    else:
        config = Path(hf_hub_download(os.fspath(model), MED_CONFIG_NAME, **hub_kwargs))
    if not config.is_file():
        raise FileNotFoundError(f"No {MED_CONFIG_NAME} at {config}: pass med_config with the model's BERT config.")
    return checkpoint, config


def _checkpoint_in(folder: Path) -> Path:
    for name in (SAFETENSORS_NAME, CHECKPOINT_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {CHECKPOINT_NAME} in {folder}.")


class ImageRewardScorer:
    """ImageReward with its tokenizer and preprocessing: ``scorer(images, prompts)`` gives one reward per image.

    Args:
        model: The reward model.
        tokenizer: Its BERT tokenizer; ImageReward's special tokens are added if missing.
        device: Device of the model; default CUDA when available.
        name: What the model was loaded from, recorded in reports.
    """

    def __init__(
        self, model: ImageReward, tokenizer: Any, *, device: str | torch.device | None = None, name: str | None = None
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = with_image_reward_tokens(tokenizer)
        vocab_size = model.text_model.config.vocab_size
        if len(self.tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the reward model's text encoder only "
                f"{vocab_size}: use the tokenizer the model was trained with ({DEFAULT_IMAGE_REWARD_TOKENIZER})."
            )
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_IMAGE_REWARD_MODEL,
        *,
        med_config: str | os.PathLike | None = None,
        tokenizer: Any = DEFAULT_IMAGE_REWARD_TOKENIZER,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> ImageRewardScorer:
        """Load the reward model from a checkpoint file, a folder or the hub (see :func:`resolve_image_reward_files`).

        Args:
            model: Checkpoint file, folder or hub id.
            med_config: ``med_config.json`` when not beside the checkpoint.
            tokenizer: A tokenizer, or the hub id / folder of one (default bert-base-uncased, as the original).
            device: Device of the model.
            local_files_only: Use only the hub cache.
            revision: Hub revision of the reward model.
            cache_dir: Hub cache folder.
        """
        checkpoint, config = resolve_image_reward_files(
            model, med_config, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir
        )
        reward_model = ImageReward.from_original_state_dict(
            load_original_state_dict(checkpoint), json.loads(config.read_text(encoding="utf-8"))
        )
        if isinstance(tokenizer, str | os.PathLike):
            check_model_source(tokenizer, "ImageReward tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer, local_files_only=local_files_only, cache_dir=cache_dir
            )
        logger.info("Loaded ImageReward from %s", checkpoint)
        return cls(reward_model, tokenizer, device=device, name=os.fspath(model))

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Rewards of ``images[i]`` for ``prompts[i]``, shape ``(len(images),)``, float32 on CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images and {len(prompts)} prompts; expected one prompt per image.")
        if not images:
            return torch.empty(0)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        pixel_values = image_reward_preprocess(images, self.model.image_size)
        rewards = self.model(
            pixel_values.to(self.device),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )
        return rewards.float().cpu()


def convert_image_reward_checkpoint(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    med_config: str | os.PathLike | None = None,
    **hub_kwargs: Any,
) -> Path:
    """Write an ImageReward checkpoint as ``ImageReward.safetensors`` + ``med_config.json`` in ``output_dir``.

    The tensors keep their original names, so the folder loads like the original (and the ``image-reward``
    package's key layout stays recognisable); the model is built once first, so a file that does not convert
    is refused here rather than at scoring time.

    Args:
        model: Checkpoint file, folder or hub id (see :func:`resolve_image_reward_files`).
        output_dir: Folder to write.
        med_config: ``med_config.json`` when not beside the checkpoint.
        **hub_kwargs: ``local_files_only``, ``revision``, ``cache_dir``.

    Returns:
        The safetensors file written.
    """
    from safetensors.torch import save_file

    checkpoint, config = resolve_image_reward_files(model, med_config, **hub_kwargs)
    state_dict = load_original_state_dict(checkpoint)
    ImageReward.from_original_state_dict(state_dict, json.loads(config.read_text(encoding="utf-8")))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / SAFETENSORS_NAME
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, str(target))
    shutil.copyfile(config, output_dir / MED_CONFIG_NAME)
    return target


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m diffusers_customcontrast.evaluation.imagereward``: convert a checkpoint to safetensors."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_customcontrast.evaluation.imagereward",
        description="Convert the ImageReward checkpoint (ImageReward.pt, a pickle) to ImageReward.safetensors.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_IMAGE_REWARD_MODEL,
        help="Checkpoint file, folder holding ImageReward.pt, or hub id (default: %(default)s).",
    )
    parser.add_argument("--med_config", help="med_config.json (default: the one beside the checkpoint).")
    parser.add_argument("--output_dir", required=True, help="Folder for ImageReward.safetensors and med_config.json.")
    parser.add_argument("--local_files_only", action="store_true", help="Use only the hub cache (default: off).")
    args = parser.parse_args(argv)
    target = convert_image_reward_checkpoint(
        args.model, args.output_dir, args.med_config, local_files_only=args.local_files_only
    )
    print(target)
    return target


if __name__ == "__main__":
    main()
