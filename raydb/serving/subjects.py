"""Which subjects a tenant may see, read from the registry on every request.

A subject id belongs to the tenant that first registered it (the registry's owner record, see
:mod:`raydb.registry`) — not to whoever registered its latest version. A subject owned by another
tenant is reported exactly like a missing one (:class:`SubjectNotFound`, served as 404), so subject
ids of other tenants do not leak. ``tenant=None`` means authentication is off: every subject is
visible. A tenant's listing reads only that tenant's subjects (the registry's per-tenant index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from raydb.ids import check_safe_id, is_version
from raydb.registry import ADAPTER_META, latest_version, list_subjects, subject_owner
from raydb.storage import NotFound, Storage, StorageError, join

__all__ = ["SubjectNotFound", "BadAdapterId", "SubjectVersion", "find_subject", "tenant_subjects",
           "model_id", "parse_model_id"]

logger = logging.getLogger(__name__)



class SubjectNotFound(LookupError):
    """Unknown subject, or one the caller's tenant does not own (deliberately indistinguishable)."""


class BadAdapterId(ValueError):
    """A multiplexed model id that is not ``<subject>@vNNNN`` with a safe subject id."""


@dataclass(frozen=True)
class SubjectVersion:
    subject_id: str
    version: str
    uri: str
    metadata: dict[str, Any]

    @property
    def tenant(self) -> str | None:
        return self.metadata.get("subject", {}).get("tenant")


def model_id(subject_id: str, version: str) -> str:
    """The multiplexed model id of a registered adapter version: ``<subject>@<version>``.

    Keying by version means a newly registered version is loaded fresh, and the old one ages out of
    the replicas' LRU caches.
    """
    return f"{subject_id}@{version}"


def parse_model_id(value: str) -> tuple[str, str]:
    """``"alice@v0001"`` -> ``("alice", "v0001")``; BadAdapterId (a ValueError) for anything else
    (no path tricks)."""
    subject_id, sep, version = value.partition("@")
    if not sep or not is_version(version):
        raise BadAdapterId(f"bad adapter id {value!r} (expected <subject>@vNNNN)")
    try:
        return check_safe_id(subject_id), version
    except ValueError as exc:
        raise BadAdapterId(f"bad adapter id {value!r}: {exc}") from None


def find_subject(storage: Storage, workspace: str, subject_id: str, tenant: str | None) -> SubjectVersion:
    """The latest version of ``subject_id`` if ``tenant`` owns it (any tenant when None).

    Ownership is checked before the subject's versions are read. Unreadable registry entries are
    logged and reported as not found (never a 500, never details to the client).
    """
    try:
        check_safe_id(subject_id)
        owner = subject_owner(storage, workspace, subject_id)
        if owner is None or (tenant is not None and owner != tenant):
            raise SubjectNotFound(f"unknown subject {subject_id!r}")
        latest = latest_version(storage, workspace, subject_id)
        meta = storage.read_json(join(latest["uri"], ADAPTER_META))
    except (ValueError, NotFound):
        raise SubjectNotFound(f"unknown subject {subject_id!r}") from None
    except StorageError as exc:
        logger.warning("registry entry of subject %r is unreadable: %s", subject_id, exc)
        raise SubjectNotFound(f"unknown subject {subject_id!r}") from None
    return SubjectVersion(subject_id, latest["version"], latest["uri"], meta)


def _family(meta: dict[str, Any]) -> str | None:
    """The base model's family (``sd``, ``sdxl``; adapters from before SDXL: ``sd``), None when the
    adapter names no base model. Never ``base_model.pretrained``: that is the operator's local path
    or bucket."""
    base = meta.get("base_model")
    return (base.get("family") or "sd") if isinstance(base, dict) and base else None


def tenant_subjects(storage: Storage, workspace: str, tenant: str | None) -> list[dict[str, Any]]:
    """``GET /v1/subjects`` rows for ``tenant``: id, versions and the adapter's public metadata
    (the base model's family, not where the operator keeps it)."""
    rows = []
    for sid, entry in sorted(list_subjects(storage, workspace, tenant).items()):
        meta = entry["metadata"]
        subject = meta.get("subject", {})
        rows.append({
            "subject_id": sid,
            "tenant": tenant or subject.get("tenant"),
            "latest_version": entry["latest"]["version"],
            "versions": entry["versions"],
            "registered_at": entry["latest"].get("registered_at"),
            "instance_token": subject.get("instance_token"),
            "instance_prompt": subject.get("instance_prompt"),
            "class_prompt": subject.get("class_prompt"),
            "family": _family(meta),
        })
    return rows
