"""Smoke test of the GPU benchmark (``python -m bench.gpu_truth``) on the CPU with its --tiny model.

The real run needs an H100/H200; this keeps the script executing end to end so it cannot rot, and
shows that what it reports is the shipped engine's numbers.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from bench import gpu_engine, gpu_truth, harness, peer_dreambooth, training
from raydb.models.tiny import tiny_architecture

PEERS = harness.peers_dir() / "diffusers"


def test_tiny_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_truth.json"
    peer_script = PEERS / "train_dreambooth_lora.py"  # a dry run only writes its command
    gpu_truth.main(["--tiny", "--cpu", "--out", str(out), "--budget-s", "3600",
                    "--peer-script", str(peer_script), "--peer-dry-run"])
    result = json.loads(out.read_text())

    assert result["errors"] == {}
    assert result["env"]["torch"] and result["env"]["diffusers"] and result["env"]["chip"]
    assert result["params_m"]["unet"] > 0
    arms = {(r["arm"], r["instance_per_step"]) for r in result["train"]}
    assert arms == {(a, b) for a in ("cached latents", "VAE every step") for b in (1, 2)}
    for row in result["train"]:
        assert row["images_per_s"] > 0 and row["step_ms_median"] > 0
        assert row["images_per_step"] == 2 * row["instance_per_step"]
        assert row["flops_per_step"] > 0 and row["cuda_graphs"] is False
    # The uncached arm also runs the VAE encoder, so it must count more FLOPs per step.
    by_arm = {(r["arm"], r["instance_per_step"]): r["flops_per_step"] for r in result["train"]}
    assert by_arm[("VAE every step", 1)] > by_arm[("cached latents", 1)]
    assert set(result["cached_over_uncached"]) == {"1", "2"}
    assert all(v > 0 for v in result["cached_over_uncached"].values())
    options = {r["option"]: r for r in result["options"]}
    assert {"channels_last", "fused AdamW", "gradient checkpointing"} <= set(options)
    assert all(r["images_per_s"] > 0 for r in result["options"])
    # layout options from the same init over the same batch: the same first-step gradient
    assert options["channels_last"]["same_math"] is True
    assert [g["batch"] for g in result["generation"]] == [1, 2]
    assert all(g["images_per_s"] > 0 for g in result["generation"])
    assert all(v > 0 for v in result["micro_batch_ms"].values())
    assert "| cached latents |" in gpu_truth.render(result)

    # the engine arms: same batches, same init; on the CPU the graph step runs eagerly and must
    # give eager's losses and grad norms (fp32, same kernels: far inside the 1e-4 tolerance)
    engines = {r["engine"]: r for r in result["engine"]}
    assert set(engines) == {"eager", "eager + prefetch", "graphs"}
    assert (engines["eager"]["prefetch"], engines["graphs"]["cuda_graphs"]) == (False, True)
    for name in ("eager + prefetch", "graphs"):
        row = engines[name]
        assert row["compared_steps"] == 2 and row["same_math"] is True, row
        assert row["max_rel_diff_vs_eager"] <= 1e-4
        assert row["it_per_s"] > 0 and not row["captured"]
    assert engines["eager"]["flops_per_step"] > 0
    assert "| 1 + 1 | graphs |" in gpu_truth.render(result)

    # what the rows report is what the shipped engine computes: TrainEngine built here, with its
    # defaults, on the bench's model and data, gives the eager row's first step and the train
    # section's first row (both from step 0 of the same init)
    _assert_rows_are_the_engines(tmp_path, engines["eager"], result["train"][0])

    # the peer arm (dry run: the peer needs torchvision and accelerate, the device run has them):
    # our settings in its flags, on a model folder diffusers loads like any other
    [p1, p4] = result["peer"]
    cmd = p1["command"]
    assert cmd[1] == str(peer_script)
    flag = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1) if cmd[i].startswith("--")}
    assert flag["--resolution"] == "64" and flag["--train_batch_size"] == "1"
    assert flag["--rank"] == "4" and flag["--mixed_precision"] == "no"
    assert "--with_prior_preservation" in cmd and p4["images_per_step"] == 8
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(flag["--pretrained_model_name_or_path"])
    tiny_unet = tiny_architecture()["unet"]
    assert list(pipe.unet.config.block_out_channels) == list(tiny_unet["block_out_channels"])
    assert len(list(Path(flag["--class_data_dir"]).glob("*.png"))) >= int(flag["--num_class_images"])


def _assert_rows_are_the_engines(tmp_path, eager_row: dict, train_row: dict) -> None:
    from diffusers import DDPMScheduler

    from raydb.models.architectures import SD_NOISE_SCHEDULE
    from raydb.train.engine import TrainEngine
    from raydb.train.step import build_train_state

    args = argparse.Namespace(out=str(tmp_path / "x.json"), budget_s=60.0, cpu=True, resolution=None)
    run = harness.Run(args, tiny_architecture())
    parts = training.frozen(run)
    data = training.training_data(run, parts, cached=True)
    cfg = training.train_config(run, 1)
    state = build_train_state(cfg, training.unet(run), None)
    with TrainEngine(cfg, state, data, noise_scheduler=DDPMScheduler(**SD_NOISE_SCHEDULE),
                     prediction_type="epsilon", vae=parts.vae, device="cpu") as engine:
        first = engine.step()
    assert eager_row["first_steps"][0] == {"loss": first["loss"], "grad_norm": first["grad_norm"]}
    assert train_row["first_step_loss"] == round(first["loss"], 5)
    assert train_row["first_step_grad_norm"] == round(first["grad_norm"], 5)


def test_engine_helpers():
    """The peer's rate from its tqdm bar, the same-math flag and the GPU run's acceptance list."""
    log = ("Steps:  50%|#####     | 20/40 [00:06<00:06,  3.10it/s, loss=0.1]\r"
           "Steps: 100%|##########| 40/40 [00:12<00:00,  3.51it/s, loss=0.2, lr=0.0001]\n")
    assert peer_dreambooth.parse_rate(log) == {"done": 40, "total": 40, "it_per_s": 3.51}
    assert peer_dreambooth.parse_rate("Steps: 100%|##| 4/4 [00:09<00:00,  2.00s/it]")["it_per_s"] == 0.5
    assert peer_dreambooth.parse_rate("no bar here") is None
    eager = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 0.9, "grad_norm": 1.0}]
    assert gpu_engine.compare_steps(eager, eager, tolerance=0.02)["same_math"] is True
    off = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 0.9, "grad_norm": 1.1}]
    flagged = gpu_engine.compare_steps(eager, off, tolerance=0.02)
    assert flagged["same_math"] is False and abs(flagged["max_rel_diff_vs_eager"] - 0.1) < 1e-9

    # the GPU run's acceptance list reads the rows it needs (here: a run that meets two of seven)
    rows = [{"engine": "graphs", "instance_per_step": 1, "it_per_s": 25.0, "gpu_busy": 0.7,
             "captured": True, "same_math": True, "max_rel_diff_vs_eager": 0.003},
            {"engine": "graphs", "instance_per_step": 4, "images_per_s": 79.0, "it_per_s": 9.9}]
    met = dict((name, ok) for name, _, ok in gpu_engine.acceptance(
        {"engine": rows, "peer": [{"instance_per_step": 1, "it_per_s": 5.0}]}))
    assert [name for name, ok in met.items() if ok] == [
        "1+1 graphs >= 20 it/s", "1+1 graphs captured, same math as eager"]
    assert not met["1+1 graphs >= 5.7x diffusers (same run)"]  # 25 / 5 = 5.0


def test_rendering_the_published_results_is_unchanged():
    """docs/performance.md quotes these tables: the 2026-11-26 files still render them."""
    results = json.loads((harness.REPO / "bench/results/gpu_truth_h200_2026-11-26.json").read_text())
    text = gpu_truth.render(results)
    assert "| 4 | cached latents | 41.1 | 194.5 | 10.78 | 73.1 | 7.4% | 9.5% |" in text
    assert "| 1 | 0.85 | 1.18 | 2.69 |" in text  # prior generation at batch 1
    assert "Cached / VAE-every-step speed-up: 1 instance: 0.84×, 2 instance: 1.27×, 4 instance: 1.10×" in text


@pytest.mark.skipif(not PEERS.is_dir(), reason=f"the peer scripts are not here ({PEERS}); set "
                    "RAYDB_PEERS_DIR to the folder holding diffusers/train_dreambooth_lora*.py")
@pytest.mark.parametrize("script", ["train_dreambooth_lora.py", "train_dreambooth_lora_sdxl.py"])
def test_the_peer_scripts_take_every_flag_we_pass(script, tmp_path):
    """The peer runs only on the device; a flag it does not know would fail there, after minutes."""
    source = (PEERS / script).read_text()
    known = set(re.findall(r'"(--[a-z_0-9]+)"', source))
    cmd = peer_dreambooth.peer_command(PEERS / script, model=tmp_path, instance_dir=tmp_path,
                                       class_dir=tmp_path, output_dir=tmp_path, resolution=512,
                                       batch_size=1, rank=4, mixed_precision="bf16", steps=40,
                                       num_class_images=8)
    ours = {arg for arg in cmd if arg.startswith("--")}
    assert len(ours) > 20 and ours <= known, sorted(ours - known)
