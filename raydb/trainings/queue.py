"""The training queue: which trainings run as Ray jobs now, and noticing jobs that died.

Each training runs as a **Ray job** (Ray's Jobs API), so it is listed by ``ray job list``, survives
a Serve replica restart, and can be stopped. Its submission id is ``raydb-<tenant>-<training id>``:
the Jobs API refuses a second submission under the same id, so two ingress replicas passing over
the queue at once cannot start a training twice.

:func:`reconcile` is one pass over the unfinished trainings (oldest first): finished ones leave the
queue; a job that ended without its training saying so (killed, out of memory, node lost) marks the
training ``failed`` with the job's message; then queued trainings are started while fewer than
``service.max_concurrent_trainings`` run on the cluster and fewer than
``service.max_trainings_per_tenant`` for their tenant (a submission the Jobs API refuses for now
leaves the training queued for the next pass). The ingress runs it every
``service.poll_interval_s`` and on each trainings request. Pure logic over a :class:`Jobs`
protocol: tests drive it with a fake.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections import Counter
from typing import Any, Protocol

from raydb.config import RaydbConfig
from raydb.trainings.store import TERMINAL, TrainingStore

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
        info = self.client.get_job_info(submission_id)
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
    """``{queued, running, running_by_tenant, active_by_tenant}`` over the unfinished trainings."""
    queued, running = 0, 0
    by_tenant: Counter[str] = Counter()
    active: Counter[str] = Counter()
    for entry in store.active():
        state = store.state(entry.tenant, entry.training_id)
        if state in TERMINAL:
            continue
        active[entry.tenant] += 1
        if state == "running":
            running += 1
            by_tenant[entry.tenant] += 1
        else:
            queued += 1
    return {"queued": queued, "running": running, "running_by_tenant": by_tenant, "active_by_tenant": active}


def reconcile(store: TrainingStore, jobs: Jobs, cfg: RaydbConfig) -> list[str]:
    """One pass over the queue (see the module docstring); returns the training ids it started."""
    running: Counter[str] = Counter()
    waiting = []
    for entry in store.active():
        tenant, tid = entry.tenant, entry.training_id
        state = store.state(tenant, tid)
        if state in TERMINAL:
            store.finish(entry)
            continue
        job = store.job(tenant, tid)
        if job is None:
            waiting.append(entry)
            continue
        try:
            status, message = jobs.status(job["submission_id"])
        except Exception as exc:  # the Jobs API is down for a moment: count it as running
            logger.warning("training %s: cannot read job status: %s", tid, exc)
            status, message = "RUNNING", ""
        if status in _ENDED and store.state(tenant, tid) not in TERMINAL:  # re-read: it may just have ended
            store.write_status(tenant, tid, state="failed", stage=store.status(tenant, tid).get("stage"),
                               error=f"the training's Ray job ended ({status}) without a result: "
                                     f"{message or 'no message'}")
            store.finish(entry)
            continue
        running[tenant] += 1
    started = []
    sc = cfg.service
    for entry in waiting:
        if sum(running.values()) >= sc.max_concurrent_trainings:
            break
        if running[entry.tenant] >= sc.max_trainings_per_tenant:
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
    return started
