"""Tests of customcontrast_world: the synthetic world on disk and the shipped synthetic base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customcontrast_world import WorldSpec, load_world, write_world
from customcontrast_world.base_model import SYNTHETIC_BASE_DIR, load_synthetic_base
from customcontrast_world.evaluate_base import background_distances, nearest_background
from diffusers_customcontrast.data import load_subject_folder
from diffusers_customcontrast.data.synthetic import (
    BACKGROUND_BY_NAME,
    COLOR_VALUES,
    COMPANION_BY_NAME,
    STYLES,
    View,
    caption_for,
    make_subject,
    render_view,
    sample_scene,
)

SMALL = {"num_train_subjects": 6, "num_heldout_subjects": 3, "frames_per_subject": 4, "size": 48, "seed": 3}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    # Frequent companions and sketches, so that a small world has some of each.
    return write_world(tmp_path_factory.mktemp("world"), **SMALL, companion_prob=0.5, sketch_prob=0.3)


# ----------------------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------------------


def test_world_is_deterministic(world, tmp_path: Path):
    again = write_world(tmp_path / "again", **SMALL, companion_prob=0.5, sketch_prob=0.3)
    files = sorted(p.relative_to(world.root) for p in world.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    assert all((world.root / f).read_bytes() == (again.root / f).read_bytes() for f in files)
    other_seed = WorldSpec(**{**SMALL, "seed": 4})
    assert other_seed.subjects != WorldSpec(**SMALL).subjects


def test_heldout_subjects_are_disjoint_from_train(world):
    train, heldout = world.splits["train"], world.splits["heldout"]
    assert len(train) == 6 and len(heldout) == 3 and not set(train) & set(heldout)
    identities = {split: {world.subjects[s].identity for s in ids} for split, ids in world.splits.items()}
    assert not identities["train"] & identities["heldout"], "a held-out subject looks like a train subject"
    assert sorted(p.name for p in world.split_dir("heldout").iterdir()) == sorted(heldout)
    # Growing the train split keeps the held-out subjects.
    bigger = WorldSpec(**{**SMALL, "num_train_subjects": 20})
    assert bigger.subject_ids("heldout") == list(heldout)
    assert [bigger.subjects[s][1] for s in heldout] == [world.subjects[s] for s in heldout]


def test_world_json_describes_vocabularies_and_subjects(world):
    record = json.loads((world.root / "world.json").read_text())
    assert record["spec"]["seed"] == 3
    assert {b["name"] for b in record["vocabularies"]["backgrounds"]} == set(BACKGROUND_BY_NAME)
    assert {c["name"] for c in record["vocabularies"]["companions"]} == set(COMPANION_BY_NAME)
    assert set(record["vocabularies"]["styles"]) == set(STYLES)
    for subject_id, meta in record["subjects"].items():
        assert tuple(meta["identity"]) == world.subjects[subject_id].identity
        assert subject_id in record["splits"][meta["split"]]


def test_masks_are_exactly_the_subject_pixels(world):
    for subject_id in world.subjects:
        reference = world.reference_frame(subject_id)  # a plain photo: exact subject colours
        assert reference.view.brightness == 1.0 and reference.view.companion is None
        assert reference.view.style == "photo"
        pixels = np.asarray(Image.open(reference.image_path))
        inside = np.asarray(Image.open(reference.mask_path)) > 127
        palette = np.array([COLOR_VALUES[c] for c in reference.subject.visible_colors])
        is_subject_colour = (pixels[:, :, None, :] == palette).all(-1).any(-1)
        assert inside.any() and np.array_equal(is_subject_colour, inside)


def test_mask_is_unchanged_by_lighting_second_object_and_style():
    subject = make_subject(11)
    plain = sample_scene(subject, np.random.default_rng(0), companion=None, style="photo")
    _, mask = render_view(subject, plain)
    for companion, style in [("ball", "photo"), ("cone", "sketch"), (None, "sketch")]:
        view = View(plain.rotation, plain.scale, plain.center, plain.background, 0.85, companion, style)
        image, other_mask = render_view(subject, view)
        assert np.array_equal(np.asarray(mask), np.asarray(other_mask))
        if style == "photo":  # subject pixels: the subject's colours under the scene's lighting
            lit = np.round(np.array(COLOR_VALUES[subject.color]) * 0.85)
            pixels = np.asarray(image)[np.asarray(mask) > 0]
            assert (pixels == lit).all(-1).any()


def test_captions_name_the_class_and_the_scene(world):
    seen_companion = seen_sketch = False
    for subject_id in world.subjects:
        for info in world.frames(subject_id):
            caption = Path(info.image_path).with_suffix(".txt").read_text().strip()
            assert caption == info.caption
            assert info.subject.shape in caption
            assert BACKGROUND_BY_NAME[info.view.background].phrase in caption
            assert (info.view.companion is not None) == ("next to a" in caption)
            if info.view.companion:
                assert caption.endswith(COMPANION_BY_NAME[info.view.companion].phrase)
            assert (info.view.style == "sketch") == caption.startswith("a sketch of ")
            seen_companion |= info.view.companion is not None
            seen_sketch |= info.view.style == "sketch"
    assert seen_companion and seen_sketch
    assert caption_for("star", "grass", "ball", "sketch") == "a sketch of a star on grass next to a ball"


def test_folder_format_round_trips(world):
    reloaded = load_world(world.root)
    assert reloaded.subjects == world.subjects and reloaded.splits == world.splits and reloaded.spec == world.spec
    for split in ("train", "heldout"):
        index = load_subject_folder(world.split_dir(split))
        assert index.subject_ids == world.splits[split]
        for subject_id in index:
            infos = reloaded.frames(subject_id)
            assert len(index[subject_id]) == len(infos) == SMALL["frames_per_subject"]
            for frame, info in zip(index[subject_id], infos):
                assert reloaded.frame_info(frame.image) == info
                assert frame.caption == info.caption and frame.class_name == info.subject.class_name
                assert Path(frame.mask) == info.mask_path
                # The stored frame is the rendering of its recorded subject and view.
                image, mask = render_view(info.subject, info.view, SMALL["size"])
                assert np.array_equal(np.asarray(frame.load_image()), np.asarray(image))
                assert np.array_equal(np.asarray(frame.load_mask()), np.asarray(mask))


def test_nearest_background_reads_rendered_scenes():
    spec = WorldSpec(num_train_subjects=8, num_heldout_subjects=0, frames_per_subject=4)
    photos = [f for f in spec.iter_frames() if f.view.style == "photo"]
    assert all(nearest_background(f.image) == f.view.background for f in photos)
    assert set(background_distances(photos[0].image)) == set(BACKGROUND_BY_NAME)


# ----------------------------------------------------------------------------------------------------------------
# The shipped base model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_pipe():
    return load_synthetic_base()


def _generate(pipe, prompts: list[str], seed: int = 0, steps: int = 10) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + n) for n in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, generator=generators, output_type="np").images


def test_shipped_checkpoint_is_small_and_loads_offline():
    from diffusers import StableDiffusionPipeline

    files = [p for p in SYNTHETIC_BASE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20  # the bound for the shipped base
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "weights must be safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(SYNTHETIC_BASE_DIR, local_files_only=True)
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    size = pipe.image_encoder.config.image_size
    crop = pipe.feature_extractor.crop_size
    assert (crop["height"], crop["width"]) == (size, size)


def test_base_pipeline_generates_deterministic_finite_images(base_pipe):
    first = _generate(base_pipe, ["a star on grass"], seed=5)
    second = _generate(base_pipe, ["a star on grass"], seed=5)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_prompt_controls_the_background(base_pipe):
    # With the shipped weights every background is right for every seed tried, by 28 RGB units or more at 5 steps.
    prompts = {name: caption_for("circle", name) for name in ("red", "blue", "snow", "night")}
    images = _generate(base_pipe, list(prompts.values()), seed=0)
    found = {name: nearest_background(image) for name, image in zip(prompts, images)}
    assert found == {name: name for name in prompts}
    red, blue = images[0].reshape(-1, 3).mean(0), images[1].reshape(-1, 3).mean(0)
    assert red[0] > red[2] + 0.2 and blue[2] > blue[0] + 0.2


# ----------------------------------------------------------------------------------------------------------------
# The training script
# ----------------------------------------------------------------------------------------------------------------


def test_train_base_writes_a_loadable_pipeline(tmp_path: Path):
    from customcontrast_world.train_base import parse_args, train_base

    config = parse_args(
        [
            "--output_dir", str(tmp_path / "base"), "--steps", "2", "--vae_steps", "2", "--image_encoder_steps", "2",
            "--num_train_subjects", "3", "--num_heldout_subjects", "2", "--frames_per_subject", "3",
            "--vae_batch_size", "2", "--image_encoder_batch_size", "2", "--unet_batch_size", "2", "--threads", "1",
        ]
    )  # fmt: skip
    assert config.unet_steps == 2 and config.stages == ("vae", "image_encoder", "unet")
    train_base(config, log=lambda message: None)
    log = json.loads((tmp_path / "base" / "train_log.json").read_text())
    assert set(log["final_losses"]) >= {"vae/l1", "image_encoder/nce", "unet/mse"}
    pipe = load_synthetic_base(path=tmp_path / "base")
    image = _generate(pipe, ["a star on grass"], steps=2)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_train_base_resumes_exactly_after_sigterm(tmp_path: Path):
    import os
    import signal

    from safetensors.torch import load_file

    from customcontrast_world.resumable import TrainingInterrupted
    from customcontrast_world.train_base import parse_args, train_base

    def config(folder: str):
        return parse_args(
            [
                "--output_dir", str(tmp_path / folder), "--steps", "5", "--vae_steps", "4",
                "--image_encoder_steps", "3", "--num_train_subjects", "3", "--num_heldout_subjects", "2",
                "--frames_per_subject", "3", "--vae_batch_size", "2", "--image_encoder_batch_size", "2",
                "--unet_batch_size", "2", "--checkpoint_every", "2", "--log_every", "1",
            ]
        )  # fmt: skip

    train_base(config("whole"), log=lambda message: None)
    interrupted_at = []

    def terminate_midway(message: str) -> None:
        # SIGTERM in the middle of the VAE stage, and again in the middle of the UNet stage.
        if message.startswith(("[vae] step 3/", "[unet] step 3/")) and message[:5] not in interrupted_at:
            interrupted_at.append(message[:5])
            os.kill(os.getpid(), signal.SIGTERM)

    for _ in range(2):
        with pytest.raises(TrainingInterrupted, match="run the same command again"):
            train_base(config("cut"), log=terminate_midway)
    messages = []
    train_base(config("cut"), log=messages.append)
    assert any("resuming at step 3/5" in m for m in messages)
    assert any("[vae] finished earlier" in m for m in messages)
    for component in ("vae", "image_encoder", "text_encoder", "unet"):
        for weights in (tmp_path / "whole" / component).glob("*.safetensors"):
            whole, cut = load_file(weights), load_file(tmp_path / "cut" / component / weights.name)
            assert all(torch.equal(whole[k], cut[k]) for k in whole), component
    # Other settings cannot continue these checkpoints.
    with pytest.raises(ValueError, match="unet_steps"):
        train_base(parse_args(["--output_dir", str(tmp_path / "cut"), "--steps", "6"]), log=lambda message: None)
