"""``import raydb`` is cheap and every name in ``raydb.__all__`` resolves to its stage's function."""

from __future__ import annotations

import subprocess
import sys

import raydb


def test_every_public_name_resolves():
    for name in raydb.__all__:
        value = getattr(raydb, name)
        assert callable(value), name
    assert raydb.load_config(data={}).train.resolution == 512


def test_import_raydb_loads_neither_torch_nor_ray():
    code = "import sys, raydb; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no_such_thing"):
        raydb.no_such_thing  # noqa: B018


def test_no_private_ray_imports():
    """raydb uses Ray's public API only: a private module can change in any release."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [f"{path.relative_to(root)}:{n}" for folder in ("raydb", "jobs", "serve")
                 for path in sorted((root / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"^\s*(from|import)\s+ray\._|ray\._private", line)]
    assert offenders == []
