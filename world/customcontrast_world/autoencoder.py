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

``basis="dct"`` expresses each patch of each colour channel in the orthonormal 2-D DCT basis instead of as pixels
(still exact: the transform is orthogonal). The difference is what the per-channel scale does to a UNet's errors: in
the pixel basis every channel has the scene's full spread, so an error of the same size in any channel decodes to
full-size pixel noise; in the DCT basis the flat-colour scenes put almost all of their spread in each patch's mean
(the DC channel) and little in its detail channels, whose small std then scales their errors down at decoding.

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

__all__ = ["BASES", "ModelMixin", "PatchAutoencoder"]

BASES = ("pixels", "dct")


def _patch_basis(basis: str, patch_size: int) -> torch.Tensor:
    """The ``p^2 x p^2`` orthonormal matrix whose rows are the basis vectors of a flattened ``p x p`` patch."""
    if basis == "pixels":
        return torch.eye(patch_size**2)
    n = torch.arange(patch_size, dtype=torch.float64)
    dct = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * patch_size))  # row k: frequency k
    dct[0] /= math.sqrt(2)
    dct *= math.sqrt(2 / patch_size)
    return torch.kron(dct, dct).float()  # row (u, v) of the flattened patch (row-major, as pixel_unshuffle)


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Pixels in ``[-1, 1]`` <-> latents of ``in_channels * patch_size**2`` channels on a ``1 / patch_size`` grid.

    Args:
        patch_size: Side of the square pixel patch folded into one latent position (a power of two).
        in_channels: Image channels (3 for RGB).
        basis: ``"pixels"`` (each latent channel one pixel of the patch) or ``"dct"`` (each one a coefficient of the
            patch's orthonormal 2-D DCT, per colour channel).
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
        basis: str = "pixels",
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"expected patch_size to be a power of two, got {patch_size}")
        if basis not in BASES:
            raise ValueError(f"expected basis to be one of {', '.join(BASES)}, got {basis!r}")
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
        # Rows: the basis vectors of a flattened patch (derived from the config, so not saved).
        self.register_buffer("basis_matrix", _patch_basis(basis, patch_size), persistent=False)

    @torch.no_grad()
    def fit_statistics(self, images: torch.Tensor) -> PatchAutoencoder:
        """Set the per-channel mean and std from ``images`` (``[N, C, H, W]`` in ``[-1, 1]``); returns ``self``."""
        latents = self._fold(images.to(self.latents_mean)).transpose(0, 1).flatten(1)
        self.latents_mean.copy_(latents.mean(dim=1))
        self.latents_std.copy_(latents.std(dim=1).clamp_min(1e-3))
        return self

    def _channel_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, 1, 1)

    def _fold(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, C p^2, H / p, W / p]`` coefficients of each patch in the basis."""
        folded = F.pixel_unshuffle(images, self.config.patch_size)  # channel c * p^2 + pixel index
        patches = folded.unflatten(1, (self.config.in_channels, -1))
        return torch.einsum("kn,bcnhw->bckhw", self.basis_matrix.to(patches), patches).flatten(1, 2)

    def _unfold(self, folded: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_fold` (the basis is orthonormal: its transpose)."""
        coefficients = folded.unflatten(1, (self.config.in_channels, -1))
        patches = torch.einsum("kn,bckhw->bcnhw", self.basis_matrix.to(coefficients), coefficients).flatten(1, 2)
        return F.pixel_shuffle(patches, self.config.patch_size)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Fold ``[B, C, H, W]`` images into ``[B, C p^2, H / p, W / p]`` latents (a distribution with zero variance)."""
        size = self.config.patch_size
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"expected image height and width divisible by {size}, got {tuple(x.shape[-2:])}")
        folded = self._fold(x.to(self.latents_mean.dtype))
        mean = (folded - self._channel_view(self.latents_mean)) / self._channel_view(self.latents_std)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """Unfold latents back into images: the exact inverse of :meth:`encode`. ``generator`` is unused."""
        z = z.to(self.latents_mean.dtype)
        folded = z * self._channel_view(self.latents_std) + self._channel_view(self.latents_mean)
        sample = self._unfold(folded)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode then decode (the identity up to float rounding, about 1e-7), as ``AutoencoderKL.forward`` does."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)
