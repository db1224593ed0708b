"""Tenant isolation in the registry view of the server, without Ray: ``tenant_subjects`` (the
``GET /v1/subjects`` rows) and ``find_subject`` (the lookup behind ``POST /v1/generate``)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from raydb.registry import register_adapter
from raydb.serving.subjects import SubjectNotFound, find_subject, model_id, parse_model_id, tenant_subjects
from raydb.storage import Storage

OWNERS = {"alice": "t1", "bob": "t1", "carol": "t2"}


@pytest.fixture
def workspace(tmp_path) -> str:
    ws = str(tmp_path / "ws")
    for sid, tenant in OWNERS.items():
        src = tmp_path / f"src-{sid}"
        src.mkdir()
        weights = sid.encode()
        (src / "pytorch_lora_weights.safetensors").write_bytes(weights)
        (src / "adapter.json").write_text(json.dumps({
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "subject": {"tenant": tenant, "instance_token": "sks", "instance_prompt": f"a photo of sks {sid}",
                        "class_prompt": "a photo of a dog"},
            "base_model": {"pretrained": "s3://operator-models/sd15", "identity": "local-3f2a",
                           "family": "sd"}}))
        register_adapter(Storage(), ws, sid, str(src))
    return ws


def test_each_tenant_lists_only_its_own_subjects(workspace):
    """Deliberate break caught: the tenant filter dropped from ``tenant_subjects`` (every tenant
    would list every subject)."""
    storage = Storage()
    assert [r["subject_id"] for r in tenant_subjects(storage, workspace, "t1")] == ["alice", "bob"]
    assert [r["subject_id"] for r in tenant_subjects(storage, workspace, "t2")] == ["carol"]
    assert tenant_subjects(storage, workspace, "t3") == []
    everyone = tenant_subjects(storage, workspace, None)  # auth off: all subjects
    assert [(r["subject_id"], r["tenant"]) for r in everyone] == sorted(OWNERS.items())
    [row] = tenant_subjects(storage, workspace, "t2")
    assert row | {"registered_at": None} == {
        "subject_id": "carol", "tenant": "t2", "latest_version": "v0001", "versions": ["v0001"],
        "registered_at": None, "instance_token": "sks", "instance_prompt": "a photo of sks carol",
        "class_prompt": "a photo of a dog", "family": "sd"}
    # where the operator keeps the base model (a path or bucket) and its identity never reach a tenant
    assert "operator-models" not in json.dumps(everyone) and "local-3f2a" not in json.dumps(everyone)


def test_find_subject_hides_other_tenants_subjects_like_missing_ones(workspace):
    """Another tenant's subject raises the same SubjectNotFound, with the same message, as an
    unknown one; the owner (or anyone, with auth off) gets the latest version.

    Deliberate break caught: the ownership check removed from ``find_subject``.
    """
    storage = Storage()
    found = find_subject(storage, workspace, "carol", "t2")
    assert (found.subject_id, found.version, found.tenant) == ("carol", "v0001", "t2")
    assert found.uri.endswith("subjects/carol/v0001")
    assert find_subject(storage, workspace, "carol", None).version == "v0001"
    with pytest.raises(SubjectNotFound) as other:
        find_subject(storage, workspace, "carol", "t1")
    with pytest.raises(SubjectNotFound) as missing:
        find_subject(storage, workspace, "nobody", "t1")
    assert str(other.value) == str(missing.value).replace("nobody", "carol")
    for bad in ("../carol", "a/b", ""):
        with pytest.raises(SubjectNotFound):
            find_subject(storage, workspace, bad, None)


def test_model_ids_round_trip_and_reject_path_tricks():
    """Deliberate break caught: ``parse_model_id`` accepting a version that is not ``vNNNN``."""
    assert parse_model_id(model_id("alice", "v0012")) == ("alice", "v0012")
    for bad in ("alice", "alice@", "alice@v1", "alice@../v0001", "../x@v0001", "alice@v0001x"):
        with pytest.raises(ValueError):
            parse_model_id(bad)


def test_messages_name_the_subject_and_unreadable_entries_are_logged(workspace, tmp_path, caplog):
    """The 404's message names the subject the caller asked for (and nothing else); an unreadable
    registry entry is logged with the subject and the storage error, and answered like a missing one."""
    storage = Storage()
    with pytest.raises(SubjectNotFound) as missing:
        find_subject(storage, workspace, "nobody", "t1")
    assert str(missing.value) == "unknown subject 'nobody'"
    with pytest.raises(SubjectNotFound) as other:
        find_subject(storage, workspace, "carol", "t1")
    assert str(other.value) == "unknown subject 'carol'"
    with pytest.raises(SubjectNotFound) as bad:
        find_subject(storage, workspace, "../x", None)
    assert str(bad.value) == "unknown subject '../x'"
    (tmp_path / "ws" / "subjects" / "bob" / "v0001" / "adapter.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="raydb.serving.subjects"):
        with pytest.raises(SubjectNotFound) as broken:
            find_subject(storage, workspace, "bob", "t1")
    assert str(broken.value) == "unknown subject 'bob'"
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("registry entry of subject 'bob' is unreadable: ")
    assert "adapter.json is not valid JSON" in message


def test_rows_of_adapters_without_subject_or_base_model_metadata(tmp_path):
    """An adapter.json with neither ``subject`` nor ``base_model`` (registered by hand) still lists,
    under the default tenant, with empty fields; ``registered_at`` is the registration time."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (src / "adapter.json").write_text(json.dumps({"weights_sha256": hashlib.sha256(b"w").hexdigest()}))
    ws = str(tmp_path / "ws")
    register_adapter(Storage(), ws, "plain", str(src))
    [row] = tenant_subjects(Storage(), ws, "default")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row.pop("registered_at"))
    assert row == {"subject_id": "plain", "tenant": "default", "latest_version": "v0001",
                   "versions": ["v0001"], "instance_token": None, "instance_prompt": None,
                   "class_prompt": None, "family": None}
    [row] = tenant_subjects(Storage(), ws, None)
    assert row["tenant"] is None  # auth off: the adapter's own tenant field, which it lacks


def test_parse_model_id_messages():
    with pytest.raises(ValueError) as err:
        parse_model_id("a@b@v0001")  # the first '@' splits: the version part is not vNNNN
    assert str(err.value) == "bad adapter id 'a@b@v0001' (expected <subject>@vNNNN)"
    with pytest.raises(ValueError, match="not a safe id"):
        parse_model_id("a b@v0001")
