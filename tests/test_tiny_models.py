"""The tiny offline pipelines run, are deterministic, and behave like their full-size counterparts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import hf_hub_download
from PIL import Image

from diffusers_customcontrast.testing.tiny_models import (
    make_subject_image,
    tiny_clip_tokenizer,
    tiny_image_encoder,
    tiny_sd15_controlnet_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_controlnet_pipeline,
    tiny_sdxl_pipeline,
)

BUILDERS = {
    "sd15": tiny_sd15_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd15_controlnet": tiny_sd15_controlnet_pipeline,
    "sdxl_controlnet": tiny_sdxl_controlnet_pipeline,
}


def _generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    if "controlnet" in pipe.components:
        kwargs.setdefault("image", make_subject_image(0))
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a dog", num_inference_steps=2, output_type="np", generator=generator, **kwargs).images


def test_tokenizer_encodes_any_text_without_unknown_tokens():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer("A photo of sks dog, crème brûlée! 🐶", padding="max_length", truncation=True).input_ids
    assert len(ids) == tokenizer.model_max_length == 77
    assert ids[0] == tokenizer.bos_token_id
    content = ids[1 : ids.index(tokenizer.eos_token_id)]
    assert content and tokenizer.unk_token_id not in content
    assert tokenizer.decode(content) == "a photo of sks dog , crème brûlée ! 🐶"


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_runs_and_is_deterministic(name):
    pipe = BUILDERS[name]()
    first, second = _generate(pipe), _generate(pipe)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    # A rebuilt pipeline has the same weights: the seed fully determines the model.
    np.testing.assert_array_equal(first, _generate(BUILDERS[name]()))


def test_seed_changes_the_weights():
    a, b = tiny_sd15_pipeline(seed=0), tiny_sd15_pipeline(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert not torch.equal(a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight)


def test_builders_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_sd15_pipeline()
    torch.testing.assert_close(torch.rand(3), expected)


def test_sd15_unet_has_several_cross_attention_layers(sd15_pipe):
    cross_attention = [name for name in sd15_pipe.unet.attn_processors if name.endswith("attn2.processor")]
    assert len(cross_attention) >= 8
    assert {name.split(".")[0] for name in cross_attention} == {"down_blocks", "mid_block", "up_blocks"}


def test_sdxl_conditioning_dimensions_are_consistent(sdxl_pipe):
    unet = sdxl_pipe.unet.config
    text_hidden = sdxl_pipe.text_encoder.config.hidden_size + sdxl_pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == text_hidden
    pooled = sdxl_pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pooled


@pytest.mark.parametrize("builder", [tiny_sd15_pipeline, tiny_sdxl_pipeline])
def test_image_encoder_is_optional(builder):
    pipe = builder(image_encoder=False)
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert _generate(pipe).shape == (1, 64, 64, 3)


def test_image_encoder_embeds_subject_images(subject_image, subject_image_b):
    encoder, processor = tiny_image_encoder()
    pixels = processor([subject_image, subject_image_b], return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = encoder(pixels).image_embeds
    assert embeds.shape == (2, encoder.config.projection_dim)
    assert not torch.allclose(embeds[0], embeds[1])
    assert tiny_image_encoder(hidden_size=48)[0].config.hidden_size == 48


@pytest.mark.parametrize("fixture", ["sd15_pipe", "sdxl_pipe"])
def test_pipeline_encodes_subject_images(request, fixture, subject_image):
    pipe = request.getfixturevalue(fixture)
    embeds, negative = pipe.encode_image(subject_image, "cpu", 1)
    assert embeds.shape == negative.shape == (1, pipe.image_encoder.config.projection_dim)


def test_controlnet_responds_to_the_control_image(sd15_controlnet_pipe, subject_image, subject_image_b):
    a = _generate(sd15_controlnet_pipe, image=subject_image)
    b = _generate(sd15_controlnet_pipe, image=subject_image_b)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("fixture", "pipeline_cls"),
    [
        ("sd15_pipe", StableDiffusionImg2ImgPipeline),
        ("sd15_pipe", StableDiffusionInpaintPipeline),
        ("sdxl_pipe", StableDiffusionXLImg2ImgPipeline),
        ("sdxl_pipe", StableDiffusionXLInpaintPipeline),
    ],
)
def test_from_pipe_gives_img2img_and_inpaint(request, fixture, pipeline_cls, subject_image):
    base = request.getfixturevalue(fixture)
    pipe = pipeline_cls.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet is base.unet and pipe.image_encoder is base.image_encoder
    kwargs = {"image": subject_image, "strength": 0.75}
    if "Inpaint" in pipeline_cls.__name__:
        kwargs["mask_image"] = Image.new("L", subject_image.size, 255)
    image = _generate(pipe, **kwargs)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_subject_images_are_seeded():
    a, b = make_subject_image(0), make_subject_image(1)
    assert a.mode == "RGB" and a.size == (64, 64)
    assert make_subject_image(0, size=96).size == (96, 96)
    assert np.array_equal(np.asarray(a), np.asarray(make_subject_image(0)))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    # A shape on white: the corners stay background while some pixels are coloured.
    pixels = np.asarray(a)
    assert (pixels == 255).all(axis=-1).any() and (pixels != 255).any(axis=-1).any()


# diffusers itself still passes this deprecated argument to huggingface_hub.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_offline_hub_serves_saved_models(offline_hub, tmp_path):
    unet = tiny_sd15_pipeline(image_encoder=False).unet
    unet.save_pretrained(tmp_path / "tiny-unet")
    snapshot = offline_hub(tmp_path / "tiny-unet", "org/tiny-unet")

    config_path = hf_hub_download("org/tiny-unet", "config.json")
    assert config_path.startswith(str(snapshot))
    loaded = UNet2DConditionModel.from_pretrained("org/tiny-unet")
    for name, tensor in unet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
