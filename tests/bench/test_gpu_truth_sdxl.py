"""Smoke test of the SDXL GPU benchmark (bench/gpu_truth_sdxl.py) on the CPU with the tiny SDXL.

The real run needs an H100/H200 (SDXL base at 1024 px); this keeps the script executing end to end
so it cannot rot. The diffusers peer arm (``--peer``) is not run here: it needs torchvision and
minutes of start-up.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_truth_sdxl.py"


def test_tiny_sdxl_run_writes_every_figure(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling gpu_truth.py
    spec = importlib.util.spec_from_file_location("gpu_truth_sdxl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "sdxl.json"
    module.main(["--tiny", "--cpu", "--out", str(out)])
    result = json.loads(out.read_text())

    assert result["errors"] == {}
    assert result["model"] == "tiny-sdxl" and result["params_m"]["text_encoder_2"] > 0
    arms = {(r["arm"], r["instance_per_step"]) for r in result["train"]}
    assert arms == {("cached latents", 1), ("VAE every step", 1)}
    by_arm = {r["arm"]: r for r in result["train"]}
    # the uncached arm also runs the VAE encoder: more FLOPs per step
    assert by_arm["VAE every step"]["flops_per_step"] > by_arm["cached latents"]["flops_per_step"]
    assert all(r["images_per_s"] > 0 and r["images_per_step"] == 2 for r in result["train"])
    assert set(result["cached_over_uncached"]) == {"1"}
    assert [g["batch"] for g in result["generation"]] == [1]
    assert result["generation"][0]["images_per_s"] > 0
