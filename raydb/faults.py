"""Fault injection for tests: a Train worker or a prior generator that dies like a preempted node.

A test asks for faults through one environment variable on the driver, ``RAYDB_FAULTS``, holding
JSON such as::

    {"train_step": {"rank": 1, "step": 5, "once": "/tmp/marker"},
     "prior_block": {"after": 1, "once": "/tmp/marker"}}

The driver reads it with :func:`plan` and sends the plan along with the work (environment
variables set in a test do not reach Ray workers that are already running); the worker calls
:func:`maybe_die` at the named site. With ``once`` the first process to create the marker file
dies and every later one (the restarted worker or actor) runs normally. Without the variable the
plan is ``None`` and :func:`maybe_die` returns at once, so production runs pay one dict lookup.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

__all__ = ["ENV", "plan", "maybe_die"]

ENV = "RAYDB_FAULTS"


def plan() -> dict[str, Any] | None:
    """The fault plan of this process's environment (``None``: no faults)."""
    text = os.environ.get(ENV, "").strip()
    return json.loads(text) if text else None


def _claim(marker: str | None) -> bool:
    """True for the first process to create ``marker`` (always True without one)."""
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def maybe_die(faults: dict[str, Any] | None, site: str, **where: int) -> None:
    """Kill this process (SIGKILL-like: no cleanup, no exception) if ``faults`` asks for it here.

    Sites: ``train_step`` (``rank``, ``step``: before training that step) and ``prior_block``
    (``done``: blocks this generator already finished; dies once ``done >= after``). A spec with
    ``"pause": seconds`` stalls there instead of dying: a run held at a known step, with its
    earlier checkpoints registered, for a test to kill its driver (a kill timed by polling would
    race the run's end).
    """
    spec = (faults or {}).get(site)
    if not spec:
        return
    if site == "train_step":
        hit = where["rank"] == spec["rank"] and where["step"] == spec["step"]
    elif site == "prior_block":
        hit = where["done"] >= spec["after"]
    else:
        raise ValueError(f"unknown fault site {site!r}")
    if hit and _claim(spec.get("once")):
        if spec.get("pause"):
            time.sleep(float(spec["pause"]))
            return
        os.kill(os.getpid(), signal.SIGKILL)
