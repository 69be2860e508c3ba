"""The web page (Gradio): controls and results laid out around a :class:`~.studio.SubjectStudio`.

Only the page lives here; what it computes is in :mod:`.studio` and :mod:`.uploads`. A request the app cannot serve
(a bad upload, a bad number) is answered in the page's status line and a warning toast, in one sentence, and the
app keeps serving.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from .studio import MAX_LOCATION_FRAMES, SCALE_STRIP_FACTORS, GenerationRequest, SubjectExample, SubjectStudio
from .uploads import read_subject_images

__all__ = ["MAX_FILE_SIZE", "build_app", "launch_app"]

MAX_FILE_SIZE = "50mb"
"""Largest upload the server accepts (Gradio refuses larger files before they reach the app)."""

IMAGE_HEIGHT = 320  # shown size in pixels: a 64 px world image is scaled up, a 1024 px one down

# Small images (the world's are 64 px) are drawn large, with visible pixels rather than blurred.
CSS = """
#result img, #base img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#location-maps img, #scale-strip img { image-rendering: pixelated; }
"""


def build_app(studio: SubjectStudio) -> gr.Blocks:
    """The page for ``studio`` (start it with :func:`launch_app`)."""
    defaults = studio.defaults
    with gr.Blocks(title="CustomContrast", analytics_enabled=False) as app:
        gr.Markdown("# CustomContrast: a subject in any scene")
        gr.Markdown(studio.description, elem_id="description")
        with gr.Row():
            with gr.Column(scale=1):
                subjects = gr.File(label="Subject photos (one or several)", file_count="multiple", elem_id="subjects")
                prompt = gr.Textbox(label="Prompt", value=defaults.prompt, elem_id="prompt")
                if studio.examples:
                    gr.Examples(
                        examples=[[[path], example.prompt] for path, example in _example_files(studio.examples)],
                        inputs=[subjects, prompt],
                        example_labels=[example.name for example in studio.examples],
                        label="Or try a subject of the world, held out from training: click one, then Generate",
                        elem_id="examples",
                    )
                negative_prompt = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt)
                scale = gr.Slider(0.0, 2.0, value=defaults.scale, step=0.05, label="Scale (visual branch)")
                s_plus_scale = gr.Slider(0.0, 2.0, value=defaults.s_plus_scale, step=0.05, label="S+ scale")
                seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed", elem_id="seed")
                steps = gr.Slider(1, 100, value=defaults.num_inference_steps, step=1, label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=defaults.guidance_scale, step=0.5, label="Guidance scale")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    strip = gr.Button("Scale strip", elem_id="scale-strip-button")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    # PNG, not Gradio's default WebP: the page shows the pipeline's pixels exactly.
                    image = gr.Image(
                        label="With the subject", type="pil", format="png", height=IMAGE_HEIGHT, elem_id="result"
                    )
                    base_image = gr.Image(
                        label="Base model, same seed", type="pil", format="png", height=IMAGE_HEIGHT, elem_id="base"
                    )
                location_maps = gr.Gallery(
                    label="Where the subject acts: its location map at each step (white: the subject)",
                    columns=MAX_LOCATION_FRAMES // 2,
                    height=340,
                    format="png",
                    elem_id="location-maps",
                )
                scale_strip = gr.Gallery(
                    label="Scale strip: scale / S+ scale, the chosen ones times "
                    + ", ".join(f"{factor:g}" for factor in SCALE_STRIP_FACTORS),
                    columns=len(SCALE_STRIP_FACTORS),
                    height=200,
                    format="png",
                    elem_id="scale-strip",
                )

        controls = [subjects, prompt, negative_prompt, scale, s_plus_scale, seed, steps, guidance]

        def on_upload(files: Sequence[str] | None) -> str:
            try:
                photos = read_subject_images(files or [])
            except ValueError as error:
                return _refuse(error, "Cannot use this upload")
            return f"{len(photos)} photo{'s' if len(photos) > 1 else ''} of the subject ready."

        # Gradio hands a handler its progress bar through a default value of this type.
        def on_generate(*values, progress=gr.Progress()):  # noqa: B008
            try:
                photos, request = _read_controls(*values)
                result = studio.generate(photos, request, lambda done, what: progress(done, desc=what))
            except ValueError as error:
                return None, None, [], _refuse(error, "Not generated")
            return result.image, result.base_image, result.location_maps, " ".join(result.notes) or "Done."

        def on_strip(*values, progress=gr.Progress()):  # noqa: B008
            try:
                photos, request = _read_controls(*values)
                images = studio.scale_strip(photos, request, progress=lambda done, what: progress(done, desc=what))
            except ValueError as error:
                return [], _refuse(error, "Not generated")
            return images, "Done."

        subjects.upload(on_upload, subjects, status)
        generate.click(on_generate, controls, [image, base_image, location_maps, status])
        strip.click(on_strip, controls, [scale_strip, status])
    return app


def _example_files(examples: Sequence[SubjectExample]) -> list[tuple[str, SubjectExample]]:
    """Each example's reference written as a PNG (the file input takes paths; Gradio caches them for the page)."""
    folder = Path(tempfile.mkdtemp(prefix="customcontrast-examples-"))
    files = []
    for n, example in enumerate(examples):
        path = folder / f"subject_{n}.png"
        example.image.save(path)
        files.append((os.fspath(path), example))
    return files


def _read_controls(
    files: Sequence[str] | None,
    prompt: str,
    negative_prompt: str,
    scale: float,
    s_plus_scale: float,
    seed: float | None,
    steps: float,
    guidance: float,
):
    """The uploaded photos and the request the controls describe (``ValueError`` if they describe none)."""
    if seed is None:
        raise ValueError("expected a seed (a whole number), got an empty field")
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        scale=float(scale),
        s_plus_scale=float(s_plus_scale),
        seed=int(seed),
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
    )
    return read_subject_images(files or []), request


def _refuse(error: ValueError, what: str) -> str:
    """Tell the page why a request was refused: a warning toast, and the status line this returns."""
    message = str(error)
    message = message[:1].upper() + message[1:]
    gr.Warning(message)
    return f"**{what}:** {message}"


def launch_app(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **launch_kwargs) -> None:
    """Serve ``app`` on ``host:port`` (``port=None``: the first free one from 7860) with the page's style and
    upload limit; ``launch_kwargs`` go to ``gr.Blocks.launch`` (e.g. ``prevent_thread_lock=True``)."""
    app.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, css=CSS, **launch_kwargs)
