"""``benchmarks/gpu.py --smoke``: the GPU benchmark's whole code path on CPU with tiny UNets (no GPU here).

Every configuration runs eager, the compiled paths (whole model and diffusers' regional compilation) run with
dynamo's ``eager`` backend, the FLOP ratios come from ``common.count_flops``, and the training step compares the full
objective with diffusion only. No timing is asserted: the figures of a smoke run mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
CONFIGS = {"bare", "customcontrast", "customcontrast_image_context", "ip_adapter_plus"}


def test_the_gpu_benchmark_runs_every_configuration_in_smoke_mode(tmp_path):
    output = tmp_path / "gpu.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())

    assert result["smoke"] is True and result["machine"]["device"] == "cpu" and result["machine"]["gpu"] is None
    assert [(run["family"], run["dtype"]) for run in result["runs"]] == [("sd15", "fp32"), ("sdxl", "fp32")]
    for run in result["runs"]:
        assert set(run["configs"]) == CONFIGS
        assert all(config["eager_ms"] > 0 for config in run["configs"].values())
        flops = run["flop_ratio"]
        assert flops["bare"] == 1
        # Both adapters add work; CustomContrast as a pipeline runs it adds more than with its image context given.
        assert flops["customcontrast"] > flops["customcontrast_image_context"] > 1 and flops["ip_adapter_plus"] > 1
    sd15 = result["runs"][0]["configs"]
    for mode in ("compile", "regional"):  # the compiled paths ran (with their ratio to the bare UNet's)
        assert sd15["customcontrast"][f"{mode}_ms"] > 0 and sd15["customcontrast"][f"{mode}_vs_bare"] > 0
    training = result["training"]["fp32"]
    assert training["full"]["ms"] > 0 and training["diffusion_only"]["ms"] > 0
    assert training["full_vs_diffusion_only"] == training["full"]["ms"] / training["diffusion_only"]["ms"]
