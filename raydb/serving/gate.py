"""The ingress's gate: every request passes it before any route runs (an ASGI middleware, no Ray).

Tenants are hostile, so no route may be outside a per-tenant limit — the review found
``/v1/trainings`` and ``/v1/subjects`` outside every one, and 72 uploads of one key trickling 1
byte/s held the ingress while another tenant's ``/v1/generate`` waited 20 s. Rather than each route
remembering its limits, the gate applies them to every route the app has or will get (the console's
included), in this order, answering a refusal itself:

1. ``/healthz`` passes untouched (probes must not be refused).
2. The ingress's own bound: at most ``serve.ingress_max_requests`` requests at once, all tenants
   together; more -> **503** + ``Retry-After`` at once (:class:`~raydb.serving.limits.IngressFull`).
3. Who: the tenant of the presented API key. A caller without a valid key is held to the ``api``
   limits of its client address (``addr:<ip>``) until its route answers 401; with ``serve.auth:
   none`` everyone is the one shared tenant.
4. The route's class (:func:`route_class`) and its per-tenant limiter (concurrency cap, then token
   bucket; **429** + ``Retry-After``): ``generate`` (``POST /v1/generate``: ``serve.tenant_max_*``,
   ``tenant_rate_per_s``, ``tenant_burst``), ``api`` (every other route: ``serve.tenant_api_*``) and
   ``upload`` (a body of photos: ``POST /v1/trainings``, ``POST /v1/photo-checks``; the ``api``
   limits plus at most ``serve.tenant_max_uploads`` at once). The slots are held until the answer
   is sent, whatever it is.
5. The body: over its byte cap (``service.max_upload_bytes`` for uploads, ``serve.max_body_bytes``
   otherwise) -> **413**, refused from ``Content-Length`` before a byte is read, or as soon as a
   body without one passes it; not all arrived within ``serve.body_timeout_s`` of the headers ->
   **408**, and the slots are free again.
6. One audit line (:mod:`raydb.serving.audit`) once the answer is sent.

A refusal's body is the one every route answers with, ``{"detail", "request_id"}``
(:func:`raydb.serving.observe.error_response`), and the request's observer learns the tenant and,
for a 429/503, the limit's ``rejection`` word (its metrics' reason tag).

The hook: the app gets :class:`GateMiddleware` once (``app.add_middleware(GateMiddleware)``); the
:class:`Gate` it applies is the ingress replica's ``gate`` attribute (Serve's replica context), or
``app.state.raydb_gate`` on a plain FastAPI app (tests). Routes stay as they are; a route may add
to its audit line with :func:`raydb.serving.audit.note`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from raydb.config import RaydbConfig
from raydb.errors import TooLarge
from raydb.serving import observe
from raydb.serving.audit import AuditLog
from raydb.serving.limits import (
    BodyTimedOut,
    BodyTooLarge,
    BoundedBody,
    Capacity,
    IngressFull,
    TenantLimiter,
    TooManyRequests,
    check_declared_length,
)

__all__ = ["Gate", "GateMiddleware", "route_class", "route_path", "UPLOAD_ROUTES", "PUBLIC_ROUTES"]

PUBLIC_ROUTES = {("GET", "/healthz")}  # never gated
UPLOAD_ROUTES = {("POST", "/v1/trainings"), ("POST", "/v1/photo-checks")}  # bodies of photos
_REFUSED = (IngressFull, TooManyRequests, BodyTooLarge, BodyTimedOut, TooLarge)


def route_path(scope: Scope) -> str:
    """The request's path below the app's ``root_path`` (Serve's ``route_prefix``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.lstrip("/")


def route_class(method: str, path: str) -> str | None:
    """``generate``, ``upload`` or ``api`` (everything else); None for the public routes."""
    key = (method.upper(), path.rstrip("/") or "/")
    if key in PUBLIC_ROUTES or (key[0] == "HEAD" and ("GET", key[1]) in PUBLIC_ROUTES):
        return None
    if key == ("POST", "/v1/generate"):
        return "generate"
    return "upload" if key in UPLOAD_ROUTES else "api"


class Gate:
    """The limits of one ingress replica (see the module docstring).

    ``tenant_of(headers) -> (tenant, caller)``: the key's tenant (None with auth off or without a
    valid key) and ``caller`` for the audit line (``key``, ``no key``, ``invalid key``, ``auth off``).
    """

    def __init__(self, cfg: RaydbConfig, tenant_of: Callable[[Headers], tuple[str | None, str]],
                 *, clock: Callable[[], float] = time.monotonic, audit: AuditLog | None = None) -> None:
        sc = cfg.serve
        self.cfg, self.tenant_of, self.clock = cfg, tenant_of, clock
        self.capacity = Capacity(sc.ingress_max_requests)
        self.limiters = {
            "generate": TenantLimiter(sc.tenant_max_concurrent, sc.tenant_rate_per_s, sc.tenant_burst, clock),
            "api": TenantLimiter(sc.tenant_api_max_concurrent, sc.tenant_api_rate_per_s, sc.tenant_api_burst,
                                 clock),
        }
        self.uploads = TenantLimiter(sc.tenant_max_uploads, 0.0, 1, clock, what="uploads")
        self.audit = audit if audit is not None else AuditLog(sc.audit_dir, prompts=sc.audit_prompts)

    def byte_cap(self, klass: str) -> int:
        return self.cfg.service.max_upload_bytes if klass == "upload" else self.cfg.serve.max_body_bytes

    def admit(self, stack: ExitStack, klass: str, limit_key: str) -> None:
        """Take the request's slots (released when ``stack`` closes); raises the refusal."""
        stack.enter_context(self.capacity.admit())
        stack.enter_context(self.limiters["generate" if klass == "generate" else "api"].admit(limit_key))
        if klass == "upload":
            stack.enter_context(self.uploads.admit(limit_key))

    async def __call__(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        method, path = scope.get("method", "GET"), route_path(scope)
        klass = route_class(method, path)
        if klass is None:
            await app(scope, receive, send)
            return
        start = self.clock()
        headers = Headers(scope=scope)
        tenant, caller = self.tenant_of(headers)
        observe.note(tenant=tenant)  # the request's metrics and log lines carry it (serving/observe.py)
        client = (scope.get("client") or ("unknown", 0))[0]
        limit_key = tenant or (f"addr:{client}" if caller in ("no key", "invalid key") else "")
        scope["raydb.audit"] = notes = {}
        answered: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
            await send(message)

        try:
            with ExitStack() as stack:
                self.admit(stack, klass, limit_key)
                cap = self.byte_cap(klass)
                check_declared_length(headers, cap)
                timeout = self.cfg.serve.body_timeout_s
                body = BoundedBody(receive, cap, start + timeout, timeout, self.clock)
                await app(scope, body, send_status)
        except _REFUSED as exc:
            if answered:  # the answer had begun: nothing more can be said
                raise
            await self._refuse(exc, klass, scope, receive, send_status)
        finally:
            self.audit.record(self.audit.line(
                tenant=tenant, caller=caller, client=client, method=method, path=path,
                status=answered[0] if answered else None, duration_s=self.clock() - start, notes=notes))

    async def _refuse(self, exc: Exception, klass: str, scope: Scope, receive: Receive, send: Send) -> None:
        from raydb.serving.status import http_exception

        if isinstance(exc, BodyTooLarge) and klass == "upload":  # the upload's field, as before
            exc = TooLarge("photos", str(exc))
        http = http_exception(exc)
        response = observe.error_response(http.status_code, http.detail, http.headers)
        if isinstance(exc, (BodyTooLarge, BodyTimedOut, TooLarge)):
            response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _find_gate(scope: Scope) -> Gate:
    app = scope.get("app")
    gate = getattr(getattr(app, "state", None), "raydb_gate", None)
    if gate is None:
        from ray import serve

        gate = serve.get_replica_context().servable_object.gate
    return gate


class GateMiddleware:
    """Applies the :class:`Gate` of the app's ingress to every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _find_gate(scope)(scope, receive, send, self.app)
