"""What the ingress records about each HTTP request: its metrics, its id, and its log context.

:class:`ObservedRequests` is an ASGI middleware around the ingress app, outside its gate
(:mod:`raydb.serving.gate`), so it sees the gate's refusals too (one line in the ingress wires it).
For every request it

- takes Serve's request id (the ``X-Request-ID`` header: the client's own, else the one Serve's
  proxy made, which the proxy also returns on the response) and keeps it in a context variable, so
  error bodies carry it (:func:`current_request_id`) and every log line of the request — raydb's and
  Serve's own — carries it with the tenant and the subject (:class:`RequestLogFields`);
- records ``raydb_http_requests_total`` / ``raydb_http_request_seconds`` by tenant, route template,
  method and status, and ``raydb_http_rejections_total`` by reason for each 429 (and each 503 that
  names one) (:mod:`raydb.metrics`).

The gate and the routes tell it what they learn through :func:`note`: the tenant once the key is
checked, the subject once it is named, a refusal's reason (``raydb.serving.status.http_exception``
notes the error's ``rejection``). It wraps the ASGI app without reading the body, so the gate's
capped body reads and streamed responses pass through unchanged.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from raydb.metrics import record

__all__ = ["ObservedRequests", "RequestLogFields", "current_request_id", "note", "install",
           "install_log_fields", "error_response", "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = "x-request-id"


@dataclass
class _RequestInfo:
    request_id: str = ""
    tenant: str | None = None
    subject: str | None = None
    reject_reason: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


_CURRENT: contextvars.ContextVar[_RequestInfo | None] = contextvars.ContextVar("raydb_request", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled (None outside a request)."""
    info = _CURRENT.get()
    return info.request_id if info else None


def note(*, tenant: str | None = None, subject: str | None = None, reject_reason: str | None = None,
         **extra: str) -> None:
    """Tell the request's observer what a route learned: the caller's tenant, the subject, why a
    429 was answered, other log fields. Outside a request it does nothing."""
    info = _CURRENT.get()
    if info is None:
        return
    if tenant is not None:
        info.tenant = tenant
    if subject is not None:
        info.subject = subject
    if reject_reason is not None:
        info.reject_reason = reject_reason
    info.extra.update(extra)


class RequestLogFields(logging.Filter):
    """Adds ``request_id``, ``tenant`` and ``subject`` of the current request to every log record a
    handler emits (Serve's JSON log encoding writes them as fields). Put on the handlers of the
    ``ray.serve`` logger in a replica, so Serve's own access lines carry them too."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = _CURRENT.get()
        if info is not None:
            if info.request_id and not hasattr(record, "request_id"):
                record.request_id = info.request_id
            if info.tenant:
                record.tenant = info.tenant
            if info.subject:
                record.subject = info.subject
            for key, value in info.extra.items():
                setattr(record, key, value)
        return True


def install_log_fields(logger_name: str = "ray.serve") -> None:
    """Put :class:`RequestLogFields` on the logger's handlers once (called in a replica's __init__,
    after Serve set its handlers up)."""
    for handler in logging.getLogger(logger_name).handlers:
        if not any(isinstance(f, RequestLogFields) for f in handler.filters):
            handler.addFilter(RequestLogFields())


_TEMPLATES: weakref.WeakKeyDictionary[Any, list[tuple[re.Pattern, str]]] = weakref.WeakKeyDictionary()


def _route(scope: dict[str, Any]) -> str:
    """The route template of the request (``/v1/trainings/{training_id}``). A request a middleware
    answered before routing (the gate's 413s and 429s) has none in its scope: its path is matched
    against the templates of the app's OpenAPI document (routes of included routers, such as the
    ingress's class-based ones under Serve, are nested where the scope's router cannot be asked)."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return template
    app = scope.get("app")
    if app is None or not hasattr(app, "openapi"):
        return "unmatched"
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    for pattern, template in _templates(app):
        if pattern.match(path):
            return template
    return "unmatched"


def _templates(app: Any) -> list[tuple[re.Pattern, str]]:
    found = _TEMPLATES.get(app)
    if found is None:
        from starlette.routing import compile_path

        found = [(compile_path(path)[0], path) for path in app.openapi().get("paths", {})]
        _TEMPLATES[app] = found
    return found


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ObservedRequests:
    """ASGI middleware: request id, log context and metrics for each HTTP request (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = _RequestInfo(request_id=_header(scope, REQUEST_ID_HEADER.encode()) or "")
        token = _CURRENT.set(info)
        start = time.perf_counter()
        status = 500  # an exception that escapes every handler becomes a 500

        async def send_observed(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            _CURRENT.reset(token)
            route = _route(scope)
            tenant = info.tenant or "unknown"
            record("raydb_http_requests_total", tenant=tenant, route=route, method=scope.get("method", ""),
                   status=str(status))
            record("raydb_http_request_seconds", time.perf_counter() - start, tenant=tenant, route=route)
            if status == 429 or (status == 503 and info.reject_reason):
                record("raydb_http_rejections_total", tenant=tenant, route=route,
                       reason=info.reject_reason or "other")


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> Any:
    """The JSON error body every route answers with: ``{"detail": ..., "request_id": ...}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail, "request_id": current_request_id()}, status_code=status,
                        headers=headers)


def install(app: Any) -> None:
    """Wire the observer into a FastAPI app: the middleware, and error bodies that carry the request
    id (HTTPException and request validation alike). The ingress's one hook."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request: Any, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    async def validation_error(request: Any, exc: RequestValidationError) -> Any:
        detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return error_response(422, detail)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(ObservedRequests)
