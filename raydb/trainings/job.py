"""A training's Ray job: ``python -m raydb.trainings.job --workspace W --tenant T --training ID``.

Runs the pipeline's stages for the training's stored config — priors, encode, train (or tune) —
recording the current stage in ``status.json`` as each starts (the training loop itself writes step,
loss and images/s to its run folder's ``progress.json``). Those stages only leave a finished adapter
(a search: its best trial's); the pipeline registers in its ``register`` stage alone, which this job
runs in a second call, after it claimed the training's outcome: if ``DELETE`` claimed it first, the
job ends ``cancelled`` with nothing registered (nor the subject id claimed); once the job holds the
claim a cancel is refused, so a training is never half-registered.
Any exception ends the training ``failed``: its public ``error`` is the exception's type and message
with every path and URI replaced by ``<path>`` (the workspace's layout, bucket names and model
locations are the operator's), the whole message stays in ``status.json``'s ``error_detail`` and
the job's log for the operator. The stages are the pipeline's usual
Ray ones (Ray Data, Ray Train, Ray Tune) on the cluster the job runs on.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from raydb.config import RaydbConfig
from raydb.errors import error_line, redact_paths
from raydb.storage import Storage
from raydb.trainings.store import TrainingStore

__all__ = ["run_training", "main"]


def run_training(store: TrainingStore, tenant: str, training_id: str, *, local: bool = False) -> str:
    """Run one stored training to its end; returns its final state. ``local``: without Ray (tests)."""
    from raydb.pipeline import run_pipeline
    from raydb.train.rundir import run_uri

    request = store.request(tenant, training_id)
    if request is None:
        raise SystemExit(f"training {training_id!r} of tenant {tenant!r} does not exist")
    if store.outcome(tenant, training_id) == "cancel":
        return "cancelled"
    cfg = RaydbConfig.model_validate(request["config"])
    status: dict[str, Any] = {"state": "running", "stage": "starting",
                              "run_uri": run_uri(cfg) if cfg.tune is None else None}

    def on_stage(name: str) -> None:
        status["stage"] = name
        store.write_status(tenant, training_id, **status)

    on_stage("starting")
    try:
        if not local:
            from raydb.cluster import init_ray

            init_ray(cfg)
        trainer = "tune" if cfg.tune is not None else "train"
        run_pipeline(cfg, stages=["prior", "encode", trainer], local=local, on_stage=on_stage)
        if not store.claim_outcome(tenant, training_id, "register"):
            return "cancelled"  # DELETE came first: nothing is registered
        summary = run_pipeline(cfg, stages=["register"], local=local, on_stage=on_stage)
    except Exception as exc:
        detail = error_line(exc)[:2000]
        store.write_status(tenant, training_id, **status | {
            "state": "failed", "error": f"stage {status['stage']}: {redact_paths(detail)}",
            "error_detail": detail})
        print(f"training {training_id} failed: {detail}", file=sys.stderr, flush=True)
        return "failed"
    register = next(s for s in summary["stages"] if s["stage"] == "register")["outputs"]
    store.write_status(tenant, training_id, **status | {
        "state": "succeeded", "stage": "done",
        "subject": {"subject_id": cfg.subject.id, "version": register["version"]}})
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydb.trainings.job",
                                     description="Run one stored training (a Ray job's entrypoint).")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--training", required=True)
    parser.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    store = TrainingStore(Storage(args.s3_endpoint), args.workspace)
    state = run_training(store, args.tenant, args.training)
    print(f"training {args.training}: {state}", flush=True)
    return 0 if state in ("succeeded", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
