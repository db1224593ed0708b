"""The training service's fast-tier fixture: a small config, a fake Jobs API, and a factory of
apps over one workspace (each call: an ingress restart)."""

from __future__ import annotations

import pytest

from tests.helpers.trainings import FakeJobs, trainings_client


@pytest.fixture
def service(make_cfg, tmp_path):
    cfg = make_cfg(workspace=str(tmp_path / "ws"), prior={"enabled": False},
                   train={"max_steps": 2, "resolution": 64},
                   service={"max_concurrent_trainings": 1, "max_running_per_tenant": 1,
                            "max_queued_trainings": 2, "max_queued_per_tenant": 1, "max_photos": 3,
                            "max_photo_bytes": 60_000, "max_photo_pixels": 200 * 200, "retry_after_s": 7})
    jobs = FakeJobs()
    return cfg, jobs, lambda: trainings_client(cfg, jobs)
