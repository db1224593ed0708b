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


@pytest.mark.parametrize(("override", "hint"), [
    ("train.max_step=3", "train.max_step: unknown key; did you mean 'max_steps'?"),
    ("trian.max_steps=3", "trian: unknown key; did you mean 'train'?"),
    ("serve.api_keyz_env=X", "serve.api_keyz_env: unknown key; did you mean 'api_keys_env'?"),
    ("zzz=1", "zzz: unknown key\n"),
])
def test_unknown_keys_suggest_the_closest_field_of_their_section(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert hint in str(err.value) + "\n"


# -- what the training service lets tenants reach (issue 24) ------------------------------------------
@pytest.mark.parametrize("key", [
    "subject.tenant", "subject.id", "subject.instance_data", "subject", "workspace", "s3_endpoint_url",
    "model.pretrained", "model.revision", "model.cache_dir", "train.compile_cache", "train.compile_backend",
    "prior.class_data", "prior.concurrency", "eval.clip_model", "cluster.address", "cluster.num_workers",
    "serve.api_keys", "service.max_train_steps", "tune.name", "tune.max_concurrent_trials", "export_formats",
])
def test_an_allowed_override_handing_tenants_identity_data_storage_or_code_is_refused(key: str) -> None:
    """``service.allowed_overrides`` accepted any key, so an operator could hand tenants their
    identity (``subject.tenant``), other data (``prior.class_data``), storage (``workspace``) or code
    execution (``train.compile_cache`` unpickles). Such keys are refused at start, saying why."""
    allowed = ["train.max_steps", key]
    with pytest.raises(ConfigError, match=rf"service.allowed_overrides.*{key!r} can never be a tenant"):
        load_config(data={"service": {"allowed_overrides": allowed}})


def test_allowed_overrides_must_name_config_keys() -> None:
    for key, text in [("train.colour", "unknown config key 'train.colour'"),
                      ("train", "'train' is a section, not a key"), ("lora..rank", "unknown config key")]:
        with pytest.raises(ConfigError, match=text):
            load_config(data={"service": {"allowed_overrides": [key]}})
    allowed = ["tune", "lora.alpha", "train.lr_scheduler", "prior.num_class_images", "lora.target_modules"]
    assert load_config(data={"service": {"allowed_overrides": allowed}}).service.allowed_overrides == allowed


def test_check_override_is_strict_about_each_fields_type_and_bounds() -> None:
    from raydb.config import check_override

    assert check_override("train.max_steps", 10) == 10 and check_override("train.learning_rate", 1) == 1
    assert check_override("lora.alpha", None) is None and check_override("train.random_flip", True) is True
    for key, value, text in [("train.max_steps", "10", "valid integer"),
                             ("train.max_steps", 10.0, "valid integer"),
                             ("train.max_steps", 0, "greater than or equal to 1"),
                             ("train.random_flip", 1, "valid boolean"),
                             ("train.learning_rate", "1e-4", "valid number"),
                             ("train.lr_scheduler", "steps", "'constant'"),
                             ("train.nope", 1, "unknown config key")]:
        with pytest.raises(ConfigError, match=text):
            check_override(key, value)


def test_service_limits_are_consistent_at_start() -> None:
    with pytest.raises(ConfigError, match="max_trainings_per_tenant is now max_running_per_tenant"):
        load_config(data={"service": {"max_trainings_per_tenant": 2}})
    with pytest.raises(ConfigError, match="one tenant could fill the queue for every other"):
        load_config(data={"service": {"max_queued_per_tenant": 20, "max_queued_trainings": 20}})
    sc = load_config().service
    assert (sc.max_queued_per_tenant, sc.max_queued_trainings, sc.max_running_per_tenant) == (5, 20, 1)
    assert (sc.max_train_steps, sc.max_resolution, sc.max_lora_rank) == (2000, 1024, 32)


def test_photo_uri_prefixes_may_not_put_the_tenant_in_the_bucket_or_overlap_the_workspace() -> None:
    """A ``{tenant}`` in the bucket made an upper-case tenant's URIs a bare 500 (its bucket name is
    invalid); a prefix inside (or around) an S3 workspace let tenants name the service's own files —
    every tenant's photos and adapters. Both are config errors now."""
    with pytest.raises(ConfigError, match="may only stand in the key, not in the bucket"):
        load_config(data={"service": {"photo_uri_prefixes": ["s3://uploads-{tenant}/photos/"]}})
    for prefix in ("s3://lake/ws/up/{tenant}/", "s3://lake/{tenant}/", "s3://lake/", "s3://lake/w{tenant}/"):
        with pytest.raises(ConfigError, match="overlaps the workspace"):
            load_config(data={"workspace": "s3://lake/ws", "service": {"photo_uri_prefixes": [prefix]}})
    fine = ["s3://lake/uploads/{tenant}/", "s3://lake/wsx/{tenant}/", "s3://other/ws/{tenant}/"]
    assert load_config(data={"workspace": "s3://lake/ws", "service": {"photo_uri_prefixes": fine}})


def test_over_limits_names_every_field_over_its_maximum() -> None:
    from raydb.trainings.validate import over_limits

    """The operator's maxima on a typed training config, one message per field (what a submission's
    422 lists); the lower of service.max_lora_rank and serve.max_lora_rank bounds the rank."""
    grid = {"prior_loss_weight": [0.0, 0.5, 1.0], "learning_rate": [1e-4, 1e-3, 1e-2]}
    cfg = load_config(data={"train": {"max_steps": 2001, "resolution": 1032}, "lora": {"rank": 33},
                            "tune": grid})
    assert over_limits(cfg.service, cfg) == [
        "train.max_steps: at most 2000 (service.max_train_steps), got 2001",
        "train.resolution: at most 1024 (service.max_resolution), got 1032",
        "lora.rank: at most 32 (service.max_lora_rank), got 33",
        "tune: 9 trials, at most 8 (service.max_tune_trials)"]
    fits = load_config(data={"train": {"max_steps": 2000, "resolution": 1024}, "lora": {"rank": 32},
                             "tune": {"prior_loss_weight": [0.0, 1.0], "learning_rate": [1e-4]}})
    assert over_limits(fits.service, fits) == []
    served = load_config(data={"lora": {"rank": 16}, "serve": {"max_lora_rank": 8}})
    assert over_limits(served.service, served) == ["lora.rank: at most 8 (serve.max_lora_rank), got 16"]
    assert load_config(data={"service": {"max_tune_gpus": 5}}).service.tune_concurrency(2) == 2
    assert load_config(data={"service": {"max_tune_gpus": 1}}).service.tune_concurrency(4) == 1
    capped = load_config(data={"service": {"max_tune_gpus": 8, "tune": {"max_concurrent_trials": 3}}})
    assert capped.service.tune_concurrency(1) == 3
