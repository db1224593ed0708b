"""The CLI: verbs are data (stages + flags) over ``run_pipeline``; failures are one line (no Ray)."""

from __future__ import annotations

import pytest

from raydb import cli
from raydb.pipeline import STAGES


def test_every_stage_verb_names_real_stages_and_flags_reach_run_pipeline(monkeypatch, capsys):
    calls = []

    def fake_run_pipeline(cfg, **kwargs):
        calls.append(kwargs)
        return {"stages": []}

    monkeypatch.setattr("raydb.pipeline.run_pipeline", fake_run_pipeline)
    for name, verb in cli.VERBS.items():
        assert verb.stages is None or set(verb.stages) <= set(STAGES), name
    assert cli.main(["train", "--local", "--restart", "train.max_steps=3"]) == 0
    assert calls[-1] == {"stages": ["prior", "encode", "train", "register"], "local": True,
                         "restart": True}
    assert cli.main(["prior", "--local"]) == 0
    assert calls[-1] == {"stages": ["prior"], "local": True}
    capsys.readouterr()


@pytest.mark.parametrize("error", ["storage", "tune", "adapter", "value"])
def test_failures_are_one_line_not_a_traceback(monkeypatch, capsys, error):
    from raydb.serving.adapters import AdapterCorrupt
    from raydb.storage import StorageError
    from raydb.tune.stage import TuneFailed

    exc = {"storage": StorageError("cannot read s3://b/x: AccessDenied"),
           "tune": TuneFailed("no trial of the search in /ws/tune completed"),
           "adapter": AdapterCorrupt("adapter weights failed their integrity check"),
           "value": ValueError("prior.num_class_images (2) must be at least cluster.num_workers (3)")}[error]

    def boom(name, cfg, args):
        raise exc

    monkeypatch.setattr(cli, "_run_verb", boom)
    assert cli.main(["train", "--local"]) == 1
    err = capsys.readouterr().err
    assert err == f"raydb train: error: {exc}\n"


def test_config_errors_exit_2_naming_the_field(capsys):
    assert cli.main(["train", "train.max_steps=0"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
