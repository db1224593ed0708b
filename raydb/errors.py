"""The errors raydb answers a caller with, at the bottom of the import graph (it imports nothing of
raydb): the HTTP layer (:mod:`raydb.serving`) and the training service (:mod:`raydb.trainings`) both
raise and read these without importing each other.

A refusal names what to blame: :class:`RequestError` a request field (FastAPI's 422 ``detail``
shape), :class:`TooLarge` a byte limit, :class:`Forbidden` what a tenant may not name. Which HTTP
status each answers with is the ingress's business (it maps the class, not a number carried by the
error). :func:`error_line` is the one-line form of any error for summaries and training status.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["RequestError", "TooLarge", "Forbidden", "error_line", "redact_paths"]

# URIs (s3://bucket/key, file://, http://host/...) and file paths (/abs, ./rel, ../rel, ~/home),
# where they stand as words of their own: "images/s" or "1/2" is not a path.
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>,;)\]]*[^\s'\"<>,;:)\]]")
_PATH = re.compile(r"(?<![\w.~/-])(?:~|\.{1,2})?/[^\s'\"<>,;:)\]]+")


class RequestError(ValueError):
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
