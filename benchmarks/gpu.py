"""One UNet step on a GPU: bare UNet vs diffusers' IP-Adapter-Plus vs CustomContrast, fp16 and bf16, eager and compiled.

Full-size SD1.5 (512 px) and SDXL (1024 px) UNets with random weights, batch 2 (classifier-free guidance), each step
under ``torch.no_grad`` as a pipeline's denoising loop runs it. Per family and dtype, every configuration of
``benchmarks/unet_step.py`` (bare; CustomContrast as a pipeline runs it, features in; CustomContrast with the image
context given; IP-Adapter-Plus) is timed (CUDA events, median of the timed steps after warm-up) in three ways: eager,
``torch.compile`` of the whole UNet, and diffusers' regional ``compile_repeated_blocks`` (the UNet's transformer
blocks, processors included). Also: the peak GPU memory of each eager step, the analytic FLOP ratios of
``unet_step.py`` (``common.count_flops``), and SD1.5's training step (the trainer's objective, forward + backward +
AdamW, the definitions of ``train_step.py``) with the full objective against diffusion only.

It writes ``benchmarks/results/gpu.json`` with the card's name. Built to finish within 8 minutes on one H100 or H200:
whole-model compilation of each configuration is the long part, and a time budget (``--budget``) skips what would
not fit, saying so in the results.

    python benchmarks/gpu.py                  # on a CUDA machine
    python benchmarks/gpu.py --smoke          # tiny UNets on CPU in seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    IPAdapterPlus,
    call_unet,
    count_flops,
    ip_adapter_plus_state_dict,
    machine_info,
    markdown_table,
    pct,
    unet_inputs,
    write_results,
)

from diffusers_customcontrast import SubjectOptions
from diffusers_customcontrast.loaders import injection
from diffusers_customcontrast.models.adapter import CustomContrastAdapter
from diffusers_customcontrast.models.architectures import UNET_CONFIGS, VIT_H_HIDDEN_SIZE

CONFIGS = ("bare", "customcontrast", "customcontrast_image_context", "ip_adapter_plus")
COMPILE_MODES = ("eager", "compile", "regional")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FULL_PLAN = [("sd15", 512), ("sdxl", 1024)]
SMOKE_COMPILED = ("bare", "customcontrast")  # --smoke compiles these (SD1.5 only): the code path, in seconds

# Tiny UNets of the two families for --smoke, with the full-size context widths (768, 2048) and SDXL's extra inputs,
# so that common.unet_inputs and IP-Adapter-Plus's checkpoint shapes fit them unchanged.
SMOKE_UNETS = {
    "sd15": {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    "sdxl": {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 1280 + 6 * 8,
        "cross_attention_dim": 2048,
        "norm_num_groups": 8,
    },
}
SMOKE_ADAPTER = {"hidden_size": 64, "num_heads": 4, "visual_depth": 1, "textual_depth": 1, "timestep_embed_dim": 32}
SMOKE_IP_ADAPTER = {"hidden_dims": 128, "heads": 2}  # diffusers' converter needs 64-wide heads and 4 layers


@dataclasses.dataclass
class Setup:
    unet: torch.nn.Module
    adapter: CustomContrastAdapter
    ip_adapter: IPAdapterPlus
    inputs: dict
    features: torch.Tensor
    options: dict


def build(family: str, resolution: int, dtype: torch.dtype, device: torch.device, smoke: bool) -> Setup:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random initialisation on the GPU: seconds, not a minute of CPU for SDXL
        unet = UNet2DConditionModel(**(SMOKE_UNETS if smoke else UNET_CONFIGS)[family]).eval().requires_grad_(False)
        adapter_options = SMOKE_ADAPTER if smoke else {}
        adapter = CustomContrastAdapter.from_unet(
            unet, image_embed_dim=VIT_H_HIDDEN_SIZE, image_encoder_hidden_size=VIT_H_HIDDEN_SIZE, **adapter_options
        ).eval()
    adapter.requires_grad_(False)
    ip_adapter = IPAdapterPlus.build(
        unet, ip_adapter_plus_state_dict(unet, family, shape=SMOKE_IP_ADAPTER if smoke else None)
    )
    unet.to(device, dtype)
    adapter.to(device, dtype)
    for module in (*ip_adapter.processors.values(), ip_adapter.projection):
        if isinstance(module, torch.nn.Module):
            module.to(device, dtype)
    inputs, features = unet_inputs(family, resolution, device=device)
    inputs = {key: _cast(value, dtype) for key, value in inputs.items()}
    features = features.to(dtype)
    with torch.no_grad():
        options = {"customcontrast": SubjectOptions(image_context=adapter.encoder.encode_image(features))}
    return Setup(unet, adapter, ip_adapter, inputs, features, options)


def _cast(value, dtype):
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    if torch.is_tensor(value) and value.is_floating_point() and value.ndim > 0:
        return value.to(dtype)
    return value


def attach(setup: Setup, name: str) -> None:
    if name.startswith("customcontrast"):
        injection.attach(setup.unet, setup.adapter)
    elif name == "ip_adapter_plus":
        setup.ip_adapter.attach(setup.unet)


def detach(setup: Setup, name: str) -> None:
    if name.startswith("customcontrast"):
        injection.detach(setup.unet)
    elif name == "ip_adapter_plus":
        setup.ip_adapter.detach(setup.unet)


def step_fn(setup: Setup, name: str, model: torch.nn.Module) -> Callable[[], torch.Tensor]:
    features = None if name == "bare" else setup.features
    kwargs = setup.options if name == "customcontrast_image_context" else None

    def step() -> torch.Tensor:
        with torch.no_grad():
            return call_unet(model, setup.inputs, features, kwargs)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median milliseconds of ``steps`` calls after ``warmup`` (CUDA events on a GPU, the wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append(1000 * (time.perf_counter() - begin))
    return statistics.median(samples)


def peak_memory_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def compiled(setup: Setup, mode: str, backend: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The model to call for ``mode`` and a function that undoes the compilation."""
    torch._dynamo.reset()
    if mode == "eager":
        return setup.unet, lambda: None
    if mode == "compile":
        return torch.compile(setup.unet, backend=backend), torch._dynamo.reset
    setup.unet.compile_repeated_blocks(backend=backend)  # diffusers' regional compilation (in place)

    def undo() -> None:
        for module in setup.unet.modules():
            if module.__class__.__name__ in setup.unet._repeated_blocks:
                module._compiled_call_impl = None
        torch._dynamo.reset()

    return setup.unet, undo


def flop_ratios(setup: Setup) -> dict[str, float]:
    flops = {}
    for name in CONFIGS:
        attach(setup, name)
        flops[name] = count_flops(step_fn(setup, name, setup.unet))
        detach(setup, name)
    return {name: flops[name] / flops["bare"] for name in CONFIGS}


def training_steps(device: torch.device, dtype: torch.dtype, resolution: int, smoke: bool, warmup: int, steps: int):
    """SD1.5 training step (the trainer's objective under autocast, backward, AdamW): full objective vs diffusion
    only, milliseconds and peak memory. The adapter trains in float32, the frozen UNet is in ``dtype``."""
    from diffusers import UNet2DConditionModel
    from train_step import _sd15_inputs, _sd15_objective

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SMOKE_UNETS if smoke else UNET_CONFIGS)["sd15"]).requires_grad_(False)
        adapter = CustomContrastAdapter.from_unet(
            unet, image_embed_dim=VIT_H_HIDDEN_SIZE, **(SMOKE_ADAPTER if smoke else {})
        ).to(device)
    unet.to(device, dtype)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, full in (("full", True), ("diffusion_only", False)):
        objective = _sd15_objective(full, unet, adapter).to(device)
        inputs = _sd15_inputs(2, resolution, full, generator)
        inputs = dataclasses.replace(
            inputs,
            **{
                f.name: getattr(inputs, f.name).to(device)
                for f in dataclasses.fields(inputs)
                if torch.is_tensor(getattr(inputs, f.name))
            },
        )

        def step(objective=objective, inputs=inputs) -> None:
            with torch.autocast(device.type, dtype=dtype):
                loss = objective(inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        out[name] = {"ms": time_ms(step, device, warmup, steps), "peak_memory_gib": peak_memory_gib(step, device)}
    out["full_vs_diffusion_only"] = out["full"]["ms"] / out["diffusion_only"]["ms"]
    return out


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (or --smoke for the CPU check).")
    plan = [("sd15", 64), ("sdxl", 64)] if args.smoke else FULL_PLAN
    dtypes = ["fp32"] if args.smoke else ["fp16", "bf16"]  # CPU half-precision matmuls are slow
    warmup, steps = (1, 1) if args.smoke else (3, 10)
    backend = "eager" if args.smoke else "inductor"  # dynamo without a C++ compiler on CPU
    machine = machine_info()
    machine.update(
        device=device.type,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        cuda=torch.version.cuda,
        dtype="fp16 and bf16",
    )
    results = {"machine": machine, "smoke": args.smoke, "budget_s": args.budget, "runs": [], "skipped": []}
    for family, resolution in plan:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            setup = build(family, resolution, dtype, device, args.smoke)
            entry = {"family": family, "resolution": resolution, "dtype": dtype_name, "configs": {}}
            entry["flop_ratio"] = flop_ratios(setup)
            for mode in COMPILE_MODES:
                for name in CONFIGS:
                    elapsed = time.perf_counter() - started
                    if mode != "eager" and elapsed > args.budget * (0.5 if mode == "compile" else 0.8):
                        results["skipped"].append(f"{family} {dtype_name} {name} {mode}: time budget")
                        continue
                    if args.smoke and mode != "eager" and (family != "sd15" or name not in SMOKE_COMPILED):
                        continue
                    attach(setup, name)
                    model, undo = compiled(setup, mode, backend)
                    fn = step_fn(setup, name, model)
                    record = entry["configs"].setdefault(name, {})
                    record[f"{mode}_ms"] = time_ms(fn, device, warmup, steps)
                    if mode == "eager":
                        record["peak_memory_gib"] = peak_memory_gib(fn, device)
                    undo()
                    detach(setup, name)
            for mode in COMPILE_MODES:
                bare = entry["configs"]["bare"].get(f"{mode}_ms")
                for name in CONFIGS:
                    value = entry["configs"][name].get(f"{mode}_ms")
                    if bare and value:
                        entry["configs"][name][f"{mode}_vs_bare"] = value / bare
            results["runs"].append(entry)
            print(table([entry]), flush=True)
            del setup
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for dtype_name in dtypes:
        if time.perf_counter() - started > args.budget * 0.9:
            results["skipped"].append(f"training step {dtype_name}: time budget")
            continue
        resolution = 64 if args.smoke else 512
        results.setdefault("training", {})[dtype_name] = training_steps(
            device, DTYPES[dtype_name], resolution, args.smoke, warmup, steps
        )
    results["seconds"] = time.perf_counter() - started
    return results


def table(runs: list[dict]) -> str:
    rows = []
    for entry in runs:
        for name in CONFIGS:
            c = entry["configs"][name]
            row = [f"{entry['family']} {entry['resolution']} px {entry['dtype']}", name]
            for mode in COMPILE_MODES:
                ms, ratio = c.get(f"{mode}_ms"), c.get(f"{mode}_vs_bare")
                row.append("skipped" if ms is None else f"{ms:.2f}" + (f" ({pct(ratio)})" if ratio else ""))
            row.append("-" if c.get("peak_memory_gib") is None else f"{c['peak_memory_gib']:.2f}")
            row.append(pct(entry["flop_ratio"][name], 2))
            rows.append(row)
    header = ["UNet, size, dtype", "configuration", "eager ms", "compiled ms", "regional ms", "peak GiB", "FLOPs"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny UNets on CPU, seconds (the tests' check)")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds; compiled runs that would not fit skip")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/gpu.json)")
    args = parser.parse_args()
    results = run(args)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        import json

        machine = results.pop("machine")
        args.output.write_text(json.dumps({"benchmark": "gpu", "machine": machine, **results}, indent=2) + "\n")
        path = args.output
    else:
        path = write_results("gpu_smoke" if args.smoke else "gpu", results)
    print(f"Wrote {path} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
