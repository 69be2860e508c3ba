"""The training objective of CustomContrast: ``L_diff + lambda_cscl L_CSCL + lambda_macl L_MACL + lambda_loc L_loc``.

:class:`CustomContrastObjective` is the one module a training run optimises and hands to ``accelerator.prepare``: it
holds the trainable adapter, the frozen UNet the adapter is attached to (with its optional LoRA) and the learnable
CSCL temperature, and its ``forward`` computes every loss term of a step. Keeping the whole step inside one
``forward`` is what lets DDP, DeepSpeed and FSDP wrap it unchanged: they synchronise gradients of (or gather) the
parameters used in that call. The adapter runs once per step, called here directly: its tokens (with gradients) go
into the UNet call with the batch (:class:`~diffusers_customcontrast.conditioning.SubjectConditioning`), the same
tokens feed the contrastive losses, and the location maps come back in that call's own record. Benchmarks call it
directly for one training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from ..conditioning import StepRecord, SubjectConditioning, SubjectOptions
from ..loaders import injection
from ..losses import (
    cscl_loss,
    diffusion_loss,
    diffusion_target,
    location_loss,
    macl_loss,
    min_snr_weights,
)
from ..models.adapter import CustomContrastAdapter
from .batch import ObjectiveInputs
from .config import TrainingConfig

__all__ = ["CustomContrastObjective", "LogitScale", "ObjectiveOutput", "ObjectiveSettings"]

TERMS = ("diffusion", "cscl", "macl", "location")


_TRAINING_DEFAULTS = {f.name: f.default for f in fields(TrainingConfig)}


@dataclass(frozen=True)
class ObjectiveSettings:
    """Loss weights, temperatures and ablation switches: the matching :class:`TrainingConfig` fields, with its
    defaults (written once, there)."""

    lambda_cscl: float = _TRAINING_DEFAULTS["lambda_cscl"]
    lambda_macl: float = _TRAINING_DEFAULTS["lambda_macl"]
    lambda_loc: float = _TRAINING_DEFAULTS["lambda_loc"]
    use_cscl: bool = _TRAINING_DEFAULTS["use_cscl"]
    use_macl: bool = _TRAINING_DEFAULTS["use_macl"]
    use_location: bool = _TRAINING_DEFAULTS["use_location"]
    macl_temperature: float = _TRAINING_DEFAULTS["macl_temperature"]
    appearance_temperature: float = _TRAINING_DEFAULTS["appearance_temperature"]
    macl_appearance_scaling: str = _TRAINING_DEFAULTS["macl_appearance_scaling"]
    cscl_init_logit_scale: float = _TRAINING_DEFAULTS["cscl_init_logit_scale"]
    snr_gamma: float | None = _TRAINING_DEFAULTS["snr_gamma"]
    s_plus_warmup_steps: int = _TRAINING_DEFAULTS["s_plus_warmup_steps"]

    @classmethod
    def from_config(cls, config) -> ObjectiveSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


class LogitScale(nn.Module):
    """The learnable log inverse temperature of ``L_CSCL`` (as CLIP's ``logit_scale``).

    A module of the training run, not of the adapter: it is saved with the training state and not exported.
    """

    def __init__(self, init_value: float = math.log(1 / 0.07), trainable: bool = True) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init_value)), requires_grad=trainable)

    def forward(self) -> Tensor:
        return self.value


class ObjectiveOutput(NamedTuple):
    """``loss``: the total to back-propagate; ``terms``: detached float32 scalars of each term (for logging).

    A named tuple rather than a dataclass: DDP and accelerate traverse it (pytree) to find the output tensors.
    """

    loss: Tensor
    terms: dict[str, Tensor]


class CustomContrastObjective(nn.Module):
    """Adapter + frozen UNet (adapter attached) + CSCL temperature; ``forward(inputs)`` is one step's loss.

    Args:
        unet: the frozen UNet; the adapter is attached to it here unless it already is.
        adapter: the trainable adapter.
        noise_scheduler: the training noise scheduler (``add_noise``, the prediction type, min-SNR weights).
        settings: loss weights, temperatures and switches.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        adapter: CustomContrastAdapter,
        noise_scheduler: DDPMScheduler,
        settings: ObjectiveSettings | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings or ObjectiveSettings()
        # Registered before the UNet, so that named_parameters() names the adapter's weights "adapter.*" (the UNet
        # reaches the same tensors through its processors and encoder_hid_proj; shared parameters are listed once).
        self.adapter = adapter
        self.unet = unet
        self.logit_scale = LogitScale(self.settings.cscl_init_logit_scale, trainable=self.settings.use_cscl)
        self.noise_scheduler = noise_scheduler
        state = injection.attached(unet)
        if state is None or state.adapter is not adapter:
            injection.attach(unet, adapter)

    def train(self, mode: bool = True) -> CustomContrastObjective:
        """Training mode for the trainable modules; the frozen UNet stays in eval mode."""
        super().train(mode)
        self.unet.eval()
        # The adapter's modules are shared with the UNet's processors: set them again after unet.eval().
        self.adapter.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer updates (adapter, CSCL temperature, UNet LoRA), each listed once."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable parameters by name (what a checkpoint must restore; the frozen base is not in it)."""
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        state.update({f"adapter.{name}": b.detach() for name, b in self.adapter.named_buffers()})
        return state

    def load_trainable_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore :meth:`trainable_state_dict`; every trainable parameter must be in ``state_dict``."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"The checkpoint does not match the trainable modules of this run: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} (was it made with other adapter, LoRA or CSCL settings?)."
            )
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state_dict[name])

    # ------------------------------------------------------------------------------------------------ forward

    def s_plus_scale(self, step: int) -> float:
        """The S+ scale the UNet call of optimizer step ``step`` (counted from 0) uses: the adapter's ``s_plus_scale``
        ramped linearly to 1 over ``s_plus_warmup_steps`` (the adapter's own with no warm-up)."""
        start = self.adapter.adapter_config.s_plus_scale
        warmup = self.settings.s_plus_warmup_steps
        if warmup == 0:
            return start
        return start + (1.0 - start) * min(step / warmup, 1.0)

    def forward(self, inputs: ObjectiveInputs, step: int = 0) -> ObjectiveOutput:
        """Every loss term of one batch; ``step`` is the optimizer step it trains (for the S+ warm-up)."""
        settings = self.settings
        scheduler = self.noise_scheduler
        noisy_latents = scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)

        # The reference tokens of every layer (with grad): the UNet call's subject and the contrastive losses' input.
        tokens = self.adapter(inputs.reference_features, inputs.timesteps)
        record = StepRecord()
        options = None
        if settings.s_plus_warmup_steps:  # this step's S+ scale on every layer, in place of the adapter's
            options = SubjectOptions(s_plus_scale=(self.s_plus_scale(step),) * self.adapter.num_layers)
        subject = SubjectConditioning(tokens=tokens, record=record, options=options)
        model_pred = self.unet(
            noisy_latents,
            inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            added_cond_kwargs={**inputs.added_cond_kwargs, "image_embeds": [subject]},
        ).sample
        location_maps = list(record.location_maps.values())

        target = diffusion_target(scheduler, inputs.latents.float(), inputs.noise.float(), inputs.timesteps)
        weights = None
        if settings.snr_gamma is not None:
            weights = min_snr_weights(scheduler, inputs.timesteps, settings.snr_gamma)
        terms = {"diffusion": diffusion_loss(model_pred, target, weights)}

        # Rows hit by image dropout carry the blank image's tokens: they take no part in the subject losses.
        kept = inputs.image_kept
        if settings.use_cscl:
            terms["cscl"] = self._cscl(tokens.visual_cls[kept], tokens.textual_cls[kept].mean(dim=1))
        if settings.use_macl:
            terms["macl"] = self._macl(inputs, tokens.s_plus, kept)
        if settings.use_location and location_maps:
            valid = inputs.has_mask & kept
            terms["location"] = location_loss(location_maps, inputs.target_mask, valid)

        loss = terms["diffusion"]
        for name, weight in (
            ("cscl", settings.lambda_cscl),
            ("macl", settings.lambda_macl),
            ("location", settings.lambda_loc),
        ):
            if name in terms:
                loss = loss + weight * terms[name]
        logged = {name: value.detach().float() for name, value in terms.items()}
        logged["total"] = loss.detach().float()
        if settings.use_cscl:
            logged["logit_scale"] = self.logit_scale.value.detach().float()
        logged.update(self._added_parts(step, loss.device))
        return ObjectiveOutput(loss=loss, terms=logged)

    @torch.no_grad()
    def _added_parts(self, step: int, device: torch.device) -> dict[str, Tensor]:
        """How open the parts CustomContrast adds to IP-Adapter are in this step, all 0 for an adapter converted from
        one: the S+ scale in use, the location gates' strength in use (mean over layers) and the norm of the TV
        fusion's output projection. Logged, they show a warm-started run opening them (docs/training.md)."""
        gates = torch.stack([layer.location_gate.strength for layer in self.adapter.layers]).clamp(0.0, 1.0)
        return {
            "s_plus_scale": torch.tensor(self.s_plus_scale(step), device=device),
            "gate_strength": gates.mean().float().to(device),
            "tv_fusion_norm": self.adapter.encoder.tv_fusion.proj.weight.norm().float().to(device),
        }

    def _cscl(self, visual_cls: Tensor, textual_cls: Tensor) -> Tensor:
        logit_scale = self.logit_scale()
        if visual_cls.shape[0] == 0:
            # Still connected to the temperature: DDP expects a gradient for every trainable parameter.
            return logit_scale * 0.0 + visual_cls.sum() * 0.0 + textual_cls.sum() * 0.0
        return cscl_loss(visual_cls, textual_cls, logit_scale)

    def _macl(self, inputs: ObjectiveInputs, reference_s_plus: Tensor, kept: Tensor) -> Tensor:
        if inputs.positive_features is None:
            raise ValueError("MACL needs the positive frames' features: encode batches with need_positives=True.")
        if not bool(kept.any()):
            return reference_s_plus.sum() * 0.0
        # The positive frame's S+ tokens at the reference row's own timestep, for every layer.
        positive = self.adapter(inputs.positive_features[kept], inputs.timesteps[kept]).s_plus
        similarity = inputs.appearance_similarity
        if similarity is not None:
            similarity = similarity[kept][:, kept]
        return macl_loss(
            reference_s_plus[kept].mean(dim=2),
            positive.mean(dim=2),
            similarity,
            temperature=self.settings.macl_temperature,
            appearance_temperature=self.settings.appearance_temperature,
            appearance_scaling=self.settings.macl_appearance_scaling,
        )
