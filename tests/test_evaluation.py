"""Tests of the DreamBench evaluation: data set reader, generation, metrics, report and CLI.

Everything runs offline on CPU: the metric models are tiny random CLIP / DINO models saved to temporary folders
and loaded back through the real loading code, and the pipeline is a fake that paints images whose colour
depends on the prompt, the reference image, the adapter scale and the generator.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from accelerate import PartialState
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from diffusers_customcontrast.evaluation import cli, report
from diffusers_customcontrast.evaluation.dreambench import (
    EDIT,
    RECONTEXTUALIZATION,
    classify_prompt,
    dreambench_prompts,
    load_dreambench,
    parse_prompts_and_classes,
)
from diffusers_customcontrast.evaluation.generate import (
    build_jobs,
    generate_dreambench,
    image_seed,
    uses_customcontrast,
)
from diffusers_customcontrast.evaluation.manifest import MANIFEST_NAME, read_manifest
from diffusers_customcontrast.evaluation.metrics import (
    DreamBenchScorer,
    dino_preprocess,
    score_generations,
    summarize,
)
from diffusers_customcontrast.evaluation.sweep import scale_sweep

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


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-to-symbol table, so that any text tokenizes with a byte-level vocabulary and no merges.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _tiny_tokenizer() -> CLIPTokenizer:
    symbols = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    # CLIP's BPE marks the end of each word with "</w>", so every symbol is needed with and without it.
    for symbol in symbols + [symbol + "</w>" for symbol in symbols]:
        vocab[symbol] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_clip(vocab_size: int) -> CLIPModel:
    common = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**common, "vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    vision = {**common, "image_size": 224, "patch_size": 32}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def _tiny_dino() -> ViTModel:
    config = ViTConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=224, patch_size=16
    )
    return ViTModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Folders of a tiny random CLIP (model, tokenizer, image processor) and a tiny random DINO ViT."""
    torch.manual_seed(0)
    clip_dir, dino_dir = tmp_path_factory.mktemp("tiny_clip"), tmp_path_factory.mktemp("tiny_dino")
    tokenizer = _tiny_tokenizer()
    _tiny_clip(len(tokenizer)).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_class().save_pretrained(clip_dir)
    _tiny_dino().save_pretrained(dino_dir)
    return clip_dir, dino_dir


@pytest.fixture(scope="session")
def scorer(tiny_model_dirs: tuple[Path, Path]) -> DreamBenchScorer:
    clip_dir, dino_dir = tiny_model_dirs
    return DreamBenchScorer(clip_dir, dino_dir, device="cpu", batch_size=8, local_files_only=True)


def _write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(colour))
    noise = rng.integers(-20, 20, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """A two-subject data set (an object and a live subject) in the google/dreambooth layout."""
    dataset = tmp_path / "dreambooth" / "dataset"
    for name, colours in {"backpack": [(200, 40, 40), (180, 60, 50)], "dog": [(120, 90, 60), (140, 100, 70)]}.items():
        (dataset / name).mkdir(parents=True)
        # Written out of order, to check that the reference image is the first in sorted order.
        for index in reversed(range(len(colours))):
            _write_image(dataset / name / f"{index:02d}.jpg", colours[index], size=(48, 40))
    (dataset / "prompts_and_classes.txt").write_text(MINI_PROMPTS_FILE)
    return tmp_path / "dreambooth"


class FakePipeline:
    """Stands in for a diffusers pipeline with an IP-Adapter: paints one flat colour plus seeded noise."""

    def __init__(self) -> None:
        self.scale = 0.5
        self.calls: list[dict] = []

    def set_ip_adapter_scale(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, prompt, ip_adapter_image, num_images_per_prompt, generator, **kwargs):
        self.calls.append({"prompt": prompt, "count": num_images_per_prompt, **kwargs})
        assert isinstance(ip_adapter_image, Image.Image)
        assert len(generator) == num_images_per_prompt
        prompt_colour = np.frombuffer(prompt.encode()[:3].ljust(3, b"x"), dtype=np.uint8).astype(np.float32)
        subject_colour = np.asarray(ip_adapter_image, dtype=np.float32).reshape(-1, 3).mean(0)
        base = self.scale * subject_colour + (1 - self.scale) * prompt_colour
        images = []
        for g in generator:
            noise = torch.rand(16, 16, 3, generator=g).numpy() * 30
            images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
        return SimpleNamespace(images=images)


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
    record = {"subject": "dog", "path": str(real[0]), "clip_text": "a dog", "kind": EDIT}
    (scored,) = score_generations(scorer, [record], {"dog": [real[0]]})
    assert scored["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert scored["dino"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scored["clip_t"] <= 1.0


def test_scorer_values_in_range_and_cached(scorer: DreamBenchScorer, mini_root: Path) -> None:
    real = sorted((mini_root / "dataset" / "backpack").glob("*.jpg"))
    other = sorted((mini_root / "dataset" / "dog").glob("*.jpg"))
    records = [{"subject": "bp", "path": str(p), "clip_text": "a backpack in the snow"} for p in other]
    scored = score_generations(scorer, records, {"bp": real}, batch_size=1)
    assert len(scored) == 2
    for row in scored:
        assert all(-1.0 - 1e-6 <= row[name] <= 1.0 + 1e-6 for name in ("clip_t", "clip_i", "dino"))
    assert "bp" in scorer._real_cache
    with pytest.raises(KeyError, match="No real images"):
        score_generations(scorer, records, {})


def test_scorer_accepts_model_objects() -> None:
    tokenizer = _tiny_tokenizer()
    scorer = DreamBenchScorer(_tiny_clip(len(tokenizer)), _tiny_dino(), clip_tokenizer=tokenizer, device="cpu")
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    assert scorer.clip_image_embeds([image]).shape == (1, 32)
    assert scorer.dino_embeds([image]).shape == (1, 32)
    assert torch.allclose(scorer.clip_text_embeds(["a dog"]).norm(dim=-1), torch.ones(1))


def test_summarize_splits_by_kind() -> None:
    records = [
        {"kind": RECONTEXTUALIZATION, "clip_t": 0.30, "clip_i": 0.90, "dino": 0.70},
        {"kind": RECONTEXTUALIZATION, "clip_t": 0.20, "clip_i": 0.80, "dino": 0.60},
        {"kind": EDIT, "clip_t": 0.40, "clip_i": 0.70, "dino": 0.50},
    ]
    summary = summarize(records)
    assert summary["count"] == 3 and summary["r_count"] == 2 and summary["e_count"] == 1
    assert summary["clip_t"] == pytest.approx(0.3)
    assert summary["r_clip_i"] == pytest.approx(0.85) and summary["e_clip_i"] == pytest.approx(0.70)
    assert summary["r_dino"] == pytest.approx(0.65) and summary["e_dino"] == pytest.approx(0.50)
    assert summarize(records[:2])["e_dino"] is None


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
    assert Path(dog_hat["reference_image"]).name == "00.jpg"
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


def test_set_customcontrast_scale_is_preferred(mini_root: Path, tmp_path: Path) -> None:
    class CustomContrastPipeline(FakePipeline):
        def set_customcontrast_scale(self, scale: float) -> None:
            self.customcontrast_scale = scale

    pipe = CustomContrastPipeline()
    generate_dreambench(pipe, load_dreambench(mini_root, ["dog"]), tmp_path, images_per_prompt=1, scale=0.3)
    assert pipe.customcontrast_scale == 0.3 and pipe.scale == 0.5


def test_adapter_kind_is_read_from_the_unet(sd15_pipe) -> None:
    from diffusers_customcontrast.tiny_models import tiny_adapter

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


def test_scale_sweep_and_report(mini_root: Path, tmp_path: Path, scorer: DreamBenchScorer) -> None:
    subjects = load_dreambench(mini_root)
    curve = scale_sweep(FakePipeline(), subjects, [0.2, 0.9], tmp_path, scorer, images_per_prompt=1)
    assert [point["scale"] for point in curve] == [0.2, 0.9]
    assert (tmp_path / "scale_0.2" / "scores.jsonl").is_file() and (tmp_path / "scale_0.9" / MANIFEST_NAME).is_file()
    assert curve[0]["e_dino"] != curve[1]["e_dino"]

    results = {"method": "Fake", "config": {}, "summary": None, "sweep": curve}
    baseline = {"method": "Baseline", "summary": dict(curve[0], e_dino=None), "sweep": []}
    files = report.write_report(tmp_path / "report", results, compare=[baseline])
    assert json.loads(Path(files["json"]).read_text())["sweep"][1]["scale"] == 0.9
    table = Path(files["markdown"]).read_text()
    assert "| Method | CLIP-T | R-CI | E-CI | R-DI | E-DI |" in table
    assert "| Fake (scale 0.9) | " in table and "| Baseline | " in table and "ImageReward is not computed" in table
    assert f"{report.format_metric(curve[1]['clip_t'])} |" in table
    with Image.open(files["plot"]) as plot:
        assert plot.format == "PNG" and plot.size[0] > 100


def test_cli_main_end_to_end(mini_root: Path, tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    clip_dir, dino_dir = tiny_model_dirs
    pipe = FakePipeline()
    argv = [
        "--dreambench_root", str(mini_root),
        "--subjects", "dog,backpack",
        "--images_per_prompt", "2",
        "--num_inference_steps", "3",
        "--scales", "0.25,0.75",
        "--clip_model", str(clip_dir),
        "--dino_model", str(dino_dir),
        "--local_files_only",
        "--device", "cpu",
        "--output_dir", str(tmp_path / "eval"),
        "--method_name", "FakeAdapter",
    ]  # fmt: skip
    results = cli.main(argv, pipe=pipe)
    assert results["method"] == "FakeAdapter" and [p["scale"] for p in results["sweep"]] == [0.25, 0.75]
    assert all(p["count"] == 12 and p["r_count"] == 6 and p["e_count"] == 6 for p in results["sweep"])
    assert all(call["num_inference_steps"] == 3 for call in pipe.calls)
    assert pipe.calls[0]["prompt"] == "a dog in the snow"  # subjects in the order asked for
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["config"]["subjects"] == ["dog", "backpack"] and len(saved["sweep"]) == 2
    assert all(math.isfinite(saved["sweep"][0][key]) for key in ("clip_t", "r_clip_i", "e_dino"))
    assert (tmp_path / "eval" / "scale_sweep.png").is_file() and (tmp_path / "eval" / "results.md").is_file()

    single_argv = [*argv[:8], *argv[10:], "--compare_results", str(tmp_path / "eval" / "results.json")]
    single_argv[single_argv.index("--output_dir") + 1] = str(tmp_path / "single")
    single = cli.main(single_argv, pipe=pipe)
    assert single["sweep"] == [] and single["summary"]["count"] == 12
    table = Path(single["files"]["markdown"]).read_text()
    assert "| FakeAdapter | " in table and "| FakeAdapter (scale 0.75) | " in table
    assert "plot" in single["files"]  # the compared run's sweep is drawn


def test_cli_arguments() -> None:
    args = cli.parse_args(
        ["--dreambench_root", "d", "--output_dir", "o", "--subjects", "a,b", "c", "--ip_adapter", "h94/IP-Adapter",
         "models", "ip-adapter-plus_sd15.safetensors"]
    )  # fmt: skip
    assert args.subjects == ["a", "b", "c"] and args.method_name == "IP-Adapter" and args.scales is None
    assert cli.parse_args(["--dreambench_root", "d", "--output_dir", "o", "--scales", "0.5, 1"]).scales == [0.5, 1.0]
    with pytest.raises(SystemExit):
        cli.main(["--dreambench_root", "d", "--output_dir", "o"])  # no pipeline given or named
    with pytest.raises(SystemExit):
        cli.parse_args(
            ["--dreambench_root", "d", "--output_dir", "o", "--adapter", "x", "--ip_adapter", "a", "b", "c"]
        )


# ---------------------------------------------------------------------------------- with a real diffusers pipeline


def _save_tiny_sd_with_ip_adapter(pipeline_dir: Path, adapter_dir: Path) -> None:
    """A tiny random Stable Diffusion pipeline with an image encoder, and a matching plain IP-Adapter file."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
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
