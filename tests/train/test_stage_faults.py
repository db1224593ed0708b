"""Ray Train fault tolerance: a SIGKILLed worker and a killed driver cost only the steps since the
last checkpoint (local CPU cluster, tiny model). Split from train/test_stage.py so the two
heavy files run in parallel under ``make test``'s two pytest processes.

A resumed run is judged against an uninterrupted run of the same config in another workspace: the
same per-step losses and the same adapter, bit for bit. That is exact, not approximate, because
(1) every sample is a function of its global position (train/data.py), (2) a checkpoint holds the
LoRA and optimizer state, lr schedule and RNG state, and (3) the runs are float64
(``train.dtype``), with class images that are copies of one image, so however Ray Data splits the
class rows over the (restarted) workers, every worker's class half is the same data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from raydb import faults
from raydb.registry import latest_version
from raydb.storage import Storage
from tests.helpers.drivers import kill_driver, start_driver
from tests.helpers.images import image_folder
from tests.helpers.runs import adapter_tensors, run_metrics

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def same_class_images(tmp_path_factory) -> str:
    """Four copies of one image: any split of the class rows gives every worker the same data."""
    from raydb.data.demo_subject import demo_images

    image = demo_images(1, size=64)[0]
    return image_folder(tmp_path_factory.mktemp("same-class"), [image] * 4, prefix="class")


def _assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    """Per-step losses and gradient norms, and the saved adapter, equal those of the uninterrupted run."""
    got, want = run_metrics(resumed), run_metrics(uninterrupted)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for key in ("loss", "loss_instance", "loss_prior", "grad_norm"):
        assert [m[key] for m in got] == [m[key] for m in want], key
    a, b = adapter_tensors(resumed), adapter_tensors(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Both tests train one config (2 workers, 8 steps, a checkpoint every 2) and are judged against one
# uninterrupted run of it, trained once per module (a Ray Train run costs ~a minute here).
_REFERENCE: dict[str, dict] = {}


def _config(make_cfg, class_images: str):
    return make_cfg(cluster={"num_workers": 2, "max_failures": 2},
                    prior={"class_data": class_images, "num_class_images": 4},
                    train={"max_steps": 8, "checkpoint_every": 2, "dtype": "float64"})


def _uninterrupted(train_distributed, cfg, workspace: Path) -> dict:
    """The uninterrupted run of ``cfg`` (trained in ``workspace`` the first time it is asked for)."""
    if "run" not in _REFERENCE:
        reference = cfg.model_copy(update={"workspace": str(workspace)})
        _REFERENCE["run"] = train_distributed(reference, quiet=True)
    return _REFERENCE["run"]


def test_two_workers_survive_a_killed_worker_and_register(ray_cluster, make_cfg, tmp_path,
                                                          monkeypatch, same_class_images):
    """2 workers; worker 1 is SIGKILLed at step 5 (after checkpoints at 2 and 4): the group is
    replaced, resumes from a checkpoint, finishes exactly max_steps, the pipeline registers the
    adapter — and it trained exactly what an uninterrupted run trains.

    Deliberate break caught: the checkpoint's optimizer state not restored (``restore_payload``
    skipping ``optimizer.load_state_dict``): the step numbers still run 1..8, the losses after the
    resume do not match.
    """
    from raydb.pipeline import run_pipeline
    from raydb.train.rundir import RESULT
    from raydb.train.stage import train_distributed

    monkeypatch.setenv(faults.ENV, json.dumps(
        {"train_step": {"rank": 1, "step": 5, "once": str(tmp_path / "killed-once")}}))
    cfg = _config(make_cfg, same_class_images)
    summary = run_pipeline(cfg, stages=["train", "register"], quiet=True)
    result = json.loads((Path(summary["run_dir"]) / RESULT).read_text())
    assert (tmp_path / "killed-once").exists(), "the fault was not injected"
    # Resumed from a checkpoint taken before the kill at step 5 (step 4, or step 2 when the
    # controller had not yet registered step 4's report when it saw the worker die).
    assert result["resumed_from"] in (2, 4)
    lines = run_metrics(result)
    assert [m["step"] for m in lines] == list(range(1, 9))  # continues the count, exactly max_steps
    assert all(m["images_per_s"] > 0 for m in lines)
    record = latest_version(Storage(), cfg.workspace, cfg.subject.tenant, cfg.subject.id)
    assert record["uri"] == summary["registered"]
    meta = json.loads((Path(record["uri"]) / "adapter.json").read_text())
    assert meta["metrics"]["num_workers"] == 2 and meta["metrics"]["steps"] == 8
    monkeypatch.delenv(faults.ENV)
    _assert_same_run(result, _uninterrupted(train_distributed, cfg, tmp_path / "uninterrupted"))
    # a rerun of the finished run trains nothing and keeps the registered version
    again = run_pipeline(cfg, stages=["train", "register"], quiet=True)
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped"]
    assert again["registered"] == record["uri"]
    assert train_distributed(cfg, quiet=True)["skipped"]  # the stage itself finds the run finished


def test_rerun_after_driver_killed_resumes(ray_cluster, make_cfg, tmp_path, same_class_images):
    """The driver is SIGKILLed while its run is held at step 5 (a ``pause`` fault, after the
    checkpoints at 2 and 4); the rerun resumes from a registered checkpoint and ends with the losses
    and adapter of an uninterrupted run."""
    from raydb.train.rundir import run_uri
    from raydb.train.stage import train_distributed

    cfg = _config(make_cfg, same_class_images)
    held = tmp_path / "held-once"
    driver = start_driver(ray_cluster, cfg, tmp_path, "raydb.train.stage.train_distributed", env={
        faults.ENV: json.dumps({"train_step": {"rank": 0, "step": 5, "pause": 600, "once": str(held)}})})
    run = Path(run_uri(cfg))
    # generous: the driver imports, encodes and starts a 2-worker group before step 5 (over 4 minutes
    # in a full make test on the 2 shared cores)
    deadline = time.time() + 600
    try:
        # held at step 5, and the checkpoint of step 4 registered by Ray Train (its snapshot names it;
        # the worker's upload merely appearing is not enough)
        snapshot = run / "checkpoint_manager_snapshot.json"
        while time.time() < deadline and not (held.exists() and "checkpoint-step-" in (
            snapshot.read_text() if snapshot.exists() else "")):
            assert driver.poll() is None, "driver ended before its run was held"
            time.sleep(0.2)
        time.sleep(1)  # the controller registers step 4's report a moment after the worker reports it
    finally:
        kill_driver(driver)
    assert held.exists() and "checkpoint-step-" in snapshot.read_text(), "not held within the deadline"
    time.sleep(2)  # let the cluster reap the dead job's actors
    result = train_distributed(cfg.model_copy(update={}), quiet=True)
    assert result["resumed_from"] in (2, 4)
    assert [m["step"] for m in run_metrics(result)] == list(range(1, 9))
    _assert_same_run(result, _uninterrupted(train_distributed, cfg, tmp_path / "uninterrupted"))
