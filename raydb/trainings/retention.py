"""Storage accounting for trainings: what a tenant's trainings keep in the workspace (checked against
``service.tenant_quota_bytes`` at every submission), and deleting what has outlived
``service.retention_s``.

A tenant's bytes are its trainings' photos (``service/tenants/<tenant>/trainings/*/photos/``) and its
own folder's runs, searches and pipeline manifests (``tenants/<tenant>/runs``, ``tune``,
``pipeline``), summed from listings (nothing is read). Not counted: the small records of each
training (request, status: a few KiB, kept so ``GET`` answers for ever), registered adapters
(``tenants/<tenant>/subjects``: what the tenant trained for; no route deletes them) and the shared,
content-keyed caches (priors, encoded latents, models), which belong to no tenant. The quota is
checked when a training is submitted, against what the tenant keeps then plus the new photos; a
training admitted under it may still take the tenant over it by what its own run writes.

Once a training ended (succeeded, failed or cancelled, and its job seen to end), its photos and the
run folders it trained in (a search's trials and the search folder) are deleted
``service.retention_s`` later; its records stay, so ``GET`` still answers (with the progress it had)
and the registered adapter stays where it is. So a submit-and-cancel loop is held to the quota at
once and gets its bytes back after the retention time, never more.
"""

from __future__ import annotations

import logging
from typing import Any

from raydb.config import RaydbConfig
from raydb.storage import Storage, StorageError, join
from raydb.trainings.store import QueueEntry, TrainingStore

__all__ = ["tenant_usage", "run_folders", "purge_expired"]

logger = logging.getLogger(__name__)


def tenant_usage(store: TrainingStore, tenant: str) -> int:
    """Bytes the tenant's trainings keep in the workspace (see the module docstring)."""
    from raydb.registry import tenant_uri

    home = tenant_uri(store.workspace, tenant)
    photos = sum(size for name, size in store.storage.sizes(join(store.tenant_uri(tenant), "trainings"))
                 if name.split("/")[1:2] == ["photos"])
    return photos + sum(size for uri in (join(home, "runs"), join(home, "tune"), join(home, "pipeline"))
                        for _, size in store.storage.sizes(uri))


def run_folders(storage: Storage, config: dict[str, Any], status: dict[str, Any]) -> list[str]:
    """The folders a training trained in: its run, or its search's trials and the search itself."""
    if config.get("tune") is None:
        return [status["run_uri"]] if status.get("run_uri") else []
    from raydb.tune import tune_uri
    from raydb.tune.results import trial_runs

    search = tune_uri(RaydbConfig.model_validate(config))
    return [*trial_runs(storage, search), search]


def _purge(store: TrainingStore, entry: QueueEntry, progress: dict[str, Any] | None) -> None:
    from raydb.registry import tenant_uri

    request = store.request(entry.tenant, entry.training_id)
    if request is not None:
        status = store.status(entry.tenant, entry.training_id)
        home = tenant_uri(store.workspace, entry.tenant) + "/"
        for folder in run_folders(store.storage, request["config"], status):
            if not folder.startswith(home) or "/../" in folder:  # only ever the tenant's own folders
                logger.warning("training %s: not deleting %s (outside %s)", entry.training_id, folder, home)
                continue
            store.storage.delete(folder, recursive=True)
        store.storage.delete(store.photos_uri(entry.tenant, entry.training_id), recursive=True)
    store.purged(entry, progress)


def purge_expired(store: TrainingStore, cfg: RaydbConfig, progress_of: Any = None) -> list[str]:
    """Delete the photos and runs of every training that ended more than ``service.retention_s``
    ago; returns their ids. ``progress_of(tenant, id)`` gives the progress to keep in the record
    (it lives in the run folder, which goes). A failure is logged and retried on the next pass."""
    done = []
    for entry in store.expired(cfg.service.retention_s):
        try:
            progress = progress_of(entry.tenant, entry.training_id) if progress_of else None
            _purge(store, entry, progress)
            done.append(entry.training_id)
        except (StorageError, ValueError, KeyError) as exc:
            logger.warning("training %s: could not delete its photos and runs yet: %s",
                           entry.training_id, exc)
    return done
