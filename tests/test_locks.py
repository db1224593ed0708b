"""The committed locks (requirements/*.lock) against pyproject.toml: what CI, the cluster and the Ray
image install must satisfy every declared bound, agree across the three files, and name no torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(name: str) -> dict[str, str]:
    """``{canonical name: version}`` of a lock; every pin must carry its files' hashes."""
    text = (ROOT / "requirements" / f"{name}.lock").read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if match:
            assert "--hash=sha256:" in block, f"{name}.lock: {match.group(1)} has no hash"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _requirements(group: str) -> list[Requirement]:
    raw = PROJECT["dependencies"] if group == "runtime" else PROJECT["optional-dependencies"][group]
    return [Requirement(r) for r in raw if not r.startswith("raydb")]


@pytest.mark.parametrize(("lock", "groups"), [("runtime", ["runtime"]), ("test", ["runtime", "test"]),
                                              ("dev", ["runtime", "test", "dev"])])
def test_each_lock_satisfies_every_bound_it_covers(lock, groups):
    pins = _pins(lock)
    for group in groups:
        for req in _requirements(group):
            name = canonicalize_name(req.name)
            if name == "torch":  # installed first, per platform (requirements/README.md)
                assert name not in pins, f"{lock}.lock pins torch"
                continue
            assert name in pins, f"{lock}.lock lacks {req}"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"{lock}.lock: {name}=={pins[name]} outside {req}"


def test_the_locks_agree_and_only_add_their_extras():
    runtime, test, dev = _pins("runtime"), _pins("test"), _pins("dev")
    assert runtime.items() <= test.items() <= dev.items()
    assert "torch" not in dev
    assert {"pytest", "moto"} <= test.keys() - runtime.keys()
    assert {"ruff", "mutmut"} <= dev.keys() - test.keys()  # dev tools stay out of what `make test` installs
