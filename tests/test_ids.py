"""The registry's id rules (no Ray): what is accepted, and each refusal's message."""

from __future__ import annotations

import pytest

from raydb.ids import check_safe_id, check_version, is_version


@pytest.mark.parametrize("good", ["a", "A9", "0", "rex.v2", "a_b-c.d", "x" * 64, "9-lives"])
def test_safe_ids_come_back_unchanged(good):
    assert check_safe_id(good) == good


@pytest.mark.parametrize(("bad", "message"), [
    ("", "must be a non-empty id"),
    (None, "must be a non-empty id"),
    (7, "must be a non-empty id"),
    ("a..b", "'a..b' contains '..'"),
    ("..", "'..' contains '..'"),
    ("x" * 65, f"{'x' * 65!r} is not a safe id: use 1-64 letters, digits, '_', '-', '.', starting with "
               "a letter or digit (no '/' or spaces)"),
    ("-x", "'-x' is not a safe id"),
    (".x", "'.x' is not a safe id"),
    ("a/b", "'a/b' is not a safe id"),
    ("a b", "'a b' is not a safe id"),
    ("a\n", "'a\\n' is not a safe id"),
    ("é", "'é' is not a safe id"),
])
def test_unsafe_ids_are_refused_saying_why(bad, message):
    with pytest.raises(ValueError) as err:
        check_safe_id(bad)
    assert str(err.value).startswith(message)


def test_versions():
    for good in ("v0001", "v12345", "v0000"):
        assert is_version(good) and check_version(good) == good
    for bad in ("v001", "0001", "V0001", "v0001\n", "v١٢٣٤", "", None, 1, "v0001x", "xv0001"):
        assert not is_version(bad)
    with pytest.raises(ValueError) as err:
        check_version("v01")
    assert str(err.value) == "bad version 'v01' (expected v followed by at least 4 ASCII digits)"
