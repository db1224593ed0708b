"""API keys -> tenants (no Ray): parsing, merging, validation messages, header extraction, lookup."""

from __future__ import annotations

import hashlib

import pytest

from raydb.config import RaydbConfig, ServeConfig
from raydb.serving.auth import (
    MIN_KEY_CHARS,
    KeyRing,
    hash_key,
    key_from_headers,
    merge_digests,
    parse_env_keys,
    with_env_keys,
)

K1, K2, K3 = "k1-0123456789abcdef", "k2-0123456789abcdef", "k:3-0123456789abcdef"


def test_hash_key_is_sha256_hex_of_utf8():
    assert hash_key("clé-0123456789abcdef") == hashlib.sha256("clé-0123456789abcdef".encode()).hexdigest()
    assert MIN_KEY_CHARS == 16


def test_parse_env_keys_entries_separators_and_colons_in_keys():
    text = f" {K1}:t1 ,\n{K3}:t3,, \n"
    assert parse_env_keys(text) == {hash_key(K1): "t1", hash_key(K3): "t3"}  # rpartition: key may hold ':'
    assert parse_env_keys("") == {} and parse_env_keys(" , \n") == {}
    assert parse_env_keys(f"{K1}:t1,{K1}:t1") == {hash_key(K1): "t1"}  # a repeat for the same tenant is fine


@pytest.mark.parametrize(("text", "message"), [
    ("no-colon-0123456789", "$RAYDB_API_KEYS: entry 1 is not 'key:tenant'"),
    (f"{K1}:t1,:t2", "$RAYDB_API_KEYS: entry 2 is not 'key:tenant'"),
    (f"{K1}:", "$RAYDB_API_KEYS: entry 1 is not 'key:tenant'"),
    ("x" * 15 + ":t1", "$RAYDB_API_KEYS: entry 1: key is shorter than 16 characters"),
    (f"{K1}:../t", "$RAYDB_API_KEYS: entry 1: tenant '../t' contains '..'"),
    (f"{K1}:t1,{K2}:t2,{K1}:t3", "$RAYDB_API_KEYS: entry 3: the same key is configured for two tenants"),
])
def test_parse_env_keys_refusals_name_the_entry_never_the_key(text, message):
    with pytest.raises(ValueError) as err:
        parse_env_keys(text)
    assert str(err.value) == message
    assert K1 not in str(err.value) and "no-colon" not in str(err.value)


def test_parse_env_keys_names_its_source():
    with pytest.raises(ValueError, match=r"^\$MY_KEYS: entry 1 is not"):
        parse_env_keys("nope", "MY_KEYS")
    assert parse_env_keys("x" * 16 + ":t") == {hash_key("x" * 16): "t"}  # exactly the minimum length


def test_merge_digests_normalises_and_refuses_conflicts():
    d = hash_key(K1)
    assert merge_digests({d.upper() + " ": "t1"}, {d: "t1"}) == {d: "t1"}
    assert merge_digests() == {}
    with pytest.raises(ValueError) as err:
        merge_digests({d: "t1"}, {d: "t2"})
    assert str(err.value) == "serve.api_keys: the same key is configured for two tenants ('t1' and 't2')"


def test_keyring_validates_digests_and_tenants():
    ring = KeyRing({hash_key(K1): "t1", hash_key(K2): "t2"})
    assert len(ring) == 2 and ring.digests() == {hash_key(K1): "t1", hash_key(K2): "t2"}
    assert [ring.tenant_for(k) for k in (K1, K2, K3, "", None)] == ["t1", "t2", None, None, None]
    with pytest.raises(ValueError) as err:
        KeyRing({"ab" * 31: "t1"})  # 62 hex chars
    assert str(err.value) == ("serve.api_keys: every key must be a sha256 hex digest (64 hex chars) of an "
                              "API key, not the key itself")
    with pytest.raises(ValueError, match=r"^serve.api_keys: tenant 'a b' is not a safe id"):
        KeyRing({hash_key(K1): "a b"})
    assert len(KeyRing({})) == 0 and KeyRing({}).tenant_for(K1) is None


def test_keyring_from_config_merges_table_file_and_env(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{K2}:t2\n")
    cfg = ServeConfig(api_keys={hash_key(K1): "t1"}, api_keys_env="TEST_KEYS", api_keys_file=str(keys_file))
    ring = KeyRing.from_config(cfg, environ={"TEST_KEYS": f"{K3}:t3"})
    assert ring.digests() == {hash_key(K1): "t1", hash_key(K2): "t2", hash_key(K3): "t3"}
    assert KeyRing.from_config(cfg, environ={"TEST_KEYS": "  "}).digests() == {
        hash_key(K1): "t1", hash_key(K2): "t2"}  # a blank variable adds nothing
    with pytest.raises(ValueError, match=r"^\$serve.api_keys_file: entry 1 is not 'key:tenant'"):
        keys_file.write_text("garbage")
        KeyRing.from_config(cfg, environ={})
    missing = ServeConfig(api_keys_file=str(tmp_path / "absent"))
    with pytest.raises(ValueError) as err:
        KeyRing.from_config(missing, environ={})
    assert str(err.value) == (f"serve.api_keys_file: cannot read {tmp_path / 'absent'}: "
                              "No such file or directory")
    conflict = ServeConfig(api_keys={hash_key(K1): "t1"}, api_keys_env="TEST_KEYS")
    with pytest.raises(ValueError, match="two tenants"):
        KeyRing.from_config(conflict, environ={"TEST_KEYS": f"{K1}:t9"})


def test_keyring_from_config_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("RAYDB_TEST_AUTH_KEYS", f"{K1}:t1")
    ring = KeyRing.from_config(ServeConfig(api_keys_env="RAYDB_TEST_AUTH_KEYS"))
    assert ring.tenant_for(K1) == "t1"


def test_key_from_headers_prefers_bearer_then_x_api_key():
    assert key_from_headers({"authorization": "Bearer  abc ", "x-api-key": "xyz"}) == "abc"
    assert key_from_headers({"authorization": "bearer abc"}) == "abc"
    assert key_from_headers({"authorization": "Bearer ", "x-api-key": " xyz "}) == "xyz"
    assert key_from_headers({"authorization": "Basic abc", "x-api-key": "xyz"}) == "xyz"
    assert key_from_headers({"authorization": "Basic abc"}) is None
    assert key_from_headers({"x-api-key": "  "}) is None and key_from_headers({}) is None


def test_with_env_keys_folds_every_key_into_digests_only(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{K2}:t2\n")
    cfg = RaydbConfig.model_validate({"serve": {"auth": "api_key", "api_keys": {hash_key(K1): "t1"},
                                                "api_keys_env": "TEST_KEYS",
                                                "api_keys_file": str(keys_file)}})
    out = with_env_keys(cfg, environ={"TEST_KEYS": f"{K3}:t3"})
    assert out.serve.api_keys == {hash_key(K1): "t1", hash_key(K2): "t2", hash_key(K3): "t3"}
    assert out.serve.api_keys_file is None
    assert cfg.serve.api_keys == {hash_key(K1): "t1"} and cfg.serve.api_keys_file == str(keys_file)  # a copy
    off = RaydbConfig.model_validate({"serve": {"auth": "none", "api_keys_file": str(keys_file)}})
    assert with_env_keys(off, environ={"TEST_KEYS": "garbage"}) is off  # auth off: untouched, not parsed


def test_newlines_alone_separate_entries_and_errors_name_the_configured_variable():
    assert parse_env_keys(f"{K1}:t1\n{K2}:t2") == {hash_key(K1): "t1", hash_key(K2): "t2"}
    with pytest.raises(ValueError) as err:
        KeyRing.from_config(ServeConfig(api_keys_env="TEAM_KEYS"), environ={"TEAM_KEYS": "not-a-pair"})
    assert str(err.value) == "$TEAM_KEYS: entry 1 is not 'key:tenant'"
