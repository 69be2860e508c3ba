"""Seconds per training step, with and without the contrastive terms (CSCL, MACL, location), on this machine.

Two measurements:

* ``tiny``: whole ``train()`` runs (data loading, frozen encoders, objective, optimizer) of the tiny SD1.5 pipeline
  on synthetic subjects; the median step time of each run, runs alternating between the two settings.
* ``sd15``: one objective step (UNet + adapter forward and backward, AdamW step) of the full-size SD1.5 UNet
  (random weights from its real config, 860M parameters) at 256 px, batch 2, with an adapter of the default size
  (CLIP ViT-H/14 features: 257 x 1280). The frozen encoders' outputs are random tensors; the one encoder cost that
  only the contrastive setting pays, CLIP ViT-H/14 on the positive frames, is timed separately
  (``--image-encoder``), since that model alone is 2.5 GB.

Settings alternate within each round and the medians over rounds are reported: run-to-run noise on a shared CPU is
large (docs/benchmarks.md). Usage::

    python benchmarks/train_step.py tiny --rounds 3 --steps 12
    python benchmarks/train_step.py sd15 --rounds 5 --image-encoder
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ABLATION = {"use_cscl": False, "use_macl": False, "use_location": False}


def _settings(contrastive: bool) -> dict[str, bool]:
    return {} if contrastive else dict(ABLATION)


# ---------------------------------------------------------------------------------------------------- tiny


def bench_tiny(rounds: int, steps: int, resolution: int) -> dict[str, list[float]]:
    from diffusers_customcontrast.data import write_synthetic_dataset
    from diffusers_customcontrast.testing.tiny_models import tiny_sd15_pipeline
    from diffusers_customcontrast.training import TrainingConfig, train

    root = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    tiny_sd15_pipeline().save_pretrained(root / "base")
    write_synthetic_dataset(root / "data", num_subjects=8, frames_per_subject=3, size=resolution)
    results: dict[str, list[float]] = {"contrastive": [], "diffusion only": []}
    for round_index in range(rounds):
        for name, contrastive in (("contrastive", True), ("diffusion only", False)):
            config = TrainingConfig(
                pretrained_model_name_or_path=str(root / "base"),
                train_data=str(root / "data"),
                resolution=resolution,
                train_batch_size=2,
                max_train_steps=steps,
                checkpointing_steps=None,
                report_to="none",
                output_dir=str(root / f"out-{round_index}-{contrastive}"),
                adapter={
                    "hidden_size": 32,
                    "num_heads": 4,
                    "timestep_embed_dim": 32,
                    "visual_depth": 1,
                    "textual_depth": 1,
                },
                **_settings(contrastive),
            )
            results[name].append(train(config).seconds_per_step)
    return results


# ---------------------------------------------------------------------------------------------------- full size


def _sd15_objective(contrastive: bool, unet, adapter):
    from diffusers import DDPMScheduler

    from diffusers_customcontrast.training import CustomContrastObjective, ObjectiveSettings

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return CustomContrastObjective(unet, adapter, scheduler, ObjectiveSettings(**_settings(contrastive))).train()


def _sd15_inputs(batch: int, resolution: int, contrastive: bool, generator: torch.Generator):
    from diffusers_customcontrast.training import ObjectiveInputs

    latent = resolution // 8
    mask = torch.zeros(batch, 1, resolution, resolution)
    mask[..., resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4] = 1
    features = torch.randn(batch, 257, 1280, generator=generator)
    embeds = torch.nn.functional.normalize(torch.randn(batch, 1024, generator=generator), dim=-1)
    return ObjectiveInputs(
        latents=torch.randn(batch, 4, latent, latent, generator=generator),
        noise=torch.randn(batch, 4, latent, latent, generator=generator),
        timesteps=torch.randint(0, 1000, (batch,), generator=generator),
        encoder_hidden_states=torch.randn(batch, 77, 768, generator=generator),
        reference_features=features,
        target_mask=mask,
        has_mask=torch.ones(batch, dtype=torch.bool),
        image_kept=torch.ones(batch, dtype=torch.bool),
        positive_features=torch.randn(batch, 257, 1280, generator=generator) if contrastive else None,
        appearance_similarity=embeds @ embeds.T if contrastive else None,
    )


def bench_sd15(rounds: int, batch: int, resolution: int, image_encoder: bool) -> dict[str, list[float]]:
    from diffusers_customcontrast.models.adapter import CustomContrastAdapter
    from diffusers_customcontrast.models.architectures import VIT_H_HIDDEN_SIZE, full_size_unet

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = full_size_unet("sd15", meta=False).requires_grad_(False).eval()
    adapter = CustomContrastAdapter.from_unet(unet, image_embed_dim=VIT_H_HIDDEN_SIZE)
    print(f"built the UNet and a default adapter ({sum(p.numel() for p in adapter.parameters()) / 1e6:.1f}M "
          f"trainable parameters) in {time.perf_counter() - start:.0f} s")  # fmt: skip
    objectives = {True: _sd15_objective(True, unet, adapter), False: _sd15_objective(False, unet, adapter)}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    encoder = _vit_h() if image_encoder else None

    results: dict[str, list[float]] = {"contrastive": [], "diffusion only": []}
    if encoder is not None:
        results["ViT-H/14 on the positives"] = []
    for round_index in range(rounds + 1):  # round 0 warms up (allocator, kernels) and is not kept
        for name, contrastive in (("contrastive", True), ("diffusion only", False)):
            inputs = _sd15_inputs(batch, resolution, contrastive, generator)
            start = time.perf_counter()
            output = objectives[contrastive](inputs)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index:
                results[name].append(time.perf_counter() - start)
        if encoder is not None:
            pixels = torch.randn(batch, 3, 224, 224, generator=generator)
            start = time.perf_counter()
            with torch.no_grad():
                encoder(pixels, output_hidden_states=True)
            if round_index:
                results["ViT-H/14 on the positives"].append(time.perf_counter() - start)
        print(f"round {round_index}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items() if v))
    return results


def _vit_h():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=16,
        num_hidden_layers=32,
        patch_size=14,
        image_size=224,
        projection_dim=1024,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- main


def _report(title: str, results: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print("| setting | median s/step | rounds |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    # The same round's two settings ran back to back: their difference is less noisy than the medians' difference.
    paired = [a - b for a, b in zip(results["contrastive"], results["diffusion only"])]
    print(f"| contrastive - diffusion only, same round | {statistics.median(paired):+.3f} | "
          f"{', '.join(f'{v:+.3f}' for v in paired)} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("tiny", "sd15"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per tiny run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="default: 32 (tiny), 256 (sd15)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--image-encoder", action="store_true", help="also time CLIP ViT-H/14 on the positives")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if args.mode == "tiny":
        resolution = args.resolution or 32
        _report(f"tiny SD1.5 train() at {resolution} px, batch 2", bench_tiny(args.rounds, args.steps, resolution))
    else:
        resolution = args.resolution or 256
        results = bench_sd15(args.rounds, args.batch, resolution, args.image_encoder)
        _report(f"full-size SD1.5 UNet objective step at {resolution} px, batch {args.batch}", results)


if __name__ == "__main__":
    main()
