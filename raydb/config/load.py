"""The whole config tree (:class:`RaydbConfig`), loaded from YAML then dotted ``key=value`` overrides,
and its key reference (the README's table)."""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

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

__all__ = ["RaydbConfig", "load_config", "apply_overrides", "check_override", "is_config_key",
           "config_reference_markdown"]


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

    @model_validator(mode="after")
    def _tenant_boundaries(self) -> RaydbConfig:
        """What the training service lets tenants reach must exist and stay inside its bounds: every
        allowed override a real config key (a typo would silently allow nothing), and no photo URI
        prefix inside (or around) the workspace, where it would let a tenant name another tenant's
        photos and adapters."""
        sc = self.service
        for key in sc.allowed_overrides:
            if key != "tune":
                _leaf(key, "service.allowed_overrides: ")
        if self.workspace.startswith("s3://") and sc.photo_uri_prefixes:
            from raydb.storage import s3_segments

            try:
                bucket, ws = s3_segments(self.workspace + "/")
            except ValueError as exc:
                raise ValueError(f"workspace {self.workspace!r}: {exc}") from None
            for prefix in sc.photo_uri_prefixes:
                fixed = prefix.partition("{tenant}")[0]  # what every tenant's folder starts with
                p_bucket, segments = s3_segments(fixed.rsplit("/", 1)[0] + "/")
                n = min(len(segments), len(ws))
                if p_bucket == bucket and segments[:n] == ws[:n]:
                    raise ValueError(f"service.photo_uri_prefixes: {prefix!r} overlaps the workspace "
                                     f"{self.workspace!r}: tenants could name the service's own files")
        return self

    @model_validator(mode="after")
    def _tune_metric_has_its_judge(self) -> RaydbConfig:
        metric = self.tune.metric if self.tune else "val_score"
        if metric == "val_fidelity" and not self.eval.fidelity:
            raise ValueError("tune.metric: val_fidelity needs eval.fidelity (e.g. 'digits')")
        if metric in ("val_clip_i", "val_clip_t") and not self.eval.clip_model:
            raise ValueError(f"tune.metric: {metric} needs eval.clip_model")
        if metric == "val_dino" and not self.eval.dino_model:
            raise ValueError("tune.metric: val_dino needs eval.dino_model")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, the form in which a config travels to Ray tasks and workers."""
        return self.model_dump(mode="json")

    def prior_modes(self) -> list[str]:
        """The prior modes this config trains with: a search's ``tune.prior_mode``, else ``prior.mode``."""
        if self.tune is not None and self.tune.prior_mode:
            return list(self.tune.prior_mode)
        return [self.prior.mode]


def _section(info: FieldInfo) -> type[BaseModel] | None:
    """The config section class a field holds (``TuneConfig | None`` -> TuneConfig), or None."""
    return next((c for c in getattr(info.annotation, "__args__", (info.annotation,))
                 if isinstance(c, type) and issubclass(c, Section)), None)


def _leaf(key: str, context: str = "") -> FieldInfo:
    """The field of a dotted config key that holds a value (not a section); ConfigError naming the
    key when it is unknown or a section."""
    model: type[BaseModel] = RaydbConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None or not part:
            raise ConfigError(f"{context}unknown config key {key!r}")
        section = _section(info)
        if i == len(parts) - 1:
            if section is not None and section is not SearchSpace:
                raise ConfigError(f"{context}{key!r} is a section, not a key: name the keys in it")
            return info
        if section is None:
            raise ConfigError(f"{context}unknown config key {key!r}")
        model = section
    raise AssertionError("unreachable")


def is_config_key(key: str) -> bool:
    """Whether ``key`` is a dotted config key that holds a value (``train.max_steps``; not ``train``)."""
    try:
        _leaf(key)
    except ConfigError:
        return False
    return True


def check_override(key: str, value: Any) -> Any:
    """``value`` for the dotted config ``key``, validated *strictly* against the field's own type
    and bounds: an int field takes an integer (not ``"1000000000"``, not ``1e9``), a float field a
    number, a bool a boolean. For values that come as JSON from a tenant, where a lax parse would
    turn a string or a float into the number a limit was never checked against. ConfigError names
    the key."""
    from typing import Annotated

    info = _leaf(key)
    try:
        typed = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        TypeAdapter(typed).validate_python(value, strict=True)
    except ValidationError as exc:
        problem = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"{key}: {problem} (got {json.dumps(value)[:80]})") from None
    return value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(RaydbConfig, item["loc"])
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _did_you_mean(root: type[BaseModel], loc: tuple) -> str:
    """``"; did you mean 'max_steps'?"`` for an unknown key close to a field of its section (the
    section's model is found by walking ``loc`` through the models' fields), else ``""``."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:  # a list index: the model stays the item's
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in list(candidates) for a in typing.get_args(c)]  # list[X] | None
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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
