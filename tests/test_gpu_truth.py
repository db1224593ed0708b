"""Smoke test of the GPU benchmark (bench/gpu_truth.py) on the CPU with its --tiny model.

The real run needs an H100/H200; this keeps the script executing end to end so it cannot rot.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_truth.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_truth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_truth.json"
    gpu_truth = _load()
    gpu_truth.main(["--tiny", "--cpu", "--out", str(out)])
    result = json.loads(out.read_text())

    assert result["errors"] == {}
    assert result["env"]["torch"] and result["env"]["diffusers"] and result["env"]["chip"]
    assert result["params_m"]["unet"] > 0
    arms = {(r["arm"], r["instance_per_step"]) for r in result["train"]}
    assert arms == {(a, b) for a in ("cached latents", "VAE every step") for b in (1, 2)}
    for row in result["train"]:
        assert row["images_per_s"] > 0 and row["step_ms_median"] > 0
        assert row["images_per_step"] == 2 * row["instance_per_step"]
        assert row["flops_per_step"] > 0
    # The uncached arm also runs the VAE encoder, so it must count more FLOPs per step.
    by_arm = {(r["arm"], r["instance_per_step"]): r["flops_per_step"] for r in result["train"]}
    assert by_arm[("VAE every step", 1)] > by_arm[("cached latents", 1)]
    assert set(result["cached_over_uncached"]) == {"1", "2"}
    assert all(v > 0 for v in result["cached_over_uncached"].values())
    options = {r["option"] for r in result["options"]}
    assert {"channels_last", "fused AdamW", "gradient checkpointing"} <= options
    assert all(r["images_per_s"] > 0 for r in result["options"])
    assert [g["batch"] for g in result["generation"]] == [1, 2]
    assert all(g["images_per_s"] > 0 for g in result["generation"])
    assert all(v > 0 for v in result["micro_batch_ms"].values())
    assert "| cached latents |" in gpu_truth.render(result)
