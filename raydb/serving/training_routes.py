"""``/v1/trainings`` on the ingress: HTTP in, :class:`raydb.trainings.service.TrainingService` calls out.

``router`` is included in the ingress's FastAPI app; the ingress replica builds one
:class:`TrainingsEndpoint` (its config, storage and tenant check) as its ``trainings`` attribute,
where the routes find it through Serve's replica context (``servable_object``). The routes parse
the request — the multipart body is read only after the key was checked; the ingress's gate
(:mod:`raydb.serving.gate`) holds it to the tenant's limits, ``service.max_upload_bytes`` and
``serve.body_timeout_s`` — and answer the service's refusals with the status that
:mod:`raydb.serving.status` gives them: 403 (a photo URI the tenant may not name), 404 (unknown or
another tenant's training), 409 (cancel too late), 413 (too large, or over the tenant's storage
quota), 422 (field named), 429 (+ Retry-After: the queue, or the tenant's share of it, is full),
503 (+ Retry-After: the queue's lease is busy); 401 (key), 415 and 400 (not a multipart body) are
the protocol's. A submission (photo decoding and preparation: seconds of CPU) runs on the ingress's
image workers (:class:`raydb.serving.limits.ImageWorkers`, 503 when they and their queue are full);
other blocking work (storage, S3 photo reads, the Jobs API) in a worker thread.
"""

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.datastructures import UploadFile

from raydb.config import RaydbConfig
from raydb.errors import Refused, RequestError
from raydb.serving.audit import note
from raydb.serving.limits import BodyTimedOut, BodyTooLarge, ImageWorkers
from raydb.serving.status import http_exception
from raydb.storage import Storage
from raydb.trainings.queue import Jobs
from raydb.trainings.service import TrainingService

__all__ = ["router", "TrainingsEndpoint", "read_form"]

router = APIRouter()


class _LazyJobs:
    """Ray's Jobs API client, made on first use (the ingress starts even while the dashboard is not up)."""

    def __init__(self, address: str | None) -> None:
        self.address, self._jobs = address, None

    def _get(self):
        if self._jobs is None:
            from raydb.trainings.queue import RayJobs

            self._jobs = RayJobs(self.address)
        return self._jobs

    def submit(self, submission_id: str, entrypoint: str) -> None:
        self._get().submit(submission_id, entrypoint)

    def status(self, submission_id: str) -> tuple[str, str]:
        return self._get().status(submission_id)

    def stop(self, submission_id: str) -> None:
        self._get().stop(submission_id)


class TrainingsEndpoint:
    """What the routes need from the ingress replica: the service and the caller's tenant.

    ``jobs`` defaults to Ray's Jobs API; ``background`` starts the queue thread; ``images``: the
    ingress's image workers (default: a pool of ``serve.image_workers`` of its own).
    """

    def __init__(self, cfg: RaydbConfig, storage: Storage, tenant_of: Callable[[Request], str | None],
                 *, jobs: Jobs | None = None, background: bool = True,
                 images: ImageWorkers | None = None) -> None:
        self.cfg = cfg
        self.images = images or ImageWorkers(cfg.serve.image_workers, cfg.serve.image_queue)
        self.service = TrainingService(cfg, storage, jobs or _LazyJobs(cfg.service.jobs_address))
        self._tenant_of = tenant_of
        if background:
            self.service.start_background()

    def tenant(self, request: Request) -> str:
        """The caller's tenant; with auth off, ``subject.tenant`` of the config (one shared tenant)."""
        return self._tenant_of(request) or self.cfg.subject.tenant


def _endpoint(request: Request) -> tuple[TrainingsEndpoint, str]:
    """The endpoint of this app: ``app.state.raydb_trainings`` on a plain FastAPI app, else the
    Serve ingress replica's ``trainings``."""
    endpoint: TrainingsEndpoint | None = getattr(request.app.state, "raydb_trainings", None)
    if endpoint is None:
        from ray import serve

        endpoint = serve.get_replica_context().servable_object.trainings
    return endpoint, endpoint.tenant(request)  # auth first: unauthenticated callers learn nothing


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except Refused as exc:
        raise http_exception(exc) from None


async def read_form(request: Request, cfg: RaydbConfig) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """A multipart upload's ``(fields, [(file name, bytes) of each 'photos' file])``: 415 for another
    body type, 422 for a file outside 'photos' or a field given twice, 400 for a malformed body (the
    body's byte cap and deadline are the gate's: raydb.serving.gate)."""
    try:
        return await _read_form(request, cfg)
    except (HTTPException, BodyTooLarge, BodyTimedOut):  # the latter two: the gate answers them
        raise
    except Refused as exc:
        raise http_exception(exc) from None
    except Exception as exc:  # starlette's multipart errors (too many files, malformed body)
        raise HTTPException(400, f"malformed multipart body: {exc}") from None


async def _read_form(request: Request, cfg: RaydbConfig) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    sc = cfg.service
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "expected multipart/form-data (photos as files, the rest as fields)")
    fields: dict[str, str] = {}
    uploads: list[tuple[str, bytes]] = []
    async with request.form(max_files=sc.max_photos + 1, max_fields=16) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "photos":
                    raise RequestError(key, "files go in the 'photos' field")
                data = await value.read(sc.max_photo_bytes + 1)
                uploads.append((value.filename or "", data))
            elif key in fields:
                raise RequestError(key, "given twice")
            else:
                fields[key] = value
    return fields, uploads


@router.post("/v1/trainings", status_code=202)
async def create_training(request: Request) -> Response:
    endpoint, tenant = _endpoint(request)
    fields, uploads = await read_form(request, endpoint.cfg)
    note(request, subject_id=fields.get("subject_id"), photos=len(uploads))
    try:  # decoding and preparing the photos: on the image workers, never on the event loop
        view, created = await endpoint.images.run(endpoint.service.submit, tenant, fields, uploads,
                                                  request.headers.get("idempotency-key"))
    except Refused as exc:
        raise http_exception(exc) from None
    note(request, training_id=view["id"])
    return Response(json.dumps(view), status_code=202 if created else 200, media_type="application/json",
                    headers={"Location": f"/v1/trainings/{view['id']}"})


@router.get("/v1/trainings")
async def list_trainings(request: Request, limit: int | None = None,
                         after: str | None = None) -> dict[str, Any]:
    """One page of the caller's trainings, oldest first: ``{"trainings": [...], "next": cursor}``;
    ``?after=<next>`` gives the following page, ``?limit=`` its size (at most
    ``service.max_page_size``, the default)."""
    endpoint, tenant = _endpoint(request)
    return await _call(lambda: endpoint.service.list(tenant, after=after, limit=limit))


@router.get("/v1/trainings/{training_id}")
async def get_training(training_id: str, request: Request) -> dict[str, Any]:
    endpoint, tenant = _endpoint(request)
    await asyncio.to_thread(endpoint.service.pass_queue, if_older_than_s=1.0)
    return await _call(endpoint.service.get, tenant, training_id)


@router.delete("/v1/trainings/{training_id}")
async def cancel_training(training_id: str, request: Request) -> dict[str, Any]:
    endpoint, tenant = _endpoint(request)
    return await _call(endpoint.service.cancel, tenant, training_id)
