"""The cross-attention processors alone: bare vs CustomContrast vs IP-Adapter-Plus, summed over a UNet's layers.

A UNet step's adapter overhead is the encoder's per-step work (``encoder_step.py``) plus what the processors add in
every cross-attention layer. This isolates the second part: each of the 16 cross-attention layers of SD1.5 (their
widths, heads and pixel counts at 256 and 512 px, batch 2), built alone with random weights, is called with
diffusers' ``AttnProcessor2_0`` (the bare UNet's), with ``CustomContrastAttnProcessor2_0`` (S+ tokens appended to
the text, visual branch, location map) and with ``IPAdapterAttnProcessor2_0`` (16 tokens). The three alternate
inside each round; a round's figure for a configuration is the sum over the layers of one call each.

    python benchmarks/processor_step.py            # 15 rounds at 256 and 512 px
    python benchmarks/processor_step.py --quick    # 5 rounds
"""

from __future__ import annotations

import torch
from common import (
    Config,
    machine_info,
    markdown_table,
    parse_args,
    pct,
    ratio_stats,
    run_rounds,
    stage,
    write_results,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from diffusers_customcontrast import SubjectConditioning, SubjectTokens
from diffusers_customcontrast.attention_processor import CustomContrastAttnProcessor2_0
from diffusers_customcontrast.models.adapter_layer import CustomContrastLayer

CONTEXT = 768  # SD1.5 cross_attention_dim
HEADS = 8
NUM_S_PLUS = 8  # S+ tokens per layer (the default adapter); as many fused visual tokens
IPA_TOKENS = 16
# (width, latent downsampling) of SD1.5's cross-attention layers in unet.attn_processors order: down, up, mid
SD15_LAYERS = [(320, 1)] * 2 + [(640, 2)] * 2 + [(1280, 4)] * 2 + [(1280, 4)] * 3 + [(640, 2)] * 3 + [(320, 1)] * 3
SD15_LAYERS.append((1280, 8))


def layers_for(resolution: int, batch: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    side = resolution // 8
    num_layers = len(SD15_LAYERS)
    # One subject's tokens for every layer, as the adapter's image projection hands them to the processors.
    s_plus, visual = (torch.randn(batch, num_layers, NUM_S_PLUS, CONTEXT, generator=generator) for _ in range(2))
    subject = SubjectConditioning(
        tokens=SubjectTokens(s_plus, visual, None, None), timesteps=torch.full((batch,), 500)
    )
    ip_tokens = torch.randn(batch, 1, IPA_TOKENS, CONTEXT, generator=generator)
    text = torch.randn(batch, 77, CONTEXT, generator=generator)
    layers = []
    for index, (width, down) in enumerate(SD15_LAYERS):
        attn = Attention(width, cross_attention_dim=CONTEXT, heads=HEADS, dim_head=width // HEADS).eval()
        cc_layer = CustomContrastLayer(CONTEXT, width).eval()
        ipa = IPAdapterAttnProcessor2_0(width, CONTEXT, num_tokens=[IPA_TOKENS]).eval()
        layers.append(
            {
                "attn": attn,
                "hidden": torch.randn(batch, (side // down) ** 2, width, generator=generator),
                "bare": AttnProcessor2_0(),
                "customcontrast": CustomContrastAttnProcessor2_0(cc_layer, index, NUM_S_PLUS),
                "ip_adapter_plus": ipa,
            }
        )
    return layers, text, subject, ip_tokens


def configs(layers, text, subject, ip_tokens) -> list[Config]:
    contexts = {"bare": text, "customcontrast": (text, [subject]), "ip_adapter_plus": (text, [ip_tokens])}

    def run(name):
        def step():
            with torch.no_grad():
                for layer in layers:
                    layer[name](layer["attn"], layer["hidden"], encoder_hidden_states=contexts[name])

        return step

    return [Config(name, run(name)) for name in contexts]


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    rounds = 5 if args.quick else 15
    machine = machine_info()
    print(f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, load {machine['load_average_1_5_15']}")
    results = []
    for resolution in (256, 512):
        layers, text, subject, ip_tokens = layers_for(resolution)
        with stage(
            f"Timing the processors of the 16 SD1.5 cross-attention layers at {resolution} px, {rounds} rounds"
        ):
            timings = run_rounds(configs(layers, text, subject, ip_tokens), rounds, steps=3)
        entry = {"resolution": resolution, "batch": 2, "rounds": rounds, "configs": {}}
        for name in ("bare", "customcontrast", "ip_adapter_plus"):
            entry["configs"][name] = {
                "cpu_seconds": timings.cpu[name],
                "cpu_median_s": timings.median(name, "cpu"),
                "extra_cpu_s": timings.median(name, "cpu") - timings.median("bare", "cpu"),
                "vs_bare_cpu": ratio_stats(timings, name, "bare", "cpu") if name != "bare" else None,
            }
        results.append(entry)
    path = write_results(
        "processor_step_quick" if args.quick else "processor_step", {"machine": machine, "results": results}
    )
    print()
    print(table(results))
    print(f"\nWrote {path}")


def table(results: list[dict]) -> str:
    rows = []
    for entry in results:
        for name, label in (
            ("bare", "AttnProcessor2_0 (bare UNet)"),
            ("customcontrast", "CustomContrastAttnProcessor2_0"),
            ("ip_adapter_plus", "IPAdapterAttnProcessor2_0 (16 tokens)"),
        ):
            c = entry["configs"][name]
            vs = c["vs_bare_cpu"]
            rows.append(
                [
                    f"SD1.5 {entry['resolution']} px",
                    label,
                    f"{1000 * c['cpu_median_s']:.1f}",
                    f"{1000 * c['extra_cpu_s']:+.1f}",
                    "1" if vs is None else f"{vs['median_of_round_ratios']:.3f} ({pct(vs['median_of_round_ratios'])})",
                ]
            )
    header = ["size", "processor (16 layers)", "CPU ms per step", "extra CPU ms", "vs bare"]
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
