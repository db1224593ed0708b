"""``/v1/trainings`` on the ingress: HTTP in, :class:`raydb.service.trainings.TrainingService` calls out.

``router`` is included in the ingress's FastAPI app; the ingress replica builds one
:class:`TrainingsEndpoint` (its config, storage and tenant check) as its ``trainings`` attribute,
where the routes find it through Serve's replica context (``servable_object``). The routes parse
the request — the multipart body is read only after the key was checked and ``Content-Length`` is
within ``service.max_upload_bytes`` — and map the service's refusals to status codes: 401 (key),
403 (a photo URI the tenant may not name), 404 (unknown or another tenant's training), 409
(subject id taken, cancel too late), 413 (too large), 422 (field named), 429 (+ Retry-After).
Blocking work (storage, S3 photo reads, decoding, the Jobs API) runs in a worker thread.
"""

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.datastructures import UploadFile

from raydb.config import RaydbConfig
from raydb.service.errors import Forbidden, TooLarge
from raydb.service.queue import Jobs
from raydb.service.trainings import Refused, TrainingService
from raydb.serving.api import RequestError
from raydb.storage import Storage

__all__ = ["router", "TrainingsEndpoint", "read_form"]

router = APIRouter()


class _LazyJobs:
    """Ray's Jobs API client, made on first use (the ingress starts even while the dashboard is not up)."""

    def __init__(self, address: str | None) -> None:
        self.address, self._jobs = address, None

    def _get(self):
        if self._jobs is None:
            from raydb.service.queue import RayJobs

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

    ``jobs`` defaults to Ray's Jobs API; ``background`` starts the queue thread.
    """

    def __init__(self, cfg: RaydbConfig, storage: Storage, tenant_of: Callable[[Request], str | None],
                 *, jobs: Jobs | None = None, background: bool = True) -> None:
        self.cfg = cfg
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
    except TooLarge as exc:
        raise HTTPException(413, exc.detail()) from None
    except Forbidden as exc:
        raise HTTPException(403, exc.detail()) from None
    except RequestError as exc:
        raise HTTPException(422, exc.detail()) from None
    except Refused as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        raise HTTPException(exc.status, exc.detail, headers=headers) from None


async def read_form(request: Request, cfg: RaydbConfig) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """A multipart upload's ``(fields, [(file name, bytes) of each 'photos' file])`` within the
    service's limits: 411 without Content-Length, 413 over ``service.max_upload_bytes`` (before
    reading), 415 for another body type, 422 for a file outside 'photos' or a field given twice, 400
    for a malformed body."""
    try:
        return await _read_form(request, cfg)
    except HTTPException:
        raise
    except Exception as exc:  # starlette's multipart errors (too many files, malformed body)
        raise HTTPException(400, f"malformed multipart body: {exc}") from None


async def _read_form(request: Request, cfg: RaydbConfig) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    sc = cfg.service
    try:
        length = int(request.headers.get("content-length", ""))
    except ValueError:
        raise HTTPException(411, "Content-Length required") from None
    if length > sc.max_upload_bytes:
        raise HTTPException(413, RequestError("photos", f"upload of {length} bytes, at most "
                                                        f"{sc.max_upload_bytes}").detail())
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "expected multipart/form-data (photos as files, the rest as fields)")
    fields: dict[str, str] = {}
    uploads: list[tuple[str, bytes]] = []
    async with request.form(max_files=sc.max_photos + 1, max_fields=16) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "photos":
                    raise HTTPException(422, RequestError(key, "files go in the 'photos' field").detail())
                data = await value.read(sc.max_photo_bytes + 1)
                uploads.append((value.filename or "", data))
            elif key in fields:
                raise HTTPException(422, RequestError(key, "given twice").detail())
            else:
                fields[key] = value
    return fields, uploads


@router.post("/v1/trainings", status_code=202)
async def create_training(request: Request) -> Response:
    endpoint, tenant = _endpoint(request)
    fields, uploads = await read_form(request, endpoint.cfg)
    view, created = await _call(endpoint.service.submit, tenant, fields, uploads,
                                request.headers.get("idempotency-key"))
    return Response(json.dumps(view), status_code=202 if created else 200, media_type="application/json",
                    headers={"Location": f"/v1/trainings/{view['id']}"})


@router.get("/v1/trainings")
async def list_trainings(request: Request) -> dict[str, Any]:
    endpoint, tenant = _endpoint(request)
    return {"trainings": await _call(endpoint.service.list, tenant)}


@router.get("/v1/trainings/{training_id}")
async def get_training(training_id: str, request: Request) -> dict[str, Any]:
    endpoint, tenant = _endpoint(request)
    await asyncio.to_thread(endpoint.service.pass_queue, if_older_than_s=1.0)
    return await _call(endpoint.service.get, tenant, training_id)


@router.delete("/v1/trainings/{training_id}")
async def cancel_training(training_id: str, request: Request) -> dict[str, Any]:
    endpoint, tenant = _endpoint(request)
    return await _call(endpoint.service.cancel, tenant, training_id)
