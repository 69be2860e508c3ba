"""The subject's step range (issues 14, 28): ``set_customcontrast_scale(..., start=, end=)`` and the community
pipelines' ``subject_start=`` / ``subject_end=``, decided from the noise level each UNet call receives (its timestep,
as ComfyUI's start_at / end_at), with nothing from the pipeline: five schedulers (Heun's two calls a step, PNDM's
doubled first step), img2img's strength, the UNet called directly; the base model's calls bit for bit before the
range starts."""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
)

import diffusers_customcontrast as dcc
from diffusers_customcontrast.community import CustomContrastPipelineMixin
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SUBJECT = make_subject_image(0)
STEPS = 4
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "pndm": PNDMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
# The timestep of each UNet call of a 4-step generation of the tiny pipeline (DDIM and PNDM: "leading" spacing, the
# others their own default): Heun's steps call the UNet twice (the second call at the next step's timestep), its last
# one once; PNDM's first step twice.
CALL_TIMESTEPS = {
    "ddim": [751, 501, 251, 1],
    "euler": [999, 666, 333, 0],
    "heun": [999, 666, 666, 333, 333, 0, 0],
    "pndm": [751, 501, 501, 251, 1],
    "dpm++": [999, 749, 500, 250],
}


def in_range(timestep: int, start: float, end: float) -> bool:
    """The documented rule: the call's noise position 1 - t / 1000 lies in [start, end) (end = 1 included)."""
    position = 1 - timestep / 1000
    return start <= position and (position < end or end == 1)


def pipeline(scheduler: str = "ddim"):
    pipe = tiny_sd15_pipeline()
    # PNDM as SD1.5 ships it: PLMS only (skip_prk_steps), whose first step calls the UNet twice.
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config, skip_prk_steps=True)
    return pipe


def latents_after_each_call(pipe, image=None, prompt: str | None = "a toy", **kwargs) -> list[torch.Tensor]:
    """The latents after every UNet call, as ``callback_on_step_end`` sees them."""
    seen = []

    def keep(pipe, index, timestep, callback_kwargs):
        seen.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    call = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent")
    if image is not None:
        call.update(image=image, strength=0.5, num_inference_steps=2 * STEPS)
    pipe(
        prompt,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
        **call,
        **kwargs,
    )
    return seen


def active_calls(pipe, **kwargs) -> list[bool]:
    """Whether the adapter ran in each UNet call of one generation."""
    with dcc.record_customcontrast(pipe) as recording:
        latents_after_each_call(pipe, ip_adapter_image=SUBJECT, **kwargs)
    return [step.tokens is not None for step in recording.steps]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_start_half_way_keeps_the_base_models_first_half_bit_for_bit(scheduler):
    pipe = pipeline(scheduler)
    base = latents_after_each_call(pipe)
    pipe.load_customcontrast(tiny_adapter(pipe))
    full = latents_after_each_call(pipe, ip_adapter_image=SUBJECT)
    pipe.set_customcontrast_scale(1.0, start=0.5)
    second_half = latents_after_each_call(pipe, ip_adapter_image=SUBJECT)

    timesteps = CALL_TIMESTEPS[scheduler]
    assert len(base) == len(second_half) == len(timesteps)
    first_active = next(call for call, t in enumerate(timesteps) if in_range(t, 0.5, 1.0))
    assert 0 < first_active < len(timesteps)
    for call in range(len(timesteps)):
        if call < first_active:
            torch.testing.assert_close(second_half[call], base[call], rtol=0, atol=0)
            assert not torch.equal(full[call], base[call])  # the subject acts on these calls when not held back
        else:
            assert not torch.equal(second_half[call], base[call])


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize(("start", "end"), [(0.5, 1.0), (0.0, 0.5), (0.25, 0.75)])
def test_the_adapter_runs_on_the_steps_in_range_only(scheduler, start, end):
    pipe = pipeline(scheduler)
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(1.0, start=start, end=end)
    with dcc.record_customcontrast(pipe) as recording:
        latents_after_each_call(pipe, ip_adapter_image=SUBJECT)
    assert [int(step.timesteps[0]) for step in recording.steps] == CALL_TIMESTEPS[scheduler]
    expected = [in_range(t, start, end) for t in CALL_TIMESTEPS[scheduler]]
    assert [step.tokens is not None for step in recording.steps] == expected
    assert any(expected) and not all(expected)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize(("start", "end"), [(0.5, 1.0), (0.0, 0.5), (0.25, 0.75)])
def test_one_call_a_step_schedulers_act_on_the_fraction_of_steps(scheduler, start, end):
    """With one UNet call a step and evenly spaced timesteps the range is, as before, about that fraction of the
    steps: step i of N acts when start <= i / N < end."""
    pipe = pipeline(scheduler)
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(1.0, start=start, end=end)
    assert active_calls(pipe) == [start <= step / STEPS < end for step in range(STEPS)]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "heun"])
def test_img2img_strength_starts_part_way_along_the_noise_levels(scheduler):
    """strength 0.5 starts at noise position about 0.5: start = 0.5 acts on every step it runs, start = 0.75 on the
    calls at timesteps below 250 only, and the calls before are the base model's bit for bit."""
    pipe = pipeline(scheduler)
    image = make_subject_image(3)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    base = latents_after_each_call(img2img, image=image)
    pipe.load_customcontrast(tiny_adapter(pipe))
    img2img.set_customcontrast_scale(1.0, start=0.5)  # from_pipe shares the adapter
    with dcc.record_customcontrast(img2img) as recording:
        latents_after_each_call(img2img, image=image, ip_adapter_image=SUBJECT)
    assert all(step.tokens is not None for step in recording.steps)
    img2img.set_customcontrast_scale(start=0.75)
    with dcc.record_customcontrast(img2img) as recording:
        held_back = latents_after_each_call(img2img, image=image, ip_adapter_image=SUBJECT)
    timesteps = [int(step.timesteps[0]) for step in recording.steps]
    active = [step.tokens is not None for step in recording.steps]
    assert active == [in_range(t, 0.75, 1.0) for t in timesteps] and any(active) and not all(active)
    first_active = active.index(True)
    for call in range(len(timesteps)):
        if call < first_active:
            torch.testing.assert_close(held_back[call], base[call], rtol=0, atol=0)
        else:
            assert not torch.equal(held_back[call], base[call])


def test_a_callback_that_changes_the_range_acts_from_the_next_step():
    pipe = pipeline("euler")
    pipe.load_customcontrast(tiny_adapter(pipe))

    def stop_after_the_first_step(pipe, index, timestep, callback_kwargs):
        if index == 0:
            pipe.set_customcontrast_scale(1.0, start=0.0, end=0.25)
        return callback_kwargs

    with dcc.record_customcontrast(pipe) as recording:
        pipe("a toy", ip_adapter_image=SUBJECT, num_inference_steps=STEPS, height=64, width=64, output_type="latent",
             callback_on_step_end=stop_after_the_first_step)  # fmt: skip
    assert [step.tokens is not None for step in recording.steps] == [True, False, False, False]


def test_threads_with_their_own_schedulers_count_their_own_steps():
    """The prompt is encoded up front: diffusers' ``encode_prompt`` through one shared fast tokenizer is not
    thread-safe upstream (tests/test_stateless_inference.py), which is not what this test is about."""
    import threading

    pipe = pipeline("ddim")
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(1.0, start=0.5)
    heun = type(pipe).from_pipe(pipe, scheduler=HeunDiscreteScheduler.from_config(pipe.scheduler.config))
    heun.set_progress_bar_config(disable=True)
    expected = {"ddim": active_calls(pipe), "heun": active_calls(heun)}
    assert expected["heun"] == [in_range(t, 0.5, 1.0) for t in CALL_TIMESTEPS["heun"]]
    results, errors = {}, []

    with torch.no_grad():
        positive, negative = pipe.encode_prompt("a toy", "cpu", 1, True)
    encoded = dict(prompt=None, prompt_embeds=positive, negative_prompt_embeds=negative)

    def run(name, target):
        try:
            for _ in range(3):
                results.setdefault(name, []).append(active_calls(target, **encoded))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in (("ddim", pipe), ("heun", heun))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {name: [pattern] * 3 for name, pattern in expected.items()}


def test_a_unet_called_outside_a_pipeline_follows_its_timestep():
    pipe = pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(1.0, start=0.5)
    embeds = pipe.prepare_ip_adapter_image_embeds(SUBJECT, None, "cpu", 1, False)
    inputs = dict(
        sample=torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)),
        encoder_hidden_states=torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)),
    )
    with torch.no_grad(), dcc.record_customcontrast(pipe) as recording:
        for timestep in (torch.tensor(999), 100, torch.tensor([400.0])):
            pipe.unet(**inputs, timestep=timestep, added_cond_kwargs={"image_embeds": embeds})
    assert [step.tokens is not None for step in recording.steps] == [False, True, True]


@pytest.mark.parametrize(
    ("start", "end"), [(0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), ("0", 1.0), (1.0, None), (True, 1.0)]
)
def test_bad_ranges_are_refused_in_one_sentence(start, end):
    pipe = pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    with pytest.raises(ValueError, match=r"^The subject's step range must be two numbers with 0 <= start < end <= 1"):
        pipe.set_customcontrast_scale(0.5, start=start, end=end)
    state = dcc.loaders.injection.attached(pipe.unet)
    assert state.step_range == (0.0, 1.0)  # left as it was, the scale too
    assert {p.subject_scale for p in state.processors.values()} == {1.0}
    if end is None:
        return  # None keeps the pipeline's end (1): start = 1 is the empty range
    with pytest.raises(ValueError, match="step range"):
        pipe("a toy", ip_adapter_image=SUBJECT, num_inference_steps=2, height=64, width=64,
             cross_attention_kwargs={"customcontrast": dcc.SubjectOptions(start=start, end=end)})  # fmt: skip


class CommunityPipeline(CustomContrastPipelineMixin, type(tiny_sd15_pipeline())):
    pass


def test_community_pipeline_takes_a_range_per_call():
    pipe = CommunityPipeline.from_pipe(tiny_sd15_pipeline())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(1.0, start=0.25, end=0.75)
    call = dict(num_inference_steps=STEPS, height=64, width=64, output_type="np", return_location_maps=True)

    def run(**kwargs):
        out = pipe("a toy", subject_image=SUBJECT, generator=torch.Generator().manual_seed(0), **call, **kwargs)
        return out.images, len(out.location_maps)

    (pipeline_range, maps), (late, late_maps) = run(), run(subject_start=0.5)
    assert maps == 2 and late_maps == 1  # timesteps 501 and 251; 251 only (the pipeline's end, 0.75, still holds)
    (all_steps, all_maps), (again, _) = run(subject_start=0.0, subject_end=1.0), run()
    assert all_maps == STEPS
    np.testing.assert_array_equal(again, pipeline_range)  # a call's range leaves the pipeline's alone
    assert not np.array_equal(late, pipeline_range) and not np.array_equal(all_steps, pipeline_range)
    with pytest.raises(ValueError, match="step range"):
        run(subject_start=0.9, subject_end=0.1)


def test_example_script(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the script imports _common from its own folder
    from test_examples import SAMPLING, model_args, pixels, save_sd_models

    models = save_sd_models(tmp_path / "models", tiny_sd15_pipeline)
    SUBJECT.save(tmp_path / "subject.png")
    main = runpy.run_path(str(EXAMPLES / "step_range.py"))["main"]
    paths = main(
        [*model_args(models), "--subject", str(tmp_path / "subject.png"), *SAMPLING, "--prompt", "a toy",
         "--range", "0:1", "0.5:1", "0:0.5", "--output", str(tmp_path / "out")]
    )  # fmt: skip
    images = {path.name.split("_")[0]: pixels(path) for path in paths}
    assert sorted(images) == ["range0-0.5", "range0-1", "range0.5-1"]
    assert len({image.tobytes() for image in images.values()}) == 3  # each range gives another image
    with pytest.raises(SystemExit):
        main([*model_args(models), "--subject", str(tmp_path / "subject.png"), "--range", "half"])


def test_setting_the_scale_keeps_the_range_and_setting_the_range_keeps_the_scale():
    """Issue 28, bug 3: ``None`` (an argument left out) keeps the current value, for the range as for the scales."""
    pipe = pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(1.0, start=0.5)
    pipe.set_customcontrast_scale(0.8)
    state = dcc.loaders.injection.attached(pipe.unet)
    assert state.step_range == (0.5, 1.0)
    assert active_calls(pipe) == [False, False, True, True]
    pipe.set_customcontrast_scale(end=0.75)
    assert state.step_range == (0.5, 0.75) and {p.subject_scale for p in state.processors.values()} == {0.8}
    pipe.set_customcontrast_scale(start=0.0, end=1.0)
    assert active_calls(pipe) == [True] * STEPS


def test_one_frozen_settings_value_per_adapter_replaced_whole():
    """Issue 28: the adapter's scales and range are one frozen value; a setter replaces it, processors keep no copy."""
    pipe = pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    state = dcc.loaders.injection.attached(pipe.unet)
    before = state.settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.start = 0.5
    pipe.set_customcontrast_scale({"up": 0.5}, start=0.25)
    assert before.scale == (1.0,) * len(state.processors) and (before.start, before.end) == (0.0, 1.0)
    names = list(state.processors)
    expected = tuple(0.5 if name.startswith("up_blocks") else 0.0 for name in names)
    assert state.settings.scale == expected and (state.settings.start, state.settings.end) == (0.25, 1.0)
    assert tuple(state.processors[name].subject_scale for name in names) == expected
    # diffusers' set_ip_adapter_scale writes each processor's scale[0]: it lands in the settings too.
    pipe.set_ip_adapter_scale(0.7)
    assert state.settings.scale == (0.7,) * len(names) and state.settings.start == 0.25
    # A bad value changes nothing.
    with pytest.raises(ValueError, match="step range"):
        pipe.set_customcontrast_scale(0.1, start=0.9, end=0.2)
    assert state.settings.scale == (0.7,) * len(names)
