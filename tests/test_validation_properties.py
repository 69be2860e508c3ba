"""Property-based tests (hypothesis) of the adapter config and weight validation (issue 7).

Whatever a config.json or a weights file holds, loading either gives a working adapter whose tensors are exactly the
file's, or raises ``AdapterLoadError`` (a ``ValueError`` and an ``OSError``): never another exception type, never a
silently wrong adapter. The oracles below are written from the documented rules, not from the validator's code.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffusers_customcontrast import AdapterLoadError, CustomContrastAdapter, load_adapter
from diffusers_customcontrast.loaders.serialization import adapter_from_state_dict
from diffusers_customcontrast.models.config import BASE_FAMILIES, FORMAT_VERSION

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# A small valid config: two layers, every size tiny (building it takes milliseconds).
REFERENCE_CONFIG = {
    "image_embed_dim": 8,
    "cross_attention_dim": 8,
    "layer_names": ["down.attn2.processor", "up.attn2.processor"],
    "layer_hidden_sizes": [8, 16],
    "base_family": "custom",
    "image_encoder_hidden_size": 8,
    "image_feature_layers": [-2],
    "image_encoder": None,
    "hidden_size": 8,
    "num_heads": 2,
    "visual_depth": 1,
    "textual_depth": 1,
    "num_visual_tokens": 2,
    "num_textual_tokens": 2,
    "timestep_embed_dim": 8,
    "mlp_ratio": 2.0,
    "location_init_bias": 3.0,
    "format_version": FORMAT_VERSION,
}


def _reference_state_dict() -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = CustomContrastAdapter.from_config(REFERENCE_CONFIG)
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


REFERENCE_STATE = _reference_state_dict()


def _copy(state: dict) -> dict:
    """Loading assigns the given tensors to the adapter (no copy): give it copies, keep the references pristine."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _outcome(error: AdapterLoadError | None) -> None:
    """Label the example for ``--hypothesis-show-statistics`` (the figures in docs/reliability.md)."""
    if error is None:
        event("loaded")
        return
    message = str(error)
    kinds = ["Invalid CustomContrast adapter config", "missing keys", "unexpected keys", "wrong shape",
             "not dense floating-point", "NaN or infinite", "flat dict of tensors", "not a valid safetensors",
             "not a readable JSON", "must hold a JSON object"]  # fmt: skip
    event("refused: " + ", ".join(kind for kind in kinds if kind in message))


def _assert_works(adapter: CustomContrastAdapter, state_dict: dict[str, torch.Tensor]) -> None:
    """The adapter holds exactly ``state_dict`` (cast to its dtype) and runs to finite tokens."""
    loaded = adapter.state_dict()
    assert loaded.keys() == state_dict.keys()
    dtypes = {v.dtype for v in loaded.values()}
    assert len(dtypes) == 1, dtypes
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
    adapter = adapter.float()
    with torch.no_grad():
        tokens = adapter(torch.randn(2, 5, adapter.config.image_embed_dim), torch.tensor([10, 900]))
    assert tokens.s_plus.shape == (2, adapter.num_layers, adapter.config.num_textual_tokens, 8)
    assert torch.isfinite(tokens.s_plus).all() and torch.isfinite(tokens.visual).all()


# ------------------------------------------------------------------------------------------------ configs

NOT_NONE = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 0),
    st.integers(2**31, 10**400),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
BAD_ANY = st.none() | NOT_NONE
POSITIVE_INTS = {
    "image_embed_dim": st.integers(1, 16),
    "cross_attention_dim": st.integers(1, 16),
    "hidden_size": st.integers(1, 16),
    "num_heads": st.integers(1, 8),
    "visual_depth": st.integers(1, 2),
    "textual_depth": st.integers(1, 2),
    "num_visual_tokens": st.integers(1, 4),
    "num_textual_tokens": st.integers(1, 4),
    "timestep_embed_dim": st.integers(1, 16),
}
VALID = {
    **POSITIVE_INTS,
    "layer_names": st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3, unique=True),
    "layer_hidden_sizes": st.lists(st.integers(1, 16), min_size=1, max_size=3),
    "base_family": st.sampled_from(BASE_FAMILIES),
    "image_encoder_hidden_size": st.none() | st.integers(1, 16),
    "image_feature_layers": st.none() | st.lists(st.integers(-4, 4), min_size=1, max_size=3),
    "image_encoder": st.none() | st.text(max_size=10),
    "mlp_ratio": st.floats(0.05, 4.0),
    "location_init_bias": st.floats(-10, 10),
    "format_version": st.integers(1, FORMAT_VERSION),
}
INVALID = {
    **{name: BAD_ANY.filter(lambda v: not _is_int(v) or v < 1) for name in POSITIVE_INTS},
    "layer_names": st.one_of(
        st.just([]), st.lists(st.integers(), min_size=1, max_size=2), st.just(["a", "a"]), st.just([""]), BAD_ANY
    ).filter(
        lambda v: (
            not isinstance(v, list) or not v or not all(isinstance(n, str) and n for n in v) or len(set(v)) < len(v)
        )
    ),
    "layer_hidden_sizes": st.one_of(
        st.lists(st.sampled_from([0, -1, 8.0, "8", None, True, 2**40]), min_size=1, max_size=2), BAD_ANY
    ).filter(lambda v: not isinstance(v, list) or not all(_is_int(w) and w >= 1 for w in v)),
    "base_family": st.text(max_size=6).filter(lambda v: v not in BASE_FAMILIES) | st.integers(),
    "image_encoder_hidden_size": NOT_NONE.filter(lambda v: not _is_int(v) or v < 1),
    "image_feature_layers": st.one_of(
        st.just([]), st.lists(st.sampled_from([1.0, "x", None]), min_size=1, max_size=2)
    ),
    "image_encoder": st.integers() | st.lists(st.text(max_size=2), max_size=2),
    "mlp_ratio": st.one_of(
        st.just(0.0), st.just(-1.0), st.just(float("nan")), st.just(float("inf")), st.text(max_size=3)
    ),
    "location_init_bias": st.one_of(st.just(float("nan")), st.just(float("-inf")), st.none(), st.text(max_size=3)),
    "format_version": st.one_of(st.integers(FORMAT_VERSION + 1, 10**6), st.integers(-5, 0), st.just("1"), st.none()),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**31


def _rules_hold(config: dict) -> bool:
    """The documented rules, independently of the validator: types, ranges and the few joint constraints."""
    names, sizes = config["layer_names"], config["layer_hidden_sizes"]
    ratio = config["mlp_ratio"]
    return (
        isinstance(names, list)
        and isinstance(sizes, list)
        and len(names) == len(sizes)
        and config["hidden_size"] % config["num_heads"] == 0
        and isinstance(ratio, float)
        and config["hidden_size"] * ratio >= 1
    )


def _same_shapes(config: dict) -> bool:
    """Whether a valid ``config`` asks for the reference tensor shapes (then the reference weights must load)."""
    with torch.device("meta"):
        expected = CustomContrastAdapter.from_config(config).state_dict()
    return expected.keys() == REFERENCE_STATE.keys() and all(
        expected[k].shape == REFERENCE_STATE[k].shape for k in expected
    )


@st.composite
def configs(draw):
    config = dict(REFERENCE_CONFIG)
    changes = draw(st.lists(st.sampled_from(sorted(REFERENCE_CONFIG)), max_size=3, unique=True))
    invalid = False
    for name in changes:
        if draw(st.booleans()):
            config[name] = draw(INVALID[name])
            invalid = True
        else:
            config[name] = draw(VALID[name])
    return config, invalid


@SETTINGS
@given(configs())
def test_random_configs_load_correctly_or_raise_adapter_load_error(drawn):
    config, invalid = drawn
    try:
        adapter = adapter_from_state_dict(config, _copy(REFERENCE_STATE))
    except AdapterLoadError as error:
        _outcome(error)
        assert isinstance(error, ValueError) and isinstance(error, OSError)
        assert invalid or not _rules_hold(config) or not _same_shapes(config), (config, error)
        return
    _outcome(None)
    assert not invalid and _rules_hold(config), config
    _assert_works(adapter, REFERENCE_STATE)
    for name in ("layer_names", "base_family", "num_heads", "location_init_bias"):
        assert adapter.config[name] == config[name]


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=4),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
                    max_leaves=8),
       st.sampled_from(sorted(REFERENCE_CONFIG)))  # fmt: skip
def test_any_json_value_in_any_field_is_handled(value, name):
    config = {**REFERENCE_CONFIG, name: value}
    try:
        adapter = adapter_from_state_dict(config, _copy(REFERENCE_STATE))
    except AdapterLoadError as error:
        _outcome(error)
        return
    _outcome(None)
    _assert_works(adapter, REFERENCE_STATE)


# ------------------------------------------------------------------------------------------------ state dicts

KEYS = sorted(REFERENCE_STATE)
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]

corruptions = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(KEYS)),
    st.tuples(st.just("add"), st.text(min_size=1, max_size=12), st.lists(st.integers(1, 4), max_size=3)),
    st.tuples(st.just("reshape"), st.sampled_from(KEYS), st.lists(st.integers(1, 20), max_size=3)),
    st.tuples(st.just("retype"), st.sampled_from(KEYS), st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES)),
    st.tuples(st.just("nonfinite"), st.sampled_from(KEYS), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("not a tensor"), st.sampled_from(KEYS), st.sampled_from([1.0, [1.0], "x", None])),
    st.tuples(st.just("non-string key"), st.integers(0, 3)),
    st.tuples(st.just("transpose"), st.sampled_from(KEYS)),
    # Harmless changes, drawn as often as the rest together: the adapter must then load with exactly these values.
    st.tuples(st.just("retype"), st.sampled_from(KEYS), st.sampled_from(FLOAT_DTYPES)),
    st.tuples(st.just("transpose"), st.sampled_from([k for k in KEYS if REFERENCE_STATE[k].shape == (8, 8)])),
)


def _apply(state: dict, corruption: tuple) -> None:
    kind, *args = corruption
    if kind == "drop":
        state.pop(args[0], None)
    elif kind == "add":
        state[args[0]] = torch.zeros(args[1])
    elif kind == "reshape" and args[0] in state and torch.is_tensor(state[args[0]]):
        state[args[0]] = torch.zeros(args[1], dtype=state[args[0]].dtype)
    elif kind == "retype" and args[0] in state and torch.is_tensor(state[args[0]]):
        state[args[0]] = state[args[0]].to(args[1])
    elif kind == "nonfinite" and args[0] in state and torch.is_tensor(state[args[0]]):
        tensor = state[args[0]]
        if tensor.is_floating_point() and tensor.numel():
            flat = tensor.flatten().clone()
            flat[0] = args[1]
            state[args[0]] = flat.reshape(tensor.shape)
    elif kind == "not a tensor":
        state[args[0]] = args[1]
    elif kind == "non-string key":
        state[args[0]] = torch.zeros(1)
    elif kind == "transpose" and args[0] in state and torch.is_tensor(state[args[0]]):
        state[args[0]] = state[args[0]].t() if state[args[0]].ndim == 2 else state[args[0]]


def _should_load(state: dict) -> bool:
    """Exactly the reference names and shapes, dense finite floating-point tensors."""
    return (
        all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
        and state.keys() == REFERENCE_STATE.keys()
        and all(v.shape == REFERENCE_STATE[k].shape for k, v in state.items())
        and all(v.is_floating_point() and torch.isfinite(v).all() for v in state.values())
    )


@pytest.mark.filterwarnings("ignore:Casting complex values to real:UserWarning")  # a retype to complex and back
@SETTINGS
@given(st.lists(corruptions, max_size=4))
def test_random_state_dict_corruptions_load_exactly_or_raise(changes):
    state = dict(REFERENCE_STATE)
    for corruption in changes:
        _apply(state, corruption)
    try:
        adapter = adapter_from_state_dict(REFERENCE_CONFIG, _copy(state))
    except AdapterLoadError as error:
        _outcome(error)
        assert not _should_load(state), (changes, error)
        return
    _outcome(None)
    assert _should_load(state), changes
    _assert_works(adapter, state)


# ------------------------------------------------------------------------------------------------ files


def _saved_reference() -> tuple[bytes, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        save_file(REFERENCE_STATE, path)
        data = path.read_bytes()
    return data, 8 + int.from_bytes(data[:8], "little")


REFERENCE_FILE, HEADER_END = _saved_reference()


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=3),
    st.none() | st.integers(0, len(REFERENCE_FILE) - 1),
)
def test_damaged_safetensors_header_or_truncation_never_loads_wrong_weights(overwrites, truncate_at):
    """Bytes of the header overwritten, or the file cut short. (Damage inside the tensor data cannot be detected:
    safetensors has no checksum; files from the hub are checked by huggingface_hub against their sha256.)"""
    data = bytearray(REFERENCE_FILE)
    for position, value in overwrites:
        data[position] = value
    if truncate_at is not None:
        data = data[:truncate_at]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(REFERENCE_CONFIG))
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
        try:
            adapter = load_adapter(folder)
        except AdapterLoadError as error:
            _outcome(error)
            return
    _outcome(None)
    _assert_works(adapter, REFERENCE_STATE)  # the damage was harmless (e.g. header padding): the very same weights


@SETTINGS
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_config_json_bytes_are_handled(content):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_bytes(content)
        save_file(REFERENCE_STATE, Path(folder) / "diffusion_pytorch_model.safetensors")
        with pytest.raises(AdapterLoadError) as error:
            load_adapter(folder)
        _outcome(error.value)
