"""Tests of the trainer (diffusers_customcontrast.training): offline, tiny models, CPU.

Training runs use 32 px images (16 x 16 latents) and an adapter of width 32 so that a step takes a fraction of a
second; runs that go through files use tiny pipelines saved with ``save_pretrained`` as the "base model".
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import diffusers_customcontrast  # noqa: F401  (registers pipe.load_customcontrast)
from diffusers_customcontrast.data import SubjectTripletDataset, collate_triplets, write_synthetic_dataset
from diffusers_customcontrast.testing.tiny_models import (
    TINY_ADAPTER_CONFIG,
    make_subject_image,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from diffusers_customcontrast.training import (
    BaseModel,
    BatchEncoder,
    ConditioningDropout,
    ConfigError,
    CustomContrastObjective,
    ObjectiveSettings,
    TrainingConfig,
    add_unet_lora,
    build_adapter,
    parse_args,
    step_generator,
    train,
)
from diffusers_customcontrast.training.cli import main

TINY_ADAPTER = {f"adapter_{key}": value for key, value in TINY_ADAPTER_CONFIG.items()}
RESOLUTION = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1.5 and SDXL base-model folders and a synthetic subject folder (8 subjects x 3 frames)."""
    root = tmp_path_factory.mktemp("training")
    tiny_sd15_pipeline().save_pretrained(root / "sd15")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    write_synthetic_dataset(root / "subjects", num_subjects=8, frames_per_subject=3, size=RESOLUTION)
    return {"root": root, "sd15": root / "sd15", "sdxl": root / "sdxl", "data": root / "subjects"}


def tiny_config(files: dict[str, Path], output_dir: Path, **overrides) -> TrainingConfig:
    values = {
        "pretrained_model_name_or_path": str(files["sd15"]),
        "train_data": str(files["data"]),
        "resolution": RESOLUTION,
        "train_batch_size": 2,
        "max_train_steps": 2,
        "checkpointing_steps": None,
        "learning_rate": 1e-3,
        "report_to": "none",
        "output_dir": str(output_dir),
        **TINY_ADAPTER,
    }
    values.update(overrides)
    return TrainingConfig.from_dict(values)


def make_objective(config: TrainingConfig, lora: bool = False):
    """An objective on an in-memory tiny SD1.5 base, and a batch encoder (no dropout)."""
    base = BaseModel.from_pipeline(tiny_sd15_pipeline())
    base.freeze("cpu", torch.float32)
    if lora:
        add_unet_lora(base.unet, config)
    torch.manual_seed(0)
    adapter = build_adapter(config, base)
    objective = CustomContrastObjective(
        base.unet, adapter, base.noise_scheduler, ObjectiveSettings.from_config(config)
    )
    encoder = BatchEncoder(base, resolution=RESOLUTION, dropout=ConditioningDropout(0.0, 0.0, 0.0))
    return base, objective.train(), encoder


def fixed_batch(files: dict[str, Path], size: int = 4) -> dict:
    dataset = SubjectTripletDataset(files["data"], resolution=RESOLUTION, reference_size=224)
    return collate_triplets([dataset[i] for i in range(size)])


# ---------------------------------------------------------------------------------------------------- objective


def test_gradients_reach_every_trainable_parameter_and_nothing_frozen(files, tmp_path):
    config = tiny_config(files, tmp_path, use_lora=True, lora_rank=2)
    base, objective, encoder = make_objective(config, lora=True)
    inputs = encoder(fixed_batch(files, 3), step_generator(0, 0, 0, 0))
    output = objective(inputs)
    logged = {"total", "logit_scale", "s_plus_scale", "gate_strength", "tv_fusion_norm"}
    assert set(output.terms) == {"diffusion", "cscl", "macl", "location"} | logged
    output.loss.backward()

    trainable = {n: p for n, p in objective.named_parameters() if p.requires_grad}
    assert "logit_scale.value" in trainable
    assert any(n.startswith("adapter.") for n in trainable) and any("lora_" in n for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    # LoRA starts with B = 0, so A's first gradient is exactly 0 (B's is not): A is only checked for a gradient.
    zero_grad = [
        n for n, p in trainable.items() if "lora_A" not in n and p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert no_grad == [] and zero_grad == []
    frozen = [p for m in base.frozen_modules for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    # Every adapter parameter is trainable and listed once, under its adapter name.
    assert {f"adapter.{n}" for n, _ in objective.adapter.named_parameters()} <= set(trainable)


def test_a_location_gate_that_underflows_to_zero_keeps_every_gradient_finite(files, tmp_path):
    """A trained location head can push its sigmoid to exactly 0 (seen after ~1,400-1,900 steps on the world):
    the S+ bias log(0) = -inf then gave a finite loss but NaN gradients, which corrupted every weight at once."""
    config = tiny_config(files, tmp_path)
    _, objective, encoder = make_objective(config)
    with torch.no_grad():
        for layer in objective.adapter.layers:
            layer.location.affine.bias.copy_(torch.tensor([1.0, -200.0]))  # sigmoid(-200) == 0 in float32
            layer.location_gate.strength.fill_(1.0)  # the gate is the map itself
    output = objective(encoder(fixed_batch(files, 3), step_generator(0, 0, 0, 0)))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    bad = [n for n, p in objective.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad == []


def test_image_dropout_rows_are_blank_and_left_out_of_the_subject_losses(files, tmp_path):
    config = tiny_config(files, tmp_path)
    base, objective, _ = make_objective(config)
    batch = fixed_batch(files, 3)
    encoder = BatchEncoder(base, resolution=RESOLUTION, dropout=ConditioningDropout(image=1.0, text=0.0, both=0.0))
    inputs = encoder(batch, step_generator(0, 0, 0, 0))
    assert not inputs.image_kept.any()
    blank = base.image_encoder(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(inputs.reference_features[1:2], blank)
    terms = objective(inputs).terms
    assert terms["cscl"] == 0 and terms["macl"] == 0 and terms["location"] == 0


def test_step_randomness_depends_only_on_the_position_in_the_run():
    def draw(*key):
        return torch.randn(4, generator=step_generator(*key))

    assert torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 0))
    assert not torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 1))  # another process
    assert not torch.equal(draw(0, 5, 1, 0), draw(0, 5, 0, 0))  # another micro-step
    image, text = ConditioningDropout(0.3, 0.3, 0.3).draw(1000, step_generator(1, 0, 0, 0), torch.device("cpu"))
    both = image & text
    assert 0.2 < both.float().mean() < 0.4 and 0.5 < image.float().mean() < 0.7


def test_a_fixed_batch_is_learned(files, tmp_path):
    config = tiny_config(files, tmp_path)
    _, objective, encoder = make_objective(config)
    inputs = encoder(fixed_batch(files, 4), step_generator(0, 0, 0, 0))
    optimizer = torch.optim.AdamW(objective.trainable_parameters(), lr=3e-3)
    history = []
    for _ in range(70):
        output = objective(inputs)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v.item() for k, v in output.terms.items()})
    first, last = history[0], history[-1]
    assert last["total"] < 0.65 * first["total"]
    assert last["diffusion"] < first["diffusion"] and last["location"] < 0.5 * first["location"]
    assert last["cscl"] < 0.1 * first["cscl"]


# ---------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def trained_run(files, tmp_path_factory):
    """A 3-step run with checkpoints (limit 2), tensorboard and validation images."""
    output_dir = tmp_path_factory.mktemp("run")
    config = tiny_config(
        files,
        output_dir,
        max_train_steps=3,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        report_to="tensorboard",
        validation_steps=2,
        validation_num_inference_steps=2,
        validation_prompts=["a {class_name} on the beach"],
    )
    return train(config)


def test_run_writes_adapter_checkpoints_logs_and_validation(trained_run):
    out = trained_run.output_dir
    assert trained_run.global_step == 3
    assert [p.name for p in trained_run.checkpoints] == ["checkpoint-2", "checkpoint-3"]
    for checkpoint in trained_run.checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        # Only the trainable weights: no copy of the frozen UNet in a checkpoint.
        assert {"trainable_state.safetensors", "optimizer.bin", "adapter"} <= names
        assert not any(name.startswith("model") for name in names)
    lines = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3] == [e["step"] for e in trained_run.loss_history]
    assert {"total", "diffusion", "cscl", "macl", "location", "lr", "seconds"} <= set(lines[-1])
    assert set(trained_run.final_losses) >= {"total", "diffusion"}
    assert [p.name for p in trained_run.validation_images] == ["step-000002.png", "step-000003.png"]
    assert all(p.is_file() for p in trained_run.validation_images)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert "load_customcontrast" in card and "base_model:" in card and "| steps | 3 |" in card
    assert (out / "image_encoder" / "config.json").is_file()
    assert yaml.safe_load((out / "training_config.yaml").read_text())["max_train_steps"] == 3


def test_exported_folder_loads_into_a_pipeline_and_changes_its_output(trained_run):
    pipe = tiny_sd15_pipeline(image_encoder=False)  # the image encoder comes from the exported folder
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_customcontrast(trained_run.output_dir)
    assert pipe.image_encoder is not None
    subject = make_subject_image(0)
    after = pipe("a cat", ip_adapter_image=subject, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(after - before).max() > 1e-3
    pipe.unload_customcontrast()
    restored = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (restored == before).all()


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(files, tmp_path):
    # 8 subjects, 2 per batch, 2 batches per step: 2 steps per epoch; the run is cut after step 3, mid-epoch, and
    # resumed to step 6 (skipped batches, an epoch boundary, accumulation and dropout all matter).
    common = {
        "checkpointing_steps": 3,
        "gradient_accumulation_steps": 2,
        "image_dropout": 0.2,
        "text_dropout": 0.2,
        "both_dropout": 0.1,
        "deterministic": True,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 2,
    }
    full = train(tiny_config(files, tmp_path / "full", max_train_steps=6, **common))
    cut = train(tiny_config(files, tmp_path / "cut", max_train_steps=3, **common))
    assert cut.global_step == 3
    resumed = train(tiny_config(files, tmp_path / "cut", max_train_steps=6, resume_from_checkpoint="latest", **common))
    assert resumed.global_step == 6

    expected = load_file(tmp_path / "full" / "checkpoint-6" / "trainable_state.safetensors")
    actual = load_file(tmp_path / "cut" / "checkpoint-6" / "trainable_state.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [e["total"] for e in resumed.loss_history] == [e["total"] for e in full.loss_history]
    exported = load_file(tmp_path / "cut" / "diffusion_pytorch_model.safetensors")
    reference = load_file(tmp_path / "full" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], reference[k]) for k in reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_end_with_identical_weights(files, tmp_path):
    config = tiny_config(files, tmp_path / "out", max_train_steps=3, debug_save_rank_states=True)
    config_file = tmp_path / "run.yaml"
    config.to_yaml(config_file)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),  # no user accelerate config, no hub cache
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "ACCELERATE_USE_CPU": "true",  # gloo on CPUs, even where a GPU is visible
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "diffusers_customcontrast.train", "--config", str(config_file),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes" in result.stderr
    rank0 = load_file(tmp_path / "out" / "rank_states" / "rank-0.safetensors")
    rank1 = load_file(tmp_path / "out" / "rank_states" / "rank-1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    lines = (tmp_path / "out" / "loss_history.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_sdxl_trains_two_steps_from_the_command_line(files, tmp_path):
    config_file = tmp_path / "sdxl.yaml"
    values = tiny_config(files, tmp_path / "out").to_dict()
    values["pretrained_model_name_or_path"] = str(files["sdxl"])
    config_file.write_text(yaml.safe_dump(values))
    result = main(["--config", str(config_file), "--use_lora", "--lora_rank", "2", "--snr_gamma", "5"])
    assert result.global_step == 2 and math.isfinite(result.final_losses["total"])
    out = tmp_path / "out"
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["cross_attention_dim"] == 64


# ---------------------------------------------------------------------------------------------------- config


def test_cli_parses_yaml_and_typed_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "pretrained_model_name_or_path: org/base\ntrain_data: data/\nlearning_rate: 1e-4\n"
        "max_train_steps: 10\nvalidation_prompts: [a, b]\nsnr_gamma: 5\n"
    )
    config = parse_args(
        [
            "--config", str(config_file),
            "--max_train_steps", "7",
            "--use_lora",
            "--use_cscl", "false",
            "--snr_gamma", "none",
            "--validation_prompts", "a dog", "a cat",
            "--image_feature_layers", "-2", "-1",
            "--mixed_precision", "bf16",
        ]
    )  # fmt: skip
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)  # YAML reads 1e-4 as a string
    assert config.max_train_steps == 7 and config.use_lora is True and config.use_cscl is False
    assert config.snr_gamma is None and config.mixed_precision == "bf16"
    assert config.validation_prompts == ["a dog", "a cat"] and config.image_feature_layers == [-2, -1]
    assert TrainingConfig.from_yaml(config_file).validation_prompts == ["a", "b"]
    round_trip = tmp_path / "again.yaml"
    config.to_yaml(round_trip)
    assert TrainingConfig.from_yaml(round_trip) == config


def test_cli_rejects_unknown_keys_and_bad_values(tmp_path, capsys):
    required = ["--pretrained_model_name_or_path", "x", "--train_data", "y"]
    with pytest.raises(ConfigError, match=r"'max_train_step' \(did you mean 'max_train_steps'\?\).*Valid keys: "):
        parse_args([*required, "--max_train_step", "3"])
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("learning_rat: 1.0\n")
    with pytest.raises(ConfigError, match="learning_rat.*did you mean 'learning_rate'"):
        parse_args(["--config", str(config_file), *required])
    with pytest.raises(ConfigError, match="'train_batch_size' must be an int"):
        parse_args([*required, "--train_batch_size", "two"])
    with pytest.raises(ConfigError, match="set train_data"):
        parse_args(["--pretrained_model_name_or_path", "x"])
    with pytest.raises(ConfigError, match="image_dropout \\+ text_dropout"):
        parse_args([*required, "--image_dropout", "0.6", "--text_dropout", "0.6"])
    with pytest.raises(SystemExit) as exit_info:
        main([*required, "--bogus", "1"])
    assert exit_info.value.code == 2 and "Unknown training configuration key 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--lambda_macl" in capsys.readouterr().out


def test_example_config_is_valid():
    example = Path(__file__).parent.parent / "examples" / "train_config.yaml"
    config = TrainingConfig.from_yaml(example).validate()
    assert config.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_train_data_from_a_saved_hugging_face_dataset(files, tmp_path):
    import datasets

    from diffusers_customcontrast.data import make_subject, render_frame
    from diffusers_customcontrast.training.dataset import load_training_subjects

    rows = {"subject_id": [], "image": [], "mask": [], "caption": []}
    for subject_index in range(3):
        for frame in range(2):
            image, mask, caption = render_frame(make_subject(subject_index), [subject_index, frame], size=32)
            rows["subject_id"].append(f"s{subject_index}")
            rows["image"].append(image)
            rows["mask"].append(mask if frame else None)
            rows["caption"].append(caption)
    features = datasets.Features(
        {
            "subject_id": datasets.Value("string"),
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "caption": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    index = load_training_subjects(tiny_config(files, tmp_path, train_data=str(tmp_path / "hf")))
    assert list(index) == ["s0", "s1", "s2"] and [f.has_mask for f in index["s1"]] == [False, True]


def test_image_encoder_hub_path_with_subfolder():
    from diffusers_customcontrast.training.components import _split_hub_path

    assert _split_hub_path("h94/IP-Adapter/models/image_encoder", None) == ("h94/IP-Adapter", "models/image_encoder")
    assert _split_hub_path("h94/IP-Adapter", "models/image_encoder") == ("h94/IP-Adapter", "models/image_encoder")
    assert _split_hub_path("/abs/encoder/dir", None) == ("/abs/encoder/dir", None)
