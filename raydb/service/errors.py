"""The submission checks' refusals beyond a plain :class:`raydb.serving.api.RequestError` (HTTP 422).

Each names the form field to blame, like ``RequestError``; the ingress maps the class to the status.
"""

from __future__ import annotations

from raydb.serving.api import RequestError

__all__ = ["TooLarge", "Forbidden"]


class TooLarge(RequestError):
    """An upload (or a photo named by URI) over a byte limit (HTTP 413)."""


class Forbidden(RequestError):
    """A photo URI the service may not read for this tenant (HTTP 403)."""
