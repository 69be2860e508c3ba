"""A CustomContrast adapter converted from IP-Adapter-Plus computes IP-Adapter-Plus (issue 13).

The checkpoints are built here in the original tencent-ailab layouts (the nested ``.bin`` dict and the flat
``.safetensors`` keys), with random weights that differ in every layer and every norm, so that any weight put in the
wrong place changes the output. The reference is diffusers' own ``load_ip_adapter`` of the same checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusers_customcontrast as dcc
from diffusers_customcontrast.data import SubjectTripletDataset, collate_triplets, write_synthetic_dataset
from diffusers_customcontrast.loaders.convert import (
    CONVERTED_OPTIONS,
    adapter_from_ip_adapter,
    ip_adapter_state_dict,
    split_ip_adapter_checkpoint,
)
from diffusers_customcontrast.losses import diffusion_target
from diffusers_customcontrast.models.unet_layout import cross_attention_layout
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_sd15_pipeline, tiny_sdxl_pipeline
from diffusers_customcontrast.training import (
    BaseModel,
    BatchEncoder,
    ConditioningDropout,
    CustomContrastObjective,
    ObjectiveInputs,
    ObjectiveSettings,
    TrainingConfig,
    build_adapter,
    step_generator,
)

TOLERANCE = 1e-4  # max abs difference of [0, 1] images
SCALES = (0.0, 0.4, 1.0, 1.7)


def _random(generator: torch.Generator, *shape: int, std: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def plus_checkpoint(
    unet, image_embed_dim: int, hidden: int = 128, depth: int = 4, num_tokens: int = 4, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter-Plus checkpoint in the nested original layout: a Resampler (64-wide heads, ff_mult 4; depth 4, the
    only one diffusers' loader converts) and one
    ``to_k_ip``/``to_v_ip`` pair per cross-attention layer, numbered 1, 3, 5, ..."""
    g = torch.Generator().manual_seed(seed)
    out = unet.config.cross_attention_dim

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + _random(g, width), f"{prefix}.bias": _random(g, width)}

    proj = {
        "latents": torch.randn(1, num_tokens, hidden, generator=g) / hidden**0.5,
        "proj_in.weight": _random(g, hidden, image_embed_dim),
        "proj_in.bias": _random(g, hidden),
        "proj_out.weight": _random(g, out, hidden),
        "proj_out.bias": _random(g, out),
        **norm("norm_out", out),
    }
    for n in range(depth):
        proj |= norm(f"layers.{n}.0.norm1", hidden) | norm(f"layers.{n}.0.norm2", hidden)
        proj[f"layers.{n}.0.to_q.weight"] = _random(g, hidden, hidden)
        proj[f"layers.{n}.0.to_kv.weight"] = _random(g, 2 * hidden, hidden)
        proj[f"layers.{n}.0.to_out.weight"] = _random(g, hidden, hidden)
        proj |= norm(f"layers.{n}.1.0", hidden)
        proj[f"layers.{n}.1.1.weight"] = _random(g, 4 * hidden, hidden, std=0.1)
        proj[f"layers.{n}.1.3.weight"] = _random(g, hidden, 4 * hidden, std=0.1)
    return {"image_proj": proj, "ip_adapter": _attention_weights(unet, g)}


def plain_checkpoint(unet, image_embed_dim: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A plain IP-Adapter checkpoint (a linear projection to 4 tokens) in the nested original layout."""
    g = torch.Generator().manual_seed(seed)
    out = unet.config.cross_attention_dim
    proj = {
        "proj.weight": _random(g, 4 * out, image_embed_dim),
        "proj.bias": _random(g, 4 * out),
        "norm.weight": 1 + _random(g, out),
        "norm.bias": _random(g, out),
    }
    return {"image_proj": proj, "ip_adapter": _attention_weights(unet, g)}


def _attention_weights(unet, g: torch.Generator) -> dict[str, torch.Tensor]:
    layout = cross_attention_layout(unet)
    weights = {}
    for index, width in enumerate(layout.hidden_sizes):
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"{2 * index + 1}.{projection}.weight"] = _random(g, width, layout.cross_attention_dim)
    return weights


def flat(checkpoint: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The flat safetensors layout of a nested checkpoint."""
    return {f"{part}.{key}": value for part, weights in checkpoint.items() for key, value in weights.items()}


def _images(pipe, scale: float, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a toy",
        ip_adapter_image=make_subject_image(3),
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images


def _ip_adapter_images(pipe, checkpoint) -> dict[float, np.ndarray]:
    pipe.load_ip_adapter(checkpoint, subfolder=None, weight_name=None, image_encoder_folder=None)
    images = {}
    for scale in SCALES:
        pipe.set_ip_adapter_scale(scale)
        images[scale] = _images(pipe, scale)
    pipe.unload_ip_adapter()
    return images


def _customcontrast_differences(pipe, folder, expected: dict[float, np.ndarray]) -> dict[float, float]:
    """The adapter folder loaded into ``pipe``: its images' max abs difference from ``expected`` at every scale."""
    pipe.load_customcontrast(str(folder))
    differences = {}
    for scale in SCALES:
        pipe.set_customcontrast_scale(scale)
        differences[scale] = float(np.abs(_images(pipe, scale) - expected[scale]).max())
    return differences


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_converted_ip_adapter_plus_gives_ip_adapter_plus_images(family, tmp_path):
    make = tiny_sd15_pipeline if family == "sd15" else tiny_sdxl_pipeline
    pipe = make()
    encoder = pipe.image_encoder
    checkpoint = plus_checkpoint(pipe.unet, encoder.config.hidden_size, seed=1)
    expected = _ip_adapter_images(make(), checkpoint)  # unload_ip_adapter drops the image encoder: a second pipe

    # The flat safetensors file, converted and saved as a folder, loaded as any adapter.
    save_file(flat(checkpoint), tmp_path / "ip-adapter-plus.safetensors")
    adapter = adapter_from_ip_adapter(pipe.unet, tmp_path / "ip-adapter-plus.safetensors", encoder)
    adapter.save_pretrained(tmp_path / "converted")
    differences = _customcontrast_differences(pipe, tmp_path / "converted", expected)
    assert max(differences.values()) < TOLERANCE, differences
    # The subject acts at all: IP-Adapter-Plus itself changes the image.
    assert np.abs(expected[1.0] - expected[0.0]).max() > 0.01


def test_the_nested_bin_and_a_hub_repo_convert_to_the_same_adapter(tmp_path, offline_hub):
    pipe = tiny_sd15_pipeline()
    checkpoint = plus_checkpoint(pipe.unet, pipe.image_encoder.config.hidden_size, seed=2)
    torch.save(checkpoint, tmp_path / "ip-adapter-plus_sd15.bin")
    (tmp_path / "repo" / "models").mkdir(parents=True)
    save_file(flat(checkpoint), tmp_path / "repo" / "models" / "ip-adapter-plus_sd15.safetensors")
    offline_hub(tmp_path / "repo", "org/ip-adapter")

    from_bin = adapter_from_ip_adapter(pipe.unet, tmp_path / "ip-adapter-plus_sd15.bin", pipe.image_encoder)
    from_hub = adapter_from_ip_adapter(
        pipe.unet,
        "org/ip-adapter",
        pipe.image_encoder,
        weight_name="ip-adapter-plus_sd15.safetensors",
        hub_kwargs={"subfolder": "models"},
    )
    expected, actual = from_bin.state_dict(), from_hub.state_dict()
    # Every weight but the visual CLS query (new, random) comes from the checkpoint: the same in both.
    assert all(torch.equal(expected[k], actual[k]) for k in expected if "queries" not in k and "visual" in k)
    qformer = from_bin.encoder.visual_qformer
    assert torch.equal(qformer.queries[1:], checkpoint["image_proj"]["latents"][0])
    assert torch.equal(qformer.blocks[3].ff[3].weight, checkpoint["image_proj"]["layers.3.1.3.weight"])
    last = 2 * from_bin.num_layers - 1
    assert torch.equal(from_bin.layers[-1].to_v_ip.weight, checkpoint["ip_adapter"][f"{last}.to_v_ip.weight"])
    config = from_bin.adapter_config
    assert (config.hidden_size, config.num_heads, config.visual_depth, config.num_visual_tokens) == (128, 2, 4, 4)
    assert (config.tv_fusion_init, config.location_gate_init, config.s_plus_scale) == ("identity", 0.0, 0.0)


def test_the_convert_command_writes_a_folder_that_loads(tmp_path, sd15_pipe):
    from diffusers_customcontrast.loaders.convert import main

    sd15_pipe.save_pretrained(tmp_path / "base")
    checkpoint = plus_checkpoint(sd15_pipe.unet, sd15_pipe.image_encoder.config.hidden_size, seed=3)
    save_file(flat(checkpoint), tmp_path / "plus.safetensors")
    out = main(
        ["--base_model", str(tmp_path / "base"), "--ip_adapter", str(tmp_path / "plus.safetensors"),
         "--output_dir", str(tmp_path / "out"), "--adapter_config", '{"num_textual_tokens": 2}']
    )  # fmt: skip
    adapter = sd15_pipe.load_customcontrast(str(out))
    assert adapter.adapter_config.num_textual_tokens == 2 and adapter.adapter_config.num_visual_tokens == 4


def test_bigg_plus_checkpoints_need_the_bigg_image_encoder():
    """The SDXL Plus variant trained on ViT-bigG reads 1664-wide features; a ViT-H-sized encoder is refused."""
    pipe = tiny_sdxl_pipeline()
    checkpoint = plus_checkpoint(pipe.unet, image_embed_dim=48, seed=4)  # a wider encoder than the pipeline's 32
    with pytest.raises(dcc.AdapterLoadError, match=r"reads image features of width 48, but the image encoder has"):
        adapter_from_ip_adapter(pipe.unet, checkpoint, pipe.image_encoder)
    adapter = adapter_from_ip_adapter(pipe.unet, checkpoint)  # without an encoder to check against
    assert adapter.adapter_config.image_embed_dim == 48


def _faceid_checkpoint(unet) -> dict:
    g = torch.Generator().manual_seed(0)
    weights = _attention_weights(unet, g)
    weights |= {"1.to_k_lora.down.weight": _random(g, 4, 32), "1.to_k_lora.up.weight": _random(g, 32, 4)}
    proj = {"proj.0.weight": _random(g, 64, 512), "proj.2.weight": _random(g, 128, 64), "norm.weight": torch.ones(32)}
    return {"image_proj": proj, "ip_adapter": weights}


@pytest.mark.parametrize(
    "case, message",
    [
        ("sdxl checkpoint", r"^This IP-Adapter-Plus checkpoint makes tokens of width 64 \(another base model's\), but "
                            r"the UNet's cross-attention reads width 32: use the checkpoint made for this base model\.$"),
        ("faceid", r"^This is an IP-Adapter-FaceID checkpoint .* which read CLIP image features\.$"),
        ("truncated safetensors", r"is not a valid safetensors file \(truncated or corrupt\)"),
        ("truncated bin", r"is not a readable PyTorch checkpoint \(truncated or corrupt\)"),
        ("no ip_adapter", r"^This is not an IP-Adapter checkpoint: it has no 'ip_adapter' weights\.$"),
        ("fixed option", r"^'hidden_size' is fixed by the IP-Adapter-Plus checkpoint \(128\), but 64 was given"),
        ("plain sdxl checkpoint", r"^This IP-Adapter checkpoint makes tokens of width 64 \(another base model's\), but "
                                  r"the UNet's cross-attention reads width 32: use the checkpoint made for this base "
                                  r"model\.$"),
        ("plain wider encoder", r"^This IP-Adapter checkpoint reads pooled image embeddings of width 48, but the image "
                                r"encoder has projection_dim 32: use the image encoder it was trained with "),
        ("plain feature layers", r"^image_feature_layers selects hidden states, which an adapter with image_input "
                                 r"'image_embeds' does not read: leave it out, got \[-1\]\.$"),
    ],
)  # fmt: skip
def test_checkpoints_that_do_not_fit_are_refused_in_one_sentence(case, message, tmp_path):
    pipe = tiny_sd15_pipeline()
    width = pipe.image_encoder.config.hidden_size
    options = {}
    if case == "sdxl checkpoint":
        source = plus_checkpoint(tiny_sdxl_pipeline(image_encoder=False).unet, width)
    elif case == "faceid":
        source = _faceid_checkpoint(pipe.unet)
    elif case.startswith("truncated"):
        checkpoint = plus_checkpoint(pipe.unet, width)
        source = tmp_path / ("plus.safetensors" if "safetensors" in case else "plus.bin")
        save_file(flat(checkpoint), source) if "safetensors" in case else torch.save(checkpoint, source)
        source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif case == "plain sdxl checkpoint":
        source = plain_checkpoint(
            tiny_sdxl_pipeline(image_encoder=False).unet, pipe.image_encoder.config.projection_dim
        )
    elif case == "plain wider encoder":
        source = plain_checkpoint(pipe.unet, image_embed_dim=48)
    elif case == "plain feature layers":
        source, options = (
            plain_checkpoint(pipe.unet, pipe.image_encoder.config.projection_dim),
            {"image_feature_layers": [-1]},
        )
    elif case == "no ip_adapter":
        source = {"image_proj.latents": torch.zeros(1, 4, 128)}
    else:
        source, options = plus_checkpoint(pipe.unet, width), {"hidden_size": 64, "num_heads": 1}
    with pytest.raises((dcc.AdapterLoadError, ValueError), match=message) as error:
        adapter_from_ip_adapter(pipe.unet, source, pipe.image_encoder, **options)
    assert "\n" not in str(error.value).split(": ")[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_a_converted_plain_ip_adapter_gives_ip_adapter_images(family, layout, tmp_path):
    """Plain IP-Adapter reads CLIP's pooled image embedding (a zero one as the negative): the converted adapter makes
    the pipeline compute those, and its linear projection holds IP-Adapter's."""
    make = tiny_sd15_pipeline if family == "sd15" else tiny_sdxl_pipeline
    pipe = make()
    encoder = pipe.image_encoder
    checkpoint = plain_checkpoint(pipe.unet, encoder.config.projection_dim, seed=6)
    expected = _ip_adapter_images(make(), checkpoint)

    # The nested .bin (read with weights_only=True) or the flat safetensors file, saved as a folder, loaded as any.
    if layout == "bin":
        torch.save(checkpoint, tmp_path / "ip-adapter.bin")
    else:
        save_file(flat(checkpoint), tmp_path / "ip-adapter.safetensors")
    adapter = adapter_from_ip_adapter(pipe.unet, tmp_path / f"ip-adapter.{layout}", encoder)
    config = adapter.adapter_config
    assert (config.image_input, config.visual_projection, config.num_visual_tokens) == ("image_embeds", "linear", 4)
    assert config.image_feature_layers is None and config.image_embed_dim == encoder.config.projection_dim
    assert torch.equal(adapter.encoder.visual_qformer.norm.bias, checkpoint["image_proj"]["norm.bias"])
    adapter.save_pretrained(tmp_path / "converted")
    differences = _customcontrast_differences(pipe, tmp_path / "converted", expected)
    assert max(differences.values()) < TOLERANCE, differences
    assert np.abs(expected[1.0] - expected[0.0]).max() > 0.01

    # The textual Q-Former reads the pooled embedding too: with the S+ tokens on, they change the image.
    pipe.set_customcontrast_scale(1.0, s_plus_scale=1.0)
    with_s_plus = _images(pipe, 1.0)
    assert np.isfinite(with_s_plus).all() and np.abs(with_s_plus - expected[1.0]).max() > 1e-3
    # Precomputed embeddings of the same photo (one token per photo, zeros as the negative) give the same image.
    embeds = pipe.encode_customcontrast_subjects([make_subject_image(3)])
    assert embeds[0].shape == (2, 1, 1, encoder.config.projection_dim) and not embeds[0][0].any()
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        "a photo of a toy",
        ip_adapter_image_embeds=embeds,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=generator,
        output_type="np",
    ).images
    assert np.abs(images - with_s_plus).max() < TOLERANCE


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", ["plus", "plain"])
def test_exporting_a_converted_adapter_gives_back_its_checkpoint(kind):
    pipe = tiny_sd15_pipeline()
    encoder = pipe.image_encoder
    if kind == "plus":
        checkpoint = plus_checkpoint(pipe.unet, encoder.config.hidden_size, seed=8)
    else:
        checkpoint = plain_checkpoint(pipe.unet, encoder.config.projection_dim, seed=8)
    exported = ip_adapter_state_dict(adapter_from_ip_adapter(pipe.unet, checkpoint, encoder))
    expected = flat(checkpoint)
    assert sorted(exported) == sorted(expected)
    assert all(torch.equal(exported[key], expected[key]) for key in expected)


def test_a_trained_adapter_exports_to_an_ip_adapter_plus_that_diffusers_loads_and_that_converts_back(tmp_path):
    """convert(export(adapter)) == adapter, and diffusers' load_ip_adapter of the export gives the adapter's images
    (its added parts are no-ops: what the export holds is all it computes)."""
    pipe = tiny_sd15_pipeline()
    encoder = pipe.image_encoder
    shape = {"hidden_size": 128, "num_heads": 2, "visual_depth": 4, "num_visual_tokens": 4, "qformer_qk_norm": False}
    adapter = dcc.CustomContrastAdapter.from_unet(
        pipe.unet, encoder, **shape, num_textual_tokens=2, textual_depth=1, timestep_embed_dim=32, **CONVERTED_OPTIONS
    )
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # "trained": every weight moved off its initial value, the added parts kept as no-ops
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        adapter.encoder.tv_fusion.proj.weight.zero_()
        adapter.encoder.tv_fusion.proj.bias.zero_()
        for layer in adapter.layers:
            layer.location_gate.strength.zero_()
    exported = ip_adapter_state_dict(adapter)

    converted = adapter_from_ip_adapter(pipe.unet, exported, encoder)
    assert {k: getattr(converted.adapter_config, k) for k in shape} == shape
    visual, converted_visual = adapter.encoder.visual_qformer, converted.encoder.visual_qformer
    assert torch.equal(visual.queries[1:], converted_visual.queries[1:])  # row 0, the visual CLS, is not exported
    converted_weights = dict(converted_visual.named_parameters())
    assert all(torch.equal(p, converted_weights[n]) for n, p in visual.named_parameters() if n != "queries")
    for layer, converted_layer in zip(adapter.layers, converted.layers, strict=True):
        assert torch.equal(layer.to_k_ip.weight, converted_layer.to_k_ip.weight)
        assert torch.equal(layer.to_v_ip.weight, converted_layer.to_v_ip.weight)

    image_proj, ip_adapter = split_ip_adapter_checkpoint(exported)
    expected = _ip_adapter_images(tiny_sd15_pipeline(), {"image_proj": image_proj, "ip_adapter": ip_adapter})
    adapter.save_pretrained(tmp_path / "trained")
    differences = _customcontrast_differences(pipe, tmp_path / "trained", expected)
    assert max(differences.values()) < TOLERANCE, differences


def test_an_adapter_that_a_resampler_cannot_compute_is_not_exported():
    """Heads other than 64 wide, or QK-norm in the visual Q-Former (the default for new adapters)."""
    pipe = tiny_sd15_pipeline()
    adapter = dcc.CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, hidden_size=128, num_heads=4)
    with pytest.raises(ValueError, match=r"64-wide Resampler heads, but this adapter's visual Q-Former has 4 heads"):
        ip_adapter_state_dict(adapter)
    adapter = dcc.CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, hidden_size=128, num_heads=2)
    with pytest.raises(ValueError, match=r"qformer_qk_norm=True\), which IP-Adapter-Plus's Resampler does not"):
        ip_adapter_state_dict(adapter)
    ip_adapter_state_dict(adapter.from_config({**adapter.config, "qformer_qk_norm": False}))


# ---------------------------------------------------------------------------------------------------- training


def _warm_start(tmp_path, checkpoint: dict, **values) -> tuple[CustomContrastObjective, ObjectiveInputs]:
    """The objective of a run started from ``checkpoint`` (``init_from_ip_adapter``) on a tiny SD1.5 base, and one
    batch of 3 encoded as the trainer encodes it (no dropout)."""
    torch.save(checkpoint, tmp_path / "ip-adapter.bin")
    write_synthetic_dataset(tmp_path / "subjects", num_subjects=4, frames_per_subject=2, size=32)
    config = TrainingConfig.from_dict(
        {
            "pretrained_model_name_or_path": "unused",
            "train_data": str(tmp_path / "subjects"),
            "resolution": 32,
            "init_from_ip_adapter": str(tmp_path / "ip-adapter.bin"),
            "adapter": {"num_textual_tokens": 2, "textual_depth": 1, "timestep_embed_dim": 32},
            **values,
        }
    ).validate()
    base = BaseModel.from_pipeline(tiny_sd15_pipeline())
    base.freeze("cpu", torch.float32)
    adapter = build_adapter(config, base)
    objective = CustomContrastObjective(
        base.unet, adapter, base.noise_scheduler, ObjectiveSettings.from_config(config)
    )
    dataset = SubjectTripletDataset(tmp_path / "subjects", resolution=32, reference_size=224)
    encoder = BatchEncoder(
        base,
        feature_layers=adapter.adapter_config.image_feature_layers,
        resolution=32,
        dropout=ConditioningDropout(0.0, 0.0, 0.0),
        image_input=adapter.adapter_config.image_input,
    )
    inputs = encoder(collate_triplets([dataset[i] for i in range(3)]), step_generator(0, 0, 0, 0))
    return objective.train(), inputs


def _ip_adapter_loss(checkpoint: dict, inputs: ObjectiveInputs, image_embeds: torch.Tensor, scheduler) -> float:
    """The diffusion loss of diffusers' IP-Adapter of ``checkpoint`` on the same base, batch, noise and timesteps."""
    reference = tiny_sd15_pipeline()
    reference.load_ip_adapter(checkpoint, subfolder=None, weight_name=None, image_encoder_folder=None)
    with torch.no_grad():
        prediction = reference.unet(
            scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps),
            inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            added_cond_kwargs={"image_embeds": [image_embeds]},
        ).sample
    target = diffusion_target(scheduler, inputs.latents, inputs.noise, inputs.timesteps)
    return torch.nn.functional.mse_loss(prediction, target).item()


@pytest.mark.parametrize("kind", ["plus", "plain"])
def test_training_from_ip_adapter_starts_at_its_diffusion_loss(kind, tmp_path):
    encoder = tiny_sd15_pipeline().image_encoder
    unet = tiny_sd15_pipeline(image_encoder=False).unet
    if kind == "plus":
        checkpoint = plus_checkpoint(unet, encoder.config.hidden_size, seed=5)
    else:
        checkpoint = plain_checkpoint(unet, encoder.config.projection_dim, seed=5)
    objective, inputs = _warm_start(tmp_path, checkpoint)
    output = objective(inputs)
    # One image per row: [batch, 1, tokens, width] hidden states for Plus; the pooled [batch, 1, width] is one already.
    features = inputs.reference_features
    expected = _ip_adapter_loss(
        checkpoint, inputs, features[:, None] if kind == "plus" else features, objective.noise_scheduler
    )
    assert abs(output.terms["diffusion"].item() - expected) < 1e-6 * expected
    # What the run logs of the added parts: all shut at the first step.
    assert all(output.terms[name] == 0 for name in ("s_plus_scale", "gate_strength", "tv_fusion_norm"))

    # The added parts open up from there: the diffusion loss has a gradient on the TV fusion's residual and on
    # every layer's gate strength, though both start as exact no-ops.
    output.loss.backward()
    assert objective.adapter.encoder.tv_fusion.proj.weight.grad.abs().sum() > 0
    assert all(layer.location_gate.strength.grad != 0 for layer in objective.adapter.layers)


def test_the_s_plus_warmup_gives_the_s_plus_tokens_a_diffusion_gradient(tmp_path):
    """A converted adapter's S+ tokens start at scale 0, where the diffusion loss gives them no gradient; the ramp
    (``s_plus_warmup_steps``) raises the scale step by step, and each step computes the adapter at that scale."""
    unet = tiny_sd15_pipeline(image_encoder=False).unet
    checkpoint = plus_checkpoint(unet, tiny_sd15_pipeline().image_encoder.config.hidden_size, seed=7)
    only_diffusion = {"use_cscl": False, "use_macl": False, "use_location": False}
    objective, inputs = _warm_start(tmp_path, checkpoint, s_plus_warmup_steps=4, **only_diffusion)
    assert [objective.s_plus_scale(step) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    s_plus_weight = objective.adapter.encoder.s_plus_proj[0].weight

    def diffusion(step: int, warmup: int) -> tuple[float, float]:
        objective.settings = dataclasses.replace(objective.settings, s_plus_warmup_steps=warmup)
        objective.zero_grad(set_to_none=True)
        output = objective(inputs, step=step)
        output.loss.backward()
        gradient = s_plus_weight.grad
        return output.terms["diffusion"].item(), 0.0 if gradient is None else gradient.abs().sum().item()

    assert diffusion(0, warmup=4)[1] == 0  # the first step: the adapter's own scale, 0
    assert diffusion(2, warmup=0)[1] == 0  # no ramp: none at any step
    loss, gradient = diffusion(2, warmup=4)
    assert gradient > 0
    # Step 2 of 4 is the adapter at S+ scale 0 + (1 - 0) * 2 / 4, set by hand.
    dcc.loaders.injection.set_scale(objective.unet, s_plus_scale=0.5)
    expected_loss, expected_gradient = diffusion(2, warmup=0)
    assert loss == pytest.approx(expected_loss, rel=1e-6) and gradient == pytest.approx(expected_gradient, rel=1e-5)


def test_a_run_with_the_warmup_exports_the_scale_it_reached(tmp_path):
    """Two steps of a four-step ramp from a converted plain IP-Adapter: the exported adapter loads at S+ scale 0.5."""
    from diffusers_customcontrast.training import train

    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    torch.save(plain_checkpoint(pipe.unet, pipe.image_encoder.config.projection_dim), tmp_path / "ip-adapter.bin")
    write_synthetic_dataset(tmp_path / "subjects", num_subjects=4, frames_per_subject=2, size=32)
    config = TrainingConfig.from_dict(
        {
            "pretrained_model_name_or_path": str(tmp_path / "base"),
            "train_data": str(tmp_path / "subjects"),
            "init_from_ip_adapter": str(tmp_path / "ip-adapter.bin"),
            "adapter": {
                "num_textual_tokens": 2,
                "textual_depth": 1,
                "timestep_embed_dim": 32,
                "hidden_size": 64,
                "num_heads": 2,
            },
            "s_plus_warmup_steps": 4,
            "image_dropout": 0.5,
            "resolution": 32,
            "train_batch_size": 2,
            "max_train_steps": 2,
            "checkpointing_steps": None,
            "report_to": "none",
            "output_dir": str(tmp_path / "run"),
        }
    )
    train(config)
    adapter = dcc.CustomContrastAdapter.from_pretrained(tmp_path / "run")
    assert adapter.adapter_config.s_plus_scale == 0.5 and adapter.adapter_config.image_input == "image_embeds"
