"""The inference plugin: pipe.load_customcontrast / set_customcontrast_scale / unload_customcontrast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

import diffusers_customcontrast as dcc
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter

STEPS = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def generate(pipe, prompt="a photo of a dog", seed=0, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**STEPS, **kwargs}).images


@pytest.fixture(params=["sd15", "sdxl"])
def pipe(request, sd15_pipe, sdxl_pipe):
    return {"sd15": sd15_pipe, "sdxl": sdxl_pipe}[request.param]


def test_zero_scales_equal_base_and_subject_changes_output(pipe, subject_image, subject_image_b):
    base = generate(pipe)
    pipe.load_customcontrast(tiny_adapter(pipe))

    pipe.set_customcontrast_scale(0.0, s_plus_scale=0.0)
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=subject_image), base)

    pipe.set_customcontrast_scale(1.0, s_plus_scale=1.0)
    with_subject = generate(pipe, ip_adapter_image=subject_image)
    assert np.abs(with_subject - base).max() > 1e-3
    assert np.abs(generate(pipe, ip_adapter_image=subject_image_b) - with_subject).max() > 1e-4
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=subject_image), with_subject)


@pytest.mark.parametrize("scale, s_plus_scale", [(0.0, 1.0), (1.0, 0.0)])
def test_each_branch_alone_has_an_effect(sd15_pipe, subject_image, scale, s_plus_scale):
    base = generate(sd15_pipe)
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    sd15_pipe.set_customcontrast_scale(scale, s_plus_scale=s_plus_scale)
    assert np.abs(generate(sd15_pipe, ip_adapter_image=subject_image) - base).max() > 1e-4


def test_unload_is_exact_and_reload_works(pipe, subject_image):
    base = generate(pipe)
    processors = dict(pipe.unet.attn_processors)
    adapter = tiny_adapter(pipe)
    pipe.load_customcontrast(adapter)
    first = generate(pipe, ip_adapter_image=subject_image)

    assert pipe.unload_customcontrast() is adapter
    np.testing.assert_array_equal(generate(pipe), base)
    assert pipe.unet.attn_processors == processors
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    assert not pipe.unet._forward_pre_hooks
    assert pipe.image_encoder is not None

    pipe.load_customcontrast(adapter)
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=subject_image), first)


def test_precomputed_embeddings_match_images(sd15_pipe, subject_image):
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    from_image = generate(sd15_pipe, ip_adapter_image=subject_image)
    embeds = sd15_pipe.prepare_ip_adapter_image_embeds(subject_image, None, "cpu", 1, True)
    np.testing.assert_allclose(generate(sd15_pipe, ip_adapter_image_embeds=embeds), from_image, atol=1e-6)


def test_several_prompts_and_images_per_prompt(sd15_pipe, subject_image):
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    images = generate(sd15_pipe, ["a dog", "a cat"], ip_adapter_image=subject_image, num_images_per_prompt=2)
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()
    alone = generate(sd15_pipe, "a cat", ip_adapter_image=subject_image)
    assert np.abs(images[2] - alone[0]).max() > 0  # different noise, still runs for one prompt
    no_cfg = generate(sd15_pipe, ip_adapter_image=subject_image, guidance_scale=1.0)
    assert np.isfinite(no_cfg).all()


def test_two_subjects_with_masks(sd15_pipe, subject_image, subject_image_b):
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    processor = IPAdapterMaskProcessor()

    def run(masks):
        mask_tensor = processor.preprocess([Image.fromarray(m) for m in masks], height=64, width=64)
        return generate(
            sd15_pipe,
            ip_adapter_image=[[subject_image, subject_image_b]],
            cross_attention_kwargs={"ip_adapter_masks": [mask_tensor.reshape(1, 2, 64, 64)]},
        )

    split = run([left, 255 - left])
    swapped = run([255 - left, left])
    assert np.abs(split - swapped).max() > 1e-4
    # Without masks each subject is gated by its own location map.
    assert np.isfinite(generate(sd15_pipe, ip_adapter_image=[[subject_image, subject_image_b]])).all()


def test_wrong_mask_shape_is_refused(sd15_pipe, subject_image):
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    with pytest.raises(ValueError, match="ip_adapter_masks"):
        generate(
            sd15_pipe,
            ip_adapter_image=[[subject_image]],
            cross_attention_kwargs={"ip_adapter_masks": [torch.ones(1, 3, 64, 64)]},
        )


def test_per_block_and_per_layer_scales(sd15_pipe, subject_image):
    adapter = tiny_adapter(sd15_pipe)
    sd15_pipe.load_customcontrast(adapter)
    names = adapter.config.layer_names
    sd15_pipe.set_customcontrast_scale({"up": {"block_1": [0.0, 1.0, 0.0]}}, s_plus_scale=0.5)
    processors = sd15_pipe.unet.attn_processors
    scales = {name: processors[name].scale[0] for name in names}
    assert scales["up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"] == 1.0
    assert sum(scales.values()) == 1.0
    assert {processors[name].s_plus_scale for name in names} == {0.5}

    per_layer = [0.1 * i for i in range(len(names))]
    sd15_pipe.set_customcontrast_scale(per_layer)
    assert [processors[name].scale[0] for name in names] == per_layer
    with pytest.raises(ValueError, match="one value per cross-attention layer"):
        sd15_pipe.set_customcontrast_scale([1.0, 2.0])
    assert np.isfinite(generate(sd15_pipe, ip_adapter_image=subject_image)).all()


def test_save_load_round_trip_local_and_hub(sd15_pipe, subject_image, tmp_path, offline_hub):
    adapter = tiny_adapter(sd15_pipe, seed=3)
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    sd15_pipe.load_customcontrast(adapter)
    reference = generate(sd15_pipe, ip_adapter_image=subject_image)

    sd15_pipe.load_customcontrast(str(tmp_path / "adapter"))
    np.testing.assert_array_equal(generate(sd15_pipe, ip_adapter_image=subject_image), reference)

    offline_hub(tmp_path / "adapter", "org/customcontrast-tiny")
    sd15_pipe.load_customcontrast("org/customcontrast-tiny", local_files_only=True)
    np.testing.assert_array_equal(generate(sd15_pipe, ip_adapter_image=subject_image), reference)

    loaded = dcc.CustomContrastAdapter.from_pretrained(tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), adapter.state_dict().values()))


def test_image_encoder_comes_with_the_adapter_folder(tmp_path, subject_image):
    from diffusers_customcontrast.testing.tiny_models import tiny_sd15_pipeline

    source = tiny_sd15_pipeline()
    adapter = tiny_adapter(source)
    adapter.save_pretrained(tmp_path / "adapter")
    source.image_encoder.save_pretrained(tmp_path / "adapter" / "image_encoder")

    pipe = tiny_sd15_pipeline(image_encoder=False)
    pipe.load_customcontrast(str(tmp_path / "adapter"))
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    assert np.isfinite(generate(pipe, ip_adapter_image=subject_image)).all()


def test_img2img_inpaint_and_controlnet(sd15_pipe, sd15_controlnet_pipe, subject_image):
    adapter = tiny_adapter(sd15_pipe)
    sd15_pipe.load_customcontrast(adapter)
    init = make_subject_image(7)
    for cls, extra in (
        (StableDiffusionImg2ImgPipeline, {"image": init, "strength": 0.9}),
        (StableDiffusionInpaintPipeline, {"image": init, "mask_image": Image.new("L", (64, 64), 255)}),
    ):
        variant = cls.from_pipe(sd15_pipe)
        variant.set_progress_bar_config(disable=True)
        with_subject = generate(variant, ip_adapter_image=subject_image, num_inference_steps=3, **extra)
        variant.set_customcontrast_scale(0.0, s_plus_scale=0.0)
        without = generate(variant, ip_adapter_image=subject_image, num_inference_steps=3, **extra)
        variant.set_customcontrast_scale(1.0, s_plus_scale=1.0)
        assert np.abs(with_subject - without).max() > 1e-4, cls.__name__

    pipe = sd15_controlnet_pipe
    pipe.load_customcontrast(tiny_adapter(pipe))
    control_a, control_b = make_subject_image(1), make_subject_image(2)
    both = generate(pipe, ip_adapter_image=subject_image, image=control_a)
    assert np.abs(generate(pipe, ip_adapter_image=subject_image, image=control_b) - both).max() > 1e-5
    pipe.set_customcontrast_scale(0.0, s_plus_scale=0.0)
    assert np.abs(generate(pipe, ip_adapter_image=subject_image, image=control_a) - both).max() > 1e-4


def test_t2i_adapter_pipelines(sdxl_pipe, sd15_pipe, subject_image):
    """SDXL's T2I-Adapter pipeline has IP-Adapter support and takes a subject; SD1.5's has none and is refused."""
    from diffusers import StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline, T2IAdapter

    def t2i_adapter(**kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, **kwargs)

    pipe = StableDiffusionXLAdapterPipeline.from_pipe(
        sdxl_pipe, adapter=t2i_adapter(downscale_factor=4, adapter_type="full_adapter_xl")
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_customcontrast(tiny_adapter(sdxl_pipe))
    layout = make_subject_image(3)
    with_subject = generate(pipe, ip_adapter_image=subject_image, image=layout)
    pipe.set_customcontrast_scale(0.0, s_plus_scale=0.0)
    assert np.abs(generate(pipe, ip_adapter_image=subject_image, image=layout) - with_subject).max() > 1e-4

    components = {k: v for k, v in sd15_pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    sd15_t2i = StableDiffusionAdapterPipeline(
        **components, adapter=t2i_adapter(downscale_factor=2), feature_extractor=None
    )
    assert not hasattr(sd15_t2i, "load_customcontrast")  # importing the package adds nothing where it cannot work
    with pytest.raises(ValueError, match="StableDiffusionAdapterPipeline has no IP-Adapter support"):
        dcc.load_customcontrast(sd15_t2i, tiny_adapter(sd15_pipe))


def test_sdxl_img2img(sdxl_pipe, subject_image):
    sdxl_pipe.load_customcontrast(tiny_adapter(sdxl_pipe))
    variant = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl_pipe)
    variant.set_progress_bar_config(disable=True)
    out = generate(variant, ip_adapter_image=subject_image, image=make_subject_image(4), strength=0.9)
    assert np.isfinite(out).all()


def test_lora_and_customcontrast_compose(sd15_pipe, subject_image):
    from peft import LoraConfig

    sd15_pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    both = generate(sd15_pipe, ip_adapter_image=subject_image)
    sd15_pipe.unet.disable_adapters()
    assert np.abs(generate(sd15_pipe, ip_adapter_image=subject_image) - both).max() > 1e-4
    sd15_pipe.unet.enable_adapters()
    sd15_pipe.set_customcontrast_scale(0.0, s_plus_scale=0.0)
    assert np.abs(generate(sd15_pipe, ip_adapter_image=subject_image) - both).max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(sd15_pipe, subject_image, dtype):
    sd15_pipe.to(dtype=dtype)
    adapter = sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    assert adapter.dtype == dtype
    out = generate(sd15_pipe, ip_adapter_image=subject_image)
    assert np.isfinite(out).all()


def test_location_maps_are_recorded(sd15_pipe, subject_image):
    adapter = sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    with dcc.record_customcontrast(sd15_pipe) as recording:
        generate(sd15_pipe, ip_adapter_image=subject_image)
    assert len(recording.steps) == STEPS["num_inference_steps"]  # one record per UNet call
    assert [int(step.timesteps[0]) for step in recording.steps] == sd15_pipe.scheduler.timesteps.tolist()
    assert sorted(recording.location_maps) == list(range(adapter.num_layers))
    for maps in recording.location_maps.values():
        assert maps.shape[:2] == (2, 1) and maps.shape[2] == maps.shape[3]
        assert ((maps > 0) & (maps < 1)).all()
    assert recording.tokens.s_plus.shape[1] == adapter.num_layers


@pytest.mark.parametrize("family, layers, widths", [("sd15", 16, {320, 640, 1280}), ("sdxl", 70, {640, 1280})])
def test_full_size_layouts_on_meta(family, layers, widths):
    from diffusers_customcontrast.models.architectures import full_size_unet

    unet = full_size_unet(family)
    adapter = dcc.CustomContrastAdapter.from_unet(unet, image_embed_dim=1280)
    assert adapter.num_layers == layers and adapter.config.base_family == family
    assert set(adapter.config.layer_hidden_sizes) == widths
    context = {"sd15": 768, "sdxl": 2048}[family]
    for name, layer in zip(adapter.config.layer_names, adapter.layers):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert layer.to_k_ip.weight.shape == (attn.to_k.out_features, context)


@pytest.mark.parametrize(
    "scale",
    [
        {"up": {"block_0": [0.0, 1.0, 0.0]}},
        {"down": 0.5, "mid": 0.25},
        {"down": {"block_1": [0.3, 0.7]}, "up": 1.0},
        {"mid": 2.0, "up": {"block_0": 0.5}},
    ],
)
def test_per_block_scales_expand_as_diffusers_instantstyle(pipe, scale):
    """Each layer gets the value diffusers' own IP-Adapter expansion gives it (unnamed blocks: 0)."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    adapter = pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(scale)
    reference = _maybe_expand_lora_scales(pipe.unet, [scale], default_scale=0.0)[0]
    processors = pipe.unet.attn_processors
    for name in adapter.config.layer_names:
        expected = next(v for block, v in reference.items() if name.startswith(block))
        assert processors[name].scale == [expected], name
