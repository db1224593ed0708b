"""A search's results, without Ray: each trial's config, its row in ``results.csv``, the plot,
and the index of its trials' run folders.

``trial_config`` is the one place a trial's config is derived from the search's config and the
trial's hyperparameters — the Tune driver function trains with it and ``trial_rows`` finds the
trial's run folder with it, so the table always points at the runs that exist.

Each trial, as it starts, records its run folder under ``<search>/trials/`` (:func:`record_trial`),
so a search's progress can be read while it runs (the training service sums its trials'
``progress.json``) — with log-uniform ranges the trials' configs are not known in advance.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from raydb.config import RaydbConfig
from raydb.storage import Storage, join

__all__ = ["RESULT_COLUMNS", "trial_config", "trial_rows", "last_validation", "write_csv", "trials_png",
           "planned_trials", "record_trial", "trial_runs"]

RESULT_COLUMNS = ["trial", "prior_mode", "prior_loss_weight", "learning_rate", "val_instance", "val_prior",
                  "val_score", "steps", "status"]


def trial_config(cfg: RaydbConfig, prior_loss_weight: float, learning_rate: float,
                 prior_mode: str | None = None) -> RaydbConfig:
    """The config one trial trains with (sample pictures only for the registered winner);
    ``prior_mode`` is the trial's point of ``tune.prior_mode`` (None: the config's ``prior.mode``)."""
    data = cfg.to_dict()
    data["train"].update(prior_loss_weight=float(prior_loss_weight), learning_rate=float(learning_rate),
                         num_sample_images=0)
    if prior_mode is not None:
        data["prior"]["mode"] = prior_mode
    return RaydbConfig.model_validate(data)


def planned_trials(cfg: RaydbConfig) -> int:
    """Trials the search runs (:attr:`raydb.config.TuneConfig.planned_trials`); 0 without a search."""
    return cfg.tune.planned_trials if cfg.tune is not None else 0


def record_trial(storage: Storage, search_uri: str, run: str) -> None:
    """Note a trial's run folder in the search's index (idempotent: a resumed trial rewrites it)."""
    storage.write_json(join(search_uri, "trials", run.rstrip("/").rsplit("/", 1)[-1] + ".json"),
                       {"run_dir": run})


def trial_runs(storage: Storage, search_uri: str) -> list[str]:
    """Run folders of the trials that have started, in name order."""
    index = join(search_uri, "trials")
    return [storage.read_json(join(index, name))["run_dir"]
            for name in storage.list(index) if name.endswith(".json")]


def last_validation(storage: Storage, run: str) -> dict[str, float]:
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


def trial_rows(results, cfg: RaydbConfig, storage: Storage) -> list[dict[str, Any]]:
    """One ``results.csv`` row per Tune result (its ``config`` and ``error``), read from each
    trial's own run folder (complete even for trials ASHA stopped)."""
    from raydb.train.rundir import run_uri

    rows = []
    for i, res in enumerate(results):
        conf = res.config or {}
        lam, lr, mode = conf.get("prior_loss_weight"), conf.get("learning_rate"), conf.get("prior_mode")
        run = run_uri(trial_config(cfg, lam, lr, mode))
        val = _progress(storage, run)  # the trial's own log: complete even for stopped trials
        steps = val.get("steps", 0)
        status = "error" if res.error else ("completed" if steps >= cfg.train.max_steps else "stopped_early")
        rows.append({"trial": i, "prior_mode": mode or cfg.prior.mode, "prior_loss_weight": lam,
                     "learning_rate": lr,
                     "val_instance": val.get("val_instance"), "val_prior": val.get("val_prior"),
                     "val_score": val.get("val_score"), "steps": steps, "status": status, "run_dir": run}
                    | {k: v for k, v in val.items() if k.startswith("val_") and k not in RESULT_COLUMNS})
    return rows


def _progress(storage: Storage, run: str) -> dict[str, Any]:
    """Last validation metrics of a run: its final metrics.jsonl, else its newest checkpoint."""
    from raydb.train.checkpoint import state_from_bytes
    from raydb.train.rundir import CHECKPOINT_META, CHECKPOINT_TENSORS

    val = last_validation(storage, run)
    if val:
        return val
    names = sorted(n.rstrip("/") for n in storage.list(run) if n.startswith("checkpoint-step-"))
    for name in reversed(names):
        try:
            payload = state_from_bytes(storage.read_bytes(join(run, name, CHECKPOINT_TENSORS)),
                                       storage.read_bytes(join(run, name, CHECKPOINT_META)))
        except FileNotFoundError:
            continue
        val = _last_val_row(json.loads(payload["metrics"]))
        if val:
            return val
    return {}


def write_csv(storage: Storage, uri: str, rows: list[dict[str, Any]]) -> None:
    """``RESULT_COLUMNS``, then any other validation metric the trials reported (e.g. val_fidelity)."""
    extra = sorted({k for r in rows for k in r if k.startswith("val_") and k not in RESULT_COLUMNS})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS[:-2] + extra + RESULT_COLUMNS[-2:],
                            extrasaction="ignore")
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
                          s=80, label=f"{r['prior_mode']}, λ={r['prior_loss_weight']:g}, "
                          f"lr={r['learning_rate']:.1e}"
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
