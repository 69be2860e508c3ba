"""Tests of the DreamBench evaluation: data set reader, generation, metrics, report and CLI.

Everything runs offline on CPU: the metric models are tiny random CLIP / DINO / ImageReward models saved to
temporary folders and loaded back through the real loading code, and the pipeline is a fake that paints images
whose colour depends on the prompt, the reference photo(s), the adapter scale and the generator.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from accelerate import PartialState
from diffusers.loaders import IPAdapterMixin
from PIL import Image

from diffusers_customcontrast.evaluation import cli, report
from diffusers_customcontrast.evaluation.dreambench import (
    EDIT,
    RECONTEXTUALIZATION,
    classify_prompt,
    dreambench_prompts,
    load_dreambench,
    parse_prompts_and_classes,
    parse_references,
)
from diffusers_customcontrast.evaluation.generate import (
    build_jobs,
    generate_dreambench,
    image_seed,
    uses_customcontrast,
)
from diffusers_customcontrast.evaluation.imagereward import ImageRewardScorer
from diffusers_customcontrast.evaluation.manifest import MANIFEST_NAME, read_manifest
from diffusers_customcontrast.evaluation.metrics import (
    DreamBenchScorer,
    dino_preprocess,
    score_generations,
    summarize,
)
from diffusers_customcontrast.evaluation.paper import PAPER_TABLES
from diffusers_customcontrast.evaluation.sweep import scale_sweep
from diffusers_customcontrast.evaluation.tiny import main as tiny_main
from diffusers_customcontrast.evaluation.tiny import save_tiny_evaluation_models, tiny_clip_model, tiny_dino_model
from diffusers_customcontrast.testing.tiny_models import tiny_clip_tokenizer

SAMPLE_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "dreambench_sample"
requires_sample = pytest.mark.skipif(
    not (SAMPLE_ROOT / "dataset" / "prompts_and_classes.txt").is_file(),
    reason=f"DreamBench sample not found at {SAMPLE_ROOT} (google/dreambooth layout with two subjects)",
)

# A prompts file in the google/dreambooth format, with fewer prompts to keep generation tests small.
MINI_PROMPTS_FILE = """Classes

subject_name,class
backpack,backpack
dog,dog
cat,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} with a city in the background'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random CLIP, DINO and ImageReward models, a tiny SD1.5-like pipeline and an adapter."""
    return save_tiny_evaluation_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_dirs: dict[str, Path]) -> tuple[Path, Path]:
    return tiny_dirs["clip"], tiny_dirs["dino"]


@pytest.fixture(scope="session")
def reward_dirs(tiny_dirs: dict[str, Path]) -> tuple[Path, Path]:
    return tiny_dirs["imagereward"], tiny_dirs["imagereward_tokenizer"]


@pytest.fixture(scope="session")
def scorer(tiny_model_dirs: tuple[Path, Path], reward_dirs: tuple[Path, Path]) -> DreamBenchScorer:
    clip_dir, dino_dir = tiny_model_dirs
    reward = ImageRewardScorer.from_pretrained(reward_dirs[0], tokenizer=str(reward_dirs[1]), device="cpu")
    return DreamBenchScorer(clip_dir, dino_dir, image_reward=reward, device="cpu", batch_size=8, local_files_only=True)


def _write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(colour))
    noise = rng.integers(-20, 20, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """A two-subject data set (an object and a live subject) in the google/dreambooth layout."""
    dataset = tmp_path / "dreambooth" / "dataset"
    subjects = {"backpack": [(200, 40, 40), (180, 60, 50)], "dog": [(120, 90, 60), (140, 100, 70), (60, 60, 160)]}
    for name, colours in subjects.items():
        (dataset / name).mkdir(parents=True)
        # Written out of order, to check that the reference image is the first in sorted order.
        for index in reversed(range(len(colours))):
            _write_image(dataset / name / f"{index:02d}.jpg", colours[index], size=(48, 40))
    (dataset / "prompts_and_classes.txt").write_text(MINI_PROMPTS_FILE)
    return tmp_path / "dreambooth"


def _mean_colour(photos: list[Image.Image]) -> np.ndarray:
    return np.mean([np.asarray(photo, dtype=np.float32).reshape(-1, 3).mean(0) for photo in photos], axis=0)


class FakePipeline:
    """Stands in for a diffusers pipeline with an IP-Adapter: paints one flat colour plus seeded noise.

    It takes the subject as diffusers does: ``ip_adapter_image=photo`` or ``ip_adapter_image=[photos]`` (several
    photos for its one adapter), or precomputed ``ip_adapter_image_embeds`` (here: the photos' mean colour, with
    the negative half first under guidance).
    """

    def __init__(self) -> None:
        self.scale = 0.5
        self.calls: list[dict] = []

    def set_ip_adapter_scale(self, scale: float) -> None:
        self.scale = scale

    def __call__(
        self, prompt, num_images_per_prompt, generator, ip_adapter_image=None, ip_adapter_image_embeds=None, **kwargs
    ):
        self.calls.append({"prompt": prompt, "count": num_images_per_prompt, **kwargs})
        assert len(generator) == num_images_per_prompt
        if ip_adapter_image_embeds is not None:
            self.calls[-1]["embeds"] = ip_adapter_image_embeds
            subject_colour = ip_adapter_image_embeds[0][-1].numpy()
        elif isinstance(ip_adapter_image, Image.Image):
            self.calls[-1]["photos"] = 1
            subject_colour = _mean_colour([ip_adapter_image])
        else:
            (photos,) = ip_adapter_image
            self.calls[-1]["photos"] = len(photos)
            subject_colour = _mean_colour(photos)
        prompt_colour = np.frombuffer(prompt.encode()[:3].ljust(3, b"x"), dtype=np.uint8).astype(np.float32)
        base = self.scale * subject_colour + (1 - self.scale) * prompt_colour
        images = []
        for g in generator:
            noise = torch.rand(16, 16, 3, generator=g).numpy() * 30
            images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
        return SimpleNamespace(images=images)


class CustomContrastFakePipeline(FakePipeline):
    """A fake CustomContrast pipeline, with a stand-in for ``encode_customcontrast_subjects`` (issue 14)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode_calls: list[dict] = []

    def set_customcontrast_scale(self, scale: float) -> None:
        self.scale = scale

    def encode_customcontrast_subjects(
        self, subjects, combine="concat", num_images_per_prompt=1, do_classifier_free_guidance=True
    ):
        self.encode_calls.append(
            {
                "subjects": subjects,
                "combine": combine,
                "num_images_per_prompt": num_images_per_prompt,
                "do_classifier_free_guidance": do_classifier_free_guidance,
            }
        )
        colours = torch.stack([torch.from_numpy(_mean_colour(photos)) for photos in subjects])
        return [torch.cat([torch.zeros_like(colours), colours]) if do_classifier_free_guidance else colours]


class StubAccelerator:
    """One rank of a two-process run, splitting with accelerate's own `split_between_processes`."""

    def __init__(self, process_index: int, num_processes: int = 2) -> None:
        self.process_index = process_index
        self.num_processes = num_processes
        self.is_main_process = self.is_local_main_process = process_index == 0

    @contextlib.contextmanager
    def split_between_processes(self, inputs: list, apply_padding: bool = False) -> Iterator[list]:
        with PartialState.split_between_processes(self, inputs, apply_padding) as share:
            yield share

    def wait_for_everyone(self) -> None:
        pass


def _png_states(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in sorted(root.rglob("*.png"))}


# ------------------------------------------------------------------------------------------------ data set


@requires_sample
def test_sample_dataset_subjects_and_prompts() -> None:
    subjects = load_dreambench(SAMPLE_ROOT)
    assert [(s.name, s.class_name, s.is_live) for s in subjects] == [
        ("backpack", "backpack", False),
        ("dog", "dog", True),
    ]
    backpack, dog = subjects
    assert backpack.reference_image_path().name == "00.jpg"
    assert backpack.reference_image_path(2).name == "02.jpg"
    assert list(backpack.image_paths) == sorted(backpack.image_paths)

    kinds = {}
    for subject in subjects:
        prompts = dreambench_prompts(subject)
        assert len(prompts) == 25
        assert all("sks" in p.text and "sks" not in p.clip_text.split() for p in prompts)
        assert all("  " not in p.clip_text and p.clip_text.startswith("a ") for p in prompts)
        assert all(subject.class_name in p.clip_text for p in prompts)
        kinds[subject.name] = [p.kind for p in prompts]
    assert dreambench_prompts(dog)[0].clip_text == "a dog in the jungle"
    # Objects: 20 scenes, then 5 property edits. Live subjects: 10 scenes, 10 accessory/outfit and 5 property edits.
    assert kinds["backpack"] == [RECONTEXTUALIZATION] * 20 + [EDIT] * 5
    assert kinds["dog"] == [RECONTEXTUALIZATION] * 10 + [EDIT] * 15


@requires_sample
def test_sample_dataset_accepts_dataset_folder_and_subset() -> None:
    subjects = load_dreambench(SAMPLE_ROOT / "dataset", subjects=["dog"])
    assert [s.name for s in subjects] == ["dog"]
    with pytest.raises(ValueError, match="not in the DreamBench table"):
        load_dreambench(SAMPLE_ROOT, subjects=["unicorn"])
    with pytest.raises(ValueError, match="without an image folder"):
        load_dreambench(SAMPLE_ROOT, subjects=["cat"])


def test_parse_prompt_file_follows_format_arguments() -> None:
    text = MINI_PROMPTS_FILE.replace(
        "'a {0} {1} in the snow'.format(unique_token, class_token)",
        "'a {0} called {1} in the snow [sic]'.format(class_token, unique_token)",
    )
    spec = parse_prompts_and_classes(text)
    assert spec.class_by_subject == {"backpack": "backpack", "dog": "dog", "cat": "cat"}
    assert spec.live_templates[0] == "a {class_token} called {unique_token} in the snow [sic]"
    assert len(spec.object_templates) == 3
    with pytest.raises(ValueError, match="Live Subject Prompts"):
        parse_prompts_and_classes(text.split("Live Subject Prompts")[0])


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("a {unique_token} {class_token} on top of a purple rug in a forest", RECONTEXTUALIZATION),
        ("a {unique_token} {class_token} floating in an ocean of milk", RECONTEXTUALIZATION),
        ("a {unique_token} {class_token} with the Eiffel Tower in the background", RECONTEXTUALIZATION),
        ("a shiny {unique_token} {class_token}", EDIT),
        ("a cube shaped {unique_token} {class_token}", EDIT),
        ("a {unique_token} {class_token} wearing a black top hat and a monocle", EDIT),
        ("a {unique_token} {class_token} in a purple wizard outfit", EDIT),
    ],
)
def test_classify_prompt(template: str, kind: str) -> None:
    assert classify_prompt(template) == kind


# -------------------------------------------------------------------------------------------------- metrics


def test_dino_preprocess_resizes_crops_and_normalises() -> None:
    image = Image.new("RGB", (512, 300), (255, 128, 0))
    pixels = dino_preprocess([image, image.rotate(90, expand=True)])
    assert pixels.shape == (2, 3, 224, 224)
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(pixels[:, :, 112, 112], expected.expand(2, 3), atol=1e-5)


def test_scorer_identical_image_scores_one(scorer: DreamBenchScorer, mini_root: Path) -> None:
    real = sorted((mini_root / "dataset" / "dog").glob("*.jpg"))
    record = {
        "subject": "dog",
        "path": str(real[0]),
        "clip_text": "a dog",
        "kind": EDIT,
        "reference_images": [real[0]],
    }
    (scored,) = score_generations(scorer, [record], {"dog": [real[0]]})
    for name in ("clip_i", "dino", "clip_i_ref", "dino_ref"):
        assert scored[name] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scored["clip_t"] <= 1.0


def test_scorer_reference_and_all_photo_similarities(scorer: DreamBenchScorer, mini_root: Path) -> None:
    real = sorted((mini_root / "dataset" / "backpack").glob("*.jpg"))
    other = sorted((mini_root / "dataset" / "dog").glob("*.jpg"))
    records = [
        {"subject": "bp", "path": str(p), "clip_text": "a backpack in the snow", "reference_images": [str(real[1])]}
        for p in other
    ]
    scored = score_generations(scorer, records, {"bp": real}, batch_size=2)
    assert len(scored) == 3
    # By hand from the embeddings: "ref" is the cosine with the one reference photo, "all" the mean over both.
    generated_clip, real_clip = scorer.clip_image_embeds(other), scorer.clip_image_embeds(real)
    generated_dino, real_dino = scorer.dino_embeds(other), scorer.dino_embeds(real)
    rewards = scorer.image_reward([Image.open(p).convert("RGB") for p in other], ["a backpack in the snow"] * 3)
    for row, record in enumerate(scored):
        assert record["clip_i_ref"] == pytest.approx(float(generated_clip[row] @ real_clip[1]), abs=1e-6)
        assert record["clip_i"] == pytest.approx(float((real_clip @ generated_clip[row]).mean()), abs=1e-6)
        assert record["dino_ref"] == pytest.approx(float(generated_dino[row] @ real_dino[1]), abs=1e-6)
        assert record["dino"] == pytest.approx(float((real_dino @ generated_dino[row]).mean()), abs=1e-6)
        assert record["image_reward"] == pytest.approx(float(rewards[row]), abs=1e-6)
        assert abs(record["clip_i_ref"] - record["clip_i"]) > 1e-6
    # A record without reference photos has no "ref" similarity; a scorer without a reward model no reward.
    bare = DreamBenchScorer(scorer.clip_model, scorer.dino_model, clip_tokenizer=scorer.clip_tokenizer, device="cpu")
    (plain,) = score_generations(bare, [{"subject": "bp", "path": str(other[0]), "clip_text": "a bag"}], {"bp": real})
    assert plain["clip_i_ref"] is None and plain["dino_ref"] is None and plain["image_reward"] is None
    assert plain["clip_i"] == pytest.approx(scored[0]["clip_i"], abs=1e-6)
    with pytest.raises(KeyError, match="No real images"):
        score_generations(scorer, records, {})


def test_scorer_accepts_model_objects() -> None:
    tokenizer = tiny_clip_tokenizer()
    scorer = DreamBenchScorer(
        tiny_clip_model(len(tokenizer)), tiny_dino_model(), clip_tokenizer=tokenizer, device="cpu"
    )
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    assert scorer.clip_image_embeds([image]).shape == (1, 32)
    assert scorer.dino_embeds([image]).shape == (1, 32)
    assert torch.allclose(scorer.clip_text_embeds(["a dog"]).norm(dim=-1), torch.ones(1))


def test_summarize_gives_both_readings() -> None:
    records = [
        {
            "kind": RECONTEXTUALIZATION,
            "clip_t": 0.30,
            "clip_i": 0.90,
            "dino": 0.70,
            "clip_i_ref": 0.95,
            "dino_ref": 0.8,
        },
        {
            "kind": RECONTEXTUALIZATION,
            "clip_t": 0.20,
            "clip_i": 0.80,
            "dino": 0.60,
            "clip_i_ref": 0.85,
            "dino_ref": 0.7,
        },
        {"kind": EDIT, "clip_t": 0.40, "clip_i": 0.70, "dino": 0.50, "clip_i_ref": 0.75, "dino_ref": 0.6},
    ]
    summary = summarize(records)
    assert summary["count"] == 3 and summary["recontext_count"] == 2 and summary["edit_count"] == 1
    assert summary["clip_t"] == pytest.approx(0.3) and summary["image_reward"] is None
    # Reading by prompt kind.
    assert summary["recontext_clip_i"] == pytest.approx(0.85) and summary["edit_clip_i"] == pytest.approx(0.70)
    assert summary["recontext_dino"] == pytest.approx(0.65) and summary["edit_dino"] == pytest.approx(0.50)
    # Reading by the real photos compared with: reference photo vs all photos, over every prompt.
    assert summary["clip_i_ref"] == pytest.approx(0.85) and summary["clip_i"] == pytest.approx(0.80)
    assert summary["dino_ref"] == pytest.approx(0.70) and summary["dino"] == pytest.approx(0.60)
    assert summarize(records[:2])["edit_dino"] is None


# ----------------------------------------------------------------------------------------------- generation


def test_generate_writes_images_and_manifest_and_resumes(mini_root: Path, tmp_path: Path) -> None:
    subjects = load_dreambench(mini_root)
    pipe, out = FakePipeline(), tmp_path / "gen"
    records = generate_dreambench(pipe, subjects, out, images_per_prompt=2, batch_size=2, scale=0.8, height=16)
    assert pipe.scale == 0.8
    assert len(pipe.calls) == 6 and all(call["height"] == 16 and "width" not in call for call in pipe.calls)
    # Encoder methods get the class prompt without identifier by default.
    assert pipe.calls[0]["prompt"] == "a backpack in the jungle"
    states = _png_states(out)
    assert sorted(states) == sorted(
        f"{s}/{p:02d}_{i}.png" for s in ("backpack", "dog") for p in range(3) for i in (0, 1)
    )

    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest == records
    assert {Path(r["path"]).relative_to(out.resolve()).as_posix() for r in manifest} == set(states)
    dog_hat = next(r for r in manifest if r["subject"] == "dog" and r["prompt_index"] == 1)
    assert dog_hat["prompt"] == dog_hat["clip_text"] == "a dog wearing a red hat"
    assert dog_hat["kind"] == EDIT and dog_hat["seed"] == image_seed(0, "dog", 1, dog_hat["image_index"])
    assert [Path(path).name for path in dog_hat["reference_images"]] == ["00.jpg"]
    assert all('"path": "' + r["subject"] + "/" in line for r, line in zip(manifest, (out / MANIFEST_NAME).open()))

    pipe.calls.clear()
    generate_dreambench(pipe, subjects, out, images_per_prompt=2, batch_size=2, scale=0.8, height=16)
    assert pipe.calls == [] and _png_states(out) == states

    # A lost image is regenerated alone, and identically: its seed depends only on its identity.
    lost = out / "dog" / "02_1.png"
    before = lost.read_bytes()
    lost.unlink()
    generate_dreambench(pipe, subjects, out, images_per_prompt=2, batch_size=2, scale=0.8, height=16)
    assert [call["count"] for call in pipe.calls] == [1] and lost.read_bytes() == before

    # More images per prompt only adds images; other settings would mix two experiments in one folder.
    generate_dreambench(pipe, subjects, out, images_per_prompt=3, batch_size=2, scale=0.8, height=16)
    assert len(_png_states(out)) == 18 and len(read_manifest(out / MANIFEST_NAME)) == 18
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        generate_dreambench(pipe, subjects, out, images_per_prompt=2, scale=0.8, height=16, seed=1)


def test_generate_is_independent_of_batch_size_and_uses_identifier(mini_root: Path, tmp_path: Path) -> None:
    subjects = load_dreambench(mini_root, subjects=["backpack"])
    generate_dreambench(FakePipeline(), subjects, tmp_path / "a", images_per_prompt=3, batch_size=1)
    pipe = FakePipeline()
    generate_dreambench(pipe, subjects, tmp_path / "b", images_per_prompt=3, batch_size=2, use_identifier=True)
    assert [call["count"] for call in pipe.calls] == [2, 1] * 3
    assert pipe.calls[0]["prompt"] == "a sks backpack in the jungle"
    a_images = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*.png")}
    b_images = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*.png")}
    assert len(a_images) == 9 and a_images.keys() == b_images.keys()
    seeds_a = [r["seed"] for r in read_manifest(tmp_path / "a" / MANIFEST_NAME)]
    seeds_b = [r["seed"] for r in read_manifest(tmp_path / "b" / MANIFEST_NAME)]
    assert seeds_a == seeds_b and len(set(seeds_a)) == 9
    generate_dreambench(FakePipeline(), subjects, tmp_path / "c", images_per_prompt=3, batch_size=3)
    c_images = {p.relative_to(tmp_path / "c"): p.read_bytes() for p in (tmp_path / "c").rglob("*.png")}
    assert c_images == a_images


def test_generate_split_over_two_processes(mini_root: Path, tmp_path: Path) -> None:
    subjects = load_dreambench(mini_root)
    jobs = build_jobs(subjects)
    with (
        StubAccelerator(0).split_between_processes(jobs) as first,
        StubAccelerator(1).split_between_processes(jobs) as second,
    ):
        assert sorted(map(id, first + second)) == sorted(map(id, jobs)) and first and second

    pipes = {rank: FakePipeline() for rank in (0, 1)}
    results = {}
    for rank in (1, 0):  # rank 0 last: it merges the shards, as it would after the barrier
        results[rank] = generate_dreambench(
            pipes[rank], subjects, tmp_path, images_per_prompt=2, accelerator=StubAccelerator(rank)
        )
    prompts = {rank: [(call["prompt"]) for call in pipes[rank].calls] for rank in (0, 1)}
    assert len(prompts[0]) == len(prompts[1]) == 3 and not set(prompts[0]) & set(prompts[1])
    manifest = read_manifest(tmp_path / MANIFEST_NAME)
    assert manifest == results[0]
    keys = [(r["subject"], r["prompt_index"], r["image_index"]) for r in manifest]
    assert keys == sorted(set(keys)) and len(keys) == 2 * 3 * 2
    assert len(results[1]) == 6 and not list(tmp_path.glob("manifest.rank*.jsonl"))


def test_reference_photos_setting() -> None:
    assert [parse_references(value) for value in ("first", "all", "3", 2)] == ["first", "all", 3, 2]
    for bad in ("0", "-1", "some", 0, True):
        with pytest.raises(ValueError, match="'first', 'all' or a positive number"):
            parse_references(bad)


def test_several_reference_photos_reach_the_pipeline(mini_root: Path, tmp_path: Path) -> None:
    subjects = load_dreambench(mini_root, ["dog"])
    (dog,) = subjects
    names = {refs: [p.name for p in dog.reference_image_paths(refs, 1)] for refs in ("first", 2, "all", 5)}
    assert names == {
        "first": ["01.jpg"],
        2: ["01.jpg", "02.jpg"],
        "all": ["01.jpg", "02.jpg", "00.jpg"],  # from the reference photo on, wrapping around
        5: ["01.jpg", "02.jpg", "00.jpg"],  # up to N: the dog has 3 photos
    }

    # CustomContrast: one encode_customcontrast_subjects call per subject, its embeddings reused for every prompt.
    pipe = CustomContrastFakePipeline()
    records = generate_dreambench(pipe, subjects, tmp_path / "cc", images_per_prompt=2, references=2)
    (encode,) = pipe.encode_calls
    assert [[photo.size for photo in photos] for photos in encode["subjects"]] == [[(48, 40), (48, 40)]]
    assert (encode["combine"], encode["num_images_per_prompt"], encode["do_classifier_free_guidance"]) == (
        "concat",
        1,
        True,
    )
    assert len(pipe.calls) == 3 and all("embeds" in call and "photos" not in call for call in pipe.calls)
    assert all([Path(p).name for p in r["reference_images"]] == ["00.jpg", "01.jpg"] for r in records)
    generate_dreambench(pipe, subjects, tmp_path / "cc1", images_per_prompt=1, references=2, guidance_scale=1.0)
    assert pipe.encode_calls[-1]["do_classifier_free_guidance"] is False

    # The default is the DreamBench protocol: the reference photo alone, as ip_adapter_image.
    pipe = CustomContrastFakePipeline()
    generate_dreambench(pipe, subjects, tmp_path / "first", images_per_prompt=1)
    assert pipe.encode_calls == [] and all(call["photos"] == 1 for call in pipe.calls)
    # A plain IP-Adapter takes several photos through diffusers' own input: a list of images for its one adapter.
    pipe = FakePipeline()
    generate_dreambench(pipe, subjects, tmp_path / "ip", images_per_prompt=1, references="all")
    assert all(call["photos"] == 3 for call in pipe.calls)
    # More photos change the images (the fake paints their mean colour).
    one, three = ((tmp_path / name / "dog" / "00_0.png").read_bytes() for name in ("first", "ip"))
    assert one != three
    with pytest.raises(ValueError, match="references: 'all' -> 2"):
        generate_dreambench(FakePipeline(), subjects, tmp_path / "ip", images_per_prompt=1, references=2)

    class WithoutEncoder(FakePipeline):
        def set_customcontrast_scale(self, scale: float) -> None:
            self.scale = scale

    with pytest.raises(AttributeError, match="needs pipe.encode_customcontrast_subjects"):
        generate_dreambench(WithoutEncoder(), subjects, tmp_path / "none", images_per_prompt=1, references="all")


def test_set_customcontrast_scale_is_preferred(mini_root: Path, tmp_path: Path) -> None:
    class CustomContrastPipeline(FakePipeline):
        def set_customcontrast_scale(self, scale: float) -> None:
            self.customcontrast_scale = scale

    pipe = CustomContrastPipeline()
    generate_dreambench(pipe, load_dreambench(mini_root, ["dog"]), tmp_path, images_per_prompt=1, scale=0.3)
    assert pipe.customcontrast_scale == 0.3 and pipe.scale == 0.5


def test_adapter_kind_is_read_from_the_unet(sd15_pipe) -> None:
    from diffusers_customcontrast.testing.tiny_models import tiny_adapter

    # Every diffusers pipeline has set_customcontrast_scale once diffusers_customcontrast is imported.
    assert not uses_customcontrast(sd15_pipe)
    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    assert uses_customcontrast(sd15_pipe)
    assert not uses_customcontrast(FakePipeline())


# --------------------------------------------------------------------------------------------- report and CLI


def test_format_metric_matches_paper() -> None:
    assert report.format_metric(0.3254) == ".325"
    assert report.format_metric(-0.6109) == "-.611"
    assert report.format_metric(1.0) == "1.000"
    assert report.format_metric(None) == "-"


def _table_row(table: str, label: str) -> list[str]:
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_scale_sweep_and_report(mini_root: Path, tmp_path: Path, scorer: DreamBenchScorer) -> None:
    subjects = load_dreambench(mini_root)
    curve = scale_sweep(FakePipeline(), subjects, [0.2, 0.9], tmp_path, scorer, images_per_prompt=1)
    assert [point["scale"] for point in curve] == [0.2, 0.9]
    assert (tmp_path / "scale_0.2" / "scores.jsonl").is_file() and (tmp_path / "scale_0.9" / MANIFEST_NAME).is_file()
    assert curve[0]["dino"] != curve[1]["dino"] and curve[0]["image_reward"] != curve[1]["image_reward"]

    results = {"method": "Fake", "metric_models": scorer.model_names, "summary": None, "sweep": curve}
    baseline = {"method": "Baseline", "summary": dict(curve[0], edit_dino=None), "sweep": []}
    files = report.write_report(tmp_path / "report", results, compare=[baseline])
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["sweep"][1]["scale"] == 0.9 and saved["files"] == files and set(files) == {"json", "markdown", "plot"}
    text = Path(files["markdown"]).read_text()
    fmt = report.format_metric

    # The paper's table: its published rows, then each run under both readings (the preferred one in bold).
    assert "| Method | CLIP-T | ImageReward | R-CI | E-CI | R-DI | E-DI |" in text
    assert _table_row(text, "IP-Adapter-plus (paper)") == [".295", "-.611", ".878", ".766", ".702", ".558"]
    assert _table_row(text, "CustomContrast (paper)") == [".325", ".454", ".919", ".788", ".737", ".591"]
    point = curve[1]
    by_reference = ["clip_t", "image_reward", "clip_i_ref", "clip_i", "dino_ref", "dino"]
    by_prompt = ["clip_t", "image_reward", "recontext_clip_i", "edit_clip_i", "recontext_dino", "edit_dino"]
    assert _table_row(text, "**Fake (scale 0.9)**, R/E: reference / all photos") == [
        fmt(point[k]) for k in by_reference
    ]
    assert _table_row(text, "Fake (scale 0.9), R/E: recontext. / edit prompts") == [fmt(point[k]) for k in by_prompt]
    assert _table_row(text, "Baseline, R/E: recontext. / edit prompts")[-1] == "-"
    assert text.index("CustomContrast (paper)") < text.index("**Fake (scale 0.2)**")

    # Every metric under its own name, and the metric models actually used.
    assert "| Method | CLIP-T | ImageReward | CI ref | CI all | DI ref | DI all | CI recontext | CI edit |" in text
    clip_dir = scorer.model_names["clip"]
    assert f"Fake: CLIP `{clip_dir}` (CLIP-T, CI)" in text and "ViT-B/32" not in text
    assert "Baseline: not recorded" in text
    with Image.open(files["plot"]) as plot:  # CLIP-T and ImageReward panels side by side
        assert plot.format == "PNG" and plot.size[0] > 1.8 * plot.size[1]

    sdxl = report.markdown_report([results], paper_table="sdxl")
    assert "CustomContrast (SDXL) (paper)" in sdxl and "IP-Adapter-plus (paper)" not in sdxl
    assert "(paper)" not in report.markdown_report([results], paper_table=None)


def test_paper_rows_are_the_published_ones() -> None:
    # A few cells of shared/paper/RESULTS.md, typed again: a transcription slip in evaluation/paper.py shows here.
    sd15 = dict(PAPER_TABLES["sd15"])
    assert sd15["MoMA"] == {"CLIP-T": 0.313, "ImageReward": -0.243, "R-CI": 0.879, "E-CI": 0.772, "R-DI": 0.679,
                            "E-DI": 0.550}  # fmt: skip
    assert sd15["Custom Diffusion"]["ImageReward"] == -1.411 and len(sd15) == 9
    sdxl = dict(PAPER_TABLES["sdxl"])
    assert sdxl["EMU2 (SDXL)"]["E-DI"] == 0.583 and sdxl["CustomContrast (SDXL)"]["R-CI"] == 0.927 and len(sdxl) == 5


def _cli_argv(root: Path, models: tuple[Path, Path], output_dir: Path, *extra: str) -> list[str]:
    clip_dir, dino_dir = models
    return [
        "--dreambench_root", str(root),
        "--clip_model", str(clip_dir),
        "--dino_model", str(dino_dir),
        "--local_files_only",
        "--device", "cpu",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def test_cli_main_end_to_end(
    mini_root: Path, tmp_path: Path, tiny_model_dirs: tuple[Path, Path], reward_dirs: tuple[Path, Path]
) -> None:
    pipe = CustomContrastFakePipeline()
    reward = ["--imagereward_model", str(reward_dirs[0]), "--imagereward_tokenizer", str(reward_dirs[1])]
    argv = _cli_argv(
        mini_root, tiny_model_dirs, tmp_path / "eval",
        "--subjects", "dog,backpack", "--images_per_prompt", "2", "--num_inference_steps", "3",
        "--scales", "0.25,0.75", "--method_name", "FakeAdapter", "--references", "all", *reward,
    )  # fmt: skip
    results = cli.main(argv, pipe=pipe)
    assert results["method"] == "FakeAdapter" and [p["scale"] for p in results["sweep"]] == [0.25, 0.75]
    assert all(p["count"] == 12 and p["recontext_count"] == 6 and p["edit_count"] == 6 for p in results["sweep"])
    assert all(call["num_inference_steps"] == 3 and "embeds" in call for call in pipe.calls)
    assert pipe.calls[0]["prompt"] == "a dog in the snow"  # subjects in the order asked for
    assert [len(call["subjects"][0]) for call in pipe.encode_calls] == [3, 2] * 2  # all photos, once per subject
    assert results["metric_models"] == {
        "clip": str(tiny_model_dirs[0]),
        "dino": str(tiny_model_dirs[1]),
        "image_reward": str(reward_dirs[0]),
    }
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["config"]["subjects"] == ["dog", "backpack"] and len(saved["sweep"]) == 2
    assert saved["files"] == results["files"] and Path(saved["files"]["plot"]).name == "scale_sweep.png"
    keys = ("clip_t", "image_reward", "clip_i_ref", "clip_i", "recontext_clip_i", "edit_dino")
    assert all(math.isfinite(saved["sweep"][0][key]) for key in keys)
    assert saved["paper_table"] == "sd15"

    single_argv = [*argv, "--compare_results", str(tmp_path / "eval" / "results.json")]
    single_argv.remove("--scales")
    single_argv.remove("0.25,0.75")
    single_argv[single_argv.index("--output_dir") + 1] = str(tmp_path / "single")
    single = cli.main(single_argv, pipe=pipe)
    assert single["sweep"] == [] and single["summary"]["count"] == 12
    table = Path(single["files"]["markdown"]).read_text()
    assert "| **FakeAdapter**, R/E: reference / all photos | " in table
    assert "| FakeAdapter (scale 0.75) | " in table
    assert "plot" in single["files"]  # the compared run's sweep is drawn


@requires_sample
def test_cli_on_the_dreambench_sample_reports_both_readings(
    tmp_path: Path, tiny_model_dirs: tuple[Path, Path], reward_dirs: tuple[Path, Path], scorer: DreamBenchScorer
) -> None:
    reward = ["--imagereward_model", str(reward_dirs[0]), "--imagereward_tokenizer", str(reward_dirs[1])]
    argv = _cli_argv(
        SAMPLE_ROOT, tiny_model_dirs, tmp_path, "--images_per_prompt", "1", "--method_name", "Fake", *reward
    )
    results = cli.main(argv, pipe=FakePipeline())
    summary = results["summary"]
    assert (summary["count"], summary["recontext_count"], summary["edit_count"]) == (50, 30, 20)
    scores = read_manifest(tmp_path / "scores.jsonl")

    def mean(key: str, kind: str | None = None) -> float:
        values = [record[key] for record in scores if kind is None or record["kind"] == kind]
        return sum(values) / len(values)

    # Reading by prompt kind: CLIP-I / DINO over all real photos, split by recontextualisation / edit prompts.
    assert summary["recontext_clip_i"] == pytest.approx(mean("clip_i", RECONTEXTUALIZATION))
    assert summary["edit_dino"] == pytest.approx(mean("dino", EDIT))
    # Reading by real photos: the reference photo (the first in sorted order) vs all photos, over every prompt.
    assert summary["clip_i_ref"] == pytest.approx(mean("clip_i_ref")) and summary["dino"] == pytest.approx(
        mean("dino")
    )
    dog = next(record for record in scores if record["subject"] == "dog")
    (reference,) = dog["reference_images"]
    assert Path(reference) == SAMPLE_ROOT.resolve() / "dataset" / "dog" / "00.jpg"
    generated = scorer.clip_image_embeds([dog["path"]])[0]
    photos = sorted((SAMPLE_ROOT / "dataset" / "dog").glob("*.jpg"))
    assert dog["clip_i_ref"] == pytest.approx(float(scorer.clip_image_embeds([reference])[0] @ generated), abs=1e-6)
    assert dog["clip_i"] == pytest.approx(float((scorer.clip_image_embeds(photos) @ generated).mean()), abs=1e-6)
    assert summary["clip_i_ref"] != pytest.approx(summary["clip_i"]) != pytest.approx(summary["recontext_clip_i"])

    table = (tmp_path / "results.md").read_text()
    fmt = report.format_metric
    assert _table_row(table, "**Fake**, R/E: reference / all photos")[2:4] == [
        fmt(summary["clip_i_ref"]),
        fmt(summary["clip_i"]),
    ]
    assert _table_row(table, "Fake, R/E: recontext. / edit prompts")[2:4] == [
        fmt(summary["recontext_clip_i"]),
        fmt(summary["edit_clip_i"]),
    ]
    assert _table_row(table, "Fake")[1] == fmt(summary["image_reward"])  # the all-metrics table


def test_offline_recipe_of_the_docs(mini_root: Path, tmp_path: Path, capsys) -> None:
    # docs/evaluation.md, "Offline, in a minute": the tiny models, then the evaluation command on them.
    tiny_main(["--output_dir", str(tmp_path / "tiny")])
    assert "imagereward: " in capsys.readouterr().out
    tiny = tmp_path / "tiny"
    results = cli.main(
        ["--dreambench_root", str(mini_root), "--subjects", "dog",
         "--pretrained_model", str(tiny / "pipeline"), "--adapter", str(tiny / "adapter"),
         "--clip_model", str(tiny / "clip"), "--dino_model", str(tiny / "dino"),
         "--imagereward_model", str(tiny / "imagereward"), "--imagereward_tokenizer", str(tiny / "imagereward_tokenizer"),
         "--images_per_prompt", "1", "--num_inference_steps", "2", "--scales", "0,1", "--local_files_only",
         "--device", "cpu", "--output_dir", str(tmp_path / "eval")]
    )  # fmt: skip
    assert results["method"] == "CustomContrast" and [p["count"] for p in results["sweep"]] == [3, 3]
    assert all(math.isfinite(p["image_reward"]) and math.isfinite(p["clip_i_ref"]) for p in results["sweep"])
    assert results["sweep"][0]["dino"] != results["sweep"][1]["dino"]  # the adapter's scale reaches the images
    assert set(results["files"]) == {"json", "markdown", "plot"}


def test_cli_checks_inputs_before_loading_models(
    mini_root: Path, tmp_path: Path, tiny_model_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "build_pipeline", must_not_load)
    monkeypatch.setattr(cli, "DreamBenchScorer", must_not_load)
    monkeypatch.setattr(cli.ImageRewardScorer, "from_pretrained", must_not_load)
    good = _cli_argv(mini_root, tiny_model_dirs, tmp_path / "out", "--pretrained_model", "org/some-model")
    results = tmp_path / "results.json"
    results.write_text("not json")
    cases = {
        "No prompts_and_classes.txt": ["--dreambench_root", str(tmp_path / "missing")],
        "not in the DreamBench table": ["--subjects", "unicorn"],
        "--clip_model: './no/such/clip' does not exist": ["--clip_model", "./no/such/clip"],
        "--imagereward_model: '/no/ImageReward.pt' does not exist": ["--imagereward_model", "/no/ImageReward.pt"],
        "--adapter: 'adapters/x/y' does not exist": ["--adapter", "adapters/x/y"],
        "--compare_results: ": ["--compare_results", str(results)],
        "--reference_index 7": ["--reference_index", "7"],
        "'first', 'all' or a positive number": ["--references", "some"],
        "expected a positive integer": ["--images_per_prompt", "0"],
    }
    for message, change in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*good, *change])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_help_names_the_command_and_every_default() -> None:
    parser = cli.build_parser()
    text = parser.format_help()
    assert text.startswith("usage: python -m diffusers_customcontrast.evaluate ") and "``" not in text
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    options = [block for block in blocks if block.startswith("--")]
    assert len(options) == len(parser._actions) - 1  # every option but -h
    for block in options:
        flat = " ".join(block.split())
        assert re.search(r"\(default: [^)]+\)|\(required\)", flat), flat


def test_cli_arguments() -> None:
    args = cli.parse_args(
        ["--dreambench_root", "d", "--output_dir", "o", "--subjects", "a,b", "c", "--ip_adapter", "h94/IP-Adapter",
         "models", "ip-adapter-plus_sd15.safetensors", "--references", "3"]
    )  # fmt: skip
    assert args.subjects == ["a", "b", "c"] and args.method_name == "IP-Adapter" and args.scales is None
    assert args.references == 3 and args.imagereward_model is None and args.paper_table == "auto"
    assert cli.parse_args(["--dreambench_root", "d", "--output_dir", "o", "--scales", "0.5, 1"]).scales == [0.5, 1.0]
    with pytest.raises(SystemExit):
        cli.main(["--dreambench_root", "d", "--output_dir", "o"])  # no pipeline given or named
    with pytest.raises(SystemExit):
        cli.parse_args(
            ["--dreambench_root", "d", "--output_dir", "o", "--adapter", "x", "--ip_adapter", "a", "b", "c"]
        )
    assert cli.paper_table_for(SimpleNamespace(text_encoder_2=object())) == "sdxl"
    assert cli.paper_table_for(FakePipeline()) == "sd15"


# ---------------------------------------------------------------------------------- with a real diffusers pipeline


def _save_tiny_sd_with_ip_adapter(pipeline_dir: Path, adapter_dir: Path) -> None:
    """A tiny random Stable Diffusion pipeline with an image encoder, and a matching plain IP-Adapter file."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    small = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=1,
        attention_head_dim=2,
    )
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(4,), latent_channels=4, norm_num_groups=1, sample_size=8),
        text_encoder=CLIPTextModel(
            CLIPTextConfig(**small, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1)
        ),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=CLIPVisionModelWithProjection(
            CLIPVisionConfig(**small, image_size=32, patch_size=16, projection_dim=8)
        ),
        requires_safety_checker=False,
    ).save_pretrained(pipeline_dir)

    # The original IP-Adapter checkpoint layout: numbered cross-attention layers (1, 3, 5, ...) and a
    # linear image projection to 4 tokens.
    weights = {
        "image_proj.proj.weight": torch.randn(4 * 8, 8) * 0.5,
        "image_proj.proj.bias": torch.zeros(4 * 8),
        "image_proj.norm.weight": torch.ones(8),
        "image_proj.norm.bias": torch.zeros(8),
    }
    cross_attention = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for position, name in enumerate(cross_attention):
        block = unet.down_blocks[int(name.split(".")[1])] if name.startswith("down") else None
        hidden = block.resnets[0].out_channels if block is not None else unet.config.block_out_channels[-1]
        if name.startswith("up"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{2 * position + 1}.{projection}.weight"] = torch.randn(hidden, 8) * 0.5
    adapter_dir.mkdir()
    save_file(weights, str(adapter_dir / "ip-adapter.safetensors"))


def test_cli_with_real_diffusers_ip_adapter(
    mini_root: Path, tmp_path: Path, tiny_model_dirs: tuple[Path, Path]
) -> None:
    _save_tiny_sd_with_ip_adapter(tmp_path / "sd", tmp_path / "ip")
    clip_dir, dino_dir = tiny_model_dirs
    common = [
        "--dreambench_root", str(mini_root), "--subjects", "dog",
        "--pretrained_model", str(tmp_path / "sd"), "--pipeline_class", "sd15",
        "--ip_adapter", str(tmp_path / "ip"), "", "ip-adapter.safetensors",
        "--images_per_prompt", "2", "--num_inference_steps", "2", "--height", "16", "--width", "16",
        "--clip_model", str(clip_dir), "--dino_model", str(dino_dir),
        "--local_files_only", "--device", "cpu",
    ]  # fmt: skip
    results = cli.main([*common, "--scales", "0,1", "--batch_size", "2", "--output_dir", str(tmp_path / "a")])
    assert results["method"] == "IP-Adapter" and len(results["sweep"]) == 2
    with Image.open(tmp_path / "a" / "scale_1" / "dog" / "00_1.png") as image:
        assert image.size == (16, 16)
    at_0, at_1 = ((tmp_path / "a" / f"scale_{s}" / "dog" / "00_1.png").read_bytes() for s in (0, 1))
    assert at_0 != at_1  # the adapter scale reaches the real pipeline

    # diffusers draws each image's noise from its own generator, so batching does not change any image (up to
    # float rounding: batched kernels may sum in another order and move a pixel by one level).
    cli.main([*common, "--scales", "1", "--batch_size", "1", "--output_dir", str(tmp_path / "b")])
    pairs = [
        (path, tmp_path / "a" / "scale_1" / "dog" / path.name) for path in (tmp_path / "b" / "scale_1").rglob("*.png")
    ]
    assert len(pairs) == 6
    for single, batched in pairs:
        with Image.open(single) as one, Image.open(batched) as two:
            assert np.abs(np.asarray(one, dtype=int) - np.asarray(two, dtype=int)).max() <= 1

    # Several photos for the plain IP-Adapter go through diffusers' own input (a list of images for one adapter).
    cli.main([*common, "--scales", "1", "--references", "all", "--output_dir", str(tmp_path / "c")])
    for path in (tmp_path / "c" / "scale_1").rglob("*.png"):
        assert path.read_bytes() != (tmp_path / "a" / "scale_1" / "dog" / path.name).read_bytes()


@pytest.mark.skipif(
    not hasattr(IPAdapterMixin, "encode_customcontrast_subjects"),  # the pipeline methods live on IPAdapterMixin
    reason="pipe.encode_customcontrast_subjects (several photos of one subject) is not in this checkout yet",
)
def test_several_photos_with_a_real_customcontrast_pipeline(sd15_pipe, mini_root: Path, tmp_path: Path) -> None:
    from diffusers_customcontrast.testing.tiny_models import tiny_adapter

    sd15_pipe.load_customcontrast(tiny_adapter(sd15_pipe))
    sd15_pipe.set_progress_bar_config(disable=True)
    subjects = load_dreambench(mini_root, ["dog"])
    kwargs = {"images_per_prompt": 1, "num_inference_steps": 2, "height": 32, "width": 32}
    generate_dreambench(sd15_pipe, subjects, tmp_path / "one", **kwargs)
    generate_dreambench(sd15_pipe, subjects, tmp_path / "all", references="all", **kwargs)
    images = {name: sorted((tmp_path / name / "dog").glob("*.png")) for name in ("one", "all")}
    assert len(images["one"]) == len(images["all"]) == 3
    for one, three in zip(images["one"], images["all"]):
        assert one.read_bytes() != three.read_bytes()
