"""``benchmarks/warm_start.py --smoke``: a world IP-Adapter-Plus, written in the original layout, warm-starts a run.

The script trains an IP-Adapter-Plus on a tiny world for two steps, exports it with ``ip_adapter_state_dict``, and
starts ``train()`` from that file with ``init_from_ip_adapter``. What it reports is checked against diffusers'
own IP-Adapter-Plus: its images of the exported file and its diffusion loss on the warm start's first batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "warm_start.py"


def test_the_warm_start_benchmark_starts_at_ip_adapter_plus_and_opens_the_added_parts(tmp_path):
    command = [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--output_dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "warm_start.json").read_text())
    assert (tmp_path / "warm_start.png").is_file()

    # diffusers' load_ip_adapter of the written file gives the trained adapter's images and the converted one's.
    differences = result["export_check_max_abs_difference"]
    assert differences["trained IP-Adapter-Plus"] < 1e-4 and differences["converted at step 0"] < 1e-4
    assert differences["IP-Adapter-Plus on vs off (8-bit)"] > 0.01
    # The warm start's first step is IP-Adapter-Plus's own diffusion loss on that batch.
    assert result["first_step_diffusion_loss"]["max_relative_difference"] < 1e-5

    opening = ("s_plus_scale", "gate_strength", "tv_fusion_norm")
    warm = result["histories"]["warm start"]
    assert all(warm[name][0] == 0 for name in opening)  # shut at step 1
    assert all(warm[name][-1] > 0 for name in opening)  # opened by the last
    continued = result["histories"]["IP-Adapter-Plus continued"]
    assert all(value == 0 for name in opening for value in continued[name])  # frozen: IP-Adapter-Plus throughout
    assert set(result["scores"]) >= {"base model (no subject)", "IP-Adapter-Plus (diffusers' load_ip_adapter)"}
