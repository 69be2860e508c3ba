"""Reading an adapter's files (``config.json`` + safetensors weights) from disk or the Hugging Face Hub, safely.

Weights load from safetensors; a ``.bin`` file only through ``torch.load(weights_only=True)``, which refuses
arbitrary pickled objects. Every problem is reported in one sentence before anything is changed. The adapter itself is
built from what these functions read by :meth:`CustomContrastAdapter.from_pretrained
<diffusers_customcontrast.models.adapter.CustomContrastAdapter.from_pretrained>`; nothing here knows the adapter.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
# A weight only the adapters saved before format 2 have: the learned queries of their visual Q-Former.
EARLIER_LAYOUT_KEY = "encoder.visual_queries"
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")


class AdapterLoadError(OSError, ValueError):
    """A CustomContrast adapter could not be read: a missing, corrupt, unsafe or mismatched file."""


def resolve_file(
    pretrained_model_name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs
) -> Path:
    """The local path of ``filename`` in a local folder or a hub repository (downloaded or from the cache).

    A source that is no folder here but reads as a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or one under a folder
    that exists) is refused at once: asking the hub for it would only retry for a name that is not a repository id.
    """
    source = Path(pretrained_model_name_or_path).expanduser()
    if source.is_dir():
        path = source / (subfolder or "") / filename
        if not path.is_file():
            raise AdapterLoadError(
                f"No file named '{filename}' in '{path.parent}'.{_subfolder_hint(path.parent, filename)}"
            )
        return path
    if _looks_local(str(pretrained_model_name_or_path)):
        raise AdapterLoadError(
            f"'{pretrained_model_name_or_path}' is not a folder on this machine, and it is a path rather than a hub "
            "repository id ('org/name'), so the hub was not asked: check the path."
        )
    try:
        return Path(
            hf_hub_download(
                str(pretrained_model_name_or_path),
                filename,
                subfolder=subfolder or None,
                **{k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and k != "proxies"},
            )
        )
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, ValueError) as error:
        where = f"{pretrained_model_name_or_path}" + (f"/{subfolder}" if subfolder else "")
        raise AdapterLoadError(
            f"Could not get '{filename}' from '{where}' (neither a local folder nor a reachable hub repository "
            f"holding it): {error}"
        ) from error


def _looks_local(source: str) -> bool:
    """Whether ``source`` can only be meant as a local path (it is not a valid hub repository id, or its first part
    is a folder here)."""
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return source.startswith((".", "~")) or Path(source.split("/")[0]).is_dir()


def _subfolder_hint(folder: Path, filename: str) -> str:
    """ " It is in '<sub>': pass subfolder='<sub>'." for the first folders below ``folder`` holding ``filename``."""
    found = sorted(p.parent.relative_to(folder).as_posix() for p in folder.glob(f"*/{filename}"))
    found += sorted(p.parent.relative_to(folder).as_posix() for p in folder.glob(f"*/*/{filename}"))
    if not found:
        return ""
    where = " and ".join(f"'{f}'" for f in found[:2])
    return (
        f" A subfolder holds one ({where}): pass subfolder='{found[0]}', or the folder '{folder / found[0]}' itself."
    )


def safe_torch_load(path: str | os.PathLike) -> object:
    """``torch.load`` that refuses anything but tensors and plain containers (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise AdapterLoadError(
            f"Refusing '{path}': it is not a plain tensor checkpoint loadable with torch.load(weights_only=True) "
            f"(convert it to safetensors): {error}"
        ) from error
    except Exception as error:  # RuntimeError or OSError for a damaged or cut-off archive
        raise AdapterLoadError(
            f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt): {error}"
        ) from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.bin``/``.pt`` file that holds nothing but tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types, and OSError for short files
            raise AdapterLoadError(
                f"'{path}' is not a valid safetensors file (truncated or corrupt): {error}"
            ) from error
    state_dict = safe_torch_load(path)
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()
    ):
        raise AdapterLoadError(f"'{path}' does not hold a flat dict of tensors keyed by name.")
    return state_dict


def read_config(path: str | os.PathLike) -> dict:
    """The adapter's ``config.json`` as a dict."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise AdapterLoadError(f"'{path}' is not a readable JSON config: {error}") from error
    if not isinstance(config, dict):
        raise AdapterLoadError(f"'{path}' must hold a JSON object, got {type(config).__name__}.")
    return config


def check_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Refuse tensors that are not dense, finite floating-point data; give mixed float dtypes one dtype (float32)."""
    not_float = [
        k for k, v in state_dict.items() if not v.is_floating_point() or v.layout != torch.strided or v.is_meta
    ]
    if not_float:
        key = not_float[0]
        raise AdapterLoadError(
            f"The weights hold {len(not_float)} tensors that are not dense floating-point data (e.g. '{key}': "
            f"{state_dict[key].dtype}, {state_dict[key].layout}{', meta' if state_dict[key].is_meta else ''})."
        )
    # A finite float32 sum proves a tensor finite (any NaN or inf makes it non-finite) and is one pass without a
    # boolean copy; only a non-finite sum, from bad values or from overflow, needs the exact element-wise check.
    not_finite = [
        k
        for k, v in state_dict.items()
        if not torch.isfinite(v.sum(dtype=torch.float32)) and not torch.isfinite(v).all()
    ]
    if not_finite:
        raise AdapterLoadError(
            f"The weights hold NaN or infinite values in {len(not_finite)} tensors (e.g. '{not_finite[0]}'): the file "
            "is damaged or the training diverged."
        )
    if len({v.dtype for v in state_dict.values()}) > 1:
        state_dict = {k: v.float() for k, v in state_dict.items()}
    return state_dict


def check_flat(state_dict: object) -> None:
    """A one-sentence :class:`AdapterLoadError` unless ``state_dict`` is a flat dict of tensors keyed by name."""
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()
    ):
        raise AdapterLoadError("The weights must be a flat dict of tensors keyed by name.")


def check_state_dict(expected: dict[str, torch.Tensor], state_dict: object) -> dict[str, torch.Tensor]:
    """``state_dict`` checked against the ``expected`` keys and shapes (a one-sentence :class:`AdapterLoadError`
    naming what is missing, unexpected or misshapen) and by :func:`check_tensors`."""
    check_flat(state_dict)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
        if wrong_shape:
            key = wrong_shape[0]
            problems.append(
                f"{len(wrong_shape)} tensors of the wrong shape (e.g. '{key}': expected "
                f"{tuple(expected[key].shape)}, got {tuple(state_dict[key].shape)})"
            )
        raise AdapterLoadError("The weights do not match the adapter config: " + "; ".join(problems) + ".")
    return check_tensors(state_dict)
