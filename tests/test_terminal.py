"""The terminal: raydb's lines through its logger; the libraries' false alarms kept off (no Ray)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from raydb.terminal import library_env, setup_console

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import os, sys
    from raydb.terminal import filter_known_noise
    filter_known_noise()
    print("first line")
    # what Ray's C++ core writes straight to file descriptor 2 (ray-project/ray#57733)
    os.write(2, b"[2026-12-05 00:09:59,918 E 15323 15323] core_worker.cc:2465: Actor with class name: "
                b"'MapWorker(MapBatches(BlockGenerator))' and ID: 'ab' has constructor arguments in the "
                b"object store and max_restarts > 0. If the arguments ...\\n")
    os.write(2, b"a real C++ error stays\\n")
    # what Ray's Python relays from the raylet to sys.stdout
    print("(raylet) WARNING: 14 PYTHON worker processes have been started on node: 9078 with address")
    print("(raylet) a real raylet message stays", file=sys.stderr)
    print("last line", end="")
""")


def test_known_false_alarms_are_dropped_and_everything_else_passes_in_order():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "first line\nlast line"
    # (what C++ writes to the descriptor reaches the terminal through a pipe, so it may come after a
    # later Python line; each stream keeps its own order)
    assert sorted(proc.stderr.splitlines()) == [
        "(raylet) a real raylet message stays", "a real C++ error stays"]


def test_raydb_lines_at_the_chosen_level_and_the_libraries_held_back(capsys, monkeypatch):
    setup_console("INFO", verbose=False)
    log = logging.getLogger("raydb.pipeline")
    log.info("== pipeline stage prior")
    log.debug("not shown at INFO")
    log.warning("disk nearly full")
    assert capsys.readouterr().err == "== pipeline stage prior\nWARNING: disk nearly full\n"
    tune_log = logging.getLogger("ray.tune")
    assert not tune_log.filter(tune_log.makeRecord("ray.tune", logging.INFO, "f", 1, "table", (), None))
    assert tune_log.filter(tune_log.makeRecord("ray.tune", logging.WARNING, "f", 1, "trouble", (), None))
    assert os.environ["TQDM_DISABLE"] == "1" and library_env()["RAY_AIR_NEW_OUTPUT"] == "0"
    setup_console("WARNING", verbose=True)  # --quiet --verbose: the libraries speak, raydb is terse
    log.info("hidden")
    assert capsys.readouterr().err == ""
    assert library_env() == {} and "TQDM_DISABLE" not in os.environ
