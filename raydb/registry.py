"""The adapter registry: each tenant's subjects, their versions, and a ``latest`` that only moves forward.

Layout under the workspace (every path is built here, from the workspace, never stored)::

    tenants/<tenant>/subjects/<id>/latest.json  {"subject_id", "version", "registered_at", "versions"}
    tenants/<tenant>/subjects/<id>/vNNNN/       pytorch_lora_weights.safetensors, adapter.json, CLAIM,
                                                the run's loss_curve.png and samples.png when it made them

Why each piece:

- **Names per tenant.** A subject is named by ``(tenant, subject id)``: two tenants can each have
  ``alice``, and nothing one tenant registers, lists or looks up ever touches another tenant's
  folder. There is no owner record to claim or squat on, and no "this id is taken" answer that
  would tell one customer what another has named its subjects: an id a tenant has not registered
  is, for that tenant, simply missing. Everything else a tenant's trainings keep (runs, pipeline
  manifests, searches) sits beside it under :func:`tenant_uri`.
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
- **Robust listing.** A corrupt entry (``latest.json`` or ``adapter.json`` that is not a JSON
  object) is logged and skipped; it never fails the tenant's other subjects.

Registries from before per-tenant names (``subjects/<id>/`` at the workspace root, with
``owner.json`` and index files ``tenants/<tenant>/<id>.json``) are moved by
:func:`migrate_registry`, which the server runs at start-up and the pipeline before it registers.

Subject ids and tenants use the safe character set of :mod:`raydb.ids`, so neither can name a path
outside its folder. This module is the only one that builds registry paths, and it owns the names of
an adapter's files (``ADAPTER_WEIGHTS``, ``ADAPTER_META``, ``ADAPTER_PICTURES``).
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
    "tenant_uri",
    "ADAPTER_PICTURES",
    "LOSS_CURVE",
    "SAMPLES",
    "subject_uri",
    "version_uri",
    "latest_uri",
    "read_metadata",
    "register_adapter",
    "latest_version",
    "list_subjects",
    "list_tenants",
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tenant_uri(workspace: str, tenant: str) -> str:
    """Everything a tenant owns in the workspace: its subjects, runs, manifests and searches."""
    return join(workspace, "tenants", check_safe_id(tenant))


def subject_uri(workspace: str, tenant: str, subject_id: str) -> str:
    return join(tenant_uri(workspace, tenant), "subjects", check_safe_id(subject_id))


def version_uri(workspace: str, tenant: str, subject_id: str, version: str) -> str:
    """The folder of one registered version, built from the workspace (never read from a record)."""
    return join(subject_uri(workspace, tenant, subject_id), check_version(version))


def latest_uri(workspace: str, tenant: str, subject_id: str) -> str:
    """The subject's ``latest.json`` pointer (moved only by compare-and-swap, see the docstring)."""
    return join(subject_uri(workspace, tenant, subject_id), "latest.json")


def _name(tenant: str, subject_id: str) -> str:
    return f"{tenant}/{subject_id}"


def read_metadata(storage: Storage, folder: str) -> dict[str, Any]:
    """An adapter folder's ``adapter.json``; StorageError when it is not a JSON object (JSON that is
    a list or a number is as corrupt as JSON that does not parse), NotFound when it is missing."""
    meta = storage.read_json(join(folder, ADAPTER_META))
    if not isinstance(meta, dict):
        raise StorageError(f"{join(folder, ADAPTER_META)} is not a JSON object")
    return meta


# -- versions ---------------------------------------------------------------------------------------
def _version_folders(storage: Storage, base: str) -> list[str]:
    names = [n.rstrip("/") for n in storage.list(base) if n.endswith("/")]
    return sorted((n for n in names if is_version(n)), key=lambda v: int(v[1:]))


def _read_latest(storage: Storage, base: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(latest.json, tag)`` of the subject folder ``base``, or ``(None, None)`` when there is none."""
    try:
        raw, tag = storage.read_tagged(join(base, "latest.json"))
    except NotFound:
        return None, None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"latest.json of subject {name!r} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("version"), str) \
            or not isinstance(record.get("versions"), list):
        raise StorageError(f"latest.json of subject {name!r} is malformed")
    return record, tag


def _versions(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The complete versions a latest.json lists (malformed entries left out)."""
    listed = (record or {}).get("versions", [])
    return [v for v in listed if isinstance(v, dict) and is_version(v.get("version"))]


def _publish(storage: Storage, base: str, subject_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Add a complete version to latest.json by compare-and-swap; latest = the highest version."""
    uri = join(base, "latest.json")
    while True:
        current, tag = _read_latest(storage, base, subject_id)
        versions = _versions(current)
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


def _with_uri(workspace: str, tenant: str, subject_id: str, record: dict[str, Any]) -> dict[str, Any]:
    return {"tenant": tenant, "subject_id": subject_id, "version": record["version"],
            "uri": version_uri(workspace, tenant, subject_id, record["version"]),
            "registered_at": record.get("registered_at")}


def register_adapter(
    storage: Storage,
    workspace: str,
    tenant: str,
    subject_id: str,
    adapter_dir_uri: str,
    *,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy an adapter (weights + adapter.json) into a new version of ``tenant``'s ``subject_id`` and
    move its ``latest``.

    The stored adapter.json names the registry's tenant (``subject.tenant``), whatever the source
    said. Returns ``{tenant, subject_id, version, uri, registered_at}`` — an existing version's
    record when the same weights (and extra metadata) are already registered.
    """
    base = subject_uri(workspace, tenant, subject_id)
    meta = read_metadata(storage, adapter_dir_uri)
    meta.update(extra_metadata or {})
    subject = meta.get("subject") if isinstance(meta.get("subject"), dict) else {}
    meta["subject"] = subject | {"tenant": tenant}
    current, _ = _read_latest(storage, base, _name(tenant, subject_id))
    for entry in reversed(_versions(current)):
        if entry.get("weights_sha256") != meta.get("weights_sha256"):
            continue
        old = storage.read_json_or(join(base, entry["version"], ADAPTER_META))
        old = old if isinstance(old, dict) else {}
        if all(old.get(k) == v for k, v in (extra_metadata or {}).items()):
            return _with_uri(workspace, tenant, subject_id, entry)
    folders = _version_folders(storage, base)
    version_no = int(folders[-1][1:]) + 1 if folders else 1
    while True:  # claim the version folder; a concurrent registrar gets the next number
        version = f"v{version_no:04d}"
        if storage.write_bytes(join(base, version, "CLAIM"), b"", if_absent=True):
            break
        version_no += 1
    target = version_uri(workspace, tenant, subject_id, version)
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
    _publish(storage, base, subject_id, entry)
    return _with_uri(workspace, tenant, subject_id, entry)


def latest_version(storage: Storage, workspace: str, tenant: str, subject_id: str) -> dict[str, Any]:
    """``{tenant, subject_id, version, uri, registered_at, versions}`` of one of ``tenant``'s
    subjects; NotFound when the tenant has none by that id."""
    base = subject_uri(workspace, tenant, subject_id)
    record, _ = _read_latest(storage, base, _name(tenant, subject_id))
    if record is None:
        raise NotFound(f"subject {subject_id!r} has no registered adapter")
    versions = [v["version"] for v in _versions(record)]
    return _with_uri(workspace, tenant, subject_id, record) | {"versions": versions}


def list_subjects(storage: Storage, workspace: str, tenant: str) -> dict[str, dict[str, Any]]:
    """``{subject_id: {"latest": record, "versions": [...], "metadata": adapter.json}}`` of one
    tenant (only its folder is read). A corrupt entry is logged and left out."""
    ids = [n.rstrip("/") for n in storage.list(join(tenant_uri(workspace, tenant), "subjects"))
           if n.endswith("/")]
    out: dict[str, dict[str, Any]] = {}
    for sid in ids:
        try:
            check_safe_id(sid)
            latest = latest_version(storage, workspace, tenant, sid)
            meta = read_metadata(storage, latest["uri"])
        except NotFound:
            continue  # a folder without a published version (a registration that crashed)
        except (ValueError, StorageError) as exc:
            logger.warning("registry: skipping subject %r in a listing: %s", _name(tenant, sid), exc)
            continue
        out[sid] = {"latest": latest, "versions": latest["versions"], "metadata": meta}
    return out


def list_tenants(storage: Storage, workspace: str) -> list[str]:
    """Tenants with a folder in the workspace, sorted (names outside the safe set are left out)."""
    out = []
    for name in storage.list(join(workspace, "tenants")):
        try:
            out += [check_safe_id(name.rstrip("/"))] if name.endswith("/") else []
        except ValueError:
            continue
    return out


# -- the move from one global namespace -------------------------------------------------------------
def _migrate_subject(storage: Storage, workspace: str, subject_id: str) -> int:
    """Copy every complete version of the legacy ``subjects/<id>/`` to its tenant's folder (the
    tenant its adapter.json names), publish it there, then delete the legacy folder — unless some
    version could not be moved, which stays (and is logged) for the next run."""
    old = join(workspace, "subjects", check_safe_id(subject_id))
    record = storage.read_json_or(join(old, "latest.json"))
    when = {v.get("version"): v.get("registered_at") for v in (record or {}).get("versions", [])
            if isinstance(v, dict)} if isinstance(record, dict) else {}
    moved, kept = 0, 0
    for version in _version_folders(storage, old):
        source = join(old, version)
        meta = storage.read_json_or(join(source, ADAPTER_META))
        if not isinstance(meta, dict):
            continue  # never complete, never listed or served: nothing to keep
        try:
            tenant = check_safe_id(((meta.get("subject") or {}).get("tenant")) or "default")
        except (ValueError, AttributeError) as exc:
            logger.warning("registry migration: keeping %s: its tenant is unusable: %s", source, exc)
            kept += 1
            continue
        base = subject_uri(workspace, tenant, subject_id)
        target = join(base, version)
        there = storage.read_json_or(join(target, ADAPTER_META))
        if there is None:
            storage.write_bytes(join(target, "CLAIM"), b"", if_absent=True)
            files = [f for f in storage.list(source, recursive=True) if f not in (ADAPTER_META, "CLAIM")]
            for name in files:
                storage.write_bytes(join(target, name), storage.read_bytes(join(source, name)))
            storage.write_json(join(target, ADAPTER_META), meta)  # last: marks the copy complete
        elif not isinstance(there, dict) or there.get("weights_sha256") != meta.get("weights_sha256"):
            logger.warning("registry migration: keeping %s: %s already holds other weights", source, target)
            kept += 1
            continue
        _publish(storage, base, subject_id, {"version": version, "weights_sha256": meta.get("weights_sha256"),
                                             "registered_at": when.get(version)})
        moved += 1
    if not kept:
        storage.delete(old, recursive=True)
    return moved


def migrate_registry(storage: Storage, workspace: str) -> int:
    """Move a registry of one global namespace (``subjects/<id>/``) to per-tenant names; returns
    the number of versions moved (0 when there is nothing left to move). Idempotent and resumable."""
    legacy = [n.rstrip("/") for n in storage.list(join(workspace, "subjects")) if n.endswith("/")]
    if not legacy:
        return 0  # the common case: one listing
    moved = 0
    for sid in legacy:
        try:
            moved += _migrate_subject(storage, workspace, sid)
        except (ValueError, StorageError) as exc:
            logger.warning("registry migration: skipping subject %r: %s", sid, exc)
    for tenant in list_tenants(storage, workspace):  # the old per-tenant index files
        folder = join(workspace, "tenants", tenant)
        for name in storage.list(folder):
            if name.endswith(".json"):
                storage.delete(join(folder, name))
    return moved
