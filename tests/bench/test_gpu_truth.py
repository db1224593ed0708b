"""Smoke test of the GPU benchmark (bench/gpu_truth.py) on the CPU with its --tiny model.

The real run needs an H100/H200; this keeps the script executing end to end so it cannot rot.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_truth.py"


def _load_bench(name: str):
    import importlib
    import sys

    sys.path.insert(0, str(SCRIPT.parents[1]))
    return importlib.import_module(f"bench.{name}")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_truth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PEER = Path("/work/shared/peers/diffusers/train_dreambooth_lora.py")


def test_tiny_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_truth.json"
    gpu_truth = _load()
    gpu_truth.main(["--tiny", "--cpu", "--out", str(out), "--budget-s", "3600",
                    "--peer-script", str(PEER), "--peer-dry-run"])
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

    # the engine arms: same batches, same init; on the CPU the graph step runs eagerly and must
    # give eager's losses and grad norms (fp32, same kernels: far inside the 1e-4 tolerance)
    engines = {r["engine"]: r for r in result["engine"]}
    assert set(engines) == {"eager", "eager + prefetch", "graphs"}
    for name in ("eager + prefetch", "graphs"):
        row = engines[name]
        assert row["compared_steps"] == 2 and row["same_math"] is True, row
        assert row["max_rel_diff_vs_eager"] <= 1e-4
        assert row["it_per_s"] > 0 and not row["captured"]
    assert engines["eager"]["flops_per_step"] > 0
    assert "| 1 + 1 | graphs |" in gpu_truth.render(result)

    # the peer arm (dry run: the peer needs torchvision and accelerate, the device run has them):
    # our settings in its flags, on a model folder diffusers loads like any other
    [p1, p4] = result["peer"]
    cmd = p1["command"]
    assert cmd[1] == str(PEER)
    flag = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1) if cmd[i].startswith("--")}
    assert flag["--resolution"] == "64" and flag["--train_batch_size"] == "1"
    assert flag["--rank"] == "4" and flag["--mixed_precision"] == "no"
    assert "--with_prior_preservation" in cmd and p4["images_per_step"] == 8
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(flag["--pretrained_model_name_or_path"])
    assert list(pipe.unet.config.block_out_channels) == list(gpu_truth.TINY["unet"]["block_out_channels"])
    assert len(list(Path(flag["--class_data_dir"]).glob("*.png"))) >= int(flag["--num_class_images"])


def test_engine_helpers():
    """GPU busy fraction, the peer's rate from its tqdm bar, and the same-math flag."""
    engine = _load_bench("gpu_engine")
    peer = _load_bench("peer_dreambooth")
    # kernels [0,2] and [1,3] overlap (count once), [5,6] is inside; span [0,10]
    assert engine.busy_fraction([(0, 2), (1, 3), (5, 6), (12, 13)], 0, 10) == 0.4
    log = ("Steps:  50%|#####     | 20/40 [00:06<00:06,  3.10it/s, loss=0.1]\r"
           "Steps: 100%|##########| 40/40 [00:12<00:00,  3.51it/s, loss=0.2, lr=0.0001]\n")
    assert peer.parse_rate(log) == {"done": 40, "total": 40, "it_per_s": 3.51}
    assert peer.parse_rate("Steps: 100%|##| 4/4 [00:09<00:00,  2.00s/it]")["it_per_s"] == 0.5
    assert peer.parse_rate("no bar here") is None
    eager = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 0.9, "grad_norm": 1.0}]
    assert engine.compare_steps(eager, eager, tolerance=0.02)["same_math"] is True
    off = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 0.9, "grad_norm": 1.1}]
    flagged = engine.compare_steps(eager, off, tolerance=0.02)
    assert flagged["same_math"] is False and abs(flagged["max_rel_diff_vs_eager"] - 0.1) < 1e-9

    # the GPU run's acceptance list reads the rows it needs (here: a run that meets two of seven)
    rows = [{"engine": "graphs", "instance_per_step": 1, "it_per_s": 25.0, "gpu_busy": 0.7,
             "captured": True, "same_math": True, "max_rel_diff_vs_eager": 0.003},
            {"engine": "graphs", "instance_per_step": 4, "images_per_s": 79.0, "it_per_s": 9.9}]
    met = dict((name, ok) for name, _, ok in engine.acceptance(
        {"engine": rows, "peer": [{"instance_per_step": 1, "it_per_s": 5.0}]}))
    assert [name for name, ok in met.items() if ok] == [
        "1+1 graphs >= 20 it/s", "1+1 graphs captured, same math as eager"]
    assert not met["1+1 graphs >= 5.7x diffusers (same run)"]  # 25 / 5 = 5.0
