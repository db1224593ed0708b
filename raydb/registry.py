"""The adapter registry: ``<workspace>/subjects/<subject_id>/<version>/`` plus a ``latest`` pointer.

A finished training run (or the best trial of a search) copies its adapter files into a new version
folder, then moves ``subjects/<id>/latest.json`` to it with one atomic write, so a server reading the
registry sees either the old or the new version, never a half-registered one.

Subject ids and tenants use the safe character set of :mod:`raydb.ids`, so an id can never name a
path outside the registry. This module is the only one that builds registry paths, and it owns the
names of an adapter's files (``ADAPTER_WEIGHTS``, ``ADAPTER_META``).
"""

from __future__ import annotations

import time
from typing import Any

from raydb.ids import check_safe_id
from raydb.storage import NotFound, Storage, join

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_META",
    "ADAPTER_FILES",
    "register_adapter",
    "latest_version",
    "list_subjects",
    "subject_uri",
    "version_uri",
    "latest_uri",
]

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
ADAPTER_META = "adapter.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_META)


def subject_uri(workspace: str, subject_id: str) -> str:
    """``<workspace>/subjects/<id>``: every version of one subject."""
    return join(workspace, "subjects", check_safe_id(subject_id))


def version_uri(workspace: str, subject_id: str, version: str) -> str:
    """``<workspace>/subjects/<id>/<version>``: one registered adapter."""
    return join(subject_uri(workspace, subject_id), version)


def latest_uri(workspace: str, subject_id: str) -> str:
    """The subject's ``latest.json`` pointer."""
    return join(subject_uri(workspace, subject_id), "latest.json")


def register_adapter(
    storage: Storage,
    workspace: str,
    subject_id: str,
    adapter_dir_uri: str,
    *,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy an adapter (weights + adapter.json) into a new registry version and move ``latest``.

    Returns the registry record: ``{subject_id, version, uri, registered_at}``.
    """
    base = subject_uri(workspace, subject_id)
    meta = storage.read_json(join(adapter_dir_uri, ADAPTER_META))
    meta.update(extra_metadata or {})
    current = storage.read_json_or(latest_uri(workspace, subject_id))
    if current:  # idempotent: registering the same weights again keeps the current version
        current_meta = storage.read_json_or(join(current["uri"], ADAPTER_META), {})
        if current_meta.get("weights_sha256") == meta.get("weights_sha256") and all(
            current_meta.get(k) == v for k, v in (extra_metadata or {}).items()
        ):
            return current
    existing = [n.rstrip("/") for n in storage.list(base) if n.startswith("v") and n.endswith("/")]
    numbers = [int(n[1:]) for n in existing if n[1:].isdigit()]
    version_no = max(numbers, default=0) + 1
    while True:  # claim the version folder; a concurrent registrar gets the next number
        version = f"v{version_no:04d}"
        claim = join(base, version, "CLAIM")
        if storage.write_bytes(claim, b"", if_absent=True):
            break
        version_no += 1
    target = version_uri(workspace, subject_id, version)
    meta["subject_id"] = subject_id
    meta["version"] = version
    weights = storage.read_bytes(join(adapter_dir_uri, ADAPTER_WEIGHTS))
    storage.write_bytes(join(target, ADAPTER_WEIGHTS), weights)
    storage.write_json(join(target, ADAPTER_META), meta)
    record = {
        "subject_id": subject_id,
        "version": version,
        "uri": target,
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(latest_uri(workspace, subject_id), record)  # the atomic pointer move
    return record


def latest_version(storage: Storage, workspace: str, subject_id: str) -> dict[str, Any]:
    """The ``latest`` record of a subject; raises NotFound for an unknown subject."""
    try:
        return storage.read_json(latest_uri(workspace, subject_id))
    except NotFound:
        raise NotFound(f"subject {subject_id!r} has no registered adapter") from None


def list_subjects(storage: Storage, workspace: str) -> dict[str, dict[str, Any]]:
    """``{subject_id: {"latest": record, "versions": [...], "metadata": adapter.json}}``."""
    out: dict[str, dict[str, Any]] = {}
    root = join(workspace, "subjects")
    for name in storage.list(root):
        sid = name.rstrip("/")
        if not name.endswith("/"):
            continue
        try:
            check_safe_id(sid)
            latest = latest_version(storage, workspace, sid)
        except (ValueError, NotFound):
            continue
        versions = sorted(
            n.rstrip("/") for n in storage.list(join(root, sid)) if n.startswith("v") and n.endswith("/")
        )
        meta = storage.read_json_or(join(latest["uri"], ADAPTER_META), {})
        out[sid] = {"latest": latest, "versions": versions, "metadata": meta}
    return out
