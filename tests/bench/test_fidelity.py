"""bench/fidelity.py: ``--quick`` runs the whole comparison and ends with the JSON line the issue names."""

from __future__ import annotations

import json

import pytest

from bench import fidelity

REQUIRED = ("base_class_accuracy", "subject_fidelity_l0", "subject_fidelity_l1", "drift_l0", "drift_l1",
            "class_accuracy_l1", "diversity_ratio_l1", "other_class_accuracy_l1",
            # the model arm (issue 26)
            "drift_model", "subject_fidelity_model", "class_accuracy_model", "diversity_ratio_model",
            "tune_pick", "fidelity_pick")
COSTS = ("seconds_images", "seconds_model")


def test_unknown_arm_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        fidelity.main(["--arms", "l0,nope"])
    assert exit_.value.code == 2
    assert "--arms: unknown arm(s) nope; known: l0, l1, l2_c300, l1_te, model" in capsys.readouterr().err


def _arm_config(arm, tmp_path):
    from raydb.config import RaydbConfig, apply_overrides

    cfg = fidelity.bench_config(str(tmp_path), steps=300, learning_rate=4e-3, num_class_images=40)
    return RaydbConfig.model_validate(apply_overrides(cfg.to_dict(), list(arm.overrides))).to_dict()


def _differences(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    out = set()
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out |= _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.add(prefix + k)
    return out


def test_the_default_arms_differ_only_where_the_comparison_says(tmp_path):
    """none / images / model: λ alone separates l0 from l1, prior.mode alone l1 from model."""
    from raydb.fidelity.experiment import DEFAULT_ARMS

    assert [a.name for a in DEFAULT_ARMS] == ["l0", "l1", "model"]
    l0, l1, model = (_arm_config(a, tmp_path) for a in DEFAULT_ARMS)
    assert _differences(l0, l1) == {"train.prior_loss_weight"}
    assert _differences(l1, model) == {"prior.mode"}
    assert (l1["prior"]["mode"], model["prior"]["mode"], l1["train"]["prior_loss_weight"]) == \
        ("images", "model", 1.0)


def test_cost_figures_add_the_prior_stage_to_image_mode_only():
    costs = {"step_s_images": 0.05, "step_s_model": 0.07, "model_over_images_step": 1.4,
             "seconds_per_class_image": 0.5, "rounds": 10, "torch_threads": 1, "block_size": 20}
    c = fidelity.cost_figures(costs, class_images=120, steps=2000)
    assert c["prior_stage_seconds"] == 60.0 and c["train_seconds_images"] == 100.0
    assert (c["seconds_images"], c["seconds_model"]) == (160.0, 140.0)
    assert c["images_over_model"] == pytest.approx(160 / 140, abs=1e-3)
    assert (c["class_images"], c["cost_steps"], c["step_s_model"]) == (120, 2000, 0.07)
    assert "block_size" not in c


def test_json_line_carries_every_arm_and_the_costs():
    from raydb.fidelity.experiment import DEFAULT_ARMS

    figures = dict.fromkeys(fidelity.ARM_FIGURES, 0.5) | {"drift_se": 0.1}
    base = {"class_accuracy": 0.9, "class_accuracy_se": 0.03, "other_class_accuracy": 0.9, "drift": 0.0,
            "subject_fidelity": 0.0, "diversity": 1.0}
    result = {"base": base, **{a.name: figures for a in DEFAULT_ARMS}, "tune_pick": "l1",
              "fidelity_pick": "model",
              "settings": {"samples_per_prompt": 20, "other_samples_per_prompt": 8, "steps": 300,
                           "learning_rate": 4e-3, "judge_held_out_accuracy": 0.99}}
    costs = fidelity.cost_figures({"step_s_images": 0.05, "step_s_model": 0.07,
                                   "seconds_per_class_image": 0.5}, class_images=60, steps=300)
    line = fidelity.json_line(result, DEFAULT_ARMS, 12.0, True, costs)
    assert set(REQUIRED) | set(COSTS) <= set(line)
    assert line["drift_model_se"] == 0.1 and line["fidelity_pick"] == "model"
    assert (line["seconds_images"], line["seconds_model"]) == (45.0, 21.0)
    assert set(COSTS).isdisjoint(fidelity.json_line(result, DEFAULT_ARMS, 12.0, True))


@pytest.mark.slow
def test_quick_run_ends_with_the_json_line(tmp_path, capsys):
    """The whole comparison, sized down from ``--quick`` (three 20-step trainings, 4 samples per
    prompt): every stage of the bench runs and the line carries every figure, in range. Whether the
    figures *mean* anything is the README's table, from a full run; here it is the plumbing."""
    assert fidelity.main(["--quick", "--steps", "20", "--samples", "4", "--other-samples", "2",
                          "--grid", str(tmp_path / "grid.png"), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert set(REQUIRED) <= set(line)
    assert line["quick"] is True and line["samples_per_prompt"] == 4 and line["steps"] == 20
    for key in REQUIRED[:-2]:
        assert 0.0 <= line[key] <= (3.0 if key.startswith("diversity") else 1.0), (key, line[key])
    assert line["tune_pick"] in ("l0", "l1", "model") and line["fidelity_pick"] in ("l0", "l1", "model")
    assert line["class_images"] == 60 and line["cost_steps"] == 20  # 40 training + 20 held out
    assert line["seconds_images"] == pytest.approx(line["prior_stage_seconds"] + line["train_seconds_images"],
                                                   abs=0.11)
    assert line["seconds_model"] > 0 and "images / model" in out
    assert line["judge_held_out_accuracy"] >= 0.95
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert "Tune's val_score ranks first" in out
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["env"]["torch"] and record["date"] and record["drift_l1"] == line["drift_l1"]
