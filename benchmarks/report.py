"""Print the markdown tables of docs/benchmarks.md from ``benchmarks/results/*.json``, and the targets of issue 6.

python benchmarks/report.py
"""

from __future__ import annotations

import json

from common import RESULTS_DIR, markdown_table


def load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def merged(name: str) -> dict | None:
    """``name.json``, completed by ``name_sd15.json`` / ``name_sdxl.json`` (runs of one base model)."""
    data = load(name)
    for part in ("sd15", "sdxl"):
        extra = load(f"{name}_{part}")
        if extra is None:
            continue
        if data is None:
            data = extra
            continue
        keep = [r for r in data["results"] if r["family"] != part]
        data = {**data, "results": keep + extra["results"]}
    return data


def unet_row(unet: dict, family: str, resolution: int) -> dict | None:
    return next((r for r in unet["results"] if r["family"] == family and r["resolution"] == resolution), None)


def targets() -> str:
    rows = []
    unet, encoder = merged("unet_step"), merged("encoder_step")
    loading = load("loading")
    if unet:
        entry = unet_row(unet, "sd15", 512)
        if entry:
            cc = entry["configs"]["customcontrast"]["vs_bare_cpu"]["median_of_round_ratios"] - 1
            ip = entry["configs"]["ip_adapter_plus"]["vs_bare_cpu"]["median_of_round_ratios"] - 1
            rows.append(["UNet step overhead, SD1.5 512 px", "<= 5 %", f"{100 * cc:+.1f} %", _mark(cc <= 0.05)])
            rows.append(
                [
                    "... vs IP-Adapter-Plus's overhead",
                    "<= IP-Adapter-Plus + 2 points",
                    f"{100 * cc:+.1f} % vs {100 * ip:+.1f} % ({100 * (cc - ip):+.1f} points)",
                    _mark(cc <= ip + 0.02),
                ]
            )
    if encoder:
        for entry in encoder["results"]:
            share = entry["parts"]["encode_step"]["share_of_unet_step_cpu"]
            rows.append(
                [
                    f"encoder per-step work, {entry['family']} {entry['resolution']} px",
                    "<= 2 % of a UNet step",
                    f"{100 * share:.2f} %",
                    _mark(share <= 0.02),
                ]
            )
    for training in (load("training_overhead"), load("training_overhead_512")):
        if not training:
            continue
        size = f"{training['resolution']} px"
        ratio = training["full_vs_diffusion_only_cpu"]["median_of_round_ratios"]
        rows.append(
            [
                f"training objective step, full vs diffusion-only, {size}",
                "<= 1.3x",
                f"{ratio:.2f}x",
                _mark(ratio <= 1.3),
            ]
        )
        whole = training.get("whole_step_full_vs_diffusion_only_cpu")
        if whole is not None:
            ratio = whole["median_of_round_ratios"]
            rows.append(
                [f"... whole step with the frozen encoders, {size}", "<= 1.3x", f"{ratio:.2f}x", _mark(ratio <= 1.3)]
            )
    if loading:
        cc = loading["checkpoints"]["customcontrast"]
        matched = loading["checkpoints"]["customcontrast_size_matched"]
        wall = matched["vs_ip_adapter_wall"]["median_of_round_ratios"]
        cpu = matched["vs_ip_adapter_cpu"]["median_of_round_ratios"]
        rows.append(
            [
                "load_customcontrast time vs load_ip_adapter (size-matched checkpoints)",
                "<= 1.2x",
                f"{wall:.2f}x wall, {cpu:.2f}x CPU (default adapter, 1.6x the bytes: "
                f"{cc['vs_ip_adapter_wall']['median_of_round_ratios']:.2f}x wall)",
                _mark(max(wall, cpu) <= 1.2),
            ]
        )
        rows.append(
            [
                "no second full copy of the weights",
                "peak RSS ~1x the weights",
                f"{cc['peak_over_weights']:.2f}x (size-matched {matched['peak_over_weights']:.2f}x)",
                _mark(cc["peak_over_weights"] < 1.5),
            ]
        )
    return markdown_table(["target", "goal", "measured", "result"], rows)


def _mark(passed: bool) -> str:
    return "pass" if passed else "**miss**"


def main() -> None:
    sections = [("Targets", targets)]
    unet, encoder = merged("unet_step"), merged("encoder_step")
    training, loading = load("training_overhead"), load("loading")
    if unet:
        from unet_step import table as unet_table

        sections.append(("UNet step", lambda: unet_table(unet["results"])))
    if encoder:
        from encoder_step import table as encoder_table

        sections.append(("Encoder", lambda: encoder_table(encoder["results"])))
    trainings = [t for t in (training, load("training_overhead_512")) if t]
    if trainings:
        from training_overhead import table as training_table

        sections.append(("Training step", lambda: "\n".join(training_table(t) for t in trainings)))
    if loading:
        from loading import table as loading_table

        sections.append(("Loading", lambda: loading_table(loading)))
    for title, make in sections:
        print(f"## {title}\n\n{make()}\n")


if __name__ == "__main__":
    main()
