"""Tests of ``diffusers_customcontrast.prepare``: raw videos and photos to a training set, offline.

The subject of every scene is a textured red triangle on a grey, noisy background, so that a deterministic stand-in
masker (:class:`RedMasker`, the :class:`SubjectMasker` interface) finds its exact mask; the transformers models run on
tiny random configs in ``test_prepare_models.py``. Videos are real files written with OpenCV.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from diffusers_customcontrast.data import (
    ShardedSubjectBatchSampler,
    ShardedSubjectIndex,
    SubjectIndex,
    SubjectTripletDataset,
    load_hf_subjects,
    load_subject_folder,
    load_subject_shards,
    load_subjects,
    write_subject_shards,
    write_synthetic_dataset,
)
from diffusers_customcontrast.prepare import (
    FRAME_REASONS,
    InputError,
    PrepareConfig,
    PrepareConfigError,
    SubjectMask,
    border_touch,
    name_class,
    names_class,
    prepare_dataset,
)
from diffusers_customcontrast.prepare.cli import main
from diffusers_customcontrast.prepare.report import MASK_COLOR, _overlay

cv2 = pytest.importorskip("cv2")

SIZE = 64
TEMPLATE = "a photo of a {class_name}"


# --------------------------------------------------------------------------------------------------- scenes


def scene(
    view: float,
    *,
    scale: float = 0.3,
    center: tuple[float, float] | None = None,
    subject: bool = True,
    vertical: bool = False,
    seed: int = 0,
) -> Image.Image:
    """The subject seen from angle ``2 pi view`` (it turns and moves on a circle), on a grey gradient with noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(150, 220, SIZE)
    base = (ramp[:, None] if vertical else ramp[None, :])[..., None] * np.ones((SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(base + rng.integers(-25, 25, (SIZE, SIZE, 1)), 0, 255).astype(np.uint8))
    if not subject:
        return image
    turn = 2 * np.pi * view
    cx, cy = center or (SIZE / 2 + 0.15 * SIZE * np.cos(turn), SIZE / 2 + 0.15 * SIZE * np.sin(turn))
    radius = scale * SIZE
    corners = [
        (cx + radius * np.cos(turn / 3 + k * 2 * np.pi / 3), cy + radius * np.sin(turn / 3 + k * 2 * np.pi / 3))
        for k in range(3)
    ]
    shape = Image.new("L", (SIZE, SIZE))
    ImageDraw.Draw(shape).polygon(corners, fill=255)
    texture = np.stack(
        [rng.integers(190, 256, (SIZE, SIZE)), rng.integers(0, 60, (SIZE, SIZE)), rng.integers(0, 60, (SIZE, SIZE))],
        -1,
    ).astype(np.uint8)
    return Image.composite(Image.fromarray(texture), image, shape)


def red(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image).astype(int)
    return (pixels[..., 0] > 150) & (pixels[..., 1] < 100)


class RedMasker:
    """A deterministic :class:`SubjectMasker`: the red pixels, ``None`` where there is none. Counts its calls."""

    def __init__(self, fail_at_call: int | None = None):
        self.calls = 0
        self.fail_at_call = fail_at_call

    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[SubjectMask | None]:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt  # what a kill does to the run: it stops in the middle of a subject
        return [SubjectMask(red(image), 0.9) if red(image).any() else None for image in images]


class FixedCaptioner:
    """A :class:`Captioner` that gives ``captions`` in turn."""

    def __init__(self, captions: Sequence[str]):
        self.captions = list(captions)

    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[str]:
        return [self.captions[i % len(self.captions)] for i in range(len(images))]


def write_video(path: Path, frames: Sequence[Image.Image]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (SIZE, SIZE))
    for frame in frames:
        writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_videos(folder: Path, count: int, frames: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for subject in range(count):
        write_video(folder / f"toy_{subject}.avi", [scene(f / frames, seed=subject) for f in range(frames)])
    return folder


def config(input: Path, output: Path, **overrides) -> PrepareConfig:
    values = {"class_name": "toy", "max_frames": 4, "caption_template": TEMPLATE, "progress": False}
    return PrepareConfig(input=str(input), output=str(output), **{**values, **overrides})


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes (summary.json without the output path)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name in ("summary.json", "config.json"):
            values = json.loads(data)
            values.pop("output", None)
            values.pop("input", None)
            data = json.dumps(values).encode()
        files[str(path.relative_to(root))] = data
    return files


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_videos(tmp_path_factory.mktemp("videos") / "videos", 3)


# --------------------------------------------------------------------------------------------------- frames


def test_video_frames_cover_the_views_and_skip_blurred_ones(tmp_path):
    frames = [scene(f / 24) for f in range(24)]
    for blurred in (0, 10):
        frames[blurred] = frames[blurred].filter(ImageFilter.GaussianBlur(3))
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "toy.avi", frames)
    summary = prepare_dataset(config(tmp_path / "in", tmp_path / "out", candidates_per_frame=2), masker=RedMasker())

    # 4 stretches of 6 frames, 2 candidates each: frames 0, 3 | 7, 10 | 13, 16 | 20, 23 (evenly spread over 24).
    record = json.loads((tmp_path / "out" / ".prepare" / "records" / "toy.json").read_text())
    origins = [int(frame["origin"].rsplit("=", 1)[1]) for frame in record["frames"]]
    assert origins[:2] == [3, 7]  # the blurred 0 and 10 lose to the other candidate of their stretch
    assert origins[2] in (13, 16) and origins[3] in (20, 23)
    assert summary.frame_drops["blurry"] == 2 and summary.frames_read == 8 and summary.frames_kept == 4
    index = load_subject_folder(tmp_path / "out")
    assert index.subject_ids == ("toy",) and all(frame.has_mask for frame in index["toy"])
    for frame in index["toy"]:  # the written mask is the subject of the written frame
        decoded = np.asarray(frame.load_mask()) > 127
        assert (decoded == red(frame.load_image())).mean() > 0.97  # up to JPEG noise at the edges


def test_each_filter_and_each_bad_input_is_counted(tmp_path):
    people = tmp_path / "collection"
    good, mixed, single, empty = (people / name for name in ("good", "mixed", "single", "empty"))
    for folder in (good, mixed, single, empty):
        folder.mkdir(parents=True)
    for view in range(4):
        scene(view / 4).save(good / f"{view}.png")
    frames = {
        "a_view0": scene(0.0),
        "b_view0_copy": scene(0.0, seed=1),  # the same view again: a near-duplicate
        "c_view1": scene(1 / 3),
        "d_view2": scene(2 / 3),
        "e_blurred": scene(0.5).filter(ImageFilter.GaussianBlur(3)),
        "f_nothing": scene(0.0, subject=False),
        "g_speck": scene(0.0, scale=0.03, vertical=True),
        "h_everything": scene(0.0, scale=1.6, seed=2),
        "i_at_the_border": scene(0.25, center=(3, SIZE / 2), vertical=True, seed=3),
    }
    for name, image in frames.items():
        image.save(mixed / f"{name}.png")
    scene(0.1).save(single / "0.png")
    (single / "corrupt.jpg").write_bytes(b"not a jpeg")
    (single / "notes.txt").write_text("not a photo")

    summary = prepare_dataset(
        config(people, tmp_path / "out", input_kind="photo_folders", max_frames=16), masker=RedMasker()
    )

    assert summary.subjects_found == 4 and summary.subjects_kept == 2
    assert summary.subject_drops == {"unreadable_input": 1, "too_few_frames": 1}
    expected = dict.fromkeys(FRAME_REASONS, 1)
    assert summary.frame_drops == expected  # each filter once (the corrupt file is "unreadable")
    assert summary.frames_kept == 4 + 3
    assert load_subject_folder(tmp_path / "out").subject_ids == ("good", "mixed")
    assert summary.ignored_files == [str(single / "notes.txt")]
    messages = "\n".join(summary.messages)
    assert f"cannot read image file '{single / 'corrupt.jpg'}'" in messages
    assert f"expected .jpg, .jpeg, .png or .webp images in '{empty}', got an empty folder" in messages
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["frame_drops"] == expected and saved["subjects_kept"] == 2
    assert "too_few_frames: 1" in summary.format() and "near_duplicate: 1" in summary.format()


def test_a_corrupt_video_and_other_files_are_reported(tmp_path, videos):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "toy.avi").write_bytes((videos / "toy_0.avi").read_bytes())
    (folder / "broken.mp4").write_bytes(b"\x00garbage" * 64)
    (folder / "readme.txt").write_text("hello")
    summary = prepare_dataset(config(folder, tmp_path / "out"), masker=RedMasker())
    assert summary.subjects_kept == 1 and summary.subject_drops["unreadable_input"] == 1
    assert summary.messages == [
        f"cannot decode any frame of the video '{folder / 'broken.mp4'}': the file is corrupt or in a codec OpenCV "
        "cannot read"
    ]
    assert summary.ignored_files == [str(folder / "readme.txt")]


def test_bad_arguments_get_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--masker", "none"])
    assert "expected a folder or a .jsonl list as input, got" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="got an empty folder"):
        prepare_dataset(config(tmp_path / "empty", tmp_path / "out"))
    with pytest.raises(PrepareConfigError, match="expected min_frames <= max_frames, got min_frames=5 > max_frames=4"):
        prepare_dataset(config(tmp_path / "empty", tmp_path / "out", min_frames=5))
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"subject_id": "a", "video": "a.mp4", "photos": "b"}\n')
    with pytest.raises(InputError, match='expected exactly one of "video", "frames" or "photos"'):
        prepare_dataset(config(listing, tmp_path / "out"))


def test_jsonl_list_and_human_domain(tmp_path, videos):
    photos = tmp_path / "alice"
    photos.mkdir()
    for view in range(3):
        scene(view / 3).save(photos / f"{view}.jpg")
    listing = tmp_path / "list.jsonl"
    listing.write_text(
        json.dumps({"subject_id": "toy", "video": str(videos / "toy_0.avi"), "class_name": "toy"})
        + "\n\n"
        + json.dumps({"photos": "alice"})
        + "\n"
    )
    # Human domain: the class is "person" unless given, the border check is off.
    summary = prepare_dataset(config(listing, tmp_path / "out", domain="human", class_name=None), masker=RedMasker())
    index = load_subject_folder(tmp_path / "out")
    assert index.subject_ids == ("alice", "toy") and summary.subjects_kept == 2
    assert index.class_name("alice") == "person" and index.class_name("toy") == "toy"
    assert index["alice"][0].caption == "a photo of a person"


# --------------------------------------------------------------------------------------------------- captions


def test_captions_name_the_class():
    assert names_class("Two red toys on a table", "toy") and names_class("a teddy  bear", "teddy bear")
    assert not names_class("a toyota car", "toy")
    assert name_class("a red toy on a table", "toy") == ("a red toy on a table", False)
    assert name_class("a red thing", "toy") == ("a photo of a toy, a red thing", True)
    assert name_class("a red thing", "toy", policy="check") == ("a photo of a toy", True)
    assert name_class("", "toy") == ("a photo of a toy", True)


def test_model_captions_are_written_per_frame(tmp_path, videos):
    captioner = FixedCaptioner(["a red toy on the floor", "a blurry red shape"])
    summary = prepare_dataset(
        config(videos, tmp_path / "out", caption_template=None), masker=RedMasker(), captioner=captioner
    )
    index = load_subject_folder(tmp_path / "out")
    assert [frame.caption for frame in index["toy_0"]] == [
        "a red toy on the floor",
        "a photo of a toy, a blurry red shape",
    ] * 2
    assert summary.captions_fixed == 2 * 3 and not (tmp_path / "out" / "toy_0" / "caption.txt").exists()


# --------------------------------------------------------------------------------------------------- output


def test_overlay_tints_and_outlines_the_mask():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 2:6] = 255
    tinted = np.asarray(_overlay(Image.new("RGB", (8, 8), "white"), Image.fromarray(mask))).astype(int)
    assert tinted[0, 0].tolist() == [255, 255, 255]  # outside: untouched
    assert tinted[2, 2].tolist() == list(MASK_COLOR)  # the outline
    assert tinted[3, 3].tolist() == [255, round(0.55 * 255 + 0.45 * 40), round(0.55 * 255 + 0.45 * 40)]


def test_border_touch():
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:7, 0:2] = True
    assert border_touch(mask) == pytest.approx(0.4)  # 4 of the 10 pixels of the left side


def test_folders_and_shards_hold_the_same_data_and_train(tmp_path, videos):
    folders = prepare_dataset(config(videos, tmp_path / "folders"), masker=RedMasker())
    shards = prepare_dataset(
        config(videos, tmp_path / "shards", output_format="shards", subjects_per_shard=1), masker=RedMasker()
    )
    assert folders.frames_kept == shards.frames_kept == 12
    folder_index, shard_index = load_subjects(tmp_path / "folders"), load_subjects(tmp_path / "shards")
    assert isinstance(shard_index, ShardedSubjectIndex) and shard_index.num_shards == 3
    assert sorted(shard_index.subject_ids) == list(folder_index.subject_ids)
    for subject_id in folder_index:
        for a, b in zip(folder_index[subject_id], shard_index[subject_id], strict=True):
            assert a.caption == b.caption == "a photo of a toy"
            assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image()))
            assert np.array_equal(np.asarray(a.load_mask()), np.asarray(b.load_mask()))
    assert not (tmp_path / "shards" / ".prepare" / "subjects").exists()  # packed, then removed
    with Image.open(tmp_path / "shards" / "contact_sheet.jpg") as sheet:
        assert sheet.size == (4 * 128, 3 * (128 + 14))

    # The shards are a plain Hugging Face dataset too, which `datasets` streams.
    datasets = pytest.importorskip("datasets")
    stream = datasets.load_dataset(
        "parquet", data_files=sorted(str(p) for p in (tmp_path / "shards").glob("shard-*.parquet")), split="train",
        streaming=True,
    )  # fmt: skip
    rows = list(stream)
    assert stream.num_shards == 3 and len(rows) == 12
    assert isinstance(rows[0]["image"], Image.Image) and rows[0]["mask"].size == (SIZE, SIZE)

    # The trainer reads the shards: two steps with every loss on (the location loss uses the masks).
    training = pytest.importorskip("diffusers_customcontrast.training")
    from diffusers_customcontrast.testing.tiny_models import TINY_ADAPTER_CONFIG, tiny_sd15_pipeline

    tiny_sd15_pipeline().save_pretrained(tmp_path / "sd15")
    result = training.train(
        training.TrainingConfig.from_dict(
            {
                "pretrained_model_name_or_path": str(tmp_path / "sd15"),
                "train_data": str(tmp_path / "shards"),
                "resolution": 32,
                "train_batch_size": 2,
                "max_train_steps": 2,
                "checkpointing_steps": None,
                "report_to": "none",
                "output_dir": str(tmp_path / "run"),
                **{f"adapter_{key}": value for key, value in TINY_ADAPTER_CONFIG.items()},
            }
        )
    )
    assert result.global_step == 2 and all(np.isfinite(value) for value in result.final_losses.values())
    assert result.final_losses["location"] > 0


def test_a_stopped_run_continues_to_the_same_output(tmp_path, videos):
    reference = prepare_dataset(config(videos, tmp_path / "whole", output_format="shards"), masker=RedMasker())

    # Stopped in the middle of the second subject (one model call per subject here).
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(config(videos, tmp_path / "resumed", output_format="shards"), masker=RedMasker(fail_at_call=2))
    assert (tmp_path / "resumed" / ".prepare" / "records" / "toy_0.json").is_file()
    masker = RedMasker()
    resumed = prepare_dataset(config(videos, tmp_path / "resumed", output_format="shards"), masker=masker)
    assert masker.calls == 2  # toy_0 was finished and is not done again
    assert {**resumed.to_dict(), "output": None} == {**reference.to_dict(), "output": None}
    assert tree(tmp_path / "resumed") == tree(tmp_path / "whole")

    # A subject folder written by a run stopped before its record is written again, to the same files.
    before = tree(tmp_path / "resumed")
    (tmp_path / "resumed" / ".prepare" / "records" / "toy_1.json").unlink()
    masker = RedMasker()
    prepare_dataset(config(videos, tmp_path / "resumed", output_format="shards"), masker=masker)
    assert masker.calls == 1 and tree(tmp_path / "resumed") == before

    with pytest.raises(PrepareConfigError, match="got other values of max_frames: continue with the same settings"):
        prepare_dataset(config(videos, tmp_path / "resumed", output_format="shards", max_frames=5), masker=RedMasker())


# --------------------------------------------------------------------------------------------------- shard sampler


def test_shard_sampler_gives_each_process_its_own_shards():
    # 5 shards of 3, 3, 3, 3 and 2 subjects over 2 processes: the smallest share is 2 shards = 5 subjects.
    shards = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
    sampler = ShardedSubjectBatchSampler(shards, batch_size=2, num_processes=2, repeats_per_epoch=2, seed=3)
    assert len(sampler) == 2 * 2 * 2  # processes x repeats x (5 // 2) batches
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert batches == list(sampler)  # a function of (seed, epoch)
        shares = sampler.process_shards()
        assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3, 4]
        for process in range(2):
            mine = batches[process::2]  # what accelerate's BatchSamplerShard hands to this process
            assert all({shards[i % 14] for i in batch} <= set(shares[process]) for batch in mine)
            for repeat in range(2):
                seen = [i % 14 for batch in mine for i in batch if i // 14 == repeat]
                assert len(seen) == len(set(seen)) == 4
    with pytest.raises(ValueError, match="got 5 shards for 6 processes"):
        ShardedSubjectBatchSampler(shards, batch_size=1, num_processes=6)


def test_write_subject_shards_round_trips_and_appends(tmp_path):
    source = write_synthetic_dataset(tmp_path / "subjects", num_subjects=5, frames_per_subject=2, size=32)
    (source / "subject_001" / "masks" / "frame_01.png").unlink()  # a frame without mask
    first = load_subject_folder(source)
    three = SubjectIndex({subject_id: first[subject_id] for subject_id in first.subject_ids[:3]})
    written = write_subject_shards(three, tmp_path / "shards", subjects_per_shard=2)
    assert [p.name for p in written] == ["shard-00000.parquet", "shard-00001.parquet"]
    before = {p.name: p.read_bytes() for p in written}
    # Again with all five: the three are kept as they are, the two new ones go to a new shard.
    assert [p.name for p in write_subject_shards(source, tmp_path / "shards", subjects_per_shard=2)] == [
        "shard-00002.parquet"
    ]
    assert all((tmp_path / "shards" / name).read_bytes() == data for name, data in before.items())
    shards = load_subject_shards(tmp_path / "shards")
    assert sorted(shards.subject_ids) == list(first.subject_ids) and shards.num_shards == 3
    for subject_id in first:
        for a, b in zip(first[subject_id], shards[subject_id], strict=True):
            assert (a.caption, a.class_name, a.has_mask) == (b.caption, b.class_name, b.has_mask)
            assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image()))
    assert not shards["subject_001"][1].has_mask
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in shards.shard_files], split="train", cache_dir=str(tmp_path / "cache")
    )
    as_dataset = load_hf_subjects(loaded)
    assert sorted(as_dataset.subject_ids) == sorted(shards.subject_ids) and as_dataset.num_frames == 10

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.jsonl").write_text('{"subject_id": "a"}\n')
    with pytest.raises(ValueError, match="expected the keys .* at '.*index.jsonl' line 1"):
        load_subjects(tmp_path / "bad")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from accelerate import Accelerator
from diffusers_customcontrast.data import load_subjects, shards
from diffusers_customcontrast.prepare import prepare_dataset
from diffusers_customcontrast.training import TrainingConfig
from diffusers_customcontrast.training.dataset import build_training_data
from test_prepare import RedMasker, config

torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
output = Path({output!r})
summary = prepare_dataset(config(Path({videos!r}), output, output_format="shards", subjects_per_shard=1),
                          masker=RedMasker(), state=accelerator)
read = set()
original = shards.read_row_group_column
def recording(shard, *args):
    read.add(Path(shard).name)
    return original(shard, *args)
shards.read_row_group_column = recording
data = build_training_data(TrainingConfig.from_dict({{"train_batch_size": 1, "resolution": 32}}),
                           load_subjects(output), reference_size=32)
loader = accelerator.prepare(data.loader)
epochs = []
for epoch in range(2):
    data.set_epoch(epoch)
    epochs.append([subject for batch in loader for subject in batch["subject_id"]])
mine = sorted(record.stem for record in (output / ".prepare" / "records").glob("*.json"))
Path({report!r}.format(accelerator.process_index)).write_text(json.dumps(
    {{"epochs": epochs, "read": sorted(read), "kept": summary.subjects_kept,
      "shards": [[data.sampler.shard_subjects[s] for s in share] for share in data.sampler.process_shards()]}}))
"""


def test_two_accelerate_processes_prepare_and_stream_the_shards(tmp_path):
    videos = write_videos(tmp_path / "videos", 4)
    script = tmp_path / "two_processes.py"
    report = str(tmp_path / "rank-{}.json")
    script.write_text(
        TWO_PROCESS_SCRIPT.format(
            tests=str(Path(__file__).parent), output=str(tmp_path / "out"), videos=str(videos), report=report
        )
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    # The two processes prepared the same output one process makes.
    single = prepare_dataset(
        config(videos, tmp_path / "single", output_format="shards", subjects_per_shard=1), masker=RedMasker()
    )
    assert single.subjects_kept == 4 and tree(tmp_path / "out") == tree(tmp_path / "single")

    ranks = [json.loads(Path(report.format(rank)).read_text()) for rank in range(2)]
    index = load_subjects(tmp_path / "out")
    shard_names = [path.name for path in index.shard_files]
    for epoch in range(2):
        seen = [rank["epochs"][epoch] for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == 2  # 4 subjects in 4 shards: 2 batches of 1 per process
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == 2  # no subject twice in the epoch
    for rank in ranks:
        # Each process read only its own shards (those of its epochs' subjects).
        own = {shard_names[index.subject_shards[index.subject_ids.index(s)]] for e in rank["epochs"] for s in e}
        assert set(rank["read"]) == own and rank["kept"] == 4
    assert set(ranks[0]["read"]) | set(ranks[1]["read"]) <= set(shard_names)


# --------------------------------------------------------------------------------------------------- example


def test_train_on_photos_masks_the_photos_and_keeps_the_location_loss(tmp_path, monkeypatch):
    import runpy

    import yaml

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    main = runpy.run_path(str(examples / "train_on_photos.py"))["main"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for view in range(3):
        scene(view / 3).save(photos / f"IMG_{view}.jpg")
    scene(0.5, subject=False).save(photos / "IMG_empty.jpg")  # the subject is not found: left out
    common = ["--photos", str(photos), "--class_name", "toy", "--adapter", str(tmp_path / "no_adapter"),
              "--output", str(tmp_path / "run"), "--prepare_only", "--device", "cpu"]  # fmt: skip
    run = yaml.safe_load(main(common, masker=RedMasker()).read_text())
    assert run["use_location"] is True and run["use_cscl"] is False and run["use_macl"] is False
    index = load_subject_folder(tmp_path / "run" / "train_data")
    assert len(index["photos"]) == 3 and all(frame.has_mask for frame in index["photos"])
    dataset = SubjectTripletDataset(index, resolution=32, reference_size=32)
    assert bool(dataset[0]["has_mask"]) and dataset[0]["target_mask"].sum() > 0

    # Another caption: the data is prepared again (not resumed with the old settings); without masks, no location loss.
    run = yaml.safe_load(main([*common, "--caption", "my {class_name}", "--no_masks"]).read_text())
    assert run["use_location"] is False
    assert not load_subject_folder(tmp_path / "run" / "train_data")["photos"][0].has_mask
