"""Smoke test of the SDXL GPU benchmark (``python -m bench.gpu_truth_sdxl``) on the CPU with the tiny
SDXL.

The real run needs an H100/H200 (SDXL base at 1024 px); this keeps the script executing end to end
so it cannot rot. The diffusers peer arm (``--peer``) is not run here: it needs torchvision and
minutes of start-up (``tests/bench/test_gpu_truth.py`` checks its flags against the script).
"""

from __future__ import annotations

import json

from bench import gpu_truth_sdxl


def test_tiny_sdxl_run_writes_every_figure(tmp_path):
    out = tmp_path / "sdxl.json"
    gpu_truth_sdxl.main(["--tiny", "--cpu", "--out", str(out)])
    result = json.loads(out.read_text())

    assert result["errors"] == {} and result["complete"]
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
    # the graph step carries SDXL's pooled embedding and time ids: on the CPU its eager path
    # gives the eager engine's losses and grad norms
    engines = {r["engine"]: r for r in result["engine"]}
    assert set(engines) == {"eager", "eager + prefetch", "graphs"}
    assert engines["graphs"]["same_math"] is True and engines["graphs"]["compared_steps"] == 2
    assert "| 1 + 1 | graphs |" in gpu_truth_sdxl.render(result)
