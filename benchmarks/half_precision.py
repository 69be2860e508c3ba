"""fp16 and bf16 against fp32 with adapter weights of the size training produces (issue 29).

A tiny random-weight SD1.5 pipeline (the package's ``diffusers_customcontrast.testing`` helpers, 64 px, 3 DDIM
steps, CPU). Each adapter gets ``N(0, sigma)`` added to every parameter (what a trained adapter's weights look like
next to a fresh one's); the pipeline generates in fp32, then, built again the same way and cast with
``pipe.to(dtype)``, in fp16 and bf16 with the same seed. The figure is the max abs difference of the images (in
[0, 1]) to the fp32 output; the base pipeline alone gives the reference drift. The same for diffusers' own
IP-Adapter-Plus (perturbed the same way) and for the shipped world adapter on the shipped world base.

The target (issue 29): finite, and within ``max(10 x the base's own drift, 0.02)``.

    python benchmarks/half_precision.py             # the table (about a minute on 2 cores)
    python benchmarks/half_precision.py --trace     # also name the first adapter module whose output is not finite
    python benchmarks/half_precision.py --tv-fusion-residual capped --no-qk-norm --no-world --no-ip-adapter  # before
    python benchmarks/half_precision.py --no-qk-norm --weight-rounding --sigmas 0.5 --no-world --no-ip-adapter
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from diffusers_customcontrast.models import TV_FUSION_RESIDUALS
from diffusers_customcontrast.models.adapter import CustomContrastAdapter
from diffusers_customcontrast.testing.tiny_models import make_subject_image, tiny_sd15_pipeline

RESULTS = Path(__file__).resolve().parent / "results" / "half_precision.json"
SIGMAS = (0.0, 0.05, 0.2, 0.5)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photo of a dog"


def perturb(module: torch.nn.Module, sigma: float, seed: int = 0) -> None:
    """Add ``N(0, sigma)`` to every parameter of ``module`` (in place, reproducibly)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * sigma)


def ip_adapter_plus_checkpoint(pipe, sigma: float, seed: int = 0) -> dict:
    """A random IP-Adapter-Plus checkpoint for ``pipe`` (common.py's, in diffusers' original layout), perturbed."""
    from common import ip_adapter_plus_state_dict

    checkpoint = ip_adapter_plus_state_dict(
        pipe.unet, "sd15", image_embed_dim=pipe.image_encoder.config.hidden_size, seed=seed
    )
    generator = torch.Generator().manual_seed(seed + 1)
    for part in checkpoint.values():
        for key, value in part.items():
            part[key] = value + torch.randn(value.shape, generator=generator) * sigma
    return checkpoint


def generate(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


def first_non_finite(pipe, run) -> str | None:
    """The first module (in call order) of the UNet's image projection or processors whose output is not finite."""
    found: list[str] = []
    hooks = []

    def hook(name):
        def check(module, args, output):
            tensors = [output] if torch.is_tensor(output) else [t for t in _tensors(output)]
            if not found and any(not torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
                found.append(f"{name} ({type(module).__name__})")

        return check

    roots = [("encoder_hid_proj", pipe.unet.encoder_hid_proj)]
    roots += [(name, module) for name, module in pipe.unet.named_modules() if name.endswith("attn2")]
    for prefix, root in roots:
        if root is None:
            continue
        for name, module in root.named_modules():
            hooks.append(module.register_forward_hook(hook(f"{prefix}.{name}" if name else prefix)))
    try:
        run()
    finally:
        for handle in hooks:
            handle.remove()
    return found[0] if found else None


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def measure(make_pipe, attach, trace: bool = False) -> dict:
    """fp32 output, then the fp16 / bf16 differences to it (NaN where the half output is not finite)."""
    subject = {"ip_adapter_image": make_subject_image(0)}
    pipe = make_pipe()
    attach(pipe)
    reference = generate(pipe, **subject)
    out = {}
    for label, dtype in DTYPES.items():
        pipe = make_pipe()
        attach(pipe)
        pipe.to(dtype)
        images = generate(pipe, **subject)
        out[label] = difference(images, reference) if np.isfinite(images).all() else math.nan
        if trace and not math.isfinite(out[label]):
            out[f"{label}_first_non_finite"] = first_non_finite(pipe, lambda p=pipe: generate(p, **subject))
    return out


def base_drift(make_pipe) -> dict:
    reference = generate(make_pipe())
    return {label: difference(generate(make_pipe().to(dtype)), reference) for label, dtype in DTYPES.items()}


def perturbed_adapter(pipe, sigma: float, options: dict) -> CustomContrastAdapter:
    """A default adapter for ``pipe`` (with ``options``), ``N(0, sigma)`` added to every parameter."""
    torch.manual_seed(0)
    adapter = CustomContrastAdapter.from_unet(pipe.unet, pipe.image_encoder, **options)
    perturb(adapter, sigma)
    return adapter


def customcontrast_attach(sigma: float, options: dict):
    def attach(pipe) -> None:
        pipe.load_customcontrast(perturbed_adapter(pipe, sigma, options))

    return attach


def rounded_attach(sigma: float, dtype: torch.dtype, options: dict):
    """The perturbed adapter with its weights rounded to ``dtype`` and back: float32 arithmetic, half-precision
    weights (how sensitive the function itself is to the rounding ``pipe.to(dtype)`` makes)."""

    def attach(pipe) -> None:
        pipe.load_customcontrast(perturbed_adapter(pipe, sigma, options).to(dtype).to(torch.float32))

    return attach


def weight_rounding(sigma: float, options: dict) -> dict:
    subject = {"ip_adapter_image": make_subject_image(0)}
    pipe = tiny_sd15_pipeline()
    customcontrast_attach(sigma, options)(pipe)
    reference = generate(pipe, **subject)
    out = {}
    for label, dtype in DTYPES.items():
        pipe = tiny_sd15_pipeline()
        rounded_attach(sigma, dtype, options)(pipe)
        out[label] = difference(generate(pipe, **subject), reference)
    return out


def ip_adapter_attach(sigma: float):
    def attach(pipe) -> None:
        pipe.load_ip_adapter(
            ip_adapter_plus_checkpoint(pipe, sigma), subfolder=None, weight_name=None, image_encoder_folder=None
        )

    return attach


def world_rows(trace: bool) -> dict:
    from customcontrast_world.base_model import load_synthetic_base
    from customcontrast_world.recipe import WORLD_ADAPTER_DIR

    def make():
        return load_synthetic_base()

    subject = {"ip_adapter_image": make_subject_image(0)}
    steps = 20  # the world's own setting

    def gen(pipe):
        return generate(pipe, steps=steps, **subject)

    reference_base = generate(make(), steps=steps)
    base = {label: difference(generate(make().to(d), steps=steps), reference_base) for label, d in DTYPES.items()}
    pipe = make()
    pipe.load_customcontrast(str(WORLD_ADAPTER_DIR))
    reference = gen(pipe)
    adapter = {}
    for label, dtype in DTYPES.items():
        half = make()
        half.load_customcontrast(str(WORLD_ADAPTER_DIR))
        half.to(dtype)
        images = gen(half)
        adapter[label] = difference(images, reference) if np.isfinite(images).all() else math.nan
        if trace and not math.isfinite(adapter[label]):
            adapter[f"{label}_first_non_finite"] = first_non_finite(half, lambda p=half: gen(p))
    return {"base": base, "customcontrast": adapter, "fp32_output": reference}


def targets(base: dict) -> dict:
    return {label: max(10 * base[label], 0.02) for label in DTYPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", action="store_true", help="name the first non-finite module of a NaN output")
    parser.add_argument("--no-world", action="store_true", help="skip the shipped world adapter")
    parser.add_argument("--no-ip-adapter", action="store_true", help="skip diffusers' IP-Adapter-Plus")
    parser.add_argument(
        "--weight-rounding",
        action="store_true",
        help="also: float32 generation with only the adapter's weights rounded to fp16 / bf16",
    )
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS), help="perturbation sizes")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument(
        "--max-fusion-rms",
        type=float,
        default=None,
        help="another bound on what a 'capped' TV fusion adds (models/mfi_encoder.py's MAX_FUSION_RMS), to see what "
        "a config field set to it would give",
    )
    parser.add_argument(
        "--tv-fusion-residual",
        choices=TV_FUSION_RESIDUALS,
        default="normalised",
        help="the perturbed adapters' fusion ('capped': the form of adapters saved before the config field)",
    )
    parser.add_argument(
        "--no-qk-norm",
        action="store_true",
        help="perturbed adapters without the Q-Formers' QK-norm (qformer_qk_norm=False, adapters saved before it)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.max_fusion_rms is not None:
        from diffusers_customcontrast.models import mfi_encoder

        mfi_encoder.cap_rms.__defaults__ = (args.max_fusion_rms,)

    base = base_drift(tiny_sd15_pipeline)
    target = targets(base)
    print(f"base pipeline: fp16 {base['fp16']:.4f}, bf16 {base['bf16']:.4f}; target <= {target}")
    options = {"tv_fusion_residual": args.tv_fusion_residual, "qformer_qk_norm": not args.no_qk_norm}
    rows = []
    for sigma in args.sigmas:
        attach = customcontrast_attach(sigma, options)
        row = {"sigma": sigma, "customcontrast": measure(tiny_sd15_pipeline, attach, args.trace)}
        if not args.no_ip_adapter:
            row["ip_adapter_plus"] = measure(tiny_sd15_pipeline, ip_adapter_attach(sigma), args.trace)
        if args.weight_rounding:
            row["customcontrast_fp32_weights_rounded"] = weight_rounding(sigma, options)
        rows.append(row)
        print(json.dumps(row))
    from diffusers_customcontrast.models import mfi_encoder

    payload = {
        **options,
        "max_fusion_rms": mfi_encoder.cap_rms.__defaults__[0],
        "base": base,
        "target": target,
        "rows": rows,
    }
    if not args.no_world:
        world = world_rows(args.trace)
        world.pop("fp32_output")
        payload["world"] = {**world, "target": targets(world["base"])}
        print("world:", json.dumps(payload["world"]))
    print()
    print("| sigma | CustomContrast fp16 | CustomContrast bf16 | IP-Adapter-Plus fp16 / bf16 |")
    print("|---|---|---|---|")
    for row in rows:
        cc, ip = row["customcontrast"], row.get("ip_adapter_plus", {"fp16": math.nan, "bf16": math.nan})
        print(f"| {row['sigma']} | {cc['fp16']:.3f} | {cc['bf16']:.3f} | {ip['fp16']:.3f} / {ip['bf16']:.3f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()
