"""Train the synthetic base model on CPU: VAE, then image encoder, then text encoder + UNet.

Reproduces the shipped ``customcontrast_world/assets/synthetic-base`` (see ``docs/synthetic_world.md`` for the
exact command, its cost and losses)::

    python -m customcontrast_world.train_base --output_dir runs/synthetic-base

Stages (each one seeded, so a run with the same arguments and thread count gives the same weights):

1. **Autoencoder**, by ``--autoencoder``: ``kl``, an ``AutoencoderKL`` (64 px <-> 16 x 16 x 8) trained with L1
   reconstruction + a small KL term on the world's scenes, its ``scaling_factor`` then set to 1 / std of the
   training latents as SD does; ``patch``, the exact :class:`~.autoencoder.PatchAutoencoder` (16 x 16 x 48),
   which needs no training, only the per-channel mean and std of the scenes; or ``projected``, the patches'
   12 principal components (16 x 16 x 12) with a learned decoder correction trained (L1) on noisy latents.
2. **Image encoder** (a tiny ``CLIPVisionModelWithProjection``): subjects segmented on white (the references the
   adapter sees), InfoNCE between two views of the same subject plus classification of the subject's shape,
   texture and colours, so that its features carry subject identity. Sketch frames are left out (no colour).
3. **Text encoder + UNet**, jointly, from scratch: v-prediction (see ``base_model.SCHEDULE`` for why not epsilon)
   on the cached latents of full scenes with their captions, which name the subject's colours in
   ``color_caption_prob`` of the draws (so that the base draws colours when told, and an adapter can steer them)
   and are replaced by the empty prompt in ``cfg_dropout`` (classifier-free guidance); min-SNR-style weighting, EMA.
   ``--unet_init_from <folder>`` starts them from a finished run instead (a warm restart: a new optimizer and
   learning-rate cycle), and ``--latent_whitening`` sets how a patch autoencoder's latents are scaled for them.

Only the world's ``train`` subjects are used: the held-out subjects stay unseen by every component. The run is
resumable (:mod:`.resumable`): it checkpoints under ``<output_dir>/checkpoints`` every ``checkpoint_every`` steps and
on SIGTERM, and the same command continues where it stopped, with the weights of an uninterrupted run.

On a GPU (``--device cuda --mixed_precision bf16`` and a larger ``--unet_batch_size``) each stage can run on its own
(``--stages unet --init_from <folder>`` takes the other components from a finished run); its checkpoints are read
back on any device, so a run started on a GPU can be resumed or shipped from a CPU machine. ``--smoke`` trains a
tiny world for a few steps of every stage (seconds), to check a command before spending a GPU on it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from diffusers_customcontrast.data.synthetic import (
    COLORS,
    SHAPES,
    TEXTURES,
    SyntheticSubject,
    caption_for_view,
    render_view,
)
from diffusers_customcontrast.data.transforms import binarize_mask, resize_center_crop, subject_crop

from .autoencoder import PatchAutoencoder, check_whitening
from .base_model import (
    AUTOENCODERS,
    IMAGE_ENCODER_SIZE,
    PREDICTION_TYPE,
    UNET_CHANNELS,
    assemble_pipeline,
    build_image_encoder,
    build_text_encoder,
    build_tokenizer,
    build_train_scheduler,
    build_unet,
)
from .dataset import RenderedFrame, WorldSpec
from .resumable import RunCheckpoints, run_steps, torch_threads

STAGES: tuple[str, ...] = ("vae", "image_encoder", "unet")


@dataclass
class TrainBaseConfig:
    """Arguments of :func:`train_base` (the command-line flags have the same names).

    ``stages`` not listed are loaded from ``init_from`` (default ``output_dir``), e.g. to retrain the UNet alone.
    Results depend on ``threads`` too (float reductions split differently), so a reproduction must use the same.
    ``checkpoint_every``, ``log_every``, ``snapshot_every`` and ``device`` do not change the weights (beyond float
    rounding); every other field must stay the same to resume.
    """

    output_dir: str
    seed: int = 0
    threads: int = 1
    stages: Sequence[str] = STAGES
    init_from: str | None = None
    autoencoder: str = "kl"
    device: str = "cpu"
    mixed_precision: str = "no"
    num_train_subjects: int = 300
    num_heldout_subjects: int = 50
    frames_per_subject: int = 48
    vae_steps: int = 3000
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 6000
    decoder_batch_size: int = 32
    decoder_lr: float = 1e-3
    decoder_noise: float = 0.5
    """The projected autoencoder's decoder trains on latents plus noise of a std drawn in ``[0, decoder_noise)``: the
    errors a UNet leaves, which it learns to map onto the clean scene."""
    decoder_clean: float = 0.3
    """Share of the decoder's training latents given no noise (so that clean latents decode as exactly as they can)."""
    latent_whitening: float = 1.0
    """How the UNet sees a patch autoencoder's latents (``PatchAutoencoder``'s ``whitening``): 1 every channel at unit
    variance, 0 each principal component its share of the variance. Set on the autoencoder after its stage (its
    decoder trains on whitened latents either way), so it changes no autoencoder weights."""
    image_encoder_steps: int = 600
    image_encoder_batch_size: int = 64
    image_encoder_lr: float = 1e-3
    unet_steps: int = 32000
    unet_lr_cycles: int = 2
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    cfg_dropout: float = 0.1
    color_caption_prob: float = 0.5
    unet_max_rotation: float = 360.0
    unet_channels: str = ",".join(map(str, UNET_CHANNELS))
    """Widths of the UNet's three levels, comma-separated (v4: 32,64,128)."""
    unet_init_from: str | None = None
    """A pipeline folder whose UNet and text encoder the UNet stage starts from (a warm restart: a new learning-rate
    cycle and optimizer on a finished run's weights), instead of new ones; its UNet must have ``unet_channels``."""
    prediction_type: str = PREDICTION_TYPE
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.9995
    checkpoint_every: int = 500
    log_every: int = 100
    snapshot_every: int = 0
    """Also write the pipeline with the UNet stage's EMA weights to ``snapshots/step_<n>`` every so many steps (0:
    never): learning curves, each snapshot scored with ``benchmark --ceilings_only --base_model <snapshot>``."""

    def __post_init__(self) -> None:
        if self.autoencoder not in AUTOENCODERS:
            raise ValueError(f"expected --autoencoder to be one of {sorted(AUTOENCODERS)}, got {self.autoencoder!r}")
        check_whitening(self.latent_whitening)
        if self.autoencoder == "kl" and self.latent_whitening != 1.0:
            raise ValueError(f"expected --latent_whitening 1 with --autoencoder kl, got {self.latent_whitening}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"expected --mixed_precision to be one of {sorted(PRECISIONS)}, got {self.mixed_precision!r}"
            )

    def run_settings(self) -> dict:
        """The fields that decide the weights (what a resumed run must share with the run it continues)."""
        settings = {**asdict(self), "stages": list(self.stages)}
        for name in ("output_dir", "checkpoint_every", "log_every", "snapshot_every", "device"):
            settings.pop(name)
        return settings

    @classmethod
    def smoke(cls, output_dir: str, **overrides) -> TrainBaseConfig:
        """A few steps of every stage on a tiny world: checks a command (and its device) in seconds."""
        tiny = dict(
            num_train_subjects=3, num_heldout_subjects=2, frames_per_subject=3, vae_steps=2, vae_batch_size=2,
            decoder_steps=2, decoder_batch_size=2,
            image_encoder_steps=2, image_encoder_batch_size=2, unet_steps=4, unet_batch_size=2, unet_lr_cycles=1,
            checkpoint_every=2, log_every=1,
        )  # fmt: skip
        return cls(output_dir=output_dir, **{**tiny, **overrides})


PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``--mixed_precision`` -> the autocast dtype of the UNet stage (fp16 also scales the loss)."""


@dataclass
class TrainingRecord:
    """What a run measured: loss curves and metrics per stage, and wall / CPU times (``train_log.json``)."""

    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    metrics: dict[str, object] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    def add_stage(self, stage: str, curves: dict[str, list[float]], seconds: dict[str, float]) -> None:
        self.curves[stage] = curves
        self.times[stage] = seconds["wall"]
        self.times[f"{stage}_cpu"] = seconds["cpu"]

    def final_losses(self, window: int) -> dict[str, float]:
        """Mean of the last ``window`` values of every curve, keyed ``"<stage>/<loss>"``."""
        return {
            f"{stage}/{name}": float(np.mean(values[-window:]))
            for stage, curves in self.curves.items()
            for name, values in curves.items()
        }


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingFrames:
    """The train split rendered in memory."""

    images: torch.Tensor  # [N, 3, H, W] uint8
    masks: list[np.ndarray]  # boolean [H, W]
    captions: list[str]
    colored_captions: list[str]  # the same captions naming the subject's colours
    subject_index: torch.Tensor  # [N] long, position of the frame's subject
    is_sketch: torch.Tensor  # [N] bool
    attributes: torch.Tensor  # [N, 4] long: shape, texture, colour, secondary colour (-1 when solid)

    def pil_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index].permute(1, 2, 0).numpy())


def render_training_frames(spec: WorldSpec, split: str = "train", max_rotation: float = 360.0) -> TrainingFrames:
    """Render every frame of a split of ``spec`` (14,400 frames of 300 subjects x 48 take about 15 s).

    With ``max_rotation`` below 360 every subject is turned by at most ``max_rotation / 2`` degrees either way (the
    frame's drawn rotation mapped linearly onto that range; 0: upright), everything else as in the world.
    """
    images, masks, captions, colored, subjects, sketch, attributes = [], [], [], [], [], [], []
    positions: dict[str, int] = {}
    for frame in spec.iter_frames(split):
        if max_rotation < 360.0:
            frame = _turned(frame, (frame.view.rotation / 360.0 - 0.5) * max_rotation, spec.size)
        positions.setdefault(frame.subject_id, len(positions))
        images.append(np.asarray(frame.image))
        masks.append(np.asarray(frame.mask) > 0)
        captions.append(frame.caption)
        colored.append(caption_for_view(frame.subject, frame.view, name_colors=True))
        subjects.append(positions[frame.subject_id])
        sketch.append(frame.view.style == "sketch")
        attributes.append(_attribute_labels(frame.subject))
    return TrainingFrames(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        masks=masks,
        captions=captions,
        colored_captions=colored,
        subject_index=torch.tensor(subjects),
        is_sketch=torch.tensor(sketch),
        attributes=torch.tensor(attributes),
    )


def _turned(frame: RenderedFrame, rotation: float, size: int) -> RenderedFrame:
    view = dataclasses.replace(frame.view, rotation=rotation)
    image, mask = render_view(frame.subject, view, size)
    return dataclasses.replace(frame, view=view, image=image, mask=mask)


def _attribute_labels(subject: SyntheticSubject) -> list[int]:
    secondary = -1 if subject.texture == "solid" else COLORS.index(subject.secondary_color)
    return [SHAPES.index(subject.shape), TEXTURES.index(subject.texture), COLORS.index(subject.color), secondary]


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------------------------


def make_autoencoder(
    frames: TrainingFrames,
    config: TrainBaseConfig,
    record: TrainingRecord,
    checkpoints: RunCheckpoints,
    log: Callable[[str], None] = print,
) -> AutoencoderKL | PatchAutoencoder:
    """The autoencoder stage: :func:`train_vae`, or a patch autoencoder fitted to the scenes' statistics (and, with
    a learned decoder, :func:`train_patch_decoder`)."""
    if config.autoencoder == "kl":
        return train_vae(frames, config, record, checkpoints, log)
    began, cpu = time.perf_counter(), time.process_time()
    with _seeded(config.seed):
        autoencoder = AUTOENCODERS[config.autoencoder]().fit_statistics(_to_unit_range(frames.images))
    if autoencoder.decoder is not None:
        return train_patch_decoder(autoencoder, frames, config, record, checkpoints, log)
    seconds = {"wall": time.perf_counter() - began, "cpu": time.process_time() - cpu}
    record.add_stage("vae", {}, seconds)
    return autoencoder.eval().requires_grad_(False)


def train_patch_decoder(
    autoencoder: PatchAutoencoder,
    frames: TrainingFrames,
    config: TrainBaseConfig,
    record: TrainingRecord,
    checkpoints: RunCheckpoints,
    log: Callable[[str], None] = print,
) -> PatchAutoencoder:
    """Train the fitted ``autoencoder``'s decoder correction (L1) to give back each scene from its latents plus
    noise of a random std below ``config.decoder_noise``; the projection stays fixed."""
    generator = torch.Generator().manual_seed(config.seed)
    decoder = autoencoder.decoder.train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.decoder_lr, weight_decay=0.0)
    schedule = _cosine_schedule(optimizer, config.decoder_steps, warmup=min(150, config.decoder_steps // 10))

    def step(index: int) -> dict[str, float]:
        batch = _to_unit_range(frames.images[_batch_indices(len(frames.images), config.decoder_batch_size, generator)])
        with torch.no_grad():
            latents = autoencoder.encode(batch).latent_dist.mode()
        noise = torch.randn(latents.shape, generator=generator)
        std = torch.rand(len(latents), 1, 1, 1, generator=generator) * config.decoder_noise
        std = std * (torch.rand(std.shape, generator=generator) >= config.decoder_clean)
        l1 = (autoencoder.decode(latents + std * noise).sample - batch).abs().mean()
        _step(optimizer, schedule, l1, decoder.parameters())
        return {"l1": l1.item()}

    state = {"decoder": decoder, "optimizer": optimizer, "schedule": schedule}
    record.add_stage("vae", *_run(checkpoints, "vae", config.decoder_steps, step, state, generator, config, log))
    return autoencoder.eval().requires_grad_(False)


def train_vae(
    frames: TrainingFrames,
    config: TrainBaseConfig,
    record: TrainingRecord,
    checkpoints: RunCheckpoints,
    log: Callable[[str], None] = print,
) -> AutoencoderKL:
    """Train the VAE (L1 + KL) and set its ``scaling_factor`` from the training latents."""
    generator = torch.Generator().manual_seed(config.seed)
    with _seeded(config.seed):
        vae = AUTOENCODERS["kl"]().train()
    with torch.no_grad():
        # Start near-deterministic (posterior std ~0.05 instead of 1): the decoder then learns from clean latents at
        # once, and the small KL term lets the std grow only where it costs nothing.
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = _cosine_schedule(optimizer, config.vae_steps, warmup=min(50, config.vae_steps // 10))

    def step(index: int) -> dict[str, float]:
        batch = _to_unit_range(frames.images[_batch_indices(len(frames.images), config.vae_batch_size, generator)])
        if torch.rand((), generator=generator) < 0.5:  # mirrored scenes are scenes of the world too
            batch = batch.flip(-1)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        l1 = (reconstruction - batch).abs().mean()
        _step(optimizer, schedule, l1 + config.kl_weight * posterior.kl().mean(), vae.parameters())
        return {"l1": l1.item()}

    state = {"vae": vae, "optimizer": optimizer, "schedule": schedule}
    record.add_stage("vae", *_run(checkpoints, "vae", config.vae_steps, step, state, generator, config, log))
    vae.eval().requires_grad_(False)
    mean, std = encode_latents(vae, frames.images)
    # Std of sampled latents: spread of the means plus the posterior noise (SD sets 1 / this as its scale).
    latent_std = (mean.var() + std.pow(2).mean()).sqrt()
    vae.register_to_config(scaling_factor=float(1.0 / latent_std))
    return vae


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL | PatchAutoencoder, images: torch.Tensor, batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of ``images`` (uint8) under ``vae``."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(_to_unit_range(images[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------------------------
# Stage 2: image encoder
# --------------------------------------------------------------------------------------------------------------


def reference_pixels(frames: TrainingFrames, processor: CLIPImageProcessor) -> torch.Tensor:
    """Every frame's subject segmented on white and cropped (as the triplet dataset does), processed for the encoder."""
    crops = [
        resize_center_crop(subject_crop(frames.pil_image(n), binarize_mask(Image.fromarray(m), (m.shape[1], m.shape[0]))),
                           IMAGE_ENCODER_SIZE)
        for n, m in enumerate(frames.masks)
    ]  # fmt: skip
    return processor(images=crops, return_tensors="pt").pixel_values


class _AttributeHeads(torch.nn.Module):
    """Linear classifiers of shape, texture and colours on the pooled features (training only, not shipped)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            [torch.nn.Linear(width, n) for n in (len(SHAPES), len(TEXTURES), len(COLORS), len(COLORS))]
        )

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(head(pooled), labels[:, k], ignore_index=-1) for k, head in enumerate(self.heads))


def train_image_encoder(
    frames: TrainingFrames,
    config: TrainBaseConfig,
    record: TrainingRecord,
    checkpoints: RunCheckpoints,
    log: Callable[[str], None] = print,
    heldout: TrainingFrames | None = None,
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """Train the image encoder on pairs of views of the same subject (InfoNCE + attribute classification).

    With ``heldout`` frames, also logs and records :func:`identity_retrieval` on them, trained and untrained.
    """
    generator = torch.Generator().manual_seed(config.seed + 1)
    with _seeded(config.seed + 1):
        encoder, processor = build_image_encoder()
        heads = _AttributeHeads(encoder.config.hidden_size)
    encoder.train()
    pixels = reference_pixels(frames, processor)
    views_of = _views_by_subject(frames)
    parameters = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.image_encoder_lr, weight_decay=0.01)
    schedule = _cosine_schedule(
        optimizer, config.image_encoder_steps, warmup=min(50, config.image_encoder_steps // 10)
    )

    def step(index: int) -> dict[str, float]:
        first, second = _view_pairs(views_of, config.image_encoder_batch_size, generator)
        batch = _flip_some(torch.cat([pixels[first], pixels[second]]), generator)
        output = encoder(pixel_values=batch)
        embeds = F.normalize(output.image_embeds, dim=-1)
        logits = embeds[: len(first)] @ embeds[len(first) :].T / 0.1
        targets = torch.arange(len(first))
        nce = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        attributes = heads.loss(encoder.vision_model.post_layernorm(output.last_hidden_state[:, 0]),
                                frames.attributes[torch.cat([first, second])])  # fmt: skip
        _step(optimizer, schedule, nce + attributes, parameters)
        return {"nce": nce.item(), "attributes": attributes.item()}

    state = {"encoder": encoder, "heads": heads, "optimizer": optimizer, "schedule": schedule}
    steps = config.image_encoder_steps
    record.add_stage("image_encoder", *_run(checkpoints, "image_encoder", steps, step, state, generator, config, log))
    encoder.eval().requires_grad_(False)
    if heldout is not None and len(heldout.captions):
        with _seeded(config.seed + 1):
            untrained = build_image_encoder()[0].eval()
        scores = {"trained": identity_retrieval(encoder, processor, heldout),
                  "untrained": identity_retrieval(untrained, processor, heldout)}  # fmt: skip
        record.metrics["image_encoder_heldout_retrieval_top1"] = scores
        log(f"[image_encoder] held-out identity retrieval (top-1): {scores}")
    return encoder, processor


@torch.no_grad()
def identity_retrieval(
    encoder: CLIPVisionModelWithProjection, processor: CLIPImageProcessor, frames: TrainingFrames
) -> dict[str, float]:
    """Top-1 accuracy of finding a subject's frame 0 (the gallery) from each of its other colour frames.

    Measured on the image embeddings and on the mean of the penultimate hidden states (what the adapter reads),
    by cosine similarity. Chance is one over the number of subjects.
    """
    pixels = reference_pixels(frames, processor)
    output = encoder(pixel_values=pixels, output_hidden_states=True)
    features = {"image_embeds": output.image_embeds, "penultimate": output.hidden_states[-2].mean(dim=1)}
    return {name: first_frame_retrieval(v, frames.subject_index, ~frames.is_sketch) for name, v in features.items()}


def first_frame_retrieval(embeddings: torch.Tensor, subject_index: torch.Tensor, usable: torch.Tensor) -> float:
    """Top-1 accuracy of finding each subject's first row (the gallery) from its other ``usable`` rows, by cosine."""
    first = torch.tensor([int(torch.nonzero(subject_index == s)[0]) for s in subject_index.unique()])
    is_gallery = torch.zeros(len(embeddings), dtype=torch.bool)
    is_gallery[first] = True
    queries = ~is_gallery & usable
    values = F.normalize(embeddings, dim=-1)
    nearest = (values[queries] @ values[is_gallery].T).argmax(dim=1)
    return float((subject_index[is_gallery][nearest] == subject_index[queries]).float().mean())


def _views_by_subject(frames: TrainingFrames, colour_only: bool = True) -> list[torch.Tensor]:
    """Each subject's frames (only its colour frames with ``colour_only``), for subjects with two or more."""
    usable = ~frames.is_sketch if colour_only else torch.ones_like(frames.is_sketch)
    views = [
        torch.nonzero(usable & (frames.subject_index == s)).flatten()
        for s in range(int(frames.subject_index.max()) + 1)
    ]
    return [v for v in views if len(v) >= 2]


def _view_pairs(
    views_of: list[torch.Tensor], batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    subjects = torch.randperm(len(views_of), generator=generator)[:batch_size]
    first, second = [], []
    for s in subjects.tolist():
        pick = torch.randperm(len(views_of[s]), generator=generator)[:2]
        first.append(views_of[s][pick[0]])
        second.append(views_of[s][pick[1]])
    return torch.stack(first), torch.stack(second)


def _flip_some(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


# --------------------------------------------------------------------------------------------------------------
# Stage 3: text encoder + UNet
# --------------------------------------------------------------------------------------------------------------


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them (padded to the max length)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_unet(
    frames: TrainingFrames,
    vae: AutoencoderKL | PatchAutoencoder,
    config: TrainBaseConfig,
    record: TrainingRecord,
    checkpoints: RunCheckpoints,
    log: Callable[[str], None] = print,
    snapshot: Callable[[Path, CLIPTextModel, UNet2DConditionModel, CLIPTokenizer], None] | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer]:
    """Train the text encoder and the UNet together on the frames' latents and captions; return the EMA weights.

    Runs on ``config.device`` under ``config.mixed_precision`` autocast; every random draw is made on the CPU, so a
    run's batches are the same on every device. ``snapshot(folder, text_encoder, unet, tokenizer)`` writes the EMA
    weights every ``config.snapshot_every`` steps.
    """
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(config.seed + 2)
    tokenizer = build_tokenizer()
    with _seeded(config.seed + 2):
        text_encoder, unet = _unet_stage_models(tokenizer, vae.config.latent_channels, config)
    scheduler = build_train_scheduler(config.prediction_type)
    mean, std = encode_latents(vae, frames.images)
    scaling = vae.config.scaling_factor
    plain_ids = tokenize(tokenizer, frames.captions)
    colored_ids = tokenize(tokenizer, frames.colored_captions)
    empty_ids = tokenize(tokenizer, [""])
    weights = loss_weights(scheduler.alphas_cumprod, config.prediction_type, config.min_snr_gamma)

    modules = torch.nn.ModuleList([text_encoder, unet]).to(device)
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.unet_lr, weight_decay=0.01)
    cycle = config.unet_steps // config.unet_lr_cycles
    schedule = _cosine_schedule(
        optimizer, config.unet_steps, warmup=min(100, cycle // 10), cycles=config.unet_lr_cycles
    )
    precision = _Precision(config.mixed_precision, device)

    def step(index: int) -> dict[str, float]:
        rows = _batch_indices(len(mean), config.unet_batch_size, generator)
        latents = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scaling
        colored = torch.rand(len(rows), generator=generator) < config.color_caption_prob
        ids = torch.where(colored[:, None], colored_ids[rows], plain_ids[rows])
        ids[torch.rand(len(ids), generator=generator) < config.cfg_dropout] = empty_ids[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(ids),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        noisy, target, ids, timesteps = (v.to(device) for v in (noisy, target, ids, timesteps))
        with precision.autocast():
            prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        per_sample = (prediction.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (weights.to(device)[timesteps] * per_sample).mean()
        precision.step(optimizer, schedule, loss, modules.parameters())
        _ema_update(ema, modules, min(config.ema_decay, (1 + index) / (10 + index)))
        if snapshot is not None and config.snapshot_every and (index + 1) % config.snapshot_every == 0:
            snapshot(Path(config.output_dir) / "snapshots" / f"step_{index + 1}", *ema, tokenizer)
        return {"mse": per_sample.mean().item()}

    state = {"modules": modules, "ema": ema, "optimizer": optimizer, "schedule": schedule, **precision.state()}
    record.add_stage("unet", *_run(checkpoints, "unet", config.unet_steps, step, state, generator, config, log))
    text_encoder, unet = (m.eval().cpu() for m in ema)
    return unet, text_encoder, tokenizer


def _unet_stage_models(
    tokenizer: CLIPTokenizer, latent_channels: int, config: TrainBaseConfig
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """New text encoder and UNet, or those of ``config.unet_init_from``, checked against the run's settings."""
    channels = tuple(int(c) for c in config.unet_channels.split(","))
    if config.unet_init_from is None:
        return build_text_encoder(tokenizer).train(), build_unet(latent_channels, channels).train()
    folder = Path(config.unet_init_from)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    found = (unet.config.in_channels, tuple(unet.config.block_out_channels))
    if found != (latent_channels, channels):
        raise ValueError(
            f"expected --unet_init_from to hold a UNet with {latent_channels} latent channels and widths {channels} "
            f"(the autoencoder's and --unet_channels), got {found[0]} and {found[1]} in '{folder / 'unet'}'"
        )
    return CLIPTextModel.from_pretrained(folder / "text_encoder").train(), unet.train()


class _Precision:
    """Autocast and the optimizer step for ``--mixed_precision`` (a loss scaler for fp16, as accelerate does)."""

    def __init__(self, mixed_precision: str, device: torch.device) -> None:
        self.dtype = PRECISIONS[mixed_precision]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def state(self) -> dict:
        return {"scaler": self.scaler} if self.scaler is not None else {}

    def step(self, optimizer, schedule, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.scaler is None:
            _step(optimizer, schedule, loss, parameters)
            return
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(parameters), 1.0)
        self.scaler.step(optimizer)
        self.scaler.update()
        schedule.step()


def loss_weights(alphas_cumprod: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights that cap the weight of the easy, low-noise steps (min-SNR-gamma).

    In x_0 terms an epsilon loss weighs a step by SNR and a v loss by SNR + 1. Epsilon gets min(SNR, gamma) (the
    min-SNR paper); v gets min(SNR + 1, gamma + 1), which keeps the weight of the high-noise steps, where the prompt
    decides the scene, at 1 instead of letting it vanish with SNR.
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if prediction_type == "epsilon":
        return torch.clamp(snr, max=gamma) / snr
    if prediction_type == "v_prediction":
        return torch.clamp((gamma + 1) / (snr + 1), max=1.0)
    raise ValueError(f"expected prediction_type 'epsilon' or 'v_prediction', got {prediction_type!r}")


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for average, current in zip(ema.parameters(), model.parameters()):
        average.lerp_(current, 1 - decay)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded (weight initialisation), leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _batch_indices(size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, size, (batch_size,), generator=generator)


def _cosine_schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int, cycles: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 5 % of the rate, over each of ``cycles`` equal parts of ``steps``.

    Several cycles are warm restarts (SGDR): the rate climbs back and decays again, and the first cycle is the
    schedule a run of ``steps / cycles`` steps has, so such a run can be continued into a longer one.
    """
    length = steps // cycles

    def factor(step: int) -> float:
        position = step % length if step < length * cycles else length - 1
        if position < warmup:
            return (position + 1) / warmup
        progress = (position - warmup) / max(1, length - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(optimizer, schedule, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(parameters), 1.0)
    optimizer.step()
    schedule.step()


def _run(checkpoints, stage, steps, step, state, generator, config: TrainBaseConfig, log):
    """:func:`run_steps` with the run's checkpoint and log intervals."""
    return run_steps(checkpoints, stage, steps, step, state, generator, config.checkpoint_every, log, config.log_every)


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def train_base(config: TrainBaseConfig, log: Callable[[str], None] = print) -> StableDiffusionPipeline:
    """Train the stages of ``config.stages`` (the others are loaded from ``config.init_from``) and save the pipeline.

    Writes ``output_dir`` as a ``save_pretrained`` pipeline folder plus ``train_log.json`` (configuration, wall and
    CPU time, loss curves and metrics of each stage). Uses ``config.threads`` torch threads while it runs.
    """
    unknown = set(config.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"expected stages among {STAGES}, got {sorted(unknown)}")
    with torch_threads(config.threads):
        return _train_and_save(config, log)


def _train_and_save(config: TrainBaseConfig, log: Callable[[str], None]) -> StableDiffusionPipeline:
    checkpoints = RunCheckpoints(config.output_dir, config.run_settings())
    record = TrainingRecord(**checkpoints.load_record())
    spec = WorldSpec(
        config.num_train_subjects, config.num_heldout_subjects, config.frames_per_subject, seed=config.seed
    )
    frames = render_training_frames(spec)
    log(f"rendered {len(frames.captions)} frames of {config.num_train_subjects} train subjects")
    previous = _load_previous(config) if set(STAGES) - set(config.stages) else None

    def run(stage: str, train: Callable[[], tuple], reuse: Callable[[], tuple]) -> tuple:
        """A stage's models: trained, read back from a finished stage's checkpoint, or taken from ``init_from``."""
        if stage not in config.stages:
            return reuse()
        names = _STAGE_MODELS[stage]
        folder = checkpoints.stage_dir(stage)
        if folder is not None:
            log(f"[{stage}] finished earlier: loading '{folder}'")
            return tuple(_load_model(name, folder / name) for name in names)
        models = train()
        checkpoints.save_stage(stage, lambda path: [m.save_pretrained(path / n) for n, m in zip(names, models)])
        checkpoints.save_record(asdict(record))
        # CPU time is recorded next to wall time: on a shared machine the wall time says little about the cost.
        log(f"[{stage}] done in {record.times[stage]:.0f} s ({record.times[f'{stage}_cpu']:.0f} s of CPU time)")
        return models

    (vae,) = run("vae", lambda: (make_autoencoder(frames, config, record, checkpoints, log),), lambda: (previous.vae,))
    if isinstance(vae, PatchAutoencoder):
        vae.set_whitening(config.latent_whitening)
    image_encoder, processor = run(
        "image_encoder",
        lambda: train_image_encoder(frames, config, record, checkpoints, log, render_training_frames(spec, "heldout")),
        lambda: (previous.image_encoder, previous.feature_extractor),
    )

    def save_pipeline(folder: Path, text_encoder, unet, tokenizer) -> StableDiffusionPipeline:
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, image_encoder, processor, config.prediction_type)
        pipe.save_pretrained(folder, safe_serialization=True)
        _portable_model_index(folder)
        return pipe

    unet, text_encoder, tokenizer = run(
        "unet",
        lambda: train_unet(
            render_training_frames(spec, max_rotation=config.unet_max_rotation),
            vae,
            config,
            record,
            checkpoints,
            log,
            snapshot=save_pipeline,
        ),  # fmt: skip
        lambda: (previous.unet, previous.text_encoder, previous.tokenizer),
    )
    output_dir = Path(config.output_dir)
    pipe = save_pipeline(output_dir, text_encoder, unet, tokenizer)
    record.times["total"] = sum(record.times[stage] for stage in config.stages)
    record.times["total_cpu"] = sum(record.times[f"{stage}_cpu"] for stage in config.stages)
    _write_log(output_dir, config, record)
    log(
        f"saved {output_dir}: the stages took {record.times['total']:.0f} s ({record.times['total_cpu']:.0f} s of CPU)"
    )
    return pipe


_STAGE_MODELS: dict[str, tuple[str, ...]] = {
    "vae": ("vae",),
    "image_encoder": ("image_encoder", "feature_extractor"),
    "unet": ("unet", "text_encoder", "tokenizer"),
}
"""The pipeline components each stage makes, in the order its function returns them (also their folder names)."""

_COMPONENT_CLASSES = {
    "vae": AutoencoderKL,
    "PatchAutoencoder": PatchAutoencoder,
    "image_encoder": CLIPVisionModelWithProjection,
    "feature_extractor": CLIPImageProcessor,
    "unet": UNet2DConditionModel,
    "text_encoder": CLIPTextModel,
    "tokenizer": CLIPTokenizer,
}


def _load_model(name: str, folder: Path):
    if name == "vae":  # either autoencoder, as its config names it
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name", "vae")
        name = name if name in _COMPONENT_CLASSES else "vae"
    model = _COMPONENT_CLASSES[name].from_pretrained(folder)
    return model.eval().requires_grad_(False) if isinstance(model, torch.nn.Module) else model


def _portable_model_index(output_dir: Path) -> None:
    """Record the feature extractor as ``CLIPImageProcessor``, the class every transformers version has.

    Without torchvision, transformers 5 builds its ``CLIPImageProcessorPil`` fallback, whose name
    ``save_pretrained`` would write, and which older transformers versions cannot load.
    """
    path = output_dir / "model_index.json"
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("feature_extractor", [None, None])[1] == "CLIPImageProcessorPil":
        index["feature_extractor"][1] = "CLIPImageProcessor"
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _load_previous(config: TrainBaseConfig) -> StableDiffusionPipeline:
    from .base_model import load_synthetic_base

    return load_synthetic_base(path=config.init_from or config.output_dir)


def _write_log(output_dir: Path, config: TrainBaseConfig, record: TrainingRecord) -> None:
    settings = {**asdict(config), "stages": list(config.stages)}
    log = {
        "config": settings,
        "wall_and_cpu_time_s": record.times,
        "final_losses": record.final_losses(config.log_every),
        "metrics": record.metrics,
        "curves": record.curves,
    }
    (output_dir / "train_log.json").write_text(json.dumps(log) + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> TrainBaseConfig:
    defaults = TrainBaseConfig(output_dir="")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], prog="python -m customcontrast_world.train_base"
    )
    parser.add_argument("--output_dir", required=True, help="where the pipeline folder is written")
    parser.add_argument("--steps", type=int, default=None, help="UNet steps (alias of --unet_steps)")
    parser.add_argument("--smoke", action="store_true", help="a tiny world and a few steps per stage (seconds)")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated stages to train; others are loaded"
    )
    for name, value in asdict(defaults).items():
        if name in ("output_dir", "stages"):
            continue
        kind = type(value) if value is not None else str
        parser.add_argument(f"--{name}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    steps, smoke = args.pop("steps"), args.pop("smoke")
    if steps is not None:
        args["unet_steps"] = steps
    args["stages"] = tuple(s for s in args["stages"].split(",") if s)
    if smoke:  # the smoke sizes, except what the command line set explicitly
        given = {k: v for k, v in args.items() if v != getattr(defaults, k, None) or k == "output_dir"}
        return TrainBaseConfig.smoke(**given)
    return TrainBaseConfig(**args)


def main(argv: Sequence[str] | None = None) -> None:
    train_base(parse_args(argv))


if __name__ == "__main__":
    main()
