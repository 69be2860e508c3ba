"""The adapter's image side as an entry of ``unet.encoder_hid_proj``, where diffusers' pipelines feed it."""

from __future__ import annotations

import torch
from torch import nn

from ..recording import SubjectRecorder
from .mfi_encoder import ImageContext, MFIEncoder


class CustomContrastImageProjection(nn.Module):
    """Turns the image features of the pipeline's IP-Adapter route into every layer's tokens for this step.

    The UNet calls ``encoder_hid_proj`` once per forward with ``image_embeds`` only; a forward pre-hook on the UNet
    (:meth:`capture_step`) supplies the step's timestep. The output ``[N, L, 2 Ns, D_ctx]`` holds, for each layer,
    its S+ tokens then its visual tokens; each layer's processor reads its own slice.

    At inference the timestep-independent part of the encoder is computed once per generation: it is cached for
    the image features tensor that the pipeline passes unchanged at every step.
    """

    def __init__(self, encoder: MFIEncoder, recorder: SubjectRecorder) -> None:
        super().__init__()
        self.encoder = encoder
        self.recorder = recorder
        self.timesteps: torch.Tensor | None = None
        self._cache: tuple[tuple, torch.Tensor, ImageContext] | None = None

    def capture_step(self, unet: nn.Module, args: tuple, kwargs: dict) -> None:
        """UNet forward pre-hook: remember the timestep and latent size of this call."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        self.timesteps = timestep
        self.recorder.sample_size = tuple(sample.shape[-2:])

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.timesteps is None:
            raise RuntimeError(
                "The CustomContrast image projection ran outside a UNet forward: call the UNet (or the pipeline) "
                "rather than unet.encoder_hid_proj directly."
            )
        width = self.encoder.image_proj[0].normalized_shape[0]
        if image_features.ndim != 3 or image_features.shape[-1] != width:
            raise ValueError(
                f"The subject features must be [num_images, tokens, {width}] (ip_adapter_image_embeds: a list with one "
                f"[batch, num_subjects, tokens, {width}] tensor, the negative rows first under guidance, as "
                f"pipe.prepare_ip_adapter_image_embeds returns), got {list(image_features.shape)}."
            )
        image = self._image_context(image_features)
        tokens = self.encoder.encode_step(image, self._timesteps_for(image_features.shape[0]))
        if self.recorder.active:
            self.recorder.tokens = tokens
        return tokens.pack()

    def _timesteps_for(self, batch: int) -> torch.Tensor:
        """One timestep per image row; image rows serve contiguous runs of prompt rows (see the processor)."""
        timesteps = self.timesteps.reshape(-1)
        if timesteps.numel() in (1, batch):
            return timesteps
        if timesteps.numel() % batch:
            raise ValueError(f"Got {timesteps.numel()} timesteps for {batch} subject embeddings.")
        return timesteps[:: timesteps.numel() // batch]

    def _image_context(self, image_features: torch.Tensor) -> ImageContext:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.encoder.encode_image(image_features)
        key = (
            image_features.data_ptr(),
            image_features.shape,
            image_features.stride(),
            image_features.dtype,
            image_features.device,
            image_features._version,
            tuple((p.data_ptr(), p._version) for p in self.encoder.parameters()),
        )
        if self._cache is None or self._cache[0] != key:
            # Checked once per generation: NaN features would give a NaN image without a word.
            if image_features.device.type != "meta" and not torch.isfinite(image_features).all():
                raise ValueError(
                    "The subject features hold NaN or infinite values (from ip_adapter_image_embeds, or an image "
                    "encoder that overflowed, e.g. in float16): CustomContrast would produce a NaN image."
                )
            # Holding the features keeps their memory from being reused by other data at the same address.
            self._cache = (key, image_features, self.encoder.encode_image(image_features))
        return self._cache[2]
