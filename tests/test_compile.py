"""``torch.compile`` of a UNet with CustomContrast attached: no graph break, no recompile per step, eager's output.

Two ways of compiling a diffusers UNet: the whole model (``torch.compile(unet, fullgraph=True)``) and diffusers'
regional compilation (``unet.compile_repeated_blocks(fullgraph=True)``: one graph reused by every transformer block,
much faster to compile; the pre-hook and the image projection then run eagerly).

The backend is ``aot_eager``: it runs the whole of dynamo's full-graph capture and AOTAutograd's tracing, which is
where our code could break a graph (the UNet pre-hook, the image projection, the processors), without
inductor's code generation, which takes minutes for a UNet on a 2-core machine. A manual inductor run is recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_customcontrast.conditioning import OPTIONS_KEY, SubjectOptions
from diffusers_customcontrast.loaders import injection
from diffusers_customcontrast.testing.tiny_models import tiny_adapter, tiny_sd15_pipeline


@pytest.fixture
def unet_with_adapter():
    pipe = tiny_sd15_pipeline()
    unet = pipe.unet.eval()
    injection.attach(unet, tiny_adapter(pipe).eval())
    yield unet
    injection.detach(unet)
    torch._dynamo.reset()


def _inputs(unet, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    image_width = injection.attached(unet).adapter.config.image_embed_dim
    return {
        "sample": torch.randn(2, 4, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(2, 77, width, generator=generator),
        # [negative (blank image), positive] features of one subject, as a pipeline passes them under CFG
        "added_cond_kwargs": {"image_embeds": [torch.randn(2, 1, 257, image_width, generator=generator)]},
    }


def test_compile_fullgraph_matches_eager(unet_with_adapter):
    unet = unet_with_adapter
    inputs = _inputs(unet)
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for timestep in (torch.tensor(999), torch.tensor(500)):
            eager = unet(timestep=timestep, **inputs).sample
            # error_on_recompile: a new timestep each step must reuse the graph, as in a pipeline's denoising loop.
            with torch._dynamo.config.patch(error_on_recompile=timestep.item() != 999):
                out = compiled(timestep=timestep, **inputs).sample
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # The adapter acted: its output is not the bare UNet's.
    state = injection.attached(unet)
    injection.detach(unet)
    with torch.no_grad():
        bare = unet(
            timestep=torch.tensor(500), sample=inputs["sample"], encoder_hidden_states=inputs["encoder_hidden_states"]
        )
    injection.attach(unet, state.adapter)
    assert not torch.allclose(bare.sample, out)


def test_regional_compile_one_graph_for_every_layer(unet_with_adapter):
    unet = unet_with_adapter
    inputs = _inputs(unet)
    other = {**inputs, "added_cond_kwargs": _inputs(unet, seed=1)["added_cond_kwargs"]}
    with torch.no_grad():
        eager = {t: unet(timestep=torch.tensor(t), **inputs).sample for t in (999, 500)}
        eager_other = unet(timestep=torch.tensor(500), **other).sample
        torch._dynamo.reset()
        unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        # Two graphs at most (static shapes, then dynamic ones for the other resolution), not one per layer.
        with torch._dynamo.config.patch(recompile_limit=2):
            out = unet(timestep=torch.tensor(999), **inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = unet(timestep=torch.tensor(500), **inputs).sample
    torch.testing.assert_close(out, eager[999], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager[500], rtol=1e-5, atol=1e-5)
    # The subject is data of the call, not a constant of the graph: another subject reuses it and acts.
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled_other = unet(timestep=torch.tensor(500), **other).sample
    torch.testing.assert_close(compiled_other, eager_other, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(compiled_other, again)


def test_regional_compile_one_graph_for_a_call_with_its_own_scale(unet_with_adapter):
    """A call's own options (``SubjectOptions(scale=0.5)``): one more graph for every layer, not one per layer."""
    unet = unet_with_adapter
    inputs = _inputs(unet)
    options = injection.checked_options(injection.attached(unet), SubjectOptions(scale=0.5, s_plus_scale=0.5))
    halved = {**inputs, "cross_attention_kwargs": {OPTIONS_KEY: options}}
    with torch.no_grad():
        eager = unet(timestep=torch.tensor(500), **halved).sample
        torch._dynamo.reset()
        unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        # Two graphs per scale (static shapes, then dynamic ones for the other resolution), not one per layer.
        with torch._dynamo.config.patch(recompile_limit=4):
            unet(timestep=torch.tensor(999), **inputs)
            out = unet(timestep=torch.tensor(500), **halved).sample
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
