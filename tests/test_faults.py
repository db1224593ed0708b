"""raydb.faults: the fault plan's sites, ``once`` markers and the ``pause`` that holds a run."""

from __future__ import annotations

import json
import time

import pytest

from raydb import faults


def test_plan_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.plan() is None
    monkeypatch.setenv(faults.ENV, json.dumps({"train_step": {"rank": 0, "step": 1}}))
    assert faults.plan() == {"train_step": {"rank": 0, "step": 1}}


def test_a_pause_holds_once_and_returns(tmp_path):
    """The first process to claim the marker stalls for ``pause`` seconds and goes on (no kill: this
    test process survives); a second claim of the same marker passes at once."""
    plan = {"train_step": {"rank": 0, "step": 5, "pause": 0.3, "once": str(tmp_path / "held")}}
    faults.maybe_die(plan, "train_step", rank=0, step=4)  # not the step
    faults.maybe_die(plan, "train_step", rank=1, step=5)  # not the rank
    assert not (tmp_path / "held").exists()
    start = time.monotonic()
    faults.maybe_die(plan, "train_step", rank=0, step=5)
    assert time.monotonic() - start >= 0.3 and (tmp_path / "held").exists()
    start = time.monotonic()
    faults.maybe_die(plan, "train_step", rank=0, step=5)
    assert time.monotonic() - start < 0.3


def test_unknown_site_is_refused():
    with pytest.raises(ValueError, match="unknown fault site"):
        faults.maybe_die({"nope": {"x": 1}}, "nope")
