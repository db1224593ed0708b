"""The training service's test doubles: Ray's Jobs API as the queue sees it, and a job that is
cancelled while one of its stages runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raydb.trainings.store import TrainingStore


class FakeJobs:
    """Ray's Jobs API as the queue sees it: submissions recorded, statuses set by the test (a job
    runs until the test says otherwise; the test runs its entrypoint itself)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.statuses: dict[str, str] = {}
        self.refuse = False  # as when the job agent is not up yet

    def submit(self, submission_id: str, entrypoint: str) -> None:
        assert "-m raydb.trainings.job" in entrypoint
        if self.refuse:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job")
        self.submitted.append(submission_id)
        self.statuses[submission_id] = "RUNNING"

    def status(self, submission_id: str) -> tuple[str, str]:
        return self.statuses[submission_id], "driver killed"

    def stop(self, submission_id: str) -> None:
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
