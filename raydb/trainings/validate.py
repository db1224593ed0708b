"""Checking a ``POST /v1/trainings`` submission before anything is written (no Ray, no HTTP).

``validate_submission`` takes the form's text fields and its photos and returns the training's
validated config, or raises :class:`raydb.errors.RequestError` naming the field (the HTTP layer
answers 422, 413 for :class:`TooLarge`, 403 for :class:`Forbidden`). In order:

1. fields: only ``subject_id``, ``instance_prompt``, ``class_prompt``, ``overrides``,
   ``photo_uris``; ids by the safe-id rule, prompts non-empty and within ``serve.max_prompt_chars``;
2. overrides: a JSON object of dotted config keys, each in ``service.allowed_overrides``
   (unknown keys and keys outside the list are both refused), each value strictly of its field's
   type and within its bounds (:func:`raydb.config.check_override`: ``"1000000000"`` or ``1e9`` is
   not an integer); ``tune: true`` switches on the operator's ``service.tune`` search (named after
   the training, so each training searches afresh, and run ``service.max_tune_gpus`` GPUs' worth
   of trials at a time);
3. photos: 1..``service.max_photos`` files, uploaded and named by ``s3://`` URI together (the
   URIs' policy, listing and reads: :mod:`raydb.trainings.photo_uris`), each at most
   ``service.max_photo_bytes`` and ``service.max_photo_pixels`` (read from the header, before
   decoding: a decompression bomb is refused without being decompressed), then decoded by the
   ingestion rules themselves (:func:`raydb.data.ingest.load_images` on a private temporary
   folder), so a photo is accepted exactly when ``raydb train`` would accept the same file;
4. the whole training config (the ingress's config with this subject and the overrides), validated
   like any config file, then held to the operator's maxima (:func:`over_limits`:
   steps, resolution, LoRA rank, trials) and its ``train.resolution`` to the base model's family
   (FLUX.1: multiples of 16, the family read from the model's config files without loading it) —
   all before the first photo is read or decoded, so an oversized resolution never reaches the
   decoder.

Steps 3 and 4 run in the order 1, 2, 4, 3: the cheap checks refuse a bad request first.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from raydb.config import (
    ConfigError,
    RaydbConfig,
    ServiceConfig,
    apply_overrides,
    check_override,
    is_config_key,
    load_config,
)
from raydb.errors import Forbidden, RequestError, TooLarge
from raydb.ids import check_safe_id
from raydb.storage import Storage
from raydb.trainings.photo_uris import parse_photo_uris, read_photo_uris

__all__ = ["FIELDS", "TooLarge", "Forbidden", "Submission", "validate_submission", "photo_names",
           "check_photos", "override_fields"]

FIELDS = ("subject_id", "instance_prompt", "class_prompt", "overrides", "photo_uris")


@dataclass
class Submission:
    """A checked training: its config (as a dict), the photos under their stored names (uploads
    first, then those read from ``photo_uris``, the field's URIs as given)."""

    training_id: str
    subject_id: str
    config: dict[str, Any]
    photos: list[tuple[str, bytes]]
    overrides: dict[str, Any]
    photo_uris: list[str]


def photo_names(filenames: list[str]) -> list[str]:
    """Stored names: ``photo-NN-<client name reduced to [A-Za-z0-9._-]>`` (client names are untrusted
    paths, and two may be equal); the name stays recognisable in error messages and keeps its suffix,
    which the ingestion rules check."""
    out = []
    for i, name in enumerate(filenames):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", PurePath(name or "").name).lstrip(".")[-48:] or "unnamed"
        out.append(f"photo-{i:02d}-{base}")
    return out


def _text(fields: dict[str, str], name: str, limit: int) -> str:
    value = fields.get(name)
    if value is None or not value.strip():
        raise RequestError(name, "required")
    if len(value) > limit:
        raise RequestError(name, f"at most {limit} characters, got {len(value)}")
    return value


def _overrides(raw: str | None, cfg: RaydbConfig) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError:
        raise RequestError("overrides", "must be a JSON object of config keys") from None
    if not isinstance(overrides, dict):
        raise RequestError("overrides", "must be a JSON object of config keys")
    allowed = set(cfg.service.allowed_overrides)
    for key, value in overrides.items():
        if key != "tune" and not is_config_key(key):
            raise RequestError("overrides", f"unknown key {key!r}")
        if key not in allowed:
            raise RequestError("overrides", f"{key!r} may not be overridden (allowed: "
                                            f"{', '.join(sorted(allowed)) or 'none'})")
        if key == "tune":
            if not isinstance(value, bool):
                raise RequestError("overrides", "'tune' must be true or false")
            continue
        try:
            check_override(key, value)
        except ConfigError as exc:
            raise RequestError("overrides", str(exc)) from None
    return overrides


def _check_photo_limits(photos: list[tuple[str, bytes]], cfg: RaydbConfig, field: str) -> None:
    """Bytes and pixels of each ``(name for messages, bytes)``."""
    from PIL import Image, UnidentifiedImageError

    sc = cfg.service
    for name, data in photos:
        if not data:
            raise RequestError(field, f"{name}: empty file")
        if len(data) > sc.max_photo_bytes:
            raise TooLarge(field, f"{name}: {len(data)} bytes, at most {sc.max_photo_bytes}")
        try:  # the header only: width and height are known before a single pixel is decoded
            with Image.open(io.BytesIO(data), formats=("JPEG", "PNG", "WEBP")) as probe:
                width, height = probe.size
        except Image.DecompressionBombError:
            raise RequestError(field, f"{name}: too many pixels (a decompression bomb?)") from None
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # not an image we decode: the ingestion rules below name the problem
        if width * height > sc.max_photo_pixels:
            raise RequestError(field, f"{name}: {width}x{height} is {width * height} pixels, "
                                      f"at most {sc.max_photo_pixels}")


def _check_photos_decode(photos: list[tuple[str, str, bytes]], cfg: RaydbConfig, field: str) -> None:
    """The ingestion rules over ``(stored name, name for messages, bytes)`` on a private temporary
    folder (deleted; nothing reaches the workspace)."""
    from raydb.data.ingest import IngestError, load_images

    if not photos:
        return
    label = {stored: shown for stored, shown, _ in photos}
    with tempfile.TemporaryDirectory(prefix="raydb-upload-") as tmp:
        for name, _, data in photos:
            (Path(tmp) / name).write_bytes(data)
        try:
            load_images(tmp, cfg.train.resolution, center_crop=cfg.train.center_crop, field=field)
        except IngestError as exc:
            problems = "; ".join(f"{label.get(name, name)}: {why}"
                                 for name, why in sorted(exc.problems.items()))
            raise RequestError(field, problems) from None


def _check_family(cfg: RaydbConfig, storage: Storage) -> None:
    """A resolution the base model's family cannot train at is refused now, not by the job."""
    from raydb.models.components import configured_family
    from raydb.models.family import check_resolution

    family = configured_family(cfg.model, storage)
    if family is not None:
        try:
            check_resolution(cfg.train.resolution, family)
        except ValueError as exc:
            raise RequestError("overrides", str(exc)) from None


def over_limits(sc: ServiceConfig, cfg: RaydbConfig) -> list[str]:
    """What in a tenant's (validated, typed) training config ``cfg`` breaks the operator's limits
    ``sc``, one message per field; empty when it is within them. Checked on the typed values, so a
    number sent as a string or as ``1e9`` is held to the same limit as the integer."""
    rank = min(sc.max_lora_rank, cfg.serve.max_lora_rank)
    checks = [("train.max_steps", cfg.train.max_steps, sc.max_train_steps, "service.max_train_steps"),
              ("train.resolution", cfg.train.resolution, sc.max_resolution, "service.max_resolution"),
              ("lora.rank", cfg.lora.rank, rank, "service.max_lora_rank" if rank == sc.max_lora_rank
               else "serve.max_lora_rank")]
    out = [f"{key}: at most {most} ({limit}), got {value}" for key, value, most, limit in checks
           if value > most]
    if cfg.tune is not None and cfg.tune.planned_trials > sc.max_tune_trials:
        out.append(f"tune: {cfg.tune.planned_trials} trials, at most {sc.max_tune_trials} "
                   "(service.max_tune_trials)")
    return out


def validate_submission(
    fields: dict[str, str], uploads: list[tuple[str, bytes]], cfg: RaydbConfig, *, tenant: str,
    training_id: str, photos_uri: str, storage: Storage,
) -> Submission:
    """The checks of the module docstring; ``uploads`` are (client file name, bytes) pairs;
    ``storage`` reads ``photo_uris`` (the service's own)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], "unknown field (expected: photos, " + ", ".join(FIELDS) + ")")
    limit = cfg.serve.max_prompt_chars
    subject_id = _text(fields, "subject_id", 64)
    try:
        check_safe_id(subject_id)
    except ValueError as exc:
        raise RequestError("subject_id", str(exc)) from None
    instance_prompt = _text(fields, "instance_prompt", limit)
    class_prompt = _text(fields, "class_prompt", limit)
    overrides = _overrides(fields.get("overrides"), cfg)
    tree = cfg.to_dict()
    tree["subject"] = {"id": subject_id, "tenant": tenant, "instance_data": photos_uri,
                       "instance_prompt": instance_prompt, "class_prompt": class_prompt}
    # a search of its own per training (tenants/<tenant>/tune/<subject>/<training id>/): under the
    # operator's name a second training of the subject would restore the first one's finished search
    tree["tune"] = None
    if overrides.get("tune"):
        sc = cfg.service
        if cfg.cluster.num_workers > sc.max_tune_gpus:
            raise RequestError("overrides", f"tune: a trial holds cluster.num_workers = "
                                            f"{cfg.cluster.num_workers} GPUs, more than "
                                            f"service.max_tune_gpus ({sc.max_tune_gpus})")
        tree["tune"] = sc.tune.model_dump(mode="json") | {
            "name": training_id, "max_concurrent_trials": sc.tune_concurrency(cfg.cluster.num_workers)}
    try:
        trained = load_config(data=apply_overrides(
            tree, [f"{k}={json.dumps(v)}" for k, v in overrides.items() if k != "tune"]))
    except ConfigError as exc:
        raise RequestError("overrides", str(exc).replace("\n", " ")) from None
    over = over_limits(cfg.service, trained)
    if over:  # the typed values: a number sent as a string or 1e9 never got this far
        raise RequestError("overrides", "; ".join(over))
    _check_family(trained, storage)
    # photos last: the cheap checks above refuse a bad request before any S3 read
    uris = parse_photo_uris(fields.get("photo_uris"))
    sc = cfg.service
    if not uploads and not uris:
        raise RequestError("photos", "upload at least one photo (multipart field 'photos') or name them "
                                     "in 'photo_uris'")
    if len(uploads) > sc.max_photos:
        raise RequestError("photos", f"at most {sc.max_photos} photos, got {len(uploads)}")
    uploaded = list(zip(photo_names([name for name, _ in uploads]), [b for _, b in uploads], strict=True))
    _check_photo_limits(uploaded, cfg, "photos")
    fetched = read_photo_uris(uris, storage, sc, tenant, uploaded=len(uploads))
    _check_photo_limits(fetched, cfg, "photo_uris")
    stored = photo_names([name for name, _ in uploads] + [uri for uri, _ in fetched])[len(uploads):]
    _check_photos_decode([(name, name, b) for name, b in uploaded], trained, "photos")
    _check_photos_decode([(name, uri, b) for name, (uri, b) in zip(stored, fetched, strict=True)], trained,
                         "photo_uris")
    photos = uploaded + [(name, b) for name, (_, b) in zip(stored, fetched, strict=True)]
    return Submission(training_id, subject_id, trained.to_dict(), photos, overrides, uris)


def check_photos(uploads: list[tuple[str, bytes]], cfg: RaydbConfig) -> list[dict[str, Any]]:
    """What :func:`validate_submission` would say about each photo on its own, so a client can show
    every photo's problem before it submits (``POST /v1/photo-checks``): the same byte, pixel and
    ingestion checks, run per file. ``cfg`` is the training's config (``train.resolution`` sets the
    smallest accepted side). One ``{name, ok, error, width, height}`` per upload, in order."""
    from PIL import Image

    out = []
    for (name, data), stored in zip(uploads, photo_names([n for n, _ in uploads]), strict=True):
        row: dict[str, Any] = {"name": name, "ok": True, "error": None, "width": None, "height": None}
        try:
            _check_photo_limits([(name, data)], cfg, "photos")
            _check_photos_decode([(stored, name, data)], cfg, "photos")
        except RequestError as exc:  # TooLarge included
            row |= {"ok": False, "error": exc.message.removeprefix(f"{name}: ")}
        else:
            with Image.open(io.BytesIO(data), formats=("JPEG", "PNG", "WEBP")) as probe:
                row["width"], row["height"] = probe.size
        out.append(row)
    return out


# the operator's maximum for each override :func:`over_limits` bounds (what a form shows as its max)
_OPERATOR_MAXIMA = {
    "train.max_steps": lambda cfg: cfg.service.max_train_steps,
    "train.resolution": lambda cfg: cfg.service.max_resolution,
    "lora.rank": lambda cfg: min(cfg.service.max_lora_rank, cfg.serve.max_lora_rank),
}


def override_fields(cfg: RaydbConfig) -> list[dict[str, Any]]:
    """The overrides a tenant may send (``service.allowed_overrides``) as form fields: ``{key, label,
    type (integer | number | boolean | string), default (the operator's value), minimum,
    exclusive_minimum, maximum, enum (a string field's choices, else None), description}`` from the
    config's own schema, ``train.max_steps``
    capped at the operator's maxima (:func:`over_limits`) — the bounds :func:`validate_submission`
    enforces."""
    schema = RaydbConfig.model_json_schema()
    values = cfg.to_dict()
    out = []
    for key in cfg.service.allowed_overrides:
        if key == "tune":
            out.append({"key": key, "label": "Search prior loss weight x learning rate (Ray Tune)",
                        "type": "boolean", "default": False,
                        "description": "Train several trials and register the best by validation loss."})
            continue
        node, value = schema, values
        for part in key.split("."):
            node = node["properties"][part]
            node = schema["$defs"][node["$ref"].split("/")[-1]] if "$ref" in node else node
            value = value[part]
        row = {"key": key, "label": f"{node.get('title', key)} ({key})", "type": node.get("type", "string"),
               "default": value, "minimum": node.get("minimum"),
               "exclusive_minimum": node.get("exclusiveMinimum"), "maximum": node.get("maximum"),
               "enum": node.get("enum"), "description": node.get("description", "")}
        most = _OPERATOR_MAXIMA.get(key, lambda c: None)(cfg)
        if most is not None:
            row["maximum"] = most if row["maximum"] is None else min(row["maximum"], most)
        out.append(row)
    return out
