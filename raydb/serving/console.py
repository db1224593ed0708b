"""The web console on the ingress: ``/ui`` and the ``/v1`` routes it needs beyond generation and
trainings (docs/console.md).

``router`` is included in the ingress's FastAPI app; the ingress replica builds one
:class:`ConsoleEndpoint` (its config, storage, tenant check and image workers — the very ones
``/v1/trainings`` uses) as its ``console`` attribute, where the routes find it through Serve's
replica context, as ``/v1/trainings`` finds its endpoint. Like every route of the app, these pass
the ingress's gate first (:mod:`raydb.serving.gate`: the tenant's ``api`` limits, ``upload`` for the
photo checks; the body's byte cap and deadline; an audit line), so the console adds no capacity of
its own.

- ``GET /ui`` redirects to ``ui/``; ``GET /ui/<file>`` serves the console's static files
  (:mod:`raydb.console`). They hold no data, so they need no key. Every answer under ``/ui`` carries
  :data:`SECURITY_HEADERS` — a Content-Security-Policy that allows only this origin's own scripts,
  styles, API calls and ``blob:`` images: no inline script, no eval, no other origin, no framing, no
  form posts. One place sets them, :class:`ConsoleHeadersMiddleware`, outside the gate, so the
  routes' answers, FastAPI's own (404, 405) and the gate's refusals (429, 503, 413) all have them.
  Off (404) when ``serve.console`` is false.
- ``GET /v1/limits``: the caller's tenant and what it may ask (generation limits, photo limits,
  the training overrides the operator allows with their bounds).
- ``GET /v1/subjects/{id}[?version=vNNNN]``: one version in detail; ``GET
  /v1/subjects/{id}/versions/{version}/files/{name}``: its weights (diffusers, kohya where exported)
  and pictures (:mod:`raydb.serving.subject_files`).
- ``POST /v1/photo-checks``: the training upload's photo checks, per photo, nothing stored (on the
  ingress's image workers, as a submission's).

Every ``/v1`` route here checks the key first (401 before anything is read), then ownership
(another tenant's subject is a 404 like a missing one); refusals get their status from
:mod:`raydb.serving.status`. None serves data without a key.
"""

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raydb.config import RaydbConfig
from raydb.console import asset
from raydb.data.ingest import IMAGE_SUFFIXES, min_image_side
from raydb.errors import Refused, RequestError
from raydb.serving.audit import note
from raydb.serving.gate import route_path
from raydb.serving.limits import ImageWorkers
from raydb.serving.status import http_exception
from raydb.serving.subject_files import subject_detail, subject_file
from raydb.serving.subjects import SubjectNotFound
from raydb.serving.training_routes import read_form
from raydb.storage import Storage
from raydb.trainings.validate import check_photos, override_fields

__all__ = ["router", "ConsoleEndpoint", "ConsoleHeadersMiddleware", "CONTENT_SECURITY_POLICY",
           "SECURITY_HEADERS"]

router = APIRouter()

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",  # module files from /ui only: no inline script, no eval
    "style-src 'self'",
    "img-src 'self' blob:",  # pictures and generated images arrive as blobs fetched with the key
    "connect-src 'self'",  # the API on this origin, nothing else
    "base-uri 'none'",
    "form-action 'none'",  # forms are handled by script; a stray submit goes nowhere
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


class ConsoleEndpoint:
    """What the routes need from the ingress replica: config, storage, the tenant check and the
    image workers (shared with ``/v1/trainings``: photo checks take no threads of their own)."""

    def __init__(self, cfg: RaydbConfig, storage: Storage, tenant_of: Callable[[Request], str | None],
                 images: ImageWorkers) -> None:
        self.cfg, self.storage, self.tenant_of, self.images = cfg, storage, tenant_of, images


def _endpoint(request: Request) -> ConsoleEndpoint:
    """``app.state.raydb_console`` on a plain FastAPI app, else the Serve ingress replica's ``console``."""
    endpoint: ConsoleEndpoint | None = getattr(request.app.state, "raydb_console", None)
    if endpoint is None:
        from ray import serve

        endpoint = serve.get_replica_context().servable_object.console
    return endpoint


def _caller(request: Request) -> tuple[ConsoleEndpoint, str]:
    """The endpoint and the caller's tenant: 401 without a valid key, before anything is read (the
    tenant's limits were applied by the gate before the route ran)."""
    endpoint = _endpoint(request)
    tenant = endpoint.tenant_of(request)
    return endpoint, endpoint.cfg.subject.tenant if tenant is None else tenant  # auth off: one tenant


# -- the console's files ---------------------------------------------------------------------------
def is_console_path(path: str) -> bool:
    """``/ui`` and everything below it (the path below the app's route prefix)."""
    return path == "/ui" or path.startswith("/ui/")


class ConsoleHeadersMiddleware:
    """Puts :data:`SECURITY_HEADERS` on every answer under ``/ui``, whoever wrote it (added after the
    gate's middleware, so it wraps the gate's refusals too).

    An exception that escapes every handler would become Starlette's 500, written by its outermost
    middleware, outside this one and so without the headers. Here it becomes a plain-text 500 with
    them, and is raised on, so the server still logs it (Starlette's middleware sees a response
    already sent and writes none of its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console_path(route_path(scope)):
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if not started:
                error = Response(b"Internal Server Error", status_code=500, media_type="text/plain")
                await error(scope, receive, send_with_headers)
            raise


def _not_found() -> Response:
    return Response(b"Not Found", status_code=404, media_type="text/plain")


@router.get("/ui", include_in_schema=False)
def console_root(request: Request) -> Response:
    if not _endpoint(request).cfg.serve.console_enabled:
        return _not_found()
    return RedirectResponse("ui/", status_code=307)  # relative: right under any serve.route_prefix


@router.get("/ui/{path:path}", include_in_schema=False)
def console_file(path: str, request: Request) -> Response:
    found = asset(path or "index.html") if _endpoint(request).cfg.serve.console_enabled else None
    if found is None:
        return _not_found()
    body, media_type = found
    return Response(body, media_type=media_type)


# -- /v1 routes the console reads -------------------------------------------------------------------
@router.get("/v1/limits")
def limits(request: Request) -> dict[str, Any]:
    endpoint, tenant = _caller(request)
    cfg = endpoint.cfg
    sc, svc = cfg.serve, cfg.service
    return {
        "tenant": tenant, "auth": sc.auth,
        "generate": {"max_inference_steps": sc.max_inference_steps,
                     "default_inference_steps": sc.default_inference_steps, "max_size": sc.max_size,
                     "max_images": sc.max_images, "max_prompt_chars": sc.max_prompt_chars},
        "training": {"max_photos": svc.max_photos, "max_photo_bytes": svc.max_photo_bytes,
                     "max_upload_bytes": svc.max_upload_bytes, "max_photo_pixels": svc.max_photo_pixels,
                     "photo_formats": [s.lstrip(".") for s in IMAGE_SUFFIXES],
                     "resolution": cfg.train.resolution,
                     "min_photo_side": min_image_side(cfg.train.resolution),
                     "max_prompt_chars": sc.max_prompt_chars, "max_train_steps": svc.max_train_steps,
                     "overrides": override_fields(cfg)},
    }


@router.get("/v1/subjects/{subject_id}")
async def subject(subject_id: str, request: Request, version: str | None = None) -> dict[str, Any]:
    endpoint, tenant = _caller(request)
    note(request, subject_id=subject_id, adapter_version=version)
    try:
        return await asyncio.to_thread(subject_detail, endpoint.storage, endpoint.cfg.workspace,
                                       tenant, subject_id, version)
    except SubjectNotFound as exc:
        raise http_exception(exc) from None


@router.get("/v1/subjects/{subject_id}/versions/{version}/files/{name}")
async def subject_download(subject_id: str, version: str, name: str, request: Request) -> Response:
    endpoint, tenant = _caller(request)
    note(request, subject_id=subject_id, adapter_version=version, file=name)
    try:
        data, media_type = await asyncio.to_thread(subject_file, endpoint.storage, endpoint.cfg.workspace,
                                                   tenant, subject_id, version, name)
    except SubjectNotFound as exc:
        raise http_exception(exc) from None
    disposition = "inline" if media_type.startswith("image/") else "attachment"
    return Response(data, media_type=media_type, headers={
        "Content-Disposition": f'{disposition}; filename="{subject_id}-{version}-{name}"',
        "Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"})


@router.post("/v1/photo-checks")
async def photo_checks(request: Request) -> Response:
    """Multipart: ``photos`` (files) and optionally ``resolution`` (the training's, when the operator
    lets tenants override it). ``{"photos": [{name, ok, error, width, height}]}``, in order."""
    endpoint, _ = _caller(request)
    cfg = endpoint.cfg
    fields, uploads = await read_form(request, cfg)
    note(request, photos=len(uploads))
    try:
        checked = _check_config(cfg, fields)
        if not uploads:
            raise RequestError("photos", "send at least one photo (multipart field 'photos')")
        if len(uploads) > cfg.service.max_photos:
            raise RequestError("photos", f"at most {cfg.service.max_photos} photos, got {len(uploads)}")
        # decoding: on the ingress's image workers (503 when they and their queue are full)
        rows = await endpoint.images.run(check_photos, uploads, checked)
    except Refused as exc:
        raise http_exception(exc) from None
    return Response(json.dumps({"photos": rows}), media_type="application/json")


def _check_config(cfg: RaydbConfig, fields: dict[str, str]) -> RaydbConfig:
    """The config the photos are checked against: the operator's, with the training's resolution."""
    unknown = sorted(set(fields) - {"resolution"})
    if unknown:
        raise RequestError(unknown[0], "unknown field (expected: photos, resolution)")
    if "resolution" not in fields:
        return cfg
    if "train.resolution" not in cfg.service.allowed_overrides:
        raise RequestError("resolution", "train.resolution may not be overridden")
    checked = cfg.model_copy(deep=True)
    try:
        checked.train.resolution = int(fields["resolution"])
    except ValueError:
        raise RequestError("resolution", "must be a whole number of pixels") from None
    except ValidationError as exc:
        raise RequestError("resolution", exc.errors()[0]["msg"]) from None
    if checked.train.resolution > cfg.service.max_resolution:  # what a submission would be refused
        raise RequestError("resolution", f"at most {cfg.service.max_resolution} (service.max_resolution)")
    return checked
