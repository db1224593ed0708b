"""The one table from raydb's errors to HTTP status codes, and the response built from an error.

Every HTTP answer that is not a success comes from here: the ingress's routes, the ``/v1/trainings``
routes and the diffusion replicas (whose answers cross a Serve handle as ``{"error": {"status",
"detail"}}``) all ask :func:`http_status`. An error's class decides its status, most specific class
first (:class:`raydb.errors.TooLarge` is a ``RequestError`` that answers 413, not 422); an error the
table does not know is a 500. Only protocol-level answers — 401 without a valid key, 411/415/400 for
a body that is not the multipart it must be, 404 for the docs when they are off — are written where
they happen, because no error of raydb's stands behind them.

:func:`http_exception` also tells the request's observer (:mod:`raydb.serving.observe`) why a
refusal for want of capacity was made (the error's ``rejection``: ``rate``, ``ingress``,
``trainings``, ...), so ``raydb_http_rejections_total`` counts it by reason.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError

from raydb.errors import (
    Conflict,
    Forbidden,
    Invalid,
    Overloaded,
    Refused,
    RequestError,
    TimedOut,
    TooLarge,
    Unavailable,
    UnknownResource,
)
from raydb.serving import observe
from raydb.serving.adapters import (
    AdapterCorrupt,
    AdapterError,
    AdapterGone,
    AdapterMismatch,
    GenerationCancelled,
)
from raydb.serving.api import validation_detail
from raydb.serving.limits import BodyTimedOut, BodyTooLarge, TooManyRequests
from raydb.serving.multi_lora import AdapterTooLarge, AdapterUnsupported
from raydb.serving.subjects import BadAdapterId, SubjectNotFound

__all__ = ["HTTP_STATUS", "http_status", "http_exception"]

HTTP_STATUS: dict[type[BaseException], int] = {
    # raydb.errors: how a request is refused
    Invalid: 422, RequestError: 422, TooLarge: 413, Forbidden: 403, UnknownResource: 404, Conflict: 409,
    Overloaded: 429, Unavailable: 503, TimedOut: 504,
    # what the ingress meets
    ValidationError: 422,  # a body that is not a GenerateRequest (pydantic names the fields)
    BodyTooLarge: 413,  # over its byte cap (serve.max_body_bytes), refused before it is read
    BodyTimedOut: 408,  # the body did not all arrive within serve.body_timeout_s
    TooManyRequests: 429,  # the tenant is over its concurrency cap or rate
    SubjectNotFound: 404,  # unknown, or another tenant's
    # what a diffusion replica meets (it answers with the status, the ingress passes it on)
    BadAdapterId: 400,
    AdapterMismatch: 409,  # trained on another base model or family
    AdapterTooLarge: 409,  # rank above serve.max_lora_rank
    AdapterUnsupported: 409,  # layers or a LoRA variant this server does not wrap
    AdapterCorrupt: 500,  # failed its integrity checks
    AdapterGone: 503,  # gone from the registry between lookup and load, or no slot in time
    AdapterError: 500,
    GenerationCancelled: 504,  # the denoising loop stopped at its deadline
}


def http_status(exc: BaseException) -> int:
    """The status of ``exc``: the table's entry for its most specific class listed, else 500."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def _detail(exc: BaseException) -> Any:
    if isinstance(exc, Refused):
        return exc.detail()
    if isinstance(exc, ValidationError):
        return validation_detail(exc)
    if isinstance(exc, TooManyRequests):
        return f"too many requests: {exc.reason}"
    return str(exc)


def http_exception(exc: BaseException) -> HTTPException:
    """The HTTP answer to ``exc``: its status, what the caller is told, and ``Retry-After`` when the
    error says when to retry. Notes the error's ``rejection`` (if any) for the request's metrics."""
    rejection = getattr(exc, "rejection", None)
    if rejection:
        observe.note(reject_reason=rejection)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return HTTPException(http_status(exc), _detail(exc), headers=headers)
