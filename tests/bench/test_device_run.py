"""The prepared GPU run (bench/device_run.sh, issue 30): every benchmark it starts exists and takes
every flag it is given. A device machine is lent for minutes; a typo must fail here, not there."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from bench import harness

SCRIPT = harness.REPO / "bench" / "device_run.sh"
# shell expansions in the script -> plain values argparse can read
_VALUES = {r"\$\(\( [^)]* \)\)": "100", r"\$\{BUDGET_S:-(\d+)\}": r"\1", r"\$OUT/": "/tmp/out/",
           r"\$PEER_SITE": "/tmp/peer-site"}


def _commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        match = re.search(r"python3 -m (bench\.\w+)(.*)", line)
        if not match:
            continue
        args = re.split(r"\s(?:\d?>|\|)", match.group(2))[0]  # up to a redirection or a pipe
        for pattern, value in _VALUES.items():
            args = re.sub(pattern, value, args)
        out.append([match.group(1), *shlex.split(args.replace('"$@"', ""))])
    return out


def test_every_device_mode_runs_a_benchmark_that_takes_its_flags():
    commands = _commands()
    modules = {c[0] for c in commands}
    assert {"bench.gpu_truth", "bench.gpu_truth_sdxl", "bench.serve_engine_gpu",
            "bench.compile_parity", "bench.prior_cost", "bench.flux_row"} <= modules, modules
    for module, *args in commands:
        parse = importlib.import_module(module).parse_args
        try:
            parse(args)
        except SystemExit as exc:  # argparse's answer to an unknown flag or a bad value
            pytest.fail(f"{module} refuses the device script's arguments {args}: exit {exc.code}")
    modes = set(re.findall(r"^(\w+)\)$", SCRIPT.read_text(), flags=re.M))
    assert modes == {"truth", "serve", "sdxl", "prior", "flux"}  # and the default (*): the engine run
