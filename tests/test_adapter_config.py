"""One adapter configuration object (issue 12): the adapter, ``config.json``, the training configuration and the
convert command line all read :class:`CustomContrastAdapterConfig`; format-1 configs still read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusers_customcontrast as dcc
from diffusers_customcontrast.models import ARCHITECTURE_OPTIONS, CustomContrastAdapterConfig
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline
from diffusers_customcontrast.training import ConfigError, TrainingConfig
from diffusers_customcontrast.training.components import adapter_kwargs
from diffusers_customcontrast.training.config import parse_args

# config.json of a tiny adapter saved before the configuration object existed (commit fa036cf, tiny_adapter(seed=5)
# of tiny_sd15_pipeline()), as it was written.
OLD_CONFIG_JSON = {
    "_class_name": "CustomContrastAdapter",
    "_diffusers_version": "0.42.1",
    "base_family": "custom",
    "cross_attention_dim": 32,
    "format_version": 1,
    "hidden_size": 32,
    "image_embed_dim": 32,
    "image_encoder": None,
    "image_encoder_hidden_size": 32,
    "image_feature_layers": [-2],
    "layer_hidden_sizes": [32, 32, 64, 64, 64, 64, 64, 32, 32, 32, 64],
    "layer_names": [
        *(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.processor" for b in (0, 1) for a in (0, 1)),
        *(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.processor" for b in (0, 1) for a in (0, 1, 2)),
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
    ],
    "location_init_bias": 3.0,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "num_textual_tokens": 4,
    "num_visual_tokens": 4,
    "textual_depth": 1,
    "timestep_embed_dim": 32,
    "visual_depth": 1,
}


def test_a_folder_saved_before_the_resampler_layout_is_refused_in_one_sentence(tmp_path):
    """Format 1 (before issue 13) had a visual Q-Former of learned-query blocks; its config still reads, its weights
    cannot fill the IP-Adapter-Plus-shaped visual Q-Former: loading says so instead of listing missing keys."""
    pipe = tiny_sd15_pipeline()
    fields = {k: v for k, v in OLD_CONFIG_JSON.items() if not k.startswith("_")}
    config = CustomContrastAdapterConfig.from_dict(OLD_CONFIG_JSON)
    assert config.to_dict() == {**fields, **{k: v for k, v in config.to_dict().items() if k not in fields}}
    assert (config.tv_fusion_init, config.location_gate_init, config.s_plus_scale) == ("random", 1.0, 1.0)
    assert (config.image_input, config.visual_projection) == ("hidden_states", "resampler")

    weights = {k: v for k, v in tiny_adapter(pipe, seed=5).state_dict().items() if "visual_qformer" not in k}
    weights["encoder.visual_queries"] = torch.zeros(5, 32)  # the format-1 learned queries
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(OLD_CONFIG_JSON))
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(dcc.AdapterLoadError, match=r"^This adapter was saved in the layout .* before format 2 .*\.$"):
        pipe.load_customcontrast(str(folder))
    assert not hasattr(pipe.unet, "_customcontrast") and pipe.unet.encoder_hid_proj is None


def test_the_adapter_is_built_from_one_config_object(tmp_path):
    pipe = tiny_sd15_pipeline()
    adapter = tiny_adapter(pipe)
    config = adapter.adapter_config
    assert CustomContrastAdapterConfig.from_dict(adapter.config) == config  # diffusers' view holds the same fields
    assert config.num_layers == len(adapter.layers) == len(pipe.unet.attn_processors) // 2
    assert adapter.encoder.visual_qformer.queries.shape == (1 + config.num_visual_tokens, config.hidden_size)
    assert adapter.encoder.textual_queries.shape == (config.num_textual_tokens + 1, config.hidden_size)
    adapter.save_pretrained(tmp_path / "adapter")
    assert dcc.CustomContrastAdapter.from_pretrained(tmp_path / "adapter").adapter_config == config
    assert dcc.CustomContrastAdapter(config.replace(num_heads=2)).adapter_config.num_heads == 2
    with pytest.raises(TypeError, match="takes a CustomContrastAdapterConfig"):
        dcc.CustomContrastAdapter(config.to_dict())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hiden_size": 32}, "Unknown CustomContrast adapter config key 'hiden_size'"),
        ({"num_heads": 5}, r"hidden_size \(32\) must be divisible by num_heads \(5\)"),
        ({"format_version": 3, "new_field": 1}, "format version 3.*upgrade diffusers-customcontrast"),
    ],
)
def test_config_json_problems_are_named(tmp_path, change, message):
    pipe = tiny_sd15_pipeline()
    tiny_adapter(pipe).save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    (tmp_path / "adapter" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(dcc.AdapterLoadError, match=message):
        pipe.load_customcontrast(str(tmp_path / "adapter"))


def test_new_adapter_options_are_checked_where_they_are_given():
    pipe = tiny_sd15_pipeline()
    with pytest.raises(ValueError, match="'layer_names' is read from the UNet"):
        dcc.CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, layer_names=["x"])
    with pytest.raises(ValueError, match="Unknown adapter option 'depth'; the options are image_embed_dim"):
        dcc.CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, depth=2)
    with pytest.raises(ValueError, match="visual_depth must be a positive integer"):
        CustomContrastAdapterConfig.check_options({"visual_depth": 0})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"image_input": "pooled"}, r"^image_input must be one of hidden_states, image_embeds, got 'pooled'\.$"),
        ({"visual_projection": "mlp"}, r"^visual_projection must be one of resampler, linear, got 'mlp'\.$"),
        ({"visual_projection": "linear"}, r"^visual_projection 'linear' projects one pooled image embedding, so it "
                                          r"needs image_input 'image_embeds', got 'hidden_states'\.$"),
        ({"image_input": "image_embeds", "image_feature_layers": [-2]},
         r"^image_feature_layers selects hidden states, which an adapter with image_input 'image_embeds' does not "
         r"read: leave it out, got \[-2\]\.$"),
    ],
)  # fmt: skip
def test_image_input_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        CustomContrastAdapterConfig(layer_names=("layer",), layer_hidden_sizes=(8,), **options)
    with pytest.raises(ValueError, match=message):
        CustomContrastAdapterConfig.check_options(options)


def test_an_adapter_on_pooled_image_embeddings_makes_the_pipeline_feed_them(tmp_path):
    """``image_input="image_embeds"``: F is the projected embedding (width projection_dim, not hidden_size), the
    adapter's entry of encoder_hid_proj is what diffusers' pipelines take for an ImageProjection, and unloading
    restores the pipeline."""
    from diffusers.models.embeddings import ImageProjection

    from diffusers_customcontrast.testing.tiny_models import tiny_image_encoder

    pipe = tiny_sd15_pipeline()
    pipe.image_encoder, pipe.feature_extractor = tiny_image_encoder(hidden_size=48)
    options = {"image_input": "image_embeds", "visual_projection": "linear", "hidden_size": 32, "num_heads": 4}
    config = _training(adapter=options).validate()
    adapter = dcc.CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, **adapter_kwargs(config))
    assert adapter.adapter_config.image_embed_dim == 32 and adapter.adapter_config.image_feature_layers is None
    adapter.save_pretrained(tmp_path / "pooled")
    assert dcc.CustomContrastAdapter.from_pretrained(tmp_path / "pooled").adapter_config == adapter.adapter_config

    reference = pipe("a toy", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    pipe.load_customcontrast(str(tmp_path / "pooled"))
    (projection,) = pipe.unet.encoder_hid_proj.image_projection_layers
    assert isinstance(projection, ImageProjection) and not list(projection.parameters(recurse=False))
    embeds = pipe.prepare_ip_adapter_image_embeds(make_subject_image(1), None, "cpu", 1, True)
    assert embeds[0].shape == (2, 1, 32) and not embeds[0][0].any()  # pooled embeddings, zeros as the negative
    assert np.isfinite(pipe("a toy", ip_adapter_image=make_subject_image(1), num_inference_steps=2).images[0]).all()
    pipe.unload_customcontrast()
    again = pipe("a toy", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.array_equal(reference.images, again.images)


def _training(**values) -> TrainingConfig:
    return TrainingConfig.from_dict({"pretrained_model_name_or_path": "base", "train_data": "data", **values})


def test_training_configuration_names_the_adapter_options_once(tmp_path):
    options = {"hidden_size": 64, "num_heads": 4, "num_textual_tokens": 2}
    config = _training(adapter=options, image_feature_layers=[-2, -1]).validate()
    assert adapter_kwargs(config) == {**options, "image_feature_layers": [-2, -1]}
    assert set(TrainingConfig.field_names()) >= {"adapter", "image_feature_layers"}
    assert not [name for name in TrainingConfig.field_names() if name.startswith("adapter_")]
    config.to_yaml(tmp_path / "run.yaml")
    assert TrainingConfig.from_yaml(tmp_path / "run.yaml").adapter == options
    pipe = tiny_sd15_pipeline()
    adapter = dcc.CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, **adapter_kwargs(config))
    assert adapter.adapter_config.hidden_size == 64 and adapter.adapter_config.image_embed_dim == 2 * 32
    help_text = TrainingConfig.__dataclass_fields__["adapter"].metadata["help"]
    assert all(name in help_text for name in ARCHITECTURE_OPTIONS if name != "image_feature_layers")


def test_flat_adapter_keys_of_earlier_training_configurations_still_work(tmp_path):
    (tmp_path / "old.yaml").write_text(
        "pretrained_model_name_or_path: base\ntrain_data: data\nadapter_hidden_size: 64\nadapter_num_heads: 4\n"
    )
    assert TrainingConfig.from_yaml(tmp_path / "old.yaml").validate().adapter == {"hidden_size": 64, "num_heads": 4}
    argv = ["--pretrained_model_name_or_path", "base", "--train_data", "data", "--adapter_num_visual_tokens", "8"]
    assert parse_args(argv).adapter == {"num_visual_tokens": 8}
    assert parse_args([*argv[:4], "--adapter", "{hidden_size: 64, num_heads: 4}"]).adapter == {
        "hidden_size": 64,
        "num_heads": 4,
    }


@pytest.mark.parametrize(
    "values, message",
    [
        ({"adapter_hidden_size": 64, "adapter": {"hidden_size": 32}}, "'adapter_hidden_size' and 'adapter: {hidden_size"),
        ({"adapter": {"hiden_size": 64}}, "Unknown adapter option 'hiden_size'; the options are hidden_size"),
        ({"adapter": {"image_feature_layers": [-1]}}, "Unknown adapter option 'image_feature_layers'"),
        ({"adapter": {"hidden_size": 30}}, r"hidden_size \(30\) must be divisible by num_heads \(12\)"),
        ({"adapter": {"num_heads": "four"}}, r"'adapter.num_heads' must be an int, got 'four'"),
        ({"image_feature_layers": []}, "image_feature_layers must be a non-empty list"),
        ({"adapter": {"image_input": "image_embeds"}, "image_feature_layers": [-2]},
         r"image_feature_layers selects hidden states, which an adapter with image_input 'image_embeds' does not read"),
        ({"s_plus_warmup_steps": -1}, r"s_plus_warmup_steps must be >= 0, got -1"),
        ({"adapter": [64]}, "'adapter' must be a mapping"),
    ],
)  # fmt: skip
def test_bad_adapter_options_in_a_training_configuration(values, message):
    with pytest.raises(ConfigError, match=message):
        _training(**values).validate()


def test_convert_command_line_checks_the_adapter_options(tmp_path, sd15_pipe):
    from diffusers_customcontrast.loaders.convert import main

    sd15_pipe.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="Unknown adapter option 'hiden_size'"):
        main(
            ["--base_model", str(tmp_path / "base"), "--ip_adapter", str(tmp_path / "none.bin"),
             "--output_dir", str(tmp_path / "out"), "--adapter_config", json.dumps({"hiden_size": 32})]
        )  # fmt: skip


def test_the_loaded_adapter_prints_as_one_line(sd15_pipe):
    """load_customcontrast returns the adapter, which a notebook prints: one line, not the module tree."""
    adapter = sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    text = repr(adapter)
    parameters = sum(p.numel() for p in adapter.parameters()) / 1e6
    assert "\n" not in text and text.startswith(f"CustomContrastAdapter({parameters:.2f}M parameters, ")
    assert f"{len(adapter.config.layer_names)} cross-attention layers" in text
    sd15_pipe.unload_customcontrast()
