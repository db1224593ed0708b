"""Which subjects a tenant may see, read from the registry on every request.

Subject ids are per tenant (:mod:`raydb.registry`): every lookup names ``(tenant, subject id)`` and
reads only that tenant's folder, so another tenant's ``alice`` is never found, listed or loaded —
for this tenant it does not exist, and the answer is exactly a missing subject's
(:class:`SubjectNotFound`, served as 404). With authentication off the ingress passes the serving
config's ``subject.tenant`` (one shared tenant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from raydb.ids import check_safe_id, is_version
from raydb.registry import latest_version, list_subjects, read_metadata
from raydb.storage import NotFound, Storage, StorageError

__all__ = ["SubjectNotFound", "BadAdapterId", "SubjectVersion", "find_subject", "tenant_subjects",
           "base_family", "model_id", "parse_model_id"]

logger = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: its handlers


class SubjectNotFound(LookupError):
    """A subject the caller's tenant has not registered (another tenant's is no different)."""


class BadAdapterId(ValueError):
    """A multiplexed model id that is not ``<tenant>/<subject>@vNNNN`` with safe ids."""


@dataclass(frozen=True)
class SubjectVersion:
    tenant: str
    subject_id: str
    version: str
    uri: str
    metadata: dict[str, Any]


def model_id(tenant: str, subject_id: str, version: str) -> str:
    """The multiplexed model id of a registered adapter version: ``<tenant>/<subject>@<version>``.

    The tenant is part of it because subject ids are per tenant (two tenants' ``alice`` are two
    adapters); keying by version means a newly registered version is loaded fresh, and the old one
    ages out of the replicas' LRU caches.
    """
    return f"{tenant}/{subject_id}@{version}"


def parse_model_id(value: str) -> tuple[str, str, str]:
    """``"t1/alice@v0001"`` -> ``("t1", "alice", "v0001")``; BadAdapterId (a ValueError) for anything
    else (no path tricks: both names are safe ids, which contain neither ``/`` nor ``@``)."""
    name, sep, version = value.partition("@")
    tenant, slash, subject_id = name.partition("/")
    if not sep or not slash or not is_version(version):
        raise BadAdapterId(f"bad adapter id {value!r} (expected <tenant>/<subject>@vNNNN)")
    try:
        return check_safe_id(tenant), check_safe_id(subject_id), version
    except ValueError as exc:
        raise BadAdapterId(f"bad adapter id {value!r}: {exc}") from None


def find_subject(storage: Storage, workspace: str, tenant: str, subject_id: str) -> SubjectVersion:
    """The latest version of ``tenant``'s ``subject_id``.

    Unreadable registry entries are logged and reported as not found (never a 500, never details
    to the client).
    """
    try:
        check_safe_id(subject_id)
        latest = latest_version(storage, workspace, tenant, subject_id)
        meta = read_metadata(storage, latest["uri"])
    except (ValueError, NotFound):
        raise SubjectNotFound(f"unknown subject {subject_id!r}") from None
    except StorageError as exc:
        logger.warning("registry entry of subject %r is unreadable: %s", f"{tenant}/{subject_id}", exc)
        raise SubjectNotFound(f"unknown subject {subject_id!r}") from None
    return SubjectVersion(tenant, subject_id, latest["version"], latest["uri"], meta)


def base_family(meta: dict[str, Any]) -> str | None:
    """The base model's family (``sd``, ``sdxl``; adapters from before SDXL: ``sd``), None when the
    adapter names no base model. Never ``base_model.pretrained``: that is the operator's local path
    or bucket."""
    base = meta.get("base_model")
    return (base.get("family") or "sd") if isinstance(base, dict) and base else None


def tenant_subjects(storage: Storage, workspace: str, tenant: str) -> list[dict[str, Any]]:
    """``GET /v1/subjects`` rows for ``tenant``: id, versions and the adapter's public metadata
    (the base model's family, not where the operator keeps it)."""
    rows = []
    for sid, entry in sorted(list_subjects(storage, workspace, tenant).items()):
        meta = entry["metadata"]
        subject = meta.get("subject") if isinstance(meta.get("subject"), dict) else {}
        rows.append({
            "subject_id": sid,
            "tenant": tenant,
            "latest_version": entry["latest"]["version"],
            "versions": entry["versions"],
            "registered_at": entry["latest"].get("registered_at"),
            "instance_token": subject.get("instance_token"),
            "instance_prompt": subject.get("instance_prompt"),
            "class_prompt": subject.get("class_prompt"),
            "family": base_family(meta),
        })
    return rows
