"""Ray Train fault tolerance: a SIGKILLed worker and a killed driver cost only the steps since the
last checkpoint (local CPU cluster, tiny model). Split from test_train_distributed.py so the two
heavy files run in parallel under ``make test``'s two pytest processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydb import faults
from raydb.registry import latest_version
from raydb.storage import Storage

pytestmark = pytest.mark.ray


def _metrics(result: dict) -> list[dict]:
    return [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_survive_a_killed_worker_and_register(ray_cluster, make_cfg, tmp_path,
                                                          monkeypatch, class_images_dir):
    """2 workers; worker 1 is SIGKILLed at step 5 (after checkpoints at 2 and 4): the group is
    replaced, resumes from a checkpoint, finishes exactly max_steps and registers the adapter."""
    from raydb.train.stage import train_distributed

    monkeypatch.setenv(faults.ENV, json.dumps(
        {"train_step": {"rank": 1, "step": 5, "once": str(tmp_path / "killed-once")}}))
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
    from raydb.train.rundir import run_uri
    from raydb.train.stage import train_distributed

    cfg = make_cfg(cluster={"num_workers": 1},
                   prior={"class_data": class_images_dir, "num_class_images": 4},
                   train={"max_steps": 30, "checkpoint_every": 3, "resolution": 64})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    script = (
        "import json, sys\n"
        "from raydb.config import load_config\n"
        "from raydb.ray_utils import init_ray\n"
        "from raydb.train.stage import train_distributed\n"
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
    assert [m["step"] for m in _metrics(result)] == list(range(1, 31))
