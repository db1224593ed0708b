"""The Ray Serve application builder, inside the installed package.

``serve run raydb.serving.app:build_app config=/path/raydb.yaml`` or an ``import_path:
raydb.serving.app:build_app`` in a Serve config file (``serve deploy``, a KubeRay RayService) works
wherever raydb is installed — a wheel, an image — with no checkout on ``PYTHONPATH``. ``args``:

- ``config``: path of a raydb YAML config (its ``serve`` section sizes the app);
- ``overrides`` (optional): dotted ``key=value`` overrides, a list or one whitespace-separated string.

It only loads the config and hands it to :func:`raydb.serving.build_application`.
"""

from __future__ import annotations

from typing import Any

from raydb.config import load_config

__all__ = ["build_app", "app"]


def build_app(args: dict[str, Any]) -> Any:
    """Application builder called by ``serve run`` / ``serve deploy``."""
    from raydb.serving import build_application

    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), list(overrides))
    return build_application(cfg)


app = build_app
