"""Loading refuses what does not fit, in one sentence, and leaves the pipeline as it was."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

import diffusers_customcontrast as dcc
from diffusers_customcontrast.loaders.convert import adapter_from_ip_adapter, load_ip_adapter_attention
from diffusers_customcontrast.testing.tiny_models import tiny_adapter, tiny_image_encoder

STEPS = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def generate(pipe, **kwargs):
    return pipe("a dog", generator=torch.Generator().manual_seed(0), **{**STEPS, **kwargs}).images


def assert_untouched(pipe, processors, reference, **kwargs):
    assert pipe.unet.attn_processors == processors
    np.testing.assert_array_equal(generate(pipe, **kwargs), reference)


@pytest.fixture
def saved_adapter(sd15_pipe, tmp_path):
    folder = tmp_path / "adapter"
    tiny_adapter(sd15_pipe).save_pretrained(folder)
    return folder


def test_adapter_for_another_base_model(sd15_pipe, sdxl_pipe):
    processors, reference = dict(sdxl_pipe.unet.attn_processors), generate(sdxl_pipe)
    with pytest.raises(ValueError, match=r"built for a .* UNet, but the pipeline's UNet is"):
        sdxl_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    assert_untouched(sdxl_pipe, processors, reference)


def test_layer_width_mismatch(sd15_pipe):
    adapter = tiny_adapter(sd15_pipe)
    config = dict(adapter.config)
    config["layer_hidden_sizes"] = [2 * w for w in config["layer_hidden_sizes"]]
    with pytest.raises(ValueError, match="expects width"):
        sd15_pipe.load_customcontrast(dcc.CustomContrastAdapter.from_config(config))


def test_image_encoder_of_the_wrong_width(sd15_pipe):
    adapter = tiny_adapter(sd15_pipe)
    sd15_pipe.image_encoder, _ = tiny_image_encoder(hidden_size=48)
    processors = dict(sd15_pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="image encoder of hidden size 32.*hidden size 48"):
        sd15_pipe.load_customcontrast(adapter)
    assert sd15_pipe.unet.attn_processors == processors and sd15_pipe.unet.encoder_hid_proj is None


def test_missing_weight_file(sd15_pipe, saved_adapter):
    (saved_adapter / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(dcc.AdapterLoadError, match="No file named 'diffusion_pytorch_model.safetensors'"):
        sd15_pipe.load_customcontrast(str(saved_adapter))
    with pytest.raises(OSError):
        sd15_pipe.load_customcontrast(str(saved_adapter.parent / "nowhere"))


def test_parent_folder_names_the_subfolder_that_holds_the_adapter(sd15_pipe, saved_adapter):
    processors, reference = dict(sd15_pipe.unet.attn_processors), generate(sd15_pipe)
    with pytest.raises(ValueError, match=r"A subfolder holds one \('adapter'\): pass subfolder='adapter'"):
        sd15_pipe.load_customcontrast(saved_adapter.parent)
    assert_untouched(sd15_pipe, processors, reference)
    sd15_pipe.load_customcontrast(saved_adapter.parent, subfolder="adapter")
    assert sd15_pipe.unet.encoder_hid_proj is not None


@pytest.mark.parametrize("kind", ["dot", "under_existing_folder", "absolute"])
def test_a_missing_local_path_is_refused_without_asking_the_hub(sd15_pipe, saved_adapter, monkeypatch, kind):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr("diffusers_customcontrast.models.checkpoint.hf_hub_download", no_hub)
    monkeypatch.chdir(saved_adapter.parent)
    source = {"dot": "./adaptr", "under_existing_folder": "adapter/typo", "absolute": str(saved_adapter) + "x"}[kind]
    with pytest.raises(ValueError, match=r"is not a folder on this machine, and it is a path rather than a hub"):
        sd15_pipe.load_customcontrast(source)
    assert sd15_pipe.unet.encoder_hid_proj is None


def test_corrupt_weight_file(sd15_pipe, saved_adapter):
    weights = saved_adapter / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    processors, reference = dict(sd15_pipe.unet.attn_processors), generate(sd15_pipe)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        sd15_pipe.load_customcontrast(str(saved_adapter))
    assert_untouched(sd15_pipe, processors, reference)


def test_pickled_objects_are_refused(sd15_pipe, saved_adapter, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    (saved_adapter / "weights.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(dcc.AdapterLoadError, match="weights_only=True"):
        sd15_pipe.load_customcontrast(str(saved_adapter), weight_name="weights.bin")

    state = dcc.load_adapter(saved_adapter).state_dict()
    torch.save(state, saved_adapter / "plain.bin")
    sd15_pipe.load_customcontrast(str(saved_adapter), weight_name="plain.bin")  # plain tensors load fine


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_state_dict_problems(sd15_pipe, saved_adapter, problem):
    path = saved_adapter / "diffusion_pytorch_model.safetensors"
    state = dcc.load_adapter(saved_adapter).state_dict()
    key = next(iter(state))
    if problem == "missing":
        del state[key]
    elif problem == "unexpected":
        state["extra.weight"] = torch.zeros(1)
    else:
        state[key] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    match = {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "wrong shape"}[problem]
    with pytest.raises(dcc.AdapterLoadError, match=match):
        sd15_pipe.load_customcontrast(str(saved_adapter))


def test_newer_config_format(sd15_pipe, saved_adapter):
    config_path = saved_adapter / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99"):
        sd15_pipe.load_customcontrast(str(saved_adapter))


def test_pipeline_without_ip_adapter_support(sd15_pipe):
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    assert not hasattr(pipe, "load_customcontrast")  # the package adds its methods only where they can work
    with pytest.raises(ValueError, match="DDPMPipeline has no IP-Adapter support"):
        dcc.load_customcontrast(pipe, tiny_adapter(sd15_pipe))


def test_ip_adapter_already_loaded(sd15_pipe):
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    sd15_pipe.unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(32, 32, 4)])
    with pytest.raises(ValueError, match="unload_ip_adapter"):
        sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))


def _ip_adapter_checkpoint(adapter, scale=1.0):
    """An IP-Adapter state dict in the original key layout: ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight."""
    weights = {}
    for index, layer in enumerate(adapter.layers):
        for name in ("to_k_ip", "to_v_ip"):
            shape = getattr(layer, name).weight.shape
            weights[f"{2 * index + 1}.{name}.weight"] = torch.full(shape, scale * (index + 1))
    width = adapter.config.cross_attention_dim  # plain IP-Adapter's projection: 4 tokens from a 32-wide embedding
    image_proj = {
        "proj.weight": torch.zeros(4 * width, 32),
        "proj.bias": torch.zeros(4 * width),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    return {"image_proj": image_proj, "ip_adapter": weights}


@pytest.mark.parametrize("form", ["bin", "safetensors", "dict"])
def test_convert_from_ip_adapter(sd15_pipe, tmp_path, form):
    reference = tiny_adapter(sd15_pipe)
    checkpoint = _ip_adapter_checkpoint(reference)
    if form == "bin":
        source = tmp_path / "ip-adapter.bin"
        torch.save(checkpoint, source)
    elif form == "safetensors":
        source = tmp_path / "ip-adapter.safetensors"
        flat = {f"{part}.{k}": v for part in checkpoint for k, v in checkpoint[part].items()}
        save_file(flat, source)
    else:
        source = checkpoint
    adapter = adapter_from_ip_adapter(sd15_pipe.unet, source, sd15_pipe.image_encoder, hidden_size=32, num_heads=4)
    for index, layer in enumerate(adapter.layers):
        assert torch.equal(layer.to_k_ip.weight, torch.full_like(layer.to_k_ip.weight, index + 1))
        assert torch.equal(layer.to_v_ip.weight, torch.full_like(layer.to_v_ip.weight, index + 1))


def test_convert_refuses_another_base_model(sd15_pipe, sdxl_pipe):
    checkpoint = _ip_adapter_checkpoint(tiny_adapter(sdxl_pipe))
    with pytest.raises(ValueError, match="another base model|fewer cross-attention layers"):
        load_ip_adapter_attention(tiny_adapter(sd15_pipe), checkpoint)


def test_convert_command_line(sd15_pipe, tmp_path):
    from diffusers_customcontrast.loaders.convert import main

    sd15_pipe.save_pretrained(tmp_path / "base")
    torch.save(_ip_adapter_checkpoint(tiny_adapter(sd15_pipe)), tmp_path / "ip.bin")
    output = main(
        [
            "--base_model",
            str(tmp_path / "base"),
            "--ip_adapter",
            str(tmp_path / "ip.bin"),
            "--image_encoder",
            str(tmp_path / "base"),
            "--image_encoder_subfolder",
            "image_encoder",
            "--output_dir",
            str(tmp_path / "out"),
            "--adapter_config",
            json.dumps({"hidden_size": 32, "num_heads": 4}),
        ]
    )
    sd15_pipe.load_customcontrast(str(output))
    layer = sd15_pipe.unet.attn_processors[dcc.load_adapter(output).config.layer_names[0]]
    assert torch.equal(layer.to_k_ip[0].weight, torch.ones_like(layer.to_k_ip[0].weight))


@pytest.mark.parametrize(
    ("module", "command", "option"),
    [
        ("diffusers_customcontrast.loaders.convert", "diffusers_customcontrast.convert", "--ip_adapter"),
        ("customcontrast_world.demo", "customcontrast_world.demo", "--pretrained"),
    ],
)
def test_command_line_help_names_the_command_and_its_defaults(module, command, option, capsys):
    import importlib

    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {command} ")
    assert option in text and "(default:" in text and "``" not in text
