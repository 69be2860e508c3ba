"""CustomContrast side by side with diffusers' own IP-Adapters (issue 14): both load orders, one image per adapter in
load order, a scale setter each, and each unload exact for the other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from diffusers_customcontrast.loaders import injection
from diffusers_customcontrast.models.unet_layout import attention_module
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

STYLE, SUBJECT = make_subject_image(4), make_subject_image(0)
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def ip_adapter_state_dict(pipe, seed: int = 0) -> dict:
    """A random IP-Adapter (the plain one: an image projection to 4 tokens) in the original checkpoint layout."""
    unet, generator = pipe.unet, torch.Generator().manual_seed(seed)
    width, embed_dim = unet.config.cross_attention_dim, pipe.image_encoder.config.projection_dim
    image_proj = {
        "proj.weight": torch.randn(4 * width, embed_dim, generator=generator) * 0.2,
        "proj.bias": torch.zeros(4 * width),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    layers = {}
    for key_id, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            to_k = attention_module(unet, name.removesuffix(".processor")).to_k
            for weight in ("to_k_ip", "to_v_ip"):
                layers[f"{key_id}.{weight}.weight"] = torch.randn(to_k.weight.shape, generator=generator) * 0.3
    return {"image_proj": image_proj, "ip_adapter": layers}


def generate(pipe, **kwargs) -> np.ndarray:
    return pipe("a toy", generator=torch.Generator().manual_seed(0), **CALL, **kwargs).images


def with_both(order: str):
    pipe = tiny_sd15_pipeline()
    steps = {
        "ip": lambda: pipe.load_ip_adapter(ip_adapter_state_dict(pipe), subfolder=None, weight_name=None),
        "cc": lambda: pipe.load_customcontrast(tiny_adapter(pipe)),
    }
    for name in order.split("-"):
        steps[name]()
    return pipe


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    only_ip, only_cc = tiny_sd15_pipeline(), tiny_sd15_pipeline()
    only_ip.load_ip_adapter(ip_adapter_state_dict(only_ip), subfolder=None, weight_name=None)
    only_cc.load_customcontrast(tiny_adapter(only_cc))
    return {
        "base": generate(tiny_sd15_pipeline()),
        "ip": generate(only_ip, ip_adapter_image=STYLE),
        "cc": generate(only_cc, ip_adapter_image=SUBJECT),
        "both": generate(with_both("ip-cc"), ip_adapter_image=[STYLE, SUBJECT]),
    }


@pytest.mark.parametrize("order", ["ip-cc", "cc-ip"])
def test_both_load_orders_give_one_image_per_adapter_in_ip_adapter_first_order(order, references):
    pipe = with_both(order)
    assert len(pipe.unet.encoder_hid_proj.image_projection_layers) == 2
    assert injection.attached(pipe.unet).entry_index == 1  # diffusers' IP-Adapter first, whatever the load order
    both = generate(pipe, ip_adapter_image=[STYLE, SUBJECT])
    np.testing.assert_array_equal(both, references["both"])
    for alone in ("ip", "cc", "base"):
        assert np.abs(both - references[alone]).max() > 1e-3, alone  # each adapter has an effect
    with pytest.raises(ValueError):
        generate(pipe, ip_adapter_image=SUBJECT)  # one image for two adapters


def test_each_scale_setter_sets_its_own_adapter(references):
    pipe = with_both("ip-cc")
    pipe.set_ip_adapter_scale(0.0)  # diffusers' IP-Adapter off: CustomContrast alone remains
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=[STYLE, SUBJECT]), references["cc"])
    assert all(p.subject_scale == 1.0 for p in injection.attached(pipe.unet).processors.values())
    pipe.set_ip_adapter_scale(1.0)
    pipe.set_customcontrast_scale(0.0, s_plus_scale=0.0)  # CustomContrast off: the IP-Adapter alone remains
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=[STYLE, SUBJECT]), references["ip"])
    assert all(p.scale == [1.0] for p in injection.attached(pipe.unet).processors.values())
    pipe.set_customcontrast_scale(1.0, start=0.5, end=1.0)  # outside its steps CustomContrast leaves the IP-Adapter's
    # Inside them it acts: the generations are deterministic (equal to the bit above), so any difference is its own;
    # a fresh adapter's LayerNorm-ed visual tokens move this tiny pipeline's images by ~7e-4 in half the steps.
    assert np.abs(generate(pipe, ip_adapter_image=[STYLE, SUBJECT]) - references["ip"]).max() > 1e-4


@pytest.mark.parametrize("order", ["ip-cc", "cc-ip"])
def test_unload_customcontrast_leaves_the_ip_adapter_as_if_never_loaded(order, references):
    pipe = with_both(order)
    if order == "ip-cc":
        processors, projection = injection.attached(pipe.unet).original_processors, pipe.unet.encoder_hid_proj
    pipe.set_ip_adapter_scale(0.5)
    pipe.unload_customcontrast()
    if order == "ip-cc":
        assert pipe.unet.attn_processors == processors and pipe.unet.encoder_hid_proj is not projection
    assert all(type(p) is IPAdapterAttnProcessor2_0 for n, p in pipe.unet.attn_processors.items() if "attn2" in n)
    assert not pipe.unet._forward_pre_hooks
    half = generate(pipe, ip_adapter_image=STYLE)  # the scale set while both were loaded holds
    pipe.set_ip_adapter_scale(1.0)
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=STYLE), references["ip"])
    assert np.abs(half - references["ip"]).max() > 1e-3


@pytest.mark.parametrize("order", ["ip-cc", "cc-ip"])
def test_unload_ip_adapter_leaves_customcontrast_working(order, references):
    pipe = with_both(order)
    encoder = pipe.image_encoder
    (s_plus_scale,) = {p.s_plus_scale for p in injection.attached(pipe.unet).processors.values()}
    pipe.set_customcontrast_scale(0.5, s_plus_scale=0.5, start=0.0, end=0.5)
    pipe.unload_ip_adapter()  # diffusers would also remove the image encoder, which CustomContrast needs
    assert pipe.image_encoder is encoder and len(pipe.unet.encoder_hid_proj.image_projection_layers) == 1
    state = injection.attached(pipe.unet)
    assert state.entry_index == 0 and state.step_range == (0.0, 0.5)
    assert all(p.subject_scale == 0.5 and p.s_plus_scale == 0.5 for p in state.processors.values())
    pipe.set_customcontrast_scale(1.0, s_plus_scale=s_plus_scale, end=1.0)  # None would keep the range
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=SUBJECT), references["cc"])
    pipe.unload_customcontrast()
    np.testing.assert_array_equal(generate(pipe), references["base"])


def test_masks_take_one_entry_per_adapter():
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    pipe = with_both("ip-cc")
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(left), Image.fromarray(255 - left)], 64, 64)
    ip_mask, cc_mask = masks[:1].reshape(1, 1, 64, 64), masks[1:].reshape(1, 1, 64, 64)
    masked = generate(
        pipe, ip_adapter_image=[STYLE, SUBJECT], cross_attention_kwargs={"ip_adapter_masks": [ip_mask, cc_mask]}
    )
    plain = generate(pipe, ip_adapter_image=[STYLE, SUBJECT])
    assert np.abs(masked - plain).max() > 1e-3
    with pytest.raises(ValueError, match=r"per loaded image adapter, in load order \(2: IP-Adapter, CustomContrast\)"):
        generate(pipe, ip_adapter_image=[STYLE, SUBJECT], cross_attention_kwargs={"ip_adapter_masks": [cc_mask]})


def test_example_script(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    from safetensors.torch import save_file

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))  # the script imports _common from its own folder
    from test_examples import SAMPLING, model_args, pixels, save_sd_models

    models = save_sd_models(tmp_path / "models", tiny_sd15_pipeline)
    state_dict = ip_adapter_state_dict(tiny_sd15_pipeline())
    flat = {
        f"{part}.{key}": value.contiguous() for part, weights in state_dict.items() for key, value in weights.items()
    }
    (tmp_path / "ip").mkdir()
    save_file(flat, tmp_path / "ip" / "ip.safetensors")
    STYLE.save(tmp_path / "style.png")
    SUBJECT.save(tmp_path / "subject.png")
    paths = runpy.run_path(str(examples / "with_ip_adapter.py"))["main"](
        [*model_args(models), "--subject", str(tmp_path / "subject.png"), "--style", str(tmp_path / "style.png"),
         "--ip_adapter", str(tmp_path / "ip"), "--ip_adapter_subfolder", "", "--ip_adapter_weight_name",
         "ip.safetensors", *SAMPLING, "--prompt", "a toy", "--output", str(tmp_path / "out")]
    )  # fmt: skip
    both, subject_only = (pixels(path) for path in paths)
    assert np.abs(both - subject_only).max() > 4
