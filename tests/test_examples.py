"""The scripts in examples/, run in-process (their ``main(argv)``) against tiny local models: 64 px, 2 steps.

Each script gets every model as a local folder written with ``save_pretrained`` (pipeline, adapter with its
``image_encoder/`` as the trainer exports it, ControlNet, LoRA), so nothing is downloaded. Where it is cheap, a test
also checks that the subject (or the LoRA, the masks, the training) changed the images.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusers_customcontrast.testing.tiny_models import (
    make_subject_image,
    tiny_adapter,
    tiny_controlnet,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLING = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--device", "cpu", "--dtype", "fp32"]


# --------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Callable[..., Any]]:
    """``example("generate_sd15")`` -> that script's ``main``, imported the way ``python examples/x.py`` runs it."""
    monkeypatch.syspath_prepend(str(EXAMPLES))  # a script's folder is on sys.path: `from _common import ...`

    def load(name: str) -> Callable[..., Any]:
        return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]

    return load


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_pngs(paths: list[Path], count: int, size: tuple[int, int] = (64, 64)) -> None:
    assert len(paths) == count, paths
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == size, path


def assert_changed(a: np.ndarray, b: np.ndarray) -> None:
    """More than rounding apart: at least one channel of one pixel differs by more than 4 of 255 levels."""
    assert np.abs(a - b).max() > 4


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """The same image up to float rounding (a different summation order moves a pixel by a level or two)."""
    assert np.abs(a - b).max() <= 2


def by_name(paths: list[Path]) -> dict[str, Path]:
    return {path.name: path for path in paths}


def save_sd_models(root: Path, builder: Callable[..., Any]) -> dict[str, Path]:
    """A pipeline folder without image encoder (as SD1.5 / SDXL on the hub) and an adapter folder that carries one."""
    full = builder()
    adapter_dir = root / "adapter"
    tiny_adapter(full).save_pretrained(adapter_dir)
    full.image_encoder.save_pretrained(adapter_dir / "image_encoder")
    builder(image_encoder=False).save_pretrained(root / "pipeline")  # same seed: the same UNet as `full`
    return {"pipeline": root / "pipeline", "adapter": adapter_dir}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_sd_models(tmp_path_factory.mktemp("sd15"), tiny_sd15_pipeline)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two subjects on white (one as an RGBA cut-out) and a layout image with clear edges."""
    root = tmp_path_factory.mktemp("images")
    paths = {"subject": root / "subject.png", "subject_b": root / "subject_b.png", "layout": root / "layout.png"}
    cutout = make_subject_image(0).convert("RGBA")
    alpha = (np.asarray(cutout.convert("L")) < 250).astype(np.uint8) * 255  # the white background becomes clear
    cutout.putalpha(Image.fromarray(alpha))
    cutout.save(paths["subject"])
    make_subject_image(1).save(paths["subject_b"])
    make_subject_image(5).save(paths["layout"])
    return paths


def model_args(models: dict[str, Path]) -> list[str]:
    return ["--pretrained_model", str(models["pipeline"]), "--adapter", str(models["adapter"])]


# --------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("script", ["generate_sd15", "generate_sdxl"])
def test_generate(script, example, sd15, images, tmp_path, tmp_path_factory):
    models = sd15 if script == "generate_sd15" else save_sd_models(tmp_path_factory.mktemp("sdxl"), tiny_sdxl_pipeline)
    paths = example(script)(
        [*model_args(models), "--subject", str(images["subject"]), *SAMPLING, "--output", str(tmp_path),
         "--prompt", "a {class_name} on the beach", "a {class_name} in the snow", "--class_name", "toy",
         "--scale", "0", "1", "--s_plus_scale", "0"]
    )  # fmt: skip
    assert_pngs(paths, 4)
    files = by_name(paths)
    assert set(files) == {
        "scale0_00_0_a-toy-on-the-beach.png", "scale0_01_0_a-toy-in-the-snow.png",
        "scale1_00_0_a-toy-on-the-beach.png", "scale1_01_0_a-toy-in-the-snow.png",
    }  # fmt: skip
    # Scale 0 (S+ at 0 too) is the base pipeline; at scale 1 the subject changes the image from the same seed.
    at_0, at_1 = (pixels(files[f"scale{s}_00_0_a-toy-on-the-beach.png"]) for s in (0, 1))
    assert_changed(at_1, at_0)


def test_common_helpers(example, images):
    example("generate_sd15")  # puts examples/ on sys.path
    import _common

    cutout = _common.load_image(images["subject"])
    assert cutout.mode == "RGB" and cutout.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert _common.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert _common.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    parser = _common.make_parser("doc")
    _common.add_runtime_arguments(parser, default_output="out")
    assert parser.parse_args(["--dtype", "bf16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])
    assert _common.slug("A dog, on the Beach!") == "a-dog-on-the-beach"


# --------------------------------------------------------------------------------------------------- controlnet


@pytest.fixture
def real_canny_detector(monkeypatch: pytest.MonkeyPatch) -> type:
    """Make ``from controlnet_aux import CannyDetector`` give controlnet_aux's real detector without its ``__init__``.

    controlnet_aux's package ``__init__`` imports every detector, and through them torchvision, which cannot be
    installed next to CPU torch here. The Canny detector itself needs only opencv and the package's ``util`` module,
    so those two module files are loaded directly under their real names, in a stand-in ``controlnet_aux`` package.
    """
    spec = importlib.util.find_spec("controlnet_aux")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("controlnet_aux is not installed (pip install --no-deps controlnet_aux==0.0.10)")
    pytest.importorskip("cv2", reason="opencv is not installed (pip install opencv-python-headless)")
    location = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("controlnet_aux")
    package.__path__ = [str(location)]
    monkeypatch.setitem(sys.modules, "controlnet_aux", package)

    def load(name: str, path: Path) -> types.ModuleType:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        monkeypatch.setitem(sys.modules, name, module)
        module_spec.loader.exec_module(module)
        return module

    load("controlnet_aux.util", location / "util.py")
    canny = load("controlnet_aux.canny", location / "canny" / "__init__.py")
    package.CannyDetector = canny.CannyDetector
    return canny.CannyDetector


def test_controlnet_canny(example, real_canny_detector, sd15, images, tmp_path):
    controlnet_dir = tmp_path / "controlnet"
    tiny_controlnet(tiny_sd15_pipeline(image_encoder=False)).save_pretrained(controlnet_dir)
    main = example("controlnet_canny")
    assert main.__globals__["CannyDetector"] is real_canny_detector
    paths = main(
        [*model_args(sd15), "--controlnet", str(controlnet_dir), "--subject", str(images["subject"]),
         "--layout", str(images["layout"]), *SAMPLING, "--output", str(tmp_path / "out"), "--prompt", "a toy",
         "--scale", "0", "1", "--s_plus_scale", "0"]
    )  # fmt: skip
    assert_pngs(paths, 3)
    files = by_name(paths)
    edges = pixels(files["control.png"])[..., 0]
    assert set(np.unique(edges)) <= set(range(256)) and (edges > 127).mean() > 0.01  # the shape's outline
    assert (edges < 128).mean() > 0.5  # on black
    generated = [pixels(files[f"scale{s}_00_0_a-toy.png"]) for s in (0, 1)]
    assert_changed(generated[1], generated[0])


# --------------------------------------------------------------------------------------------------- lora


def save_tiny_lora(folder: Path) -> Path:
    """A random LoRA on the tiny UNet, saved as diffusers' training scripts save theirs."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_sd15_pipeline(image_encoder=False).unet
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    unet.add_adapter(config)
    with torch.no_grad():  # gaussian init leaves lora_B at zero: make the LoRA do something
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_and_subject(example, sd15, images, tmp_path):
    lora_file = save_tiny_lora(tmp_path / "lora")
    main = example("lora_and_subject")
    common = [*model_args(sd15), "--subject", str(images["subject"]), *SAMPLING, "--prompt", "a toy"]

    def run(name: str, *extra: str) -> dict[str, Path]:
        paths = main([*common, "--output", str(tmp_path / name), *extra])
        assert_pngs(paths, len(paths))
        return {path.name.split("_")[0]: path for path in paths}

    lora = run("lora", "--lora", str(tmp_path / "lora"), "--scale", "0", "1", "--s_plus_scale", "0")
    fused = run("fused", "--lora", str(lora_file), "--fuse_lora", "--scale", "1", "--s_plus_scale", "0")
    no_lora = run("off", "--lora", str(tmp_path / "lora"), "--lora_scale", "0", "--scale", "1", "--s_plus_scale", "0")
    with_lora = pixels(lora["scale1"])
    assert_changed(with_lora, pixels(lora["scale0"]))  # the subject acts with the LoRA loaded
    assert_changed(with_lora, pixels(no_lora["00"]))  # the LoRA acts with the subject loaded
    assert_same(with_lora, pixels(fused["00"]))  # fusing changes nothing but rounding


# --------------------------------------------------------------------------------------------------- two subjects


def test_two_subjects_masks(example, sd15, images, tmp_path):
    main = example("two_subjects_masks")
    left = np.zeros((48, 48), np.uint8)  # another size than the image: the script resizes masks
    left[:, :24] = 255
    Image.fromarray(left).save(tmp_path / "left.png")
    Image.fromarray(255 - left).save(tmp_path / "right.png")
    common = [*model_args(sd15), *SAMPLING, "--prompt", "two toys"]
    first, second = str(images["subject"]), str(images["subject_b"])

    def run(name: str, *extra: str) -> dict[str, Path]:
        paths = main([*common, "--output", str(tmp_path / name), *extra])
        assert_pngs(paths, 2)
        return by_name(paths)

    halves = run("halves", "--subjects", first, second)
    swapped_masks = run(
        "swapped", "--subjects", first, second, "--masks", str(tmp_path / "right.png"), str(tmp_path / "left.png")
    )
    both_swapped = run(
        "both", "--subjects", second, first, "--masks", str(tmp_path / "right.png"), str(tmp_path / "left.png")
    )
    preview = pixels(halves["masks.png"])
    assert tuple(preview[32, 5]) == (230, 60, 60) and tuple(preview[32, 60]) == (60, 90, 230)
    image = "00_0_two-toys.png"
    assert_changed(pixels(halves[image]), pixels(swapped_masks[image]))  # the masks place the subjects
    # The first subject on the left and the second on the right, given either way round: the same image.
    assert_same(pixels(halves[image]), pixels(both_swapped[image]))


# --------------------------------------------------------------------------------------------------- training


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps process-wide state: leave none behind for other tests (and take none from them)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_on_photos(example, sd15, tmp_path, fresh_accelerate_state):
    pytest.importorskip("diffusers_customcontrast.training", reason="the training package is not available")
    photos = tmp_path / "my photos"
    photos.mkdir()
    for index in range(3):
        make_subject_image(0).rotate(15 * index, fillcolor="white").save(photos / f"IMG_{index}.png")
    (photos / "notes.txt").write_text("not a photo")
    output = tmp_path / "run"
    result = example("train_on_photos")(
        ["--photos", str(photos), "--class_name", "toy", "--pretrained_model", str(sd15["pipeline"]),
         "--adapter", str(sd15["adapter"]), "--resolution", "64", "--max_train_steps", "2", "--learning_rate", "1e-3",
         "--validation_steps", "2", "--device", "cpu", "--dtype", "fp32", "--output", str(output), "--no_masks",
         "--validation_prompt", "a {class_name}", "--set", "report_to=none", "checkpointing_steps=null",
         "validation_num_inference_steps=2"]
    )  # fmt: skip

    subject_dir = output / "train_data" / "my-photos"
    assert sorted(p.name for p in subject_dir.iterdir()) == ["00.png", "01.png", "02.png", "subject.json"]
    assert json.loads((subject_dir / "subject.json").read_text()) == {"class_name": "toy"}
    run = yaml.safe_load((output / "run.yaml").read_text())
    assert run["use_cscl"] is False and run["use_macl"] is False and run["train_batch_size"] == 1
    assert run["image_encoder_path"] == str(sd15["adapter"] / "image_encoder")
    assert run["mixed_precision"] == "no" and run["max_train_steps"] == 2 and run["report_to"] == "none"

    assert result.global_step == 2 and all(np.isfinite(v) for v in result.final_losses.values())
    (grid,) = result.validation_images
    with Image.open(grid) as image:
        assert image.format == "PNG" and grid.parent == output / "validation"
    from safetensors.torch import load_file

    before = load_file(sd15["adapter"] / "diffusion_pytorch_model.safetensors")
    after = load_file(output / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    # The fine-tuned adapter is what the generation examples load.
    paths = example("generate_sd15")(
        ["--pretrained_model", str(sd15["pipeline"]), "--adapter", str(output), "--subject", str(photos / "IMG_0.png"),
         *SAMPLING, "--prompt", "a toy", "--output", str(tmp_path / "generated")]
    )  # fmt: skip
    assert_pngs(paths, 1)


def test_train_on_photos_prepare_only_and_bad_field(example, sd15, tmp_path):
    pytest.importorskip("diffusers_customcontrast.training", reason="the training package is not available")
    photos = tmp_path / "photos"
    photos.mkdir()
    make_subject_image(0).save(photos / "a.jpg")
    main = example("train_on_photos")
    common = ["--photos", str(photos), "--class_name", "toy", "--adapter", str(sd15["adapter"]),
              "--output", str(tmp_path / "run"), "--no_masks"]  # fmt: skip
    base = tmp_path / "base.yaml"  # a multi-subject configuration to start from
    base.write_text("train_batch_size: 8\nuse_cscl: true\nlearning_rate: 5.0e-5\nimage_encoder_path: my/encoder\n")
    config_path = main([*common, "--config", str(base), "--prepare_only", "--caption", "a photo of my {class_name}"])
    assert config_path == tmp_path / "run" / "run.yaml"
    run = yaml.safe_load(config_path.read_text())
    assert run["train_batch_size"] == 1 and run["use_cscl"] is False  # what one subject allows wins
    assert run["learning_rate"] == 5e-5 and run["image_encoder_path"] == "my/encoder"  # the rest comes from --config
    assert (tmp_path / "run" / "train_data" / "photos" / "caption.txt").read_text() == "a photo of my {class_name}"
    with pytest.raises(SystemExit):
        main([*common, "--prepare_only", "--set", "learning_rat=1e-4"])  # a typo fails before any model loads


# --------------------------------------------------------------------------------------------------- evaluation


PROMPTS_FILE = """Classes

subject_name,class
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def save_tiny_metric_models(root: Path) -> tuple[Path, Path]:
    """Folders of a tiny random CLIP (with tokenizer and image processor) and a tiny random DINO ViT."""
    import transformers
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from diffusers_customcontrast.testing.tiny_models import tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    common = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**common, "vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**common, "patch_size": 32}, projection_dim=32))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_class().save_pretrained(root / "clip")
    ViTModel(ViTConfig(**common, patch_size=16), add_pooling_layer=False).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def test_evaluate_dreambench(example, sd15, tmp_path, fresh_accelerate_state, capsys):
    pytest.importorskip("diffusers_customcontrast.evaluation.cli", reason="the evaluation package is not available")
    dataset = tmp_path / "dreambooth" / "dataset"
    (dataset / "dog").mkdir(parents=True)
    for index in range(2):
        make_subject_image(index).save(dataset / "dog" / f"{index:02d}.jpg")
    (dataset / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    clip_dir, dino_dir = save_tiny_metric_models(tmp_path / "metrics")

    output = tmp_path / "eval"
    results = example("evaluate_dreambench")(
        ["--dreambench_root", str(tmp_path / "dreambooth"), *model_args(sd15), "--images_per_prompt", "1",
         "--num_inference_steps", "2", "--scales", "0,1", "--device", "cpu", "--dtype", "fp32", "--output", str(output),
         # not options of the wrapper: passed on to the evaluation command
         "--height", "64", "--width", "64", "--clip_model", str(clip_dir), "--dino_model", str(dino_dir),
         "--local_files_only"]
    )  # fmt: skip
    assert "python -m diffusers_customcontrast.evaluate --dreambench_root" in capsys.readouterr().out
    assert [point["scale"] for point in results["sweep"]] == [0.0, 1.0]
    assert all(point["count"] == 2 and np.isfinite(point["clip_t"]) for point in results["sweep"])
    for name in ("results.json", "results.md", "scale_sweep.png"):
        assert (output / name).is_file(), name
    generated = sorted(output.rglob("dog/*.png"))
    assert_pngs(generated, 4)
