"""Registry ids: the one rule for subject ids and tenant names, below everything that uses them.

Ids become path segments of the workspace (``tenants/<tenant>/subjects/<id>/``), so the rule is an
allow-list — ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`` with no ``..`` — that can never name a path outside
the registry. ``raydb.config`` validates ids with it at load time; the registry and the server check
again at their edges.
"""

from __future__ import annotations

import re

__all__ = ["SAFE_ID_PATTERN", "VERSION_PATTERN", "check_safe_id", "is_version", "check_version"]

SAFE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_SAFE_ID = re.compile(SAFE_ID_PATTERN)
VERSION_PATTERN = r"v[0-9]{4,}"  # [0-9], not \d: \d also matches other scripts' digits ("v١٢٣٤")
_VERSION = re.compile(VERSION_PATTERN)


def check_safe_id(value: str) -> str:
    """Return ``value`` if it is a safe registry id, else raise ValueError saying why."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty id")
    if ".." in value:
        raise ValueError(f"{value!r} contains '..'")
    if not _SAFE_ID.fullmatch(value):  # not match+$: "$" also accepts a trailing newline
        raise ValueError(
            f"{value!r} is not a safe id: use 1-64 letters, digits, '_', '-', '.', "
            "starting with a letter or digit (no '/' or spaces)"
        )
    return value


def is_version(value: object) -> bool:
    """Whether ``value`` is a registry version name (``v0001``; fullmatch, so no trailing newline)."""
    return isinstance(value, str) and _VERSION.fullmatch(value) is not None


def check_version(value: str) -> str:
    """Return ``value`` if it is a registry version name, else raise ValueError saying why."""
    if not is_version(value):
        raise ValueError(f"bad version {value!r} (expected v followed by at least 4 ASCII digits)")
    return value
