"""Live progress of a training run: ``<run>/progress.json``, rewritten every few seconds.

The training service reports step / max steps, latest loss, images/s and an ETA while a job runs;
the trainer's metrics otherwise reach storage only when the run ends (``metrics.jsonl``). So the
training loops (rank 0 only) hand each step's metrics to a :class:`ProgressWriter`, which writes at
most one small JSON file per ``every_s`` seconds (and always the last step): one PUT every few
seconds on S3, nothing per step.
"""

from __future__ import annotations

import time
from typing import Any

from raydb.storage import Storage, join

__all__ = ["PROGRESS", "ProgressWriter", "read_progress"]

PROGRESS = "progress.json"


class ProgressWriter:
    """``update(metrics)`` after each optimizer step; ``metrics`` has step, loss, images_per_s, seconds."""

    def __init__(self, storage: Storage, run: str, max_steps: int, every_s: float = 2.0) -> None:
        self.storage, self.uri = storage, join(run, PROGRESS)
        self.max_steps, self.every_s = max_steps, every_s
        self._last = 0.0

    def update(self, m: dict[str, Any]) -> None:
        now = time.monotonic()
        step = int(m["step"])
        if now - self._last < self.every_s and step < self.max_steps:
            return
        self._last = now
        left = max(0, self.max_steps - step)
        self.storage.write_json(self.uri, {
            "step": step, "max_steps": self.max_steps, "loss": m.get("loss"),
            "images_per_s": m.get("images_per_s"),
            "eta_s": round(left * float(m.get("seconds") or 0.0), 1),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })


def read_progress(storage: Storage, run: str) -> dict[str, Any] | None:
    """The run's last progress record (None before its first step)."""
    return storage.read_json_or(join(run, PROGRESS))
