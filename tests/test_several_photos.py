"""Several photos of one subject (issue 14): ``pipe.encode_customcontrast_subjects(subjects, combine=...)``."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHOTOS = [make_subject_image(seed) for seed in (0, 6, 12)]  # three "photos" of a subject
OTHER = make_subject_image(1)
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def generate(pipe, **kwargs) -> np.ndarray:
    return pipe("a toy", generator=torch.Generator().manual_seed(0), **CALL, **kwargs).images


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    return pipe


@pytest.mark.parametrize("combine", ["concat", "mean"])
@pytest.mark.parametrize("guidance", [True, False])
def test_one_photo_per_subject_is_what_ip_adapter_image_gives(pipe, combine, guidance):
    for images, subjects in [(PHOTOS[0], [PHOTOS[0]]), ([[PHOTOS[0], OTHER]], [PHOTOS[0], OTHER])]:
        expected = pipe.prepare_ip_adapter_image_embeds(images, None, "cpu", 2, guidance)
        embeds = pipe.encode_customcontrast_subjects(
            subjects, combine=combine, num_images_per_prompt=2, do_classifier_free_guidance=guidance
        )
        assert len(embeds) == 1
        torch.testing.assert_close(embeds[0], expected[0], rtol=0, atol=0)
    embeds = pipe.encode_customcontrast_subjects([PHOTOS[0], OTHER], combine=combine)
    np.testing.assert_array_equal(
        generate(pipe, ip_adapter_image_embeds=embeds), generate(pipe, ip_adapter_image=[[PHOTOS[0], OTHER]])
    )


def test_shapes_and_negative_rows(pipe):
    one = pipe.encode_customcontrast_subjects([PHOTOS[0]])[0]
    concat = pipe.encode_customcontrast_subjects([PHOTOS, [OTHER] * 3], num_images_per_prompt=2)[0]
    mean = pipe.encode_customcontrast_subjects([PHOTOS, [OTHER]], combine="mean", num_images_per_prompt=2)[0]
    patches = one.shape[2]
    assert concat.shape == (
        4,
        2,
        3 * patches,
        one.shape[3],
    )  # [negative x 2; positive x 2], subjects, 3 photos' patches
    assert mean.shape == (4, 2, patches, one.shape[3])
    # The negative rows are the blank image's features, once per photo; the positive rows hold each photo in turn.
    blank = one[0, 0]
    torch.testing.assert_close(concat[:2], blank.repeat(3, 1).expand(2, 2, -1, -1), rtol=0, atol=1e-6)
    for index, photo in enumerate(PHOTOS):
        alone = pipe.encode_customcontrast_subjects([photo], do_classifier_free_guidance=False)[0][0, 0]
        torch.testing.assert_close(concat[2, 0, index * patches : (index + 1) * patches], alone, atol=1e-6, rtol=0)
    alone = [pipe.encode_customcontrast_subjects([p], do_classifier_free_guidance=False)[0][0, 0] for p in PHOTOS]
    torch.testing.assert_close(mean[3, 0], torch.stack(alone).mean(dim=0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_several_photos_change_the_image(pipe, combine):
    one = generate(pipe, ip_adapter_image_embeds=pipe.encode_customcontrast_subjects([PHOTOS[0]], combine=combine))
    several = generate(pipe, ip_adapter_image_embeds=pipe.encode_customcontrast_subjects([PHOTOS], combine=combine))
    assert np.abs(several - one).max() > 1e-3


def test_the_mean_of_copies_of_one_photo_is_that_photo(pipe):
    one = generate(pipe, ip_adapter_image_embeds=pipe.encode_customcontrast_subjects([PHOTOS[0]], combine="mean"))
    embeds = pipe.encode_customcontrast_subjects([[PHOTOS[0]] * 3], combine="mean")
    np.testing.assert_allclose(generate(pipe, ip_adapter_image_embeds=embeds), one, atol=1e-5)


def test_bad_input_is_refused_in_one_sentence(pipe):
    encode = pipe.encode_customcontrast_subjects
    with pytest.raises(ValueError, match="combine must be 'concat' or 'mean', got 'sum'"):
        encode([PHOTOS], combine="sum")
    with pytest.raises(ValueError, match=r"same number of photos for every subject.*\[3, 1\].*combine='mean'"):
        encode([PHOTOS, [OTHER]])
    with pytest.raises(ValueError, match="subjects is empty"):
        encode([])
    with pytest.raises(ValueError, match="Subject 1 has no photos"):
        encode([PHOTOS, []])
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive int, got 0"):
        encode([PHOTOS], num_images_per_prompt=0)
    with pytest.raises(ValueError, match="No CustomContrast adapter is loaded"):
        tiny_sd15_pipeline().encode_customcontrast_subjects([PHOTOS])


def test_example_script(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the script imports _common from its own folder
    from test_examples import SAMPLING, model_args, pixels, save_sd_models

    models = save_sd_models(tmp_path / "models", tiny_sd15_pipeline)
    paths = []
    for index, photo in enumerate(PHOTOS):
        paths.append(tmp_path / f"photo{index}.png")
        photo.save(paths[-1])
    main = runpy.run_path(str(EXAMPLES / "several_photos.py"))["main"]
    common = [*model_args(models), *SAMPLING, "--prompt", "a toy"]

    def run(name: str, *extra: str) -> np.ndarray:
        (path,) = main([*common, "--output", str(tmp_path / name), *extra])
        return pixels(path)

    one = run("one", "--photos", str(paths[0]))
    concat = run("concat", "--photos", *map(str, paths))
    mean = run("mean", "--photos", *map(str, paths), "--combine", "mean")
    assert len({image.tobytes() for image in (one, concat, mean)}) == 3
