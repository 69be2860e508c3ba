"""DreamBench metrics: CLIP-T, ImageReward, CLIP-I and DINO.

Per generated image:

* ``clip_t``: cosine between the CLIP image embedding of the image and the CLIP text embedding of its prompt without
  identifier ("a dog in the jungle").
* ``image_reward``: ImageReward of the image for that prompt (:mod:`.imagereward`), when a reward model is given.
* ``clip_i`` / ``dino``: mean cosine between the image's CLIP / DINO embedding and those of **all** the subject's
  real images (the DreamBench protocol).
* ``clip_i_ref`` / ``dino_ref``: the same against the reference photo(s) the adapter was given only.

DINO uses the ViT CLS token (``last_hidden_state[:, 0]``) of images resized to 256 (shorter side, bicubic),
centre-cropped to 224 and normalised with the ImageNet mean and std, as in DreamBooth. Similarities are raw cosines
in [-1, 1] (the papers' tables print them as ".325").

The paper's R- and E- columns have two readings, both summarised (see docs/evaluation.md): by prompt kind
(``recontext_clip_i`` vs ``edit_clip_i``) and by the real images compared with (``clip_i_ref`` vs ``clip_i``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, ViTModel

from .dreambench import PROMPT_KINDS, RECONTEXTUALIZATION, load_rgb
from .imagereward import ImageRewardScorer
from .manifest import read_manifest
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, resize_crop_normalize

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"

DINO_RESIZE = 256
DINO_CROP = 224

# Per-image metrics, in report order.
METRICS = ("clip_t", "image_reward", "clip_i", "dino", "clip_i_ref", "dino_ref")
# Prefix of the per-prompt-kind summary keys (``recontext_clip_i``, ``edit_dino``, ``edit_count``...).
KIND_PREFIXES = {kind: "recontext" if kind == RECONTEXTUALIZATION else "edit" for kind in PROMPT_KINDS}

ImageInput = str | os.PathLike | Image.Image

# transformers 5 picks a torchvision backend for CLIPImageProcessor when torchvision is installed; the PIL one
# reproduces the reference CLIP preprocessing exactly on every machine (and is the only one in transformers 4).
_CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def dino_preprocess(images: Sequence[Image.Image], resize: int = DINO_RESIZE, crop: int = DINO_CROP) -> torch.Tensor:
    """DINO evaluation preprocessing: resize the shorter side (bicubic), centre crop, ImageNet normalisation.

    Built here rather than taken from a hub processor config so that the protocol is exactly that of DreamBooth's
    evaluation (``Resize(256, bicubic)``, ``CenterCrop(224)``, ``Normalize(ImageNet)`` on PIL images).

    Returns:
        A float32 tensor of shape ``(len(images), 3, crop, crop)``.
    """
    return resize_crop_normalize(images, resize=resize, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _as_image(image: ImageInput) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image)


def _normalize(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _pooled(output: Any) -> torch.Tensor:
    # transformers 4 returns the projected features as a tensor, transformers 5 as `pooler_output` of an output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DreamBenchScorer:
    """CLIP, DINO and (optionally) ImageReward models for the DreamBench metrics.

    Args:
        clip_model: A hub id or local folder of a CLIP model (with tokenizer and image processor), or a
            ``CLIPModel``.
        dino_model: A hub id or local folder of a DINO ViT, or a ``ViTModel``.
        image_reward: An :class:`~.imagereward.ImageRewardScorer` (``ImageRewardScorer.from_pretrained(...)``);
            ``None`` leaves ``image_reward`` out.
        clip_tokenizer: Tokenizer to use instead of loading one from ``clip_model`` (required when ``clip_model``
            is a model object).
        clip_image_processor: Image processor to use instead of loading one from ``clip_model``; when
            ``clip_model`` is a model object and none is given, the reference CLIP preprocessing at the model's
            image size is used.
        device: Device of the models; defaults to CUDA when available.
        dtype: Dtype of the CLIP and DINO models; embeddings are compared in float32 either way.
        batch_size: Images per forward pass.
        local_files_only: Do not try the hub (passed to ``from_pretrained``).
        revision: Hub revision of the CLIP and DINO models (passed to ``from_pretrained``).
        cache_dir: Hub cache folder (passed to ``from_pretrained``).
    """

    def __init__(
        self,
        clip_model: str | os.PathLike | CLIPModel = DEFAULT_CLIP_MODEL,
        dino_model: str | os.PathLike | ViTModel = DEFAULT_DINO_MODEL,
        *,
        image_reward: ImageRewardScorer | None = None,
        clip_tokenizer: Any | None = None,
        clip_image_processor: Any | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
        local_files_only: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.batch_size = batch_size
        hub_kwargs = {"local_files_only": local_files_only, "revision": revision, "cache_dir": cache_dir}
        self.clip_model = self._prepare(self._load_clip(clip_model, hub_kwargs))
        self.clip_tokenizer = clip_tokenizer or self._load_tokenizer(clip_model, hub_kwargs)
        self.clip_image_processor = clip_image_processor or self._load_image_processor(clip_model, hub_kwargs)
        self.dino_model = self._prepare(self._load_dino(dino_model, hub_kwargs))
        self.image_reward = image_reward
        # Embeddings of image files by resolved path: each real image is embedded once however often it is used.
        self._file_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def model_names(self) -> dict[str, str | None]:
        """What each metric model was loaded from (hub id or folder), for the report."""
        return {
            "clip": self.clip_model.config.name_or_path or type(self.clip_model).__name__,
            "dino": self.dino_model.config.name_or_path or type(self.dino_model).__name__,
            "image_reward": None if self.image_reward is None else (self.image_reward.name or "ImageReward"),
        }

    @staticmethod
    def _load_clip(model: str | os.PathLike | CLIPModel, hub_kwargs: Mapping[str, Any]) -> CLIPModel:
        if isinstance(model, torch.nn.Module):
            return model
        return CLIPModel.from_pretrained(model, **hub_kwargs)

    @staticmethod
    def _load_dino(model: str | os.PathLike | ViTModel, hub_kwargs: Mapping[str, Any]) -> ViTModel:
        if isinstance(model, torch.nn.Module):
            return model
        # Only the CLS token is used; the pooler head is not part of DINO's checkpoints.
        return ViTModel.from_pretrained(model, add_pooling_layer=False, **hub_kwargs)

    @staticmethod
    def _load_tokenizer(model: str | os.PathLike | CLIPModel, hub_kwargs: Mapping[str, Any]) -> Any:
        if isinstance(model, torch.nn.Module):
            raise ValueError("Pass clip_tokenizer when clip_model is a model object.")
        return AutoTokenizer.from_pretrained(model, **hub_kwargs)

    @staticmethod
    def _load_image_processor(model: str | os.PathLike | CLIPModel, hub_kwargs: Mapping[str, Any]) -> Any:
        if isinstance(model, torch.nn.Module):
            size = model.config.vision_config.image_size
            return _CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return _CLIPImageProcessor.from_pretrained(model, **hub_kwargs)

    def _prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def clip_image_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, shape ``(len(images), projection_dim)``, float32 on CPU."""
        return self._batched(images, self._clip_image_batch)

    @torch.no_grad()
    def dino_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised DINO CLS embeddings, shape ``(len(images), hidden_size)``, float32 on CPU."""
        return self._batched(images, self._dino_batch)

    @torch.no_grad()
    def clip_text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings, shape ``(len(texts), projection_dim)``, float32 on CPU."""
        max_length = min(
            self.clip_tokenizer.model_max_length, self.clip_model.config.text_config.max_position_embeddings
        )
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.clip_tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(self.device)
            features = self.clip_model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            chunks.append(_normalize(_pooled(features)).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)

    def image_rewards(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> torch.Tensor | None:
        """ImageReward of each image for its prompt, shape ``(len(images),)``; ``None`` without a reward model."""
        if self.image_reward is None:
            return None
        chunks = [
            self.image_reward(
                [_as_image(image) for image in images[start : start + self.batch_size]],
                prompts[start : start + self.batch_size],
            )
            for start in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    def real_image_embeds(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP and DINO embeddings of real images; image files are embedded once, then read from a cache."""
        keys = [None if isinstance(image, Image.Image) else str(Path(image).resolve()) for image in images]
        todo = [row for row, key in enumerate(keys) if key is None or key not in self._file_cache]
        fresh = {}
        if todo:
            batch = [images[row] for row in todo]
            for row, clip, dino in zip(todo, self.clip_image_embeds(batch), self.dino_embeds(batch)):
                fresh[row] = (clip, dino)
                if keys[row] is not None:
                    self._file_cache[keys[row]] = (clip, dino)
        pairs = [fresh[row] if row in fresh else self._file_cache[key] for row, key in enumerate(keys)]
        return torch.stack([clip for clip, _ in pairs]), torch.stack([dino for _, dino in pairs])

    def _batched(self, images: Sequence[ImageInput], embed: Any) -> torch.Tensor:
        # Images are opened per batch so that scoring thousands of files keeps few of them in memory.
        chunks = [
            embed([_as_image(image) for image in images[start : start + self.batch_size]])
            for start in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    def _clip_image_batch(self, images: list[Image.Image]) -> torch.Tensor:
        pixel_values = self.clip_image_processor(images=images, return_tensors="pt")["pixel_values"]
        features = self.clip_model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        return _normalize(_pooled(features)).cpu()

    def _dino_batch(self, images: list[Image.Image]) -> torch.Tensor:
        pixel_values = dino_preprocess(images).to(self.device, self.dtype)
        cls_tokens = self.dino_model(pixel_values=pixel_values).last_hidden_state[:, 0]
        return _normalize(cls_tokens).cpu()


def score_generations(
    scorer: DreamBenchScorer,
    manifest_or_records: str | os.PathLike | Iterable[Mapping[str, Any]],
    real_images_by_subject: Mapping[str, Sequence[ImageInput]],
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Score every generated image.

    Args:
        scorer: The metric models.
        manifest_or_records: A ``manifest.jsonl`` path or records with ``path``, ``subject`` and ``clip_text``, and
            optionally ``reference_images`` (the photos the adapter was given) and ``kind`` (for :func:`summarize`).
        real_images_by_subject: All real images (paths or PIL images) of each subject.
        batch_size: Generated images scored together; defaults to the scorer's batch size.

    Returns:
        One dict per image, in input order: the record plus the metrics of :data:`METRICS`; ``image_reward`` is
        ``None`` without a reward model, ``clip_i_ref`` and ``dino_ref`` are ``None`` for a record without
        ``reference_images``.
    """
    if isinstance(manifest_or_records, str | os.PathLike):
        records = read_manifest(Path(manifest_or_records))
    else:
        records = [dict(record) for record in manifest_or_records]
    missing = sorted({record["subject"] for record in records} - set(real_images_by_subject))
    if missing:
        raise KeyError(f"No real images given for subjects {missing}.")
    batch_size = batch_size or scorer.batch_size
    scored: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        scored.extend(_score_batch(scorer, records[start : start + batch_size], real_images_by_subject))
    return scored


def _score_batch(
    scorer: DreamBenchScorer,
    records: Sequence[dict[str, Any]],
    real_images_by_subject: Mapping[str, Sequence[ImageInput]],
) -> list[dict[str, Any]]:
    paths = [record["path"] for record in records]
    prompts = [record["clip_text"] for record in records]
    clip_images = scorer.clip_image_embeds(paths)
    dino_images = scorer.dino_embeds(paths)
    texts = scorer.clip_text_embeds(prompts)
    rewards = scorer.image_rewards(paths, prompts)
    scored = []
    for row, record in enumerate(records):
        real_clip, real_dino = scorer.real_image_embeds(real_images_by_subject[record["subject"]])
        metrics = {
            "clip_t": float(clip_images[row] @ texts[row]),
            "image_reward": None if rewards is None else float(rewards[row]),
            "clip_i": float((real_clip @ clip_images[row]).mean()),
            "dino": float((real_dino @ dino_images[row]).mean()),
            "clip_i_ref": None,
            "dino_ref": None,
        }
        if record.get("reference_images"):
            ref_clip, ref_dino = scorer.real_image_embeds(record["reference_images"])
            metrics["clip_i_ref"] = float((ref_clip @ clip_images[row]).mean())
            metrics["dino_ref"] = float((ref_dino @ dino_images[row]).mean())
        scored.append(dict(record, **metrics))
    return scored


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean metrics over images, overall and per prompt kind.

    Returns:
        ``count`` and the mean of each metric of :data:`METRICS` over all images, and for each prompt kind the same
        keys with the prefix ``recontext_`` or ``edit_`` (``recontext_clip_i``, ``edit_dino``, ``edit_count``...).
        A mean over no values is ``None``.
    """
    summary: dict[str, Any] = {"count": len(records), **_means(records)}
    for kind, prefix in KIND_PREFIXES.items():
        subset = [record for record in records if record.get("kind") == kind]
        summary[f"{prefix}_count"] = len(subset)
        summary.update({f"{prefix}_{name}": value for name, value in _means(subset).items()})
    return summary


def _means(records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for name in METRICS:
        values = [float(record[name]) for record in records if record.get(name) is not None]
        means[name] = math.fsum(values) / len(values) if values else None
    return means
