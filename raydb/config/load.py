"""The whole config tree (:class:`RaydbConfig`), loaded from YAML then dotted ``key=value`` overrides,
and its key reference (the README's table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from raydb.config.base import ConfigError, Section
from raydb.config.server import ServeConfig, ServiceConfig
from raydb.config.stages import (
    ClusterConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PriorConfig,
    SearchSpace,
    SubjectConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = ["RaydbConfig", "load_config", "apply_overrides", "config_reference_markdown"]


class RaydbConfig(Section):
    workspace: str = Field("./workspace", validate_default=True,
                           description="Local path or s3://bucket/prefix for all artifacts.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint "
                                        "(default: $AWS_ENDPOINT_URL).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    subject: SubjectConfig = Field(default_factory=SubjectConfig,
                                   description="The subject: id, owner, photos and prompts.")
    prior: PriorConfig = Field(default_factory=PriorConfig,
                               description="Prior preservation and class-image generation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter's shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray Train workers.")
    tune: TuneConfig | None = Field(None, description="Ray Tune search (none: train one run).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Validation metrics.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The Ray Serve app.")
    export_formats: list[Literal["kohya"]] = Field(
        default_factory=list, description="Extra adapter formats written at registration beside the "
        "diffusers file and listed in adapter.json (kohya: the single-file LoRA that ComfyUI, "
        "AUTOMATIC1111 and kohya's tools load).")
    service: ServiceConfig = Field(default_factory=ServiceConfig,
                                   description="Trainings submitted over HTTP (/v1/trainings).")

    @field_validator("workspace")
    @classmethod
    def _absolute_workspace(cls, value: str) -> str:
        """Local workspaces become absolute: Ray workers and Tune trials run in other folders."""
        if value.startswith("s3://"):
            return value.rstrip("/")
        return str(Path(value).expanduser().absolute())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, the form in which a config travels to Ray tasks and workers."""
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override's right-hand side as YAML so numbers, bools, lists and null work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``a.b.c=value`` overrides to a nested dict (a new dict is returned)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=60)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty segment in key {key!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section"
                )
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, data: dict | None = None
) -> RaydbConfig:
    """Load and validate a config: YAML file (or ``data``), then ``key=value`` overrides.

    Raises ConfigError naming each bad field path and the reason.
    """
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = dict(data or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    try:
        return RaydbConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def config_reference_markdown() -> str:
    """Markdown table of every config key with its default and description (for the README)."""

    def rows(model: type[BaseModel], prefix: str = ""):
        for name, info in model.model_fields.items():
            sub = next((c for c in getattr(info.annotation, "__args__", (info.annotation,))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub is not None and sub is not SearchSpace:
                yield from rows(sub, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(exclude_none=True)
            doc = (sub.__doc__ or "").strip().splitlines()[0] if sub else ""
            desc = info.description or doc if sub else info.description
            yield f"| `{prefix}{name}` | `{default!r}` | {desc or ''} |"

    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows(RaydbConfig)])
