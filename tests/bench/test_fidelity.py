"""bench/fidelity.py: ``--quick`` runs the whole comparison and ends with the JSON line the issue names."""

from __future__ import annotations

import json

import pytest

from bench import fidelity

REQUIRED = ("base_class_accuracy", "subject_fidelity_l0", "subject_fidelity_l1", "drift_l0", "drift_l1",
            "class_accuracy_l1", "diversity_ratio_l1", "other_class_accuracy_l1", "tune_pick",
            "fidelity_pick")


def test_unknown_arm_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        fidelity.main(["--arms", "l0,nope"])
    assert exit_.value.code == 2
    assert "--arms: unknown arm(s) nope; known: l0, l1, l2_c300, l1_te" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_ends_with_the_json_line(tmp_path, capsys):
    """About 2-3 minutes on 2 cores: two 300-step trainings and 20 samples per prompt."""
    assert fidelity.main(["--quick", "--grid", str(tmp_path / "grid.png"),
                          "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert set(REQUIRED) <= set(line)
    assert line["quick"] is True and line["samples_per_prompt"] == 20 and line["steps"] == 300
    for key in REQUIRED[:-2]:
        assert 0.0 <= line[key] <= (3.0 if key.startswith("diversity") else 1.0), (key, line[key])
    assert line["tune_pick"] in ("l0", "l1") and line["fidelity_pick"] in ("l0", "l1")
    assert line["judge_held_out_accuracy"] >= 0.95
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert "Tune's val_score ranks first" in out
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["env"]["torch"] and record["date"] and record["drift_l1"] == line["drift_l1"]
