"""``raydb tune``: search ``prior_loss_weight`` and the learning rate with Ray Tune.

Ray 2.60's pattern: Tune runs a *driver function* per trial that builds and fits a ``TorchTrainer``
(``Tuner(TorchTrainer(...))`` no longer works with Train V2); Train's reports reach Tune through
``TuneReportCallback``. The trials are ranked by ``val_score = val_instance + w * val_prior`` from
fixed-noise validation — not the training loss, which scales with ``prior_loss_weight``. ASHA stops
weak trials early (time unit: evaluations). Priors and the encode stage run once, before the
trials, and every trial reads the same cache. An interrupted search resumes with ``Tuner.restore``.

Outputs under ``<workspace>/tune/<subject>/<tune.name>/``: ``results.csv``, ``trials.png`` and
``summary.json``; the best trial's adapter is registered as the subject's latest.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from raydb.config import RaydbConfig, SearchSpace
from raydb.storage import Storage, is_s3, join

__all__ = ["run_tune", "tune_uri", "default_concurrency", "RESULT_COLUMNS"]

RESULT_COLUMNS = ["trial", "prior_loss_weight", "learning_rate", "val_instance", "val_prior",
                  "val_score", "steps", "status"]


def tune_uri(cfg: RaydbConfig) -> str:
    return join(cfg.workspace, "tune", cfg.subject.id, cfg.tune.name if cfg.tune else "tune")


def default_concurrency(cfg: RaydbConfig, resources: dict[str, float]) -> int:
    """Trials that fit at once: GPUs / workers per trial, or CPUs / (workers + the trial driver)."""
    from raydb.train.distributed import resolve_use_gpu

    if resolve_use_gpu(cfg):
        return max(1, int(resources.get("GPU", 0) // cfg.cluster.num_workers))
    per_trial = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1  # + driver and data
    return max(1, int(resources.get("CPU", 1) // per_trial))


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

    from raydb.train.distributed import build_trainer
    from raydb.train.encode_stage import EncodedCache

    data = RaydbConfig.model_validate(cfg_dict).to_dict()
    data["train"]["prior_loss_weight"] = float(config["prior_loss_weight"])
    data["train"]["learning_rate"] = float(config["learning_rate"])
    data["train"]["num_sample_images"] = 0  # pictures only for the winner
    cfg = RaydbConfig.model_validate(data)
    storage = Storage(cfg.s3_endpoint_url)
    trainer, run = build_trainer(cfg, storage, EncodedCache(**encoded),
                                 extra_config={"eval_every": cfg.tune.eval_every},
                                 callbacks=[TuneReportCallback()], class_dataset=class_dataset)
    trainer.fit()
    result = storage.read_json(join(run, "result.json"))
    final = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
    last = _last_val(storage, run)
    # Tune keeps only metrics reported with a checkpoint in its Result: report the final one so.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "result.json").write_text(json.dumps(result))
        tune.report(final | last | {"run_dir": run, "done": True},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def _last_val(storage: Storage, run: str) -> dict[str, float]:
    """The last validation metrics a run logged (from its metrics.jsonl)."""
    try:
        lines = storage.read_bytes(join(run, "metrics.jsonl")).decode().splitlines()
    except FileNotFoundError:
        return {}
    return _last_val_row([json.loads(line) for line in lines])


def _last_val_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``val_*`` metrics and step of the last row that has them (``{}`` if none)."""
    for row in reversed(rows):
        if "val_score" in row:
            return {k: v for k, v in row.items() if k.startswith("val_")} | {"steps": row["step"]}
    return {}


def _trial_rows(results, cfg: RaydbConfig, storage: Storage) -> list[dict[str, Any]]:
    from raydb.train.run import run_uri

    rows = []
    for i, res in enumerate(results):
        conf = res.config or {}
        lam, lr = conf.get("prior_loss_weight"), conf.get("learning_rate")
        data = cfg.to_dict()
        data["train"].update(prior_loss_weight=float(lam), learning_rate=float(lr), num_sample_images=0)
        run = run_uri(RaydbConfig.model_validate(data))
        val = _progress(storage, run)  # the trial's own log: complete even for stopped trials
        steps = val.get("steps", 0)
        status = "error" if res.error else ("completed" if steps >= cfg.train.max_steps else "stopped_early")
        rows.append({"trial": i, "prior_loss_weight": lam, "learning_rate": lr,
                     "val_instance": val.get("val_instance"), "val_prior": val.get("val_prior"),
                     "val_score": val.get("val_score"), "steps": steps, "status": status, "run_dir": run})
    return rows


def _progress(storage: Storage, run: str) -> dict[str, Any]:
    """Last validation metrics of a run: its final metrics.jsonl, else its newest checkpoint."""
    val = _last_val(storage, run)
    if val:
        return val
    names = sorted(n.rstrip("/") for n in storage.list(run) if n.startswith("checkpoint-step-"))
    for name in reversed(names):
        try:
            from raydb.train.checkpoint import state_from_bytes

            payload = state_from_bytes(storage.read_bytes(join(run, name, "state.safetensors")),
                                       storage.read_bytes(join(run, name, "state.json")))
        except FileNotFoundError:
            continue
        val = _last_val_row(json.loads(payload["metrics"]))
        if val:
            return val
    return {}


def _write_csv(storage: Storage, uri: str, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(uri, buf.getvalue().encode())


def trials_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """Left: trials in the (prior_loss_weight, learning_rate) plane coloured by val_score.
    Right: the val_instance / val_prior trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["val_score"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    if done:
        scores = [r["val_score"] for r in done]
        sc = left.scatter([r["prior_loss_weight"] for r in done], [r["learning_rate"] for r in done],
                          c=scores, cmap="viridis_r", s=120, edgecolors="black")
        fig.colorbar(sc, ax=left, label="val_score (lower is better)")
        best = min(done, key=lambda r: r["val_score"])
        left.scatter([best["prior_loss_weight"]], [best["learning_rate"]], marker="*", s=400,
                     c="red", label="best")
        left.legend(loc="best")
        for r in done:
            right.scatter(r["val_instance"], r["val_prior"] if r["val_prior"] is not None else 0,
                          s=80, label=f"λ={r['prior_loss_weight']:g}, lr={r['learning_rate']:.1e}"
                          + (" (stopped)" if r["status"] == "stopped_early" else ""))
        right.legend(fontsize=7, loc="best")
    if all(r["learning_rate"] and r["learning_rate"] > 0 for r in done) and done:
        left.set_yscale("log")
    left.set_xlabel("prior_loss_weight (λ)")
    left.set_ylabel("learning_rate")
    left.set_title(title)
    right.set_xlabel("val_instance (subject fit, lower = better)")
    right.set_ylabel("val_prior (class prior kept, lower = better)")
    right.set_title("trade-off")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_tune(cfg: RaydbConfig, storage: Storage | None = None, *, register: bool = True,
             quiet: bool = False) -> dict[str, Any]:
    """Priors + encode once, then the search; returns a summary with the best trial."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raydb.ray_utils import init_ray
    from raydb.registry import register_adapter
    from raydb.train.distributed import prepare_encoded, read_class_dataset

    if cfg.tune is None:
        raise ValueError("tune: the config has no tune section")
    init_ray(cfg)
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
            print(f"resuming the search in {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        concurrency = tc.max_concurrent_trials or default_concurrency(cfg, ray.cluster_resources())
        tuner = tune.Tuner(
            trainable,
            param_space={"prior_loss_weight": _space(tc.prior_loss_weight),
                         "learning_rate": _space(tc.learning_rate)},
            tune_config=tune.TuneConfig(
                metric="val_score", mode="min", num_samples=tc.num_samples,
                max_concurrent_trials=concurrency,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                        grace_period=min(tc.grace_period, max_t),
                                        reduction_factor=tc.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=exp_root, storage_filesystem=fs,
                                      verbose=0 if quiet else 1),
        )
    grid = tuner.fit()
    rows = _trial_rows(list(grid), cfg, storage)
    _write_csv(storage, join(out, "results.csv"), rows)
    storage.write_bytes(join(out, "trials.png"), trials_png(rows, f"{cfg.subject.id}: search"))
    finished = [r for r in rows if r["status"] == "completed" and r["val_score"] is not None]
    if not finished:
        raise RuntimeError(f"no trial of the search in {out} completed; see {join(out, 'results.csv')}")
    best = min(finished, key=lambda r: r["val_score"])
    summary: dict[str, Any] = {"best": best, "results_csv": join(out, "results.csv"),
                               "plot": join(out, "trials.png"), "trials": len(rows),
                               "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
                               "restored": restored}
    if register:
        hyper = {"prior_loss_weight": best["prior_loss_weight"], "learning_rate": best["learning_rate"]}
        val = {k: best[k] for k in ("val_instance", "val_prior", "val_score")}
        record = register_adapter(storage, cfg.workspace, cfg.subject.id, join(best["run_dir"], "adapter"),
                                  extra_metadata={"tune": {"hyperparameters": hyper, "validation": val,
                                                           "results_csv": summary["results_csv"]}})
        summary["registered"] = record["uri"]
    storage.write_json(join(out, "summary.json"), summary)
    return summary
