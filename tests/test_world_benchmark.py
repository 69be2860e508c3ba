"""The world's metrics, the held-out evaluation protocol, the offline demo and the ablation benchmark (smoke runs)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customcontrast_world import benchmark, load_synthetic_base, write_world
from customcontrast_world import demo as demo_module
from customcontrast_world.evaluation import (
    evaluate_on_world,
    evaluation_prompts,
    generate_world_images,
    render_prompt,
    score_world_images,
)
from customcontrast_world.judge import load_world_judge
from customcontrast_world.metrics import SubjectGallery, chroma, is_sketch, scene_obeyed
from customcontrast_world.recipe import ABLATIONS, world_training_config
from customcontrast_world.report import scores_table, smoothed
from customcontrast_world.train_judge import TrainJudgeConfig, train_judge
from diffusers_customcontrast import load_customcontrast
from diffusers_customcontrast.data.synthetic import BACKGROUNDS, COLOR_VALUES
from diffusers_customcontrast.models import CustomContrastAdapter
from diffusers_customcontrast.training.components import adapter_kwargs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return write_world(
        tmp_path_factory.mktemp("world"), num_train_subjects=8, num_heldout_subjects=10, frames_per_subject=6
    )


@pytest.fixture(scope="module")
def judge():
    return load_world_judge()


@pytest.fixture(scope="module")
def gallery(world, judge):
    return SubjectGallery.from_world(world, judge)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def test_sketch_detector_separates_the_worlds_sketches_from_coloured_photos(world):
    frames = [f for sid in world.splits["heldout"] for f in world.frames(sid)]
    for frame in frames:
        image = Image.open(frame.image_path)
        if frame.view.style == "sketch":
            assert is_sketch(image), frame.image_path
        elif frame.view.background not in ("gray", "snow"):  # near-grey scenes are judged by background instead
            assert not is_sketch(image), frame.image_path
    assert chroma(np.full((4, 4, 3), 0.5)) == 0.0  # float images in [0, 1] too


def test_real_renders_obey_every_evaluation_prompt(world):
    prompts = evaluation_prompts(world, scenes_per_subject=5)
    assert all(scene_obeyed(render_prompt(world, p), p.background, p.style) for p in prompts)
    # A render of another scene does not.
    photo = next(p for p in prompts if p.style == "photo")
    other = next(b.name for b in BACKGROUNDS if b.name != photo.background)
    assert not scene_obeyed(render_prompt(world, photo), other)
    assert not scene_obeyed(render_prompt(world, photo), photo.background, "sketch")


def test_judge_recognises_unseen_subjects_and_their_attributes_in_any_scene(world, judge, gallery):
    prompts = evaluation_prompts(world, scenes_per_subject=4)
    photos = [p for p in prompts if p.style == "photo"]
    renders = [render_prompt(world, p) for p in photos]
    scores = score_world_images(renders, photos, judge, gallery, world)
    assert scores.identity_accuracy >= 0.8 and scores.controllability == 1.0
    # Far above chance (colour sets 1/11 or less, shape 1/10, texture 1/4) on subjects the judge never saw.
    assert scores.color_accuracy >= 0.9 and scores.shape_accuracy >= 0.2 and scores.texture_accuracy >= 0.6
    # The same images attributed to the wrong subjects score far lower.
    ids = [p.subject_id for p in photos]
    shifted = ids[3:] + ids[:3]
    embeddings = judge.judge(renders)[0]
    assert gallery.similarity(embeddings, ids).mean() > gallery.similarity(embeddings, shifted).mean() + 0.2
    with pytest.raises(KeyError, match="not in the gallery"):
        gallery.similarity(embeddings[:1], ["nobody"])
    with pytest.raises(ValueError, match="one image per prompt"):
        score_world_images(renders[:1], photos, judge, gallery, world)


def test_train_judge_writes_a_loadable_judge_and_resumes_exactly(tmp_path: Path):
    settings = {
        "steps": 4,
        "batch_size": 4,
        "frames_per_subject": 3,
        "num_train_subjects": 6,
        "num_heldout_subjects": 3,
    }
    train_judge(TrainJudgeConfig(output_dir=str(tmp_path / "whole"), **settings), log=lambda message: None)
    judge = load_world_judge(tmp_path / "whole")
    log = json.loads((tmp_path / "whole" / "train_log.json").read_text())
    assert set(log["heldout_metrics"]["heldout_frames"]) >= {"identity_retrieval", "colors_accuracy", "shape_accuracy"}
    assert set(log["heldout_metrics"]["real_renders"]) >= {"identity_accuracy", "color_accuracy", "shape_accuracy"}
    embeddings, predicted = judge.judge([Image.new("RGB", (40, 40), COLOR_VALUES["red"])] * 2)
    assert embeddings.shape == (2, judge.config.embedding_dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))
    assert set(predicted) == {"shape", "texture", "colors"}
    # A red image with no object on it: the palette reading finds only the background's colour.
    assert predicted["colors"] == [("red",), ("red",)]
    with pytest.raises(FileNotFoundError, match="WorldJudge"):
        load_world_judge(tmp_path / "missing")

    # Cut off after step 2 (the periodic checkpoint), then the same command again: the same weights.
    def stop_at_step_3(message: str) -> None:
        if message.startswith("[judge] step 3/"):
            raise KeyboardInterrupt

    cut = TrainJudgeConfig(output_dir=str(tmp_path / "cut"), checkpoint_every=2, log_every=1, **settings)
    with pytest.raises(KeyboardInterrupt):
        train_judge(cut, log=stop_at_step_3)
    train_judge(cut, log=lambda message: None)
    resumed = load_world_judge(tmp_path / "cut")
    for (name, value), other in zip(judge.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(value, other), name


# ----------------------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------------------


def test_evaluation_prompts_cover_backgrounds_and_end_each_subject_with_a_sketch(world):
    prompts = evaluation_prompts(world, scenes_per_subject=4)
    assert prompts == evaluation_prompts(world, scenes_per_subject=4)
    assert len(prompts) == 40 and len({p.seed for p in prompts}) == 40
    for subject_id in world.splits["heldout"]:
        own = [p for p in prompts if p.subject_id == subject_id]
        assert [p.style for p in own] == ["photo", "photo", "photo", "sketch"]
        assert own[-1].prompt.startswith("a sketch of")
        assert world.subjects[subject_id].description in own[0].prompt
    counts = Counter(p.background for p in prompts)
    assert set(counts) == {b.name for b in BACKGROUNDS} and max(counts.values()) - min(counts.values()) <= 1
    assert len(evaluation_prompts(world, num_subjects=2)) == 8
    with pytest.raises(ValueError, match="scenes_per_subject >= 2"):
        evaluation_prompts(world, scenes_per_subject=1)


def test_reference_is_the_segmented_subject_on_white(world):
    subject_id = world.splits["heldout"][0]
    reference = np.asarray(world.reference_image(subject_id))
    assert reference.shape[0] == reference.shape[1]
    assert (reference[0] == 255).all() and (reference[-1] == 255).all()  # margins are white, no background


def test_scale_zero_generates_what_the_base_model_does(world, judge, gallery):
    pipe = load_synthetic_base()
    prompts = evaluation_prompts(world, num_subjects=2, scenes_per_subject=2)
    plain = generate_world_images(pipe, world, prompts, num_inference_steps=2, use_subject=False)
    config = world_training_config(world.split_dir("train"), "unused", max_train_steps=1)
    adapter = CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, **adapter_kwargs(config))
    load_customcontrast(pipe, adapter)
    scored = evaluate_on_world(pipe, world, (0.0, 1.0), prompts, judge, gallery, num_inference_steps=2)
    assert [np.asarray(i).tolist() for i in scored[0.0][1]] == [np.asarray(i).tolist() for i in plain]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(scored[1.0][1], plain))
    assert scored[1.0][0].num_images == 4


# ----------------------------------------------------------------------------------------------------------------
# Recipe, report helpers
# ----------------------------------------------------------------------------------------------------------------


def test_ablations_switch_the_papers_terms(tmp_path: Path):
    configs = {name: world_training_config(tmp_path, tmp_path, **o).validate() for name, o in ABLATIONS.items()}
    terms = {name: (c.self_reconstruction, c.use_cscl, c.use_macl, c.use_location) for name, c in configs.items()}
    assert terms == {
        "self_reconstruction": (True, False, False, False),
        "cross_frame": (False, False, False, False),
        "cross_frame+cscl": (False, True, False, False),
        "cross_frame+macl": (False, False, True, False),
        "cross_frame+location": (False, False, False, True),
        "full": (False, True, True, True),
        "full (MACL: soft targets)": (False, True, True, True),
    }
    assert configs["full (MACL: soft targets)"].macl_appearance_scaling == "soft_targets"
    assert configs["full"].macl_appearance_scaling == "similarity"
    assert len({(c.max_train_steps, c.learning_rate, c.train_batch_size, c.seed) for c in configs.values()}) == 1


def test_runs_train_on_the_base_model_they_are_scored_on(world, tmp_path: Path):
    """``--base_model`` is the model every run trains on, not only the one it generates with."""
    settings = benchmark.BenchmarkSettings.smoke(tmp_path)
    shipped = settings.training_config(world, "full", ABLATIONS["full"], seed=1)
    assert Path(shipped.pretrained_model_name_or_path) == settings.base_model
    settings.base_model = tmp_path / "another-base"
    config = settings.training_config(world, "full", ABLATIONS["full"], seed=1)
    assert Path(config.pretrained_model_name_or_path) == tmp_path / "another-base"
    assert (config.seed, config.max_train_steps, config.train_batch_size) == (1, 2, 4)


def test_report_helpers():
    assert smoothed([1.0, 3.0, 5.0, 7.0], window=2).tolist() == [1.0, 2.0, 4.0, 6.0]
    table = scores_table([("run a", {"subject_similarity": 0.5, "controllability": float("nan")})])
    assert "| run a | 0.500 | - | - |" in table


# ----------------------------------------------------------------------------------------------------------------
# The demo and the benchmark, end to end (smoke sizes)
# ----------------------------------------------------------------------------------------------------------------


def test_demo_trains_generates_and_reports(tmp_path: Path):
    report = demo_module.main(["--smoke", "--output_dir", str(tmp_path)])
    assert {p.name for p in report.iterdir()} == {"grid.png", "loss_curves.png", "metrics.json", "report.md"}
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["unload_restores_base"] is True and metrics["train_steps"] == 2
    assert list(metrics["rows"]) == [
        "base model, no subject (scale 0)",
        "base model, colours named in the prompt",
        "CustomContrast (scale 1)",
        "autoencoder reconstructions (ceiling of the UNet)",
        "real renders (upper bound)",
    ]
    assert metrics["rows"]["real renders (upper bound)"]["controllability"] == 1.0
    report_text = (report / "report.md").read_text()
    assert "| autoencoder reconstructions (ceiling of the UNet) |" in report_text
    assert (tmp_path / "adapter" / "config.json").is_file()
    assert Image.open(report / "grid.png").size[0] > 64 * 3


def test_the_demo_command_runs_as_the_readme_starts_it(tmp_path: Path):
    """``python -m customcontrast_world.demo`` (what ``make demo`` runs) as a process, at smoke size."""
    command = [sys.executable, "-m", "customcontrast_world.demo", "--smoke", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[4/4] Writing the report" in result.stderr and (tmp_path / "report" / "report.md").is_file()


def test_demo_pretrained_without_an_adapter_folder_says_so_before_any_work(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stopped:
        demo_module.main(["--pretrained", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "--pretrained expects an adapter folder holding config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_benchmark_smoke_runs_seeds_with_intervals_and_resumes(tmp_path: Path, monkeypatch):
    results = benchmark.main(["--smoke", "--output_dir", str(tmp_path), "--variants", "self_reconstruction,full"])
    assert results["seeds"] == 2 and set(results["runs"]) == {"self_reconstruction", "full"}
    metrics = {"identity_acc", "shape_acc", "colour_acc", "texture_acc", "controllability", "similarity"}
    rows = ("base_model", "base_model_colours_named", "real_renders")
    assert list(results["ceilings"]) == ["real_renders", "autoencoder", "base_model", "base_model_colours_named"]
    for row in (results["runs"]["full"], *(results[name] for name in rows), *results["ceilings"].values()):
        assert metrics <= set(row)
        for name in metrics:
            assert row[name]["low"] <= row[name]["mean"] <= row[name]["high"], name
    assert results["real_renders"]["controllability"]["mean"] == 1.0
    assert 0.0 <= results["runs"]["full"]["s_plus_retrieval"]["mean"] <= 1.0
    assert len(results["runs"]["full"]["s_plus_retrieval_per_layer"]) == 7
    assert [p["scale"] for p in results["sweeps"]["full"]] == [0.5, 1.0]
    assert "loss_cscl" in results["runs"]["full"] and "loss_cscl" not in results["runs"]["self_reconstruction"]
    for name in ("results.json", "results.md", "tradeoff.png", "loss_curves.png", "samples.png"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "results.md").read_text()
    assert "| self_reconstruction |" in report
    assert "| S+ retrieval per layer | layer 0 |" in report and "layer 6 |" in report and "layer 7 |" not in report

    # A second invocation reuses the stored runs and trains only the new one (once per seed).
    trained = []
    real_train = benchmark.train
    monkeypatch.setattr(benchmark, "train", lambda config: trained.append(config.output_dir) or real_train(config))
    again = benchmark.main(
        ["--smoke", "--output_dir", str(tmp_path), "--variants", "self_reconstruction,full", "--loss_weights", "0.5"]
    )
    assert sorted(Path(p).parent.name for p in trained) == ["full_lambda_0.5"] * 2
    assert again["runs"]["full"] == results["runs"]["full"]

    # A run cut short (its loss history incomplete) is trained again, even though older weights are there.
    history = tmp_path / "runs" / "full" / "seed_0" / "loss_history.jsonl"
    history.write_text(history.read_text().splitlines()[0] + "\n")
    trained.clear()
    benchmark.main(["--smoke", "--output_dir", str(tmp_path), "--variants", "full"])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in trained] == ["runs/full/seed_0"]


def _pool_workers(pid: int) -> list[int]:
    """The multiprocessing pool workers whose parent is ``pid`` (read from /proc; the resource tracker is not one)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie's cmdline reads empty)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_sigterm_to_the_benchmark_stops_its_worker_processes_too(tmp_path: Path):
    command = [sys.executable, "-m", "customcontrast_world.benchmark", "--smoke", "--workers", "2"]
    proc = subprocess.Popen(
        [*command, "--output_dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while len(workers := _pool_workers(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and len(workers) == 2, "the smoke benchmark's two workers were never seen"
    time.sleep(2)  # the workers are importing or at work: a stop must reach them either way
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"Stopped on SIGTERM; run the same command again to resume." in stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "worker processes went on after the benchmark stopped"


def test_the_documented_benchmark_results_cover_every_run_with_three_seeds_and_intervals():
    """docs/world_benchmark/results.json is what docs/world_benchmark.md's tables are written from."""
    results = json.loads((Path(__file__).parent.parent / "docs" / "world_benchmark" / "results.json").read_text())
    assert results["seeds"] == 3 and set(results["runs"]) == set(ABLATIONS)
    metrics = ("identity_acc", "shape_acc", "colour_acc", "texture_acc", "controllability", "similarity")
    for row in (*results["runs"].values(), results["real_renders"], results["base_model"]):
        for name in metrics:
            assert row[name]["low"] <= row[name]["mean"] <= row[name]["high"], name
    assert {"self_reconstruction", "full"} <= set(results["sweeps"])
    assert list(results["ceilings"]) == ["real_renders", "autoencoder", "base_model", "base_model_colours_named"]
    for stage in results["ceilings"].values():
        for name in metrics:
            assert stage[name]["low"] <= stage[name]["mean"] <= stage[name]["high"], name
        assert all(0.0 <= v <= 1.0 for v in stage["shape_acc_per_class"].values())
