"""The web console's files: plain HTML, CSS and JavaScript modules, shipped as package data.

Nothing here runs on the server: the ingress serves these files at ``/ui`` (see
:mod:`raydb.serving.console`, which adds the Content-Security-Policy), and the browser then talks to
the same authenticated API as any other client — every subject, picture, training and image it
shows comes from a ``/v1`` route, behind the API key, under the tenant's limits. There is no build
step and no third-party code: the modules are loaded as they are written, so the console works
offline and a reviewer reads exactly what runs.

:func:`asset` is the only way to a file: a lookup by plain name in the files this package ships
(known suffixes only), so no request path can name anything else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

__all__ = ["STATIC", "MEDIA_TYPES", "asset", "asset_names"]

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # module scripts need a JavaScript type (nosniff)
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@cache
def asset_names() -> frozenset[str]:
    """The console's file names (``index.html``, ``app.js``, …): plain files with a known suffix."""
    return frozenset(p.name for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES)


def asset(name: str) -> tuple[bytes, str] | None:
    """``(content, media type)`` of the console file ``name``, or None when there is no such file."""
    if name not in asset_names():
        return None
    path = STATIC / name
    return path.read_bytes(), MEDIA_TYPES[path.suffix]
