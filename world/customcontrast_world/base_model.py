"""The synthetic base model: a tiny Stable-Diffusion-style text-to-image pipeline trained on the world.

:func:`load_synthetic_base` loads the shipped checkpoint (``customcontrast_world/assets/synthetic-base``, a
``save_pretrained`` folder that ``StableDiffusionPipeline.from_pretrained`` also reads). The ``build_*`` functions
make the untrained components with the shipped architecture; :mod:`customcontrast_world.train_base`
trains them (and reproduces the checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from diffusers_customcontrast.data.synthetic import caption_words
from diffusers_customcontrast.testing.tiny_models import tiny_clip_tokenizer

from .autoencoder import PatchAutoencoder

SYNTHETIC_BASE_DIR: Path = Path(__file__).resolve().parent / "assets" / "synthetic-base"
"""Folder of the shipped synthetic base pipeline."""
PROJECTED_AUTOENCODER_DIR: Path = Path(__file__).resolve().parent / "assets" / "projected-autoencoder"
"""The projected autoencoder trained by ``train_base --stages vae --autoencoder projected`` (seed 0, one thread;
``world/logs/projected-autoencoder.train_log.json``): load it with ``PatchAutoencoder.from_pretrained``. No shipped
base uses it yet (the base is v4, on its VAE); it is the autoencoder of the next one."""

IMAGE_SIZE = 64
VAE_FACTOR = 4  # 64 px images <-> 16 x 16 latents
LATENT_CHANNELS = 8
TEXT_HIDDEN = 64
MAX_PROMPT_TOKENS = 77  # CLIP's length; the world's captions take at most 19 tokens
IMAGE_ENCODER_SIZE = 64

# Noise schedule (our choice): DDPM's linear betas reach a terminal SNR near zero (4e-5), so sampling starts from
# pure noise as in training. v-prediction rather than SD1.5's epsilon: on 32 x 32 latents the global colour of a
# scene can be read off x_t by averaging down to SNR ~ 1e-3, so an epsilon model is trained to take it from the
# noise, not the prompt, and the seed picked the background (measured: the epsilon loss with shuffled captions was
# within 1-4 % of the loss with the right ones, and generated backgrounds ignored the prompt). A v-model must
# predict x_0 at high noise, where only the prompt knows the background.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
}
PREDICTION_TYPE = "v_prediction"


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer in which every word of the world's captions is one token (other text falls back to bytes).

    Whole-word tokens, not bytes: a text encoder over bytes must first learn to spell, and with one token per
    character the class word of a caption is spread over five positions the UNet has to find.
    """
    return tiny_clip_tokenizer(caption_words())


def build_vae() -> AutoencoderKL:
    """A VAE with two downsamplings and 8 channels: 64 px RGB images <-> 16 x 16 x 8 latents.

    Factor 4 rather than SD's 8, so that a subject (13-24 px in radius) spans 6-12 latent pixels; 8 channels
    rather than 4, so that a 4 x 4 patch still holds its stripes or dots. A UNet step on 16 x 16 latents costs a
    quarter of one on 32 x 32 (measured with the previous UNet: 0.28 s against 1.07 s at batch 32 on one thread),
    which is what buys the UNet the steps it needs to learn shapes.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,  # global attention buys nothing on these scenes and costs CPU time
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small CLIP text encoder over the whole-word vocabulary of ``tokenizer`` (see :func:`build_tokenizer`)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_attention_heads=4,
        num_hidden_layers=4,
        projection_dim=TEXT_HIDDEN,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_patch_autoencoder() -> PatchAutoencoder:
    """The exact patch autoencoder on the same 16 x 16 grid: 64 px RGB images <-> 16 x 16 x 48 latents.

    Its statistics are unset (zero mean, unit std) until :meth:`PatchAutoencoder.fit_statistics` sees the scenes.
    """
    return PatchAutoencoder(patch_size=VAE_FACTOR, in_channels=3)


PROJECTED_CHANNELS = 12
"""Latent channels of the projected autoencoder: a 4 x 4 patch's leading principal components (96.8 % of its
variance in the world's scenes)."""


def build_projected_autoencoder() -> PatchAutoencoder:
    """The patch autoencoder projected onto :data:`PROJECTED_CHANNELS` principal components, with a learned decoder
    correction (width 96, 5 convolutions on the 16 x 16 grid, 0.35 M parameters) that ``train_base`` trains to map
    noisy latents onto clean scenes. Unfitted until :meth:`PatchAutoencoder.fit_statistics` sees the scenes."""
    return PatchAutoencoder(
        patch_size=VAE_FACTOR, in_channels=3, latent_channels=PROJECTED_CHANNELS, decoder_channels=96, decoder_layers=4
    )


AUTOENCODERS = {"kl": build_vae, "patch": build_patch_autoencoder, "projected": build_projected_autoencoder}
"""The world's autoencoders by name: ``"kl"`` is learned (base v4's), ``"patch"`` exact, ``"projected"`` a patch
projection with a learned, noise-tolerant decoder (``world.autoencoder``)."""


UNET_CHANNELS = (32, 64, 128)
"""Widths of the UNet's three levels (16 x 16, 8 x 8, 4 x 4) in base v4."""


def build_unet(
    latent_channels: int = LATENT_CHANNELS, block_out_channels: tuple[int, ...] = UNET_CHANNELS
) -> UNet2DConditionModel:
    """An SD1.5-shaped UNet on 16 x 16 latents, with text cross-attention at 8 x 8, 4 x 4 and in the mid block.

    Like SD1.5 (whose lowest resolution has none) one level goes without cross-attention; here it is the
    highest, where attention over 256 positions would cost the most CPU time. 7 cross-attention layers.
    ``latent_channels`` is the autoencoder's (8 for the KL VAE, 48 for the patch autoencoder). The first level
    carries the skip connection the output is made from, so it should be at least as wide as the latents: 32
    suits the 8 KL channels, not the 48 patch channels.
    """
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_FACTOR,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A tiny CLIP vision encoder on 64 px images (8 px patches) and its image processor."""
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=4,
        image_size=IMAGE_ENCODER_SIZE,
        patch_size=8,
        projection_dim=64,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_ENCODER_SIZE},
        crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE},
    )
    return CLIPVisionModelWithProjection(config), processor


def build_train_scheduler(prediction_type: str = PREDICTION_TYPE) -> DDPMScheduler:
    """The noise schedule the UNet is trained with."""
    return DDPMScheduler(**SCHEDULE, prediction_type=prediction_type)


def build_inference_scheduler(prediction_type: str = PREDICTION_TYPE) -> DDIMScheduler:
    """DDIM over the training schedule; trailing spacing starts sampling at t = T, from pure noise."""
    return DDIMScheduler(
        **SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1
    )


def assemble_pipeline(
    vae: AutoencoderKL | PatchAutoencoder,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    image_encoder: CLIPVisionModelWithProjection | None = None,
    feature_extractor: CLIPImageProcessor | None = None,
    prediction_type: str = PREDICTION_TYPE,
) -> StableDiffusionPipeline:
    """A :class:`StableDiffusionPipeline` of the components, with the DDIM scheduler and no safety checker."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_inference_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_synthetic_base(
    device: str | torch.device = "cpu", path: str | os.PathLike | None = None
) -> StableDiffusionPipeline:
    """Load the shipped synthetic base pipeline (offline; a 64 px image in 20 DDIM steps takes ~0.5 s on one thread).

    Args:
        device: Where to put the pipeline.
        path: Another checkpoint folder with the same layout (e.g. one written by ``train_base``).

    Raises:
        FileNotFoundError: if the folder has no ``model_index.json``.
    """
    folder = Path(path) if path is not None else SYNTHETIC_BASE_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"expected a diffusers pipeline folder with model_index.json at '{folder}'; re-create it with "
            "`python -m customcontrast_world.train_base --output_dir <folder>`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
