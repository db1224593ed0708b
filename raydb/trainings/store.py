"""Training records in the workspace (local or S3): the service's only state.

Nothing lives in a replica's memory, so a restarted ingress (or a second one) answers for every
training. One folder per training, under its tenant::

    <workspace>/service/tenants/<tenant>/trainings/<id>/
        photos/<name>      the upload (written first)
        request.json       fields, overrides and the validated config (written last: the training exists)
        job.json           the Ray job it runs as (written once, by the queue, when it starts)
        status.json        state, stage, error, run folder, registered version (written by the job)
        outcome.json       "register" or "cancel", created only if absent: the job and DELETE race
                           for it, so a training is either registered or cancelled, never both
    <workspace>/service/tenants/<tenant>/idempotency/<sha256 of the key>.json   -> the training id
    <workspace>/service/queue/<created ns>--<tenant>--<id>.json         one per unfinished training

Every file has one writer at a time (or is created only if absent), so no read-modify-write races.
A training's public state is derived from them by :meth:`TrainingStore.state`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from raydb.ids import check_safe_id
from raydb.storage import Storage, join

__all__ = ["STATES", "TERMINAL", "QueueEntry", "TrainingStore", "new_training_id"]

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def new_training_id() -> str:
    return f"tr-{uuid.uuid4().hex[:16]}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class QueueEntry:
    """An unfinished training, in submission order."""

    name: str
    tenant: str
    training_id: str


class TrainingStore:
    """Reads and writes the files above; no Ray, no HTTP."""

    def __init__(self, storage: Storage, workspace: str) -> None:
        self.storage, self.workspace = storage, workspace

    # -- paths -------------------------------------------------------------------------------------
    def tenant_uri(self, tenant: str) -> str:
        return join(self.workspace, "service", "tenants", check_safe_id(tenant))

    def training_uri(self, tenant: str, training_id: str) -> str:
        return join(self.tenant_uri(tenant), "trainings", check_safe_id(training_id))

    def photos_uri(self, tenant: str, training_id: str) -> str:
        return join(self.training_uri(tenant, training_id), "photos")

    def _file(self, tenant: str, training_id: str, name: str) -> str:
        return join(self.training_uri(tenant, training_id), name)

    def _queue(self) -> str:
        return join(self.workspace, "service", "queue")

    # -- submission --------------------------------------------------------------------------------
    def create(self, tenant: str, training_id: str, request: dict[str, Any],
               photos: list[tuple[str, bytes]]) -> None:
        """Photos, then request.json: from then on the training exists (it is queued by :meth:`enqueue`)."""
        for name, data in photos:
            self.storage.write_bytes(join(self.photos_uri(tenant, training_id), name), data)
        self.storage.write_json(self._file(tenant, training_id, "request.json"),
                                request | {"id": training_id, "tenant": tenant, "created_at": _now()})

    def enqueue(self, tenant: str, training_id: str) -> None:
        self.storage.write_json(join(self._queue(), f"{time.time_ns():020d}--{tenant}--{training_id}.json"),
                                {"tenant": tenant, "id": training_id})

    def discard(self, tenant: str, training_id: str) -> None:
        """Remove a training that lost an idempotency race (never queued, never seen)."""
        self.storage.delete(self.training_uri(tenant, training_id), recursive=True)

    def claim_idempotency(self, tenant: str, key: str, training_id: str) -> str:
        """The training id for ``key``: ``training_id`` if this call claimed the key, else the earlier one."""
        uri = join(self.tenant_uri(tenant), "idempotency",
                   hashlib.sha256(key.encode("utf-8")).hexdigest() + ".json")
        if self.storage.write_json(uri, {"id": training_id, "at": _now()}, if_absent=True):
            return training_id
        return self.storage.read_json(uri)["id"]

    def idempotent_id(self, tenant: str, key: str) -> str | None:
        uri = join(self.tenant_uri(tenant), "idempotency",
                   hashlib.sha256(key.encode("utf-8")).hexdigest() + ".json")
        found = self.storage.read_json_or(uri)
        return found["id"] if found else None

    # -- records -----------------------------------------------------------------------------------
    def request(self, tenant: str, training_id: str) -> dict[str, Any] | None:
        """request.json, or None when the training does not exist for this tenant."""
        try:
            return self.storage.read_json_or(self._file(tenant, training_id, "request.json"))
        except ValueError:  # an id outside the safe set cannot exist
            return None

    def job(self, tenant: str, training_id: str) -> dict[str, Any] | None:
        return self.storage.read_json_or(self._file(tenant, training_id, "job.json"))

    def record_job(self, tenant: str, training_id: str, submission_id: str) -> None:
        self.storage.write_json(self._file(tenant, training_id, "job.json"),
                                {"submission_id": submission_id, "submitted_at": _now()})

    def status(self, tenant: str, training_id: str) -> dict[str, Any]:
        return self.storage.read_json_or(self._file(tenant, training_id, "status.json"), {})

    def write_status(self, tenant: str, training_id: str, **fields: Any) -> None:
        """Replace status.json (the job is its only writer while it runs)."""
        self.storage.write_json(self._file(tenant, training_id, "status.json"),
                                fields | {"updated_at": _now()})

    def outcome(self, tenant: str, training_id: str) -> str | None:
        found = self.storage.read_json_or(self._file(tenant, training_id, "outcome.json"))
        return found["outcome"] if found else None

    def claim_outcome(self, tenant: str, training_id: str, outcome: Literal["register", "cancel"]) -> bool:
        """True when this call decided the outcome; False when the other side got there first."""
        return self.storage.write_json(self._file(tenant, training_id, "outcome.json"),
                                       {"outcome": outcome, "at": _now()}, if_absent=True)

    def state(self, tenant: str, training_id: str) -> str:
        """``queued`` (no job yet), ``running``, or the terminal state."""
        if self.outcome(tenant, training_id) == "cancel":
            return "cancelled"
        state = self.status(tenant, training_id).get("state")
        if state in TERMINAL:
            return state
        return "running" if self.job(tenant, training_id) else "queued"

    def list_ids(self, tenant: str) -> list[str]:
        """The tenant's training ids, oldest first (ids are random: order by request.json time)."""
        ids = [n.rstrip("/") for n in self.storage.list(join(self.tenant_uri(tenant), "trainings"))
               if n.endswith("/")]
        rows = [((self.request(tenant, i) or {}).get("created_at", ""), i) for i in ids]
        return [i for created, i in sorted(rows) if created]

    # -- the queue ---------------------------------------------------------------------------------
    def active(self) -> list[QueueEntry]:
        """Unfinished trainings of every tenant, oldest first."""
        out = []
        for name in sorted(self.storage.list(self._queue())):
            parts = name.removesuffix(".json").split("--")
            if len(parts) == 3 and name.endswith(".json"):
                out.append(QueueEntry(name, parts[1], parts[2]))
        return out

    def finish(self, entry: QueueEntry) -> None:
        """Drop a finished training from the queue (its records stay)."""
        self.storage.delete(join(self._queue(), entry.name))
