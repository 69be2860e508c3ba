"""How the package enters diffusers (issue 28): importing it adds the documented methods to the pipelines that can use
them and changes nothing else; unloading leaves what a never-loaded pipeline has; the bugs found by reading; no
device -> host sync inside the denoising loop (issue 29)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_ip_adapter_conversion import plus_checkpoint

import diffusers_customcontrast as dcc
from diffusers_customcontrast.loaders import injection
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

SUBJECT, STYLE = make_subject_image(0), make_subject_image(4)
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np")
DOCUMENTED_METHODS = sorted(dcc.loaders.pipeline.PIPELINE_METHODS)


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe("a toy", generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


# ------------------------------------------------------------------------------------------------ importing

IMPORT_SCRIPT = r"""
import json
import diffusers
from diffusers import (DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionControlNetPipeline,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline)
from diffusers.loaders import IPAdapterMixin

def family(root):
    found, pending = set(), [root]
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.add(cls)
            pending.extend(cls.__subclasses__())
    return found

def snapshot():
    classes = family(IPAdapterMixin) | {DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline}
    return {f"{c.__module__}.{c.__qualname__}": {k: id(v) for k, v in vars(c).items()} for c in classes}

before = snapshot()
import diffusers_customcontrast
after = snapshot()

class Later(StableDiffusionPipeline):  # a subclass defined after the import
    pass

changes = {}
for name in sorted(set(before) | set(after)):
    old, new = before.get(name, {}), after.get(name, {})
    added = sorted(set(new) - set(old))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    removed = sorted(set(old) - set(new))
    if added or changed or removed:
        changes[name] = {"added": added, "changed": changed, "removed": removed}
print(json.dumps({
    "classes": len(before),
    "changes": changes,
    "flux": [m for m in dir(FluxPipeline) if "customcontrast" in m],
    "sd3": [m for m in dir(StableDiffusion3Pipeline) if "customcontrast" in m],
    "later": [m for m in dir(Later) if "customcontrast" in m],
    "later_own": sorted(vars(Later)),
}))
"""


def test_import_adds_the_documented_methods_to_ip_adapter_mixin_and_changes_nothing_else():
    done = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["classes"] >= 10  # the IP-Adapter pipelines imported, and DiffusionPipeline, FLUX, SD3
    assert result["changes"] == {
        "diffusers.loaders.ip_adapter.IPAdapterMixin": {"added": DOCUMENTED_METHODS, "changed": [], "removed": []}
    }
    assert result["flux"] == [] and result["sd3"] == []  # pipelines without IPAdapterMixin gain nothing
    assert result["later"] == DOCUMENTED_METHODS  # inherited, not put on the subclass
    assert "__call__" not in result["later_own"] and "__init_subclass__" not in result["later_own"]


# ------------------------------------------------------------------------------------------------ unloading


def fingerprint(pipe) -> dict:
    """What a pipeline is made of: its attributes, its components' classes, every module's class, hooks and
    parameters, the UNet's processors and config, the feature extractor's class and state."""
    modules = {}
    for component_name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for name, module in component.named_modules():
                modules[f"{component_name}.{name}"] = (
                    type(module),
                    len(module._forward_pre_hooks),
                    len(module._forward_hooks),
                    len(module._backward_hooks),
                    len(module._backward_pre_hooks),
                    tuple((n, p.shape, p.dtype) for n, p in module.named_parameters(recurse=False)),
                    tuple(sorted(vars(module))),
                )
    return {
        "pipeline_attributes": sorted(vars(pipe)),
        "component_classes": {name: type(c) for name, c in pipe.components.items()},
        "modules": modules,
        "processors": {name: type(p) for name, p in pipe.unet.attn_processors.items()},
        "unet_config": dict(pipe.unet.config),
        "feature_extractor": (type(pipe.feature_extractor), pipe.feature_extractor.to_json_string()),
    }


def test_after_unload_the_pipeline_equals_a_never_loaded_one():
    never, pipe = tiny_sd15_pipeline(), tiny_sd15_pipeline()
    # The same history but the adapter: a generation (which sets the pipeline's call attributes) and an image encoding
    # with hidden states (transformers installs its output-capturing hooks on the first one).
    generate(never)
    never.encode_image(SUBJECT, "cpu", 1, output_hidden_states=True)
    processors = dict(pipe.unet.attn_processors)
    pipe.load_customcontrast(tiny_adapter(pipe))
    generate(pipe, ip_adapter_image=SUBJECT)
    with dcc.record_customcontrast(pipe):
        generate(pipe, ip_adapter_image=SUBJECT)
    pipe.set_customcontrast_scale(0.5, start=0.25)
    pipe.unload_customcontrast()

    assert fingerprint(pipe) == fingerprint(never)
    assert all(processors[name] is p for name, p in pipe.unet.attn_processors.items())  # the very same objects
    assert pipe.unet.encoder_hid_proj is None and not hasattr(pipe.unet, injection.STATE_ATTRIBUTE)
    assert "load_ip_adapter" not in vars(pipe) and "unload_ip_adapter" not in vars(pipe)
    np.testing.assert_array_equal(generate(pipe), generate(never))


# ------------------------------------------------------------------------------------------------ bugs (issue 28)


@pytest.mark.parametrize("order", ["ip-cc", "cc-ip"])
def test_bug_1_several_feature_layers_beside_ip_adapter_plus(order):
    """An adapter that reads ``image_feature_layers=[-2, -1]`` beside a diffusers IP-Adapter-Plus: the Resampler was
    fed the concatenated, double-width hidden states ("mat1 and mat2 shapes cannot be multiplied")."""
    alone = tiny_sd15_pipeline()
    alone.load_ip_adapter(plus_checkpoint(alone.unet, 32), subfolder=None, weight_name=None)
    reference = generate(alone, ip_adapter_image=STYLE)

    pipe = tiny_sd15_pipeline()
    steps = {
        "ip": lambda: pipe.load_ip_adapter(plus_checkpoint(pipe.unet, 32), subfolder=None, weight_name=None),
        "cc": lambda: pipe.load_customcontrast(tiny_adapter(pipe, image_feature_layers=[-2, -1])),
    }
    for name in order.split("-"):
        steps[name]()
    both = generate(pipe, ip_adapter_image=[STYLE, SUBJECT])
    assert np.isfinite(both).all() and np.abs(both - reference).max() > 1e-3
    pipe.set_customcontrast_scale(0.0, s_plus_scale=0.0)  # CustomContrast off: the IP-Adapter-Plus alone remains
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=[STYLE, SUBJECT]), reference)


def test_bug_2_per_call_scales_take_what_the_setter_takes():
    """``SubjectOptions(scale=0.5)`` failed inside a processor ("'float' object is not subscriptable")."""
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    options = dcc.SubjectOptions(scale=0.5, s_plus_scale={"up": 0.5})
    per_call = generate(pipe, ip_adapter_image=SUBJECT, cross_attention_kwargs={"customcontrast": options})
    pipe.set_customcontrast_scale(0.5, s_plus_scale={"up": 0.5})
    np.testing.assert_array_equal(per_call, generate(pipe, ip_adapter_image=SUBJECT))
    pipe.set_customcontrast_scale(1.0, s_plus_scale=1.0)
    for bad, message in (([1.0, 2.0], "one value per cross-attention layer"), ("high", "must be a float")):
        with pytest.raises(ValueError, match=message):
            generate(pipe, ip_adapter_image=SUBJECT, cross_attention_kwargs={"customcontrast": dcc.SubjectOptions(scale=bad)})  # fmt: skip


def test_bug_4_attach_and_load_compute_the_same_features():
    """``attach(unet, adapter)`` leaves the pipeline's image route alone: with ``image_feature_layers != [-2]`` the
    pipeline's penultimate hidden state alone is refused in one sentence (never a silent difference), and the features
    the adapter computes itself (``adapter.image_features``) give exactly what ``load_customcontrast`` gives."""
    loaded, attached = tiny_sd15_pipeline(), tiny_sd15_pipeline()
    adapter = tiny_adapter(loaded, image_feature_layers=[-2, -1])
    loaded.load_customcontrast(adapter)
    reference = generate(loaded, ip_adapter_image=SUBJECT)
    loaded.unload_customcontrast()

    dcc.attach(attached.unet, adapter)
    with pytest.raises(ValueError, match=r"subject features must be a \[batch, num_subjects, tokens, 64\] tensor"):
        generate(attached, ip_adapter_image=SUBJECT)
    pixels = attached.feature_extractor([SUBJECT], return_tensors="pt").pixel_values
    with torch.no_grad():
        positive = adapter.image_features(attached.image_encoder, pixels)
        negative = adapter.image_features(attached.image_encoder, torch.zeros_like(pixels))
    embeds = torch.cat([negative, positive])[:, None]
    np.testing.assert_array_equal(generate(attached, ip_adapter_image_embeds=[embeds]), reference)


def test_bug_5_a_16_bit_photo_reads_the_same_for_training_and_inference(tmp_path):
    """Training's reader (``data.formats``) against inference's (``loaders.inputs.to_rgb``) on a 16-bit PNG."""
    from PIL import Image

    from diffusers_customcontrast.data import formats
    from diffusers_customcontrast.loaders import inputs

    gray = np.asarray(SUBJECT.convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    opened = formats.read_image(tmp_path / "sixteen.png")
    assert opened.mode.startswith("I")
    inference = np.asarray(inputs.to_rgb(opened))
    np.testing.assert_array_equal(inference[..., 0], gray)  # inference scales 16 bits to 8
    training = np.asarray(formats._to_rgb(opened))
    np.testing.assert_array_equal(training, inference)


# ------------------------------------------------------------------------------------------------ bug 6 / issue 29

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def syncs_per_unet_call(pipe, monkeypatch, **kwargs) -> list[int]:
    """How many times each UNet call of one generation read a tensor's value on the host (patched ``Tensor`` methods
    that synchronise on a GPU)."""
    counts: list[int] = []
    inside = [False]

    def counting(original):
        def method(self, *args, **kw):
            if inside[0]:
                counts[-1] += 1
            return original(self, *args, **kw)

        return method

    def enter(module, args, kwargs):
        inside[0] = True
        counts.append(0)

    def leave(module, args, kwargs, output):
        inside[0] = False

    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        handles = [
            pipe.unet.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
            pipe.unet.register_forward_hook(leave, with_kwargs=True, always_call=True),
        ]
        try:
            generate(pipe, num_inference_steps=4, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
    return counts


def test_bug_6_no_host_sync_in_the_unet_calls(monkeypatch):
    """The subject features' values are checked once per generation before the denoising loop (the loading
    pipeline's prepare_ip_adapter_image_embeds), so no UNet call reads them; ``ip_adapter_masks``, which only UNet
    calls see, are read once, in the first call (the same tensors every step); never once per step."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    base = syncs_per_unet_call(tiny_sd15_pipeline(), monkeypatch)
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    mask = IPAdapterMaskProcessor().preprocess([Image.fromarray(half)], height=64, width=64).reshape(1, 1, 64, 64)
    plain = syncs_per_unet_call(pipe, monkeypatch, ip_adapter_image=SUBJECT)
    masked = syncs_per_unet_call(
        pipe, monkeypatch, ip_adapter_image=SUBJECT, cross_attention_kwargs={"ip_adapter_masks": [mask]}
    )
    assert len(base) == len(plain) == len(masked) == 4
    assert plain == base and masked[1:] == base[1:], (base, plain, masked)
    assert masked[0] - base[0] <= 3, (base, masked)  # the masks' once-per-generation check
    # The same for features given as ip_adapter_image_embeds, and for an adapter that reads pooled embeddings.
    embeds = pipe.prepare_ip_adapter_image_embeds(SUBJECT, None, "cpu", 1, True)
    assert syncs_per_unet_call(pipe, monkeypatch, ip_adapter_image_embeds=embeds) == base
    pooled = tiny_sd15_pipeline()
    pooled.load_customcontrast(tiny_adapter(pooled, image_input="image_embeds", visual_projection="linear"))
    assert syncs_per_unet_call(pooled, monkeypatch, ip_adapter_image=SUBJECT) == base
    # A step range reads the call's timestep: one scalar a call, documented in step_range.py.
    pipe.set_customcontrast_scale(start=0.25)
    ranged = syncs_per_unet_call(pipe, monkeypatch, ip_adapter_image=SUBJECT)
    assert [r - b for r, b in zip(ranged[1:], base[1:])] == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ one config, one load path


def test_one_config_and_from_pretrained_checks_the_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tiny_adapter(tiny_sd15_pipeline())
    assert adapter.adapter_config.to_dict() == {k: v for k, v in adapter.config.items() if not k.startswith("_")}
    with pytest.raises(AttributeError):
        adapter.adapter_config = adapter.adapter_config.replace(num_heads=2)  # a view, not a second config
    adapter.record_s_plus_scale(0.25)
    assert adapter.config.s_plus_scale == adapter.adapter_config.s_plus_scale == 0.25

    adapter.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    key = next(iter(state_dict))
    state_dict[key] = torch.full_like(state_dict[key], float("nan"))
    save_file(state_dict, weights)
    for load in (dcc.CustomContrastAdapter.from_pretrained, dcc.load_adapter):  # one load path, the alias included
        with pytest.raises(dcc.AdapterLoadError, match=f"NaN or infinite values in 1 tensors \\(e.g. '{key}'\\)"):
            load(tmp_path / "adapter")


# ------------------------------------------------------------------------------------------------ recordings


def test_location_maps_come_back_through_a_recording_passed_in_the_call():
    pipe = tiny_sd15_pipeline()
    adapter = pipe.load_customcontrast(tiny_adapter(pipe))
    recording = dcc.SubjectRecording()
    options = dcc.SubjectOptions(recording=recording)
    with dcc.record_customcontrast(pipe) as block:  # both: the block's recording joins the call's own
        generate(pipe, ip_adapter_image=SUBJECT, cross_attention_kwargs={"customcontrast": options})
    assert len(recording.steps) == len(block.steps) == CALL["num_inference_steps"]
    assert all(a is b for a, b in zip(recording.steps, block.steps))  # one record per call, shared
    assert sorted(recording.location_maps) == list(range(adapter.num_layers))
    generate(pipe, ip_adapter_image=SUBJECT)  # nothing recorded without a recording
    assert len(recording.steps) == CALL["num_inference_steps"]
    assert len(pipe.unet._forward_pre_hooks) == 1  # the adapter's own; the block's hook went with the block
    with pytest.raises(ValueError, match="SubjectOptions.recording must be a SubjectRecording"):
        generate(pipe, ip_adapter_image=SUBJECT, cross_attention_kwargs={"customcontrast": dcc.SubjectOptions(recording=[])})  # fmt: skip
