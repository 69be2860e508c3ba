"""Shared helpers of the benchmarks: machine description, side-by-side timing, FLOP counts, IP-Adapter-Plus, output.

Every comparison is measured in one process, alternating the configurations inside each round, over several
rounds; figures are medians, and ratios are given both as the median of the per-round ratios and as the ratio of
the medians. The machine is shared, so each round also records the 1-minute load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread burns CPU time while its
# partner waits for a core, which inflates the CPU-time figures (and takes cores from the other processes). libgomp
# reads this when torch loads it: a script that imported torch before this module re-executes itself with it.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules and sys.argv and Path(sys.argv[0]).is_file():
        os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch import nn  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# diffusers' IP-Adapter-Plus image projections (the original Resampler shapes): SD1.5 "ip-adapter-plus_sd15"
# (dim 768, 12 heads) and SDXL "ip-adapter-plus_sdxl_vit-h" (dim 1280, 20 heads); 16 tokens, depth 4, ViT-H features.
IP_ADAPTER_PLUS_SHAPES = {
    "sd15": {"hidden_dims": 768, "heads": 12},
    "sdxl": {"hidden_dims": 1280, "heads": 20},
}


# ------------------------------------------------------------------------------------------------ the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> float:
    return os.getloadavg()[0]


def busy_processes() -> int:
    """Other running (state R) processes on the machine, a hint of how contended the cores are."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "R" and int(stat.parent.name) != os.getpid():
            count += 1
    return count


def machine_info() -> dict:
    import diffusers
    import transformers

    return {
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "memory_available_gib": available_memory_gib(),
        "load_average_1_5_15": list(os.getloadavg()),
        "running_processes_at_start": busy_processes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _status_gib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def current_rss_gib() -> float:
    """Resident set size of this process now (``VmRSS``)."""
    return _status_gib("VmRSS")


def peak_rss_since_reset_gib() -> float:
    """Peak resident set size since :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_gib("VmHWM")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def require_memory(gib: float, what: str) -> None:
    available = available_memory_gib()
    if available is not None and available < gib:
        sys.exit(f"{what} needs about {gib:.0f} GiB of free memory; only {available:.1f} GiB is available now.")


# ------------------------------------------------------------------------------------------------ timing


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Config:
    """One configuration of a side-by-side comparison.

    ``setup()`` prepares it (e.g. attaches an adapter; untimed), ``step()`` is the timed work, ``teardown()`` undoes
    ``setup``. ``repeats`` overrides the number of timed calls per round (for short steps).
    """

    name: str
    step: Callable[[], object]
    setup: Callable[[], object] = lambda: None
    teardown: Callable[[], object] = lambda: None
    repeats: int | None = None


@dataclass
class Timings:
    """Per configuration, one wall-clock and one CPU-time figure per round (the median of that round's steps)."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)

    def series(self, name: str, clock: str = "cpu") -> list[float]:
        return (self.cpu if clock == "cpu" else self.wall)[name]

    def median(self, name: str, clock: str = "cpu") -> float:
        return median(self.series(name, clock))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU time (all threads, user + system) of ``fn()``, in seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_rounds(
    configs: list[Config],
    rounds: int,
    steps: int = 1,
    warmup: bool = True,
    log: Callable[[str], None] | None = None,
) -> Timings:
    """Time every configuration once per round, alternating, and rotating which one goes first.

    Per round and configuration: ``setup``, ``steps`` timed calls of ``step`` (their median is the round's figure),
    ``teardown``. Adjacent configurations of a round see nearly the same machine load, so per-round ratios cancel
    most of the load's drift.
    """
    timings = Timings(wall={c.name: [] for c in configs}, cpu={c.name: [] for c in configs})
    if warmup:
        for config in configs:
            config.setup()
            config.step()
            config.teardown()
    for index in range(rounds):
        timings.load.append(load_average())
        shift = index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            config.setup()
            gc.collect()
            samples = [timed(config.step) for _ in range(config.repeats or steps)]
            timings.wall[config.name].append(median([w for w, _ in samples]))
            timings.cpu[config.name].append(median([c for _, c in samples]))
            config.teardown()
        message = f"  round {index + 1}/{rounds} (load {timings.load[-1]:.1f}): " + ", ".join(
            f"{c.name} {timings.cpu[c.name][-1]:.3f}s cpu / {timings.wall[c.name][-1]:.3f}s wall" for c in configs
        )
        (log or (lambda m: print(m, flush=True)))(message)
    return timings


def ratio_stats(timings: Timings, name: str, reference: str, clock: str = "cpu") -> dict:
    """``name`` over ``reference``: median of the per-round ratios, ratio of the medians, and the spread."""
    per_round = [a / b for a, b in zip(timings.series(name, clock), timings.series(reference, clock))]
    return {
        "median_of_round_ratios": median(per_round),
        "ratio_of_medians": timings.median(name, clock) / timings.median(reference, clock),
        "round_ratios": per_round,
        "min": min(per_round),
        "max": max(per_round),
    }


# ------------------------------------------------------------------------------------------------ FLOPs


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products, convolutions and attention of ``fn()`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ UNet inputs


def unet_inputs(family: str, resolution: int, batch: int = 2, device: str | torch.device = "cpu", seed: int = 0):
    """Latents, timestep, text context, SDXL extras and ViT-H penultimate features for one CFG step."""
    generator = torch.Generator().manual_seed(seed)
    side = resolution // 8
    width = 768 if family == "sd15" else 2048

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    inputs = {
        "sample": randn(batch, 4, side, side),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": randn(batch, 77, width),
        "added_cond_kwargs": {},
    }
    if family == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, 1280),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device),
        }
    image_features = randn(batch, 257, 1280)  # [negative (blank image), positive], CLIP ViT-H penultimate layer
    return inputs, image_features


def call_unet(
    unet: nn.Module, inputs: dict, image_features: torch.Tensor | None, cross_attention_kwargs: dict | None = None
) -> torch.Tensor:
    """One UNet call as a pipeline makes it (the image features are the same tensor at every step)."""
    added = dict(inputs["added_cond_kwargs"])
    if image_features is not None:
        added["image_embeds"] = [image_features[:, None]]
    return unet(
        inputs["sample"],
        inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        added_cond_kwargs=added or None,
        cross_attention_kwargs=cross_attention_kwargs,
    ).sample


# ------------------------------------------------------------------------------------------------ IP-Adapter-Plus


def ip_adapter_plus_state_dict(
    unet: nn.Module,
    family: str,
    num_tokens: int = 16,
    image_embed_dim: int = 1280,
    depth: int = 4,
    layer_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shape: dict | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter-Plus checkpoint in the ORIGINAL (tencent-ailab Resampler) layout.

    ``{"image_proj": {latents, proj_in, proj_out, norm_out, layers.N.0.{norm1,norm2,to_q,to_kv,to_out},
    layers.N.1.{0,1,3}}, "ip_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", ...}}``: the
    keys diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` and ``_convert_ip_adapter_attn_to_diffusers``
    read. ``layer_weights`` (one ``(to_k_ip, to_v_ip)`` pair per cross-attention layer) reuses given tensors.
    ``shape`` (``{"hidden_dims", "heads"}``, 64-wide heads) replaces the family's Resampler width (smoke runs).
    """
    shape = shape or IP_ADAPTER_PLUS_SHAPES[family]
    dim = shape["hidden_dims"]
    inner = 64 * shape["heads"]
    output_dim = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(seed)
    on_meta = unet.device.type == "meta"

    def tensor(*size, std: float = 0.02, fill: float | None = None) -> torch.Tensor:
        if on_meta:
            return torch.empty(*size, dtype=dtype, device="meta")
        if fill is not None:
            return torch.full(size, fill, dtype=dtype)
        return (torch.randn(*size, generator=generator) * std).to(dtype)

    proj = {
        "latents": tensor(1, num_tokens, dim, std=dim**-0.5),
        "proj_in.weight": tensor(dim, image_embed_dim),
        "proj_in.bias": tensor(dim, fill=0.0),
        "proj_out.weight": tensor(output_dim, dim),
        "proj_out.bias": tensor(output_dim, fill=0.0),
        "norm_out.weight": tensor(output_dim, fill=1.0),
        "norm_out.bias": tensor(output_dim, fill=0.0),
    }
    for n in range(depth):
        for norm in ("norm1", "norm2"):
            proj[f"layers.{n}.0.{norm}.weight"] = tensor(dim, fill=1.0)
            proj[f"layers.{n}.0.{norm}.bias"] = tensor(dim, fill=0.0)
        proj[f"layers.{n}.0.to_q.weight"] = tensor(inner, dim)
        proj[f"layers.{n}.0.to_kv.weight"] = tensor(2 * inner, dim)
        proj[f"layers.{n}.0.to_out.weight"] = tensor(dim, inner)
        proj[f"layers.{n}.1.0.weight"] = tensor(dim, fill=1.0)
        proj[f"layers.{n}.1.0.bias"] = tensor(dim, fill=0.0)
        proj[f"layers.{n}.1.1.weight"] = tensor(4 * dim, dim)
        proj[f"layers.{n}.1.3.weight"] = tensor(dim, 4 * dim)

    from diffusers_customcontrast.models.unet_layout import cross_attention_layout

    layout = cross_attention_layout(unet)
    ip = {}
    for index, width in enumerate(layout.hidden_sizes):
        key = 2 * index + 1
        if layer_weights is not None:
            ip[f"{key}.to_k_ip.weight"], ip[f"{key}.to_v_ip.weight"] = layer_weights[index]
        else:
            ip[f"{key}.to_k_ip.weight"] = tensor(width, output_dim)
            ip[f"{key}.to_v_ip.weight"] = tensor(width, output_dim)
    return {"image_proj": proj, "ip_adapter": ip}


@dataclass
class IPAdapterPlus:
    """diffusers' own IP-Adapter-Plus, built once on a UNet and swapped in and out without reloading."""

    processors: dict
    projection: nn.Module
    original_processors: dict

    @classmethod
    def build(cls, unet: nn.Module, state_dict: dict, share_with=None) -> IPAdapterPlus:
        """Load ``state_dict`` with diffusers' own loader, keep the result, and restore the UNet.

        ``share_with``: a CustomContrast adapter whose ``to_k_ip``/``to_v_ip`` tensors IP-Adapter's processors then
        use too (same shapes; the values do not matter for timing): saves a second copy of 1.4 GB on SDXL.
        """
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        original = dict(unet.attn_processors)
        original_proj, original_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
        unet._load_ip_adapter_weights([state_dict])
        projection = unet.encoder_hid_proj
        # The Resampler has attention layers of its own: take it out before listing or resetting the UNet's.
        unet.encoder_hid_proj = None
        processors = dict(unet.attn_processors)
        unet.set_attn_processor(dict(original))
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = original_proj, original_type

        ip = [p for p in processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        if not ip or any(p.num_tokens != [state_dict["image_proj"]["latents"].shape[1]] for p in ip):
            raise RuntimeError("diffusers did not build IP-Adapter-Plus processors with the expected token count.")
        if share_with is not None:
            for processor, layer in zip(ip, share_with.layers, strict=True):
                processor.to_k_ip[0].weight = layer.to_k_ip.weight
                processor.to_v_ip[0].weight = layer.to_v_ip.weight
        return cls(processors=processors, projection=projection, original_processors=original)

    def attach(self, unet: nn.Module) -> None:
        unet.set_attn_processor(dict(self.processors))
        unet.encoder_hid_proj = self.projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    def detach(self, unet: nn.Module) -> None:
        unet.encoder_hid_proj = None
        unet.set_attn_processor(dict(self.original_processors))
        unet.config.encoder_hid_dim_type = None

    def describe(self) -> dict:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        ip = [p for p in self.processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        proj = self.projection.image_projection_layers[0]
        return {
            "class": type(proj).__name__,
            "processors": f"{len(ip)} x {type(ip[0]).__name__}",
            "num_tokens": ip[0].num_tokens,
            "projection_parameters": sum(p.numel() for p in proj.parameters()),
        }


# ------------------------------------------------------------------------------------------------ output


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smallest sizes only (for development)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": payload.pop("machine", machine_info()), **payload}
    payload["machine"]["load_average_at_end"] = list(os.getloadavg())
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


@contextmanager
def stage(message: str):
    start = time.perf_counter()
    print(f"{message} ...", flush=True)
    yield
    print(f"  done in {time.perf_counter() - start:.1f}s", flush=True)


def pct(ratio: float, digits: int = 1) -> str:
    return f"{100 * (ratio - 1):+.{digits}f} %"
