"""The world's autoencoder: an exact, parameter-free patch autoencoder (space-to-depth and its inverse).

A learned VAE is the first stage every generated image passes through, so it caps everything after it: the
shipped 8-channel ``AutoencoderKL`` of base v4 gave back reconstructions the judge read at colour set 27 % and
texture 63 % (real renders: 98 % and 97 %), whatever the UNet learned (``docs/synthetic_world.md``, stage
ceilings). :class:`PatchAutoencoder` folds every ``p x p`` patch of pixels into ``3 p^2`` channels (4 x 4 on the
world's 64 px scenes: 16 x 16 x 48 latents, the same grid as the VAE's, so a UNet step costs about the same) and
decodes by the exact inverse, so its reconstructions *are* the real renders and it costs no training. Its only
state is a per-channel shift and scale (``latents_mean``, ``latents_std``, set from the training scenes by
:meth:`PatchAutoencoder.fit_statistics`) that gives the UNet zero-mean, unit-variance latents, as SD's
``scaling_factor`` does for its VAE with one number.

It is a diffusers model that ``StableDiffusionPipeline`` takes as its ``vae``: ``encode`` returns a
(deterministic) latent distribution, ``decode`` a sample, ``config.scaling_factor`` is 1 (the normalisation is
inside), and ``config.block_out_channels`` has ``log2(p) + 1`` entries so that the pipeline's
``vae_scale_factor`` is ``p``. Saved pipelines record it in ``model_index.json`` by this module's path, which is
why the module also exposes ``ModelMixin`` (diffusers looks up the loading class there); diffusers imports no module
that a ``model_index.json`` names, so this one must be imported before ``from_pretrained`` (``import
customcontrast_world`` does it). Loading logs one warning that the pipeline expected an ``AutoencoderKL``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["ModelMixin", "PatchAutoencoder"]


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Pixels in ``[-1, 1]`` <-> latents of ``in_channels * patch_size**2`` channels on a ``1 / patch_size`` grid.

    Args:
        patch_size: Side of the square pixel patch folded into one latent position (a power of two).
        in_channels: Image channels (3 for RGB).
        scaling_factor: What pipelines multiply encoded latents by; 1, since the latents are normalised inside.
        latent_channels, block_out_channels: Derived from the others (pipelines read them); pass them only to
            check a saved config.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        patch_size: int = 4,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        latent_channels: int | None = None,
        block_out_channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"expected patch_size to be a power of two, got {patch_size}")
        # Derived, and recorded in the config because pipelines read them there: block_out_channels has
        # log2(p) + 1 entries so that a pipeline's vae_scale_factor, 2 ** (len - 1), is p.
        channels = in_channels * patch_size**2
        blocks = [channels] * (int(math.log2(patch_size)) + 1)
        if latent_channels not in (None, channels) or block_out_channels not in (None, blocks, tuple(blocks)):
            raise ValueError(
                f"expected latent_channels={channels} and block_out_channels={blocks} for patch_size={patch_size}, "
                f"got {latent_channels} and {block_out_channels}"
            )
        self.register_to_config(latent_channels=channels, block_out_channels=blocks)
        self.register_buffer("latents_mean", torch.zeros(channels))
        self.register_buffer("latents_std", torch.ones(channels))

    @torch.no_grad()
    def fit_statistics(self, images: torch.Tensor) -> PatchAutoencoder:
        """Set the per-channel mean and std from ``images`` (``[N, C, H, W]`` in ``[-1, 1]``); returns ``self``."""
        latents = F.pixel_unshuffle(images.to(self.latents_mean), self.config.patch_size).transpose(0, 1).flatten(1)
        self.latents_mean.copy_(latents.mean(dim=1))
        self.latents_std.copy_(latents.std(dim=1).clamp_min(1e-3))
        return self

    def _channel_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, 1, 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Fold ``[B, C, H, W]`` images into ``[B, C p^2, H / p, W / p]`` latents (a distribution with zero variance)."""
        size = self.config.patch_size
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"expected image height and width divisible by {size}, got {tuple(x.shape[-2:])}")
        folded = F.pixel_unshuffle(x.to(self.latents_mean.dtype), size)
        mean = (folded - self._channel_view(self.latents_mean)) / self._channel_view(self.latents_std)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """Unfold latents back into images: the exact inverse of :meth:`encode`. ``generator`` is unused."""
        z = z.to(self.latents_mean.dtype)
        folded = z * self._channel_view(self.latents_std) + self._channel_view(self.latents_mean)
        sample = F.pixel_shuffle(folded, self.config.patch_size)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode then decode (the identity up to float rounding, about 1e-7), as ``AutoencoderKL.forward`` does."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)
