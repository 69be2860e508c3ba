"""Tests of the ImageReward loader against a plain reference forward of the original architecture.

A tiny random reward model is written in the layout of the published ``ImageReward.pt`` (key names of BLIP's
``vit.py`` / ``med.py`` and the MLP head, built by hand here, not from our modules) with a ``med_config.json``, and
scored by our loader; the reference forward below recomputes the original maths with explicit tensor ops from that
state dict, with the published mean / std and preprocessing constants written out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer

from diffusers_customcontrast.evaluation.imagereward import (
    ImageRewardScorer,
    convert_image_reward_checkpoint,
    image_reward_preprocess,
    load_original_state_dict,
    main,
)

VISION = {"hidden": 128, "layers": 2, "heads": 2, "mlp": 256, "patch": 32, "image": 224}
TEXT = {"hidden": 32, "layers": 2, "heads": 4, "intermediate": 48, "positions": 40}
HEAD = (1024, 128, 64, 16)
WORDS = [
    "a",
    "an",
    "the",
    "dog",
    "backpack",
    "cat",
    "in",
    "on",
    "with",
    "of",
    "jungle",
    "snow",
    "beach",
    "city",
    "background",
    "red",
    "hat",
    "wearing",
    "chef",
    "outfit",
]


def tiny_bert_tokenizer() -> BertTokenizer:
    """An in-memory BERT WordPiece tokenizer with a few whole words (anything else is [UNK])."""
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return BertTokenizer(vocab=vocab)


def _med_config() -> dict:
    # As the published file: a BertConfig, whose encoder_width BLIP overrides with the image encoder's width.
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TEXT["hidden"],
        "intermediate_size": TEXT["intermediate"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": TEXT["positions"],
        "model_type": "bert",
        "num_attention_heads": TEXT["heads"],
        "num_hidden_layers": TEXT["layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(tiny_bert_tokenizer()) + 2,  # + [DEC] and [ENC], as bert-base-uncased's 30522 + 2
        "encoder_width": 768,
        "add_cross_attention": True,
    }


def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original checkpoint's key names (BLIP vit.py / med.py, ImageReward's MLP)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state: dict[str, torch.Tensor] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        state[f"{name}.weight"] = randn(out_features, in_features, scale=1 / math.sqrt(in_features))
        state[f"{name}.bias"] = randn(out_features)

    def norm(name: str, width: int) -> None:
        state[f"{name}.weight"] = 1 + randn(width)
        state[f"{name}.bias"] = randn(width)

    d, v = VISION["hidden"], "blip.visual_encoder."
    grid = VISION["image"] // VISION["patch"]
    # Embeddings of about 1e-3: their variance is near the ViT's layer-norm epsilon, so a wrong epsilon shows.
    state[v + "cls_token"] = randn(1, 1, d, scale=1e-3)
    state[v + "pos_embed"] = randn(1, grid * grid + 1, d, scale=1e-3)
    state[v + "patch_embed.proj.weight"] = randn(d, 3, VISION["patch"], VISION["patch"], scale=2e-5)
    state[v + "patch_embed.proj.bias"] = randn(d, scale=1e-3)
    for i in range(VISION["layers"]):
        block = f"{v}blocks.{i}."
        norm(block + "norm1", d)
        linear(block + "attn.qkv", 3 * d, d)
        linear(block + "attn.proj", d, d)
        norm(block + "norm2", d)
        linear(block + "mlp.fc1", VISION["mlp"], d)
        linear(block + "mlp.fc2", d, VISION["mlp"])
    norm(v + "norm", d)

    h, t = TEXT["hidden"], "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = randn(_med_config()["vocab_size"], h, scale=1.0)
    state[t + "embeddings.position_embeddings.weight"] = randn(TEXT["positions"], h, scale=0.5)
    state[t + "embeddings.position_ids"] = torch.arange(TEXT["positions"]).unsqueeze(0)
    norm(t + "embeddings.LayerNorm", h)
    for i in range(TEXT["layers"]):
        layer = f"{t}encoder.layer.{i}."
        for attention, kv_width in (("attention", h), ("crossattention", d)):
            linear(f"{layer}{attention}.self.query", h, h)
            linear(f"{layer}{attention}.self.key", h, kv_width)
            linear(f"{layer}{attention}.self.value", h, kv_width)
            linear(f"{layer}{attention}.output.dense", h, h)
            norm(f"{layer}{attention}.output.LayerNorm", h)
        linear(layer + "intermediate.dense", TEXT["intermediate"], h)
        linear(layer + "output.dense", h, TEXT["intermediate"])
        norm(layer + "output.LayerNorm", h)
    # BLIP_Pretrain's contrastive projections are in the published state dict but unused by the reward.
    linear("blip.vision_proj", 256, d)
    linear("blip.text_proj", 256, h)

    widths = [h, *HEAD, 1]
    for position, (in_features, out_features) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        linear(f"mlp.layers.{position}", out_features, in_features)
    return state


def save_tiny_image_reward(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``ImageReward.pt`` (a plain ``torch.save`` state dict, as published) and ``med_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = original_state_dict(seed)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(_med_config()))
    return state


# ------------------------------------------------------------------------------------------- reference forward


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None):
    batch, queries, width = q.shape
    split = [x.reshape(batch, -1, heads, width // heads).transpose(1, 2) for x in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(width // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(batch, queries, width)


def reference_rewards(
    state: dict[str, torch.Tensor], pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The original ImageReward.score maths, written with explicit ops on the original state dict."""

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    def ln(x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)

    v = "blip.visual_encoder."
    x = F.conv2d(pixel_values, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=32)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[v + "cls_token"].expand(len(x), -1, -1), x], dim=1) + state[v + "pos_embed"]
    for i in range(VISION["layers"]):
        block = f"{v}blocks.{i}."
        q, k, value = lin(ln(x, block + "norm1", 1e-6), block + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, value, VISION["heads"]), block + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, block + "norm2", 1e-6), block + "mlp.fc1")), block + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    positions = torch.arange(input_ids.shape[1])
    h = state[t + "embeddings.word_embeddings.weight"][input_ids]
    h = ln(h + state[t + "embeddings.position_embeddings.weight"][positions], t + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(TEXT["layers"]):
        layer = f"{t}encoder.layer.{i}."
        for attention, context, bias in (("attention", None, padding), ("crossattention", image, None)):
            kv = h if context is None else context
            p = f"{layer}{attention}."
            attended = _attention(
                lin(h, p + "self.query"), lin(kv, p + "self.key"), lin(kv, p + "self.value"), 4, bias
            )
            h = ln(lin(attended, p + "output.dense") + h, p + "output.LayerNorm", 1e-12)
        h = ln(
            lin(F.gelu(lin(h, layer + "intermediate.dense")), layer + "output.dense") + h,
            layer + "output.LayerNorm",
            1e-12,
        )
    reward = h[:, 0]
    for position in (0, 2, 4, 6, 7):
        reward = lin(reward, f"mlp.layers.{position}")
    return (reward.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _reference_pixels(image: Image.Image) -> torch.Tensor:
    # For images whose shorter side is already 224: no resize, a centre crop, then the CLIP mean / std.
    array = np.asarray(image, dtype=np.float32) / 255.0
    height, width = array.shape[:2]
    top, left = round((height - 224) / 2), round((width - 224) / 2)
    array = array[top : top + 224, left : left + 224]
    array = (array - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(300, 224), (224, 260), (224, 224), (250, 224)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# The last prompt is longer than the 35 tokens ImageReward keeps.
PROMPTS = ["a dog in the jungle", "a red backpack", "a cat wearing a red chef hat on the beach", "a dog " * 20]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imagereward")
    save_tiny_image_reward(folder)
    return folder


# ----------------------------------------------------------------------------------------------------- tests


def test_scores_equal_the_reference_forward(reward_folder: Path) -> None:
    scorer = ImageRewardScorer.from_pretrained(reward_folder, tokenizer=tiny_bert_tokenizer(), device="cpu")
    images = _images()
    rewards = scorer(images, PROMPTS)

    tokens = tiny_bert_tokenizer()(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = torch.stack([_reference_pixels(image) for image in images])
    state = torch.load(reward_folder / "ImageReward.pt", weights_only=True)
    expected = reference_rewards(state, pixels, tokens["input_ids"], tokens["attention_mask"])
    assert rewards.shape == (4,)
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5)
    # The rewards depend on both the image and the prompt, so equal values are not an accident of the model.
    assert float(rewards.std()) > 1e-2
    assert not torch.allclose(scorer(images, PROMPTS[::-1]), rewards)
    assert not torch.allclose(scorer(images, [PROMPTS[0]] * 4), scorer(images[:1] * 4, [PROMPTS[0]] * 4))
    # Scored one at a time: padding to a fixed length makes every reward independent of its batch.
    torch.testing.assert_close(torch.cat([scorer([i], [p]) for i, p in zip(images, PROMPTS)]), rewards)


def test_tokenizer_gets_the_original_special_tokens_and_length(reward_folder: Path) -> None:
    base = len(tiny_bert_tokenizer())
    scorer = ImageRewardScorer.from_pretrained(reward_folder, tokenizer=tiny_bert_tokenizer(), device="cpu")
    tokenizer = scorer.tokenizer
    assert len(tokenizer) == base + 2
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base, base + 1] and tokenizer.bos_token == "[DEC]"
    ids = tokenizer(["a dog in the jungle"], padding="max_length", truncation=True, max_length=35)["input_ids"][0]
    words = [tokenizer.convert_tokens_to_ids(word) for word in ["a", "dog", "in", "the", "jungle"]]
    assert ids == [2, *words, 3] + [0] * (35 - len(words) - 2)


def test_preprocessing_resizes_the_shorter_side_and_crops_the_centre() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (336, 448, 3), dtype=np.uint8))
    pixels = image_reward_preprocess([image])
    # torchvision's Resize(224, bicubic): 448 x 336 -> 298 x 224 (the long side truncated); CenterCrop(224): x 37.
    expected = _reference_pixels(image.resize((298, 224), Image.Resampling.BICUBIC))
    assert pixels.shape == (1, 3, 224, 224)
    torch.testing.assert_close(pixels[0], expected)
    torch.testing.assert_close(image_reward_preprocess(_images()[:1])[0], _reference_pixels(_images()[0]))


def test_safetensors_conversion_scores_the_same(reward_folder: Path, tmp_path: Path) -> None:
    target = convert_image_reward_checkpoint(reward_folder / "ImageReward.pt", tmp_path / "converted")
    assert target.name == "ImageReward.safetensors" and (tmp_path / "converted" / "med_config.json").is_file()
    original = load_original_state_dict(reward_folder / "ImageReward.pt")
    converted = load_original_state_dict(target)
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)

    main(["--model", str(reward_folder), "--output_dir", str(tmp_path / "cli")])
    images = _images()
    scores = [
        ImageRewardScorer.from_pretrained(folder, tokenizer=tiny_bert_tokenizer(), device="cpu")(images, PROMPTS)
        for folder in (reward_folder, tmp_path / "converted", tmp_path / "cli")
    ]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_holding_code_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    torch.save({"weight": torch.zeros(1), "payload": _RunsCode(marker)}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="tensors-only"):
        load_original_state_dict(tmp_path / "ImageReward.pt")
    assert not marker.exists()


def test_bad_checkpoints_get_one_clear_error(reward_folder: Path, tmp_path: Path) -> None:
    med_config = reward_folder / "med_config.json"
    state = original_state_dict()

    def write(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        torch.save(tensors, tmp_path / name)
        return tmp_path / name

    missing = write("missing.pt", {k: v for k, v in state.items() if "blocks.1.mlp.fc2" not in k})
    with pytest.raises(ValueError, match="lacks 2 weights"):
        ImageRewardScorer.from_pretrained(missing, med_config=med_config, tokenizer=tiny_bert_tokenizer())
    unknown = write("unknown.pt", {**state, "blip.text_decoder.cls.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="unknown keys"):
        ImageRewardScorer.from_pretrained(unknown, med_config=med_config, tokenizer=tiny_bert_tokenizer())
    wrong_config = tmp_path / "wrong_med_config.json"
    wrong_config.write_text(json.dumps({**_med_config(), "intermediate_size": 64}))
    with pytest.raises(ValueError, match="does not match med_config.json"):
        ImageRewardScorer.from_pretrained(reward_folder, med_config=wrong_config, tokenizer=tiny_bert_tokenizer())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageRewardScorer.from_pretrained(tmp_path / "nowhere" / "ImageReward.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No ImageReward.safetensors or ImageReward.pt"):
        ImageRewardScorer.from_pretrained(tmp_path / "empty")
    big = BertTokenizer(
        vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "x"])}
    )
    with pytest.raises(ValueError, match="tokenizer has"):
        ImageRewardScorer.from_pretrained(reward_folder, tokenizer=big)


def test_original_layout_round_trip() -> None:
    from diffusers_customcontrast.evaluation.tiny import tiny_bert_tokenizer as library_tokenizer
    from diffusers_customcontrast.evaluation.tiny import tiny_image_reward

    model = tiny_image_reward(len(library_tokenizer()), seed=3)
    state = model.original_state_dict()
    assert "blip.visual_encoder.blocks.1.attn.proj.weight" in state and "mlp.layers.7.bias" in state
    assert "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight" in state
    rebuilt = type(model).from_original_state_dict(state, model.med_config())
    pixels, ids = torch.randn(2, 3, 224, 224), torch.randint(0, len(library_tokenizer()), (2, 35))
    mask = torch.ones(2, 35, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels, ids, mask), model(pixels, ids, mask), rtol=0, atol=0)
