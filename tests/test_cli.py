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


def test_version_and_subject_positional_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("raydb ")
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    usage = capsys.readouterr().out
    assert "SUBJECT [key=value ...]" in " ".join(usage.split())
    with pytest.raises(SystemExit) as done:  # an override where the subject goes: a usage error
        cli.main(["export", "train.max_steps=3"])
    assert done.value.code == 2
    assert "SUBJECT first" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """``raydb config --reference | head -1``: the reader leaves early; no BrokenPipe traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "raydb.cli", "config", "--reference"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before raydb writes its first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_quiet_and_log_level_set_the_raydb_logger(monkeypatch, capsys):
    import logging

    monkeypatch.setattr("raydb.pipeline.run_pipeline", lambda cfg, **kw: {"stages": []})
    assert cli.main(["prior", "--local", "--quiet"]) == 0
    assert logging.getLogger("raydb").level == logging.WARNING
    assert cli.main(["prior", "--local", "--log-level", "debug"]) == 0
    assert logging.getLogger("raydb").level == logging.DEBUG
    capsys.readouterr()
