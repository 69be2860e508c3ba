"""docs/quickstart.md's first Python snippet runs as written, against the folders `make demo` writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from customcontrast_world import load_synthetic_base, write_world
from diffusers_customcontrast import CustomContrastAdapter

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def test_the_world_snippet_makes_a_subject_image(tmp_path, monkeypatch):
    # What `make demo` leaves behind, at the smallest size: a world, and an adapter folder for the shipped base
    # (untrained here: the snippet's plumbing is under test, not the adapter's quality).
    write_world(tmp_path / "demo-output" / "world", num_train_subjects=2, num_heldout_subjects=2, frames_per_subject=2)
    base = load_synthetic_base()
    torch.manual_seed(0)
    CustomContrastAdapter.from_unet(base.unet, base.image_encoder).save_pretrained(
        tmp_path / "demo-output" / "adapter"
    )
    plain = base("a star", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    snippet = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text(encoding="utf-8"), re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(QUICKSTART), "exec"), namespace)

    image = np.asarray(namespace["image"])
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert (tmp_path / "first_subject.png").is_file()
    pipe = namespace["pipe"]
    after = pipe("a star", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(after, plain)  # the snippet ends with the base pipeline, exactly
