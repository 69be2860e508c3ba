"""What `pip install .` gives a user: the inference library alone, its six dependencies, no world assets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE_DEPENDENCIES = {"torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "pillow"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
    subprocess.run([*command, str(ROOT)], check=True, capture_output=True)
    (built,) = folder.glob("diffusers_customcontrast-*.whl")
    return built


def _requirement_name(line: str) -> str:
    name = line.split(":", 1)[1].strip()
    for stop in " ;<>=!~[(":
        name = name.split(stop, 1)[0]
    return name.lower().replace("-", "_")


def test_the_wheel_holds_the_library_and_no_world(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    packages = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert packages == {"diffusers_customcontrast"}
    assert not [n for n in names if "/assets/" in n or n.endswith((".safetensors", ".jsonl", ".png"))]
    assert "diffusers_customcontrast/models/adapter.py" in names and "diffusers_customcontrast/train.py" in names
    required = {_requirement_name(line) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
                and "extra ==" not in line}  # fmt: skip
    assert required == BASE_DEPENDENCIES
    assert wheel.stat().st_size < 1_000_000  # the library is code; the world's 30 MB of assets ship apart


def test_the_library_imports_none_of_the_world():
    """Importing every library module leaves the world package unimported (the world uses the library, never back)."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import diffusers_customcontrast
        for module in pkgutil.walk_packages(diffusers_customcontrast.__path__, "diffusers_customcontrast."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
        print(sorted(m for m in sys.modules if m.startswith("customcontrast_world")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="the virtualenv layout differs")
def test_a_fresh_virtualenv_with_pip_install_dot_generates(wheel: Path, tmp_path: Path):
    """``pip install .`` with no extras in a new virtualenv: import, load an adapter onto a tiny pipeline, generate."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"),
         str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    if install.returncode and ("Could not find" in install.stderr or "connection" in install.stderr.lower()):
        pytest.skip(f"the package registry is out of reach: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr
    script = textwrap.dedent(
        """
        import importlib.util
        import diffusers_customcontrast
        from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_adapter, tiny_sd15_pipeline
        pipe = tiny_sd15_pipeline()
        pipe.load_customcontrast(tiny_adapter(pipe))
        image = pipe("a dog", ip_adapter_image=make_subject_image(0), num_inference_steps=2, output_type="np").images
        absent = [m for m in ("accelerate", "peft", "customcontrast_world") if importlib.util.find_spec(m)]
        print(image.shape, absent)
        """
    )
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "(1, 64, 64, 3) []"
