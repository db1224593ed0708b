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


# -- exact records, legacy registries, listings (issue 19: what the mutants showed untested) -------
def _legacy_version(ws, subject: str, version: str, tenant: str, weights: bytes = b"w") -> None:
    """A version folder as registries before owner records wrote it: no CLAIM, no owner.json."""
    import hashlib

    folder = Path(ws) / "subjects" / subject / version
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(weights)
    (folder / "adapter.json").write_text(json.dumps({"subject": {"tenant": tenant},
                                                     "weights_sha256": hashlib.sha256(weights).hexdigest()}))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_records_are_exact_with_a_utc_timestamp(tmp_path, monkeypatch):
    """Every record the registry writes or returns, key by key, with ``registered_at``/``claimed_at``
    the UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (read from ``time.gmtime``, never the local time)."""
    import time
    import types

    import raydb.registry as registry

    fixed = time.struct_time((2026, 1, 2, 3, 4, 5, 4, 2, 0))
    monkeypatch.setattr(registry, "time", types.SimpleNamespace(strftime=time.strftime, gmtime=lambda: fixed))
    storage, ws = Storage(), str(tmp_path / "ws")
    record = register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    uri = str(tmp_path / "ws" / "subjects" / "rex" / "v0001")
    stamp = "2026-01-02T03:04:05Z"
    assert record == {"subject_id": "rex", "version": "v0001", "uri": uri, "registered_at": stamp}
    base = tmp_path / "ws" / "subjects" / "rex"
    entry = {"version": "v0001", "weights_sha256": _sha(b"one"), "registered_at": stamp}
    assert json.loads((base / "latest.json").read_text()) == {
        "subject_id": "rex", "version": "v0001", "registered_at": stamp, "versions": [entry]}
    assert json.loads((base / "owner.json").read_text()) == {"tenant": "t1", "claimed_at": stamp}
    assert json.loads((tmp_path / "ws" / "tenants" / "t1" / "rex.json").read_text()) == {"subject_id": "rex"}
    assert latest_version(storage, ws, "rex") == record | {"versions": ["v0001"]}


def test_claim_error_message_is_exact(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    claim_subject(storage, ws, "alice", "t1")
    claim_subject(storage, ws, "alice", "t1")  # the owner again: fine
    with pytest.raises(SubjectOwned) as info:
        claim_subject(storage, ws, "alice", "t2")
    assert str(info.value) == ("subject.id 'alice' is already registered by another tenant; "
                               "choose another subject.id")


def test_a_legacy_subject_cannot_be_claimed_by_a_newcomer(tmp_path):
    """claim_subject migrates first: the legacy id stays with its oldest version's tenant."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _legacy_version(ws, "alice", "v0001", "t1")
    with pytest.raises(SubjectOwned):
        claim_subject(storage, ws, "alice", "t2")
    assert subject_owner(storage, ws, "alice") == "t1"
    claim_subject(storage, ws, "alice", "t1")


def test_registering_onto_a_legacy_latest_keeps_its_versions(tmp_path):
    """A latest.json without a ``versions`` list: its complete folders (with their weights' sha256)
    count, so the same weights are recognised and a new version joins the old ones."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _legacy_version(ws, "rex", "v0001", "t1", b"one")
    (tmp_path / "ws" / "subjects" / "rex" / "latest.json").write_text(json.dumps({"version": "v0001"}))
    assert register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))["version"] == "v0001"
    assert register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"two"))["version"] == "v0002"
    latest = json.loads((tmp_path / "ws" / "subjects" / "rex" / "latest.json").read_text())
    assert [{k: v for k, v in e.items() if k != "registered_at"} for e in latest["versions"]] == [
        {"version": "v0001", "weights_sha256": _sha(b"one")},
        {"version": "v0002", "weights_sha256": _sha(b"two")},
    ]
    assert latest["version"] == "v0002"
    assert latest_version(storage, ws, "rex")["versions"] == ["v0001", "v0002"]


def test_versions_order_numerically_past_v9999(tmp_path):
    """v9999 < v10000 (numbers, not strings): the oldest version owns a legacy id, and latest moves
    to the highest version."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _legacy_version(ws, "rex", "v9999", "t1", b"a")
    _legacy_version(ws, "rex", "v10000", "t2", b"b")
    (tmp_path / "ws" / "subjects" / "rex" / "latest.json").write_text(json.dumps({"version": "v10000"}))
    assert latest_version(storage, ws, "rex")["versions"] == ["v9999", "v10000"]
    assert subject_owner(storage, ws, "rex") == "t1"
    assert register_adapter(storage, ws, "rex", _adapter(tmp_path, "c", b"c"))["version"] == "v10001"
    latest = latest_version(storage, ws, "rex")
    assert latest["version"] == "v10001" and latest["versions"] == ["v9999", "v10000", "v10001"]


def test_a_v0999_registry_moves_on_to_v1000(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    _legacy_version(ws, "rex", "v0999", "t1", b"a")
    (tmp_path / "ws" / "subjects" / "rex" / "latest.json").write_text(json.dumps({"version": "v0999"}))
    assert register_adapter(storage, ws, "rex", _adapter(tmp_path, "c", b"c"))["version"] == "v1000"
    latest = latest_version(storage, ws, "rex")
    assert latest["version"] == "v1000" and latest["versions"] == ["v0999", "v1000"]


def test_folders_that_are_not_versions_are_ignored(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    (tmp_path / "ws" / "subjects" / "rex" / "v0001X").mkdir(parents=True)  # not a version name
    assert register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))["version"] == "v0001"


def test_malformed_entries_of_a_versions_list_are_left_out(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    path = tmp_path / "ws" / "subjects" / "rex" / "latest.json"
    record = json.loads(path.read_text())
    record["versions"] += [{"version": "junk"}, {"version": "../v0002"}, {"no": "version"}]
    path.write_text(json.dumps(record))
    assert latest_version(storage, ws, "rex")["versions"] == ["v0001"]


def test_first_publish_races_are_merged_not_overwritten(tmp_path, monkeypatch):
    """Two registrars both find no latest.json; the second to write must merge, not overwrite."""
    storage, ws = Storage(), str(tmp_path / "ws")
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if uri.endswith("latest.json") and not raced:  # the other registrar creates latest.json first
            raced.append(None)
            raced[0] = register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"two"))
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    mine = register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    assert (mine["version"], raced[0]["version"]) == ("v0001", "v0002")
    latest = latest_version(storage, ws, "rex")
    assert latest["version"] == "v0002" and latest["versions"] == ["v0001", "v0002"]


def test_listing_skips_claimed_and_corrupt_subjects_and_logs_exactly(tmp_path, caplog):
    """Entries around a skipped one are still listed; ids ending in 'X' are not mangled."""
    storage, ws = Storage(), str(tmp_path / "ws")
    for sid in ("a", "c", "e", "BOX"):
        register_adapter(storage, ws, sid, _adapter(tmp_path, sid, sid.encode()))
    claim_subject(storage, ws, "b", "t1")  # claimed, nothing published yet
    register_adapter(storage, ws, "d", _adapter(tmp_path, "d", b"d"))
    (tmp_path / "ws" / "subjects" / "d" / "latest.json").write_text("[]")  # corrupt
    with caplog.at_level("WARNING", logger="raydb.registry"):
        listing = list_subjects(storage, ws)
        by_tenant = list_subjects(storage, ws, "t1")
    assert list(listing) == list(by_tenant) == ["BOX", "a", "c", "e"]
    assert listing["c"]["versions"] == ["v0001"] and listing["c"]["metadata"]["weights_sha256"] == _sha(b"c")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == 2 * [
        ("raydb.registry", "WARNING",
         "registry: skipping subject 'd' in a listing: latest.json of subject 'd' is malformed")]


def test_migration_counts_each_subject_and_logs_a_bad_one(tmp_path, caplog):
    storage, ws = Storage(), str(tmp_path / "ws")
    claim_subject(storage, ws, "a", "t1")  # already has an owner record
    _legacy_version(ws, "b", "v0001", "t1")
    _legacy_version(ws, "c", "v0001", "t2")
    _legacy_version(ws, "dX", "v0001", "t2")
    _legacy_version(ws, "e", "v0001", "../evil")  # a legacy record naming an unsafe tenant
    _legacy_version(ws, "f", "v0001", "t1")
    with caplog.at_level("WARNING", logger="raydb.registry"):
        assert migrate_registry(storage, ws) == 4
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("raydb.registry", "WARNING", "registry migration: skipping subject 'e': '../evil' contains '..'")]
    owners = [subject_owner(storage, ws, s) for s in ("a", "b", "c", "dX", "f")]
    assert owners == ["t1", "t1", "t2", "t2", "t1"]
    assert sorted(p.name for p in (tmp_path / "ws" / "tenants" / "t2").iterdir()) == ["c.json", "dX.json"]


def test_owner_race_the_later_claim_loses(tmp_path, monkeypatch):
    """Both tenants find no owner.json; the one whose create-if-absent write comes second loses."""
    storage, ws = Storage(), str(tmp_path / "ws")
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if uri.endswith("owner.json") and not raced:  # t2 claims first, in full
            raced.append(None)
            claim_subject(storage, ws, "alice", "t2")
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    with pytest.raises(SubjectOwned):
        claim_subject(storage, ws, "alice", "t1")
    assert subject_owner(storage, ws, "alice") == "t2"
    assert sorted(p.name for p in (tmp_path / "ws" / "tenants").iterdir()) == ["t2"]


def test_version_claim_race_takes_the_next_free_number(tmp_path, monkeypatch):
    """Another registrar claims the number first: take the next one; never write into its folder or
    into a legacy folder (which has no CLAIM marker)."""
    storage, ws = Storage(), str(tmp_path / "ws")
    _legacy_version(ws, "rex", "v0001", "t1", b"legacy")
    (tmp_path / "ws" / "subjects" / "rex" / "latest.json").write_text(json.dumps({"version": "v0001"}))
    real_write = Storage.write_bytes
    raced = []

    def racing_write(self, uri, data, **kw):
        if uri.endswith("/CLAIM") and not raced:
            raced.append(None)
            raced[0] = register_adapter(storage, ws, "rex", _adapter(tmp_path, "b", b"theirs"))
        return real_write(self, uri, data, **kw)

    monkeypatch.setattr(Storage, "write_bytes", racing_write)
    mine = register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"mine"))
    assert (raced[0]["version"], mine["version"]) == ("v0002", "v0003")
    base = tmp_path / "ws" / "subjects" / "rex"
    weights = "pytorch_lora_weights.safetensors"
    stored = [(base / v / weights).read_bytes() for v in ("v0001", "v0002", "v0003")]
    assert stored == [b"legacy", b"theirs", b"mine"]
    assert latest_version(storage, ws, "rex")["versions"] == ["v0001", "v0002", "v0003"]


def test_version_folder_layout_is_exact(tmp_path):
    """The documented layout: weights, adapter.json and an empty CLAIM marker; nothing else."""
    storage, ws = Storage(), str(tmp_path / "ws")
    register_adapter(storage, ws, "rex", _adapter(tmp_path, "a", b"one"))
    folder = tmp_path / "ws" / "subjects" / "rex" / "v0001"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["CLAIM", "adapter.json", "pytorch_lora_weights.safetensors"]
    assert (folder / "CLAIM").read_bytes() == b""


def test_an_adapter_without_a_tenant_belongs_to_default(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (src / "adapter.json").write_text(json.dumps({"weights_sha256": _sha(b"w")}))
    register_adapter(storage, ws, "rex", str(src))
    assert subject_owner(storage, ws, "rex") == "default"
    assert list(list_subjects(storage, ws, "default")) == ["rex"]


def test_a_version_without_its_adapter_json_is_not_reused(tmp_path):
    """Same weights and extra metadata, but the old version's adapter.json is gone: its metadata
    cannot be confirmed, so a new version is registered (no crash)."""
    storage, ws = Storage(), str(tmp_path / "ws")
    source = _adapter(tmp_path, "src", b"same")
    assert register_adapter(storage, ws, "rex", source, extra_metadata={"trial": "a"})["version"] == "v0001"
    (tmp_path / "ws" / "subjects" / "rex" / "v0001" / "adapter.json").unlink()
    assert register_adapter(storage, ws, "rex", source, extra_metadata={"trial": "a"})["version"] == "v0002"


def test_malformed_registry_files_raise_exact_messages(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    base = tmp_path / "ws" / "subjects" / "alice"
    base.mkdir(parents=True)
    (base / "owner.json").write_text(json.dumps({"tenant": 5}))
    with pytest.raises(StorageError) as info:
        subject_owner(storage, ws, "alice")
    assert str(info.value) == f"{base}/owner.json is malformed"
    (base / "latest.json").write_text("{not json")
    try:
        json.loads("{not json")
    except json.JSONDecodeError as exc:
        detail = str(exc)
    with pytest.raises(StorageError) as info:
        latest_version(storage, ws, "alice")
    assert str(info.value) == f"latest.json of subject 'alice' is not valid JSON: {detail}"


def test_a_legacy_version_naming_no_tenant_leaves_the_id_unowned(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    folder = tmp_path / "ws" / "subjects" / "rex" / "v0001"
    folder.mkdir(parents=True)
    (folder / "adapter.json").write_text(json.dumps({"weights_sha256": "x"}))
    assert subject_owner(storage, ws, "rex") is None
    assert migrate_registry(storage, ws) == 0
