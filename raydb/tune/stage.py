"""``raydb tune``: search ``prior_loss_weight`` and the learning rate (and ``prior.mode``) with Ray Tune.

Ray 2.60's pattern: Tune runs a *driver function* per trial that builds and fits a ``TorchTrainer``
(``Tuner(TorchTrainer(...))`` no longer works with Train V2); Train's reports reach Tune through
``TuneReportCallback``. The trials are ranked by ``val_score = val_instance + w * val_prior`` from
fixed-noise validation — not the training loss, which scales with ``prior_loss_weight`` — or, with
``tune.metric``, by a score of sampled images (``val_fidelity``, ``val_clip_i``, ``val_clip_t``). ASHA stops
weak trials early (time unit: evaluations). Priors and the encode stage run once, before the
trials, and every trial reads the same cache. An interrupted search resumes with ``Tuner.restore``.
A search over ``tune.prior_mode`` scores every trial, whatever its mode, on the same held-out
images of the base model (``val_prior``): model-mode trials train on no class images, but are
held to the same measure of the class prior as image-mode ones.

Outputs under ``<workspace>/tenants/<tenant>/tune/<subject>/<tune.name>/``: ``results.csv``,
``trials.png`` and ``summary.json``. The search returns the best trial (its adapter under its run
folder); registering it, with the search's hyperparameters and scores, is the pipeline's
(:func:`raydb.pipeline.run_pipeline`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from raydb.config import RaydbConfig, SearchSpace
from raydb.storage import Storage, is_s3, join
from raydb.terminal import is_verbose
from raydb.tune.results import last_validation, record_trial, trial_config, trial_rows, trials_png, write_csv

__all__ = ["run_tune", "tune_uri", "default_concurrency", "metric_mode", "TuneFailed"]

log = logging.getLogger(__name__)


class TuneFailed(RuntimeError):
    """No trial of the search completed; the message says where the results table is."""


def tune_uri(cfg: RaydbConfig) -> str:
    """The search's folder, under the subject's tenant: ``tenants/<tenant>/tune/<subject>/<name>``."""
    from raydb.registry import tenant_uri

    return join(tenant_uri(cfg.workspace, cfg.subject.tenant), "tune", cfg.subject.id,
                cfg.tune.name if cfg.tune else "tune")


def default_concurrency(cfg: RaydbConfig, resources: dict[str, float]) -> int:
    """Trials that fit at once: GPUs / workers per trial, or CPUs / (workers + the trial driver)."""
    from raydb.train.stage import resolve_use_gpu

    if resolve_use_gpu(cfg):
        return max(1, int(resources.get("GPU", 0) // cfg.cluster.num_workers))
    per_trial = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1  # + driver and data
    return max(1, int(resources.get("CPU", 1) // per_trial))


def metric_mode(metric: str) -> str:
    """``"min"`` for the held-out loss ``val_score``, ``"max"`` for the sampled-image scores."""
    return "min" if metric == "val_score" else "max"


def _space(space: SearchSpace):
    from ray import tune

    if space.values is not None:
        return tune.grid_search(list(space.values))
    return tune.loguniform(space.low, space.high)


def _trial(config: dict[str, Any], cfg_dict: dict[str, Any], encoded: dict[str, Any],
           class_dataset: Any = None) -> None:
    """Tune driver function: one trial = one TorchTrainer run with this trial's hyperparameters."""
    import tempfile
    from pathlib import Path

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydb.encode.cache import EncodedCache
    from raydb.train.rundir import RESULT
    from raydb.train.stage import build_trainer

    cfg = trial_config(RaydbConfig.model_validate(cfg_dict), config["prior_loss_weight"],
                       config["learning_rate"], config.get("prior_mode"))
    storage = Storage(cfg.s3_endpoint_url)
    trainer, run = build_trainer(cfg, storage, EncodedCache(**encoded),
                                 extra_config={"eval_every": cfg.tune.eval_every},
                                 callbacks=[TuneReportCallback()], class_dataset=class_dataset)
    record_trial(storage, tune_uri(cfg), run)
    trainer.fit()
    result = storage.read_json(join(run, RESULT))
    final = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
    last = last_validation(storage, run)
    # Tune keeps only metrics reported with a checkpoint in its Result: report the final one so.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / RESULT).write_text(json.dumps(result))
        tune.report(final | last | {"run_dir": run, "done": True},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def _trial_line(trial: Any, outcome: str) -> str:
    """``trial 00001 (prior_loss_weight=1, learning_rate=0.001): completed after 2 evaluations,
    val_score 2.07`` — what a person following a search wants from each trial."""
    params = ", ".join(f"{k}={trial.config.get(k):g}" for k in ("prior_loss_weight", "learning_rate")
                       if isinstance(trial.config.get(k), int | float))
    result = trial.last_result or {}
    score = result.get("val_score")
    text = f"trial {str(trial.trial_id).rsplit('_', 1)[-1]} ({params}): {outcome}"
    if result.get("training_iteration"):
        text += f" after {result['training_iteration']} evaluation(s)"
    return text + (f", val_score {score:.4g}" if isinstance(score, int | float) else "")


def _trial_lines() -> Any:
    """A Tune callback logging one raydb line per trial as it ends (Tune's own tables need
    --verbose). Made on first use, so importing this module needs no Ray Tune."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info("%s", _trial_line(trial, "finished"))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.warning("%s", _trial_line(trial, "failed"))

    return TrialLines()


def _winner_samples(cfg: RaydbConfig, storage: Storage, best: dict[str, Any]) -> None:
    """The sample grid (``train.num_sample_images``) for the best trial's adapter only: trials train
    without one (``trial_config``), so a search of n trials samples once, not n times. It runs as a
    Ray task where the trials ran (one CPU, and one GPU when they trained on GPUs), not in the
    driver; a rerun finds it and skips."""
    import ray

    from raydb.registry import ADAPTER_WEIGHTS, SAMPLES
    from raydb.train.outputs import sample_grid_png
    from raydb.train.stage import resolve_use_gpu

    adapter = join(best["run_dir"], "adapter")
    if not cfg.train.num_sample_images or storage.exists(join(adapter, SAMPLES)):
        return
    trial = trial_config(cfg, best["prior_loss_weight"], best["learning_rate"], best.get("prior_mode"))
    seeds = list(range(cfg.train.num_sample_images))  # the trial's own config has none (see above)
    gpu = resolve_use_gpu(cfg)

    @ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)
    def grid() -> bytes:
        here = Storage(cfg.s3_endpoint_url)
        return sample_grid_png(trial, here, here.read_bytes(join(adapter, ADAPTER_WEIGHTS)), seeds=seeds,
                               device="cuda" if gpu else "cpu")

    storage.write_bytes(join(adapter, SAMPLES), ray.get(grid.remote()))


def run_tune(cfg: RaydbConfig, storage: Storage | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Priors + encode once, then the search; returns a summary with the best trial (``best``: its
    row of the results table, ``run_dir`` included). Registers nothing.

    Needs a running Ray cluster (``raydb.cluster.init_ray``, called by the entry points)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raydb.encode.stage import prepare_encoded, read_class_dataset

    if cfg.tune is None:
        raise ValueError("tune: the config has no tune section")
    storage = storage or Storage(cfg.s3_endpoint_url)
    tc = cfg.tune
    cache, _ = prepare_encoded(cfg, storage, with_holdout=True)
    out = tune_uri(cfg)
    if is_s3(out):
        fs, exp_root = storage.arrow_fs(join(out, "ray"))
    else:
        from pathlib import Path

        fs, exp_root = None, str(Path(join(out, "ray")).absolute())
        Path(exp_root).mkdir(parents=True, exist_ok=True)
    name = "search"
    exp_path = f"{exp_root}/{name}"
    max_t = max(1, math.ceil(cfg.train.max_steps / tc.eval_every))
    trainable = tune.with_resources(
        # the trial driver only waits on its trainer: a small CPU share, so Ray Data's reads and the
        # Train workers of running trials are not starved of slots
        tune.with_parameters(_trial, cfg_dict=cfg.to_dict(), encoded=cache.__dict__,
                             class_dataset=read_class_dataset(storage, cache) if cache.num_class else None),
        {"CPU": 0.25})
    restored = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restored:
        if not quiet:
            log.info("resuming the search in %s", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        concurrency = tc.max_concurrent_trials or default_concurrency(cfg, ray.cluster_resources())
        tuner = tune.Tuner(
            trainable,
            param_space={"prior_loss_weight": _space(tc.prior_loss_weight),
                         "learning_rate": _space(tc.learning_rate)}
            | ({"prior_mode": tune.grid_search(list(tc.prior_mode))} if tc.prior_mode else {}),
            tune_config=tune.TuneConfig(
                metric=tc.metric, mode=metric_mode(tc.metric), num_samples=tc.num_samples,
                max_concurrent_trials=concurrency,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                        grace_period=min(tc.grace_period, max_t),
                                        reduction_factor=tc.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=exp_root, storage_filesystem=fs,
                                      verbose=1 if is_verbose() and not quiet else 0,
                                      callbacks=[] if quiet else [_trial_lines()]),
        )
    grid = tuner.fit()
    rows = trial_rows(list(grid), cfg, storage)
    write_csv(storage, join(out, "results.csv"), rows)
    storage.write_bytes(join(out, "trials.png"), trials_png(rows, f"{cfg.subject.id}: search"))
    finished = [r for r in rows if r["status"] == "completed" and r.get(tc.metric) is not None]
    if not finished:
        raise TuneFailed(f"no trial of the search in {out} completed; see {join(out, 'results.csv')}")
    rank = min if metric_mode(tc.metric) == "min" else max
    best = rank(finished, key=lambda r: r[tc.metric])
    _winner_samples(cfg, storage, best)
    summary: dict[str, Any] = {"best": best, "results_csv": join(out, "results.csv"),
                               "plot": join(out, "trials.png"), "trials": len(rows),
                               "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
                               "restored": restored}
    storage.write_json(join(out, "summary.json"), summary)
    return summary
