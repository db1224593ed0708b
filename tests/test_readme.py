"""The README's configuration reference lists every config key (so docs cannot fall behind)."""

from __future__ import annotations

import re
from pathlib import Path

from raydb.config import config_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_every_config_key():
    text = README.read_text()
    keys = re.findall(r"^\| `([^`]+)` \|", config_reference_markdown(), flags=re.M)
    assert len(keys) > 60
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"README's configuration reference lacks {missing}; run `raydb config --reference`"


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
