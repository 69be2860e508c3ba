"""Shared fixtures: tiny offline pipelines, subject images and a fake, offline Hugging Face Hub cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# Set before any test module imports huggingface_hub / diffusers, which read these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _hub_offline() -> Iterator[None]:
    # Also covers a huggingface_hub imported before this file (by a plugin), which missed the variable above.
    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(autouse=True, scope="session")
def _limit_torch_threads() -> None:
    # The tiny models are dominated by per-op overhead: one thread runs them fastest, and on a 2-core machine
    # shared with another process two OpenMP threads mostly wait on each other (measured 3-15x slower).
    torch.set_num_threads(1)


@pytest.fixture
def sd15_pipe():
    from diffusers_customcontrast.testing.tiny_models import tiny_sd15_pipeline

    return tiny_sd15_pipeline()


@pytest.fixture
def sdxl_pipe():
    from diffusers_customcontrast.testing.tiny_models import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture
def sd15_controlnet_pipe():
    from diffusers_customcontrast.testing.tiny_models import tiny_sd15_controlnet_pipeline

    return tiny_sd15_controlnet_pipeline()


@pytest.fixture
def subject_image():
    from diffusers_customcontrast.testing.tiny_models import make_subject_image

    return make_subject_image(0)


@pytest.fixture
def subject_image_b():
    from diffusers_customcontrast.testing.tiny_models import make_subject_image

    return make_subject_image(1)


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _link_or_copy(blob: Path, target: Path) -> None:
    # The real cache uses relative symlinks into blobs/; fall back to copies where symlinks are not allowed.
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:
        shutil.copyfile(blob, target)


def _populate_cache(cache_dir: Path, folder: str | os.PathLike, repo_id: str) -> Path:
    """Lay out ``folder`` as ``repo_id`` in a huggingface_hub cache and return its snapshot folder."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    hashes = {p: _file_hash(p) for p in files}
    # A stable fake commit: the same folder contents always give the same snapshot path.
    listing = "".join(f"{p.relative_to(folder).as_posix()}\0{h}\n" for p, h in hashes.items())
    commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path, digest in hashes.items():
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            _link_or_copy(blob, target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str | os.PathLike, str], Path]:
    """Return ``populate(folder, repo_id) -> snapshot_dir`` serving local folders as offline Hub repos.

    After ``populate(folder, "org/name")``, ``hf_hub_download("org/name", filename)`` and diffusers'
    ``from_pretrained("org/name")`` resolve from a private cache under ``tmp_path`` with no network.
    """
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf_home"
    cache_dir = hf_home / "hub"
    cache_dir.mkdir(parents=True)
    for name, value in {"HF_HOME": hf_home, "HF_HUB_CACHE": cache_dir, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    # huggingface_hub reads its environment once, at import time: patch the values it already holds.
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # Modules that copied these values with `from huggingface_hub.constants import ...`.
    copies = {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": str(cache_dir)},
        "diffusers.utils.hub_utils": {"HF_HUB_OFFLINE": True},
        "diffusers.loaders.lora_base": {"HF_HUB_OFFLINE": True},
        "diffusers.models.attention_dispatch": {"HF_HUB_OFFLINE": True},
    }
    for module_name, values in copies.items():
        module = sys.modules.get(module_name)
        for attr, value in values.items():
            if module is not None and hasattr(module, attr):
                monkeypatch.setattr(module, attr, value)

    def populate(folder: str | os.PathLike, repo_id: str) -> Path:
        return _populate_cache(cache_dir, folder, repo_id)

    return populate
