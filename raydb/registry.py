"""The adapter registry: who owns a subject id, its versions, and a ``latest`` that only moves forward.

Layout under the workspace (every path is built here, from the workspace, never stored)::

    subjects/<id>/owner.json          {"tenant", "claimed_at"}: written once, create-if-absent
    subjects/<id>/latest.json         {"subject_id", "version", "registered_at", "versions": [...]}
    subjects/<id>/vNNNN/              pytorch_lora_weights.safetensors, adapter.json (+ CLAIM marker),
                                      the run's loss_curve.png and samples.png when it made them
    tenants/<tenant>/<id>.json        index: the subjects of a tenant, listed without reading others'

Why each piece:

- **Ownership.** A subject id belongs to the tenant that first registered it: ``owner.json`` is
  written with a create-if-absent write (S3 ``If-None-Match: *``, local ``link``), so two tenants
  racing for one id cannot both win. Another tenant registering (or training) it gets
  :class:`SubjectOwned`. Registries made before owner records existed are migrated on first touch:
  the owner is the tenant of the subject's *oldest* complete version, never the newcomer
  (:func:`migrate_registry` does all subjects at once; the server runs it at start-up).
- **Forward-only latest.** ``latest.json`` is moved with a compare-and-swap (S3 ``If-Match`` on
  the ETag, a ``flock`` locally): a registrar re-reads, merges its version into ``versions`` and
  retries on conflict, and ``version`` is always the highest complete version. Two concurrent
  registrations therefore both land and ``latest`` never regresses.
- **Complete versions only.** A version enters ``versions`` only after its files are written, so a
  crashed registration (a claimed folder without files) is never listed or served.
- **Idempotence.** Registering weights that some version already holds (with the same extra
  metadata) returns that version; rerunning an old config does not re-publish old weights as new.
- **Relative to the workspace.** Records carry version names; :func:`version_uri` builds paths, so
  a moved or copied workspace keeps working and the ingress and the replicas agree on the files.
- **Robust listing.** A corrupt entry is logged and skipped; it never fails another tenant's call.

Subject ids and tenants use the safe character set of :mod:`raydb.ids`, so an id can never name a
path outside the registry. This module is the only one that builds registry paths, and it owns the
names of an adapter's files (``ADAPTER_WEIGHTS``, ``ADAPTER_META``, ``ADAPTER_PICTURES``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from raydb.ids import check_safe_id, check_version, is_version
from raydb.storage import NotFound, Storage, StorageError, join

__all__ = [
    "ADAPTER_WEIGHTS",
    "check_safe_id",
    "ADAPTER_META",
    "ADAPTER_FILES",
    "ADAPTER_PICTURES",
    "LOSS_CURVE",
    "SAMPLES",
    "SubjectOwned",
    "subject_uri",
    "version_uri",
    "latest_uri",
    "subject_owner",
    "claim_subject",
    "register_adapter",
    "latest_version",
    "list_subjects",
    "migrate_registry",
]

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
ADAPTER_META = "adapter.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_META)
# Optional, beside the weights in the adapter folder: how the run trained and what the adapter draws
# (base model vs adapter, same seeds). Registered with the version, so the API serves a version's
# pictures from the registry alone, like its weights.
LOSS_CURVE, SAMPLES = "loss_curve.png", "samples.png"
ADAPTER_PICTURES = (LOSS_CURVE, SAMPLES)


class SubjectOwned(ValueError):
    """The subject id belongs to another tenant (bad input: ``subject.id``)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def subject_uri(workspace: str, subject_id: str) -> str:
    return join(workspace, "subjects", check_safe_id(subject_id))


def version_uri(workspace: str, subject_id: str, version: str) -> str:
    """The folder of one registered version, built from the workspace (never read from a record)."""
    return join(subject_uri(workspace, subject_id), check_version(version))


def latest_uri(workspace: str, subject_id: str) -> str:
    """The subject's ``latest.json`` pointer (moved only by compare-and-swap, see the docstring)."""
    return join(subject_uri(workspace, subject_id), "latest.json")


def _index_uri(workspace: str, tenant: str, subject_id: str) -> str:
    return join(workspace, "tenants", check_safe_id(tenant), f"{check_safe_id(subject_id)}.json")


# -- ownership --------------------------------------------------------------------------------------
def _version_folders(storage: Storage, workspace: str, subject_id: str) -> list[str]:
    names = [n.rstrip("/") for n in storage.list(subject_uri(workspace, subject_id)) if n.endswith("/")]
    return sorted((n for n in names if is_version(n)), key=lambda v: int(v[1:]))


def _legacy_owner(storage: Storage, workspace: str, subject_id: str) -> str | None:
    """The tenant of the oldest complete version of a subject registered before owner records."""
    for version in _version_folders(storage, workspace, subject_id):
        meta = storage.read_json_or(join(version_uri(workspace, subject_id, version), ADAPTER_META))
        if isinstance(meta, dict):
            tenant = (meta.get("subject") or {}).get("tenant")
            return check_safe_id(tenant) if tenant else None
    return None


def _claim(storage: Storage, workspace: str, subject_id: str, tenant: str) -> str:
    """Write owner.json if absent; return whoever owns the id now (us, or an earlier claimant)."""
    owner_uri = join(subject_uri(workspace, subject_id), "owner.json")
    storage.write_json(owner_uri, {"tenant": tenant, "claimed_at": _now()}, if_absent=True)
    owner = storage.read_json(owner_uri)["tenant"]
    if owner == tenant:  # the index entry may be missing after a crash between the two writes
        storage.write_json(_index_uri(workspace, tenant, subject_id), {"subject_id": subject_id},
                           if_absent=True)
    return owner


def subject_owner(storage: Storage, workspace: str, subject_id: str) -> str | None:
    """The owning tenant of ``subject_id``, or None for an id nobody has registered.

    A subject from before owner records gets one now, from its oldest version (the migration).
    """
    record = storage.read_json_or(join(subject_uri(workspace, subject_id), "owner.json"))
    if record is not None:
        if not isinstance(record, dict) or not isinstance(record.get("tenant"), str):
            raise StorageError(f"{join(subject_uri(workspace, subject_id), 'owner.json')} is malformed")
        return record["tenant"]
    legacy = _legacy_owner(storage, workspace, subject_id)
    return _claim(storage, workspace, subject_id, legacy) if legacy else None


def claim_subject(storage: Storage, workspace: str, subject_id: str, tenant: str) -> None:
    """Make ``tenant`` the owner of a new id, or check that it already is; SubjectOwned otherwise.

    Training calls this before it starts, so a foreign id fails in seconds, not after training.
    """
    check_safe_id(tenant)
    owner = subject_owner(storage, workspace, subject_id)
    if owner is None:
        owner = _claim(storage, workspace, subject_id, tenant)
    if owner != tenant:
        raise SubjectOwned(f"subject.id {subject_id!r} is already registered by another tenant; "
                           "choose another subject.id")


def migrate_registry(storage: Storage, workspace: str) -> int:
    """Give every pre-ownership subject its owner record and index entry; returns how many."""
    migrated = 0
    for name in storage.list(join(workspace, "subjects")):
        sid = name.rstrip("/")
        try:
            check_safe_id(sid)
            if storage.exists(join(subject_uri(workspace, sid), "owner.json")):
                continue
            migrated += subject_owner(storage, workspace, sid) is not None
        except (ValueError, StorageError) as exc:
            logger.warning("registry migration: skipping subject %r: %s", sid, exc)
    return migrated


# -- versions ---------------------------------------------------------------------------------------
def _read_latest(
    storage: Storage, workspace: str, subject_id: str
) -> tuple[dict[str, Any] | None, str | None]:
    """``(latest.json, tag)``, or ``(None, None)`` when there is none yet."""
    try:
        raw, tag = storage.read_tagged(latest_uri(workspace, subject_id))
    except NotFound:
        return None, None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"latest.json of subject {subject_id!r} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("version"), str):
        raise StorageError(f"latest.json of subject {subject_id!r} is malformed")
    return record, tag


def _versions(
    storage: Storage, workspace: str, subject_id: str, record: dict[str, Any]
) -> list[dict[str, Any]]:
    """The complete versions a latest.json lists; a legacy one (no list) gets its complete folders."""
    if isinstance(record.get("versions"), list):
        return [v for v in record["versions"]
                if isinstance(v, dict) and is_version(v.get("version"))]
    out = []
    for version in _version_folders(storage, workspace, subject_id):
        meta = storage.read_json_or(join(version_uri(workspace, subject_id, version), ADAPTER_META))
        if isinstance(meta, dict):  # adapter.json is written last: its presence marks a complete version
            out.append({"version": version, "weights_sha256": meta.get("weights_sha256")})
    return out


def _publish(storage: Storage, workspace: str, subject_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Add a complete version to latest.json by compare-and-swap; latest = the highest version."""
    uri = latest_uri(workspace, subject_id)
    while True:
        current, tag = _read_latest(storage, workspace, subject_id)
        versions = _versions(storage, workspace, subject_id, current) if current else []
        by_name = {v["version"]: v for v in [*versions, entry]}
        versions = sorted(by_name.values(), key=lambda v: int(v["version"][1:]))
        top = versions[-1]
        record = {"subject_id": subject_id, "version": top["version"],
                  "registered_at": top.get("registered_at"), "versions": versions}
        if tag is None:
            written = storage.write_json(uri, record, if_absent=True)
        else:
            written = storage.write_json(uri, record, if_match=tag)
        if written:
            return record


def _with_uri(workspace: str, subject_id: str, record: dict[str, Any]) -> dict[str, Any]:
    return {"subject_id": subject_id, "version": record["version"],
            "uri": version_uri(workspace, subject_id, record["version"]),
            "registered_at": record.get("registered_at")}


def register_adapter(
    storage: Storage,
    workspace: str,
    subject_id: str,
    adapter_dir_uri: str,
    *,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy an adapter (weights + adapter.json) into a new registry version and move ``latest``.

    The owner is ``adapter.json``'s ``subject.tenant``; SubjectOwned when another tenant holds the
    id. Returns ``{subject_id, version, uri, registered_at}`` — an existing version's record when
    the same weights (and extra metadata) are already registered.
    """
    subject_uri(workspace, subject_id)
    meta = storage.read_json(join(adapter_dir_uri, ADAPTER_META))
    meta.update(extra_metadata or {})
    claim_subject(storage, workspace, subject_id, (meta.get("subject") or {}).get("tenant") or "default")
    current, _ = _read_latest(storage, workspace, subject_id)
    for entry in reversed(_versions(storage, workspace, subject_id, current) if current else []):
        if entry.get("weights_sha256") != meta.get("weights_sha256"):
            continue
        old = storage.read_json_or(join(version_uri(workspace, subject_id, entry["version"]), ADAPTER_META))
        old = old if isinstance(old, dict) else {}
        if all(old.get(k) == v for k, v in (extra_metadata or {}).items()):
            return _with_uri(workspace, subject_id, entry)
    folders = _version_folders(storage, workspace, subject_id)
    version_no = int(folders[-1][1:]) + 1 if folders else 1
    while True:  # claim the version folder; a concurrent registrar gets the next number
        version = f"v{version_no:04d}"
        claim = join(version_uri(workspace, subject_id, version), "CLAIM")
        if storage.write_bytes(claim, b"", if_absent=True):
            break
        version_no += 1
    target = version_uri(workspace, subject_id, version)
    meta["subject_id"] = subject_id
    meta["version"] = version
    weights = storage.read_bytes(join(adapter_dir_uri, ADAPTER_WEIGHTS))
    storage.write_bytes(join(target, ADAPTER_WEIGHTS), weights)
    present = set(storage.list(adapter_dir_uri))
    for name in ADAPTER_PICTURES:
        if name in present:
            storage.write_bytes(join(target, name), storage.read_bytes(join(adapter_dir_uri, name)))
    storage.write_json(join(target, ADAPTER_META), meta)  # last: marks the version complete
    entry = {"version": version, "weights_sha256": meta.get("weights_sha256"), "registered_at": _now()}
    _publish(storage, workspace, subject_id, entry)
    return _with_uri(workspace, subject_id, entry)


def latest_version(storage: Storage, workspace: str, subject_id: str) -> dict[str, Any]:
    """``{subject_id, version, uri, registered_at, versions}`` of a subject; NotFound when unknown."""
    record, _ = _read_latest(storage, workspace, subject_id)
    if record is None:
        raise NotFound(f"subject {subject_id!r} has no registered adapter")
    versions = [v["version"] for v in _versions(storage, workspace, subject_id, record)]
    return _with_uri(workspace, subject_id, record) | {"versions": versions}


def list_subjects(storage: Storage, workspace: str, tenant: str | None = None) -> dict[str, dict[str, Any]]:
    """``{subject_id: {"latest": record, "versions": [...], "metadata": adapter.json}}``.

    With ``tenant``, only that tenant's subjects, found through its index (other tenants' entries are
    never read); without, every subject. A corrupt entry is logged and left out.
    """
    if tenant is None:
        ids = [n.rstrip("/") for n in storage.list(join(workspace, "subjects")) if n.endswith("/")]
    else:
        ids = [n[: -len(".json")] for n in storage.list(join(workspace, "tenants", check_safe_id(tenant)))
               if n.endswith(".json")]
    out: dict[str, dict[str, Any]] = {}
    for sid in ids:
        try:
            check_safe_id(sid)
            latest = latest_version(storage, workspace, sid)
            meta = storage.read_json(join(latest["uri"], ADAPTER_META))
        except NotFound:
            continue  # claimed, nothing published yet
        except (ValueError, StorageError) as exc:
            logger.warning("registry: skipping subject %r in a listing: %s", sid, exc)
            continue
        out[sid] = {"latest": latest, "versions": latest["versions"], "metadata": meta}
    return out
