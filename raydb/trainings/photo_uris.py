"""``s3://`` photos in ``POST /v1/trainings`` (the ``photo_uris`` field): which URIs a tenant may
name, and reading them under the upload limits, before anything is written.

The operator opts in with ``service.photo_uri_prefixes``: folders (``s3://bucket/key/``) a tenant
may name, ``{tenant}`` standing for the caller's tenant (``s3://uploads/{tenant}/``). Empty (the
default), the field is refused (403). A URI names one object, or a folder (a trailing ``/``, or a
key with objects under it) that stands for every file under it, hidden files (``.DS_Store``) left
out exactly as ingestion reads a folder.

Segments, not normalising: a URI (or prefix) that is not a plain S3 URI — a ``.``, ``..`` or empty
segment, a backslash or a control character (:func:`raydb.storage.s3_segments` says why) — is
refused outright, and so is every object a folder lists (S3 keys are literal: a folder may hold an
object named ``t1/x/../../t2/secret.png``, which a normalising proxy would read as ``t2``'s); then,
bucket for bucket, the prefix's segments must be the first segments of the URI's key — on key
boundaries, so ``uploads/t1/`` does not admit ``uploads/t10/``. The URI is split
by storage's only S3 parser, the one that reads it, so ``?`` and ``#`` are key characters both when
the URI is checked and when it is read (``t1/a?b.png`` is that object, never ``t1/a``).

Reading uses the service's own :class:`raydb.storage.Storage` (its credentials and endpoint).
Every URI is listed first — the number of photos and each object's size come from the listing,
checked against ``service.max_photos``, ``service.max_photo_bytes`` and (in total)
``service.max_upload_bytes`` before a byte is read — and each read is a ranged GET of at most
``service.max_photo_bytes + 1`` bytes, so an object that grew since it was listed cannot make the
ingress download more. Errors name the field and the URI; a storage error keeps only its first
line (the error code and message, never credentials).
"""

from __future__ import annotations

import json

from raydb.config import ServiceConfig
from raydb.errors import Forbidden, RequestError, TooLarge
from raydb.storage import NotFound, Storage, StorageError, s3_segments

__all__ = ["FIELD", "parse_photo_uris", "check_allowed", "read_photo_uris"]

FIELD = "photo_uris"


def parse_photo_uris(raw: str | None) -> list[str]:
    """The field's URIs: one ``s3://`` URI, or a JSON list of them (``[]``/absent: none)."""
    if raw is None or not raw.strip():
        return []
    text = raw.strip()
    if not text.startswith("["):
        return [text]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(FIELD, "must be an s3:// URI or a JSON list of s3:// URIs")
    return value


def check_allowed(uri: str, prefixes: list[str], tenant: str) -> None:
    """Forbidden unless ``uri`` lies under one of ``prefixes`` (``{tenant}`` -> ``tenant``)."""
    if not prefixes:
        raise Forbidden(FIELD, "this service does not read photos by URI (service.photo_uri_prefixes "
                               "is empty): upload them as 'photos'")
    try:
        bucket, segments = s3_segments(uri)
    except ValueError as exc:
        raise RequestError(FIELD, f"{uri!r}: {exc}") from None
    for prefix in prefixes:
        try:  # the config checked each prefix with a probe tenant; this one's name must fit too
            allowed_bucket, allowed = s3_segments(prefix.replace("{tenant}", tenant))
        except ValueError:
            continue
        if bucket == allowed_bucket and segments[:len(allowed)] == allowed:
            return
    raise Forbidden(FIELD, f"{uri}: outside the folders this tenant may name "
                           f"({', '.join(p.replace('{tenant}', tenant) for p in prefixes)})")


def _files(storage: Storage, uri: str) -> list[tuple[str, int | None]]:
    """``(object URI, size or None when unknown)`` of the photos ``uri`` names."""
    under = storage.sizes(uri)  # a folder's files (hidden ones left out); [] for an object
    if uri.endswith("/") or under:
        if not under:
            raise NotFound(f"nothing found under {uri}")
        return [(uri.rstrip("/") + "/" + name, size) for name, size in under]
    return [(uri, None)]  # an object (or nothing: its read says so)


def read_photo_uris(uris: list[str], storage: Storage, sc: ServiceConfig, tenant: str,
                    *, uploaded: int = 0) -> list[tuple[str, bytes]]:
    """``(object URI, bytes)`` of every photo ``uris`` name, in order (each object once), after the
    checks of the module docstring; ``uploaded`` photos came with the request and count too."""
    if not uris:
        return []
    if len(uris) > sc.max_photos:
        raise RequestError(FIELD, f"at most {sc.max_photos} URIs, got {len(uris)}")
    for uri in uris:
        check_allowed(uri, sc.photo_uri_prefixes, tenant)
    files: dict[str, int | None] = {}
    for uri in uris:
        try:
            for name, size in _files(storage, uri):
                if name != uri:  # listed under a folder: held to the same rule as a URI given
                    check_allowed(name, sc.photo_uri_prefixes, tenant)
                files.setdefault(name, size)
        except NotFound:
            raise RequestError(FIELD, f"{uri}: no such object or folder") from None
        except StorageError as exc:
            raise RequestError(FIELD, f"{uri}: {exc}") from None
    if uploaded + len(files) > sc.max_photos:
        raise RequestError(FIELD, f"at most {sc.max_photos} photos, got {uploaded + len(files)} "
                                  f"({uploaded} uploaded, {len(files)} named by URI)")
    for name, size in files.items():
        if size is not None and size > sc.max_photo_bytes:
            raise TooLarge(FIELD, f"{name}: {size} bytes, at most {sc.max_photo_bytes}")
    total = sum(size or 0 for size in files.values())
    if total > sc.max_upload_bytes:
        raise TooLarge(FIELD, f"the photos named by URI hold {total} bytes, at most {sc.max_upload_bytes}")
    out = []
    for name in files:
        try:
            data = storage.read_bounded(name, sc.max_photo_bytes + 1)
        except NotFound:
            raise RequestError(FIELD, f"{name}: no such object or folder") from None
        except StorageError as exc:
            raise RequestError(FIELD, f"{name}: {exc}") from None
        if len(data) > sc.max_photo_bytes:
            raise TooLarge(FIELD, f"{name}: over {sc.max_photo_bytes} bytes")
        out.append((name, data))
        total += len(data) - (files[name] or 0)  # objects of unknown size count as read
        if total > sc.max_upload_bytes:
            raise TooLarge(FIELD, f"the photos named by URI hold over {sc.max_upload_bytes} bytes")
    return out
