"""The adapter registry: per-tenant subject names, versions, the atomic latest pointer, idempotence,
unsafe ids, and the move from one global namespace (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydb.ids import check_safe_id
from raydb.registry import (
    latest_version,
    list_subjects,
    list_tenants,
    migrate_registry,
    read_metadata,
    register_adapter,
    subject_uri,
)
from raydb.storage import NotFound, Storage, StorageError


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
    first = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    assert first["version"] == "v0001"
    assert latest_version(storage, ws, "t1", "rex")["uri"] == first["uri"]
    again = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "b", b"one"))  # same weights
    assert again["version"] == "v0001"
    second = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "c", b"two"))
    assert second["version"] == "v0002"
    assert latest_version(storage, ws, "t1", "rex")["version"] == "v0002"
    listing = list_subjects(storage, ws, "t1")
    assert listing["rex"]["versions"] == ["v0001", "v0002"]
    assert not list(_rex(tmp_path).glob(".*.tmp"))  # no temp files left
    with pytest.raises(NotFound, match="ghost"):
        latest_version(storage, ws, "t1", "ghost")


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", " ", "a b", "-x", "a\n", "x" * 65, "a..b"])
def test_unsafe_ids_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        check_safe_id(bad)
    with pytest.raises(ValueError):
        subject_uri(str(tmp_path), "t1", bad)
    with pytest.raises(ValueError):
        subject_uri(str(tmp_path), bad, "rex")
    with pytest.raises(ValueError):
        register_adapter(Storage(), str(tmp_path), "t1", bad, str(tmp_path))
    with pytest.raises(ValueError):
        register_adapter(Storage(), str(tmp_path), bad, "rex", str(tmp_path))
    with pytest.raises(ValueError):
        latest_version(Storage(), str(tmp_path), bad, "rex")
    with pytest.raises(ValueError):
        list_subjects(Storage(), str(tmp_path), bad)


# -- tenants can't hurt each other (issue 18) --------------------------------------------------------
def _tenant_adapter(tmp_path, name: str, weights: bytes, tenant: str) -> str:
    path = _adapter(tmp_path, name, weights)
    meta = json.loads((tmp_path / name / "adapter.json").read_text())
    meta["subject"]["tenant"] = tenant
    (tmp_path / name / "adapter.json").write_text(json.dumps(meta))
    return path


def test_two_tenants_each_have_their_own_alice(tmp_path):
    """Subject ids are per tenant (issue 24): t2 registering ``alice`` neither fails nor touches t1's
    (no squatting, no "taken" answer); each tenant lists, numbers and reads only its own."""
    storage, ws = Storage(), str(tmp_path / "ws")
    first = register_adapter(storage, ws, "t1", "alice", _tenant_adapter(tmp_path, "a", b"one", "t1"))
    theirs = register_adapter(storage, ws, "t2", "alice", _tenant_adapter(tmp_path, "b", b"two", "t2"))
    assert first["version"] == theirs["version"] == "v0001" and first["uri"] != theirs["uri"]
    assert (first["tenant"], theirs["tenant"]) == ("t1", "t2")
    assert storage.read_bytes(first["uri"] + "/pytorch_lora_weights.safetensors") == b"one"
    assert storage.read_bytes(theirs["uri"] + "/pytorch_lora_weights.safetensors") == b"two"
    assert list(list_subjects(storage, ws, "t1")) == list(list_subjects(storage, ws, "t2")) == ["alice"]
    assert list_subjects(storage, ws, "t3") == {}
    with pytest.raises(NotFound):
        latest_version(storage, ws, "t3", "alice")
    again = register_adapter(storage, ws, "t1", "alice", _tenant_adapter(tmp_path, "c", b"three", "t1"))
    assert again["version"] == "v0002" and latest_version(storage, ws, "t2", "alice")["version"] == "v0001"
    assert list_tenants(storage, ws) == ["t1", "t2"]


def test_the_stored_adapter_json_names_the_registry_tenant(tmp_path):
    """The registry's tenant is the path's: a source naming another tenant (or none) is stored
    under the tenant it was registered for, and says so."""
    storage, ws = Storage(), str(tmp_path / "ws")
    record = register_adapter(storage, ws, "t2", "alice", _tenant_adapter(tmp_path, "a", b"one", "t1"))
    meta = read_metadata(storage, record["uri"])
    assert meta["subject"] == {"tenant": "t2"} and (meta["subject_id"], meta["version"]) == ("alice", "v0001")


def test_a_source_adapter_json_that_is_not_an_object_is_refused(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter.json").write_text("[1, 2]")
    with pytest.raises(StorageError, match="adapter.json is not a JSON object"):
        register_adapter(storage, ws, "t1", "rex", str(src))
    assert not (tmp_path / "ws").exists()


def test_a_global_registry_moves_to_each_versions_tenant(tmp_path):
    """The migration (issue 24): each complete version of ``subjects/<id>/`` goes to the tenant its
    adapter.json names, under the same version name (``alice@v0002`` stays the same weights), and
    is published there; the old folders and index files are gone; a second run moves nothing."""
    storage, ws = Storage(), str(tmp_path / "ws")
    base = tmp_path / "ws" / "subjects" / "alice"
    for version, tenant in (("v0001", "t1"), ("v0002", "t2"), ("v0003", "t1")):
        _legacy_version(ws, "alice", version, tenant, version.encode())
    (base / "v0004").mkdir()  # a registration that crashed: never complete, not moved
    (base / "v0004" / "CLAIM").write_bytes(b"")
    (base / "v0001" / "lora_kohya.safetensors").write_bytes(b"kohya")  # an export travels along
    (base / "owner.json").write_text(json.dumps({"tenant": "t1", "claimed_at": "2026-01-01T00:00:00Z"}))
    (base / "latest.json").write_text(json.dumps({"subject_id": "alice", "version": "v0003", "versions": [
        {"version": "v0001", "weights_sha256": _sha(b"v0001"), "registered_at": "2026-01-01T00:00:00Z"}]}))
    (tmp_path / "ws" / "tenants" / "t1").mkdir(parents=True)
    (tmp_path / "ws" / "tenants" / "t1" / "alice.json").write_text(json.dumps({"subject_id": "alice"}))
    _legacy_version(ws, "claimed-only", "v0001", "t1")
    assert migrate_registry(storage, ws) == 4 and migrate_registry(storage, ws) == 0
    assert not (tmp_path / "ws" / "subjects").exists() or not any((tmp_path / "ws" / "subjects").iterdir())
    assert not (tmp_path / "ws" / "tenants" / "t1" / "alice.json").exists()
    mine, theirs = latest_version(storage, ws, "t1", "alice"), latest_version(storage, ws, "t2", "alice")
    assert (mine["version"], mine["versions"]) == ("v0003", ["v0001", "v0003"])
    assert (theirs["version"], theirs["versions"]) == ("v0002", ["v0002"])
    assert storage.read_bytes(f"{mine['uri']}/pytorch_lora_weights.safetensors") == b"v0003"
    v1 = tmp_path / "ws" / "tenants" / "t1" / "subjects" / "alice" / "v0001"
    assert sorted(p.name for p in v1.iterdir()) == ["CLAIM", "adapter.json", "lora_kohya.safetensors",
                                                    "pytorch_lora_weights.safetensors"]
    latest = json.loads((v1.parent / "latest.json").read_text())
    assert latest["versions"][0]["registered_at"] == "2026-01-01T00:00:00Z"  # kept from the old record
    assert list(list_subjects(storage, ws, "t1")) == ["alice", "claimed-only"]
    assert list(list_subjects(storage, ws, "t2")) == ["alice"]
    # the next registration numbers on from the moved versions
    assert register_adapter(storage, ws, "t2", "alice", _adapter(tmp_path, "n", b"new"))["version"] == "v0003"


def test_a_migration_that_cannot_move_a_version_keeps_the_old_folder(tmp_path, caplog):
    """A version naming an unusable tenant, or whose place is held by other weights, stays where it
    is (logged) with the rest of its subject's old folder, for the operator to look at; the movable
    versions still move, and rerunning changes nothing."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _legacy_version(ws, "e", "v0001", "../evil")
    _legacy_version(ws, "e", "v0002", "t1", b"fine")
    _legacy_version(ws, "f", "v0001", "t1", b"old")
    register_adapter(storage, ws, "t1", "f", _adapter(tmp_path, "x", b"newer"))  # f@v0001 taken in t1
    with caplog.at_level("WARNING", logger="raydb.registry"):
        assert migrate_registry(storage, ws) == 1
    assert latest_version(storage, ws, "t1", "e")["versions"] == ["v0002"]
    assert (tmp_path / "ws" / "subjects" / "e" / "v0001").is_dir()
    assert (tmp_path / "ws" / "subjects" / "f" / "v0001").is_dir()
    f = latest_version(storage, ws, "t1", "f")["uri"]
    assert storage.read_bytes(f + "/pytorch_lora_weights.safetensors") == b"newer"
    messages = [r.getMessage() for r in caplog.records]
    assert any("its tenant is unusable" in m and "'../evil' contains '..'" in m for m in messages), messages
    assert any("already holds other weights" in m for m in messages), messages


def test_two_concurrent_registrations_leave_latest_on_the_highest_version(tmp_path, monkeypatch):
    """Registrar A claims v0002 and is slow; B registers v0003 meanwhile; A must not move latest back."""
    import raydb.registry as registry

    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    real_publish = registry._publish
    interleaved = []

    def slow_publish(storage_, ws_, sid, entry):
        if not interleaved:  # A, between writing its files and moving latest: B runs to completion
            interleaved.append(None)
            interleaved[0] = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "c", b"three"))
        return real_publish(storage_, ws_, sid, entry)

    monkeypatch.setattr(registry, "_publish", slow_publish)
    a = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "b", b"two"))
    assert (a["version"], interleaved[0]["version"]) == ("v0002", "v0003")
    latest = latest_version(storage, ws, "t1", "rex")
    assert latest["version"] == "v0003" and latest["versions"] == ["v0001", "v0002", "v0003"]


def test_cas_conflict_is_retried_not_overwritten(tmp_path, monkeypatch):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if kw.get("if_match") and not raced:  # another registrar moves latest first
            raced.append(None)
            raced[0] = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "c", b"three"))
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    mine = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "b", b"two"))
    assert {mine["version"], raced[0]["version"]} == {"v0002", "v0003"}
    assert latest_version(storage, ws, "t1", "rex")["versions"] == ["v0001", "v0002", "v0003"]
    assert latest_version(storage, ws, "t1", "rex")["version"] == "v0003"


def test_incomplete_versions_are_never_listed_and_old_weights_stay_old(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "b", b"two"))
    (_rex(tmp_path) / "v0003").mkdir()  # a registrar that crashed mid-copy
    (_rex(tmp_path) / "v0003" / "CLAIM").write_bytes(b"")
    assert latest_version(storage, ws, "t1", "rex")["versions"] == ["v0001", "v0002"]
    again = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "c", b"one"))  # an old config rerun
    assert again["version"] == "v0001" and latest_version(storage, ws, "t1", "rex")["version"] == "v0002"
    assert register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "d", b"new"))["version"] == "v0004"


def test_a_corrupt_entry_does_not_break_the_rest_of_a_listing(tmp_path, caplog):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "mine", _tenant_adapter(tmp_path, "a", b"one", "t1"))
    broken = register_adapter(storage, ws, "t1", "broken", _tenant_adapter(tmp_path, "b", b"two", "t1"))
    listed = register_adapter(storage, ws, "t1", "listed", _tenant_adapter(tmp_path, "c", b"three", "t1"))
    (tmp_path / "ws" / "tenants" / "t1" / "subjects" / "broken" / "latest.json").write_text("{not json")
    Path(broken["uri"], "adapter.json").write_text("{not json")
    Path(listed["uri"], "adapter.json").write_text("7")  # JSON, not an object
    with caplog.at_level("WARNING"):
        assert list(list_subjects(storage, ws, "t1")) == ["mine"]
    assert "'t1/broken'" in caplog.text and "'t1/listed'" in caplog.text


def test_tenant_listing_reads_only_that_tenants_subjects(tmp_path, monkeypatch):
    storage, ws = Storage(), str(tmp_path / "ws")
    for i in range(5):
        register_adapter(storage, ws, "t2", f"other{i}", _tenant_adapter(tmp_path, f"o{i}", bytes([i]), "t2"))
    register_adapter(storage, ws, "t1", "mine", _tenant_adapter(tmp_path, "m", b"mine", "t1"))
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
    register_adapter(storage, ws, "t2", "alice", _tenant_adapter(tmp_path, "a", b"one", "t2"))
    register_adapter(storage, ws, "t1", "mine", _tenant_adapter(tmp_path, "m", b"mine", "t1"))
    sneaky = "../../t2/subjects/alice"  # from t1's subjects folder into t2's
    with pytest.raises(subjects.SubjectNotFound):
        subjects.find_subject(storage, ws, "t1", sneaky)
    for module in (registry, subjects):  # the modules' own references to raydb.ids.check_safe_id
        monkeypatch.setattr(module, "check_safe_id", lambda value: value)
    assert subjects.find_subject(storage, ws, "t1", sneaky).version == "v0001"


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
    record = register_adapter(storage, ws, "t1", "rex", source)
    stored = storage.read_bytes(record["uri"] + "/pytorch_lora_weights.safetensors")
    assert stored == weights
    meta = json.loads((_rex(tmp_path) / "v0001" / "adapter.json").read_text())
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
    first = register_adapter(storage, ws, "t1", "rex", source, extra_metadata={"trial": "a"})
    again = register_adapter(storage, ws, "t1", "rex", source, extra_metadata={"trial": "a"})
    assert again == first and first["version"] == "v0001"
    renewed = register_adapter(storage, ws, "t1", "rex", source, extra_metadata={"trial": "b"})
    assert renewed["version"] == "v0002"
    assert list_subjects(storage, ws, "t1")["rex"]["metadata"]["trial"] == "b"
    assert register_adapter(storage, ws, "t1", "rex", source)["version"] == "v0002"  # nothing new: kept


# -- exact records, listings, migration (issue 19: what the mutants showed untested) --------------
def _legacy_version(ws, subject: str, version: str, tenant: str, weights: bytes = b"w") -> None:
    """A version folder of the global namespace (``subjects/<id>/vNNNN``, before issue 24)."""
    _version_folder(Path(ws) / "subjects" / subject / version, tenant, weights)


def _version_folder(folder: Path, tenant: str, weights: bytes = b"w") -> None:
    import hashlib

    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(weights)
    (folder / "adapter.json").write_text(json.dumps({"subject": {"tenant": tenant},
                                                     "weights_sha256": hashlib.sha256(weights).hexdigest()}))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _rex(tmp_path) -> Path:
    return tmp_path / "ws" / "tenants" / "t1" / "subjects" / "rex"


def test_records_are_exact_with_a_utc_timestamp(tmp_path, monkeypatch):
    """Every record the registry writes or returns, key by key, with ``registered_at`` the UTC time
    as ``YYYY-MM-DDTHH:MM:SSZ`` (read from ``time.gmtime``, never the local time)."""
    import time
    import types

    import raydb.registry as registry

    fixed = time.struct_time((2026, 1, 2, 3, 4, 5, 4, 2, 0))
    monkeypatch.setattr(registry, "time", types.SimpleNamespace(strftime=time.strftime, gmtime=lambda: fixed))
    storage, ws = Storage(), str(tmp_path / "ws")
    record = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    uri = str(_rex(tmp_path) / "v0001")
    stamp = "2026-01-02T03:04:05Z"
    assert record == {"tenant": "t1", "subject_id": "rex", "version": "v0001", "uri": uri,
                      "registered_at": stamp}
    entry = {"version": "v0001", "weights_sha256": _sha(b"one"), "registered_at": stamp}
    assert json.loads((_rex(tmp_path) / "latest.json").read_text()) == {
        "subject_id": "rex", "version": "v0001", "registered_at": stamp, "versions": [entry]}
    assert sorted(p.name for p in (tmp_path / "ws" / "tenants" / "t1").iterdir()) == ["subjects"]
    assert latest_version(storage, ws, "t1", "rex") == record | {"versions": ["v0001"]}


def test_versions_order_numerically_past_v9999(tmp_path):
    """v9999 < v10000 (numbers, not strings): the next number follows the highest folder, and latest
    moves to the highest version."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _version_folder(_rex(tmp_path) / "v9999", "t1", b"a")
    _version_folder(_rex(tmp_path) / "v10000", "t1", b"b")
    (_rex(tmp_path) / "latest.json").write_text(json.dumps({"version": "v10000", "versions": [
        {"version": "v10000"}, {"version": "v9999"}]}))
    assert latest_version(storage, ws, "t1", "rex")["versions"] == ["v10000", "v9999"]  # as recorded
    assert register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "c", b"c"))["version"] == "v10001"
    latest = latest_version(storage, ws, "t1", "rex")
    assert latest["version"] == "v10001" and latest["versions"] == ["v9999", "v10000", "v10001"]


def test_a_v0999_registry_moves_on_to_v1000(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    _version_folder(_rex(tmp_path) / "v0999", "t1", b"a")
    (_rex(tmp_path) / "latest.json").write_text(json.dumps({"version": "v0999", "versions": [
        {"version": "v0999"}]}))
    assert register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "c", b"c"))["version"] == "v1000"
    latest = latest_version(storage, ws, "t1", "rex")
    assert latest["version"] == "v1000" and latest["versions"] == ["v0999", "v1000"]


def test_folders_that_are_not_versions_are_ignored(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    (_rex(tmp_path) / "v0001X").mkdir(parents=True)  # not a version name
    assert register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))["version"] == "v0001"


def test_malformed_entries_of_a_versions_list_are_left_out(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    path = _rex(tmp_path) / "latest.json"
    record = json.loads(path.read_text())
    record["versions"] += [{"version": "junk"}, {"version": "../v0002"}, {"no": "version"}, "v0003"]
    path.write_text(json.dumps(record))
    assert latest_version(storage, ws, "t1", "rex")["versions"] == ["v0001"]


def test_first_publish_races_are_merged_not_overwritten(tmp_path, monkeypatch):
    """Two registrars both find no latest.json; the second to write must merge, not overwrite."""
    storage, ws = Storage(), str(tmp_path / "ws")
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if uri.endswith("latest.json") and not raced:  # the other registrar creates latest.json first
            raced.append(None)
            raced[0] = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "b", b"two"))
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    mine = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    assert (mine["version"], raced[0]["version"]) == ("v0001", "v0002")
    latest = latest_version(storage, ws, "t1", "rex")
    assert latest["version"] == "v0002" and latest["versions"] == ["v0001", "v0002"]


def test_listing_skips_unpublished_and_corrupt_subjects_and_logs_exactly(tmp_path, caplog):
    """Entries around a skipped one are still listed; ids ending in 'X' are not mangled."""
    storage, ws = Storage(), str(tmp_path / "ws")
    for sid in ("a", "c", "e", "BOX"):
        register_adapter(storage, ws, "t1", sid, _adapter(tmp_path, sid, sid.encode()))
    (tmp_path / "ws" / "tenants" / "t1" / "subjects" / "b" / "v0001").mkdir(parents=True)  # never published
    register_adapter(storage, ws, "t1", "d", _adapter(tmp_path, "d", b"d"))
    (tmp_path / "ws" / "tenants" / "t1" / "subjects" / "d" / "latest.json").write_text("[]")  # corrupt
    (tmp_path / "ws" / "tenants" / "t1" / "subjects" / "notes.txt").write_text("not a subject")
    with caplog.at_level("WARNING", logger="raydb.registry"):
        listing = list_subjects(storage, ws, "t1")
    assert list(listing) == ["BOX", "a", "c", "e"]
    assert listing["c"]["versions"] == ["v0001"] and listing["c"]["metadata"]["weights_sha256"] == _sha(b"c")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("raydb.registry", "WARNING",
         "registry: skipping subject 't1/d' in a listing: latest.json of subject 't1/d' is malformed")]


def test_list_tenants_leaves_out_files_and_unsafe_names(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    for name in ("t2", "t1", "bad name"):
        (tmp_path / "ws" / "tenants" / name).mkdir(parents=True)
    (tmp_path / "ws" / "tenants" / "t3.json").write_text("{}")
    assert list_tenants(storage, ws) == ["t1", "t2"]
    assert list_tenants(storage, str(tmp_path / "empty")) == []


def test_migration_counts_each_version_and_leaves_the_new_layout_alone(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "a", _adapter(tmp_path, "a", b"a"))  # already per tenant
    for sid, tenant in (("b", "t1"), ("c", "t2"), ("dX", "t2"), ("f", "t1")):
        _legacy_version(ws, sid, "v0001", tenant, sid.encode())
    _legacy_version(ws, "g", "v0001", "t1")
    _version_folder(Path(ws) / "subjects" / "g" / "v0002", "", b"no tenant")  # names none: default's
    (Path(ws) / "subjects" / "stray.txt").write_text("not a subject")
    assert migrate_registry(storage, ws) == 6
    assert list(list_subjects(storage, ws, "t1")) == ["a", "b", "f", "g"]
    assert list(list_subjects(storage, ws, "t2")) == ["c", "dX"]
    assert latest_version(storage, ws, "default", "g")["versions"] == ["v0002"]
    assert latest_version(storage, ws, "t1", "a")["versions"] == ["v0001"]
    assert sorted(p.name for p in (Path(ws) / "subjects").iterdir()) == ["stray.txt"]


def test_version_claim_race_takes_the_next_free_number(tmp_path, monkeypatch):
    """Another registrar claims the number first: take the next one; never write into its folder or
    into a folder without a CLAIM marker (as migration or a copy leaves them)."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _version_folder(_rex(tmp_path) / "v0001", "t1", b"legacy")
    (_rex(tmp_path) / "latest.json").write_text(json.dumps({"version": "v0001", "versions": [
        {"version": "v0001", "weights_sha256": _sha(b"legacy")}]}))
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if uri.endswith("/CLAIM") and not raced:
            raced.append(None)
            raced[0] = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "b", b"theirs"))
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    mine = register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"mine"))
    assert (raced[0]["version"], mine["version"]) == ("v0002", "v0003")
    weights = "pytorch_lora_weights.safetensors"
    stored = [(_rex(tmp_path) / v / weights).read_bytes() for v in ("v0001", "v0002", "v0003")]
    assert stored == [b"legacy", b"theirs", b"mine"]
    assert latest_version(storage, ws, "t1", "rex")["versions"] == ["v0001", "v0002", "v0003"]


def test_version_folder_layout_is_exact(tmp_path):
    """The documented layout: weights, adapter.json and an empty CLAIM marker; nothing else."""
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "t1", "rex", _adapter(tmp_path, "a", b"one"))
    folder = _rex(tmp_path) / "v0001"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["CLAIM", "adapter.json", "pytorch_lora_weights.safetensors"]
    assert (folder / "CLAIM").read_bytes() == b""


def test_a_version_without_its_adapter_json_is_not_reused(tmp_path):
    """Same weights and extra metadata, but the old version's adapter.json is gone: its metadata
    cannot be confirmed, so a new version is registered (no crash)."""
    storage, ws = Storage(), str(tmp_path / "ws")
    source = _adapter(tmp_path, "src", b"same")
    trial = {"trial": "a"}
    assert register_adapter(storage, ws, "t1", "rex", source, extra_metadata=trial)["version"] == "v0001"
    (_rex(tmp_path) / "v0001" / "adapter.json").unlink()
    assert register_adapter(storage, ws, "t1", "rex", source, extra_metadata=trial)["version"] == "v0002"


def test_malformed_registry_files_raise_exact_messages(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    base = tmp_path / "ws" / "tenants" / "t1" / "subjects" / "alice"
    base.mkdir(parents=True)
    (base / "latest.json").write_text("{not json")
    try:
        json.loads("{not json")
    except json.JSONDecodeError as exc:
        detail = str(exc)
    with pytest.raises(StorageError) as info:
        latest_version(storage, ws, "t1", "alice")
    assert str(info.value) == f"latest.json of subject 't1/alice' is not valid JSON: {detail}"
    for bad in ({"version": "v0001"}, {"versions": []}, [], {"version": 1, "versions": []}):
        (base / "latest.json").write_text(json.dumps(bad))
        with pytest.raises(StorageError) as info:
            latest_version(storage, ws, "t1", "alice")
        assert str(info.value) == "latest.json of subject 't1/alice' is malformed", bad
    (base / "v0001").mkdir()
    (base / "v0001" / "adapter.json").write_text('"a string"')
    with pytest.raises(StorageError) as info:
        read_metadata(storage, str(base / "v0001"))
    assert str(info.value) == f"{base}/v0001/adapter.json is not a JSON object"
