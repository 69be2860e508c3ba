"""Each UNet call carries its own subject (issue 12): what that fixes, shown on tiny pipelines.

Every test here failed before the redesign (the timestep kept by a hook, image features cached by tensor identity
and ``_version``, a shared recorder): ``torch.inference_mode``, threads sharing one pipeline, accelerate's offload
hooks, fp16 overflow in the visual branch, ``image_feature_layers`` other than the penultimate, a subject masked out
entirely still acting, its S+ tokens reaching the whole image, several subjects with per-row timesteps.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention
from PIL import Image

import diffusers_customcontrast as dcc
from diffusers_customcontrast.attention_processor import CustomContrastAttnProcessor2_0
from diffusers_customcontrast.models import CustomContrastLayer, SubjectTokens
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

STEPS = dict(num_inference_steps=2, height=64, width=64, output_type="np")
FIRST_CROSS_ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def generate(pipe, seed=0, prompt="a dog", **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**STEPS, **kwargs}).images


def half_masks(*halves: str) -> torch.Tensor:
    """``[1, n, 64, 64]`` masks: ``"left"``, ``"right"`` or ``"none"`` (all zero) for each subject."""
    masks = []
    for half in halves:
        mask = np.zeros((64, 64), np.uint8)
        if half == "left":
            mask[:, :32] = 255
        elif half == "right":
            mask[:, 32:] = 255
        masks.append(Image.fromarray(mask))
    return IPAdapterMaskProcessor().preprocess(masks, height=64, width=64).reshape(1, len(halves), 64, 64)


@pytest.fixture
def loaded():
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    return pipe


@pytest.mark.parametrize("masked", [False, True], ids=["location-maps", "masks"])
def test_generation_under_inference_mode(loaded, masked):
    subjects = [[make_subject_image(0), make_subject_image(1)]]
    extra = {"cross_attention_kwargs": {"ip_adapter_masks": [half_masks("left", "right")]}} if masked else {}
    reference = generate(loaded, ip_adapter_image=subjects, **extra)
    with torch.inference_mode():
        np.testing.assert_array_equal(generate(loaded, ip_adapter_image=subjects, **extra), reference)


def test_threads_sharing_one_pipeline_give_the_sequential_outputs(loaded):
    """The prompts are encoded up front: diffusers' ``encode_prompt`` through one shared fast tokenizer is not
    thread-safe upstream (1 of 640 concurrent encodings of this pipeline came out different), which is not what this
    test is about."""
    jobs = [(thread, index) for thread in range(4) for index in range(8)]
    with torch.no_grad():
        prompts = {seed: loaded.encode_prompt(f"a toy number {seed}", "cpu", 1, True) for seed in range(32)}

    def run(thread: int, index: int):
        seed = 8 * thread + index
        positive, negative = prompts[seed]
        with dcc.record_customcontrast(loaded) as recording:
            images = generate(
                loaded,
                seed=seed,
                prompt=None,
                prompt_embeds=positive,
                negative_prompt_embeds=negative,
                ip_adapter_image=make_subject_image(seed),
            )
        return images, len(recording.steps)

    sequential = {job: run(*job) for job in jobs}
    threaded, errors = {}, []

    def worker(thread: int) -> None:
        try:
            for index in range(8):
                threaded[thread, index] = run(thread, index)
        except Exception as error:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for job in jobs:
        np.testing.assert_array_equal(threaded[job][0], sequential[job][0], err_msg=str(job))
        # Each thread's recording holds its own UNet calls only: one per denoising step.
        assert threaded[job][1] == STEPS["num_inference_steps"]
    assert len({sequential[job][0].tobytes() for job in jobs}) == len(jobs)  # 32 different generations


OFFLOADS = {
    "accelerate cpu_offload (sequential, of the UNet)": lambda pipe: cpu_offload(pipe.unet, execution_device="cpu"),
    "enable_model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
}


@pytest.mark.parametrize("offload", list(OFFLOADS))
@pytest.mark.parametrize("order", ["load, then offload", "offload, then load"])
def test_offloaded_unet_gives_the_output_of_the_plain_one(offload, order):
    plain = tiny_sd15_pipeline()
    plain.load_customcontrast(tiny_adapter(plain))
    subject = {"ip_adapter_image": make_subject_image(0)}
    reference = generate(plain, **subject)

    pipe = tiny_sd15_pipeline()
    adapter = tiny_adapter(pipe)  # built before offloading: an offloaded UNet's weights are on the meta device
    if order == "offload, then load":
        OFFLOADS[offload](pipe)
    pipe.load_customcontrast(adapter)
    if order == "load, then offload":
        OFFLOADS[offload](pipe)
    np.testing.assert_array_equal(generate(pipe, **subject), reference)
    if order == "offload, then load":
        assert not any(p.is_meta for p in adapter.parameters())  # its weights were not moved to the meta device
    pipe.unload_customcontrast()
    np.testing.assert_array_equal(generate(pipe), generate(tiny_sd15_pipeline()))


def test_float16_matches_float32_within_tolerance():
    subject = {"ip_adapter_image": make_subject_image(0)}
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        pipe = tiny_sd15_pipeline(dtype=dtype)
        pipe.load_customcontrast(tiny_adapter(tiny_sd15_pipeline()))
        outputs[dtype] = generate(pipe, **subject)
    # Images in [0, 1]: half precision stays within 0.02 of float32 through the whole generation (measured 0.003;
    # bfloat16, 8 bits of mantissa against 11, 0.028).
    np.testing.assert_allclose(outputs[torch.float16], outputs[torch.float32], atol=0.02)


def _single_layer(upcast_attention: bool, seed: int = 0):
    """One cross-attention layer (width 64, one head of 64: scale 1/8) with the processor, and a call's subject."""
    generator = torch.Generator().manual_seed(seed)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=1, dim_head=64, upcast_attention=upcast_attention)
    layer = CustomContrastLayer(cross_attention_dim=32, hidden_size=64)
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v, layer.to_k_ip, layer.to_v_ip):
            linear.weight.copy_(torch.eye(*linear.weight.shape))
    attn.set_processor(CustomContrastAttnProcessor2_0(layer, layer_index=0, num_s_plus_tokens=4))

    def subject(scale_of_visual_tokens: float) -> dcc.SubjectConditioning:
        visual = torch.rand(2, 1, 4, 32, generator=generator) * scale_of_visual_tokens
        tokens = SubjectTokens(
            s_plus=torch.rand(2, 1, 4, 32, generator=generator), visual=visual, visual_cls=None, textual_cls=None
        )
        return dcc.SubjectConditioning(tokens=tokens, timesteps=torch.tensor([500, 500]))

    return attn, subject


def _run(attn, hidden_states, text, subject, dtype):
    attn = copy.deepcopy(attn).to(dtype)
    tokens = subject.tokens
    cast = dcc.SubjectConditioning(
        tokens=SubjectTokens(tokens.s_plus.to(dtype), tokens.visual.to(dtype), None, None), timesteps=subject.timesteps
    )
    with torch.no_grad():
        return attn(hidden_states.to(dtype), encoder_hidden_states=(text.to(dtype), [cast])).float()


def test_visual_branch_scales_before_the_product_in_float16():
    """Raw logits of ~100 000 overflow float16 (max 65 504); scaled by 1/8 first, as SDPA does, they do not."""
    attn, subject = _single_layer(upcast_attention=False)
    generator = torch.Generator().manual_seed(1)
    hidden_states = 30 + 10 * torch.rand(2, 16, 64, generator=generator)
    text = torch.rand(2, 77, 32, generator=generator) * 0.1
    conditioning = subject(scale_of_visual_tokens=120.0)
    raw = hidden_states[..., :32] @ conditioning.tokens.visual[:, 0].transpose(-1, -2)
    assert raw.max() > 65504  # what the unscaled product would have to hold
    reference = _run(attn, hidden_states, text, conditioning, torch.float32)
    half = _run(attn, hidden_states, text, conditioning, torch.float16)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, reference, rtol=2e-2, atol=0.5)


def test_visual_branch_honours_upcast_attention():
    """Logits beyond float16 even after scaling: a layer with ``upcast_attention`` computes them in float32."""
    generator = torch.Generator().manual_seed(2)
    hidden_states = 280 + 20 * torch.rand(2, 16, 64, generator=generator)
    text = torch.rand(2, 77, 32, generator=generator) * 0.01
    outputs = {}
    for upcast in (True, False):
        attn, subject = _single_layer(upcast_attention=upcast)
        conditioning = subject(scale_of_visual_tokens=300.0)
        outputs[upcast] = (
            _run(attn, hidden_states, text, conditioning, torch.float16),
            _run(attn, hidden_states, text, conditioning, torch.float32),
        )
    half, reference = outputs[True]
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, reference, rtol=2e-2, atol=2.0)
    # Since issue 29 the visual logits are float32 products whatever the flag: the same layer without it holds too.
    half, reference = outputs[False]
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, reference, rtol=2e-2, atol=2.0)


def test_image_feature_layers_are_the_features_the_adapter_reads():
    pipe = tiny_sd15_pipeline()
    image = make_subject_image(0)
    pixels = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = {
            "image": pipe.image_encoder(pixels, output_hidden_states=True).hidden_states,
            "blank": pipe.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states,
        }

    def by_hand(layer: int) -> list[torch.Tensor]:
        """``ip_adapter_image_embeds`` of one subject under guidance: [blank image; image] at one hidden layer."""
        return [torch.cat([hidden["blank"][layer], hidden["image"][layer]])[:, None]]

    pipe.load_customcontrast(tiny_adapter(pipe, image_feature_layers=[-1]))
    with torch.no_grad():  # the image encoder is not changed: its other users see its own hidden states
        own = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(own, hidden["image"], strict=True))
    from_image = generate(pipe, ip_adapter_image=image)
    np.testing.assert_array_equal(from_image, generate(pipe, ip_adapter_image_embeds=by_hand(-1)))
    assert np.abs(from_image - generate(pipe, ip_adapter_image_embeds=by_hand(-2))).max() > 1e-3
    pipe.unload_customcontrast()  # the image encoder hands out its own hidden states again
    torch.testing.assert_close(pipe.encode_image(image, "cpu", 1, output_hidden_states=True)[0], hidden["image"][-2])


def test_a_subject_masked_out_entirely_has_no_effect(loaded):
    def run(second_subject: int, halves=("left", "none")):
        return generate(
            loaded,
            ip_adapter_image=[[make_subject_image(0), make_subject_image(second_subject)]],
            cross_attention_kwargs={"ip_adapter_masks": [half_masks(*halves)]},
        )

    np.testing.assert_array_equal(run(second_subject=1), run(second_subject=2))
    assert np.abs(run(1, ("left", "right")) - run(2, ("left", "right"))).max() > 1e-4  # with a region, it acts


def _first_layer_output(pipe, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The first cross-attention layer's output ``[2, 32 * 32, C]`` in one UNet call with two subjects."""
    captured = []
    module = pipe.unet.get_submodule(FIRST_CROSS_ATTENTION)
    handle = module.register_forward_hook(lambda m, args, output: captured.append(output))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pipe.unet(
            torch.randn(2, 4, 32, 32, generator=generator),
            torch.tensor(500),
            encoder_hidden_states=torch.randn(2, 77, 32, generator=generator),
            added_cond_kwargs={"image_embeds": [features]},
            cross_attention_kwargs={"ip_adapter_masks": [masks]},
        )
    handle.remove()
    return captured[0]


def test_s_plus_tokens_of_a_subject_reach_only_its_region(loaded):
    loaded.set_customcontrast_scale(0.0, s_plus_scale=1.0)  # the visual branch off: only the S+ tokens act
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 257, 32, generator=generator)
    changed = features.clone()
    changed[:, 1] = torch.randn(2, 257, 32, generator=generator)  # the second subject only
    masks = half_masks("left", "right")
    before, after = _first_layer_output(loaded, features, masks), _first_layer_output(loaded, changed, masks)

    region = IPAdapterMaskProcessor.downsample(masks[:, 1], 2, before.shape[1], 1)[..., 0].clamp(0, 1)
    outside, inside = region == 0, region > 0.5
    assert outside.sum() > 400 and inside.sum() > 400
    torch.testing.assert_close(after[outside], before[outside], rtol=0, atol=0)
    assert (after[inside] - before[inside]).abs().max() > 1e-4


def test_several_subjects_with_one_timestep_per_row(loaded):
    generator = torch.Generator().manual_seed(4)
    inputs = {
        "sample": torch.randn(2, 4, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
        "features": torch.randn(2, 3, 257, 32, generator=generator),  # three subjects per row
    }
    timesteps = torch.tensor([900, 20])

    def call(rows: slice, timestep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded.unet(
                inputs["sample"][rows],
                timestep,
                encoder_hidden_states=inputs["encoder_hidden_states"][rows],
                added_cond_kwargs={"image_embeds": [inputs["features"][rows]]},
            ).sample

    together = call(slice(0, 2), timesteps)
    for row in range(2):
        torch.testing.assert_close(
            together[row : row + 1], call(slice(row, row + 1), timesteps[row]), rtol=1e-5, atol=1e-5
        )


def test_training_calls_the_adapter_once_per_unet_call(loaded):
    """Tokens given with the call pass through the projection: the UNet does not run the adapter a second time."""
    adapter = dcc.loaders.injection.attached(loaded.unet).adapter
    calls = []
    handle = adapter.encoder.register_forward_hook(lambda *args: calls.append(1))
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 257, 32, generator=generator)
    timesteps = torch.tensor([700, 300])
    tokens = adapter(features, timesteps)
    record = dcc.StepRecord()
    conditioning = dcc.SubjectConditioning(tokens=tokens, record=record)
    sample, context = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 77, 32, generator=generator)
    given = loaded.unet(sample, timesteps, context, added_cond_kwargs={"image_embeds": [conditioning]}).sample
    assert len(calls) == 1 and sorted(record.location_maps) == list(range(adapter.num_layers))
    with torch.no_grad():
        computed = loaded.unet(sample, timesteps, context, added_cond_kwargs={"image_embeds": [features[:, None]]})
    handle.remove()
    assert len(calls) == 2
    # The same tokens, computed in another batch layout: equal up to float32 rounding.
    torch.testing.assert_close(given.detach(), computed.sample, rtol=1e-5, atol=1e-5)


def test_an_image_context_computed_once_serves_every_step(loaded):
    """The explicit way to encode the subject once per generation: the call's options carry its image context."""
    adapter = dcc.loaders.injection.attached(loaded.unet).adapter
    embeds = loaded.prepare_ip_adapter_image_embeds(make_subject_image(0), None, "cpu", 1, True)
    with torch.no_grad():
        context = adapter.encoder.encode_image(embeds[0].flatten(0, 1))
    runs = []
    handle = adapter.encoder.visual_qformer.register_forward_hook(lambda *args: runs.append(1))
    every_step = generate(loaded, ip_adapter_image_embeds=embeds)
    assert len(runs) == STEPS["num_inference_steps"]
    options = {"customcontrast": dcc.SubjectOptions(image_context=context)}
    once = generate(loaded, ip_adapter_image_embeds=embeds, cross_attention_kwargs=options)
    handle.remove()
    assert len(runs) == STEPS["num_inference_steps"]  # no image encoding during the second generation
    np.testing.assert_array_equal(once, every_step)
    with pytest.raises(ValueError, match="The image context has 2 rows, but a batch of 4 latents"):
        generate(loaded, ip_adapter_image_embeds=embeds, cross_attention_kwargs=options, num_images_per_prompt=2)
