"""Reliability of training (issue 7, docs/reliability.md "Training"): offline, tiny models, CPU, deterministic.

Faults injected: unusable samples (bad JPEG bytes, a truncated PNG, a 1 x 1 image, an all-zero mask, a mask file that
disappears after indexing) and a data set where every sample is unusable; an exception in the middle of a checkpoint
save plus the folders a killed save leaves; SIGTERM and SIGKILL sent to ``python -m diffusers_customcontrast.train``;
NaN losses. Every interrupted run is resumed and must end with the exported weights of an uninterrupted run, bit for
bit. The runs share one configuration (8 steps, a checkpoint every step, dropout on) and one uninterrupted reference.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_customcontrast.data import (
    BadDataError,
    ImageReadError,
    SubjectTripletDataset,
    UniqueSubjectBatchSampler,
    UnusableFrameError,
    load_subjects,
    write_synthetic_dataset,
)
from diffusers_customcontrast.data.formats import read_image
from diffusers_customcontrast.testing.tiny_models import TINY_ADAPTER_CONFIG, tiny_sd15_pipeline
from diffusers_customcontrast.training import TrainingConfig, train
from diffusers_customcontrast.training import checkpoints as checkpoints_module
from diffusers_customcontrast.training import trainer as trainer_module
from diffusers_customcontrast.training.checkpoints import (
    COMPLETE_MARKER,
    is_complete_checkpoint,
    list_checkpoints,
    resolve_resume_checkpoint,
)
from diffusers_customcontrast.training.cli import main
from diffusers_customcontrast.training.faults import NonFiniteLossError
from diffusers_customcontrast.training.objective import CustomContrastObjective, ObjectiveOutput

RESOLUTION = 32
STEPS = 8  # 4 batches of 2 subjects per epoch: 2 epochs
TINY_ADAPTER = {f"adapter_{key}": value for key, value in TINY_ADAPTER_CONFIG.items()}
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------------- faults


def _bad_jpeg(subject: Path) -> Path:
    (subject / "frame_00.png").unlink()
    path = subject / "frame_00.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG start marker, then garbage
    return path


def _truncated_png(subject: Path) -> Path:
    path = subject / "frame_00.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _one_pixel_image(subject: Path) -> Path:
    path = subject / "frame_00.png"
    Image.new("RGB", (1, 1), (200, 40, 40)).save(path)
    return path


def _empty_mask(subject: Path) -> Path:
    path = subject / "masks" / "frame_00.png"
    Image.new("L", (RESOLUTION, RESOLUTION), 0).save(path)
    return path


# Fault -> (how to inject it into a subject folder, the error dataset[i] raises). Subject i gets fault i.
FAULTS = {
    "bad JPEG bytes": (_bad_jpeg, ImageReadError),
    "truncated PNG": (_truncated_png, ImageReadError),
    "1 x 1 image": (_one_pixel_image, UnusableFrameError),
    "all-zero mask": (_empty_mask, UnusableFrameError),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1.5 folder, and 8 synthetic subjects x 3 frames of which subjects 0-3 have one damaged frame each."""
    root = tmp_path_factory.mktemp("reliability")
    tiny_sd15_pipeline().save_pretrained(root / "sd15")
    data = write_synthetic_dataset(root / "faulty", num_subjects=8, frames_per_subject=3, size=RESOLUTION)
    damaged = {name: inject(data / f"subject_{i:03d}") for i, (name, (inject, _)) in enumerate(FAULTS.items())}
    clean = write_synthetic_dataset(root / "clean", num_subjects=8, frames_per_subject=3, size=RESOLUTION)
    return {"root": root, "sd15": root / "sd15", "data": data, "clean": clean, "damaged": damaged}


def run_config(files: dict[str, Path], output_dir: Path, **overrides) -> TrainingConfig:
    values = {
        "pretrained_model_name_or_path": str(files["sd15"]),
        "train_data": str(files["data"]),
        "resolution": RESOLUTION,
        "train_batch_size": 2,
        "max_train_steps": STEPS,
        "checkpointing_steps": 1,
        "learning_rate": 1e-3,
        "image_dropout": 0.2,
        "text_dropout": 0.2,
        "both_dropout": 0.1,
        "deterministic": True,
        "export_image_encoder": False,
        "report_to": "none",
        "output_dir": str(output_dir),
        **TINY_ADAPTER,
    }
    values.update(overrides)
    return TrainingConfig.from_dict(values)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The uninterrupted run every interrupted run must match."""
    return train(run_config(files, tmp_path_factory.mktemp("reference")))


def assert_same_run(result, reference) -> None:
    """Nothing lost: the exported weights are bit-identical, and so are the logged losses and the fault counts."""
    expected = load_file(reference.output_dir / WEIGHTS)
    actual = load_file(result.output_dir / WEIGHTS)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert different == [], f"{len(different)} of {len(expected)} tensors differ"
    assert [e["total"] for e in result.loss_history] == [e["total"] for e in reference.loss_history]
    assert result.global_step == reference.global_step == STEPS
    assert result.skipped_samples == reference.skipped_samples
    assert not any(".tmp-" in p.name for p in result.output_dir.iterdir())


def trainable_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "trainable_state.safetensors")


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- bad samples


def test_each_unusable_sample_raises_and_is_replaced_deterministically_in_batches(files):
    dataset = SubjectTripletDataset(files["data"], resolution=RESOLUTION, reference_size=32)
    for subject, (name, (_, error)) in enumerate(FAULTS.items()):
        _set_epoch_using_frame_0(dataset, subject)
        with pytest.raises(error, match=files["damaged"][name].name):
            dataset[subject]
    # A loader's image (Hugging Face datasets cells) is decoded inside the error handling too.
    truncated = files["damaged"]["truncated PNG"].read_bytes()
    with pytest.raises(ImageReadError, match="image file is truncated"):
        read_image(lambda: Image.open(io.BytesIO(truncated)))

    def epoch_batches(epoch: int) -> list[list[dict]]:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        return [dataset.__getitems__(indices) for indices in sampler]

    sampler = UniqueSubjectBatchSampler(dataset, batch_size=4, drop_last=True, seed=0)
    batches = [batch for epoch in range(3) for batch in epoch_batches(epoch)]
    messages = [m for batch in batches for item in batch for m in item["skipped"]]
    assert messages, "some draw of the 3 epochs uses a damaged frame"
    for batch in batches:
        assert len({item["subject_index"] for item in batch}) == len(batch)  # still subject-unique
    for item in (item for batch in batches for item in batch):
        assert not any(f"(subject '{item['subject_id']}')" in m for m in item["skipped"])  # another subject's
    for name, path in files["damaged"].items():
        assert any(f"'{path}'" in m for m in messages), f"{name}: never skipped in 3 epochs"
    again = [batch for epoch in range(3) for batch in epoch_batches(epoch)]
    for first, second in zip(batches, again):
        assert [i["subject_index"] for i in first] == [i["subject_index"] for i in second]
        assert all(torch.equal(a["target"], b["target"]) for a, b in zip(first, second))


def _set_epoch_using_frame_0(dataset: SubjectTripletDataset, subject: int) -> None:
    for epoch in range(100):
        dataset.set_epoch(epoch)
        draw = dataset.draw(subject)
        if 0 in (draw.reference, draw.positive, draw.target):
            return
    raise AssertionError("no draw uses frame 0")


def test_a_run_skips_counts_and_reports_unusable_samples(files, tmp_path, monkeypatch, caplog):
    # A fifth fault: a mask file that disappears after the data was indexed (e.g. on network storage).
    data = shutil.copytree(files["data"], tmp_path / "data")
    index = load_subjects(data)
    missing = data / "subject_004" / "masks" / "frame_00.png"
    missing.unlink()
    monkeypatch.setattr(trainer_module, "load_training_subjects", lambda config: index)
    caplog.set_level(logging.WARNING)
    result = train(
        run_config(files, tmp_path / "out", train_data=str(data), max_train_steps=4, checkpointing_steps=None)
    )

    skipped = [r.getMessage() for r in caplog.records if "skipped an unusable training sample" in r.getMessage()]
    assert result.global_step == 4 and result.skipped_samples == len(skipped) > 0
    assert sum(e["skipped_samples"] for e in result.loss_history) == result.skipped_samples
    damaged = [*files["damaged"].values(), missing]
    assert all(any(p.name in m for p in damaged) for m in skipped), skipped
    assert any(missing.name in m and "subject_004" in m for m in skipped), "the missing mask is skipped too"
    summary = [r.getMessage().split("] ")[-1] for r in caplog.records if "The run skipped" in r.getMessage()]
    assert summary == [f"The run skipped {result.skipped_samples} unusable samples (replaced by other subjects' "
                       "samples; the warnings above name the files) and 0 steps with a non-finite loss."]  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| unusable samples skipped (replaced by other subjects') | {result.skipped_samples} |" in card


def test_a_data_set_with_no_usable_sample_stops_before_any_step(files, tmp_path):
    data = write_synthetic_dataset(tmp_path / "bad", num_subjects=3, frames_per_subject=1, size=RESOLUTION)
    for subject in sorted(data.iterdir()):
        _one_pixel_image(subject)
    dataset = SubjectTripletDataset(data, resolution=RESOLUTION, reference_size=32)
    with pytest.raises(BadDataError, match=r"No usable training sample: 2 samples in a row .*1 x 1 pixels"):
        dataset.__getitems__([0, 1])
    with pytest.raises(BadDataError, match="No usable training sample"):
        train(run_config(files, tmp_path / "out", train_data=str(data)))
    assert list_checkpoints(tmp_path / "out") == []
    assert (tmp_path / "out" / "loss_history.jsonl").read_text() == ""


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_an_interrupted_checkpoint_save_never_looks_complete_and_the_run_resumes_exactly(
    files, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real_save_file = checkpoints_module.save_file
    calls = itertools.count(1)

    def save_file_failing_on_the_third_checkpoint(state, path, *args, **kwargs):
        real_save_file(state, path, *args, **kwargs)
        if next(calls) == 3:  # half of trainable_state.safetensors written, then the disk is full
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise OSError(28, "No space left on device (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints_module, "save_file", save_file_failing_on_the_third_checkpoint)
        with pytest.raises(OSError, match="injected"):
            train(run_config(files, out))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not any(".tmp-" in p.name for p in out.iterdir()), "the failed save's folder is removed"

    # What a save killed outright (no exception handler runs) or an older, non-atomic writer could leave.
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3.tmp-killed")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4")
    (out / "checkpoint-4" / COMPLETE_MARKER).unlink()
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-5")
    state_file = out / "checkpoint-5" / "trainable_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:-8])
    assert [is_complete_checkpoint(out / f"checkpoint-{s}") for s in (1, 2, 4, 5)] == [True, True, False, False]
    assert resolve_resume_checkpoint(out, "latest") == out / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="damaged"):
        resolve_resume_checkpoint(out, "checkpoint-5")

    resumed = train(run_config(files, out, resume_from_checkpoint="latest"))
    assert_same_run(resumed, reference)
    assert [p.name for p in list_checkpoints(out, complete_only=True)] == [f"checkpoint-{s}" for s in range(1, 9)]


# ---------------------------------------------------------------------------------------------------- signals


def _launch(config_file: Path, log_file: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HOME": str(config_file.parent / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",  # as the tests' torch.set_num_threads(1): bit-identical arithmetic
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "diffusers_customcontrast.train", "--config", str(config_file), *extra]
    with log_file.open("w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=config_file.parent)


def _wait_for(condition, process: subprocess.Popen, log_file: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended (rc={process.returncode}) or timed out first:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.02)


def _logged_steps(out: Path) -> int:
    history = out / "loss_history.jsonl"
    return len(history.read_text().splitlines()) if history.is_file() else 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(files, reference, tmp_path):
    out = tmp_path / "out"
    config_file = tmp_path / "run.yaml"
    run_config(files, out, checkpointing_steps=None).to_yaml(config_file)  # only SIGTERM writes a checkpoint
    log_file = tmp_path / "train.log"
    process = _launch(config_file, log_file)
    _wait_for(lambda: _logged_steps(out) >= 1, process, log_file)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log_file.read_text()[-3000:]

    log = log_file.read_text()
    step = _logged_steps(out)
    assert 1 <= step < STEPS
    assert f"Stopped by SIGTERM after step {step}: the training state is in {out / f'checkpoint-{step}'}" in log
    assert [p.name for p in list_checkpoints(out, complete_only=True)] == [f"checkpoint-{step}"]
    assert not (out / WEIGHTS).exists(), "an interrupted run does not export"

    resumed = train(run_config(files, out, resume_from_checkpoint="latest"))
    assert_same_run(resumed, reference)
    print(f"SIGTERM after step {step}: exit status 0, checkpoint-{step} written, resumed to the same weights")


def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights(files, reference, tmp_path):
    out = tmp_path / "out"
    config_file = tmp_path / "run.yaml"
    run_config(files, out).to_yaml(config_file)
    rng = random.Random()
    # After 2 to 4 checkpoints: either a random delay (the kill lands in a step), or as soon as the next checkpoint's
    # temporary folder appears (the kill lands in the middle of a save, when the 1 ms polling catches it).
    checkpoints, in_save, delay = rng.randint(2, 4), rng.random() < 0.5, rng.uniform(0.0, 0.3)
    log_file = tmp_path / "train.log"
    process = _launch(config_file, log_file)
    _wait_for(lambda: len(list_checkpoints(out, complete_only=True)) >= checkpoints, process, log_file)
    deadline = time.monotonic() + (1.0 if in_save else delay)
    while time.monotonic() < deadline and not (in_save and any(".tmp-" in p.name for p in out.iterdir())):
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed_at = _logged_steps(out)
    when = "in the next save" if in_save else f"{delay:.2f} s later"
    assert killed_at < STEPS, f"the run finished before the kill ({checkpoints} checkpoints, {when})"
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    resume_from = resolve_resume_checkpoint(out, "latest").name

    resumed = main(["--config", str(config_file), "--resume_from_checkpoint", "latest"])
    assert_same_run(resumed, reference)
    print(f"killed after {killed_at} logged steps ({checkpoints} checkpoints, {when}), left {left}, "
          f"resumed from {resume_from} to the same weights")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- non-finite loss


def _nan_at(calls: set[int] | None = None, from_call: int | None = None):
    """A forward of the objective whose loss (and logged terms) are NaN at the given 1-based calls."""
    original = CustomContrastObjective.forward
    counter = itertools.count(1)

    def forward(self, inputs, step=0):
        output = original(self, inputs, step)
        call = next(counter)
        if (calls and call in calls) or (from_call and call >= from_call):
            nan = torch.tensor(float("nan"))
            return ObjectiveOutput(output.loss * nan, {k: v * nan for k, v in output.terms.items()})
        return output

    return forward


def _optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]


def test_a_nan_loss_skips_the_update_and_is_counted(files, tmp_path, monkeypatch):
    monkeypatch.setattr(CustomContrastObjective, "forward", _nan_at(calls={2, 4}))
    out = tmp_path / "out"
    result = train(
        run_config(files, out, train_data=str(files["clean"]), max_train_steps=5, max_consecutive_nonfinite=2)
    )
    assert result.global_step == 5 and result.nonfinite_steps == 2 and not result.interrupted
    assert [e["nonfinite"] for e in result.loss_history] == [0, 1, 0, 1, 0]
    states = {s: trainable_state(out / f"checkpoint-{s}") for s in range(1, 6)}
    assert same_tensors(states[2], states[1]) and same_tensors(states[4], states[3])  # no update
    assert not same_tensors(states[3], states[2]) and not same_tensors(states[5], states[4])
    first, skipped = _optimizer_state(out / "checkpoint-1"), _optimizer_state(out / "checkpoint-2")
    assert all(torch.equal(first[i]["exp_avg"], skipped[i]["exp_avg"]) for i in first)  # no optimizer step
    assert all(torch.isfinite(t).all() for t in load_file(out / WEIGHTS).values())
    assert "| steps skipped for a non-finite loss | 2 |" in (out / "README.md").read_text()


def test_a_finite_loss_with_a_nan_gradient_skips_the_update(files, tmp_path, monkeypatch):
    original = CustomContrastObjective.forward
    counter = itertools.count(1)

    def forward(self, inputs, step=0):
        output = original(self, inputs, step)
        if next(counter) == 2:  # sqrt(0 * loss) is 0, its gradient inf * 0 = NaN
            return ObjectiveOutput(output.loss + torch.sqrt(output.loss * 0.0), output.terms)
        return output

    monkeypatch.setattr(CustomContrastObjective, "forward", forward)
    out = tmp_path / "out"
    result = train(run_config(files, out, train_data=str(files["clean"]), max_train_steps=3))
    assert all(torch.isfinite(torch.tensor(e["total"])) for e in result.loss_history)
    assert [e["nonfinite"] for e in result.loss_history] == [0, 1, 0] and result.nonfinite_steps == 1
    assert same_tensors(trainable_state(out / "checkpoint-2"), trainable_state(out / "checkpoint-1"))
    assert all(torch.isfinite(t).all() for t in load_file(out / WEIGHTS).values())


def test_too_many_nan_losses_in_a_row_stop_with_the_last_good_checkpoint(files, tmp_path, monkeypatch):
    monkeypatch.setattr(CustomContrastObjective, "forward", _nan_at(from_call=3))
    out = tmp_path / "out"
    config = run_config(files, out, train_data=str(files["clean"]), max_consecutive_nonfinite=3)
    message = r"NaN or infinite at 3 optimizer steps in a row \(steps 3 to 5; .*latest checkpoint: .*checkpoint-4"
    with pytest.raises(NonFiniteLossError, match=message):
        train(config)
    assert [p.name for p in list_checkpoints(out, complete_only=True)] == [f"checkpoint-{s}" for s in range(1, 5)]
    good = trainable_state(out / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert same_tensors(trainable_state(resolve_resume_checkpoint(out, "latest")), good)
    lines = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [e["nonfinite"] for e in lines] == [0, 0, 1, 1, 1]


def test_a_base_model_out_of_reach_is_named_in_one_sentence(files, tmp_path, monkeypatch, capsys):
    """No network, not cached, not a folder: one line and exit status 2, without the hub client's retries."""

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("socket.create_connection", unreachable)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    argv = ["--pretrained_model_name_or_path", "some-org/some-base", "--train_data", str(files["clean"])]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--output_dir", str(tmp_path / "run")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: The base model 'some-org/some-base' is not a local folder and not in the")
    assert "pass that folder as pretrained_model_name_or_path" in err[-1]
