"""Tests of diffusers_customcontrast.data: subject formats, triplet sampling, the batch sampler, synthetic subjects."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffusers_customcontrast.data import (
    Frame,
    ImageReadError,
    SubjectIndex,
    SubjectTripletDataset,
    UniqueSubjectBatchSampler,
    collate_triplets,
    load_hf_subjects,
    load_subject_folder,
    load_subject_manifest,
    load_subjects,
    make_subject,
    render_frame,
    write_synthetic_dataset,
)
from diffusers_customcontrast.data.synthetic import BACKGROUND_BY_NAME, SHAPES, make_distinct_subjects

SIZE = 32  # small images keep the tests fast


def _item_kwargs(**overrides):
    return {"resolution": SIZE, "reference_size": 24, **overrides}


def _color_frame(color: tuple[int, int, int], size: int = 40) -> tuple[Image.Image, Image.Image]:
    """A ``color`` square (the subject, with its mask) in the middle of a noisy blue scene."""
    rng = np.random.default_rng(sum(color))
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 2] = rng.integers(150, 255, size=(size, size))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[10:30, 12:28] = 255
    pixels[mask > 0] = color
    return Image.fromarray(pixels), Image.fromarray(mask, mode="L")


def _write_color_subject(root: Path, subject_id: str, colors, with_masks: bool = True) -> None:
    """A folder-form subject whose frames differ by the subject's colour (so a crop tells which frame it is)."""
    subject_dir = root / subject_id
    (subject_dir / "masks").mkdir(parents=True)
    (subject_dir / "subject.json").write_text(json.dumps({"class_name": "box"}))
    for n, color in enumerate(colors):
        image, mask = _color_frame(color)
        image.save(subject_dir / f"f{n}.png")
        if with_masks:
            mask.save(subject_dir / "masks" / f"f{n}.png")


FRAME_COLORS = [(255, 0, 0), (0, 255, 0), (255, 255, 0), (255, 0, 255)]


def _frame_of(reference: torch.Tensor) -> int:
    """Which FRAME_COLORS frame a reference crop shows (its darkest-channel signature away from white)."""
    pixels = reference.reshape(3, -1)
    subject = pixels[:, pixels.min(dim=0).values < 0.5].mean(dim=1)
    distances = [float((subject - torch.tensor(c) / 255).abs().sum()) for c in FRAME_COLORS]
    return int(np.argmin(distances))


@pytest.fixture
def synthetic_root(tmp_path: Path) -> Path:
    return write_synthetic_dataset(tmp_path / "synthetic", num_subjects=8, frames_per_subject=4, size=SIZE, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic subjects
# ----------------------------------------------------------------------------------------------------------------


def test_synthetic_round_trip_through_folder_form(tmp_path: Path):
    start = time.perf_counter()
    root = write_synthetic_dataset(tmp_path / "world", num_subjects=8, frames_per_subject=4, size=64, seed=0)
    assert time.perf_counter() - start < 1.0

    index = load_subject_folder(root)
    assert len(index) == 8 and index.num_frames == 32
    for subject_id in index:
        meta = json.loads((root / subject_id / "subject.json").read_text())
        assert meta["shape"] in SHAPES
        for frame in index[subject_id]:
            assert frame.has_mask and frame.class_name == meta["class_name"] == meta["shape"]
            assert frame.caption == Path(frame.image).with_suffix(".txt").read_text().strip()
            assert meta["shape"] in frame.caption
            assert frame.load_image().size == (64, 64) and frame.load_mask().mode == "L"
    identities = {make_subject_identity(root / s) for s in index}
    assert len(identities) == 8, "subjects must be visually distinct"


def make_subject_identity(subject_dir: Path) -> tuple:
    meta = json.loads((subject_dir / "subject.json").read_text())
    colors = (meta["color"],) if meta["texture"] == "solid" else (meta["color"], meta["secondary_color"])
    return (meta["shape"], meta["texture"], *colors)


def test_synthetic_dataset_is_deterministic(tmp_path: Path):
    a = write_synthetic_dataset(tmp_path / "a", num_subjects=3, frames_per_subject=2, size=SIZE, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", num_subjects=3, frames_per_subject=2, size=SIZE, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_render_frame_mask_is_exact_and_caption_names_subject_and_scene():
    subject = make_subject(3)
    assert make_subject(3) == subject and subject.class_name == subject.shape
    image, mask, caption = render_frame(subject, np.random.default_rng(0), size=48, background="grass")
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (48, 48)
    inside = np.asarray(mask) > 127
    assert set(np.unique(np.asarray(mask))) <= {0, 255} and 0 < inside.sum() < inside.size
    # Outside the mask: the untouched background gradient; inside: only the subject's colours.
    pixels = np.asarray(image)
    grass = BACKGROUND_BY_NAME["grass"]
    top_row_outside = pixels[0][~inside[0]]
    assert np.all(top_row_outside == grass.top)
    from diffusers_customcontrast.data.synthetic import COLOR_VALUES

    allowed = {COLOR_VALUES[c] for c in subject.visible_colors}
    assert {tuple(p) for p in pixels[inside]} <= allowed
    assert caption.endswith("on grass") and subject.shape in caption
    with pytest.raises(ValueError, match="expected a background"):
        render_frame(subject, 0, background="moon")


def test_distinct_subjects_cover_all_shapes_eventually():
    subjects = make_distinct_subjects(60, seed=1)
    assert len({s.identity for s in subjects}) == 60
    assert {s.shape for s in subjects} == set(SHAPES)


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------


def test_folder_captions_templates_and_missing_masks(tmp_path: Path):
    _write_color_subject(tmp_path, "mug", FRAME_COLORS[:2], with_masks=False)
    (tmp_path / "mug" / "f0.txt").write_text("a {class_name} on a table\n")
    (tmp_path / "mug" / "caption.txt").write_text("a sks {class_name}")
    (tmp_path / "mug" / "notes.md").write_text("not a frame")
    (tmp_path / ".cache").mkdir()
    index = load_subjects(tmp_path)
    frames = index["mug"]
    assert [f.caption for f in frames] == ["a box on a table", "a sks box"]
    assert not any(f.has_mask for f in frames) and frames[0].load_mask() is None


def test_folder_default_caption_and_class_from_folder_name(tmp_path: Path):
    subject_dir = tmp_path / "red_backpack"
    subject_dir.mkdir()
    _color_frame((255, 0, 0))[0].save(subject_dir / "a.jpg")
    (frame,) = load_subject_folder(tmp_path)["red_backpack"]
    assert frame.class_name == "red backpack" and frame.caption == "a photo of a red backpack"


def test_empty_and_malformed_folders_raise_clear_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="expected subject folders .* got no frame"):
        load_subject_folder(tmp_path)
    (tmp_path / "empty_subject").mkdir()
    with pytest.raises(ValueError, match="expected subject folders"):
        load_subjects(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_subjects(tmp_path / "missing")
    _write_color_subject(tmp_path, "s", FRAME_COLORS[:1])
    (tmp_path / "s" / "subject.json").write_text('{"name": "box"}')
    with pytest.raises(ValueError, match="class_name"):
        load_subject_folder(tmp_path)
    with pytest.raises(ValueError, match="expected a subject folder, a .jsonl manifest"):
        load_subjects(42)


def test_manifest_form(tmp_path: Path):
    (tmp_path / "img").mkdir()
    lines = []
    for n, color in enumerate(FRAME_COLORS[:3]):
        image, mask = _color_frame(color)
        image.save(tmp_path / "img" / f"{n}.png")
        mask.save(tmp_path / "img" / f"{n}_mask.png")
        subject = "cat" if n < 2 else "vase"
        line = {"subject_id": subject, "image": f"img/{n}.png", "caption": f"frame {n}"}
        if n == 0:
            line |= {"mask": f"img/{n}_mask.png", "class_name": "cat"}
        lines.append(json.dumps(line))
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")

    index = load_subjects(manifest)
    assert index.subject_ids == ("cat", "vase") and len(index["cat"]) == 2
    assert [f.has_mask for f in index["cat"]] == [True, False]
    assert index["cat"][1].class_name == "cat", "class_name given on one line applies to the subject"
    assert index["vase"][0].class_name == "vase" and index["vase"][0].caption == "frame 2"
    assert np.asarray(index["cat"][0].load_image())[20, 20].tolist() == list(FRAME_COLORS[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty manifest"),
        ("{not json}\n", "line 1, got invalid JSON|line 1"),
        ('{"subject_id": "a"}\n', 'expected keys "subject_id" and "image"'),
        ('["a", "b"]\n', "expected a JSON object"),
        ('{"subject_id": "a", "image": 3}\n', 'expected a string for "image"'),
    ],
)
def test_malformed_manifest_raises_clear_errors(tmp_path: Path, content: str, message: str):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_subject_manifest(manifest)


def test_manifest_missing_image_names_the_file(tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"subject_id": "a", "image": "nope.png"}\n')
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_subject_manifest(manifest)


def _hf_dataset(**column_names):
    datasets = pytest.importorskip("datasets")
    names = {"subject": "subject_id", "image": "image", "mask": "mask", "caption": "caption", **column_names}
    images, masks = zip(*(_color_frame(c) for c in FRAME_COLORS[:3]))
    features = datasets.Features(
        {
            names["subject"]: datasets.Value("string"),
            names["image"]: datasets.Image(),
            names["mask"]: datasets.Image(),
            names["caption"]: datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            names["subject"]: ["dog", "dog", "car"],
            names["image"]: list(images),
            names["mask"]: [masks[0], None, masks[2]],
            names["caption"]: ["a dog", None, "a car"],
        },
        features=features,
    )


def test_hf_datasets_form():
    index = load_subjects(_hf_dataset())
    assert index.subject_ids == ("dog", "car")
    assert [f.has_mask for f in index["dog"]] == [True, False]
    assert index["dog"][1].caption == "a photo of a dog", "a missing caption falls back to the template"
    assert np.asarray(index["car"][0].load_image())[20, 20].tolist() == list(FRAME_COLORS[2])
    assert index["dog"][0].load_mask().mode == "L"

    custom = _hf_dataset(subject="sid", image="pixels", mask="seg", caption="text")
    index = load_hf_subjects(
        custom, subject_column="sid", image_column="pixels", mask_column="seg", caption_column="text"
    )
    assert len(index) == 2 and index["car"][0].caption == "a car"
    item = SubjectTripletDataset(index, **_item_kwargs())[0]
    assert item["target"].shape == (3, SIZE, SIZE) and bool(item["has_mask"])


def test_hf_datasets_errors():
    dataset = _hf_dataset()
    with pytest.raises(ValueError, match="expected a subject column 'sid'"):
        load_hf_subjects(dataset, subject_column="sid")
    with pytest.raises(ValueError, match="expected a mask column 'segmentation'"):
        load_hf_subjects(dataset, mask_column="segmentation")
    with pytest.raises(ValueError, match="empty dataset"):
        load_hf_subjects(dataset.select([]))
    with pytest.raises(TypeError, match="only apply to a datasets.Dataset"):
        load_subjects("somewhere", subject_column="sid")


def test_unreadable_image_error_names_the_file(tmp_path: Path):
    _write_color_subject(tmp_path, "s", FRAME_COLORS[:2])
    (tmp_path / "s" / "f1.png").write_bytes(b"definitely not a png")
    dataset = SubjectTripletDataset(tmp_path, **_item_kwargs(), self_reconstruction=True)
    frames = load_subject_folder(tmp_path)["s"]
    with pytest.raises(ImageReadError, match="f1.png"):
        frames[1].load_image()
    with pytest.raises(ImageReadError, match="f1.png"):
        for index in range(8):  # some draw uses frame 1
            dataset[index]


# ----------------------------------------------------------------------------------------------------------------
# Triplets
# ----------------------------------------------------------------------------------------------------------------


def test_item_shapes_and_ranges(synthetic_root: Path):
    dataset = SubjectTripletDataset(synthetic_root, resolution=SIZE, reference_size=24)
    assert len(dataset) == 8
    item = dataset[3]
    assert item["reference"].shape == item["positive"].shape == (3, 24, 24)
    assert item["target"].shape == (3, SIZE, SIZE) and item["target_mask"].shape == (1, SIZE, SIZE)
    for key in ("reference", "positive"):
        assert item[key].dtype == torch.float32 and item[key].min() >= 0 and item[key].max() <= 1
    assert item["target"].min() >= -1 and item["target"].max() <= 1 and item["target"].min() < 0
    assert set(item["target_mask"].unique().tolist()) == {0.0, 1.0}
    assert item["has_mask"].dtype == torch.bool and bool(item["has_mask"])
    assert item["subject_index"] == 3 and item["subject_id"] == "subject_003"
    frame = dataset.index["subject_003"][int(item["frame_indices"][2])]
    assert item["caption"] == frame.caption and item["class_name"] == frame.class_name


def test_target_mask_follows_target_geometry(tmp_path: Path):
    _write_color_subject(tmp_path, "s", FRAME_COLORS[:2])
    item = SubjectTripletDataset(tmp_path, resolution=20, reference_size=24)[0]
    expected = np.zeros((40, 40), dtype=np.float32)
    expected[10:30, 12:28] = 1
    expected = expected[::2, ::2]  # 40 -> 20 px, no crop (square frames)
    assert np.abs(item["target_mask"][0].numpy() - expected).sum() <= 8  # bilinear edge pixels at most


def test_reference_is_segmented_on_white(tmp_path: Path):
    _write_color_subject(tmp_path, "s", FRAME_COLORS[:2])
    dataset = SubjectTripletDataset(tmp_path, **_item_kwargs(reference_size=48))
    for epoch in range(3):
        dataset.set_epoch(epoch)
        item = dataset[0]
        for key in ("reference", "positive"):
            image = item[key]
            # Red / green subject on white: the blue scene never leaks (blue would lower red or green to ~0).
            assert float(image[:2].max(dim=0).values.min()) > 0.9, key
        # The margin around the subject crop is white.
        assert torch.all(item["reference"][:, :2, :] == 1) and torch.all(item["reference"][:, :, :2] == 1)


def test_reference_and_target_are_different_frames(tmp_path: Path):
    _write_color_subject(tmp_path, "s", FRAME_COLORS)
    dataset = SubjectTripletDataset(tmp_path, **_item_kwargs())
    seen_targets = set()
    for index in range(12):
        item = dataset[index]
        reference, positive, target = item["frame_indices"].tolist()
        assert reference != target and reference != positive
        assert _frame_of(item["reference"]) == reference, "the reference shows frame j"
        target_color = ((item["target"][:, 15, 16] + 1) / 2 * 255).round().tolist()
        assert target_color == list(FRAME_COLORS[target]), "the target shows frame k"
        seen_targets.add(target)
    assert len(seen_targets) > 1


def test_self_reconstruction_uses_the_reference_frame(tmp_path: Path):
    _write_color_subject(tmp_path, "s", FRAME_COLORS)
    dataset = SubjectTripletDataset(tmp_path, **_item_kwargs(), self_reconstruction=True)
    for index in range(8):
        item = dataset[index]
        reference, positive, target = item["frame_indices"].tolist()
        assert reference == positive == target
        target_color = ((item["target"][:, 15, 16] + 1) / 2 * 255).round().tolist()
        assert target_color == list(FRAME_COLORS[reference]) and _frame_of(item["reference"]) == reference


def test_one_frame_subject_still_gets_a_positive(tmp_path: Path):
    _write_color_subject(tmp_path, "single", FRAME_COLORS[:1])
    dataset = SubjectTripletDataset(tmp_path, **_item_kwargs(), positive_scale=(0.5, 0.6))
    item = dataset[0]
    assert item["frame_indices"].tolist() == [0, 0, 0]
    assert item["positive"].shape == item["reference"].shape
    assert not torch.equal(item["positive"], item["reference"]), "the positive is an augmented view"


def test_frame_without_mask(tmp_path: Path):
    _write_color_subject(tmp_path, "s", FRAME_COLORS[:2], with_masks=False)
    item = SubjectTripletDataset(tmp_path, **_item_kwargs())[0]
    assert not bool(item["has_mask"]) and torch.all(item["target_mask"] == 0)
    # Unsegmented: the blue scene is in the reference.
    assert float(item["reference"][2].mean()) > 0.5 and float(item["reference"][0].min()) < 0.1


def test_same_seed_epoch_index_gives_same_item_and_epochs_differ(synthetic_root: Path):
    a = SubjectTripletDataset(synthetic_root, **_item_kwargs(), seed=7)
    b = SubjectTripletDataset(synthetic_root, **_item_kwargs(), seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for index in (5, 0, 5):  # access order does not matter
        x, y = a[index], b[index]
        assert all(torch.equal(x[k], y[k]) for k in ("reference", "positive", "target", "target_mask"))
    draws = {epoch: [a.draw(i) for i in range(len(a))] for epoch in range(3) if a.set_epoch(epoch) is None}
    assert draws[0] != draws[1] != draws[2]
    a.set_epoch(1)
    assert a.draw(3) == draws[1][3]
    assert a.draw(3) != a.draw(3 + len(a)), "indices past len() are further draws of the same subject"
    assert a[3 + len(a)]["subject_index"] == 3


def test_epoch_reaches_persistent_workers(synthetic_root: Path):
    dataset = SubjectTripletDataset(synthetic_root, **_item_kwargs())
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_triplets, num_workers=1, persistent_workers=True)
    per_epoch = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        per_epoch.append(torch.cat([batch["frame_indices"] for batch in loader]))
        expected = torch.stack([dataset[i]["frame_indices"] for i in range(len(dataset))])
        assert torch.equal(per_epoch[-1], expected)
    assert not torch.equal(per_epoch[0], per_epoch[1])


def test_collate_and_dataloader_with_unique_subject_batches(synthetic_root: Path):
    dataset = SubjectTripletDataset(synthetic_root, **_item_kwargs())
    sampler = UniqueSubjectBatchSampler(dataset, batch_size=3, repeats_per_epoch=2, drop_last=True, seed=1)
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_triplets))
    assert len(batches) == len(sampler) == 5
    batch = batches[0]
    assert batch["reference"].shape == (3, 3, 24, 24) and batch["target"].shape == (3, 3, SIZE, SIZE)
    assert batch["has_mask"].shape == (3,) and batch["subject_index"].dtype == torch.long
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 3
    for batch in batches:
        assert len(set(batch["subject_index"].tolist())) == 3


# ----------------------------------------------------------------------------------------------------------------
# Batch sampler
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_subjects", "batch_size", "repeats", "drop_last"),
    [(8, 3, 1, False), (8, 3, 1, True), (7, 4, 3, False), (5, 5, 4, True), (10, 4, 5, False), (6, 1, 2, False)],
)
def test_batch_sampler_unique_subjects_and_coverage(num_subjects, batch_size, repeats, drop_last):
    sampler = UniqueSubjectBatchSampler(
        num_subjects, batch_size, repeats_per_epoch=repeats, drop_last=drop_last, seed=3
    )
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        counts = np.zeros(num_subjects, dtype=int)
        for batch in batches:
            subjects = [index % num_subjects for index in batch]
            assert len(set(subjects)) == len(subjects), f"subject repeated in {batch}"
            assert len(batch) == batch_size or (not drop_last and batch is batches[-1])
            np.add.at(counts, subjects, 1)
        all_indices = [index for batch in batches for index in batch]
        assert len(set(all_indices)) == len(all_indices), "each occurrence is a distinct draw"
        if not drop_last:
            assert np.all(counts == repeats), "every subject appears repeats_per_epoch times"
        else:
            assert counts.sum() == len(batches) * batch_size and counts.max() <= repeats


def test_batch_sampler_is_deterministic_per_seed_and_epoch():
    def batches(seed, epoch):
        sampler = UniqueSubjectBatchSampler(20, 4, repeats_per_epoch=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2)
    assert batches(0, 1) != batches(1, 1)
    ordered = UniqueSubjectBatchSampler(6, 3, shuffle=False)
    assert list(ordered) == [[0, 1, 2], [3, 4, 5]]


def test_batch_sampler_rejects_impossible_batches():
    with pytest.raises(ValueError, match="batch_size <= number of subjects"):
        UniqueSubjectBatchSampler(3, 4)
    with pytest.raises(ValueError, match="repeats_per_epoch >= 1"):
        UniqueSubjectBatchSampler(3, 2, repeats_per_epoch=0)


def test_subject_index_validation():
    with pytest.raises(ValueError, match="expected at least one subject"):
        SubjectIndex({})
    with pytest.raises(ValueError, match="at least one frame per subject"):
        SubjectIndex({"a": []})
    image = Image.new("RGB", (8, 8), "red")
    index = SubjectIndex({"a": [Frame(image, caption="x", class_name="thing")]})
    assert index.class_name("a") == "thing" and index.frames_at(0)[0].load_image() is image


def test_batch_sampler_shards_with_accelerate():
    data_loader = pytest.importorskip("accelerate.data_loader")
    sampler = UniqueSubjectBatchSampler(10, 3, repeats_per_epoch=2, drop_last=True, seed=4)
    sampler.set_epoch(1)
    shards = [data_loader.BatchSamplerShard(sampler, num_processes=2, process_index=rank) for rank in range(2)]
    sharded = [list(shard) for shard in shards]
    assert [len(batches) for batches in sharded] == [len(shard) for shard in shards] == [3, 3]
    interleaved = [batch for pair in zip(*sharded) for batch in pair]
    assert interleaved == list(sampler)[: len(interleaved)]
    assert all(len({index % 10 for index in batch}) == 3 for batch in interleaved)
