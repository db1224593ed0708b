"""bench/fidelity.py: ``--quick`` runs the whole comparison and ends with the JSON line the issue names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "fidelity.py"
REQUIRED = ("base_class_accuracy", "subject_fidelity_l0", "subject_fidelity_l1", "drift_l0", "drift_l1",
            "class_accuracy_l1", "diversity_ratio_l1", "other_class_accuracy_l1", "tune_pick",
            "fidelity_pick")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_unknown_arm_is_refused_by_name():
    done = _run("--arms", "l0,nope", timeout=300)
    assert done.returncode == 2 and "--arms: unknown arm(s) nope; known: l0, l1, l2_c300, l1_te" in done.stderr


@pytest.mark.slow
def test_quick_run_ends_with_the_json_line(tmp_path):
    done = _run("--quick", "--grid", str(tmp_path / "grid.png"), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(REQUIRED) <= set(line)
    assert line["quick"] is True and line["samples_per_prompt"] == 20 and line["steps"] == 300
    for key in REQUIRED[:-2]:
        assert 0.0 <= line[key] <= (3.0 if key.startswith("diversity") else 1.0), (key, line[key])
    assert line["tune_pick"] in ("l0", "l1") and line["fidelity_pick"] in ("l0", "l1")
    assert line["judge_held_out_accuracy"] >= 0.95
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert "Tune's val_score ranks first" in done.stdout
