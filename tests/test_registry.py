"""The adapter registry: versions, the atomic latest pointer, idempotence, and unsafe ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydb.ids import check_safe_id
from raydb.registry import (
    SubjectOwned,
    claim_subject,
    latest_version,
    list_subjects,
    migrate_registry,
    register_adapter,
    subject_owner,
    subject_uri,
)
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


# -- tenants can't hurt each other (issue 18) --------------------------------------------------------
def _tenant_adapter(tmp_path, name: str, weights: bytes, tenant: str) -> str:
    path = _adapter(tmp_path, name, weights)
    meta = json.loads((tmp_path / name / "adapter.json").read_text())
    meta["subject"]["tenant"] = tenant
    (tmp_path / name / "adapter.json").write_text(json.dumps(meta))
    return path


def test_tenant_b_cannot_take_alice(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    first = register_adapter(storage, ws, "alice", _tenant_adapter(tmp_path, "a", b"one", "t1"))
    with pytest.raises(SubjectOwned, match="'alice' is already registered by another tenant"):
        register_adapter(storage, ws, "alice", _tenant_adapter(tmp_path, "b", b"two", "t2"))
    with pytest.raises(SubjectOwned):
        claim_subject(storage, ws, "alice", "t2")  # what training checks before it starts
    assert latest_version(storage, ws, "alice")["version"] == first["version"] == "v0001"
    assert subject_owner(storage, ws, "alice") == "t1"
    assert list(list_subjects(storage, ws, "t2")) == []
    assert list(list_subjects(storage, ws, "t1")) == ["alice"]
    again = register_adapter(storage, ws, "alice", _tenant_adapter(tmp_path, "c", b"three", "t1"))
    assert again["version"] == "v0002"  # the owner still can


def test_legacy_registry_is_migrated_to_the_oldest_versions_tenant(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    base = tmp_path / "ws" / "subjects" / "alice"
    for version, tenant in (("v0001", "t1"), ("v0002", "t2")):  # v0002: the takeover of the old registry
        (base / version).mkdir(parents=True)
        (base / version / "adapter.json").write_text(json.dumps({"subject": {"tenant": tenant},
                                                                 "weights_sha256": version}))
    (base / "latest.json").write_text(json.dumps({"version": "v0002", "uri": "/moved/elsewhere/v0002"}))
    assert migrate_registry(storage, ws) == 1 and migrate_registry(storage, ws) == 0
    assert subject_owner(storage, ws, "alice") == "t1"
    assert list(list_subjects(storage, ws, "t1")) == ["alice"] and list_subjects(storage, ws, "t2") == {}
    latest = latest_version(storage, ws, "alice")  # the stored absolute uri is ignored
    assert latest["uri"] == str(base / "v0002") and latest["versions"] == ["v0001", "v0002"]


def test_two_concurrent_registrations_leave_latest_on_the_highest_version(tmp_path, monkeypatch):
    """Registrar A claims v0002 and is slow; B registers v0003 meanwhile; A must not move latest back."""
    import raydb.registry as registry

    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    real_publish = registry._publish
    interleaved = []

    def slow_publish(storage_, ws_, sid, entry):
        if not interleaved:  # A, between writing its files and moving latest: B runs to completion
            interleaved.append(None)
            interleaved[0] = register_adapter(storage, ws, "rex", _adapter(tmp_path, "c", b"three"))
        return real_publish(storage_, ws_, sid, entry)

    monkeypatch.setattr(registry, "_publish", slow_publish)
    a = register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"two"))
    assert (a["version"], interleaved[0]["version"]) == ("v0002", "v0003")
    latest = latest_version(storage, ws, "rex")
    assert latest["version"] == "v0003" and latest["versions"] == ["v0001", "v0002", "v0003"]


def test_cas_conflict_is_retried_not_overwritten(tmp_path, monkeypatch):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if kw.get("if_match") and not raced:  # another registrar moves latest first
            raced.append(None)
            raced[0] = register_adapter(storage, ws, "rex", _adapter(tmp_path, "c", b"three"))
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    mine = register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"two"))
    assert {mine["version"], raced[0]["version"]} == {"v0002", "v0003"}
    assert latest_version(storage, ws, "rex")["versions"] == ["v0001", "v0002", "v0003"]
    assert latest_version(storage, ws, "rex")["version"] == "v0003"


def test_incomplete_versions_are_never_listed_and_old_weights_stay_old(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"two"))
    (tmp_path / "ws" / "subjects" / "rex" / "v0003").mkdir()  # a registrar that crashed mid-copy
    (tmp_path / "ws" / "subjects" / "rex" / "v0003" / "CLAIM").write_bytes(b"")
    assert latest_version(storage, ws, "rex")["versions"] == ["v0001", "v0002"]
    again = register_adapter(storage, ws, "rex", _adapter(tmp_path, "c", b"one"))  # an old config rerun
    assert again["version"] == "v0001" and latest_version(storage, ws, "rex")["version"] == "v0002"
    assert register_adapter(storage, ws, "rex", _adapter(tmp_path, "d", b"new"))["version"] == "v0004"


def test_a_corrupt_foreign_entry_does_not_break_my_listing(tmp_path, caplog):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "mine", _tenant_adapter(tmp_path, "a", b"one", "t1"))
    theirs = register_adapter(storage, ws, "theirs", _tenant_adapter(tmp_path, "b", b"two", "t2"))
    (tmp_path / "ws" / "subjects" / "theirs" / "latest.json").write_text("{not json")
    Path(theirs["uri"], "adapter.json").write_text("{not json")
    assert list(list_subjects(storage, ws, "t1")) == ["mine"]
    with caplog.at_level("WARNING"):
        assert list(list_subjects(storage, ws)) == ["mine"]  # auth off: everything readable
    assert "theirs" in caplog.text


def test_tenant_listing_reads_only_that_tenants_subjects(tmp_path, monkeypatch):
    storage, ws = Storage(), str(tmp_path / "ws")
    for i in range(5):
        register_adapter(storage, ws, f"other{i}", _tenant_adapter(tmp_path, f"o{i}", bytes([i]), "t2"))
    register_adapter(storage, ws, "mine", _tenant_adapter(tmp_path, "m", b"mine", "t1"))
    touched = []
    real_read = Storage.read_bytes

    def spy(self, uri):
        touched.append(uri)
        return real_read(self, uri)

    monkeypatch.setattr(Storage, "read_bytes", spy)
    assert list(list_subjects(storage, ws, "t1")) == ["mine"]
    assert touched and not [u for u in touched if "/other" in u]


def test_traversal_ids_are_stopped_by_check_safe_id(tmp_path, monkeypatch):
    """Not vacuous: with the id check disabled the same lookup reaches alice's adapter."""
    import raydb.registry as registry
    import raydb.serving.subjects as subjects

    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "alice", _tenant_adapter(tmp_path, "a", b"one", "t1"))
    with pytest.raises(subjects.SubjectNotFound):
        subjects.find_subject(storage, ws, "../subjects/alice", "t1")
    for module in (registry, subjects):  # the modules' own references to raydb.ids.check_safe_id
        monkeypatch.setattr(module, "check_safe_id", lambda value: value)
    assert subjects.find_subject(storage, ws, "../subjects/alice", "t1").version == "v0001"


def test_registered_weights_are_the_source_bytes(tmp_path):
    """The version folder holds exactly the source weights, and its adapter.json records their sha256,
    the subject id and the version.

    Deliberate break caught: the weights written from the wrong bytes (e.g. ``adapter.json``'s
    instead of the safetensors file) — the job test only checked ``st_size > 0``.
    """
    import hashlib

    storage, ws = Storage(), str(tmp_path / "ws")
    weights = bytes(range(256)) * 9
    source = _adapter(tmp_path, "src", weights)
    record = register_adapter(storage, ws, "rex", source)
    stored = storage.read_bytes(record["uri"] + "/pytorch_lora_weights.safetensors")
    assert stored == weights
    meta = json.loads((tmp_path / "ws" / "subjects" / "rex" / "v0001" / "adapter.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256(stored).hexdigest()
    assert (meta["subject_id"], meta["version"]) == ("rex", "v0001")


def test_same_weights_with_new_metadata_make_a_new_version(tmp_path):
    """Registering the same weights is idempotent only while ``extra_metadata`` matches too: new
    metadata (another trial's settings, say) is a new version that carries it.

    Deliberate break caught: the idempotence check comparing only ``weights_sha256`` (the new
    metadata would then be silently dropped).
    """
    storage, ws = Storage(), str(tmp_path / "ws")
    source = _adapter(tmp_path, "src", b"same weights")
    first = register_adapter(storage, ws, "rex", source, extra_metadata={"trial": "a"})
    again = register_adapter(storage, ws, "rex", source, extra_metadata={"trial": "a"})
    assert again == first and first["version"] == "v0001"
    renewed = register_adapter(storage, ws, "rex", source, extra_metadata={"trial": "b"})
    assert renewed["version"] == "v0002"
    assert list_subjects(storage, ws)["rex"]["metadata"]["trial"] == "b"
    assert register_adapter(storage, ws, "rex", source)["version"] == "v0002"  # nothing new: kept
