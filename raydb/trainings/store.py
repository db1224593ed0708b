"""Training records in the workspace (local or S3): the service's only state.

Nothing lives in a replica's memory, so a restarted ingress (or a second one) answers for every
training. One folder per training, under its tenant::

    <workspace>/service/tenants/<tenant>/trainings/<id>/
        photos/<name>      the upload (written first; deleted service.retention_s after the training ended)
        request.json       fields, overrides and the validated config (written last: the training exists)
        job.json           the Ray job it runs as (written once, by the queue, when it starts)
        status.json        state, stage, error, run folder, registered version (written by the job)
        outcome.json       "register" or "cancel" (+ the limit that cancelled it), created only if
                           absent: the job and DELETE race for it, so a training is either registered
                           or cancelled, never both
        ended.json         when the queue saw it end; purged.json: when its photos and runs went
    <workspace>/service/tenants/<tenant>/idempotency/<sha256 of the key>.json   -> the training id
    <workspace>/service/queue/<created ns>--<tenant>--<id>.json         one per training whose job may run
    <workspace>/service/retention/<ended ns>--<tenant>--<id>.json       one per ended training not purged yet
    <workspace>/service/lease.json      the queue's lease: who decides admissions and starts now

Every file has one writer at a time (or is created only if absent, or moved by compare-and-swap),
so no read-modify-write races. A training's public state is derived from them by
:meth:`TrainingStore.state`. Training ids sort by creation time (``tr-`` + 12 hex digits of
milliseconds + 12 random ones), which is the order ``GET /v1/trainings`` pages through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from raydb.ids import check_safe_id
from raydb.storage import NotFound, Storage, join

__all__ = ["STATES", "TERMINAL", "QueueEntry", "LeaseBusy", "TrainingStore", "new_training_id", "parse_entry"]

logger = logging.getLogger(__name__)

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def new_training_id() -> str:
    """``tr-<ms since the epoch, 12 hex><12 random hex>``: unique, and sorted by creation time."""
    return f"tr-{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:12]}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _entry_name(tenant: str, training_id: str) -> str:
    return f"{time.time_ns():020d}--{tenant}--{training_id}.json"


def parse_entry(name: str) -> tuple[int, str, str] | None:
    """``(ns, tenant, training id)`` of a queue or retention file name, or None. The tenant is what
    lies between the first and the last ``--``: tenant names may contain ``--``, training ids never."""
    stamp, sep, rest = name.removesuffix(".json").partition("--")
    tenant, sep2, training_id = rest.rpartition("--")
    if not (sep and sep2 and name.endswith(".json") and stamp.isdigit() and tenant and training_id):
        return None
    return int(stamp), tenant, training_id


@dataclass(frozen=True)
class QueueEntry:
    """A training whose job may still run (queued, running, or stopping), in submission order."""

    name: str
    tenant: str
    training_id: str


class LeaseBusy(RuntimeError):
    """Another ingress held the queue's lease for longer than we would wait (retry shortly)."""


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

    def _retention(self) -> str:
        return join(self.workspace, "service", "retention")

    # -- the lease: one decider at a time, across threads, processes and ingress replicas ----------
    @contextmanager
    def lease(self, ttl_s: float = 30.0, wait_s: float = 20.0) -> Iterator[None]:
        """Hold the queue's lease: admissions (capacity and quota checks, then the enqueue) and
        queue passes run one at a time, so two racing submissions can never both take the last
        slot. Taken by a create-if-absent write, or by compare-and-swap over an expired or released
        holder (S3 ``If-None-Match``/``If-Match``, a ``flock`` locally); a holder that died is
        replaced after ``ttl_s``. Raises :class:`LeaseBusy` after ``wait_s``."""
        uri = join(self.workspace, "service", "lease.json")
        me = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while True:
            record = json.dumps({"holder": me, "expires": time.time() + ttl_s}).encode()
            if self.storage.write_bytes(uri, record, if_absent=True):
                break
            try:
                raw, tag = self.storage.read_tagged(uri)
            except NotFound:
                continue
            try:
                expires = float(json.loads(raw).get("expires", 0))
            except (ValueError, TypeError, AttributeError):
                expires = 0.0  # unreadable: as good as expired
            if expires < time.time() and self.storage.write_bytes(uri, record, if_match=tag):
                break
            if time.monotonic() > deadline:
                raise LeaseBusy("the training queue is busy; retry")
            time.sleep(0.02 + random.random() * 0.05)
        try:
            yield
        finally:  # released by writing an expired record, and only while it is still ours
            try:
                raw, tag = self.storage.read_tagged(uri)
                if json.loads(raw).get("holder") == me:
                    self.storage.write_bytes(uri, json.dumps({"holder": None, "expires": 0}).encode(),
                                             if_match=tag)
            except Exception as exc:  # it expires by itself
                logger.warning("could not release the training queue's lease: %s", exc)

    # -- submission --------------------------------------------------------------------------------
    def write_photos(self, tenant: str, training_id: str, photos: list[tuple[str, bytes]]) -> None:
        """The upload, before the training exists (it exists once :meth:`create` wrote request.json)."""
        for name, data in photos:
            self.storage.write_bytes(join(self.photos_uri(tenant, training_id), name), data)

    def create(self, tenant: str, training_id: str, request: dict[str, Any]) -> None:
        """request.json, after the photos: from then on the training exists (queued by :meth:`enqueue`)."""
        self.storage.write_json(self._file(tenant, training_id, "request.json"),
                                request | {"id": training_id, "tenant": tenant, "created_at": _now()})

    def enqueue(self, tenant: str, training_id: str) -> None:
        self.storage.write_json(join(self._queue(), _entry_name(tenant, training_id)),
                                {"tenant": tenant, "id": training_id})

    def discard(self, tenant: str, training_id: str) -> None:
        """Remove a submission that was refused or lost an idempotency race (never queued, never seen)."""
        self.storage.delete(self.training_uri(tenant, training_id), recursive=True)

    def _idempotency_uri(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return join(self.tenant_uri(tenant), "idempotency", digest + ".json")

    def claim_idempotency(self, tenant: str, key: str, training_id: str, fingerprint: str) -> dict[str, Any]:
        """The record of ``key``: ours (``id == training_id``) if this call claimed it, else the earlier
        one, whose ``fingerprint`` says which request body it was used with."""
        uri = self._idempotency_uri(tenant, key)
        record = {"id": training_id, "fingerprint": fingerprint, "at": _now()}
        if self.storage.write_json(uri, record, if_absent=True):
            return record
        return self.storage.read_json(uri)

    def idempotent(self, tenant: str, key: str) -> dict[str, Any] | None:
        """``{"id", "fingerprint", "at"}`` of an Idempotency-Key this tenant used, or None."""
        return self.storage.read_json_or(self._idempotency_uri(tenant, key))

    def release_idempotency(self, tenant: str, key: str, training_id: str) -> None:
        """Free a key whose training was refused (a full queue, a quota): its retry may succeed."""
        uri = self._idempotency_uri(tenant, key)
        if (self.storage.read_json_or(uri) or {}).get("id") == training_id:
            self.storage.delete(uri)

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
                                {"submission_id": submission_id, "submitted_at": _now(),
                                 "submitted_ts": time.time()})

    def status(self, tenant: str, training_id: str) -> dict[str, Any]:
        return self.storage.read_json_or(self._file(tenant, training_id, "status.json"), {})

    def write_status(self, tenant: str, training_id: str, **fields: Any) -> None:
        """Replace status.json (the job is its only writer while it runs)."""
        self.storage.write_json(self._file(tenant, training_id, "status.json"),
                                fields | {"updated_at": _now()})

    def outcome_record(self, tenant: str, training_id: str) -> dict[str, Any] | None:
        """outcome.json: ``{"outcome": "register" | "cancel", "at", "error"?}`` or None."""
        return self.storage.read_json_or(self._file(tenant, training_id, "outcome.json"))

    def outcome(self, tenant: str, training_id: str) -> str | None:
        found = self.outcome_record(tenant, training_id)
        return found["outcome"] if found else None

    def claim_outcome(self, tenant: str, training_id: str, outcome: Literal["register", "cancel"], *,
                      error: str | None = None) -> bool:
        """True when this call decided the outcome; False when the other side got there first.
        ``error``: a cancel decided by a limit, not the tenant (the training then reads ``failed``)."""
        record = {"outcome": outcome, "at": _now()} | ({"error": error} if error else {})
        uri = self._file(tenant, training_id, "outcome.json")
        return self.storage.write_json(uri, record, if_absent=True)

    def state(self, tenant: str, training_id: str) -> str:
        """``queued`` (no job yet), ``running``, or the terminal state."""
        outcome = self.outcome_record(tenant, training_id)
        if outcome and outcome["outcome"] == "cancel":
            return "failed" if outcome.get("error") else "cancelled"
        state = self.status(tenant, training_id).get("state")
        if state in TERMINAL:
            return state
        return "running" if self.job(tenant, training_id) else "queued"

    def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to ``limit`` of the tenant's training ids after ``after``, in id (= creation) order, and
        the cursor of the next page (None on the last). Only ids are listed; no record is read."""
        names = sorted(n.rstrip("/") for n in self.storage.list(join(self.tenant_uri(tenant), "trainings"))
                       if n.endswith("/"))
        if after is not None:
            names = [n for n in names if n > after]
        return names[:limit], (names[limit - 1] if len(names) > limit else None)

    # -- the queue ---------------------------------------------------------------------------------
    def active(self) -> list[QueueEntry]:
        """Trainings whose job may still run, of every tenant, oldest first."""
        out = []
        for name in sorted(self.storage.list(self._queue())):
            parsed = parse_entry(name)
            if parsed is not None:
                out.append(QueueEntry(name, parsed[1], parsed[2]))
        return out

    def finish(self, entry: QueueEntry) -> None:
        """Its job ended (or never started): the training leaves the queue, and its retention clock
        starts (its records stay)."""
        self.storage.write_json(self._file(entry.tenant, entry.training_id, "ended.json"), {"at": _now()})
        self.storage.write_json(join(self._retention(), _entry_name(entry.tenant, entry.training_id)),
                                {"tenant": entry.tenant, "id": entry.training_id})
        self.storage.delete(join(self._queue(), entry.name))

    def expired(self, older_than_s: float) -> list[QueueEntry]:
        """Ended trainings whose retention ran out (ended more than ``older_than_s`` ago), oldest first."""
        cutoff = time.time_ns() - int(older_than_s * 1e9)
        out = []
        for name in sorted(self.storage.list(self._retention())):
            parsed = parse_entry(name)
            if parsed is not None and parsed[0] <= cutoff:
                out.append(QueueEntry(name, parsed[1], parsed[2]))
        return out

    def purged(self, entry: QueueEntry, progress: dict[str, Any] | None) -> None:
        """Its photos and runs are gone: note when (and the last progress, which lived in the run)."""
        self.storage.write_json(self._file(entry.tenant, entry.training_id, "purged.json"),
                                {"at": _now(), "progress": progress})
        self.storage.delete(join(self._retention(), entry.name))

    def purge_record(self, tenant: str, training_id: str) -> dict[str, Any] | None:
        return self.storage.read_json_or(self._file(tenant, training_id, "purged.json"))
