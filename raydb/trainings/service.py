"""The training service's operations, as the HTTP layer calls them (no HTTP, no Ray here).

:class:`TrainingService` submits (checks, limits, idempotency, records), answers status and lists,
cancels, and runs queue passes; the ingress's routes (:mod:`raydb.serving.training_routes`) only
parse the request and answer a :class:`raydb.errors.Refused` raised here with its status (the table
in :mod:`raydb.serving.status`). Tenants only ever reach their own folder, so another tenant's
training id is simply not found (404), like a missing one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from raydb.config import RaydbConfig
from raydb.errors import Conflict, Invalid, Overloaded, UnknownResource
from raydb.storage import Storage
from raydb.trainings.queue import Jobs, queue_counts, reconcile
from raydb.trainings.store import TERMINAL, TrainingStore, new_training_id
from raydb.trainings.validate import validate_submission

__all__ = ["TrainingService", "training_view"]


def _progress(storage: Storage, config: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """The run's ``progress.json``; for a search, its trials' summed (:func:`_search_progress`)."""
    from raydb.train.progress import read_progress

    if config.get("tune") is not None:
        return _search_progress(storage, RaydbConfig.model_validate(config), status)
    found = read_progress(storage, status["run_uri"]) if status.get("run_uri") else None
    return found or {"max_steps": config["train"]["max_steps"]}


def _search_progress(storage: Storage, cfg: RaydbConfig, status: dict[str, Any]) -> dict[str, Any]:
    """A ``tune: true`` training's progress: ``step`` summed over the trials that started,
    ``max_steps`` = planned trials x ``train.max_steps``, loss and images/s of the trial that reported
    last, ``trials`` = planned and started, and an ETA extrapolated from the steps done since the
    tune stage began (an upper bound: trials ASHA stops early never run their remaining steps)."""
    import calendar

    from raydb.train.progress import read_progress
    from raydb.tune import tune_uri
    from raydb.tune.results import planned_trials, trial_runs

    runs = trial_runs(storage, tune_uri(cfg))
    records = [p for run in runs if (p := read_progress(storage, run))]
    planned = planned_trials(cfg)
    step = sum(int(p["step"]) for p in records)
    max_steps = planned * cfg.train.max_steps
    latest = max(records, key=lambda p: p.get("updated_at", ""), default={})
    out: dict[str, Any] = {"step": step if runs else None, "max_steps": max_steps, "loss": latest.get("loss"),
                           "images_per_s": latest.get("images_per_s"),
                           "trials": {"planned": planned, "started": len(runs)}}
    if status.get("stage") == "tune" and status.get("updated_at") and step:
        began = calendar.timegm(time.strptime(status["updated_at"], "%Y-%m-%dT%H:%M:%SZ"))
        out["eta_s"] = round(max(0.0, time.time() - began) * max(0, max_steps - step) / step, 1)
    return out


def training_view(store: TrainingStore, tenant: str, training_id: str) -> dict[str, Any] | None:
    """``GET /v1/trainings/{id}``'s body, or None when the tenant has no such training."""
    request = store.request(tenant, training_id)
    if request is None:
        return None
    state = store.state(tenant, training_id)
    status = store.status(tenant, training_id)
    job = store.job(tenant, training_id) or {}
    progress = _progress(store.storage, request["config"], status)
    return {
        "id": training_id, "subject_id": request["subject_id"], "status": state,
        "stage": status.get("stage") if state != "queued" else "waiting for a slot",
        "step": progress.get("step"), "max_steps": progress.get("max_steps"),
        "loss": progress.get("loss"), "images_per_s": progress.get("images_per_s"),
        "eta_s": progress.get("eta_s") if state == "running" else None,
        "trials": progress.get("trials"),
        "error": status.get("error") if state == "failed" else None,
        "subject": status.get("subject") if state == "succeeded" else None,
        "overrides": request.get("overrides", {}), "job_id": job.get("submission_id"),
        "created_at": request.get("created_at"), "updated_at": status.get("updated_at"),
    }


class TrainingService:
    """Everything ``/v1/trainings`` does, over the workspace (``store``) and Ray's Jobs API (``jobs``)."""

    def __init__(self, cfg: RaydbConfig, storage: Storage, jobs: Jobs) -> None:
        self.cfg, self.jobs = cfg, jobs
        self.store = TrainingStore(storage, cfg.workspace)
        self._lock = threading.Lock()  # one queue pass at a time in this process
        self._last_pass = float("-inf")

    # -- submit ------------------------------------------------------------------------------------
    def submit(self, tenant: str, fields: dict[str, str], uploads: list[tuple[str, bytes]],
               idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
        """Check and record a training; returns ``(view, created)`` (``created`` False: the
        Idempotency-Key named an earlier training, which is returned instead)."""
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise Invalid("Idempotency-Key: 1 to 255 characters")
            earlier = self.store.idempotent_id(tenant, idempotency_key)
            if earlier is not None:
                return training_view(self.store, tenant, earlier), False
        training_id = new_training_id()
        sub = validate_submission(fields, uploads, self.cfg, tenant=tenant, training_id=training_id,
                                  photos_uri=self.store.photos_uri(tenant, training_id),
                                  storage=self.store.storage)
        self._check_capacity(tenant)
        self._check_owner(tenant, sub.subject_id)
        request = {"subject_id": sub.subject_id, "overrides": sub.overrides, "config": sub.config,
                   "photos": [name for name, _ in sub.photos], "photo_uris": sub.photo_uris}
        self.store.create(tenant, training_id, request, sub.photos)
        if idempotency_key is not None:
            winner = self.store.claim_idempotency(tenant, idempotency_key, training_id)
            if winner != training_id:  # a concurrent request with the same key got there first
                self.store.discard(tenant, training_id)
                return training_view(self.store, tenant, winner), False
        self.store.enqueue(tenant, training_id)
        self.pass_queue()
        return training_view(self.store, tenant, training_id), True

    def _check_owner(self, tenant: str, subject_id: str) -> None:
        """409 when another tenant owns the subject id — before the upload is stored, not after
        training. A read, not a claim: the id becomes the tenant's when the job's pipeline registers
        (the only registrar), so a training that is cancelled or fails leaves no trace in the
        registry. (Two tenants racing for a new id both pass here; the second to register fails.)"""
        from raydb.registry import subject_owner

        owner = subject_owner(self.store.storage, self.cfg.workspace, subject_id)
        if owner is not None and owner != tenant:
            raise Conflict([{"type": "value_error", "loc": ["body", "subject_id"],
                             "msg": f"subject id {subject_id!r} is taken; choose another"}])

    def _check_capacity(self, tenant: str) -> None:
        sc = self.cfg.service
        counts = queue_counts(self.store)
        starts_now = (counts["queued"] == 0 and counts["running"] < sc.max_concurrent_trainings
                      and counts["running_by_tenant"][tenant] < sc.max_trainings_per_tenant)
        if not starts_now and counts["queued"] >= sc.max_queued_trainings:
            raise Overloaded(f"the training queue is full ({counts['queued']} waiting); retry later",
                             retry_after=sc.retry_after_s)

    # -- read --------------------------------------------------------------------------------------
    def get(self, tenant: str, training_id: str) -> dict[str, Any]:
        view = training_view(self.store, tenant, training_id)
        if view is None:
            raise UnknownResource(f"unknown training {training_id!r}")
        return view

    def list(self, tenant: str) -> list[dict[str, Any]]:
        return [v for i in self.store.list_ids(tenant) if (v := training_view(self.store, tenant, i))]

    # -- cancel ------------------------------------------------------------------------------------
    def cancel(self, tenant: str, training_id: str) -> dict[str, Any]:
        """Stop the training: ``cancelled`` unless it already ended or is registering (409)."""
        view = self.get(tenant, training_id)
        if view["status"] in TERMINAL:
            raise Conflict(f"training {training_id!r} already {view['status']}")
        if not self.store.claim_outcome(tenant, training_id, "cancel"):
            raise Conflict(f"training {training_id!r} is registering its result; it cannot be "
                           "cancelled any more")
        job = self.store.job(tenant, training_id)
        if job is not None:
            self.jobs.stop(job["submission_id"])
        self.pass_queue()
        return self.get(tenant, training_id)

    # -- the queue ---------------------------------------------------------------------------------
    def pass_queue(self, *, if_older_than_s: float = 0.0) -> list[str]:
        """One :func:`raydb.trainings.queue.reconcile` pass (skipped while another runs here, or when
        the last one ended less than ``if_older_than_s`` ago: polling clients share passes)."""
        if time.monotonic() - self._last_pass < if_older_than_s or not self._lock.acquire(blocking=False):
            return []
        try:
            return reconcile(self.store, self.jobs, self.cfg)
        finally:
            self._last_pass = time.monotonic()
            self._lock.release()

    def start_background(self) -> threading.Thread:
        """A daemon thread passing over the queue every ``service.poll_interval_s`` (so queued
        trainings start and dead jobs are noticed even when nobody calls the API)."""

        def loop() -> None:
            while True:
                time.sleep(self.cfg.service.poll_interval_s)
                try:
                    self.pass_queue()
                except Exception as exc:  # storage or the Jobs API away for a moment: try again
                    import logging

                    logging.getLogger(__name__).warning("training queue pass failed: %s", exc)

        thread = threading.Thread(target=loop, name="raydb-training-queue", daemon=True)
        thread.start()
        return thread
