"""Registered adapters for serving tests without training each one."""

from __future__ import annotations

from raydb.registry import register_adapter
from raydb.storage import Storage
from raydb.testing import write_random_adapter


def register_random_adapter(storage: Storage, workspace: str, template_subject: str, subject_id: str, *,
                            rank: int, seed: int, alpha: float | None = None,
                            tenant: str = "default") -> dict:
    """Register ``tenant``'s ``subject_id`` with seeded random weights on the same tenant's
    ``template_subject``'s adapter.json (:func:`raydb.testing.write_random_adapter`); returns the
    registry record."""
    folder = write_random_adapter(storage, workspace, template_subject, subject_id, rank=rank, seed=seed,
                                  alpha=alpha, tenant=tenant)
    return register_adapter(storage, workspace, tenant, subject_id, folder)
