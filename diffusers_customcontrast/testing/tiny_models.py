"""Tiny random-weight diffusers pipelines, built in-process with no network access.

They mirror the architecture of SD1.5 / SDXL (and their ControlNet variants) at a width of 32-64 channels,
so that tests and examples run in well under a second per image on a CPU. Every builder
is deterministic given ``seed`` and leaves the global torch RNG untouched. The images they produce are
noise: use them to check plumbing, never quality.

img2img and inpainting variants come from ``from_pipe``, e.g.
``StableDiffusionXLInpaintPipeline.from_pipe(tiny_sdxl_pipeline())``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

__all__ = [
    "TINY_ADAPTER_CONFIG",
    "make_subject_image",
    "tiny_adapter",
    "tiny_clip_tokenizer",
    "tiny_controlnet",
    "tiny_image_encoder",
    "tiny_sd15_controlnet_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_controlnet_pipeline",
    "tiny_sdxl_pipeline",
]

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_TEXT_HIDDEN = 32  # width of every tiny CLIP text encoder
_SUBJECT_COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 160, 20), (150, 50, 190), (20, 170, 180)]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_clip_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer:
    """Build a CLIP tokenizer over a byte-level vocabulary, with no files.

    Every byte symbol exists both alone and with CLIP's ``</w>`` end-of-word suffix, so any text tokenizes
    without unknown tokens (one token per byte). Each of ``words`` (lower-case, no spaces) gets BPE merges that make
    it a single token; other words still fall back to bytes. Ids: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [_BOS, _EOS, *alphabet, *(f"{s}</w>" for s in alphabet)]
    merges = _whole_word_merges(words)
    symbols += [left + right for left, right in merges]
    vocab = {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _whole_word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word of ``words`` is one token.

    Each new merge joins the first pair left in a word and ranks last, so it cannot split a word made whole before.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        while len(parts := _apply_merges(word, ranks)) > 1:
            ranks[parts[0], parts[1]] = len(merges)
            merges.append((parts[0], parts[1]))
    return merges


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = [*word[:-1], f"{word[-1]}</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_image_encoder(
    seed: int = 0, hidden_size: int = 32, image_size: int = 224
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """Build a tiny CLIP vision encoder (projection_dim 32) and its matching image processor.

    ``hidden_size`` can be changed to exercise width mismatches between an adapter and its encoder.
    """
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
    )
    with _seeded(seed):
        encoder = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
    return encoder, processor


def _tiny_vae(seed: int) -> AutoencoderKL:
    # Two blocks give a VAE scale factor of 2: 64 px images <-> 32 px latents, the UNets' sample_size.
    with _seeded(seed):
        return AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )


def _image_encoder_components(seed: int, enabled: bool) -> dict[str, object]:
    if not enabled:
        return {"image_encoder": None, "feature_extractor": None}
    encoder, processor = tiny_image_encoder(seed)
    return {"image_encoder": encoder, "feature_extractor": processor}


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    if dtype != torch.float32:  # as in tiny_controlnet: skip the no-op cast and its warnings
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(
    seed: int = 0,
    *,
    image_encoder: bool = True,
    cross_attention_dim: int = 32,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """Build a tiny SD1.5-like text-to-image pipeline (64x64 images, 11 cross-attention layers).

    Args:
        seed: seed for all random weights.
        image_encoder: also attach a tiny CLIP image encoder and feature extractor (needed by image adapters).
        cross_attention_dim: width of the UNet's cross-attention context. The text encoder is 32 wide, so
            values other than 32 only suit tests that bypass it with ``prompt_embeds``.
        dtype: dtype of every module.
    """
    # Both resolutions carry cross-attention so adapters have several layers (down, mid and up) to patch.
    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    tokenizer = tiny_clip_tokenizer()
    with _seeded(seed + 1):
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer)).eval()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,  # as in SD1.5's own scheduler config; 0 triggers a deprecation warning
        ),
        safety_checker=None,
        requires_safety_checker=False,
        **_image_encoder_components(seed + 3, image_encoder),
    )
    return _finish(pipe, dtype)


def tiny_sdxl_pipeline(
    seed: int = 0, *, image_encoder: bool = True, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """Build a tiny SDXL-like text-to-image pipeline (64x64 images, two text encoders, 12 cross-attention layers)."""
    text_embeds_dim = 32  # projection_dim of text_encoder_2, the pooled embedding fed to "text_time"
    time_embed_dim = 8
    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 2),
            # Six micro-conditioning numbers (original size, crop, target size), each embedded separately.
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_embeds_dim,
            cross_attention_dim=2 * _TEXT_HIDDEN,  # both text encoders' hidden states, concatenated
            norm_num_groups=8,
        )
    tokenizer = tiny_clip_tokenizer()
    text_config = _tiny_text_config(tokenizer)
    with _seeded(seed + 1):
        text_encoder = CLIPTextModel(text_config).eval()
    with _seeded(seed + 4):
        text_encoder_2 = CLIPTextModelWithProjection(text_config).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed + 2),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
        **_image_encoder_components(seed + 3, image_encoder),
    )
    return _finish(pipe, dtype)


def tiny_controlnet(pipe: DiffusionPipeline | UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """Build a ControlNet matching a tiny pipeline's UNet (or a bare UNet), initialised from its weights.

    The zero-initialised convolutions get small random weights instead, so that the control image visibly
    changes the output, which is what tests need to see.
    """
    unet = getattr(pipe, "unet", pipe)
    with _seeded(seed), torch.no_grad():
        # Two conditioning stages downsample the control image by 2, the tiny VAE's scale factor.
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block]
        for conv in [*zero_convs, *controlnet.controlnet_down_blocks]:
            torch.nn.init.normal_(conv.weight, std=0.1)
            torch.nn.init.normal_(conv.bias, std=0.1)
    # Modules are built in float32; diffusers logs a warning for every cast, even a no-op one.
    return controlnet if unet.dtype == torch.float32 else controlnet.to(dtype=unet.dtype)


def tiny_sd15_controlnet_pipeline(seed: int = 0, **kwargs) -> StableDiffusionControlNetPipeline:
    """Build ``tiny_sd15_pipeline(seed, **kwargs)`` with a ``tiny_controlnet`` attached."""
    pipe = tiny_sd15_pipeline(seed, **kwargs)
    controlnet_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=tiny_controlnet(pipe, seed))
    controlnet_pipe.set_progress_bar_config(disable=True)
    return controlnet_pipe


def tiny_sdxl_controlnet_pipeline(seed: int = 0, **kwargs) -> StableDiffusionXLControlNetPipeline:
    """Build ``tiny_sdxl_pipeline(seed, **kwargs)`` with a ``tiny_controlnet`` attached."""
    pipe = tiny_sdxl_pipeline(seed, **kwargs)
    controlnet_pipe = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=tiny_controlnet(pipe, seed))
    controlnet_pipe.set_progress_bar_config(disable=True)
    return controlnet_pipe


def make_subject_image(seed: int, size: int = 64) -> Image.Image:
    """Draw a coloured ellipse, rectangle or triangle on white; shape, colour and placement depend on ``seed``."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.4, 0.7) * size
    left, top = (rng.uniform(0, size - extent) for _ in range(2))
    box = (left, top, left + extent, top + extent)
    colour = rng.choice(_SUBJECT_COLOURS)
    shape = rng.choice(("ellipse", "rectangle", "triangle"))
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + extent / 2, top), (left + extent, top + extent), (left, top + extent)], fill=colour)
    return image


# A CustomContrast adapter shape that keeps the tiny pipelines fast (the defaults are sized for real models).
TINY_ADAPTER_CONFIG: dict = {
    "hidden_size": 32,
    "num_heads": 4,
    "visual_depth": 1,
    "textual_depth": 1,
    "num_visual_tokens": 4,
    "num_textual_tokens": 4,
    "timestep_embed_dim": 32,
}


def tiny_adapter(pipe: DiffusionPipeline, seed: int = 0, **config):
    """A fresh, randomly initialised CustomContrast adapter sized for ``pipe`` (``TINY_ADAPTER_CONFIG`` + ``config``)."""
    from ..models.adapter import CustomContrastAdapter

    with _seeded(seed):
        return CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, **{**TINY_ADAPTER_CONFIG, **config})
