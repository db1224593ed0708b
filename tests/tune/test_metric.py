"""tune.metric: a search ranks by val_score (lowest first) or by a sampled-image score (highest first)."""

from __future__ import annotations

import csv
import io

import pytest

from raydb.config import ConfigError, load_config
from raydb.storage import Storage
from raydb.tune.results import RESULT_COLUMNS, write_csv
from raydb.tune.stage import metric_mode


def test_val_score_is_minimised_and_the_sampled_scores_maximised():
    assert metric_mode("val_score") == "min"
    assert [metric_mode(m) for m in ("val_fidelity", "val_clip_i", "val_clip_t", "val_dino")] == ["max"] * 4


def test_a_metric_needs_its_judge(tmp_path):
    ws = str(tmp_path)
    with pytest.raises(ConfigError, match="tune.metric: val_fidelity needs eval.fidelity"):
        load_config(data={"workspace": ws, "tune": {"metric": "val_fidelity"}})
    with pytest.raises(ConfigError, match="tune.metric: val_clip_t needs eval.clip_model"):
        load_config(data={"workspace": ws, "tune": {"metric": "val_clip_t"}})
    with pytest.raises(ConfigError, match="tune.metric"):
        load_config(data={"workspace": ws, "tune": {"metric": "loss"}})
    cfg = load_config(data={"workspace": ws, "tune": {"metric": "val_fidelity"},
                            "eval": {"fidelity": "digits", "num_images": 8}})
    assert cfg.tune.metric == "val_fidelity" and cfg.eval.fidelity == "digits"
    assert load_config(data={"workspace": ws, "tune": {}}).tune.metric == "val_score"
    with pytest.raises(ConfigError, match="eval.fidelity"):
        load_config(data={"workspace": ws, "eval": {"fidelity": "clip"}})


def test_results_table_keeps_its_columns_and_adds_the_reported_scores(tmp_path):
    rows = [{"trial": 0, "prior_loss_weight": 0.0, "learning_rate": 1e-3, "val_instance": 0.5,
             "val_prior": 0.6, "val_score": 1.1, "steps": 10, "status": "completed", "run_dir": "r0",
             "val_fidelity": 0.4, "val_drift": 0.9},
            {"trial": 1, "prior_loss_weight": 1.0, "learning_rate": 1e-3, "val_instance": 0.52,
             "val_prior": 0.5, "val_score": 1.02, "steps": 10, "status": "completed", "run_dir": "r1",
             "val_fidelity": 0.9, "val_drift": 0.0}]
    uri = str(tmp_path / "results.csv")
    write_csv(Storage(), uri, rows)
    table = list(csv.DictReader(io.StringIO(open(uri).read())))
    header = list(table[0])
    assert header == RESULT_COLUMNS[:-2] + ["val_drift", "val_fidelity"] + RESULT_COLUMNS[-2:]
    assert [r["val_fidelity"] for r in table] == ["0.4", "0.9"]
    write_csv(Storage(), uri, [{k: v for k, v in r.items() if k not in ("val_fidelity", "val_drift")}
                               for r in rows])
    assert open(uri).readline().strip().split(",") == RESULT_COLUMNS


def test_dino_metric_needs_a_dino_model(tmp_path):
    with pytest.raises(ConfigError, match="tune.metric: val_dino needs eval.dino_model"):
        load_config(data={"workspace": str(tmp_path), "tune": {"metric": "val_dino"}})


def test_the_registered_search_metadata_keeps_the_ranking_metric(tmp_path):
    """The pipeline's register stage records the best trial's scores, the one that ranked it included."""
    from raydb.pipeline import search_metadata

    cfg = load_config(data={"workspace": str(tmp_path), "tune": {"metric": "val_fidelity"},
                            "eval": {"fidelity": "digits"}})
    best = {"prior_mode": "model", "prior_loss_weight": 1.0, "learning_rate": 1e-3, "val_instance": 0.2,
            "val_prior": 0.3, "val_score": 0.5, "val_fidelity": 0.9}
    meta = search_metadata(cfg, {"best": best, "results_csv": "r.csv"})
    assert meta["tune"]["hyperparameters"] == {"prior_mode": "model", "prior_loss_weight": 1.0,
                                               "learning_rate": 1e-3}
    assert meta["tune"]["validation"] == {"val_instance": 0.2, "val_prior": 0.3, "val_score": 0.5,
                                          "val_fidelity": 0.9}
    plain = load_config(data={"workspace": str(tmp_path), "tune": {}})
    assert "val_fidelity" not in search_metadata(plain, {"best": best})["tune"]["validation"]
    assert search_metadata(cfg, {}) is None
