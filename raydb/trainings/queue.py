"""The training queue: which trainings run as Ray jobs now, and noticing jobs that died, ran too
long, or were cancelled but have not stopped yet.

Each training runs as a **Ray job** (Ray's Jobs API), so it is listed by ``ray job list``, survives
a Serve replica restart, and can be stopped. Its submission id is ``raydb-<tenant>-<training id>``:
the Jobs API refuses a second submission under the same id, so two ingress replicas passing over
the queue at once cannot start a training twice.

:func:`reconcile` is one pass over the queue (oldest first), under the store's lease, so passes and
admissions of every ingress replica decide one at a time. A training stays in the queue — and holds
its running slot — until its **job has ended**, whatever its public state says: a job that ended
without its training saying so (killed, out of memory, node lost) marks the training ``failed``
with the job's message; a training whose outcome is ``cancel`` (``DELETE``, or the wall-clock
limit) gets ``ray job stop`` again on every pass until the Jobs API reports the job ended, so a
failing stop never leaves a job running outside the accounting; a job running longer than
``service.max_training_seconds`` is cancelled by the limit (its training ``failed``, saying why).
Then queued trainings start while fewer than ``service.max_concurrent_trainings`` jobs run and
fewer than ``service.max_running_per_tenant`` of their tenant's (a submission the Jobs API refuses
for now leaves the training queued for the next pass). The ingress runs a pass every
``service.poll_interval_s`` and on each trainings request. Pure logic over a :class:`Jobs`
protocol: tests drive it with a fake.
"""

from __future__ import annotations

import calendar
import logging
import shlex
import sys
import time
from collections import Counter
from typing import Any, Protocol

from raydb.config import RaydbConfig
from raydb.errors import redact_paths
from raydb.metrics import record
from raydb.trainings.store import TERMINAL, QueueEntry, TrainingStore

__all__ = ["Jobs", "RayJobs", "submission_id", "entrypoint", "reconcile", "queue_counts"]

logger = logging.getLogger(__name__)

_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


class Jobs(Protocol):
    """What the queue needs from Ray's Jobs API."""

    def submit(self, submission_id: str, entrypoint: str) -> None: ...

    def status(self, submission_id: str) -> tuple[str, str]:
        """``(status, message)``; status is one of PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED."""
        ...

    def stop(self, submission_id: str) -> None: ...


class RayJobs:
    """:class:`Jobs` over ``ray.job_submission.JobSubmissionClient`` (the dashboard's Jobs API; with
    token auth on, the client adds the cluster's token itself)."""

    def __init__(self, address: str | None = None) -> None:
        import ray
        from ray.job_submission import JobSubmissionClient

        if address is None and ray.is_initialized():
            # The cluster we run on, by its GCS address (the client looks the dashboard up there);
            # auto-detection could pick another cluster on a shared machine.
            address = ray.get_runtime_context().gcs_address
        self.client = JobSubmissionClient(address)

    def submit(self, submission_id: str, entrypoint: str) -> None:
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                   metadata={"raydb": "training"})
        except RuntimeError as exc:
            if "already exists" not in str(exc):  # another ingress replica started it first
                raise

    def status(self, submission_id: str) -> tuple[str, str]:
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):  # the cluster lost it (a new head node): it is not running
                return "FAILED", "the Jobs API no longer knows this job"
            raise
        return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""

    def stop(self, submission_id: str) -> None:
        self.client.stop_job(submission_id)


def submission_id(tenant: str, training_id: str) -> str:
    return f"raydb-{tenant}-{training_id}"


def entrypoint(cfg: RaydbConfig, tenant: str, training_id: str) -> str:
    """The job's command: ``python -m raydb.trainings.job`` for this training."""
    python = cfg.service.job_python or sys.executable
    args = [python, "-m", "raydb.trainings.job", "--workspace", cfg.workspace, "--tenant", tenant,
            "--training", training_id]
    if cfg.s3_endpoint_url:
        args += ["--s3-endpoint", cfg.s3_endpoint_url]
    return " ".join(shlex.quote(a) for a in args)


def queue_counts(store: TrainingStore) -> dict[str, Any]:
    """``{queued, running, queued_by_tenant, running_by_tenant}`` over the queue: *running* counts
    every training with a job that has not been seen to end (stopping ones included), *queued*
    those without a job that are still to start."""
    queued, running = Counter(), Counter()
    for entry in store.active():
        if store.job(entry.tenant, entry.training_id) is not None:
            running[entry.tenant] += 1
        elif store.state(entry.tenant, entry.training_id) not in TERMINAL:
            queued[entry.tenant] += 1
    return {"queued": sum(queued.values()), "running": sum(running.values()),
            "queued_by_tenant": queued, "running_by_tenant": running}


def _started_at(job: dict[str, Any]) -> float:
    """When the job was submitted (seconds since the epoch)."""
    if isinstance(job.get("submitted_ts"), int | float):
        return float(job["submitted_ts"])
    return float(calendar.timegm(time.strptime(job["submitted_at"], "%Y-%m-%dT%H:%M:%SZ")))


def _stop(jobs: Jobs, tid: str, job: dict[str, Any]) -> None:
    try:
        jobs.stop(job["submission_id"])
    except Exception as exc:  # retried on the next pass; the training keeps its slot until it ends
        logger.warning("training %s: ray job stop failed, retrying on the next pass: %s", tid, exc)


def _pass_running(store: TrainingStore, jobs: Jobs, cfg: RaydbConfig, entry: QueueEntry,
                  job: dict[str, Any], now: float) -> bool:
    """One training with a job: True while the job still runs (it keeps its slot)."""
    tenant, tid = entry.tenant, entry.training_id
    try:
        status, message = jobs.status(job["submission_id"])
    except Exception as exc:  # the Jobs API is down for a moment: count it as running
        logger.warning("training %s: cannot read job status: %s", tid, exc)
        return True
    if status in _ENDED:
        if store.state(tenant, tid) not in TERMINAL:  # it died without saying so
            store.write_status(tenant, tid, state="failed", stage=store.status(tenant, tid).get("stage"),
                               error=f"the training's Ray job ended ({status}) without a result: "
                                     f"{redact_paths(message) or 'no message'}", error_detail=message)
        store.finish(entry)
        record("raydb_trainings_finished_total", outcome=store.state(tenant, tid))
        return False
    limit = cfg.service.max_training_seconds
    outcome = store.outcome(tenant, tid)
    if outcome is None and store.state(tenant, tid) not in TERMINAL and now - _started_at(job) > limit:
        # the job holds no outcome yet (not registering): the limit decides, as DELETE would
        store.claim_outcome(tenant, tid, "cancel", error=f"stopped: it ran longer than "
                                                         f"service.max_training_seconds ({limit:g} s)")
        outcome = store.outcome(tenant, tid)
    if outcome == "cancel":
        _stop(jobs, tid, job)  # again on every pass, until the Jobs API says the job ended
    return True


def reconcile(store: TrainingStore, jobs: Jobs, cfg: RaydbConfig, *, now: float | None = None) -> list[str]:
    """One pass over the queue (see the module docstring); returns the training ids it started."""
    now = time.time() if now is None else now
    with store.lease():
        running: Counter[str] = Counter()
        waiting = []
        for entry in store.active():
            tenant, tid = entry.tenant, entry.training_id
            job = store.job(tenant, tid)
            if job is None:
                state = store.state(tenant, tid)
                if state in TERMINAL:  # cancelled before it started
                    store.finish(entry)
                    record("raydb_trainings_finished_total", outcome=state)
                else:
                    waiting.append(entry)
            elif _pass_running(store, jobs, cfg, entry, job, now):
                running[tenant] += 1
        started = []
        sc = cfg.service
        for entry in waiting:
            if sum(running.values()) >= sc.max_concurrent_trainings:
                break
            if running[entry.tenant] >= sc.max_running_per_tenant:
                continue
            sub_id = submission_id(entry.tenant, entry.training_id)
            try:
                jobs.submit(sub_id, entrypoint(cfg, entry.tenant, entry.training_id))
            except Exception as exc:  # e.g. "No available agent to submit job": it stays queued
                logger.warning("training %s: job submission failed, retrying on the next pass: %s",
                               entry.training_id, exc)
                break
            store.record_job(entry.tenant, entry.training_id, sub_id)
            running[entry.tenant] += 1
            started.append(entry.training_id)
        record("raydb_trainings", len(waiting) - len(started), state="queued")
        record("raydb_trainings", sum(running.values()), state="running")
    return started
