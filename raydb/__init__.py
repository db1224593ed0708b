"""raydb: DreamBooth-LoRA on Ray — prior images -> encoded cache -> training -> tuning -> registry -> serving.

The public entry points, one per stage (``raydb <verb>`` on the command line calls the same ones):

    from raydb import load_config, run_pipeline
    cfg = load_config("jobs/configs/demo.yaml", overrides=["train.max_steps=50"])
    run_pipeline(cfg)

Names are imported on first use, so ``import raydb`` stays cheap (no torch, no Ray) for the CLI,
the config tooling and Ray workers that need only part of the library.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "ConfigError", "RaydbConfig", "load_config",
    "Storage",
    "ensure_prior_images",
    "train_subject", "train_distributed",
    "run_tune",
    "register_adapter", "latest_version",
    "run_pipeline",
    "build_application",
]

_HOME = {
    "ConfigError": "raydb.config", "RaydbConfig": "raydb.config", "load_config": "raydb.config",
    "Storage": "raydb.storage",
    "ensure_prior_images": "raydb.prior.stage",
    "train_subject": "raydb.train.local", "train_distributed": "raydb.train.stage",
    "run_tune": "raydb.tune.stage",
    "register_adapter": "raydb.registry", "latest_version": "raydb.registry",
    "run_pipeline": "raydb.pipeline",
    "build_application": "raydb.serving",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raydb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
