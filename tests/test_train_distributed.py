"""Ray Train integration: TorchTrainer + DDP on a local CPU cluster with the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raydb.data.demo import demo_images
from raydb.registry import latest_version
from raydb.storage import Storage

pytestmark = pytest.mark.ray


def _adapter(result: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(result["adapter_uri"]) / "pytorch_lora_weights.safetensors")


def _metrics(result: dict) -> list[dict]:
    return [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def _folder(path: Path, images) -> str:
    path.mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(path / f"img{i}.png")
    return str(path)


def test_ddp_two_workers_match_one_worker_double_batch(ray_cluster, make_cfg, tmp_path):
    """2 workers x batch b == 1 worker x batch 2b: DDP averages gradients correctly.

    The class images are identical copies, so however Ray Data splits them across workers, every
    worker's class half is the same data as the single worker's.
    """
    from raydb.train.distributed import train_distributed

    same = demo_images(1)[0]
    class_dir = _folder(tmp_path / "class", [same, same, same, same])
    common = {"prior": {"class_data": class_dir, "num_class_images": 4},
              "train": {"max_steps": 2, "checkpoint_every": 100, "learning_rate": 1e-2}}
    one = train_distributed(make_cfg(workspace=str(tmp_path / "one"), cluster={"num_workers": 1},
                                     **{**common, "train": {**common["train"], "batch_size": 2}}),
                            quiet=True, register=False)
    two = train_distributed(make_cfg(workspace=str(tmp_path / "two"), cluster={"num_workers": 2},
                                     **{**common, "train": {**common["train"], "batch_size": 1}}),
                            quiet=True, register=False)
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)
    la, lb = _metrics(one), _metrics(two)
    for x, y in zip(la, lb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        # AdamW is nearly scale-invariant, so the adapters alone would not catch summed instead of
        # averaged gradients; the (pre-clip) gradient norm does.
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    # and the LoRA actually moved, so the comparison is not between two untouched adapters
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


def test_two_workers_survive_a_killed_worker_and_register(ray_cluster, make_cfg, tmp_path,
                                                          monkeypatch, class_images_dir):
    """2 workers; worker 1 is SIGKILLed at step 5 (after checkpoints at 2 and 4): the group is
    replaced, resumes from a checkpoint, finishes exactly max_steps and registers the adapter."""
    from raydb.train.distributed import train_distributed

    monkeypatch.setenv("RAYDB_TEST_KILL_AT_STEP", f"1:5:{tmp_path / 'killed-once'}")
    cfg = make_cfg(cluster={"num_workers": 2, "max_failures": 2},
                   prior={"class_data": class_images_dir, "num_class_images": 4},
                   train={"max_steps": 8, "checkpoint_every": 2})
    result = train_distributed(cfg, quiet=True)
    assert (tmp_path / "killed-once").exists(), "the fault was not injected"
    # Resumed from a checkpoint taken before the kill at step 5 (step 4, or step 2 when the
    # controller had not yet registered step 4's report when it saw the worker die).
    assert result["resumed_from"] in (2, 4)
    lines = _metrics(result)
    assert [m["step"] for m in lines] == list(range(1, 9))  # continues the count, exactly max_steps
    assert all(m["images_per_s"] > 0 for m in lines)
    record = latest_version(Storage(), cfg.workspace, cfg.subject.id)
    assert record["uri"] == result["registered"]
    meta = json.loads((Path(record["uri"]) / "adapter.json").read_text())
    assert meta["metrics"]["num_workers"] == 2 and meta["metrics"]["steps"] == 8
    # a rerun of the finished run trains nothing and keeps the registered version
    again = train_distributed(cfg, quiet=True)
    assert again["skipped"] and again["registered"] == record["uri"]


def test_rerun_after_driver_killed_resumes(ray_cluster, make_cfg, tmp_path, class_images_dir):
    from raydb.train.distributed import train_distributed
    from raydb.train.run import run_uri

    cfg = make_cfg(cluster={"num_workers": 1},
                   prior={"class_data": class_images_dir, "num_class_images": 4},
                   train={"max_steps": 60, "checkpoint_every": 3, "resolution": 64})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    script = (
        "import json, sys\n"
        "from raydb.config import load_config\n"
        "from raydb.ray_utils import init_ray\n"
        "from raydb.train.distributed import train_distributed\n"
        f"cfg = load_config(data=json.load(open({str(cfg_file)!r})))\n"
        "init_ray(cfg)\n"
        "train_distributed(cfg, quiet=True)\n"
    )
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = Path(run_uri(cfg))
    deadline = time.time() + 240
    try:
        # a checkpoint counts once Ray Train registered it (its snapshot names it), not when the
        # worker's upload merely appeared
        snapshot = run / "checkpoint_manager_snapshot.json"
        while time.time() < deadline and "checkpoint-step-" not in (
            snapshot.read_text() if snapshot.exists() else ""
        ):
            assert driver.poll() is None, "driver ended before its first checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert "checkpoint-step-" in snapshot.read_text(), "no checkpoint within the deadline"
    time.sleep(2)  # let the cluster reap the dead job's actors
    result = train_distributed(cfg.model_copy(update={}), quiet=True)
    assert result["resumed_from"] >= 3
    assert [m["step"] for m in _metrics(result)] == list(range(1, 61))


def test_three_instance_images_on_four_workers(ray_cluster, make_cfg, tmp_path, class_images_dir):
    from raydb.train.distributed import train_distributed

    photos = _folder(tmp_path / "photos", demo_images(3))
    cfg = make_cfg(subject={"instance_data": photos}, cluster={"num_workers": 4},
                   prior={"class_data": class_images_dir, "num_class_images": 4},
                   train={"max_steps": 2})
    result = train_distributed(cfg, quiet=True, register=False)
    assert result["steps"] == 2
    meta = json.loads((Path(result["adapter_uri"]) / "adapter.json").read_text())
    assert meta["metrics"]["num_workers"] == 4


def test_too_few_class_images_for_workers_is_a_clear_error(ray_cluster, make_cfg):
    from raydb.train.distributed import train_distributed

    cfg = make_cfg(cluster={"num_workers": 3}, prior={"num_class_images": 2})
    with pytest.raises(ValueError, match="prior.num_class_images"):
        train_distributed(cfg, quiet=True)
