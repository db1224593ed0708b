"""One typed config tree for every stage, loaded from YAML then dotted ``key=value`` overrides.

Each concern (model, subject, prior, lora, train, cluster, tune, eval, serve, service) is its own pydantic
model. Every model forbids unknown keys, so a typo is an error that names the field path instead of
a silently ignored setting. Configs travel to Ray tasks and workers as plain dicts and are
re-validated there (``RaydbConfig.model_validate``), never through module globals.

``base.py`` (``ConfigError``, the strict ``Section``), ``stages.py`` (the pipeline's sections),
``server.py`` (``serve`` and ``service``: the operator's), ``load.py`` (``RaydbConfig``, loading,
overrides, the key reference). Everything is imported from ``raydb.config``; config imports nothing
of raydb above ``ids`` and ``storage``.
"""

from raydb.config.base import ConfigError, Section
from raydb.config.load import (
    RaydbConfig,
    apply_overrides,
    check_override,
    config_reference_markdown,
    is_config_key,
    load_config,
)
from raydb.config.server import ServeConfig, ServiceConfig
from raydb.config.stages import (
    ClusterConfig,
    EvalConfig,
    FlowConfig,
    LoraConfig,
    ModelConfig,
    PriorConfig,
    PriorMode,
    SearchSpace,
    SubjectConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "ConfigError",
    "Section",
    "ModelConfig",
    "SubjectConfig",
    "PriorConfig",
    "PriorMode",
    "LoraConfig",
    "FlowConfig",
    "TrainConfig",
    "ClusterConfig",
    "SearchSpace",
    "TuneConfig",
    "EvalConfig",
    "ServeConfig",
    "ServiceConfig",
    "RaydbConfig",
    "load_config",
    "apply_overrides",
    "check_override",
    "is_config_key",
    "config_reference_markdown",
]
