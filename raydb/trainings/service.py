"""The training service's operations, as the HTTP layer calls them (no HTTP, no Ray here).

:class:`TrainingService` submits (checks, limits, idempotency, records), answers status and pages of
the tenant's trainings, cancels, and runs queue passes; the ingress's routes
(:mod:`raydb.serving.training_routes`) only parse the request and answer a
:class:`raydb.errors.Refused` raised here with its status (the table in :mod:`raydb.serving.status`).
Tenants only ever reach their own folder, so another tenant's training id is simply not found (404),
like a missing one.

Admission is atomic: after the (slow) checks and the photo writes, a submission takes the queue's
lease (:meth:`raydb.trainings.store.TrainingStore.lease`) and, holding it, claims its
Idempotency-Key, counts the queue (``service.max_queued_per_tenant``, ``max_queued_trainings``),
checks the tenant's bytes (``service.tenant_quota_bytes``, its own upload included) and only then
writes ``request.json`` and its queue entry — so eight racing submissions for one free slot are one
accepted and seven refused, on one ingress or several.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

from raydb.config import RaydbConfig
from raydb.errors import Conflict, Invalid, Overloaded, TooLarge, Unavailable, UnknownResource
from raydb.storage import Storage
from raydb.trainings.queue import Jobs, queue_counts, reconcile
from raydb.trainings.retention import purge_expired, tenant_usage
from raydb.trainings.store import TERMINAL, LeaseBusy, TrainingStore, new_training_id
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
    purged = store.purge_record(tenant, training_id)
    kept = purged.get("progress") if purged else None  # the run folder is gone: the last progress seen
    progress = kept or _progress(store.storage, request["config"], status)
    outcome = store.outcome_record(tenant, training_id) or {}
    return {
        "id": training_id, "subject_id": request["subject_id"], "status": state,
        "stage": status.get("stage") if state != "queued" else "waiting for a slot",
        "step": progress.get("step"), "max_steps": progress.get("max_steps"),
        "loss": progress.get("loss"), "images_per_s": progress.get("images_per_s"),
        "eta_s": progress.get("eta_s") if state == "running" else None,
        "trials": progress.get("trials"),
        "error": (outcome.get("error") or status.get("error")) if state == "failed" else None,
        "subject": status.get("subject") if state == "succeeded" else None,
        "overrides": request.get("overrides", {}), "job_id": job.get("submission_id"),
        "created_at": request.get("created_at"), "updated_at": status.get("updated_at"),
        "files_deleted_at": purged.get("at") if purged else None,
    }


def _fingerprint(fields: dict[str, str], uploads: list[tuple[str, bytes]]) -> str:
    """What an Idempotency-Key promises stays the same: the form's fields and each upload's name and
    bytes (by digest)."""
    digest = hashlib.sha256(json.dumps(sorted(fields.items())).encode())
    for name, data in uploads:
        digest.update(json.dumps([name, hashlib.sha256(data).hexdigest()]).encode())
    return digest.hexdigest()


def _key_reused(earlier: str) -> Invalid:
    return Invalid([{"type": "value_error", "loc": ["header", "Idempotency-Key"],
                          "msg": f"this key was already used for a different request (training {earlier}); "
                                 "a retry must send the same fields and photos, a new training a new key"}])


class TrainingService:
    """Everything ``/v1/trainings`` does, over the workspace (``store``) and Ray's Jobs API (``jobs``)."""

    def __init__(self, cfg: RaydbConfig, storage: Storage, jobs: Jobs) -> None:
        self.cfg, self.jobs = cfg, jobs
        self.store = TrainingStore(storage, cfg.workspace)
        self._lock = threading.Lock()  # one queue pass at a time in this process
        self._last_pass = float("-inf")

    # -- submit ------------------------------------------------------------------------------------
    def _earlier(self, tenant: str, record: dict[str, Any], fingerprint: str) -> tuple[dict[str, Any], bool]:
        """The training an Idempotency-Key names, if this request is the one it was used for."""
        if record.get("fingerprint") not in (None, fingerprint):  # None: a key from before fingerprints
            raise _key_reused(record["id"])
        return training_view(self.store, tenant, record["id"]), False

    def _stale(self, tenant: str, key: str, record: dict[str, Any]) -> bool:
        """A key whose training was never written: its admission crashed between the claim and the
        write, which happen under one lease — so, asked holding the lease, the key is freed and
        works again (outside the lease it could be an admission in progress)."""
        if self.store.request(tenant, record["id"]) is not None:
            return False
        self.store.release_idempotency(tenant, key, record["id"])
        return True

    def submit(self, tenant: str, fields: dict[str, str], uploads: list[tuple[str, bytes]],
               idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
        """Check and record a training; returns ``(view, created)`` (``created`` False: the
        Idempotency-Key named an earlier training of the same request, which is returned instead)."""
        fingerprint = _fingerprint(fields, uploads)
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise Invalid("Idempotency-Key: 1 to 255 characters")
            earlier = self.store.idempotent(tenant, idempotency_key)
            if earlier is not None and self.store.request(tenant, earlier["id"]) is not None:
                return self._earlier(tenant, earlier, fingerprint)  # no validation, no upload again
        training_id = new_training_id()
        sub = validate_submission(fields, uploads, self.cfg, tenant=tenant, training_id=training_id,
                                  photos_uri=self.store.photos_uri(tenant, training_id),
                                  storage=self.store.storage)
        request = {"subject_id": sub.subject_id, "overrides": sub.overrides, "config": sub.config,
                   "photos": [name for name, _ in sub.photos], "photo_uris": sub.photo_uris}
        self.store.write_photos(tenant, training_id, sub.photos)  # counted by the quota check below
        admitted = False
        try:
            with self.store.lease():
                key = idempotency_key
                if key is not None:
                    record = self.store.claim_idempotency(tenant, key, training_id, fingerprint)
                    if record["id"] != training_id and self._stale(tenant, key, record):
                        record = self.store.claim_idempotency(tenant, key, training_id, fingerprint)
                    if record["id"] != training_id:  # a concurrent request with the same key got there first
                        return self._earlier(tenant, record, fingerprint)
                try:
                    self._admit(tenant)
                except (Overloaded, TooLarge):
                    if idempotency_key is not None:  # refused: a retry with this key may be accepted
                        self.store.release_idempotency(tenant, idempotency_key, training_id)
                    raise
                self.store.create(tenant, training_id, request)
                self.store.enqueue(tenant, training_id)
                admitted = True
        except LeaseBusy:
            raise Unavailable("the training queue is busy; retry", retry_after=1) from None
        finally:
            if not admitted:
                self.store.discard(tenant, training_id)
        self.pass_queue()
        return training_view(self.store, tenant, training_id), True

    def _admit(self, tenant: str) -> None:
        """Room in the queue for one more of ``tenant``'s trainings, and bytes in its quota (its
        upload is written already, so it counts); called holding the lease."""
        sc = self.cfg.service
        counts = queue_counts(self.store)
        mine = counts["queued_by_tenant"][tenant]
        if mine >= sc.max_queued_per_tenant:
            raise Overloaded(f"this tenant has {mine} trainings waiting to start, the most it may "
                               f"(service.max_queued_per_tenant); retry when one has started",
                          retry_after=sc.retry_after_s, rejection="trainings")
        if counts["queued"] >= sc.max_queued_trainings:
            raise Overloaded(f"the training queue is full ({counts['queued']} waiting); retry later",
                          retry_after=sc.retry_after_s, rejection="trainings")
        used = tenant_usage(self.store, tenant)
        if used > sc.tenant_quota_bytes:
            raise TooLarge("photos", f"storage quota: this tenant's trainings would keep {used} bytes, "
                                     f"more than its {sc.tenant_quota_bytes} (service.tenant_quota_bytes); "
                                     f"an ended training's photos and runs are deleted "
                                     f"{sc.retention_s:g} s after it ended (service.retention_s)")

    # -- read --------------------------------------------------------------------------------------
    def get(self, tenant: str, training_id: str) -> dict[str, Any]:
        view = training_view(self.store, tenant, training_id)
        if view is None:
            raise UnknownResource(f"unknown training {training_id!r}")
        return view

    def list(self, tenant: str, *, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """One page of the tenant's trainings, oldest first: ``{"trainings": [...], "next": cursor}``
        (``next`` is the ``after`` of the following page; None on the last). Reads only the page's
        records."""
        most = self.cfg.service.max_page_size
        limit = most if limit is None else limit
        if not 1 <= limit <= most:
            raise Invalid([{"type": "value_error", "loc": ["query", "limit"],
                                 "msg": f"1 to {most} (service.max_page_size), got {limit}"}])
        ids, cursor = self.store.page(tenant, after, limit)
        return {"trainings": [v for i in ids if (v := training_view(self.store, tenant, i))], "next": cursor}

    # -- cancel ------------------------------------------------------------------------------------
    def cancel(self, tenant: str, training_id: str) -> dict[str, Any]:
        """Cancel the training: ``cancelled`` unless it already ended or is registering (409). Its job
        is asked to stop now; if that fails, every queue pass asks again, and the training keeps its
        running slot until the Jobs API reports the job ended."""
        view = self.get(tenant, training_id)
        if view["status"] in TERMINAL:
            raise Conflict(f"training {training_id!r} already {view['status']}")
        if not self.store.claim_outcome(tenant, training_id, "cancel"):
            raise Conflict(f"training {training_id!r} is registering its result; it cannot be "
                           "cancelled any more")
        job = self.store.job(tenant, training_id)
        if job is not None:
            try:
                self.jobs.stop(job["submission_id"])
            except Exception as exc:  # the queue retries it; the cancel itself is decided
                logging.getLogger(__name__).warning("training %s: ray job stop failed, the queue "
                                                    "retries it: %s", training_id, exc)
        self.pass_queue()
        return self.get(tenant, training_id)

    # -- the queue ---------------------------------------------------------------------------------
    def pass_queue(self, *, if_older_than_s: float = 0.0) -> list[str]:
        """One :func:`raydb.trainings.queue.reconcile` pass, then the retention's deletions (skipped
        while another pass runs here, or when the last one ended less than ``if_older_than_s`` ago:
        polling clients share passes; another ingress holding the lease skips it too)."""
        if time.monotonic() - self._last_pass < if_older_than_s or not self._lock.acquire(blocking=False):
            return []
        try:
            started = reconcile(self.store, self.jobs, self.cfg)
            purge_expired(self.store, self.cfg, self._progress_of)
            return started
        except LeaseBusy:
            return []
        finally:
            self._last_pass = time.monotonic()
            self._lock.release()

    def _progress_of(self, tenant: str, training_id: str) -> dict[str, Any] | None:
        view = training_view(self.store, tenant, training_id)
        return {k: view[k] for k in ("step", "max_steps", "loss", "images_per_s", "trials")} if view else None

    def start_background(self) -> threading.Thread:
        """A daemon thread passing over the queue every ``service.poll_interval_s`` (so queued
        trainings start, dead or overlong jobs are noticed and expired files deleted even when
        nobody calls the API)."""

        def loop() -> None:
            while True:
                time.sleep(self.cfg.service.poll_interval_s)
                try:
                    self.pass_queue()
                except Exception as exc:  # storage or the Jobs API away for a moment: try again
                    logging.getLogger(__name__).warning("training queue pass failed: %s", exc)

        thread = threading.Thread(target=loop, name="raydb-training-queue", daemon=True)
        thread.start()
        return thread
