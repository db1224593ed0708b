"""The adapter registry: versions, the atomic latest pointer, idempotence, and unsafe ids."""

from __future__ import annotations

import json

import pytest

from raydb.ids import check_safe_id
from raydb.registry import latest_version, list_subjects, register_adapter, subject_uri
from raydb.storage import NotFound, Storage


def _adapter(tmp_path, name: str, weights: bytes) -> str:
    import hashlib

    d = tmp_path / name
    d.mkdir()
    (d / "pytorch_lora_weights.safetensors").write_bytes(weights)
    (d / "adapter.json").write_text(json.dumps({"weights_sha256": hashlib.sha256(weights).hexdigest(),
                                                "subject": {"tenant": "t1"}}))
    return str(d)


def test_versions_latest_and_idempotence(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    first = register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    assert first["version"] == "v0001"
    assert latest_version(storage, ws, "rex")["uri"] == first["uri"]
    again = register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"one"))  # same weights
    assert again["version"] == "v0001"
    second = register_adapter(storage, ws, "rex", _adapter(tmp_path, "c", b"two"))
    assert second["version"] == "v0002"
    assert latest_version(storage, ws, "rex")["version"] == "v0002"
    listing = list_subjects(storage, ws)
    assert listing["rex"]["versions"] == ["v0001", "v0002"]
    assert not list((tmp_path / "ws" / "subjects" / "rex").glob(".*.tmp"))  # no temp files left
    with pytest.raises(NotFound, match="ghost"):
        latest_version(storage, ws, "ghost")


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", " ", "a b", "-x", "a\n", "x" * 65, "a..b"])
def test_unsafe_ids_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        check_safe_id(bad)
    with pytest.raises(ValueError):
        subject_uri(str(tmp_path), bad)
    with pytest.raises(ValueError):
        register_adapter(Storage(), str(tmp_path), bad, str(tmp_path))
