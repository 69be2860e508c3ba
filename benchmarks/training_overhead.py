"""A training step with the full objective vs a diffusion-loss-only step of the same adapter: time and peak memory.

The objective step is the trainer's own (``benchmarks/train_step.py``, by the training code's authors): one
``CustomContrastObjective`` forward (full-size SD1.5 UNet with random weights, default adapter, batch 2, fp32),
``loss.backward()`` and an AdamW step. "Full" has L_diff + CSCL + MACL + location (MACL runs the adapter's encoder on
the positive frames' features too); "diffusion only" turns the three contrastive terms off. Their inputs are random
tensors of the right shapes.

A whole training step also runs the frozen encoders on the batch, timed beside the objective (random weights, real
sizes): the VAE encoder on the target frames and the CLIP text encoder on the captions (both settings), CLIP
ViT-H/14 on the reference frames (both settings) and on the positive frames (the full objective only: MACL needs
their features). The whole-step ratio is ``(full + VAE + text + 2 x ViT-H) / (diffusion only + VAE + text + ViT-H)``.

Time: all parts alternate inside each round, in one process; CPU time is the primary clock (docs/benchmarks.md).
Peak memory: one fresh subprocess per setting, which builds the UNet, adapter and optimizer, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), runs two objective steps and reads ``VmHWM`` (peak resident memory;
torch's CPU allocator returns large freed blocks to the OS, so RSS follows the tensors).

    python benchmarks/training_overhead.py                     # 256 px, 5 rounds, frozen encoders, memory
    python benchmarks/training_overhead.py --resolution 512    # the same at SD1.5's training resolution
    python benchmarks/training_overhead.py --quick             # 256 px, 2 rounds, objective only
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch
from common import (
    Config,
    current_rss_gib,
    machine_info,
    markdown_table,
    parse_args,
    peak_rss_since_reset_gib,
    ratio_stats,
    require_memory,
    reset_peak_rss,
    run_rounds,
    stage,
    write_results,
)

try:  # the trainer's definitions of the step (inputs, objective settings, the ViT-H/14 encoder)
    from train_step import _sd15_inputs, _sd15_objective, _vit_h
except ImportError as error:  # pragma: no cover
    sys.exit(f"benchmarks/train_step.py (the trainer's step definitions) is needed: {error}")

SETTINGS = {"full": True, "diffusion_only": False}
BATCH = 2
RESOLUTION = 256  # set from --resolution


def build():
    from diffusers_customcontrast.models.adapter import CustomContrastAdapter
    from diffusers_customcontrast.models.architectures import VIT_H_HIDDEN_SIZE, full_size_unet

    torch.manual_seed(0)
    unet = full_size_unet("sd15", meta=False).requires_grad_(False).eval()
    adapter = CustomContrastAdapter.from_unet(unet, image_embed_dim=VIT_H_HIDDEN_SIZE)
    objectives = {name: _sd15_objective(full, unet, adapter) for name, full in SETTINGS.items()}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    return unet, adapter, objectives, optimizer


def step_function(name: str, objectives, optimizer, generator):
    full = SETTINGS[name]

    def step():
        inputs = _sd15_inputs(BATCH, RESOLUTION, full, generator)
        output = objectives[name](inputs)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def frozen_encoders(generator) -> dict:
    """The frozen encoders' forward passes on one batch, under no_grad, as ``BatchEncoder`` runs them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vit = _vit_h()
    vae = AutoencoderKL(  # stable-diffusion-v1-5/vae
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    ).eval()
    text = CLIPTextModel(  # CLIP ViT-L/14's text encoder, SD1.5's
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    ).eval()
    pixels = torch.randn(BATCH, 3, 224, 224, generator=generator)
    images = torch.rand(BATCH, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    tokens = torch.randint(0, 49408, (BATCH, 77), generator=generator)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    return {
        "vit_h": no_grad(lambda: vit(pixels, output_hidden_states=True)),
        "vae_encode": no_grad(lambda: vae.encode(images).latent_dist.sample()),
        "text_encode": no_grad(lambda: text(tokens)),
    }


def measure_memory(name: str) -> dict:
    """In a fresh process: RSS after building, peak RSS during two steps of one setting."""
    unet, adapter, objectives, optimizer = build()
    generator = torch.Generator().manual_seed(0)
    step = step_function(name, objectives, optimizer, generator)
    gc.collect()
    built = current_rss_gib()
    reset_peak_rss()
    step()
    after_first = current_rss_gib()  # AdamW's moments now exist
    step()
    return {
        "setting": name,
        "rss_after_build_gib": built,
        "rss_after_first_step_gib": after_first,
        "peak_rss_gib": peak_rss_since_reset_gib(),
        "peak_over_build_gib": peak_rss_since_reset_gib() - built,
        "adapter_parameters": sum(p.numel() for p in adapter.parameters()),
    }


def memory_in_subprocess(name: str, resolution: int) -> dict:
    command = [sys.executable, __file__, "--memory-child", name, "--resolution", str(resolution)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"The memory measurement of '{name}' failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    global RESOLUTION

    def extra(parser):
        parser.add_argument("--resolution", type=int, default=256, help="training resolution in px (default 256)")
        parser.add_argument("--memory-child", choices=list(SETTINGS), help=argparse.SUPPRESS)
        parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")

    args = parse_args(__doc__.split("\n\n")[0], extra)
    RESOLUTION = args.resolution
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child)))
        return

    rounds = 2 if args.quick else 5
    with_encoders = not args.quick
    machine = machine_info()
    print(f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, load {machine['load_average_1_5_15']}")
    require_memory(10 if RESOLUTION <= 256 else 18, f"The SD1.5 training step at {RESOLUTION} px")
    with stage("Building the full-size SD1.5 UNet, the default adapter, both objectives and AdamW"):
        unet, adapter, objectives, optimizer = build()
    generator = torch.Generator().manual_seed(0)
    configs = [Config(name, step_function(name, objectives, optimizer, generator)) for name in SETTINGS]
    if with_encoders:
        with stage("Building the frozen encoders (ViT-H/14, VAE, CLIP text; random weights)"):
            configs += [Config(name, fn) for name, fn in frozen_encoders(generator).items()]
    with stage(f"Timing {rounds} rounds at {RESOLUTION} px: " + " / ".join(c.name for c in configs)):
        timings = run_rounds(configs, rounds)
    del unet, adapter, objectives, optimizer, configs
    gc.collect()

    entry = {
        "family": "sd15",
        "resolution": RESOLUTION,
        "batch": BATCH,
        "rounds": rounds,
        "load_average_per_round": timings.load,
        "settings": {},
    }
    for name in timings.cpu:
        entry["settings"][name] = {
            "cpu_seconds": timings.cpu[name],
            "wall_seconds": timings.wall[name],
            "cpu_median_s": timings.median(name, "cpu"),
            "wall_median_s": timings.median(name, "wall"),
        }
    entry["full_vs_diffusion_only_cpu"] = ratio_stats(timings, "full", "diffusion_only", "cpu")
    entry["full_vs_diffusion_only_wall"] = ratio_stats(timings, "full", "diffusion_only", "wall")
    if with_encoders:
        cpu = timings.cpu
        per_round = [
            (full + vae + text + 2 * vit) / (diffusion + vae + text + vit)
            for full, diffusion, vit, vae, text in zip(
                cpu["full"], cpu["diffusion_only"], cpu["vit_h"], cpu["vae_encode"], cpu["text_encode"], strict=True
            )
        ]
        entry["whole_step_full_vs_diffusion_only_cpu"] = {
            "median_of_round_ratios": sorted(per_round)[len(per_round) // 2],
            "round_ratios": per_round,
        }

    if not args.no_memory:
        entry["memory"] = {}
        for name in SETTINGS:
            with stage(f"Peak memory of '{name}' in a fresh process"):
                entry["memory"][name] = memory_in_subprocess(name, RESOLUTION)

    suffix = "_quick" if args.quick else ("" if RESOLUTION == 256 else f"_{RESOLUTION}")
    path = write_results(f"training_overhead{suffix}", {"machine": machine, **entry})
    print()
    print(table(entry))
    print(f"\nWrote {path}")


def table(entry: dict) -> str:
    ratio = entry["full_vs_diffusion_only_cpu"]["median_of_round_ratios"]
    memory = entry.get("memory", {})
    size = f"{entry['resolution']} px"
    labels = {
        "full": "objective step, full (L_diff + CSCL + MACL + location)",
        "diffusion_only": "objective step, diffusion loss only",
        "vit_h": "frozen CLIP ViT-H/14, one batch (references: both; positives: full only)",
        "vae_encode": "frozen VAE encoder on the targets (both)",
        "text_encode": "frozen CLIP text encoder on the captions (both)",
    }
    rows = []
    for name, values in entry["settings"].items():
        mem = memory.get(name, {})
        rows.append(
            [
                size,
                labels[name],
                values["cpu_median_s"],
                values["wall_median_s"],
                f"{ratio:.3f}" if name == "full" else ("1" if name == "diffusion_only" else ""),
                f"{mem['peak_rss_gib']:.2f} / {mem['peak_over_build_gib']:.2f}" if mem else "",
            ]
        )
    whole = entry.get("whole_step_full_vs_diffusion_only_cpu")
    if whole:
        rows.append(
            [
                size,
                "**whole step** (objective + frozen encoders)",
                "",
                "",
                f"{whole['median_of_round_ratios']:.3f}",
                "",
            ]
        )
    header = [
        "size",
        "part (batch 2)",
        "CPU s",
        "wall s",
        "full vs diffusion only (CPU)",
        "peak RSS / over models GiB",
    ]
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
