"""One registered subject in detail, and its files, for the API (no HTTP, no Ray here).

``GET /v1/subjects`` lists a tenant's subjects; the console (and any client) also wants one version
in full — its base model, LoRA and training settings and final metrics from ``adapter.json`` — and
its files: the weights to download (diffusers, and kohya where exported) and the run's pictures
(``samples.png``: base model vs adapter on the same seeds; ``loss_curve.png``).

Every lookup starts with :func:`raydb.serving.subjects.find_subject`, the same per-tenant lookup as
generation, so another tenant's subject, an unknown one, an unknown version and a file a version
does not have are all :class:`SubjectNotFound` (404) with no difference a caller could probe. A file
is served only by a name from a fixed list (the registry's weights and pictures, the export
formats' files); names from storage are never used to build a path. ``adapter.json`` is passed on
field by field, never whole: it also holds workspace paths (a search's results file), which are not
the tenant's business.
"""

from __future__ import annotations

from typing import Any

from raydb.export import EXPORT_FORMATS
from raydb.ids import is_version
from raydb.registry import (
    ADAPTER_META,
    ADAPTER_PICTURES,
    ADAPTER_WEIGHTS,
    latest_uri,
    latest_version,
    version_uri,
)
from raydb.serving.subjects import SubjectNotFound, base_family, find_subject
from raydb.storage import NotFound, Storage, StorageError, join

__all__ = ["DOWNLOADS", "subject_detail", "subject_file"]

# name -> (media type, weights format or None for a picture)
DOWNLOADS: dict[str, tuple[str, str | None]] = {
    ADAPTER_WEIGHTS: ("application/octet-stream", "diffusers"),
    **{name: ("application/octet-stream", fmt) for fmt, name in EXPORT_FORMATS.items()},
    **{name: ("image/png", None) for name in ADAPTER_PICTURES},
}


def _version(storage: Storage, workspace: str, tenant: str, subject_id: str,
             version: str | None) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(latest record, version, adapter.json)`` of one of the tenant's versions."""
    find_subject(storage, workspace, tenant, subject_id)  # the tenant's own, or SubjectNotFound
    latest = latest_version(storage, workspace, tenant, subject_id)
    version = version or latest["version"]
    if not is_version(version) or version not in latest["versions"]:
        raise SubjectNotFound(f"subject {subject_id!r} has no version {version!r}")
    try:
        meta = storage.read_json(join(version_uri(workspace, tenant, subject_id, version), ADAPTER_META))
    except StorageError:  # NotFound included: a half-written or damaged version is not served
        raise SubjectNotFound(f"subject {subject_id!r} has no version {version!r}") from None
    return latest, version, meta


def subject_detail(storage: Storage, workspace: str, tenant: str, subject_id: str,
                   version: str | None = None) -> dict[str, Any]:
    """``GET /v1/subjects/{id}``: one version (default the latest) of a subject the tenant owns.

    ``{subject_id, version, latest_version, versions: [{version, registered_at}], registered_at,
    base_model: {family, prediction_type}, lora, subject: {instance_prompt,
    class_prompt, instance_token}, training, metrics, tune: {hyperparameters, validation} | None,
    created_at, files: [{name, format, bytes, media_type}]}`` (``format``: ``diffusers`` or an
    export format for weights, None for a picture).
    """
    latest, version, meta = _version(storage, workspace, tenant, subject_id, version)
    record = storage.read_json_or(latest_uri(workspace, tenant, subject_id)) or {}
    registered = {v.get("version"): v.get("registered_at") for v in record.get("versions", [])
                  if isinstance(v, dict)}
    sizes = dict(storage.sizes(version_uri(workspace, tenant, subject_id, version)))
    files = [{"name": name, "format": fmt, "bytes": sizes[name], "media_type": media}
             for name, (media, fmt) in DOWNLOADS.items() if name in sizes and _listed(meta, name)]
    base = meta.get("base_model") or {}
    subject = meta.get("subject") or {}
    tune = meta.get("tune")
    tune = {k: tune.get(k) for k in ("hyperparameters", "validation")} if isinstance(tune, dict) else None
    return {
        "subject_id": subject_id, "version": version, "latest_version": latest["version"],
        "versions": [{"version": v, "registered_at": registered.get(v)} for v in latest["versions"]],
        "registered_at": registered.get(version),
        # the family, never base_model.pretrained: that is where the operator keeps the model
        "base_model": {"family": base_family(meta), "prediction_type": base.get("prediction_type")},
        "lora": meta.get("lora"),
        "subject": {k: subject.get(k) for k in ("instance_prompt", "class_prompt", "instance_token")},
        "training": meta.get("training"),
        "metrics": meta.get("metrics"),
        "tune": tune,
        "created_at": meta.get("created_at"),
        "files": files,
    }


def _listed(meta: dict[str, Any], name: str) -> bool:
    """An export's file counts only once adapter.json lists it (the export writes that last)."""
    fmt = DOWNLOADS[name][1]
    return fmt in (None, "diffusers") or fmt in (meta.get("exports") or {})


def subject_file(storage: Storage, workspace: str, tenant: str, subject_id: str, version: str,
                 name: str) -> tuple[bytes, str]:
    """``(bytes, media type)`` of one file of a version the tenant owns; SubjectNotFound otherwise."""
    if name not in DOWNLOADS:
        raise SubjectNotFound(f"no file {name!r} (files: {', '.join(DOWNLOADS)})")
    _, version, meta = _version(storage, workspace, tenant, subject_id, version)
    if not _listed(meta, name):
        raise SubjectNotFound(f"subject {subject_id!r} {version} has no {DOWNLOADS[name][1]} export")
    try:
        data = storage.read_bytes(join(version_uri(workspace, tenant, subject_id, version), name))
    except NotFound:
        raise SubjectNotFound(f"subject {subject_id!r} {version} has no {name}") from None
    return data, DOWNLOADS[name][0]
