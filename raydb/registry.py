"""The adapter registry: ``<workspace>/subjects/<subject_id>/<version>/`` plus a ``latest`` pointer.

A finished training run (or the best trial of a search) copies its adapter files into a new version
folder, then moves ``subjects/<id>/latest.json`` to it with one atomic write, so a server reading the
registry sees either the old or the new version, never a half-registered one.

Subject ids and tenants use a safe character set — ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`` with no
``..`` — so an id can never name a path outside the registry.
"""

from __future__ import annotations

import re
import time
from typing import Any

from raydb.storage import NotFound, Storage, join

__all__ = [
    "SAFE_ID_PATTERN",
    "check_safe_id",
    "register_adapter",
    "latest_version",
    "list_subjects",
    "subject_uri",
    "ADAPTER_FILES",
]

SAFE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_SAFE_ID = re.compile(SAFE_ID_PATTERN)
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "adapter.json")


def check_safe_id(value: str) -> str:
    """Return ``value`` if it is a safe registry id, else raise ValueError saying why."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty id")
    if ".." in value:
        raise ValueError(f"{value!r} contains '..'")
    if not _SAFE_ID.fullmatch(value):  # not match+$: "$" also accepts a trailing newline
        raise ValueError(
            f"{value!r} is not a safe id: use 1-64 letters, digits, '_', '-', '.', "
            "starting with a letter or digit (no '/' or spaces)"
        )
    return value


def subject_uri(workspace: str, subject_id: str) -> str:
    return join(workspace, "subjects", check_safe_id(subject_id))


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
    meta = storage.read_json(join(adapter_dir_uri, "adapter.json"))
    meta.update(extra_metadata or {})
    current = storage.read_json_or(join(base, "latest.json"))
    if current:  # idempotent: registering the same weights again keeps the current version
        current_meta = storage.read_json_or(join(current["uri"], "adapter.json"), {})
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
    version_uri = join(base, version)
    meta["subject_id"] = subject_id
    meta["version"] = version
    storage.write_bytes(
        join(version_uri, ADAPTER_FILES[0]),
        storage.read_bytes(join(adapter_dir_uri, ADAPTER_FILES[0])),
    )
    storage.write_json(join(version_uri, "adapter.json"), meta)
    record = {
        "subject_id": subject_id,
        "version": version,
        "uri": version_uri,
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(join(base, "latest.json"), record)  # the atomic pointer move
    return record


def latest_version(storage: Storage, workspace: str, subject_id: str) -> dict[str, Any]:
    """The ``latest`` record of a subject; raises NotFound for an unknown subject."""
    try:
        return storage.read_json(join(subject_uri(workspace, subject_id), "latest.json"))
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
        meta = storage.read_json_or(join(latest["uri"], "adapter.json"), {})
        out[sid] = {"latest": latest, "versions": versions, "metadata": meta}
    return out
