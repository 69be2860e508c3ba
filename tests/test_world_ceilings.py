"""The world's chain, stage by stage: the exact patch autoencoder, the stage ceilings, and the GPU-ready base recipe."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from customcontrast_world import benchmark, load_synthetic_base, write_world
from customcontrast_world.autoencoder import PatchAutoencoder
from customcontrast_world.base_model import PROJECTED_AUTOENCODER_DIR
from customcontrast_world.ceilings import (
    CEILING_STAGES,
    autoencoder_reconstructions,
    shape_accuracy_per_class,
)
from customcontrast_world.evaluation import evaluation_prompts, judge_world_images, render_prompt
from customcontrast_world.judge import load_world_judge
from customcontrast_world.metrics import SubjectGallery
from customcontrast_world.recipe import WORLD_ADAPTER_DIR
from customcontrast_world.train_base import TrainBaseConfig, parse_args, train_base
from diffusers_customcontrast.data.synthetic import SHAPES


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return write_world(
        tmp_path_factory.mktemp("world"), num_train_subjects=4, num_heldout_subjects=8, frames_per_subject=4
    )


def test_patch_autoencoder_round_trips_exactly_and_scales_like_a_vae():
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    autoencoder = PatchAutoencoder(patch_size=4).fit_statistics(images)
    latents = autoencoder.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert latents.shape == (3, 48, 16, 16)
    # Normalised per channel (what the UNet sees), deterministic, and decoded back to the pixels.
    assert latents.transpose(0, 1).flatten(1).mean(dim=1).abs().max() < 1e-5
    assert torch.allclose(latents.transpose(0, 1).flatten(1).std(dim=1), torch.ones(48), atol=1e-4)
    assert torch.equal(latents, autoencoder.encode(images).latent_dist.mode())
    assert (autoencoder.decode(latents).sample - images).abs().max() < 1e-6
    assert (autoencoder(images).sample - images).abs().max() < 1e-6
    with pytest.raises(ValueError, match="power of two, got 3"):
        PatchAutoencoder(patch_size=3)
    with pytest.raises(ValueError, match="divisible by 4, got \\(30, 30\\)"):
        autoencoder.encode(torch.zeros(1, 3, 30, 30))


def test_projected_patch_autoencoder_keeps_the_leading_principal_components():
    # Patches that vary along two pixel directions only (plus a little noise): two components hold them.
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(2, 48, generator=generator)
    weights = torch.randn(64 * 16 * 16, 2, generator=generator)
    patches = weights @ directions + 0.01 * torch.randn(64 * 16 * 16, 48, generator=generator)
    images = torch.nn.functional.pixel_shuffle(patches.view(64, 16, 16, 48).permute(0, 3, 1, 2), 4)
    autoencoder = PatchAutoencoder(patch_size=4, latent_channels=2).fit_statistics(images)
    assert torch.allclose(autoencoder.basis @ autoencoder.basis.T, torch.eye(2), atol=1e-5)
    latents = autoencoder.encode(images).latent_dist.mode()
    assert latents.shape == (64, 2, 16, 16)
    assert torch.allclose(latents.transpose(0, 1).flatten(1).std(dim=1), torch.ones(2), atol=1e-3)
    # Decoding is the orthogonal projection onto those components: what they do not hold is the noise.
    assert (autoencoder(images).sample - images).abs().mean() < 0.02
    # A decoder correction starts at zero: the linear inverse until it is trained.
    corrected = PatchAutoencoder(patch_size=4, latent_channels=2, decoder_channels=8, decoder_layers=1)
    corrected.load_state_dict(autoencoder.state_dict(), strict=False)
    assert not corrected.exact and PatchAutoencoder(patch_size=4).exact
    assert torch.equal(corrected.decode(latents).sample, autoencoder.decode(latents).sample)
    with pytest.raises(ValueError, match="expected latent_channels in 1..48"):
        PatchAutoencoder(patch_size=4, latent_channels=49)


def test_unwhitened_latents_keep_each_components_share_of_the_variance(tmp_path: Path):
    """``whitening=0``: one shared scale (the components' variances in proportion), the same images decoded."""
    generator = torch.Generator().manual_seed(0)
    smooth = torch.rand(8, 3, 8, 8, generator=generator) * 2 - 1  # scenes whose patches vary little inside
    images = torch.nn.functional.interpolate(smooth, size=64, mode="bilinear")
    whitened = PatchAutoencoder(patch_size=4, latent_channels=6, decoder_channels=8, decoder_layers=1)
    whitened.fit_statistics(images)
    with torch.no_grad():  # a trained-looking correction, which reads whitened latents in both
        whitened.decoder[-1].weight.normal_(0, 0.01, generator=generator)
    whitened.save_pretrained(tmp_path)
    shared = PatchAutoencoder.from_pretrained(tmp_path, whitening=0.0)
    latents = shared.encode(images).latent_dist.mode()
    stds = latents.transpose(0, 1).flatten(1).std(dim=1)
    # Each channel's std is its component's std over their root mean square: total variance as when whitened.
    expected = whitened.latents_std / whitened.latents_std.pow(2).mean().sqrt()
    assert torch.allclose(stds, expected, rtol=1e-3) and stds[0] > 2 * stds[-1]
    assert torch.allclose(stds.pow(2).sum(), torch.tensor(6.0), rtol=1e-3)
    assert torch.allclose(shared.decode(latents).sample, whitened(images).sample, atol=1e-5)
    assert torch.equal(whitened.latents_gain, torch.ones(6))
    with pytest.raises(ValueError, match="expected whitening between 0 and 1, got 2"):
        PatchAutoencoder(patch_size=4, whitening=2)
    with pytest.raises(ValueError, match="expected whitening between 0 and 1, got -1"):
        shared.set_whitening(-1)
    assert shared.config.whitening == 0.0


def test_train_base_sets_how_the_unet_sees_the_patch_latents(tmp_path: Path):
    """``--latent_whitening 0``: the decoder trains as before; the UNet's latents keep the components' shares."""
    config = parse_args(
        ["--output_dir", str(tmp_path), "--smoke", "--autoencoder", "projected", "--latent_whitening", "0"]
    )
    train_base(config, log=lambda message: None)
    pipe = load_synthetic_base(path=tmp_path)
    assert pipe.vae.config.whitening == 0.0 and not torch.equal(pipe.vae.latents_gain, torch.ones(12))
    with pytest.raises(ValueError, match="expected --latent_whitening 1 with --autoencoder kl, got 0.5"):
        TrainBaseConfig(output_dir="x", latent_whitening=0.5)


def test_a_pipeline_with_the_patch_autoencoder_saves_and_loads_offline(tmp_path: Path, caplog):
    base = load_synthetic_base()
    autoencoder = PatchAutoencoder(patch_size=4).fit_statistics(torch.rand(4, 3, 64, 64) * 2 - 1)
    pipe = StableDiffusionPipeline(**{**base.components, "vae": autoencoder})
    assert pipe.vae_scale_factor == 4
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["customcontrast_world.autoencoder", "PatchAutoencoder"]
    with caplog.at_level(logging.WARNING):
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded.vae, PatchAutoencoder)
    assert sum("Expected types for vae" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(loaded.vae.latents_std, autoencoder.latents_std)
    assert loaded.to(torch.bfloat16).vae.dtype == torch.bfloat16


def test_patch_autoencoder_reconstructions_are_judged_as_the_real_renders(world):
    """The exact autoencoder's ceiling is the real renders': every reading of the judge is the same."""
    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge)
    prompts = evaluation_prompts(world, num_subjects=6, scenes_per_subject=3)
    renders = [render_prompt(world, p) for p in prompts]
    autoencoder = PatchAutoencoder(patch_size=4)
    reconstructions = autoencoder_reconstructions(autoencoder, renders)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(renders, reconstructions))
    real = judge_world_images(renders, prompts, judge, gallery, world)
    rebuilt = judge_world_images(reconstructions, prompts, judge, gallery, world)
    for field in ("identified", "shape", "texture", "color", "obeyed"):
        assert np.array_equal(getattr(real, field), getattr(rebuilt, field)), field
    # A lossy autoencoder is read differently: the ceiling measures the loss (here, every image blurred flat).
    blurred = autoencoder_reconstructions(_Blur(), renders)
    # Latent noise: drawn from the seed, and on exact latents every bit of it reaches the pixels.
    noisy = autoencoder_reconstructions(autoencoder, renders, latent_noise=0.4, seed=1)
    again = autoencoder_reconstructions(autoencoder, renders, latent_noise=0.4, seed=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(noisy, again))
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(noisy, renders))
    assert judge_world_images(blurred, prompts, judge, gallery, world).shape.mean() < real.shape.mean()
    per_class = shape_accuracy_per_class([real], world)
    assert set(per_class) <= set(SHAPES) and all(0.0 <= v <= 1.0 for v in per_class.values())


def test_shipped_projected_autoencoder_keeps_the_ceiling(world):
    """Its reconstructions are read as the real renders are, within a few points; v4's VAE loses the colours."""
    judge = load_world_judge()
    gallery = SubjectGallery.from_world(world, judge)
    prompts = evaluation_prompts(world, num_subjects=8, scenes_per_subject=6)
    renders = [render_prompt(world, p) for p in prompts]
    autoencoder = PatchAutoencoder.from_pretrained(PROJECTED_AUTOENCODER_DIR)
    assert autoencoder.config.latent_channels == 12 and autoencoder.decoder is not None
    real = judge_world_images(renders, prompts, judge, gallery, world)
    rebuilt = judge_world_images(autoencoder_reconstructions(autoencoder, renders), prompts, judge, gallery, world)
    for field in ("identified", "shape", "texture", "color"):
        assert getattr(rebuilt, field).mean() >= getattr(real, field).mean() - 0.05, field
    vae = load_synthetic_base().vae
    lossy = judge_world_images(autoencoder_reconstructions(vae, renders), prompts, judge, gallery, world)
    assert lossy.color.mean() < real.color.mean() - 0.2


class _Blur(PatchAutoencoder):
    """Decodes every patch to its mean colour: a lossy stand-in for a learned autoencoder."""

    def decode(self, z, return_dict=True, generator=None):
        folded = z.unflatten(1, (3, -1)).mean(dim=2, keepdim=True).expand(-1, -1, 16, -1, -1).flatten(1, 2)
        return super().decode(folded, return_dict=return_dict)


def test_ceilings_only_benchmark_scores_every_stage_and_the_adapter(tmp_path: Path):
    results = benchmark.main(
        ["--smoke", "--ceilings_only", "--output_dir", str(tmp_path), "--adapter", str(WORLD_ADAPTER_DIR)]
    )
    assert list(results["ceilings"]) == list(CEILING_STAGES) and results["runs"] == {}
    assert list(results["autoencoder_latent_noise"]) == ["0.2", "0.4"]
    metrics = {"identity_acc", "shape_acc", "colour_acc", "texture_acc", "controllability", "similarity"}
    for entry in (*results["ceilings"].values(), results["adapter"]):
        assert metrics <= set(entry)
        assert set(entry["shape_acc_per_class"]) <= set(SHAPES)
    # The base model's figures are the same numbers under both keys.
    assert results["base_model"] == results["ceilings"]["base_model"]
    report = (tmp_path / "results.md").read_text()
    assert "| autoencoder reconstructions |" in report and "| shape accuracy | circle |" in report
    assert "| autoencoder reconstructions, latent noise 0.4 |" in report
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "tradeoff.png").exists()


def test_train_base_smoke_on_the_patch_autoencoder_with_mixed_precision(tmp_path: Path):
    """The GPU command's smoke mode, on the CPU: bf16 autocast, the patch latents, snapshots for learning curves."""
    config = parse_args(
        ["--output_dir", str(tmp_path), "--smoke", "--autoencoder", "patch", "--mixed_precision", "bf16",
         "--device", "cpu", "--snapshot_every", "2", "--unet_channels", "64,64,128"]
    )  # fmt: skip
    assert config.unet_steps == 4 and config.num_train_subjects == 3 and config.autoencoder == "patch"
    train_base(config, log=lambda message: None)
    pipe = load_synthetic_base(path=tmp_path)
    assert isinstance(pipe.vae, PatchAutoencoder) and pipe.unet.config.in_channels == 48
    assert tuple(pipe.unet.config.block_out_channels) == (64, 64, 128)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["step_2", "step_4"]
    snapshot = load_synthetic_base(path=tmp_path / "snapshots" / "step_4")  # a whole pipeline, for learning curves
    assert all(torch.equal(a, b) for a, b in zip(snapshot.unet.parameters(), pipe.unet.parameters()))
    image = pipe("a star on grass", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_train_base_smoke_trains_the_projected_autoencoder_decoder(tmp_path: Path):
    config = parse_args(["--output_dir", str(tmp_path), "--smoke", "--autoencoder", "projected"])
    train_base(config, log=lambda message: None)
    pipe = load_synthetic_base(path=tmp_path)
    assert isinstance(pipe.vae, PatchAutoencoder) and pipe.vae.config.latent_channels == 12
    assert pipe.unet.config.in_channels == 12 and pipe.vae.decoder is not None
    assert pipe.vae.decoder[-1].weight.abs().sum() > 0  # trained away from the linear inverse
    image = pipe("a star on grass", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_train_base_warm_restarts_the_unet_stage_from_a_finished_run(tmp_path: Path):
    """``--unet_init_from``: a second learning-rate cycle starts from the finished run's UNet and text encoder."""
    first = tmp_path / "first"
    train_base(parse_args(["--output_dir", str(first), "--smoke"]), log=lambda message: None)
    restart = ["--smoke", "--stages", "unet", "--init_from", str(first), "--unet_init_from", str(first)]
    # With a learning rate of 0 the restart keeps the weights it started from exactly (a new UNet would differ).
    frozen = tmp_path / "frozen"
    train_base(parse_args(["--output_dir", str(frozen), *restart, "--unet_lr", "0"]), log=lambda message: None)
    before, after = load_synthetic_base(path=first), load_synthetic_base(path=frozen)
    for name in ("unet", "text_encoder"):
        pairs = zip(getattr(before, name).parameters(), getattr(after, name).parameters())
        assert all(torch.equal(a, b) for a, b in pairs), name
    # A UNet of other widths is refused in one sentence, before any step.
    with pytest.raises(ValueError, match="expected --unet_init_from to hold a UNet with 8 latent channels and widths"):
        config = parse_args(["--output_dir", str(tmp_path / "wide"), *restart, "--unet_channels", "64,64,128"])
        train_base(config, log=lambda message: None)


def test_train_base_refuses_unknown_choices_in_one_sentence():
    with pytest.raises(
        ValueError, match="expected --autoencoder to be one of \\['kl', 'patch', 'projected'\\], got 'vq'"
    ):
        TrainBaseConfig(output_dir="x", autoencoder="vq")
    with pytest.raises(ValueError, match="expected --mixed_precision to be one of"):
        TrainBaseConfig(output_dir="x", mixed_precision="fp8")


def test_adapter_training_loads_a_base_on_the_worlds_autoencoder(world, tmp_path: Path, monkeypatch):
    """The trainer takes the VAE class that model_index.json names, once its module is imported, and never imports it
    on the file's word."""
    from customcontrast_world.recipe import world_training_config
    from diffusers_customcontrast.training.components import load_base_model
    from diffusers_customcontrast.training.config import ConfigError

    pipe = load_synthetic_base()
    pipe.vae = PatchAutoencoder.from_pretrained(PROJECTED_AUTOENCODER_DIR)
    pipe.save_pretrained(tmp_path / "base")
    config = world_training_config(
        world.split_dir("train"), tmp_path / "run", pretrained_model_name_or_path=str(tmp_path / "base")
    )
    assert isinstance(load_base_model(config).vae, PatchAutoencoder)

    module = "customcontrast_world.autoencoder"
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ConfigError, match=f"names {module}.PatchAutoencoder, from a module that is not imported"):
        load_base_model(config)
    assert module not in sys.modules
