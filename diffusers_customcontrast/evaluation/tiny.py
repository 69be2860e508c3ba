"""Tiny random models for trying the DreamBench evaluation offline: metric models, a pipeline and an adapter.

``python -m diffusers_customcontrast.evaluation.tiny --output_dir tiny-eval`` writes, with no network:

* ``clip/``: a CLIP model with its tokenizer and image processor (for CLIP-T and CLIP-I);
* ``dino/``: a ViT (for DINO);
* ``imagereward/``: an ImageReward checkpoint in the published layout (``ImageReward.pt`` + ``med_config.json``)
  and ``imagereward_tokenizer/``: its BERT tokenizer;
* ``pipeline/`` and ``adapter/``: a tiny Stable Diffusion 1.5-like pipeline and a random CustomContrast adapter.

``python -m diffusers_customcontrast.evaluate`` runs on these folders in well under a minute (docs/evaluation.md).
The weights are random: the scores exercise the whole evaluation, they measure nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, CLIPConfig, CLIPModel, ViTConfig, ViTModel

from .imagereward import CHECKPOINT_NAME, MED_CONFIG_NAME, ImageReward, with_image_reward_tokens

_COMMON = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
_BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Enough words for DreamBench's prompts to tokenize into more than [UNK]s.
_BERT_WORDS = [
    "a",
    "an",
    "the",
    "in",
    "on",
    "of",
    "with",
    "and",
    "wearing",
    "dog",
    "cat",
    "backpack",
    "red",
    "purple",
    "shiny",
    "wet",
    "cube",
    "shaped",
    "hat",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Seeded weights that leave the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_clip_model(vocab_size: int, seed: int = 0) -> CLIPModel:
    """A random CLIP with 32-wide, 2-layer text and vision towers (224 px, 32 px patches)."""
    text = {**_COMMON, "vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    vision = {**_COMMON, "image_size": 224, "patch_size": 32}
    with _seeded(seed):
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def tiny_dino_model(seed: int = 0) -> ViTModel:
    """A random 32-wide, 2-layer ViT with 16 px patches, without pooler (DINO's CLS token is used)."""
    with _seeded(seed):
        return ViTModel(ViTConfig(**_COMMON, image_size=224, patch_size=16), add_pooling_layer=False).eval()


def tiny_bert_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer over a few whole words, with ImageReward's two added tokens."""
    vocab = {token: index for index, token in enumerate([*_BERT_SPECIAL, *_BERT_WORDS])}
    return with_image_reward_tokens(BertTokenizer(vocab=vocab))


def tiny_image_reward(vocab_size: int, seed: int = 0) -> ImageReward:
    """A random ImageReward: a 64-wide, 2-layer ViT (one 64-wide head, 224 px, 32 px patches) and a 32-wide BERT."""
    vision = BlipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=224,
        patch_size=32,
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    text = BlipTextConfig(
        vocab_size=vocab_size,
        **_COMMON,
        max_position_embeddings=40,
        encoder_hidden_size=64,
        is_decoder=True,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )
    with _seeded(seed):
        return ImageReward(vision, text).eval()


def save_tiny_evaluation_models(output_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the tiny models of this module's docstring under ``output_dir``.

    Returns:
        Folder of each: ``clip``, ``dino``, ``imagereward``, ``imagereward_tokenizer``, ``pipeline``, ``adapter``.
    """
    # The pipeline builders are imported here: they pull in diffusers, which the metric models do not need.
    from ..testing.tiny_models import tiny_adapter, tiny_clip_tokenizer, tiny_sd15_pipeline

    root = Path(output_dir)
    folders = {name: root / name for name in ("clip", "dino", "imagereward", "imagereward_tokenizer")}
    folders.update(pipeline=root / "pipeline", adapter=root / "adapter")
    clip_tokenizer = tiny_clip_tokenizer()
    tiny_clip_model(len(clip_tokenizer), seed).save_pretrained(folders["clip"])
    clip_tokenizer.save_pretrained(folders["clip"])
    # The PIL processor: transformers 5 would pick a torchvision one where torchvision is installed.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_class().save_pretrained(folders["clip"])
    tiny_dino_model(seed).save_pretrained(folders["dino"])

    bert_tokenizer = tiny_bert_tokenizer()
    bert_tokenizer.save_pretrained(folders["imagereward_tokenizer"])
    reward = tiny_image_reward(len(bert_tokenizer), seed)
    folders["imagereward"].mkdir(parents=True, exist_ok=True)
    torch.save(reward.original_state_dict(), folders["imagereward"] / CHECKPOINT_NAME)
    (folders["imagereward"] / MED_CONFIG_NAME).write_text(json.dumps(reward.med_config(), indent=2) + "\n")

    # As SD1.5 on the hub: the pipeline folder has no image encoder; the adapter folder carries the one it expects.
    pipe = tiny_sd15_pipeline(seed)
    tiny_adapter(pipe, seed).save_pretrained(folders["adapter"])
    pipe.image_encoder.save_pretrained(folders["adapter"] / "image_encoder")
    tiny_sd15_pipeline(seed, image_encoder=False).save_pretrained(folders["pipeline"])
    return folders


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """``python -m diffusers_customcontrast.evaluation.tiny``: write the tiny models and print their folders."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_customcontrast.evaluation.tiny",
        description="Write tiny random CLIP, DINO and ImageReward models, a tiny SD1.5-like pipeline and a random "
        "CustomContrast adapter, for an offline try-out of the DreamBench evaluation.",
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write the model folders in (required).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default: %(default)s).")
    args = parser.parse_args(argv)
    folders = save_tiny_evaluation_models(args.output_dir, args.seed)
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return folders


if __name__ == "__main__":
    main()
