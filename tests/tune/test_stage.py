"""Ray Tune search over prior_loss_weight x learning_rate, on a local cluster with the tiny model
(the first test runs it as a ``tune: true`` training of the service)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from raydb.registry import latest_version
from raydb.storage import Storage
from tests.helpers.drivers import kill_driver, start_driver
from tests.helpers.images import demo_photos
from tests.helpers.trainings import CancelDuringStage, FakeJobs

pytestmark = pytest.mark.ray

GRID = {"prior_loss_weight": [0.0, 1.0], "learning_rate": [1e-3, 1e-2], "eval_every": 2,
        "grace_period": 1, "reduction_factor": 2}


def _rows(path: str) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _tune_fields(cfg) -> dict[str, str]:
    """A ``tune: true`` training of ``cfg``'s subject, as the form fields of ``POST /v1/trainings``."""
    return {"subject_id": cfg.subject.id, "instance_prompt": cfg.subject.instance_prompt,
            "class_prompt": cfg.subject.class_prompt, "overrides": json.dumps({"tune": True})}


def test_grid_search_asha_and_best_registered(ray_cluster, make_cfg, class_images_dir):
    """A ``tune: true`` training of the service (photos submitted as over HTTP, then the job's
    entrypoint) runs the operator's ``service.tune`` search and registers its best trial.

    2x2 grid, two trials at a time: the lr=1e-3 trials of the second pair reach the first rung
    after both first-pair trials recorded theirs, score worse than the cut-off (the lr=1e-2 trial
    is ahead) and are stopped there."""
    from raydb.config import RaydbConfig
    from raydb.storage import join
    from raydb.trainings.job import run_training
    from raydb.trainings.service import TrainingService
    from raydb.tune import tune_uri

    # 4 class images to train on, the other 4 of the folder held out for val_prior
    cfg = make_cfg(train={"max_steps": 8}, prior={"class_data": class_images_dir, "num_class_images": 4},
                   service={"tune": GRID | {"max_concurrent_trials": 2}, "max_tune_gpus": 2},
                   eval={"clip_model": "tiny", "num_images": 1, "num_inference_steps": 2})
    service = TrainingService(cfg, Storage(), FakeJobs())
    view, _ = service.submit("t1", _tune_fields(cfg), demo_photos(), None)  # builtin:demo's photos
    assert run_training(service.store, "t1", view["id"]) == "succeeded"
    trained = RaydbConfig.model_validate(service.store.request("t1", view["id"])["config"])
    summary = Storage().read_json(join(tune_uri(trained), "summary.json"))
    rows = _rows(summary["results_csv"])
    assert len(rows) == 4
    assert {(float(r["prior_loss_weight"]), float(r["learning_rate"])) for r in rows} == {
        (0.0, 1e-3), (0.0, 1e-2), (1.0, 1e-3), (1.0, 1e-2)}
    assert set(rows[0]) >= {"trial", "prior_loss_weight", "learning_rate", "val_instance",
                            "val_prior", "val_score", "steps", "status"}
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    assert stopped, "ASHA stopped no trial"
    assert all(int(r["steps"]) < 8 for r in stopped)
    completed = [r for r in rows if r["status"] == "completed"]
    best = min(completed, key=lambda r: float(r["val_score"]))
    assert summary["best"]["val_score"] == pytest.approx(float(best["val_score"]))
    # val_score = val_instance + 1.0 * val_prior, whatever the trial's prior_loss_weight
    for r in completed:
        assert float(r["val_score"]) == pytest.approx(float(r["val_instance"]) + float(r["val_prior"]))
    # with eval.clip_model set, the validator also reports CLIP-I / CLIP-T
    log = (Path(summary["best"]["run_dir"]) / "metrics.jsonl").read_text()
    logged = [json.loads(x) for x in log.splitlines()]
    assert any("val_clip_i" in m and "val_clip_t" in m for m in logged)
    record = latest_version(Storage(), cfg.workspace, "t1", cfg.subject.id)
    view = service.get("t1", view["id"])
    assert view["subject"] == {"subject_id": cfg.subject.id, "version": record["version"]}
    assert view["trials"] == {"planned": 4, "started": 4} and view["max_steps"] == 4 * 8
    assert 8 * len(completed) < view["step"] <= 4 * 8  # the stopped trials ran some steps too
    meta = json.loads((Path(record["uri"]) / "adapter.json").read_text())
    assert meta["tune"]["hyperparameters"] == {"prior_mode": "images",
                                               "prior_loss_weight": float(best["prior_loss_weight"]),
                                               "learning_rate": float(best["learning_rate"])}
    assert meta["training"]["prior_loss_weight"] == float(best["prior_loss_weight"])
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_search_cancelled_while_it_runs_registers_nothing(ray_cluster, make_cfg, class_images_dir):
    """A ``tune: true`` training whose ``DELETE`` lands while its search runs: the search finishes
    and has a best trial, but nothing is registered — the tune
    stage only returns the best adapter; the pipeline's register stage, which the job runs only
    after winning the outcome, is the only registrar (a search that registered its best trial itself
    ended a cancelled training registered)."""
    from raydb.config import RaydbConfig
    from raydb.registry import list_subjects
    from raydb.storage import join
    from raydb.trainings.job import run_training
    from raydb.trainings.service import TrainingService
    from raydb.tune import tune_uri

    cfg = make_cfg(train={"max_steps": 2}, prior={"class_data": class_images_dir, "num_class_images": 4},
                   service={"tune": {"prior_loss_weight": [1.0], "learning_rate": [1e-2], "eval_every": 2,
                                     "max_concurrent_trials": 1}})
    jobs = FakeJobs()
    service = TrainingService(cfg, Storage(), jobs)
    view, _ = service.submit("t1", _tune_fields(cfg), demo_photos(), None)
    job_store = CancelDuringStage(service.store, "tune", lambda: service.cancel("t1", view["id"]))
    assert run_training(job_store, "t1", view["id"]) == "cancelled"
    assert job_store.cancelled and jobs.stopped == jobs.submitted
    trained = RaydbConfig.model_validate(service.store.request("t1", view["id"])["config"])
    summary = Storage().read_json(join(tune_uri(trained), "summary.json"))  # the search did finish
    assert (Path(summary["best"]["run_dir"]) / "adapter" / "adapter.json").is_file()
    assert list_subjects(Storage(), cfg.workspace, "t1") == {}
    assert not (Path(cfg.workspace) / "tenants" / "t1" / "subjects").exists()
    assert service.get("t1", view["id"])["status"] == "cancelled"


def test_killed_tune_driver_resumes(ray_cluster, make_cfg, tmp_path, class_images_dir):
    """Kill the tune driver after its first trial finished; the rerun restores the experiment and
    does not train the finished trial again.

    The search's dimension is ``prior.mode`` (λ = 1 both): one trial holds the prior half to class
    images, the other to the frozen base's prediction on images of the same folder (the pool);
    both are scored on the folder's held-out images."""
    from raydb.tune import run_tune, tune_uri

    cfg = make_cfg(train={"max_steps": 4}, prior={"class_data": class_images_dir, "num_class_images": 4},
                   tune=GRID | {"prior_loss_weight": [1.0], "learning_rate": [1e-2],
                                "prior_mode": ["images", "model"],
                                "max_concurrent_trials": 1, "eval_every": 2,
                                "grace_period": 2})  # no early stop: both trials finish
    driver = start_driver(ray_cluster, cfg, tmp_path, "raydb.tune.run_tune")
    from raydb.train.rundir import runs_uri

    runs = Path(runs_uri(cfg))
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not list(runs.glob("*/result.json")):
            assert driver.poll() is None, "tune driver ended before any trial finished"
            time.sleep(0.5)
        time.sleep(3)  # let Tune record the finished trial in its experiment state
    finally:
        kill_driver(driver)
    finished = list(runs.glob("*/result.json"))
    assert len(finished) == 1, "expected exactly one finished trial before the kill"
    first_mtime = finished[0].stat().st_mtime_ns
    assert (Path(tune_uri(cfg)) / "ray" / "search").is_dir()
    time.sleep(2)
    summary = run_tune(cfg, quiet=True)
    assert summary["restored"], "the rerun started a new search instead of restoring it"
    assert summary["trials"] == 2
    # The finished trial was not trained again: either Tune had recorded it as done, or (killed
    # before Tune saved that) its trainer resumed from the final checkpoint with nothing to do.
    first = json.loads(finished[0].read_text())
    assert finished[0].stat().st_mtime_ns == first_mtime or first["resumed_from"] == 4
    assert len(list(runs.glob("*/result.json"))) == 2
    rows = _rows(summary["results_csv"])
    assert sorted(r["prior_mode"] for r in rows) == ["images", "model"]
    modes = [json.loads(p.read_text())["training"]["prior_mode"] for p in runs.glob("*/adapter/adapter.json")]
    assert sorted(modes) == ["images", "model"]
    scores = {r["prior_mode"]: float(r["val_prior"]) for r in rows}
    assert scores["images"] != scores["model"] and all(v > 0 for v in scores.values())
