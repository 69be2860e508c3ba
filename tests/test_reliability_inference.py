"""Reliability of loading and inference (issue 7): faults, odd inputs, processor-replacing calls, load/unload cycles.

Every fault gives one clear error and leaves the pipeline (and an adapter loaded before) exactly as it was; every
input either works the way a user expects (the same embeddings as the plain RGB image a viewer would show) or gives
a clear ``ValueError``. The figures in docs/reliability.md come from these tests.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0, SlicedAttnProcessor
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

import diffusers_customcontrast as dcc
from diffusers_customcontrast.loaders import inputs
from diffusers_customcontrast.testing.tiny_models import (
    make_subject_image,
    tiny_adapter,
    tiny_image_encoder,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

STEPS = dict(num_inference_steps=1, height=64, width=64, output_type="np")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def generate(pipe, **kwargs):
    return pipe("a dog", generator=torch.Generator().manual_seed(0), **{**STEPS, **kwargs}).images


def embeds(pipe, image):
    """The image embeddings the pipeline computes for ``ip_adapter_image=image`` (no guidance)."""
    return pipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, False)[0]


def clip_embeds(pipe, image):
    """The same through ``encode_image`` alone (works with no adapter loaded)."""
    return pipe.encode_image(image, "cpu", 1, output_hidden_states=True)[0][None]


def cross_attention_processors(pipe):
    return {n: p for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")}


@pytest.fixture(scope="module")
def references():
    """Outputs of the tiny SD1.5 pipeline (seed 0) without and with the tiny adapter (seed 0): deterministic."""
    pipe = tiny_sd15_pipeline()
    base = generate(pipe)
    pipe.load_customcontrast(tiny_adapter(pipe))
    return {"base": base, "loaded": generate(pipe, ip_adapter_image=make_subject_image(0))}


# ------------------------------------------------------------------------------------------------ faults injected


class Payload:
    """A pickle that would create a file when loaded without weights_only=True."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


def _edit_weights(folder: Path, edit) -> dict:
    state = load_file(folder / WEIGHTS)
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS)
    return {}


def _edit_config(folder: Path, **changes) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return {}


def _first_key(state: dict) -> str:
    return next(iter(state))


def _write(path: Path, data: bytes) -> dict:
    path.write_bytes(data)
    return {}


def _pickled_bin(folder: Path) -> dict:
    (folder / "weights.bin").write_bytes(pickle.dumps({"x": Payload(folder.parent / "pwned")}))
    return {"weight_name": "weights.bin"}


# name -> (damage the saved adapter folder and return extra load kwargs, expected error type, message pattern)
FAULTS = {
    "pickled object in a .bin": (
        _pickled_bin,
        dcc.AdapterLoadError,
        r"torch.load\(weights_only=True\)",
    ),
    "truncated safetensors": (
        lambda f: _write(f / WEIGHTS, (f / WEIGHTS).read_bytes()[: (f / WEIGHTS).stat().st_size // 3]),
        dcc.AdapterLoadError,
        "not a valid safetensors file",
    ),
    "garbage safetensors header": (
        lambda f: _write(f / WEIGHTS, (f / WEIGHTS).read_bytes()[:8] + b"\xff" * 64 + (f / WEIGHTS).read_bytes()[72:]),
        dcc.AdapterLoadError,
        "not a valid safetensors file",
    ),
    "empty safetensors": (lambda f: _write(f / WEIGHTS, b""), dcc.AdapterLoadError, "not a valid safetensors file"),
    "missing weights file": (lambda f: (f / WEIGHTS).unlink() or {}, dcc.AdapterLoadError, "No file named"),
    "missing key": (
        lambda f: _edit_weights(f, lambda s: s.pop(_first_key(s))),
        dcc.AdapterLoadError,
        "1 missing keys",
    ),
    "extra key": (
        lambda f: _edit_weights(f, lambda s: s.update({"extra.weight": torch.zeros(2)})),
        dcc.AdapterLoadError,
        "1 unexpected keys",
    ),
    "wrong shape": (
        lambda f: _edit_weights(f, lambda s: s.update({_first_key(s): torch.zeros(3, 5)})),
        dcc.AdapterLoadError,
        "tensors of the wrong shape",
    ),
    "NaN weights": (
        lambda f: _edit_weights(f, lambda s: s[_first_key(s)].fill_(float("nan"))),
        dcc.AdapterLoadError,
        "NaN or infinite values",
    ),
    "integer weights": (
        lambda f: _edit_weights(f, lambda s: s.update({_first_key(s): s[_first_key(s)].to(torch.int32)})),
        dcc.AdapterLoadError,
        "not dense floating-point data",
    ),
    "newer format_version": (
        lambda f: _edit_config(f, format_version=99),
        dcc.AdapterLoadError,
        "format version 99.*upgrade diffusers-customcontrast",
    ),
    "config.json not JSON": (
        lambda f: _write(f / "config.json", b'{"hidden_size": 32,'),
        dcc.AdapterLoadError,
        "not a readable JSON config",
    ),
    "config.json binary": (
        lambda f: _write(f / "config.json", bytes(range(256))),
        dcc.AdapterLoadError,
        "not a readable JSON config",
    ),
    "config.json nested 100000 deep": (
        lambda f: _write(f / "config.json", b"[" * 100_000),
        dcc.AdapterLoadError,
        "not a readable JSON config",
    ),
    "config.json a list": (
        lambda f: _write(f / "config.json", b"[]"),
        dcc.AdapterLoadError,
        "must hold a JSON object",
    ),
    "layer_hidden_sizes of strings": (
        lambda f: _edit_config(f, layer_hidden_sizes=["32"] * 11),
        dcc.AdapterLoadError,
        "layer_hidden_sizes must be a list of positive integers",
    ),
    "layer_hidden_sizes of floats": (
        lambda f: _edit_config(f, layer_hidden_sizes=[32.0] * 11),
        dcc.AdapterLoadError,
        "layer_hidden_sizes must be a list of positive integers",
    ),
    "layer_hidden_sizes a number": (
        lambda f: _edit_config(f, layer_hidden_sizes=32),
        dcc.AdapterLoadError,
        "layer_hidden_sizes must be a list",
    ),
    "hidden_size a string": (
        lambda f: _edit_config(f, hidden_size="32"),
        dcc.AdapterLoadError,
        "hidden_size must be a positive integer",
    ),
    "negative num_heads": (
        lambda f: _edit_config(f, num_heads=-4),
        dcc.AdapterLoadError,
        "num_heads must be a positive integer",
    ),
    "NaN location_init_bias": (
        lambda f: _edit_config(f, location_init_bias=float("nan")),
        dcc.AdapterLoadError,
        "location_init_bias must be a finite number",
    ),
    "layers of another UNet": (
        lambda f: _edit_config(f, layer_names=[f"x{i}.attn2.processor" for i in range(11)]),
        ValueError,
        r"built for a custom .* UNet with other layer names \('x0.attn2.processor' where the pipeline's UNet has",
    ),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, reading the refused pickle
@pytest.mark.parametrize("already_loaded", [False, True], ids=["nothing-loaded", "adapter-loaded"])
def test_failed_loads_leave_the_pipeline_exactly_as_it_was(tmp_path, references, already_loaded):
    pipe = tiny_sd15_pipeline()
    first = tiny_adapter(pipe)
    if already_loaded:
        pipe.load_customcontrast(first)
    processors = dict(pipe.unet.attn_processors)
    hooks = dict(pipe.unet._forward_pre_hooks)
    state = dcc.loaders.injection.attached(pipe.unet)
    reference = references["loaded" if already_loaded else "base"]
    source = tmp_path / "source"
    tiny_adapter(pipe, seed=1).save_pretrained(source)

    for name, (damage, error, message) in FAULTS.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        for file in source.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        kwargs = damage(folder) or {}
        with pytest.raises(error, match=message):
            pipe.load_customcontrast(str(folder), **kwargs)
        assert pipe.unet.attn_processors == processors, name
        assert dict(pipe.unet._forward_pre_hooks) == hooks, name
        assert dcc.loaders.injection.attached(pipe.unet) is state, name
    assert not (tmp_path / "pwned").exists()  # the pickle's payload never ran

    # One generation after all of them: bit-identical to the pipeline's output before any failed load.
    kwargs = {"ip_adapter_image": make_subject_image(0)} if already_loaded else {}
    np.testing.assert_array_equal(generate(pipe, **kwargs), reference)
    if already_loaded:
        assert dcc.loaders.injection.attached(pipe.unet).adapter is first


def test_failed_load_of_a_mismatched_image_encoder_registers_nothing(tmp_path, references):
    source = tiny_sd15_pipeline()
    tiny_adapter(source).save_pretrained(tmp_path / "adapter")
    tiny_image_encoder(hidden_size=48)[0].save_pretrained(tmp_path / "adapter" / "image_encoder")

    pipe = tiny_sd15_pipeline(image_encoder=False)
    with pytest.raises(ValueError, match="image encoder of hidden size 32.*hidden size 48"):
        pipe.load_customcontrast(str(tmp_path / "adapter"))
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert dcc.loaders.injection.attached(pipe.unet) is None
    np.testing.assert_array_equal(generate(pipe), references["base"])


def test_an_adapter_for_another_base_model_keeps_the_first_adapter(references):
    pipe = tiny_sd15_pipeline()
    first = pipe.load_customcontrast(tiny_adapter(pipe))
    with pytest.raises(ValueError, match="built for a"):
        pipe.load_customcontrast(tiny_adapter(tiny_sdxl_pipeline()))
    assert dcc.loaders.injection.attached(pipe.unet).adapter is first
    np.testing.assert_array_equal(generate(pipe, ip_adapter_image=make_subject_image(0)), references["loaded"])


# ------------------------------------------------------------------------------------------------ inputs


def _rgba_on_transparent_black(image: Image.Image) -> Image.Image:
    """The subject with its white background made transparent black: naive RGB conversion shows it black."""
    array = np.asarray(image.convert("RGBA")).copy()
    array[(array[..., :3] == 255).all(axis=-1)] = 0
    return Image.fromarray(array)


def _la_on_transparent_black(gray: Image.Image) -> Image.Image:
    array = np.asarray(gray)
    background = array == 255
    return Image.merge("LA", [Image.fromarray(np.where(background, 0, array).astype(np.uint8)),
                              Image.fromarray(np.where(background, 0, 255).astype(np.uint8))])  # fmt: skip


def _rgb_with_transparent_black(image: Image.Image) -> Image.Image:
    array = np.asarray(image).copy()
    array[(array == 255).all(axis=-1)] = 0
    keyed = Image.fromarray(array)
    keyed.info["transparency"] = (0, 0, 0)
    return keyed


def _palette_with_transparent_black(image: Image.Image) -> Image.Image:
    """The subject (two colours, no anti-aliasing) on black, as a palette image whose black is transparent."""
    array = np.asarray(image).copy()
    background = (array == 255).all(axis=-1)
    array[background] = 0
    palette = Image.fromarray(array).quantize(colors=4, dither=Image.Dither.NONE)
    y, x = (int(i[0]) for i in np.nonzero(background))
    palette.info["transparency"] = palette.getpixel((x, y))
    return palette


def _exif_rotated_jpeg(image: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


SUBJECT = make_subject_image(0)
GRAY = SUBJECT.convert("L")
GRAY_ARRAY = np.asarray(GRAY)
WIDE = make_subject_image(5, size=64).resize((64, 32))

# name -> (input, the RGB image a user expects it to mean)
EQUIVALENT_INPUTS = {
    "RGB": (SUBJECT, SUBJECT),
    "RGBA, transparent background": (_rgba_on_transparent_black(SUBJECT), SUBJECT),
    "RGB with a transparent colour key": (_rgb_with_transparent_black(SUBJECT), SUBJECT),
    "LA, transparent background": (_la_on_transparent_black(GRAY), GRAY.convert("RGB")),
    "L": (GRAY, GRAY.convert("RGB")),
    "P": (SUBJECT.convert("P"), SUBJECT.convert("P").convert("RGB")),
    "P, transparent background": (_palette_with_transparent_black(SUBJECT), SUBJECT),
    "CMYK": (SUBJECT.convert("CMYK"), SUBJECT),
    "1": (SUBJECT.convert("1"), SUBJECT.convert("1").convert("RGB")),
    "I;16 (16-bit)": (Image.fromarray(GRAY_ARRAY.astype(np.uint16) * 257), GRAY.convert("RGB")),
    "I (16-bit data)": (Image.fromarray(GRAY_ARRAY.astype(np.int32) * 257), GRAY.convert("RGB")),
    "I (8-bit data)": (GRAY.convert("I"), GRAY.convert("RGB")),
    "F [0, 255]": (GRAY.convert("F"), GRAY.convert("RGB")),
    "F [0, 1]": (Image.fromarray(GRAY_ARRAY.astype(np.float32) / 255), GRAY.convert("RGB")),
    "numpy HWC uint8": (np.asarray(SUBJECT), SUBJECT),
    "numpy HWC float [0, 1]": (np.asarray(SUBJECT).astype(np.float32) / 255, SUBJECT),
    "numpy HW uint8": (GRAY_ARRAY, GRAY.convert("RGB")),
    "numpy CHW uint8": (np.asarray(SUBJECT).transpose(2, 0, 1), SUBJECT),
    "numpy HWC uint16": (np.asarray(SUBJECT).astype(np.uint16) * 257, SUBJECT),
    "torch CHW float [0, 1] in a list": (
        [[torch.from_numpy(np.asarray(SUBJECT).copy()).permute(2, 0, 1).float() / 255]],
        [[SUBJECT]],
    ),
    "torch CHW uint8 in a list": ([[torch.from_numpy(np.asarray(SUBJECT).copy()).permute(2, 0, 1)]], [[SUBJECT]]),
    "EXIF orientation 6 (JPEG)": (
        _exif_rotated_jpeg(WIDE, 6),
        ImageOps.exif_transpose(_exif_rotated_jpeg(WIDE, 6)).convert("RGB"),
    ),
    "EXIF orientation 3 (JPEG)": (
        _exif_rotated_jpeg(WIDE, 3),
        ImageOps.exif_transpose(_exif_rotated_jpeg(WIDE, 3)).convert("RGB"),
    ),
}


@pytest.fixture(scope="module")
def loaded_pipe():
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    return pipe


@pytest.mark.parametrize("name", list(EQUIVALENT_INPUTS))
def test_inputs_mean_what_a_viewer_shows(loaded_pipe, name):
    image, expected = EQUIVALENT_INPUTS[name]
    torch.testing.assert_close(embeds(loaded_pipe, image), embeds(loaded_pipe, expected), rtol=0, atol=0)


CLIP_GETS_WRONG = [
    "I;16 (16-bit)",
    "I (16-bit data)",
    "F [0, 1]",
    "numpy HWC float [0, 1]",
    "numpy HWC uint16",
    "EXIF orientation 6 (JPEG)",
    "EXIF orientation 3 (JPEG)",
]


def test_the_normalisation_fixes_what_clip_gets_wrong(loaded_pipe):
    """Without it (diffusers + transformers alone), these inputs give other embeddings than the image they show."""
    plain = tiny_sd15_pipeline()  # the same weights, no adapter: CLIP's processor alone

    def plain_embeds(image):
        return clip_embeds(plain, image)

    for name in CLIP_GETS_WRONG:
        image, expected = EQUIVALENT_INPUTS[name]
        try:
            assert not torch.equal(plain_embeds(image), plain_embeds(expected)), name
        except ValueError:  # CLIP's processor refuses uint16 arrays
            assert name == "numpy HWC uint16"
        torch.testing.assert_close(embeds(loaded_pipe, image), plain_embeds(expected), rtol=0, atol=0)


def test_normalised_input_gives_the_same_image_end_to_end(loaded_pipe):
    sixteen_bit = Image.fromarray(np.asarray(SUBJECT.convert("L")).astype(np.uint16) * 257)
    np.testing.assert_array_equal(
        generate(loaded_pipe, ip_adapter_image=sixteen_bit), generate(loaded_pipe, ip_adapter_image=GRAY)
    )


@pytest.mark.parametrize(
    "name, image",
    [
        ("1x1", Image.new("RGB", (1, 1), (200, 30, 30))),
        ("3x3", Image.new("RGB", (3, 3), (30, 200, 30))),
        ("4000x3000", SUBJECT.resize((4000, 3000))),
        ("1x4000", Image.new("RGB", (1, 4000), (30, 30, 200))),
    ],
)
def test_tiny_huge_and_extreme_images_work(loaded_pipe, name, image):
    out = embeds(loaded_pipe, image)
    assert out.shape == (1, 1, 257, 32) and torch.isfinite(out).all()
    size = inputs.to_rgb(image, loaded_pipe.feature_extractor).size
    assert max(size) <= 4 * min(size)  # 1x4000 is cropped to 1x4: CLIP would upscale it to 224 x 896000 first


def test_pixel_values_tensors_keep_diffusers_convention(loaded_pipe):
    pixel_values = loaded_pipe.feature_extractor(SUBJECT, return_tensors="pt").pixel_values
    torch.testing.assert_close(embeds(loaded_pipe, pixel_values), embeds(loaded_pipe, SUBJECT), rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"values in \[0, 1\] only"):
        embeds(loaded_pipe, torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


INVALID_INPUTS = {
    "torch CHW image": (torch.rand(3, 64, 64), "goes straight to the image encoder as CLIP pixel values"),
    "torch BCHW image, not 224": (torch.rand(1, 3, 64, 64), "goes straight to the image encoder as CLIP pixel values"),
    "pixel values with NaN": (torch.full((1, 3, 224, 224), float("nan")), "pixel values hold NaN"),
    "numpy floats in [0, 255]": (np.asarray(SUBJECT).astype(np.float32), r"float pixel values must lie in \[0, 1\]"),
    "numpy with NaN": (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
    "numpy int beyond 255": (np.full((8, 8, 3), 300, np.int64), r"integer pixel values must lie in \[0, 255\]"),
    "numpy 5 channels": (np.zeros((8, 8, 5), np.uint8), "is not an HxW, HxWxC or CxHxW image"),
    "numpy strings": (np.full((8, 8), "a"), "are not images"),
    "empty inner list": ([[]], "empty list of subject images"),
    "0x0 image": (Image.new("RGB", (0, 0)), r"the image is empty \(0 x 0 pixels\)"),
    "a path string": ([["subject.png"]], "a str is not an image"),
}


@pytest.mark.parametrize("name", list(INVALID_INPUTS))
def test_unusable_inputs_give_a_clear_value_error(loaded_pipe, name):
    image, message = INVALID_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        embeds(loaded_pipe, image)


def test_pipeline_level_input_errors(loaded_pipe):
    subject = SUBJECT
    with pytest.raises(ValueError, match="must have same length as the number of IP Adapters"):
        generate(loaded_pipe, ip_adapter_image=[])  # diffusers' own check
    with pytest.raises(ValueError, match="needs a subject: pass ip_adapter_image="):
        generate(loaded_pipe)
    with pytest.raises(IndexError):
        generate(loaded_pipe, ip_adapter_image_embeds=[])  # diffusers' check_inputs indexes the list first

    good = loaded_pipe.prepare_ip_adapter_image_embeds(subject, None, "cpu", 1, True)[0]
    for value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[1, 0, 3, 5] = value
        with pytest.raises(ValueError, match="subject features hold NaN or infinite values"):
            generate(loaded_pipe, ip_adapter_image_embeds=[bad])
    for shape in ((2, 257, 32), (2, 1, 257, 48)):
        with pytest.raises(ValueError, match=r"subject features must be a \[batch, num_subjects, tokens, 32\] tensor"):
            generate(loaded_pipe, ip_adapter_image_embeds=[torch.zeros(shape)])


def test_masks(loaded_pipe):
    processor = IPAdapterMaskProcessor()
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255

    def run(mask, subjects=1):
        return generate(
            loaded_pipe,
            ip_adapter_image=[[SUBJECT] * subjects],
            cross_attention_kwargs={"ip_adapter_masks": [mask]},
        )

    with pytest.raises(ValueError, match="num_subjects = 2"):  # more subjects than masks
        run(processor.preprocess([Image.fromarray(half)], height=64, width=64).reshape(1, 1, 64, 64), subjects=2)
    for bad in (torch.full((1, 1, 64, 64), float("nan")), torch.full((1, 1, 64, 64), 255.0)):
        with pytest.raises(ValueError, match=r"ip_adapter_masks values must lie in \[0, 1\]"):
            run(bad)
    # A mask of another size with the output's aspect ratio is resized to each layer (as diffusers does).
    small = processor.preprocess([Image.fromarray(half).resize((32, 32))], height=32, width=32).reshape(1, 1, 32, 32)
    assert np.isfinite(run(small)).all()
    # Another aspect ratio: diffusers warns and stretches it.
    with pytest.warns(UserWarning, match="aspect ratio of the mask does not match"):
        assert np.isfinite(run(torch.ones(1, 1, 50, 30))).all()


def test_normalisation_leaves_the_feature_extractor_alone_and_unload_restores_it(tmp_path):
    pipe = tiny_sd15_pipeline()
    extractor, encoder = pipe.feature_extractor, pipe.image_encoder
    original_class, original_state = type(extractor), copy.deepcopy(extractor.__dict__)
    extractor.save_pretrained(tmp_path / "before")
    sixteen_bit, expected = EQUIVALENT_INPUTS["I;16 (16-bit)"]

    pipe.load_customcontrast(tiny_adapter(pipe))
    torch.testing.assert_close(embeds(pipe, sixteen_bit), embeds(pipe, expected), rtol=0, atol=0)
    torch.testing.assert_close(clip_embeds(pipe, sixteen_bit), clip_embeds(pipe, expected), rtol=0, atol=0)
    # The loading pipeline normalises in its own encode_image: the shared processor is exactly as it was, so it
    # saves, copies and pickles as before.
    assert type(extractor) is original_class and extractor.__dict__ == original_state
    extractor.save_pretrained(tmp_path / "during")
    config = "preprocessor_config.json"
    assert (tmp_path / "during" / config).read_text() == (tmp_path / "before" / config).read_text()
    assert type(pickle.loads(pickle.dumps(extractor))) is original_class
    # A from_pipe variant shares the UNet (the subject applies) with diffusers' own encode_image.
    variant = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert variant.feature_extractor is extractor and "encode_image" not in vars(variant)
    # Loading on the variant moves the per-pipeline methods to it.
    variant.load_customcontrast(tiny_adapter(pipe))
    assert "encode_image" in vars(variant) and "encode_image" not in vars(pipe)
    torch.testing.assert_close(embeds(variant, sixteen_bit), embeds(variant, expected), rtol=0, atol=0)

    variant.unload_customcontrast()  # from either pipeline: the state lives on the shared UNet
    assert "encode_image" not in vars(pipe) and type(extractor) is original_class
    assert not encoder._forward_pre_hooks and not pipe.unet._forward_pre_hooks
    assert not torch.equal(clip_embeds(pipe, sixteen_bit), clip_embeds(pipe, expected))  # CLIP's own behaviour is back


# ------------------------------------------------------------------------------------------------ replaced processors


def _loaded():
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    return pipe, {"ip_adapter_image": SUBJECT}


@pytest.mark.parametrize(
    "operation, kind",
    [
        (lambda pipe: pipe.enable_attention_slicing(), SlicedAttnProcessor),
        (lambda pipe: pipe.enable_attention_slicing("max"), SlicedAttnProcessor),
        (lambda pipe: pipe.fuse_qkv_projections(), FusedAttnProcessor2_0),
        (lambda pipe: pipe.unet.fuse_qkv_projections(), FusedAttnProcessor2_0),
        (lambda pipe: pipe.unet.set_attn_processor(AttnProcessor2_0()), AttnProcessor2_0),
    ],
    ids=[
        "enable_attention_slicing",
        "enable_attention_slicing-max",
        "pipe.fuse_qkv",
        "unet.fuse_qkv",
        "set_attn_processor",
    ],
)
def test_replaced_processors_are_put_back_with_a_warning(references, operation, kind):
    pipe, subject = _loaded()
    ours = cross_attention_processors(pipe)
    operation(pipe)
    with pytest.warns(UserWarning, match=r"replaced 11 of CustomContrast's 11 attention processors.*put its own back"):
        out = generate(pipe, **subject)
    # The subject applies as before (slicing and fusion only regroup the same arithmetic).
    np.testing.assert_allclose(out, references["loaded"], atol=1e-5)
    assert cross_attention_processors(pipe) == ours
    others = [p for n, p in pipe.unet.attn_processors.items() if n not in ours]
    assert others and all(type(p) is kind for p in others)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(pipe, **subject)
    assert not [w for w in caught if "CustomContrast" in str(w.message)]  # warned once: the adapter is whole again
    # Unloading keeps the call's processors everywhere: what the user asked for last.
    pipe.unload_customcontrast()
    assert all(type(p) is kind for p in pipe.unet.attn_processors.values())
    np.testing.assert_allclose(generate(pipe), references["base"], atol=1e-5)


def test_set_default_attn_processor_refuses_and_changes_nothing(references):
    pipe, subject = _loaded()
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="Cannot call `set_default_attn_processor`"):  # diffusers' own check
        pipe.unet.set_default_attn_processor()
    assert pipe.unet.attn_processors == processors
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(generate(pipe, **subject), references["loaded"])
    assert not [w for w in caught if "CustomContrast" in str(w.message)]


def test_loading_again_right_after_unload_ip_adapter(references):
    pipe, subject = _loaded()
    encoder = pipe.image_encoder
    pipe.unload_ip_adapter()
    pipe.register_modules(image_encoder=encoder)
    pipe.load_customcontrast(tiny_adapter(pipe))  # takes the stale rest of the first adapter off first
    assert len(pipe.unet._forward_pre_hooks) == 1 and not encoder._forward_pre_hooks
    np.testing.assert_array_equal(generate(pipe, **subject), references["loaded"])


def test_unload_ip_adapter_unloads_customcontrast_fully(references):
    pipe, subject = _loaded()
    encoder = pipe.image_encoder
    pipe.unload_ip_adapter()  # diffusers: default processors, no projection, no image encoder
    with pytest.warns(UserWarning, match="taken off the UNet by another call.*fully unloaded"):
        np.testing.assert_array_equal(generate(pipe), references["base"])
    assert dcc.loaders.injection.attached(pipe.unet) is None and not pipe.unet._forward_pre_hooks
    assert "encode_image" not in vars(pipe) and not encoder._forward_pre_hooks
    with pytest.raises(ValueError, match="No CustomContrast adapter is loaded"):
        pipe.set_customcontrast_scale(0.5)
    assert pipe.unload_customcontrast() is None
    pipe.register_modules(image_encoder=encoder)
    pipe.load_customcontrast(tiny_adapter(pipe))
    np.testing.assert_array_equal(generate(pipe, **subject), references["loaded"])


def test_replaced_projection_is_an_error_not_a_silent_base_image(references):
    pipe, subject = _loaded()
    image_embeds = pipe.prepare_ip_adapter_image_embeds(SUBJECT, None, "cpu", 1, True)
    pipe.unet.encoder_hid_proj = None  # the processors would get no subject tokens and act as the base model
    with pytest.raises(ValueError, match="encoder_hid_proj .* was changed after pipe.load_customcontrast"):
        generate(pipe, ip_adapter_image_embeds=image_embeds)
    pipe.unload_customcontrast()
    np.testing.assert_array_equal(generate(pipe), references["base"])


def test_set_ip_adapter_scale_acts_like_set_customcontrast_scale():
    pipe, subject = _loaded()
    pipe.set_ip_adapter_scale(0.5)
    via_diffusers = generate(pipe, **subject)
    pipe.set_customcontrast_scale(1.0)
    pipe.set_customcontrast_scale(0.5)
    np.testing.assert_array_equal(generate(pipe, **subject), via_diffusers)


# ------------------------------------------------------------------------------------------------ load / unload cycles


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def _counts() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if isinstance(o, torch.Tensor))


CYCLES = 100


def test_100_load_unload_cycles_leak_nothing(tmp_path, references, record_property):
    pipe = tiny_sd15_pipeline()
    tiny_adapter(pipe).save_pretrained(tmp_path / "adapter")
    unet, encoder, extractor = pipe.unet, pipe.image_encoder, pipe.feature_extractor
    processors, extractor_class = dict(unet.attn_processors), type(extractor)

    def cycle():
        pipe.load_customcontrast(str(tmp_path / "adapter"))
        assert len(unet._forward_pre_hooks) == 1 and not encoder._forward_pre_hooks and not encoder._forward_hooks
        pipe.unload_customcontrast()
        assert unet.attn_processors == processors, "processors are back to the very same objects"
        assert not unet._forward_pre_hooks and not encoder._forward_pre_hooks
        assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
        assert type(extractor) is extractor_class

    for _ in range(3):  # warm-up: first-call caches of torch, diffusers and safetensors
        cycle()
    objects_before, tensors_before = _counts()
    rss_before = _rss_mib()
    start = time.perf_counter()
    for _ in range(CYCLES):
        cycle()
    seconds = time.perf_counter() - start
    objects_after, tensors_after = _counts()
    rss_after = _rss_mib()
    figures = {
        "cycles": CYCLES,
        "objects": (objects_before, objects_after),
        "tensors": (tensors_before, tensors_after),
        "rss_mib": (round(rss_before, 1), round(rss_after, 1)),
        "ms_per_cycle": round(1000 * seconds / CYCLES, 1),
    }
    record_property("load_unload_cycles", figures)
    print(figures)
    assert tensors_after == tensors_before, figures
    assert objects_after - objects_before <= 50, figures
    assert rss_after - rss_before < 32, figures
    np.testing.assert_array_equal(generate(pipe), references["base"])
    pipe.load_customcontrast(str(tmp_path / "adapter"))
    assert np.isfinite(generate(pipe, ip_adapter_image=SUBJECT)).all()


# ------------------------------------------------------------------------------------------------ call arguments


def test_more_masks_than_adapters_is_refused(loaded_pipe):
    mask = torch.ones(1, 1, 64, 64)
    with pytest.raises(
        ValueError, match=r"one mask tensor \(or None\) per loaded image adapter.*\(1: CustomContrast\), got 2"
    ):
        generate(loaded_pipe, ip_adapter_image=SUBJECT, cross_attention_kwargs={"ip_adapter_masks": [mask, mask]})


@pytest.mark.parametrize("subject", ["ip_adapter_image", "ip_adapter_image_embeds"])
def test_a_subject_after_unload_gets_what_a_never_loaded_pipeline_gets(subject):
    """Unloading leaves diffusers' own behaviour: the package no longer wraps diffusers' methods (issue 28), so a
    subject given to a pipeline without an image adapter meets diffusers' own handling, loaded before or not."""
    value = SUBJECT if subject == "ip_adapter_image" else [torch.zeros(2, 1, 257, 32)]

    def outcome(pipe):
        try:
            return generate(pipe, **{subject: value})
        except Exception as error:  # diffusers' own error, whatever it is
            return type(error), str(error)

    never = outcome(tiny_sd15_pipeline())
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.unload_customcontrast()
    after = outcome(pipe)
    if isinstance(never, np.ndarray):
        np.testing.assert_array_equal(after, never)
    else:
        assert after == never


@pytest.mark.parametrize(
    "scale, message",
    [
        ({"up": {"block_9": 1.0}}, r"Unknown block 'block_9' in the scale of 'up': this UNet's up blocks with "
                                   r"cross-attention are block_0, block_1\."),
        ({"upp": 1.0}, r"Unknown key 'upp' in the per-block scale dict: expected 'down', 'mid' or 'up'"),
        ({"up": {"block_0": [1.0, 0.0]}}, r"The scale of up block_0 must be a number or a list of 3 numbers"),
        ({"mid": [1.0]}, r"The scale of 'mid' must be a number, got \[1.0\]\."),
        ({"down": "high"}, r"The scale of 'down' must be a number or a dict of 'block_<i>' entries"),
    ],
)  # fmt: skip
def test_bad_per_block_scales_are_named(loaded_pipe, scale, message):
    processors = {n: (p.scale, p.s_plus_scale) for n, p in cross_attention_processors(loaded_pipe).items()}
    with pytest.raises(ValueError, match=message):
        loaded_pipe.set_customcontrast_scale(scale)
    assert {n: (p.scale, p.s_plus_scale) for n, p in cross_attention_processors(loaded_pipe).items()} == processors
