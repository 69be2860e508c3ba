"""The web app: its generations against the pipeline's own output, upload checks, loading, and the page in a browser."""

from __future__ import annotations

import dataclasses
import io
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from customcontrast_world.app import GenerationRequest, SubjectStudio, UploadError, read_subject_images
from customcontrast_world.app import studio as studio_module
from customcontrast_world.app.__main__ import main
from customcontrast_world.app.studio import load_studio, location_strip, world_examples
from diffusers_customcontrast.conditioning import StepRecord
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline

REQUEST = GenerationRequest("a photo of a dog", scale=0.7, s_plus_scale=0.5, seed=3, num_inference_steps=3)


def pipeline_image(pipe, request: GenerationRequest, **kwargs) -> np.ndarray:
    """What the pipeline itself gives for ``request``'s prompt, seed, steps and guidance."""
    generator = torch.Generator().manual_seed(request.seed)
    output = pipe(
        request.prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=generator,
        **kwargs,
    )
    return np.asarray(output.images[0])


def tiny_studio(pipe=None, examples=()) -> SubjectStudio:
    pipe = pipe or tiny_sd15_pipeline()
    adapter = pipe.load_customcontrast(tiny_adapter(pipe))
    return SubjectStudio(pipe, adapter, "tiny pipeline, random adapter", REQUEST, examples)


def test_generation_is_the_pipelines_output_and_base_is_the_unloaded_pipeline(subject_image):
    pipe = tiny_sd15_pipeline()
    base = pipeline_image(pipe, REQUEST)
    studio = tiny_studio(pipe)
    pipe.set_customcontrast_scale(REQUEST.scale, s_plus_scale=REQUEST.s_plus_scale)
    expected = pipeline_image(pipe, REQUEST, ip_adapter_image=subject_image)
    pipe.set_customcontrast_scale(1.0, s_plus_scale=1.0)  # the studio's scales must come from the request alone

    progress = []
    result = studio.generate([subject_image], REQUEST, lambda done, what: progress.append((done, what)))

    np.testing.assert_array_equal(np.asarray(result.image), expected)
    np.testing.assert_array_equal(np.asarray(result.base_image), base)
    assert np.abs(expected.astype(int) - base).max() > 0  # the subject changed the image
    assert [done for done, _ in progress] == pytest.approx([k / 6 for k in range(1, 7)])
    assert {what for _, what in progress} == {"with the subject", "base model"}
    # One map per step (3 DDIM steps), image-sized, in step order with the schedule's timesteps.
    assert [caption for _, caption in result.location_maps] == [
        f"step {i + 1} · t={int(t)}" for i, t in enumerate(pipe.scheduler.timesteps)
    ]
    assert all(frame.size == result.image.size and frame.mode == "L" for frame, _ in result.location_maps)
    assert result.notes == []


def test_scale_strip_runs_from_the_base_model_to_the_request(subject_image):
    studio = tiny_studio()
    result = studio.generate([subject_image], REQUEST)
    strip = studio.scale_strip([subject_image], REQUEST, factors=(0.0, 0.5, 1.0))

    assert [caption for _, caption in strip] == ["0.00 / 0.00", "0.35 / 0.25", "0.70 / 0.50"]
    np.testing.assert_array_equal(np.asarray(strip[0][0]), np.asarray(result.base_image))
    np.testing.assert_array_equal(np.asarray(strip[2][0]), np.asarray(result.image))
    assert not np.array_equal(np.asarray(strip[1][0]), np.asarray(result.image))


def test_several_photos_of_one_subject_are_encoded_together(subject_image, subject_image_b):
    studio = tiny_studio()
    photos = [subject_image, subject_image_b]
    embeds = studio.pipe.encode_customcontrast_subjects([photos], combine="concat")
    studio.pipe.set_customcontrast_scale(REQUEST.scale, s_plus_scale=REQUEST.s_plus_scale)
    expected = pipeline_image(studio.pipe, REQUEST, ip_adapter_image_embeds=embeds)

    several = studio.generate(photos, REQUEST)
    np.testing.assert_array_equal(np.asarray(several.image), expected)
    assert several.notes == []
    assert not np.array_equal(np.asarray(several.image), np.asarray(studio.generate(photos[:1], REQUEST).image))


def test_location_strip_averages_layers_of_the_prompt_row():
    def record(t: int, low: float, high: float) -> StepRecord:
        # Two layers at different resolutions; row 0 (the negative prompt) must be ignored, and with two subjects
        # the strip shows their maximum.
        coarse = torch.tensor([[0.9, 0.9], [low, 0.0]])[:, :, None, None].expand(2, 2, 4, 4)
        fine = torch.tensor([[0.9, 0.9], [high, 0.0]])[:, :, None, None].expand(2, 2, 8, 8)
        return StepRecord(timesteps=torch.tensor([t, t]), location_maps={0: coarse, 1: fine})

    steps = [record(999 - i, 0.2, 0.6) for i in range(25)] + [StepRecord()]  # the last call computed no maps
    strip = location_strip(steps, (16, 12), max_frames=10)

    assert [caption for _, caption in strip] == [
        f"step {i + 1} · t={999 - i}" for i in (0, 3, 5, 8, 11, 13, 16, 19, 21, 24)
    ]
    frame = np.asarray(strip[0][0])
    assert frame.shape == (12, 16)
    np.testing.assert_array_equal(frame, round(0.4 * 255))


def test_request_refuses_values_the_page_cannot_mean():
    with pytest.raises(ValueError, match="expected a whole, non-negative seed, got -1"):
        GenerationRequest("a dog", seed=-1)
    with pytest.raises(ValueError, match="expected at least one whole inference step, got 0"):
        GenerationRequest("a dog", num_inference_steps=0)
    with pytest.raises(ValueError, match="expected a finite scale, got nan"):
        GenerationRequest("a dog", scale=float("nan"))


def test_uploads_are_read_or_refused_in_one_sentence(tmp_path: Path):
    good = tmp_path / "dog.png"
    make_subject_image(0).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:120])
    Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")  # 48 megapixels, 6 MB decoded in 1-bit mode

    photos = read_subject_images([good, good])
    assert len(photos) == 2
    np.testing.assert_array_equal(np.asarray(photos[0]), np.asarray(make_subject_image(0)))
    refusals = {
        "empty.png": "'empty.png' is an empty file: expected a photo of the subject.",
        "notes.txt": "'notes.txt' is not an image file: expected a photo (PNG, JPEG or WebP).",
        "cut.png": "'cut.png' could not be decoded as an image",
        "huge.png": "'huge.png' is 8000 x 6000 pixels, more than the 40 megapixels accepted: upload a smaller photo.",
    }
    for name, message in refusals.items():
        with pytest.raises(UploadError) as caught:
            read_subject_images([good, tmp_path / name])
        assert str(caught.value).startswith(message)
    with pytest.raises(UploadError, match="Upload at least one photo"):
        read_subject_images([])
    with pytest.raises(UploadError, match="Upload at most 8 photos of the subject, got 9"):
        read_subject_images([good] * 9)


def test_world_app_says_when_its_adapter_is_untrained(monkeypatch, tmp_path: Path, caplog, subject_image):
    monkeypatch.setattr(studio_module, "WORLD_ADAPTER_DIR", tmp_path / "world-adapter")
    with caplog.at_level("WARNING", logger=studio_module.__name__):
        untrained = load_studio(device="cpu")
    assert "UNTRAINED adapter with random weights" in untrained.description
    assert f"({tmp_path / 'world-adapter'}) is not in this checkout" in untrained.description
    assert "UNTRAINED adapter" in caplog.text

    untrained.adapter.save_pretrained(tmp_path / "world-adapter")
    trained = load_studio(device="cpu")
    assert "the world's trained adapter" in trained.description and "UNTRAINED" not in trained.description
    request = GenerationRequest("a striped star on the beach", seed=1, num_inference_steps=2)
    np.testing.assert_array_equal(
        np.asarray(trained.generate([subject_image], request).image),
        np.asarray(untrained.generate([subject_image], request).image),
    )


def test_command_line_refuses_a_base_without_an_adapter():
    with pytest.raises(SystemExit, match="Cannot start the app: expected --adapter"):
        main(["--base", "some-org/some-sd15"])


# --- the page in a real browser -----------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BROWSER_MISSING = "no headless browser: apt-get install -y chromium chromium-driver (Debian), and pip install selenium"


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(BROWSER_MISSING)
    webdriver = pytest.importorskip("selenium.webdriver", reason=BROWSER_MISSING)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_app():
    """The page of a tiny studio offering two world subjects, on a free localhost port; yields ``(url, studio)``."""
    pytest.importorskip("gradio", reason='the web app needs gradio: pip install -e ".[app]"')
    from customcontrast_world.app.layout import build_app, launch_app

    studio = tiny_studio(examples=world_examples(2))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(studio)
    launch_app(app, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", studio
    app.close()


def test_page_generates_the_pipelines_image_and_reports_a_bad_upload(browser, served_app, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, studio = served_app
    subject = tmp_path / "subject.png"
    make_subject_image(0).save(subject)
    wait = WebDriverWait(browser, 60)

    def status_text(contains: str) -> str:
        return wait.until(lambda d: contains in (text := d.find_element(By.ID, "status").text) and text)

    browser.get(url)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#subjects input[type=file]")).send_keys(str(subject))
    assert status_text("ready") == "1 photo of the subject ready."
    seed = browser.find_element(By.CSS_SELECTOR, "#seed input")
    seed.send_keys(Keys.CONTROL, "a")
    seed.send_keys("5", Keys.TAB)
    browser.find_element(By.ID, "generate").click()
    status_text("Done.")
    source = browser.find_element(By.CSS_SELECTOR, "#result img").get_attribute("src")
    with urllib.request.urlopen(source) as response:
        shown = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#location-maps img")) == REQUEST.num_inference_steps

    # The same pipeline, called directly at the page's default scales with the seed typed in.
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(REQUEST.scale, s_plus_scale=REQUEST.s_plus_scale)
    expected = pipeline_image(pipe, dataclasses.replace(REQUEST, seed=5), ip_adapter_image=make_subject_image(0))
    np.testing.assert_array_equal(shown, expected)  # PNG: the page shows the pipeline's uint8 pixels exactly

    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo")
    browser.find_element(By.CSS_SELECTOR, "#subjects button[aria-label='Clear']").click()
    browser.find_element(By.CSS_SELECTOR, "#subjects input[type=file]").send_keys(str(bad))
    message = "'notes.txt' is not an image file: expected a photo (PNG, JPEG or WebP)."
    assert status_text("not an image") == f"Cannot use this upload: {message}"
    browser.find_element(By.ID, "generate").click()  # the app still serves, and refuses in the page again
    assert status_text("Not generated") == f"Not generated: {message}"
    assert "Traceback" not in browser.page_source
    assert not browser.find_elements(By.CSS_SELECTOR, "#result img")


def test_page_offers_world_subjects_in_one_click(browser, served_app):
    """A new user clicks an example subject and generates: the page shows the pipeline's image of that subject."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, studio = served_app
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    example = studio.examples[1]
    buttons = wait.until(lambda d: len(found := d.find_elements(By.CSS_SELECTOR, "#examples button")) == 2 and found)
    assert [b.text for b in buttons] == [e.name for e in studio.examples]
    button = buttons[1]
    button.click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value") == example.prompt)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "Done." in d.find_element(By.ID, "status").text)
    source = browser.find_element(By.CSS_SELECTOR, "#result img").get_attribute("src")
    with urllib.request.urlopen(source) as response:
        shown = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    pipe = tiny_sd15_pipeline()
    pipe.load_customcontrast(tiny_adapter(pipe))
    pipe.set_customcontrast_scale(REQUEST.scale, s_plus_scale=REQUEST.s_plus_scale)
    request = dataclasses.replace(REQUEST, prompt=example.prompt)
    np.testing.assert_array_equal(shown, pipeline_image(pipe, request, ip_adapter_image=example.image))


def test_world_examples_are_held_out_subjects_with_prompts_that_name_no_colour():
    examples = world_examples(4)
    assert [e.name.split(":")[0] for e in examples] == [f"heldout_{n:04d}" for n in range(4)]
    for example in examples:
        colours = example.name.split(" ")[3:]
        assert colours and not any(colour in example.prompt for colour in colours)
        assert example.image.getpixel((0, 0)) == (255, 255, 255)  # segmented on white, like a reference
