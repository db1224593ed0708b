"""Shared fixtures: offline hub, the tiny model, a real S3 API (moto server), a local Ray cluster."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental download fails loudly
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from raydb.cluster import free_port  # noqa: E402
from raydb.config import RaydbConfig, load_config  # noqa: E402

TINY_TRAIN = {
    "resolution": 64, "max_steps": 6, "batch_size": 1, "checkpoint_every": 1000,
    "num_sample_images": 0, "sample_steps": 2, "learning_rate": 1e-3,
}
TINY_PRIOR = {"num_class_images": 4, "sample_batch_size": 2, "num_inference_steps": 2, "num_holdout": 0}


@pytest.fixture(autouse=True)
def _console_settings_stay_in_their_test(monkeypatch):
    """``cli.main`` sets up the console for the whole process (the ``raydb`` logger, the libraries'
    loggers and verbosity variables); each test gets them back as they were."""
    import logging

    from raydb.terminal import _QUIET_ENV, QUIET_LOGGERS

    for key in ["RAYDB_VERBOSE", *_QUIET_ENV]:
        monkeypatch.setenv(key, "")  # recorded as it was, restored after the test
        monkeypatch.delenv(key)
    loggers = [logging.getLogger(name) for name in ("raydb", *QUIET_LOGGERS)]
    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters)) for lg in loggers]
    yield
    for lg, level, handlers, filters in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.filters[:] = filters


@pytest.fixture(scope="session")
def shared_workspace(tmp_path_factory) -> str:
    """A workspace reused across tests so the tiny model is written once per session."""
    return str(tmp_path_factory.mktemp("shared-ws"))


@pytest.fixture
def make_cfg(tmp_path, shared_workspace):
    """Factory for small configs: ``make_cfg(train={"max_steps": 3}, workspace=...)``."""

    def make(workspace: str | None = None, **sections) -> RaydbConfig:
        data = {"workspace": workspace or str(tmp_path / "ws"),
                "train": dict(TINY_TRAIN), "prior": dict(TINY_PRIOR),
                "model": {"pretrained": "tiny", "cache_dir": str(tmp_path / "cache")}}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return load_config(data=data)

    return make


@pytest.fixture(scope="session")
def class_images_dir(tmp_path_factory) -> str:
    """Eight ready-made class images (``prior.class_data``) for tests that are not about prior
    generation: they skip starting generator actors on every training run."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("class-images")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i}.png")
    return str(root)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from raydb.models.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from raydb.models.tiny_sdxl import save_tiny_sdxl_model

    return str(save_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl") / "model"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    from raydb.models.tiny_flux import save_tiny_flux_model

    return str(save_tiny_flux_model(tmp_path_factory.mktemp("tiny-flux") / "model"))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1: a real HTTP S3 API for boto3 and pyarrow alike."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; returns ``(endpoint, "s3://bucket")``."""
    import re

    import boto3

    name = "raydb-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return s3_server, f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the integration tier (more logical CPUs than the 2 cores)."""
    import ray

    from raydb.cluster import start_local_ray

    saved = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        # Every process of the cluster inherits this (raylet, workers, drivers started by tests).
        from tests.helpers.head_cluster import TRAIN_POLL_ENV

        os.environ.update(TRAIN_POLL_ENV)
        start_local_ray(8, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = saved


def pytest_collection_modifyitems(config, items):
    """Every test that uses the Ray cluster (directly or through a fixture such as a Serve app) is in
    the ``ray`` tier, whether or not its file says so: ``make test-fast`` (``-m "not ray"``) must
    never start Ray."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    _fastest_first_under_mutmut(items)


def _fastest_first_under_mutmut(items) -> None:
    """Under ``make mutate``, run a mutant's tests fastest first (durations from mutmut's own stats):
    a killed mutant stops at its first failing test (``-x``), so a cheap killer should go first."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/
    if not mutant or mutant in ("stats", "fail", "list_all_tests") or not stats.is_file():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid.removeprefix("mutants/"), 0.0))


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_ray(request):
    """A test outside the ``ray`` tier that starts Ray fails: it belongs in the Ray tier. A test that
    stops the session's cluster fails too (in CI the demo's ``ray.shutdown()`` made the next file's
    tests fail with "Failed to connect to Ray cluster", far from the cause)."""
    import sys

    def running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = running()
    yield
    if request.node.get_closest_marker("ray") is None and not before and running():
        pytest.fail("this test started Ray: mark it @pytest.mark.ray (or use the ray_cluster fixture)")
    if before and not running():  # the next test in this process would find the session fixture dead
        pytest.fail("this test shut down the session's Ray cluster (ray.shutdown): leave it running")


@pytest.fixture(autouse=True)
def _mutants_write_into_a_fresh_folder(request, monkeypatch):
    """Under ``make mutate`` every test runs in its own empty working folder: a mutant that drops a
    path's root (``join(None, ...)``) writes relative files, which must not land in ``mutants/``
    where the next mutant's tests would find them (a mutant surviving on another's leftovers)."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        monkeypatch.chdir(request.getfixturevalue("tmp_path_factory").mktemp("cwd"))


_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session) -> None:
    session.config.stash[_STARTED] = time.time()


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Name the folder of the console's screenshots when this session wrote some (tests/console)."""
    from tests.helpers.browser import ARTIFACTS

    ran = any(getattr(report, "nodeid", "").startswith("tests/console/")  # (not the other lane's)
              for reports in terminalreporter.stats.values() for report in reports)
    started = config.stash.get(_STARTED, time.time())
    fresh = sorted(p.name for p in ARTIFACTS.glob("*.png") if p.stat().st_mtime >= started)
    if ran and fresh:
        terminalreporter.write_line(f"console screenshots ({len(fresh)}): {ARTIFACTS}")
