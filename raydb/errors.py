"""The errors raydb refuses a request with, at the bottom of the import graph (it imports nothing of
raydb): the HTTP layer (:mod:`raydb.serving`) and the training service (:mod:`raydb.trainings`) both
raise and read these without importing each other.

A :class:`Refused` carries what the caller is told (``detail()``: a text, or FastAPI's list of
``{type, loc, msg}``) and, when trying again later can succeed, ``retry_after`` seconds. Its kind
says why: the request is invalid (:class:`Invalid`; :class:`RequestError` names the body field,
:class:`TooLarge` and :class:`Forbidden` are field errors of their own kind), the resource is
unknown (:class:`UnknownResource`, also another tenant's), its state forbids the request
(:class:`Conflict`), capacity is full (:class:`Overloaded`, :class:`Unavailable`) or time ran out
(:class:`TimedOut`). Which HTTP status answers each kind is one table, in the HTTP layer
(:data:`raydb.serving.status.HTTP_STATUS`), not a number carried by the error.

:func:`error_line` is the one-line form of any error, for summaries and training status.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["Refused", "Invalid", "RequestError", "TooLarge", "Forbidden", "UnknownResource", "Conflict",
           "Overloaded", "Unavailable", "TimedOut", "error_line", "redact_paths"]

# URIs (s3://bucket/key, file://, http://host/...) and file paths (/abs, ./rel, ../rel, ~/home),
# where they stand as words of their own: "images/s" or "1/2" is not a path.
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>,;)\]]*[^\s'\"<>,;:)\]]")
_PATH = re.compile(r"(?<![\w.~/-])(?:~|\.{1,2})?/[^\s'\"<>,;:)\]]+")


class Refused(Exception):
    """A request raydb will not carry out; ``detail()`` is what the caller is told.

    ``rejection``: for a refusal for want of capacity, one fixed word saying whose capacity
    (``trainings``, ``backpressure``, ...: the ``reason`` tag of ``raydb_http_rejections_total``,
    docs/operations.md); a class may set it for all its instances.
    """

    rejection: str | None = None

    def __init__(self, detail: str | list[dict[str, Any]], *, retry_after: int | None = None,
                 rejection: str | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        if rejection is not None:
            self.rejection = rejection

    def detail(self) -> str | list[dict[str, Any]]:
        return self.args[0]


class Invalid(Refused):
    """The request itself is malformed or breaks a limit."""


class RequestError(Invalid, ValueError):
    """A request that breaks a limit; ``field`` is the body field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def detail(self) -> list[dict[str, Any]]:
        return [{"type": "value_error", "loc": ["body", self.field], "msg": self.message}]


class TooLarge(RequestError):
    """An upload (or a photo named by URI) over a byte limit."""


class Forbidden(RequestError):
    """A photo URI the service may not read for this tenant."""


class UnknownResource(Refused):
    """No such resource for the caller: missing, or another tenant's (deliberately the same)."""


class Conflict(Refused):
    """The resource's state forbids the request (an id another tenant owns, a training that ended)."""


class Overloaded(Refused):
    """A queue or a limit of the caller's is full; retry after ``retry_after`` seconds."""


class Unavailable(Refused):
    """The server cannot take the request right now (no capacity left); retry."""


class TimedOut(Refused):
    """The request ran past its time limit."""


def error_line(exc: BaseException) -> str:
    """One line naming an error: its type and message (multi-line messages, such as an IngestError's
    per-file list, joined with '; '), for summaries and training status."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"


def redact_paths(text: str) -> str:
    """``text`` with every URI and file path replaced by ``<path>``: what a tenant may read of an
    error raised with the service's storage layout, bucket names or model locations in it (the
    operator's logs keep the original)."""
    return _PATH.sub("<path>", _URI.sub("<path>", text))
