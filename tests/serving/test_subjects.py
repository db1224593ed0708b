"""Tenant isolation in the registry view of the server, without Ray: ``tenant_subjects`` (the
``GET /v1/subjects`` rows) and ``find_subject`` (the lookup behind ``POST /v1/generate``). Subject
ids are per tenant: t1 and t2 each have an ``alice`` of their own."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from raydb.registry import register_adapter
from raydb.serving.subjects import SubjectNotFound, find_subject, model_id, parse_model_id, tenant_subjects
from raydb.storage import Storage

SUBJECTS = [("t1", "alice"), ("t1", "bob"), ("t2", "carol"), ("t2", "alice")]


@pytest.fixture
def workspace(tmp_path) -> str:
    ws = str(tmp_path / "ws")
    for tenant, sid in SUBJECTS:
        src = tmp_path / f"src-{tenant}-{sid}"
        src.mkdir()
        weights = f"{tenant}-{sid}".encode()
        (src / "pytorch_lora_weights.safetensors").write_bytes(weights)
        (src / "adapter.json").write_text(json.dumps({
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "subject": {"tenant": tenant, "instance_token": "sks", "instance_prompt": f"a photo of sks {sid}",
                        "class_prompt": f"a photo of a dog of {tenant}"},
            "base_model": {"pretrained": "s3://operator-models/sd15", "identity": "local-3f2a",
                           "family": "sd"}}))
        register_adapter(Storage(), ws, tenant, sid, str(src))
    return ws


def test_each_tenant_lists_only_its_own_subjects(workspace):
    """Deliberate break caught: the tenant folder dropped from the listing (every tenant would list
    every subject)."""
    storage = Storage()
    assert [r["subject_id"] for r in tenant_subjects(storage, workspace, "t1")] == ["alice", "bob"]
    assert [r["subject_id"] for r in tenant_subjects(storage, workspace, "t2")] == ["alice", "carol"]
    assert tenant_subjects(storage, workspace, "t3") == []
    rows = tenant_subjects(storage, workspace, "t2")
    assert [r["class_prompt"] for r in rows] == ["a photo of a dog of t2"] * 2  # t2's alice, not t1's
    assert rows[1] | {"registered_at": None} == {
        "subject_id": "carol", "tenant": "t2", "latest_version": "v0001", "versions": ["v0001"],
        "registered_at": None, "instance_token": "sks", "instance_prompt": "a photo of sks carol",
        "class_prompt": "a photo of a dog of t2", "family": "sd"}
    # where the operator keeps the base model (a path or bucket) and its identity never reach a tenant
    listed = json.dumps([tenant_subjects(storage, workspace, t) for t in ("t1", "t2")])
    assert "operator-models" not in listed and "local-3f2a" not in listed


def test_find_subject_resolves_tenant_and_id_and_a_foreign_id_is_a_missing_one(workspace):
    """Each tenant's ``alice`` is its own adapter; another tenant's subject raises the same
    SubjectNotFound, with the same message, as an unknown one (issue 24: per-tenant names)."""
    storage = Storage()
    found = find_subject(storage, workspace, "t2", "carol")
    assert (found.tenant, found.subject_id, found.version) == ("t2", "carol", "v0001")
    assert found.uri.endswith("tenants/t2/subjects/carol/v0001")
    mine, theirs = (find_subject(storage, workspace, tenant, "alice") for tenant in ("t1", "t2"))
    assert mine.uri.endswith("tenants/t1/subjects/alice/v0001")
    assert theirs.uri.endswith("tenants/t2/subjects/alice/v0001")
    assert mine.metadata["weights_sha256"] != theirs.metadata["weights_sha256"]
    with pytest.raises(SubjectNotFound) as other:
        find_subject(storage, workspace, "t1", "carol")
    with pytest.raises(SubjectNotFound) as missing:
        find_subject(storage, workspace, "t1", "nobody")
    assert str(other.value) == str(missing.value).replace("nobody", "carol")
    for bad in ("../carol", "../t2/subjects/carol", "a/b", ""):
        with pytest.raises(SubjectNotFound):
            find_subject(storage, workspace, "t1", bad)


def test_model_ids_round_trip_and_reject_path_tricks():
    """Deliberate break caught: ``parse_model_id`` accepting a version that is not ``vNNNN``."""
    assert model_id("t1", "alice", "v0012") == "t1/alice@v0012"
    assert parse_model_id(model_id("t1", "alice", "v0012")) == ("t1", "alice", "v0012")
    for bad in ("alice", "t1/alice@", "t1/alice@v1", "t1/alice@../v0001", "t1/../x@v0001", "alice@v0001",
                "t1/alice@v0001x", "t1/a/b@v0001", "/alice@v0001", "t1/@v0001"):
        with pytest.raises(ValueError):
            parse_model_id(bad)


def test_messages_name_the_subject_and_unreadable_entries_are_logged(workspace, tmp_path, caplog):
    """The 404's message names the subject the caller asked for (and nothing else); an unreadable
    registry entry is logged with the subject and the storage error, and answered like a missing one."""
    storage = Storage()
    with pytest.raises(SubjectNotFound) as missing:
        find_subject(storage, workspace, "t1", "nobody")
    assert str(missing.value) == "unknown subject 'nobody'"
    with pytest.raises(SubjectNotFound) as bad:
        find_subject(storage, workspace, "t1", "../x")
    assert str(bad.value) == "unknown subject '../x'"
    bob = tmp_path / "ws" / "tenants" / "t1" / "subjects" / "bob"
    (bob / "v0001" / "adapter.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="raydb.serving.subjects"):
        with pytest.raises(SubjectNotFound) as broken:
            find_subject(storage, workspace, "t1", "bob")
    assert str(broken.value) == "unknown subject 'bob'"
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("registry entry of subject 't1/bob' is unreadable: ")
    assert "adapter.json is not valid JSON" in message


def test_an_adapter_json_that_is_not_an_object_is_not_found_and_not_listed(workspace, tmp_path, caplog):
    """JSON that parses to a list (or a number) is as corrupt as JSON that does not parse: the owner
    gets 404 from generate and a listing without it, never a 500 (issue 24; before, ``meta.get``
    raised AttributeError in both)."""
    storage = Storage()
    (tmp_path / "ws" / "tenants" / "t1" / "subjects" / "bob" / "v0001" / "adapter.json").write_text("[1, 2]")
    with caplog.at_level("WARNING"):
        with pytest.raises(SubjectNotFound):
            find_subject(storage, workspace, "t1", "bob")
        assert [r["subject_id"] for r in tenant_subjects(storage, workspace, "t1")] == ["alice"]
    assert "adapter.json is not a JSON object" in caplog.text


def test_rows_of_adapters_without_subject_or_base_model_metadata(tmp_path):
    """An adapter.json with neither ``subject`` nor ``base_model`` (registered by hand) still lists
    with empty fields; ``registered_at`` is the registration time."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (src / "adapter.json").write_text(json.dumps({"weights_sha256": hashlib.sha256(b"w").hexdigest()}))
    ws = str(tmp_path / "ws")
    register_adapter(Storage(), ws, "default", "plain", str(src))
    [row] = tenant_subjects(Storage(), ws, "default")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row.pop("registered_at"))
    assert row == {"subject_id": "plain", "tenant": "default", "latest_version": "v0001",
                   "versions": ["v0001"], "instance_token": None, "instance_prompt": None,
                   "class_prompt": None, "family": None}


def test_parse_model_id_messages():
    with pytest.raises(ValueError) as err:
        parse_model_id("t1/a@b@v0001")  # the first '@' splits: the version part is not vNNNN
    assert str(err.value) == "bad adapter id 't1/a@b@v0001' (expected <tenant>/<subject>@vNNNN)"
    with pytest.raises(ValueError, match="not a safe id"):
        parse_model_id("t1/a b@v0001")
    with pytest.raises(ValueError, match="not a safe id"):
        parse_model_id("t 1/a@v0001")
