"""Smoke test of the FLUX.1-dev GPU row (``python -m bench.flux_row``) on the CPU with the tiny Flux.

The real run needs an H100/H200 (FLUX.1-dev's architecture at 1024 px in bf16); this keeps the
script executing end to end — components and encoded data as ``train_subject`` prepares them, both
arms through ``TrainEngine`` — so it cannot rot before a device is lent. The diffusers peer arm needs
torchvision and minutes of start-up: not run here (its command line is checked by
tests/bench/test_device_run.py).
"""

from __future__ import annotations

import json

from bench.flux_row import FLUX_DEV, main, render


def test_tiny_flux_row_runs_both_arms_through_the_engine(tmp_path):
    out = tmp_path / "flux.json"
    result = main(["--tiny", "--cpu", "--images", "2", "--out", str(out), "--workdir", str(tmp_path)])
    assert result["complete"], (result["errors"], result["skipped"])
    saved = json.loads(out.read_text())
    assert saved["settings"]["per_step"] == "1 + 1" and saved["model"] == "tiny-flux"
    rows = {row["arm"]: row for row in saved["train"]}
    assert rows.keys() == {"eager", "graphs"}
    assert rows["eager"]["cuda_graphs"] is False and rows["graphs"]["cuda_graphs"] is True
    for row in rows.values():
        assert row["images_per_step"] == 2 and row["images_per_s"] > 0 and row["timed_steps"] == 2
    assert "peer" not in saved
    assert "| graphs |" in render(saved)
    # the GPU row's transformer is FLUX.1-dev's: 24 heads x 128 = 3072 wide, 19 + 38 blocks
    config = FLUX_DEV["transformer"]
    assert config["num_attention_heads"] * config["attention_head_dim"] == 3072
    assert (config["num_layers"], config["num_single_layers"]) == (19, 38)
