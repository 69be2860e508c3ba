"""``pipe.load_customcontrast(folder)`` vs diffusers' ``pipe.load_ip_adapter(...)``: time and peak memory.

The pipeline is a ``StableDiffusionPipeline`` with the full-size SD1.5 UNet (random weights) and tiny other
components (``diffusers_customcontrast.testing.tiny_models``; only the UNet matters to either loader). Checkpoints, fp32
safetensors on local disk, all with random weights:

- IP-Adapter-Plus for SD1.5 in the original single-file layout (``image_proj.*`` + ``ip_adapter.{1,3,...}.*``),
  ViT-H features, 16 tokens: 49.1M parameters;
- a CustomContrast adapter folder of the default shape (80.1M parameters), and one of about IP-Adapter-Plus's size
  (visual depth 2, textual depth 1: 51.7M parameters), so that time per byte can be compared directly.

Time: the loaders alternate inside each round in one process (load, then unload, untimed), after one warm-up
round that brings the files into the page cache. Memory: one fresh subprocess per checkpoint, which builds the
pipeline, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), loads, and reports the peak
(``VmHWM``) and the retained RSS over the pipeline's: "no second full copy" means a peak near 1x the weights.

    python benchmarks/loading.py            # 7 rounds + memory
    python benchmarks/loading.py --quick    # 3 rounds + memory
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    Config,
    current_rss_gib,
    ip_adapter_plus_state_dict,
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
from safetensors.torch import save_file

import diffusers_customcontrast  # noqa: F401  (registers pipe.load_customcontrast)
from diffusers_customcontrast.models.adapter import CustomContrastAdapter
from diffusers_customcontrast.models.architectures import VIT_H_HIDDEN_SIZE, full_size_unet

IP_ADAPTER_FILE = "ip-adapter-plus_sd15.safetensors"
CHECKPOINTS = {
    "ip_adapter_plus": "diffusers load_ip_adapter, IP-Adapter-Plus",
    "customcontrast": "load_customcontrast, default adapter",
    "customcontrast_size_matched": "load_customcontrast, size-matched adapter",
}
SIZE_MATCHED = {"visual_depth": 2, "textual_depth": 1}


def build_pipeline():
    from diffusers_customcontrast.testing.tiny_models import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(image_encoder=False)
    pipe.register_modules(unet=full_size_unet("sd15", meta=False).eval())
    return pipe


def write_checkpoints(folder: Path, unet) -> dict[str, int]:
    """Save the three checkpoints into ``folder``; returns their sizes in bytes."""
    torch.manual_seed(0)
    state_dict = ip_adapter_plus_state_dict(unet, "sd15")
    flat = {
        f"{part}.{key}": tensor.contiguous() for part, tensors in state_dict.items() for key, tensor in tensors.items()
    }
    save_file(flat, folder / IP_ADAPTER_FILE)
    sizes = {"ip_adapter_plus": (folder / IP_ADAPTER_FILE).stat().st_size}
    for name, config in (("customcontrast", {}), ("customcontrast_size_matched", SIZE_MATCHED)):
        adapter = CustomContrastAdapter.from_unet(unet, image_embed_dim=VIT_H_HIDDEN_SIZE, **config)
        adapter.save_pretrained(folder / name)
        sizes[name] = sum(f.stat().st_size for f in (folder / name).iterdir())
        del adapter
    return sizes


def loader(pipe, folder: Path, name: str):
    """``(load, unload)`` for one checkpoint."""
    if name == "ip_adapter_plus":

        def load():
            pipe.load_ip_adapter(str(folder), subfolder="", weight_name=IP_ADAPTER_FILE, image_encoder_folder=None)

        return load, pipe.unload_ip_adapter

    def load_cc():
        pipe.load_customcontrast(str(folder / name), image_encoder_folder=None)

    return load_cc, pipe.unload_customcontrast


def measure_memory(folder: Path, name: str) -> dict:
    """In a fresh process: build the pipeline, then load one checkpoint; RSS figures in GiB."""
    pipe = build_pipeline()
    load, _ = loader(pipe, folder, name)
    gc.collect()
    before = current_rss_gib()
    reset_peak_rss()
    load()
    gc.collect()
    peak, retained = peak_rss_since_reset_gib() - before, current_rss_gib() - before
    # Weights that stay memory-mapped from the file are resident only once read: read every UNet weight (the
    # adapter's included), as the first denoising step does, and measure again.
    with torch.no_grad():
        for parameter in pipe.unet.parameters():
            parameter.sum()
    return {
        "checkpoint": name,
        "rss_before_gib": before,
        "peak_over_before_gib": peak,
        "retained_over_before_gib": retained,
        "after_first_use_over_before_gib": current_rss_gib() - before,
        "peak_with_first_use_over_before_gib": peak_rss_since_reset_gib() - before,
    }


def memory_in_subprocess(folder: Path, name: str) -> dict:
    command = [sys.executable, __file__, "--memory-child", name, "--folder", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"The memory measurement of '{name}' failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    def extra(parser):
        parser.add_argument("--memory-child", choices=list(CHECKPOINTS), help=argparse.SUPPRESS)
        parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)

    args = parse_args(__doc__.split("\n\n")[0], extra)
    if args.memory_child:
        print(json.dumps(measure_memory(args.folder, args.memory_child)))
        return

    rounds = 3 if args.quick else 7
    machine = machine_info()
    print(f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, load {machine['load_average_1_5_15']}")
    require_memory(8, "The loading benchmark")
    with tempfile.TemporaryDirectory(prefix="cc-loading-") as tmp:
        folder = Path(tmp)
        with stage("Building the pipeline (full-size SD1.5 UNet) and writing the checkpoints"):
            pipe = build_pipeline()
            sizes = write_checkpoints(folder, pipe.unet)
        print(f"  checkpoint sizes (MB): { {k: round(v / 1e6, 1) for k, v in sizes.items()} }")
        configs = []
        for name in CHECKPOINTS:
            load, unload = loader(pipe, folder, name)
            configs.append(Config(name, load, teardown=unload))
        with stage(f"Timing {rounds} rounds"):
            timings = run_rounds(configs, rounds)
        del pipe, configs
        gc.collect()
        memory = {}
        for name in CHECKPOINTS:
            with stage(f"Peak memory of loading '{name}' in a fresh process"):
                memory[name] = memory_in_subprocess(folder, name)

    entry = {"rounds": rounds, "load_average_per_round": timings.load, "checkpoints": {}}
    for name in CHECKPOINTS:
        gib = sizes[name] / 2**30
        entry["checkpoints"][name] = {
            "bytes": sizes[name],
            "cpu_seconds": timings.cpu[name],
            "wall_seconds": timings.wall[name],
            "cpu_median_s": timings.median(name, "cpu"),
            "wall_median_s": timings.median(name, "wall"),
            "wall_s_per_gb": timings.median(name, "wall") / (sizes[name] / 1e9),
            "vs_ip_adapter_wall": ratio_stats(timings, name, "ip_adapter_plus", "wall"),
            "vs_ip_adapter_cpu": ratio_stats(timings, name, "ip_adapter_plus", "cpu"),
            "memory": memory[name],
            "peak_over_weights": memory[name]["peak_over_before_gib"] / gib,
            "retained_over_weights": memory[name]["retained_over_before_gib"] / gib,
            "after_first_use_over_weights": memory[name]["after_first_use_over_before_gib"] / gib,
        }
    for name in CHECKPOINTS:
        per_gb = entry["checkpoints"][name]["wall_s_per_gb"] / entry["checkpoints"]["ip_adapter_plus"]["wall_s_per_gb"]
        entry["checkpoints"][name]["per_byte_vs_ip_adapter_wall"] = per_gb
    path = write_results("loading_quick" if args.quick else "loading", {"machine": machine, **entry})
    print()
    print(table(entry))
    print(f"\nWrote {path}")


def table(entry: dict) -> str:
    rows = []
    for name, label in CHECKPOINTS.items():
        c = entry["checkpoints"][name]
        rows.append(
            [
                label,
                f"{c['bytes'] / 1e6:.0f}",
                f"{1000 * c['wall_median_s']:.0f}",
                f"{1000 * c['cpu_median_s']:.0f}",
                f"{c['vs_ip_adapter_wall']['median_of_round_ratios']:.2f}",
                f"{c['per_byte_vs_ip_adapter_wall']:.2f}",
                f"{c['memory']['peak_over_before_gib'] * 1024:.0f} ({c['peak_over_weights']:.2f}x)",
                f"{c['memory']['retained_over_before_gib'] * 1024:.0f} ({c['retained_over_weights']:.2f}x)",
                f"{c['memory']['after_first_use_over_before_gib'] * 1024:.0f} ({c['after_first_use_over_weights']:.2f}x)",
            ]
        )
    header = [
        "loader, checkpoint",
        "MB",
        "wall ms",
        "CPU ms",
        "time vs load_ip_adapter",
        "per byte vs load_ip_adapter",
        "peak RSS over pipeline MiB (x weights)",
        "retained MiB (x weights)",
        "after first use MiB (x weights)",
    ]
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
