"""Batch preparation: from a collated triplet batch to the tensors the objective reads, with the frozen encoders.

Everything random in a training step (dropout rows, timesteps, VAE posterior sample, noise) is drawn here from one
``torch.Generator`` that :func:`step_generator` seeds from ``(seed, global step, micro-step, process)``. A step's
draws therefore depend only on where it is in the run, never on what ran before: a resumed run draws exactly the
numbers an uninterrupted one draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.config import CustomContrastAdapterConfig
from .components import BaseModel
from .config import TrainingConfig

__all__ = ["BatchEncoder", "ConditioningDropout", "ObjectiveInputs", "step_generator", "step_seed"]


def step_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (e.g. run seed, global step, micro-step, process index)."""
    entropy = [int(k) % (1 << 64) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_generator(
    seed: int, global_step: int, micro_step: int, process_index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of one micro-batch: a function of its position in the run only (see the module docstring)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, global_step, micro_step, process_index))
    return generator


@dataclass(frozen=True)
class ConditioningDropout:
    """Classifier-free guidance dropout: each row independently loses its image, its prompt, or both.

    The three cases are exclusive: one uniform draw per row falls in ``[0, image)``, ``[image, image + text)`` or
    ``[image + text, image + text + both)``.
    """

    image: float = 0.05
    text: float = 0.05
    both: float = 0.05

    def draw(self, batch_size: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(image_dropped, text_dropped)``, two ``[B]`` bool tensors."""
        u = torch.rand(batch_size, generator=generator, device=generator.device).to(device)
        image_only = u < self.image
        text_only = (u >= self.image) & (u < self.image + self.text)
        both = (u >= self.image + self.text) & (u < self.image + self.text + self.both)
        return image_only | both, text_only | both


@dataclass
class ObjectiveInputs:
    """What one objective step reads; all on the training device, frozen-encoder outputs detached.

    ``reference_features`` are the reference images' CLIP features ``F`` (rows hit by image dropout hold the blank
    image's); ``positive_features`` and ``appearance_similarity`` (cosine similarity of the references' CLIP image
    embeddings) are ``None`` when MACL is off. ``image_kept`` is False on rows hit by image dropout.
    """

    latents: Tensor  # [B, C, h, w] clean latents, scaled
    noise: Tensor  # [B, C, h, w]
    timesteps: Tensor  # [B] long
    encoder_hidden_states: Tensor  # [B, T, D_ctx]
    reference_features: Tensor  # [B, P, d]
    target_mask: Tensor  # [B, 1, H, W] in {0, 1}
    has_mask: Tensor  # [B] bool
    image_kept: Tensor  # [B] bool
    positive_features: Tensor | None = None  # [B, P, d]
    appearance_similarity: Tensor | None = None  # [B, B]
    added_cond_kwargs: dict[str, Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


class BatchEncoder:
    """Encodes collated :class:`~diffusers_customcontrast.data.SubjectTripletDataset` batches with the frozen base.

    Args:
        base: the frozen base model (already on its device and dtype).
        feature_layers: hidden states of the image encoder that make ``F`` (the adapter's ``image_feature_layers``).
        image_input: the adapter's ``image_input``; with ``"image_embeds"`` ``F`` is the pooled, projected image
            embedding as a one-token sequence (``feature_layers`` unused), zeros on rows hit by image dropout.
        resolution: target resolution (SDXL's ``time_ids``: original size, crop (0, 0), target size).
        dropout: classifier-free guidance dropout.
        need_positives: also encode the positive frames and the appearance similarity (for MACL).
        noise_offset: offset-noise strength.
    """

    def __init__(
        self,
        base: BaseModel,
        feature_layers: Sequence[int] | None = (-2,),
        resolution: int = 512,
        dropout: ConditioningDropout | None = None,
        need_positives: bool = True,
        noise_offset: float = 0.0,
        image_input: str = "hidden_states",
    ) -> None:
        self.base = base
        self.feature_layers = list(feature_layers or ())
        self.image_input = image_input
        self.resolution = resolution
        self.dropout = dropout or ConditioningDropout()
        self.need_positives = need_positives
        self.noise_offset = noise_offset
        processor = base.image_processor
        self._mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_config(
        cls, base: BaseModel, config: TrainingConfig, adapter_config: CustomContrastAdapterConfig
    ) -> BatchEncoder:
        """The batch encoder of a training run: ``config``'s resolution, dropout, positives (MACL) and noise offset,
        and the image features the run's adapter reads."""
        return cls(
            base,
            feature_layers=adapter_config.image_feature_layers,
            image_input=adapter_config.image_input,
            resolution=config.resolution,
            dropout=ConditioningDropout(config.image_dropout, config.text_dropout, config.both_dropout),
            need_positives=config.use_macl,
            noise_offset=config.noise_offset,
        )

    @property
    def device(self) -> torch.device:
        return self.base.unet.device

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> ObjectiveInputs:
        """Draw the step's randomness from ``generator`` (in a fixed order) and encode the batch."""
        device = self.device
        captions = list(batch["caption"])
        batch_size = len(captions)
        image_dropped, text_dropped = self.dropout.draw(batch_size, generator, device)
        num_train_timesteps = self.base.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
        latents = self.encode_latents(batch["target"], generator)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
        if self.noise_offset:
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=generator.device)
            noise = noise + self.noise_offset * offset.to(latents.dtype)
        prompt_embeds, added_cond_kwargs = self.encode_prompts(captions, text_dropped)
        reference, positive, similarity = self.encode_images(batch["reference"], batch.get("positive"), image_dropped)
        return ObjectiveInputs(
            latents=latents,
            noise=noise.to(device),
            timesteps=timesteps.to(device),
            encoder_hidden_states=prompt_embeds,
            reference_features=reference,
            positive_features=positive,
            appearance_similarity=similarity,
            target_mask=batch["target_mask"].to(device),
            has_mask=batch["has_mask"].to(device=device, dtype=torch.bool),
            image_kept=~image_dropped,
            added_cond_kwargs=added_cond_kwargs,
        )

    # ------------------------------------------------------------------------------------------------ latents

    def encode_latents(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """``[B, 3, R, R]`` images in [-1, 1] -> scaled latents in the UNet's dtype (a posterior sample)."""
        vae = self.base.vae
        posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).to(self.base.unet.dtype)

    # ------------------------------------------------------------------------------------------------ text

    def encode_prompts(self, captions: list[str], text_dropped: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Prompt embeddings (and SDXL's pooled ``text_embeds`` and ``time_ids``) with text dropout applied.

        A dropped prompt becomes what the pipeline feeds the unconditional branch at inference: the empty prompt,
        or zeros for an SDXL pipeline with ``force_zeros_for_empty_prompt``.
        """
        zero_dropped = self.base.is_sdxl and self.base.force_zeros_for_empty_prompt
        dropped = text_dropped.tolist()
        if not zero_dropped:
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
        hidden_states, pooled = [], None
        for tokenizer, text_encoder in zip(self.base.tokenizers, self.base.text_encoders):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(text_encoder.device)
            if not self.base.is_sdxl:
                hidden_states.append(text_encoder(ids)[0])
                continue
            output = text_encoder(ids, output_hidden_states=True)
            pooled = output[0]  # the projected pooled output of the last (second) encoder is what SDXL reads
            hidden_states.append(output.hidden_states[-2])
        prompt_embeds = torch.cat(hidden_states, dim=-1).to(self.base.unet.dtype)
        if not self.base.is_sdxl:
            return prompt_embeds, {}
        pooled = pooled.to(self.base.unet.dtype)
        if zero_dropped and any(dropped):
            keep = (~text_dropped).to(prompt_embeds.device, prompt_embeds.dtype)
            prompt_embeds = prompt_embeds * keep[:, None, None]
            pooled = pooled * keep[:, None]
        size = self.resolution
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=prompt_embeds.device, dtype=prompt_embeds.dtype)
        return prompt_embeds, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(captions), 1)}

    # ------------------------------------------------------------------------------------------------ images

    def pixel_values(self, images: Tensor) -> Tensor:
        """``[B, 3, s, s]`` images in [0, 1] -> the image encoder's normalised input at its resolution."""
        encoder = self.base.image_encoder
        size = encoder.config.image_size
        images = images.to(device=encoder.device, dtype=torch.float32)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        return (images - self._mean.to(images.device)) / self._std.to(images.device)

    def encode_images(
        self, references: Tensor, positives: Tensor | None, image_dropped: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(F_ref, F_pos, S)`` from one pass of the frozen image encoder over references and positives.

        A reference row hit by image dropout is replaced by all-zero pixel values, the blank image that diffusers
        encodes for the unconditional branch of IP-Adapter pipelines. ``S`` is MACL's appearance similarity: the
        float32 cosine similarity of the (segmented) references' projected CLIP image embeddings (``image_embeds``;
        ``pooler_output`` for an encoder without projection), ``[B, B]`` with ones on the diagonal.
        """
        encoder = self.base.image_encoder
        reference = self.pixel_values(references)
        reference = reference.masked_fill(image_dropped.to(reference.device)[:, None, None, None], 0.0)
        with_positives = self.need_positives and positives is not None
        pixels = torch.cat([reference, self.pixel_values(positives)]) if with_positives else reference
        output = encoder(pixels.to(encoder.dtype), output_hidden_states=True)
        batch_size = references.shape[0]
        if self.image_input == "image_embeds":
            # diffusers' negative for an adapter on pooled embeddings is a zero embedding, not the blank image's.
            kept = torch.cat([~image_dropped, image_dropped.new_ones(len(pixels) - batch_size)])
            features = (output.image_embeds * kept.to(output.image_embeds)[:, None])[:, None]
        else:
            features = torch.cat([output.hidden_states[i] for i in self.feature_layers], dim=-1)
        if not with_positives:
            return features, None, None
        embeds = getattr(output, "image_embeds", None)
        if embeds is None:  # a CLIPVisionModel without projection
            embeds = output.pooler_output
        embeds = F.normalize(embeds[:batch_size].float(), dim=-1)
        return features[:batch_size], features[batch_size:], embeds @ embeds.T
