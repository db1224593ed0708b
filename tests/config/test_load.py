"""The typed config tree: errors name the field path, overrides apply, shipped YAMLs load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raydb.config import ConfigError, RaydbConfig, SearchSpace, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[2]


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    return str(info.value)


def test_defaults_load() -> None:
    cfg = load_config()
    assert isinstance(cfg, RaydbConfig)
    assert cfg.model.pretrained == "tiny"
    assert cfg.tune is None
    assert cfg.lora.effective_alpha == float(cfg.lora.rank)


@pytest.mark.parametrize(
    ("override", "field", "reason"),
    [
        ("train.max_stepz=3", "train.max_stepz", "unknown key"),
        ("trian.max_steps=3", "trian", "unknown key"),
        ("train.resolution=100", "train.resolution", "multiple of 8"),
        ("lora.rank=0", "lora.rank", "greater than 0"),
        ("train.prior_loss_weight=-0.5", "train.prior_loss_weight", "greater than or equal to 0"),
        ("train.batch_size=0", "train.batch_size", "greater than or equal to 1"),
        ("train.lr_scheduler=exponential", "train.lr_scheduler", "constant"),
        ("model.prediction_type=sample", "model.prediction_type", "epsilon"),
        ("lora.target_modules=[]", "lora.target_modules", "at least one module"),
        ("train.max_steps=many", "train.max_steps", "valid integer"),
    ],
)
def test_errors_name_field_and_reason(override: str, field: str, reason: str) -> None:
    message = _error([override])
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"{field}:")), None)
    assert line is not None, message
    assert reason in line, message


def test_every_bad_field_is_reported_at_once() -> None:
    message = _error(["lora.rank=0", "train.batch_size=0"])
    assert "lora.rank" in message and "train.batch_size" in message


def test_dotted_overrides_apply() -> None:
    cfg = load_config(overrides=[
        "train.max_steps=60",
        "train.learning_rate=1e-4",  # YAML 1.1 reads this as text; pydantic must still make it a float
        "train.random_flip=true",
        "prior.enabled=false",
        "lora.target_modules=[to_q,to_k]",
        "cluster.use_gpu=false",
        "subject.id=42",  # a numeric-looking id is still an id
        "model.cache_dir=null",
    ])
    assert cfg.train.max_steps == 60
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.random_flip is True
    assert cfg.prior.enabled is False
    assert cfg.lora.target_modules == ["to_q", "to_k"]
    assert cfg.cluster.use_gpu is False
    assert cfg.subject.id == "42"
    assert cfg.model.cache_dir is None


def test_overrides_apply_on_top_of_data_and_create_sections() -> None:
    cfg = load_config(data={"train": {"max_steps": 5, "resolution": 64}},
                      overrides=["train.max_steps=7", "tune.learning_rate=[1e-4, 3e-4]"])
    assert cfg.train.max_steps == 7
    assert cfg.train.resolution == 64  # untouched keys of the section survive
    assert cfg.tune is not None
    assert cfg.tune.learning_rate.values == pytest.approx([1e-4, 3e-4])


def test_apply_overrides_does_not_mutate_input() -> None:
    data = {"train": {"max_steps": 5}}
    out = apply_overrides(data, ["train.max_steps=9"])
    assert out["train"]["max_steps"] == 9
    assert data["train"]["max_steps"] == 5


@pytest.mark.parametrize("bad", ["train.max_steps", "train..max_steps=3", "train.max_steps.x=3"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data={"train": {"max_steps": 5}}, overrides=[bad])
    assert repr(bad) in str(info.value)


def test_shipped_configs_load() -> None:
    paths = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert paths, "jobs/configs/ has no YAML files"
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, RaydbConfig), path


def test_yaml_round_trip(tmp_path: Path) -> None:
    original = load_config(overrides=["train.max_steps=11", "lora.rank=8", "subject.id=my-dog",
                                      "tune.prior_loss_weight=[0.0, 0.5]"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(original.to_dict()))
    loaded = load_config(path)
    assert loaded == original
    assert loaded.to_dict() == original.to_dict()
    # a config travels to workers as a dict and is re-validated there
    assert RaydbConfig.model_validate(original.to_dict()) == original


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(typo)
    assert "train.max_stepz: unknown key" in str(info.value)
    assert str(typo) in str(info.value)


@pytest.mark.parametrize("bad_id", ["..", "a/b", "", "a b", "../etc", "a\n", "-lead"])
def test_unsafe_subject_ids_rejected(bad_id: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data={"subject": {"id": bad_id}})
    assert "subject.id:" in str(info.value)


def test_unsafe_tenant_rejected() -> None:
    with pytest.raises(ConfigError, match=r"subject\.tenant:"):
        load_config(data={"subject": {"tenant": "x/../y"}})


@pytest.mark.parametrize("good_id", ["dog", "my-dog_2", "v1.0", "A" * 64])
def test_safe_subject_ids_accepted(good_id: str) -> None:
    assert load_config(data={"subject": {"id": good_id}}).subject.id == good_id


@pytest.mark.parametrize(
    ("space", "reason"),
    [
        ({"low": 1, "high": 0.5}, "must be below high"),
        ({"low": 0, "high": 1}, "positive"),
        ([], "empty"),
        ({"low": 1e-4}, "both low and high"),
        ({"values": [1e-4], "low": 1e-5, "high": 1e-3}, "not both"),
        ([-1.0], "negative"),
    ],
)
@pytest.mark.parametrize("field", ["learning_rate", "prior_loss_weight"])
def test_search_space_errors_name_field(space, reason: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data={"tune": {field: space}})
    line = next((ln for ln in str(info.value).splitlines() if f"tune.{field}" in ln), "")
    assert reason in line, str(info.value)


def test_search_space_forms() -> None:
    assert SearchSpace.model_validate([0.0, 1.0]).values == [0.0, 1.0]
    ranged = SearchSpace.model_validate({"low": 1e-5, "high": 1e-3})
    assert (ranged.low, ranged.high, ranged.values) == (1e-5, 1e-3, None)
    cfg = load_config(overrides=["tune.learning_rate={low: 1e-5, high: 1e-3}"])
    assert cfg.tune is not None and cfg.tune.learning_rate.high == pytest.approx(1e-3)


def _fields(model, prefix=""):
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        yield prefix + name, info
        for sub in getattr(info.annotation, "__args__", (info.annotation,)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _fields(sub, f"{prefix}{name}.")


def test_every_config_field_has_a_description() -> None:
    """`raydb config --reference` and the README table are built from these descriptions."""
    missing = [path for path, info in _fields(RaydbConfig) if not (info.description or "").strip()]
    assert not missing, f"config fields without a description: {missing}"
    assert len(list(_fields(RaydbConfig))) > 80  # the walk really visits the nested sections
