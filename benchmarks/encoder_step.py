"""The CustomContrast encoder's work per UNet step as a share of the step, beside IP-Adapter-Plus's Resampler.

Every UNet call runs the adapter once for all cross-attention layers (``adapter(features, timesteps)``: nothing is
kept between calls). Its two halves, timed apart: ``MFIEncoder.encode_image`` (image projection, visual Q-Former and
the image keys/values of the textual Q-Former and the fusion) depends on the image alone, so a caller that hands the
step an image context computed once for the generation skips it; ``MFIEncoder.encode_step`` (the textual Q-Former
over L x (Ns + 1) queries, the S+ projection and the TV fusion) runs at every step. diffusers' IP-Adapter-Plus runs
its whole Resampler (``unet.encoder_hid_proj``) at every step.

Each round times, alternating: one bare UNet step (batch 2 = CFG), then the adapter's whole forward, ``encode_step``,
``encode_image`` and IP-Adapter-Plus's Resampler, each the median of several calls. Full-size SD1.5 UNet at 256 and
512 px, SDXL at 512.

    python benchmarks/encoder_step.py            # full run
    python benchmarks/encoder_step.py --quick    # SD1.5 at 256 px, 3 rounds
"""

from __future__ import annotations

import gc

import torch
from common import (
    Config,
    call_unet,
    count_flops,
    machine_info,
    markdown_table,
    parse_args,
    require_memory,
    run_rounds,
    stage,
    unet_inputs,
    write_results,
)
from unet_step import build

PARTS = ("unet_step", "adapter", "encode_step", "encode_image", "ip_adapter_plus_resampler")
LABELS = {
    "unet_step": "bare UNet step",
    "adapter": "CustomContrast adapter(features, t) (every step, all layers)",
    "encode_step": "... its encode_step (every step)",
    "encode_image": "... its encode_image (every step, or once per generation if given)",
    "ip_adapter_plus_resampler": "IP-Adapter-Plus Resampler (runs every step)",
}
REPEATS = 5  # calls of each encoder part per round (they are short; the median is the round's figure)


def parts(unet, adapter, ip_adapter, inputs, features) -> dict:
    """The timed functions, each run under ``torch.no_grad`` as in a pipeline."""
    encoder = adapter.encoder
    timesteps = inputs["timestep"].reshape(1).expand(features.shape[0])
    with torch.no_grad():
        context = encoder.encode_image(features)
    functions = {
        "unet_step": lambda: call_unet(unet, inputs, None),
        "adapter": lambda: adapter(features, timesteps),
        "encode_step": lambda: encoder.encode_step(context, timesteps),
        "encode_image": lambda: encoder.encode_image(features),
        "ip_adapter_plus_resampler": lambda: ip_adapter.projection([features[:, None]]),
    }

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    return {name: no_grad(fn) for name, fn in functions.items()}


def main() -> None:
    args = parse_args(
        __doc__.split("\n\n")[0],
        lambda p: p.add_argument("--only", choices=["sd15", "sdxl"], help="one base model only"),
    )
    plan = [("sd15", [(256, 3)])] if args.quick else [("sd15", [(256, 7), (512, 5)]), ("sdxl", [(512, 3)])]
    if args.only:
        plan = [(family, sizes) for family, sizes in plan if family == args.only]
    machine = machine_info()
    print(f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, load {machine['load_average_1_5_15']}")

    output = "encoder_step_quick" if args.quick else "encoder_step" + (f"_{args.only}" if args.only else "")
    results = []
    for family, sizes in plan:
        require_memory(14 if family == "sdxl" else 6, f"The full-size {family} UNet")
        with stage(f"Building the full-size {family} UNet, CustomContrast and IP-Adapter-Plus"):
            unet, adapter, ip_adapter = build(family, meta=False)
        for resolution, rounds in sizes:
            inputs, features = unet_inputs(family, resolution)
            functions = parts(unet, adapter, ip_adapter, inputs, features)
            flops = {name: count_flops(fn) for name, fn in functions.items() if name != "unet_step"}
            flops["unet_step"] = unet_flops(family, resolution)
            configs = [
                Config(name, fn, repeats=1 if name == "unet_step" else REPEATS) for name, fn in functions.items()
            ]
            with stage(f"Timing {family} at {resolution} px: {rounds} rounds"):
                timings = run_rounds(configs, rounds)
            entry = {
                "family": family,
                "resolution": resolution,
                "batch": 2,
                "rounds": rounds,
                "calls_per_round_of_encoder_parts": REPEATS,
                "cross_attention_layers": adapter.num_layers,
                "flops": flops,
                "load_average_per_round": timings.load,
                "parts": {},
            }
            step_cpu = timings.series("unet_step", "cpu")
            for name in PARTS:
                cpu = timings.series(name, "cpu")
                entry["parts"][name] = {
                    "cpu_seconds": cpu,
                    "wall_seconds": timings.series(name, "wall"),
                    "cpu_median_s": timings.median(name, "cpu"),
                    "wall_median_s": timings.median(name, "wall"),
                    "share_of_unet_step_cpu": sorted(a / b for a, b in zip(cpu, step_cpu))[len(cpu) // 2],
                    "share_of_unet_step_flops": flops[name] / flops["unet_step"],
                }
            results.append(entry)
            print()
            print(table([entry]))
            print()
            path = write_results(output, {"machine": machine, "quick": args.quick, "results": results})
        # The timed closures hold the UNet too: drop them all before building the next one.
        del unet, adapter, ip_adapter, configs, functions, inputs, features
        gc.collect()

    print(table(results))
    print(f"\nWrote {path}")


def unet_flops(family: str, resolution: int) -> int:
    from diffusers_customcontrast.models.architectures import full_size_unet

    unet = full_size_unet(family, meta=True).requires_grad_(False)
    inputs, _ = unet_inputs(family, resolution, device="meta")
    with torch.no_grad():
        return count_flops(lambda: call_unet(unet, inputs, None))


def table(results: list[dict]) -> str:
    rows = []
    for entry in results:
        for name in PARTS:
            part = entry["parts"][name]
            rows.append(
                [
                    f"{entry['family']} {entry['resolution']} px",
                    LABELS[name],
                    f"{1000 * part['cpu_median_s']:.1f}",
                    f"{100 * part['share_of_unet_step_cpu']:.2f} %",
                    f"{entry['flops'][name] / 1e9:.1f}",
                    f"{100 * part['share_of_unet_step_flops']:.2f} %",
                ]
            )
    header = ["UNet, size", "part", "CPU ms", "share of a UNet step (CPU time)", "GFLOP", "share (FLOPs)"]
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
