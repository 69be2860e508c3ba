"""``CustomContrastAdapterConfig``: every setting of a CustomContrast adapter, with its checks, in one place.

The adapter (:class:`~diffusers_customcontrast.models.adapter.CustomContrastAdapter`) is built from it, ``config.json``
holds its fields (the keys of every adapter folder saved so far), the training configuration names the options a
user chooses (:data:`ARCHITECTURE_OPTIONS`) and the convert command line takes them as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .unet_layout import CrossAttentionLayout, cross_attention_layout

__all__ = [
    "ARCHITECTURE_OPTIONS",
    "BASE_FAMILIES",
    "FORMAT_VERSION",
    "IMAGE_INPUTS",
    "TV_FUSION_INITS",
    "TV_FUSION_RESIDUALS",
    "VISUAL_PROJECTIONS",
    "CustomContrastAdapterConfig",
]

# 2: the visual Q-Former is IP-Adapter-Plus's Resampler (with a CLS query), the TV fusion a residual, each layer has
# a location gate. Format-1 configs read the same; their weights (the earlier layout) are refused by the loader.
FORMAT_VERSION = 2
TV_FUSION_INITS = ("random", "identity")
# Where the TV fusion adds its re-weighted tokens (issue 29): "normalised", before the visual projection's output
# LayerNorm (every layer's tokens are normalised as IP-Adapter-Plus's are, whatever the fusion adds; its queries and
# keys RMS-normalised, so its attention logits are bounded); "capped", after it, with the added part's RMS capped
# (models/mfi_encoder.py's MAX_FUSION_RMS), the form of every adapter saved before the field existed: a config.json
# without it reads as "capped" (an older version refuses the unknown key of a newer adapter).
TV_FUSION_RESIDUALS = ("normalised", "capped")
# What the adapter reads: hidden states of the image encoder (IP-Adapter-Plus), or its pooled, projected
# ``image_embeds`` (plain IP-Adapter), which diffusers' pipelines then compute, with zeros as the negative.
IMAGE_INPUTS = ("hidden_states", "image_embeds")
# How the visual tokens are made: IP-Adapter-Plus's Resampler, or plain IP-Adapter's linear projection.
VISUAL_PROJECTIONS = ("resampler", "linear")
BASE_FAMILIES = ("sd15", "sdxl", "custom")
MAX_SIZE = 2**31 - 1  # widths, depths and counts above this are a damaged config, not a model


def _option(default: Any, help: str) -> Any:
    """A field with its documentation in ``metadata["help"]`` (shown by the training command line)."""
    return field(default=default, metadata={"help": help})


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(value) <= MAX_SIZE


def _is_number(value: object) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_size(value: object) -> bool:
    return _is_int(value) and value >= 1


def _is_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple))


# Field -> (the rule, what the field must be): one sentence per broken rule, naming the field and its value.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{
        name: (_is_size, f"a positive integer up to {MAX_SIZE}")
        for name in (
            "image_embed_dim",
            "cross_attention_dim",
            "hidden_size",
            "num_heads",
            "visual_depth",
            "textual_depth",
            "num_visual_tokens",
            "num_textual_tokens",
            "timestep_embed_dim",
        )  # fmt: skip
    },
    "image_encoder_hidden_size": (lambda v: v is None or _is_size(v), f"a positive integer up to {MAX_SIZE} or null"),
    "layer_names": (
        lambda v: _is_sequence(v) and len(v) > 0 and all(isinstance(n, str) and n for n in v),
        "a non-empty list of cross-attention processor names",
    ),
    "layer_hidden_sizes": (
        lambda v: _is_sequence(v) and all(map(_is_size, v)),
        f"a list of positive integers up to {MAX_SIZE}",
    ),
    "base_family": (lambda v: isinstance(v, str) and v in BASE_FAMILIES, f"one of {', '.join(BASE_FAMILIES)}"),
    "image_feature_layers": (
        lambda v: v is None or (_is_sequence(v) and len(v) > 0 and all(map(_is_int, v))),
        "a non-empty list of hidden-state indices or null",
    ),
    "image_encoder": (lambda v: v is None or isinstance(v, str), "a hub id or path or null"),
    "mlp_ratio": (_is_number, "a number with hidden_size * mlp_ratio in [1, {max}]"),
    "location_init_bias": (_is_number, "a finite number"),
    "location_gate_init": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "tv_fusion_init": (lambda v: isinstance(v, str) and v in TV_FUSION_INITS, f"one of {', '.join(TV_FUSION_INITS)}"),
    "tv_fusion_residual": (
        lambda v: isinstance(v, str) and v in TV_FUSION_RESIDUALS,
        f"one of {', '.join(TV_FUSION_RESIDUALS)}",
    ),
    "qformer_qk_norm": (lambda v: isinstance(v, bool), "true or false"),
    "s_plus_scale": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "image_input": (lambda v: isinstance(v, str) and v in IMAGE_INPUTS, f"one of {', '.join(IMAGE_INPUTS)}"),
    "visual_projection": (
        lambda v: isinstance(v, str) and v in VISUAL_PROJECTIONS,
        f"one of {', '.join(VISUAL_PROJECTIONS)}",
    ),
}


def _fail(name: str, value: Any, what: str) -> ValueError:
    return ValueError(f"{name} must be {what.format(max=MAX_SIZE)}, got {value!r}.")


def _check_format_version(version: object) -> None:
    if not _is_int(version) or version < 1:
        raise ValueError(f"format_version must be a positive integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"This adapter uses config format version {version}, but this version of diffusers-customcontrast "
            f"reads up to version {FORMAT_VERSION}: upgrade diffusers-customcontrast."
        )


def _check_joint(values: Mapping[str, Any]) -> None:
    """The rules that tie fields together (each field is already of the right type)."""
    names, sizes = values["layer_names"], values["layer_hidden_sizes"]
    if len(set(names)) != len(names):
        raise _fail("layer_names", names, "a list of distinct names")
    if len(sizes) != len(names):
        raise ValueError(
            "CustomContrastAdapter needs one hidden size per cross-attention layer; got "
            f"{len(names)} layer names and {len(sizes)} hidden sizes "
            "(build it with CustomContrastAdapter.from_unet(unet, image_encoder))."
        )
    if not 1 <= values["hidden_size"] * values["mlp_ratio"] <= MAX_SIZE:
        raise _fail("mlp_ratio", values["mlp_ratio"], _RULES["mlp_ratio"][1])
    if values["hidden_size"] % values["num_heads"]:
        raise ValueError(
            f"hidden_size ({values['hidden_size']}) must be divisible by num_heads ({values['num_heads']})."
        )
    pooled = values["image_input"] == "image_embeds"
    if pooled and values["image_feature_layers"] is not None:
        raise ValueError(
            "image_feature_layers selects hidden states, which an adapter with image_input 'image_embeds' does not "
            f"read: leave it out, got {list(values['image_feature_layers'])!r}."
        )
    if values["visual_projection"] == "linear" and not pooled:
        raise ValueError(
            "visual_projection 'linear' projects one pooled image embedding, so it needs image_input 'image_embeds', "
            f"got {values['image_input']!r}."
        )


@dataclass(frozen=True)
class CustomContrastAdapterConfig:
    r"""The shape of a CustomContrast adapter and what it was built for.

    Three kinds of fields: what the adapter reads (the image encoder's features), the UNet it plugs into (read from
    the UNet by :meth:`for_unet`), and the encoder's own shape, chosen by the user (:data:`ARCHITECTURE_OPTIONS`).
    Every value is checked when the config is made: a wrong type or an impossible value raises a one-sentence
    ``ValueError`` naming the field. Sequences are stored as tuples (the config is immutable); :meth:`to_dict` gives
    the JSON form of ``config.json``.
    """

    # What the adapter reads.
    image_embed_dim: int = _option(
        1280, "Width of the image features F: the image encoder's hidden size times the number of feature layers."
    )
    image_encoder_hidden_size: int | None = _option(None, "Hidden size of the CLIP vision model the adapter expects.")
    image_input: str = _option(
        "hidden_states",
        "'hidden_states': F is hidden states of the image encoder (image_feature_layers), what IP-Adapter-Plus reads; "
        "'image_embeds': F is CLIP's pooled, projected image embedding as a one-token sequence, what plain "
        "IP-Adapter reads (pipelines then give zeros as the negative).",
    )
    image_feature_layers: tuple[int, ...] | None = _option(
        None,
        "Hidden states of the image encoder concatenated into F (unset: the penultimate, what diffusers' "
        "IP-Adapter route computes); unset with image_input 'image_embeds'.",
    )
    image_encoder: str | None = _option(None, "Hub id or path of the image encoder it was trained with (informative).")
    # The UNet it plugs into.
    cross_attention_dim: int = _option(768, "The UNet's context width D_ctx (768 for SD1.5, 2048 for SDXL).")
    layer_names: tuple[str, ...] = _option((), "The UNet's cross-attention processor names, in attn_processors order.")
    layer_hidden_sizes: tuple[int, ...] = _option((), "The key width of each of those layers.")
    base_family: str = _option("custom", "'sd15', 'sdxl' or 'custom', recorded to explain mismatches.")
    # The MFI encoder's shape.
    hidden_size: int = _option(768, "Width of the Q-Formers of the MFI encoder.")
    num_heads: int = _option(12, "Attention heads of the Q-Formers.")
    visual_projection: str = _option(
        "resampler",
        "'resampler': the visual Q-Former, IP-Adapter-Plus's Resampler with a CLS query; 'linear': plain "
        "IP-Adapter's projection (Linear to num_visual_tokens x cross_attention_dim, then LayerNorm), for "
        "image_input 'image_embeds'.",
    )
    visual_depth: int = _option(4, "Blocks of the visual Q-Former (IP-Adapter-Plus's Resampler has 4).")
    textual_depth: int = _option(2, "Blocks of the textual Q-Former.")
    num_visual_tokens: int = _option(
        16, "Visual tokens Nv (besides the visual CLS): the tokens each layer's visual cross-attention reads."
    )
    num_textual_tokens: int = _option(8, "S+ tokens Ns per cross-attention layer.")
    timestep_embed_dim: int = _option(256, "Width of the sinusoidal timestep features of the textual Q-Former.")
    mlp_ratio: float = _option(4.0, "MLP expansion of the Q-Former blocks.")
    qformer_qk_norm: bool = _option(
        True,
        "RMS-normalise the queries and keys of the Q-Formers' attentions per head (parameter-free QK-norm: logits "
        "within sqrt(head width), stable in float16 and bfloat16 at any weight size); false: plain attention, what "
        "IP-Adapter-Plus's Resampler computes and what a config.json without this field means.",
    )
    location_init_bias: float = _option(
        3.0, "Initial bias of the location heads: the maps start as sigmoid(standardised affinity + bias)."
    )
    # How the parts CustomContrast adds to IP-Adapter-Plus start (a converted IP-Adapter: identity, 0.0, 0.0).
    tv_fusion_init: str = _option(
        "random",
        "'identity' starts the TV fusion's residual at zero (every layer reads the visual Q-Former's tokens as they "
        "are); 'random' initialises it as any linear layer.",
    )
    tv_fusion_residual: str = _option(
        "normalised",
        "'normalised' adds the TV fusion's re-weighted tokens before the visual tokens' output LayerNorm, with "
        "RMS-normalised queries and keys (stable in float16 and bfloat16 at any weight size); 'capped' adds them "
        "after it, their RMS capped at 16 (what a config.json without this field means: adapters saved before it).",
    )
    location_gate_init: float = _option(
        1.0, "Initial strength of the location gates: 1 gates the visual branch by the location map, 0 leaves it open."
    )
    s_plus_scale: float = _option(
        1.0, "The S+ scale beta the adapter is loaded with (0: S+ tokens off until set_customcontrast_scale)."
    )
    format_version: int = _option(FORMAT_VERSION, "Version of this config format; newer versions are refused.")

    def __post_init__(self) -> None:
        # The format version first: a newer format may mean something else by the other fields.
        _check_format_version(self.format_version)
        if self.image_feature_layers is None and self.image_input == "hidden_states":  # unset: the penultimate
            object.__setattr__(self, "image_feature_layers", (-2,))
        for name, (rule, what) in _RULES.items():
            value = getattr(self, name)
            if not rule(value):
                raise _fail(name, value, what)
            if _is_sequence(value):
                object.__setattr__(self, name, tuple(value))
        _check_joint(dataclasses.asdict(self))

    # -------------------------------------------------------------------------------------------- construction

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CustomContrastAdapterConfig:
        """A config from the fields of a ``config.json``; diffusers' bookkeeping keys (``_class_name``, ...) are skipped.

        Raises ``ValueError`` for an unknown key (a typo would otherwise build a default-sized adapter) and for any
        invalid value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(
                f"An adapter config must be a mapping of field names to values, got {type(values).__name__}."
            )
        _check_format_version(values.get("format_version", FORMAT_VERSION))
        fields = {k: v for k, v in values.items() if not (isinstance(k, str) and k.startswith("_"))}
        # Saved before these fields existed: they mean what those adapters computed.
        fields.setdefault("tv_fusion_residual", "capped")
        fields.setdefault("qformer_qk_norm", False)
        unknown = sorted(str(k) for k in fields if k not in cls.field_names())
        if unknown:
            raise ValueError(
                f"Unknown CustomContrast adapter config key '{unknown[0]}'; the keys are {', '.join(cls.field_names())}."
            )
        return cls(**fields)

    @classmethod
    def for_unet(
        cls, unet: nn.Module, image_encoder: nn.Module | None = None, /, **options: Any
    ) -> CustomContrastAdapterConfig:
        """The config of a new adapter for ``unet``: layer names and widths from the UNet, the feature width from
        ``image_encoder`` (a CLIP vision model, given by position), everything else from ``options`` (any field but
        the UNet's; ``image_encoder=`` among them is the informative hub id)."""
        derived = ("layer_names", "layer_hidden_sizes", "cross_attention_dim", "base_family")
        for name in options:
            if name in derived:
                raise ValueError(f"'{name}' is read from the UNet and cannot be given as an adapter option.")
            if name not in cls.field_names():
                valid = ", ".join(n for n in cls.field_names() if n not in derived)
                raise ValueError(f"Unknown adapter option '{name}'; the options are {valid}.")
        layout = cross_attention_layout(unet)
        if image_encoder is not None:
            layers = options.get("image_feature_layers") or (-2,)
            width = image_encoder.config.hidden_size
            options.setdefault("image_encoder_hidden_size", width)
            if options.get("image_input") == "image_embeds":
                options.setdefault("image_embed_dim", image_encoder.config.projection_dim)
            else:
                options.setdefault("image_embed_dim", width * len(layers) if _is_sequence(layers) else width)
        return cls(
            layer_names=layout.names,
            layer_hidden_sizes=layout.hidden_sizes,
            cross_attention_dim=layout.cross_attention_dim,
            base_family=layout.family,
            **options,
        )

    @staticmethod
    def check_options(options: Mapping[str, Any], exclude: Sequence[str] = ()) -> None:
        """Check user-chosen :data:`ARCHITECTURE_OPTIONS` alone (e.g. a training configuration's), with the same
        rules as a full config; ``exclude`` names options that must not appear (they are set elsewhere)."""
        allowed = [name for name in ARCHITECTURE_OPTIONS if name not in exclude]
        for name, value in options.items():
            if name not in allowed:
                raise ValueError(f"Unknown adapter option '{name}'; the options are {', '.join(allowed)}.")
            rule, what = _RULES[name]
            if not rule(value):
                raise _fail(name, value, what)
        defaults = {f.name: f.default for f in dataclasses.fields(CustomContrastAdapterConfig)}
        # One stand-in layer: the joint rules about layers need a UNet, the others only the options and defaults.
        _check_joint({**defaults, "layer_names": ("layer",), "layer_hidden_sizes": (1,), **options})

    def replace(self, **changes: Any) -> CustomContrastAdapterConfig:
        """A copy with some fields changed (checked like any config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``config.json``): sequences as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # -------------------------------------------------------------------------------------------- derived

    @property
    def layout(self) -> CrossAttentionLayout:
        """The cross-attention layout this adapter was built for."""
        return CrossAttentionLayout(
            names=self.layer_names,
            hidden_sizes=self.layer_hidden_sizes,
            cross_attention_dim=self.cross_attention_dim,
            family=self.base_family,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


ARCHITECTURE_OPTIONS: tuple[str, ...] = (
    "hidden_size",
    "num_heads",
    "visual_depth",
    "textual_depth",
    "num_visual_tokens",
    "num_textual_tokens",
    "timestep_embed_dim",
    "mlp_ratio",
    "qformer_qk_norm",
    "location_init_bias",
    "tv_fusion_init",
    "tv_fusion_residual",
    "location_gate_init",
    "s_plus_scale",
    "image_input",
    "visual_projection",
    "image_feature_layers",
)
"""The fields a user chooses when training a new adapter; the others come from the UNet and the image encoder."""
