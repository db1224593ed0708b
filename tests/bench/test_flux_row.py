"""Smoke test of the FLUX.1-dev GPU row (bench/flux_row.py) on the CPU with the tiny Flux.

The real run needs an H100/H200 (FLUX.1-dev's architecture at 1024 px in bf16); this keeps the
script executing end to end — through the shipped loop (``train_subject`` -> ``TrainEngine``) —
so it cannot rot. The diffusers peer arm needs torchvision and minutes of start-up: not run here.
"""

from __future__ import annotations

import json

from bench.flux_row import FLUX_DEV, main


def test_tiny_flux_row_runs_the_shipped_loop(tmp_path):
    out = tmp_path / "flux.json"
    args = ["--tiny", "--steps", "2", "--images", "2", "--out", str(out), "--workdir", str(tmp_path)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["model"] == "tiny-flux" and result["settings"]["per_step"] == "1 + 1"
    assert result["raydb"]["steps"] == 2 and result["raydb"]["images_per_s"] > 0
    assert "peer" not in result
    # the GPU row's transformer is FLUX.1-dev's: 24 heads x 128 = 3072 wide, 19 + 38 blocks
    config = FLUX_DEV["transformer"]
    assert config["num_attention_heads"] * config["attention_head_dim"] == 3072
    assert (config["num_layers"], config["num_single_layers"]) == (19, 38)
