"""One UNet denoising step (batch 2 = classifier-free guidance): bare vs CustomContrast vs diffusers' IP-Adapter-Plus.

Full-size SD1.5 UNet (random weights) at 256 and 512 px, and SDXL at 512 px. The configurations run on the same UNet
object, alternating inside each round (the adapters are attached and detached between them, which is untimed), each
step under ``torch.no_grad`` as a pipeline's denoising loop runs it. CustomContrast is timed twice: as every step of a
pipeline runs it (the subject features in, the whole adapter at every step: nothing is kept between calls), and with
the image context computed once for the generation and handed to every step explicitly
(``SubjectOptions(image_context=...)``: each step then runs only the timestep-dependent half of the encoder).

Beside each measured ratio: the analytic FLOP ratio of the same step (``torch.utils.flop_counter``, matrix products,
convolutions and attention), counted on a meta-device copy of the same models: the "physical minimum".

    python benchmarks/unet_step.py            # full run (SD1.5 256 + 512 px, SDXL 512 px)
    python benchmarks/unet_step.py --quick    # SD1.5 at 256 px, 3 rounds
    python benchmarks/unet_step.py --flops-only   # the analytic FLOP ratios only (SD1.5 and SDXL, 256 and 512 px)
"""

from __future__ import annotations

import gc

import torch
from common import (
    Config,
    IPAdapterPlus,
    call_unet,
    count_flops,
    ip_adapter_plus_state_dict,
    machine_info,
    markdown_table,
    parse_args,
    pct,
    ratio_stats,
    require_memory,
    run_rounds,
    stage,
    unet_inputs,
    write_results,
)

from diffusers_customcontrast import SubjectOptions
from diffusers_customcontrast.loaders import injection
from diffusers_customcontrast.models.adapter import CustomContrastAdapter
from diffusers_customcontrast.models.architectures import VIT_H_HIDDEN_SIZE, full_size_unet

CONFIGS = ("bare", "customcontrast", "customcontrast_image_context", "ip_adapter_plus")
LABELS = {
    "bare": "bare UNet",
    "customcontrast": "CustomContrast (every step: features in)",
    "customcontrast_image_context": "CustomContrast (image context given: per-step half only)",
    "ip_adapter_plus": "IP-Adapter-Plus (16 tokens)",
}


def image_context_options(adapter, features: torch.Tensor) -> dict:
    """The call's ``cross_attention_kwargs`` with the subject's image context, computed once (as a caller would)."""
    with torch.no_grad():
        context = adapter.encoder.encode_image(features)
    return {"customcontrast": SubjectOptions(image_context=context)}


def build(family: str, meta: bool):
    unet = full_size_unet(family, meta=meta).eval()
    adapter = CustomContrastAdapter.from_unet(
        unet, image_embed_dim=VIT_H_HIDDEN_SIZE, image_encoder_hidden_size=VIT_H_HIDDEN_SIZE
    ).eval()
    # Inference only (every call runs under no_grad, so this changes no timing). FlopCounterMode's module tracker
    # trips over the no_grad views of parameters that require grad (the learned queries passed to the Q-Formers).
    unet.requires_grad_(False)
    adapter.requires_grad_(False)
    # On SDXL the IP-Adapter processors reuse the CustomContrast to_k_ip/to_v_ip tensors (same shapes): 1.4 GB less.
    layer_weights = [(layer.to_k_ip.weight.detach(), layer.to_v_ip.weight.detach()) for layer in adapter.layers]
    state_dict = ip_adapter_plus_state_dict(unet, family, layer_weights=layer_weights if family == "sdxl" else None)
    ip_adapter = IPAdapterPlus.build(unet, state_dict, share_with=adapter if family == "sdxl" else None)
    del state_dict
    return unet, adapter, ip_adapter


def flop_counts(family: str, resolution: int) -> dict[str, float]:
    """FLOPs of one step of each configuration, on the meta device (no compute)."""
    unet, adapter, ip_adapter = build(family, meta=True)
    inputs, features = unet_inputs(family, resolution, device="meta")
    with torch.no_grad():
        flops = {"bare": count_flops(lambda: call_unet(unet, inputs, None))}
        injection.attach(unet, adapter)
        flops["customcontrast"] = count_flops(lambda: call_unet(unet, inputs, features))
        options = image_context_options(adapter, features)
        flops["customcontrast_image_context"] = count_flops(lambda: call_unet(unet, inputs, features, options))
        injection.detach(unet)
        ip_adapter.attach(unet)
        flops["ip_adapter_plus"] = count_flops(lambda: call_unet(unet, inputs, features))
        ip_adapter.detach(unet)
    return flops


def configs_for(unet, adapter, ip_adapter, inputs, features) -> list[Config]:
    options = image_context_options(adapter, features)

    def step(with_image: bool, cross_attention_kwargs: dict | None = None):
        def run():
            with torch.no_grad():
                call_unet(unet, inputs, features if with_image else None, cross_attention_kwargs)

        return run

    def attach() -> None:
        injection.attach(unet, adapter)

    def detach() -> None:
        injection.detach(unet)

    return [
        Config("bare", step(False)),
        Config("customcontrast", step(True), setup=attach, teardown=detach),
        Config("customcontrast_image_context", step(True, options), setup=attach, teardown=detach),
        Config(
            "ip_adapter_plus",
            step(True),
            setup=lambda: ip_adapter.attach(unet),
            teardown=lambda: ip_adapter.detach(unet),
        ),
    ]


def check_outputs(unet, adapter, ip_adapter, inputs, features) -> dict[str, float]:
    """Sanity: both adapters change the output, and detaching restores the bare UNet exactly."""
    with torch.no_grad():
        bare = call_unet(unet, inputs, None)
        injection.attach(unet, adapter)
        cc = call_unet(unet, inputs, features)
        given = call_unet(unet, inputs, features, image_context_options(adapter, features))
        injection.detach(unet)
        ip_adapter.attach(unet)
        ip = call_unet(unet, inputs, features)
        ip_adapter.detach(unet)
        again = call_unet(unet, inputs, None)
    return {
        "customcontrast_vs_bare_max_abs_diff": (cc - bare).abs().max().item(),
        "image_context_given_vs_computed_max_abs_diff": (given - cc).abs().max().item(),
        "ip_adapter_plus_vs_bare_max_abs_diff": (ip - bare).abs().max().item(),
        "bare_after_detach_max_abs_diff": (again - bare).abs().max().item(),
    }


def main() -> None:
    args = parse_args(
        __doc__.split("\n\n")[0],
        lambda p: (
            p.add_argument("--only", choices=["sd15", "sdxl"], help="one base model only"),
            p.add_argument(
                "--flops-only",
                action="store_true",
                help="only the analytic FLOP ratios (meta device, SD1.5 and SDXL at 256 and 512 px; ~1 min each)",
            ),
        ),
    )
    if args.flops_only:
        flops_only(args.only)
        return
    # (family, [(resolution, rounds)]): one step per configuration and round.
    quick = [("sd15", [(256, 3)])]
    plan = quick if args.quick else [("sd15", [(256, 9), (512, 5)]), ("sdxl", [(512, 4)])]
    if args.only:
        plan = [(family, sizes) for family, sizes in plan if family == args.only]
    machine = machine_info()
    print(
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}, "
        f"load average {machine['load_average_1_5_15']}"
    )

    output = "unet_step_quick" if args.quick else "unet_step" + (f"_{args.only}" if args.only else "")
    results = []
    for family, sizes in plan:
        require_memory(14 if family == "sdxl" else 6, f"The full-size {family} UNet")
        with stage(f"Building the full-size {family} UNet, CustomContrast and IP-Adapter-Plus (fp32, random weights)"):
            unet, adapter, ip_adapter = build(family, meta=False)
        description = {
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "customcontrast_parameters": sum(p.numel() for p in adapter.parameters()),
            "customcontrast_encoder_parameters": sum(p.numel() for p in adapter.encoder.parameters()),
            "cross_attention_layers": adapter.num_layers,
            "ip_adapter_plus": ip_adapter.describe(),
        }
        print(f"  {description}")
        for resolution, rounds in sizes:
            with stage(f"Counting FLOPs of {family} at {resolution} px"):
                flops = flop_counts(family, resolution)
            inputs, features = unet_inputs(family, resolution)
            with stage("Checking the outputs (also the warm-up of every configuration)"):
                checks = check_outputs(unet, adapter, ip_adapter, inputs, features)
            print(f"  {checks}")
            with stage(f"Timing {family} at {resolution} px: {rounds} rounds"):
                configs = configs_for(unet, adapter, ip_adapter, inputs, features)
                timings = run_rounds(configs, rounds, warmup=False)
            entry = {
                "family": family,
                "resolution": resolution,
                "batch": 2,
                "rounds": rounds,
                "models": description,
                "checks": checks,
                "flops": flops,
                "load_average_per_round": timings.load,
                "configs": {},
            }
            for name in CONFIGS:
                entry["configs"][name] = {
                    "cpu_seconds": timings.cpu[name],
                    "wall_seconds": timings.wall[name],
                    "cpu_median_s": timings.median(name, "cpu"),
                    "wall_median_s": timings.median(name, "wall"),
                    "flop_ratio": flops[name] / flops["bare"],
                    "vs_bare_cpu": ratio_stats(timings, name, "bare", "cpu") if name != "bare" else None,
                    "vs_bare_wall": ratio_stats(timings, name, "bare", "wall") if name != "bare" else None,
                }
            entry["customcontrast_vs_ip_adapter_plus_cpu"] = ratio_stats(
                timings, "customcontrast", "ip_adapter_plus", "cpu"
            )
            results.append(entry)
            print()
            print(table([entry]))
            print()
            # Written after every size, so that a later failure (e.g. memory for SDXL) keeps what was measured.
            path = write_results(output, {"machine": machine, "quick": args.quick, "results": results})
            gc.collect()
        # The configurations' closures hold the UNet too: drop them all before building the next one.
        del unet, adapter, ip_adapter, configs, inputs, features
        gc.collect()

    print(table(results))
    print(f"\nWrote {path}")


def flops_only(only: str | None) -> None:
    """Print and write (``results/unet_step_flops.json``) every configuration's FLOP overhead over the bare UNet."""
    sizes = [(family, resolution) for family in ("sd15", "sdxl") for resolution in (256, 512)]
    results = []
    for family, resolution in sizes:
        if only and family != only:
            continue
        flops = flop_counts(family, resolution)
        results.append({"family": family, "resolution": resolution, "flops": flops})
        overheads = ", ".join(f"{name} {pct(flops[name] / flops['bare'], 2)}" for name in CONFIGS[1:])
        print(f"{family} {resolution} px: bare {flops['bare'] / 1e9:.1f} GFLOP; {overheads}", flush=True)
    path = write_results("unet_step_flops", {"results": results})
    print(f"Wrote {path}")


def table(results: list[dict]) -> str:
    rows = []
    for entry in results:
        for name in CONFIGS:
            c = entry["configs"][name]
            cpu, wall = c["vs_bare_cpu"], c["vs_bare_wall"]
            rows.append(
                [
                    f"{entry['family']} {entry['resolution']} px",
                    LABELS[name],
                    c["cpu_median_s"],
                    "1"
                    if cpu is None
                    else f"{cpu['median_of_round_ratios']:.3f} ({pct(cpu['median_of_round_ratios'])})",
                    "" if cpu is None else f"{cpu['min']:.3f} to {cpu['max']:.3f}",
                    c["wall_median_s"],
                    "1" if wall is None else f"{wall['median_of_round_ratios']:.3f}",
                    f"{c['flop_ratio']:.4f} ({pct(c['flop_ratio'], 2)})",
                ]
            )
    header = [
        "UNet, size",
        "configuration",
        "CPU s/step",
        "vs bare (CPU time)",
        "per-round range",
        "wall s/step",
        "vs bare (wall)",
        "analytic FLOP ratio",
    ]
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
