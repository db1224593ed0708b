"""Ray Serve entrypoint: ``serve run serve.app:build_app config=serve/raydb.yaml`` or
``serve deploy serve/config.yaml``.

Thin by design: load the raydb config named in ``args`` and hand it to
:func:`raydb.serving.build_application`. ``args``:

- ``config``: path of a raydb YAML config (its ``serve`` section sizes the app);
- ``overrides`` (optional): dotted ``key=value`` overrides, a list or one whitespace-separated string.
"""

from __future__ import annotations

from typing import Any

from raydb.config import load_config
from raydb.serving import build_application


def build_app(args: dict[str, Any]) -> Any:
    """Application builder called by ``serve run`` / ``serve deploy``."""
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), list(overrides))
    return build_application(cfg)


app = build_app
