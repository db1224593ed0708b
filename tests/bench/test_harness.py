"""The benchmarks' harness (bench/harness.py): timing rules, the run's JSON and budget, tables."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench import harness


def _run(tmp_path, budget_s: float = 3600.0) -> harness.Run:
    args = argparse.Namespace(out=str(tmp_path / "r.json"), budget_s=budget_s, cpu=True, resolution=None)
    return harness.Run(args, {"resolution": 64})


def test_time_steps_warms_up_untimed_and_syncs_every_timed_step():
    calls, syncs = [], []
    t = harness.time_steps(lambda: calls.append(len(calls)) or len(calls), warmup=2, min_steps=3,
                           min_seconds=0.0, max_steps=10, sync=lambda: syncs.append(len(calls)))
    assert t.warmup_out == [1, 2] and len(t.warmup_s) == 2
    assert len(t.times) == 3 and t.last == 5 and len(calls) == 5
    assert syncs == [1, 2, 3, 4, 5]  # after every call, inside its time
    # min_seconds extends the timed steps up to max_steps, never past it
    t = harness.time_steps(lambda: None, warmup=0, min_steps=1, min_seconds=3600, max_steps=4,
                           sync=lambda: None)
    assert len(t.times) == 4
    row = harness.timing(harness.StepTimes(times=[0.1, 0.2, 0.4]), 4)
    assert row["step_ms_median"] == 200.0 and row["images_per_s"] == 20.0 and row["it_per_s"] == 5.0
    assert row["step_ms_min"] == 100.0 and row["step_ms_max"] == 400.0 and row["timed_steps"] == 3
    assert row["images_per_s_mean"] == pytest.approx(12 / 0.7, rel=1e-3)


def test_run_records_failures_skips_and_writes_json_after_each(tmp_path):
    run = _run(tmp_path)
    assert run.device == torch.device("cpu") and run.dtype == torch.float32 and run.resolution == 64
    env = run.results["env"]
    assert env["torch"] == torch.__version__ and env["chip"].startswith("CPU") and "driver" in env
    assert run.results["date"].startswith("20")
    assert run.measure("ok", lambda: 3) == 3

    def boom():
        raise RuntimeError("capture failed")

    assert run.measure("bad", boom) is None
    saved = json.loads(run.out.read_text())  # written after each measurement
    assert saved["errors"] == {"bad": "RuntimeError: capture failed"} and not saved["complete"]
    short = _run(tmp_path, budget_s=5.0)
    assert short.measure("big", lambda: 1, needs_s=60) is None
    assert "big" in short.results["skipped"][0]
    assert short.finish()["complete"] is False
    assert _run(tmp_path).finish()["complete"] is True


def test_markdown_busy_fraction_and_peers_dir(monkeypatch, tmp_path):
    assert harness.markdown_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert harness.pct(0.1234) == "12.3%" and harness.pct(None) == "—"
    # kernels [0,2] and [1,3] overlap (count once), [5,6] is inside; span [0,10]
    assert harness.busy_fraction([(0, 2), (1, 3), (5, 6), (12, 13)], 0, 10) == 0.4
    monkeypatch.delenv("RAYDB_PEERS_DIR", raising=False)
    assert harness.peers_dir() == harness.REPO.parent / "shared" / "peers"
    monkeypatch.setenv("RAYDB_PEERS_DIR", str(tmp_path))
    assert harness.peers_dir() == tmp_path
