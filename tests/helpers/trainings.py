"""The training service's test doubles: Ray's Jobs API as the queue sees it, and a job that is
cancelled while one of its stages runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raydb.trainings.store import TrainingStore
from tests.helpers.images import demo_photos


class FakeJobs:
    """Ray's Jobs API as the queue sees it: submissions recorded, statuses set by the test (a job
    runs until the test says otherwise; the test runs its entrypoint itself)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []  # stops that worked
        self.stop_calls: list[str] = []  # every stop asked for
        self.statuses: dict[str, str] = {}
        self.refuse = False  # as when the job agent is not up yet
        self.failing_stops = 0  # the next this many stops fail (the dashboard timing out, say)

    def submit(self, submission_id: str, entrypoint: str) -> None:
        assert "-m raydb.trainings.job" in entrypoint
        if self.refuse:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job")
        self.submitted.append(submission_id)
        self.statuses[submission_id] = "RUNNING"

    def status(self, submission_id: str) -> tuple[str, str]:
        return self.statuses[submission_id], "driver killed"

    def stop(self, submission_id: str) -> None:
        self.stop_calls.append(submission_id)
        if self.failing_stops:
            self.failing_stops -= 1
            raise RuntimeError("Request failed with status code 500: ray job stop timed out")
        self.stopped.append(submission_id)
        self.statuses[submission_id] = "STOPPED"


class CancelDuringStage(TrainingStore):
    """The job's view of the workspace, which calls ``cancel()`` (a ``DELETE`` arriving) as soon as
    the job records that ``stage`` started — the job then runs that stage to its end, as a job whose
    ``ray job stop`` has not landed yet would."""

    def __init__(self, store: TrainingStore, stage: str, cancel: Callable[[], Any]) -> None:
        super().__init__(store.storage, store.workspace)
        self.stage, self.cancel, self.cancelled = stage, cancel, False

    def write_status(self, tenant: str, training_id: str, **fields: Any) -> None:
        super().write_status(tenant, training_id, **fields)
        if fields.get("stage") == self.stage and fields.get("state") == "running" and not self.cancelled:
            self.cancelled = True
            self.cancel()


# -- the /v1/trainings routes on a plain FastAPI app (no Ray) ------------------------------------------
KEYS = {"key-one": "t1", "key-two": "t2", "key-three": "t3", "key-dashes": "a--b"}
FIELDS = {"subject_id": "rex", "instance_prompt": "a photo of sks toy", "class_prompt": "a photo of a toy"}


def tenant_of(request: Any) -> str:
    """The test apps' key check: ``X-API-Key`` -> tenant (401 otherwise)."""
    from fastapi import HTTPException

    tenant = KEYS.get(request.headers.get("x-api-key", ""))
    if tenant is None:
        raise HTTPException(401, "missing or invalid API key")
    return tenant


def trainings_client(cfg: Any, jobs: FakeJobs) -> Any:
    """A new app over ``cfg``'s workspace (a second call: an "ingress restart")."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from raydb.serving.training_routes import TrainingsEndpoint, router
    from raydb.storage import Storage

    app = FastAPI()
    app.include_router(router)
    app.state.raydb_trainings = TrainingsEndpoint(cfg, Storage(cfg.s3_endpoint_url), tenant_of, jobs=jobs,
                                                  background=False)
    return TestClient(app)


def post_training(client: Any, key: str = "key-one", photos: list | None = None, idem: str | None = None,
                  **fields: Any) -> Any:
    """A real multipart body: text fields as parts without a file name, photos as file parts."""
    parts = [(k, (None, v)) for k, v in (FIELDS | fields).items() if v is not None]
    photos = demo_photos(3, 96) if photos is None else photos
    parts += [("photos", (name, data, "image/png")) for name, data in photos]
    headers = {"X-API-Key": key} | ({"Idempotency-Key": idem} if idem else {})
    return client.post("/v1/trainings", files=parts, headers=headers)


def auth(key: str = "key-one") -> dict[str, str]:
    return {"X-API-Key": key}
