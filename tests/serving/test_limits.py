"""Tenant isolation on the serving side without Ray (issue 18): limits, keys, ids, adapter validation.

Clocks are injected, so nothing here sleeps or depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio

import pytest

from raydb.config import ServeConfig
from raydb.serving.adapters import AdapterCorrupt, AdapterMismatch, FailureCache
from raydb.serving.api import MAX_TEXT_CHARS, GenerateRequest
from raydb.serving.auth import KeyRing, hash_key, merge_digests, parse_env_keys
from raydb.serving.limits import (
    BodyTooLarge,
    TenantLimiter,
    TokenBucket,
    TooManyRequests,
    read_body_capped,
)
from raydb.serving.subjects import parse_model_id


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- capacity ----------------------------------------------------------------------------------------
def test_token_bucket_refills_at_its_rate_and_says_how_long_to_wait():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.take() == pytest.approx(0.5)  # one token every 1/2 s
    clock.now += 0.5
    assert bucket.take() == 0.0 and bucket.take() == pytest.approx(0.5)
    clock.now += 100  # saved-up tokens are capped at the burst
    assert [bucket.take() for _ in range(4)][-1] > 0
    assert TokenBucket(0.0, 1, clock).take() == 0.0  # rate 0: no limit


def test_tenant_limiter_isolates_tenants():
    clock = Clock()
    limiter = TenantLimiter(max_concurrent=2, rate_per_s=1.0, burst=5, clock=clock)
    with limiter.admit("a"), limiter.admit("a"):
        with pytest.raises(TooManyRequests) as err:  # a's third concurrent request
            with limiter.admit("a"):
                pass
        assert err.value.retry_after == 1 and "in flight" in err.value.reason
        with limiter.admit("b"):  # b is not affected by a's load
            assert limiter.in_flight("b") == 1
    assert limiter.in_flight("a") == 0
    for _ in range(3):  # a's burst of 5 is now spent (2 + 3)
        with limiter.admit("a"):
            pass
    with pytest.raises(TooManyRequests) as err:
        with limiter.admit("a"):
            pass
    assert err.value.retry_after == 1 and "per second" in err.value.reason
    with limiter.admit("b"):  # b still has tokens
        pass
    clock.now += 1.0
    with limiter.admit("a"):
        pass


def test_read_body_capped_refuses_before_reading():
    read = []

    async def chunks(parts):
        for part in parts:
            read.append(part)
            yield part

    async def body(headers, parts, limit):
        return await read_body_capped(headers, chunks(parts), limit)

    with pytest.raises(BodyTooLarge, match="20000000 bytes"):
        asyncio.run(body({"content-length": "20000000"}, [b"x" * 10], 1024))
    assert read == []  # refused from the header alone
    with pytest.raises(BodyTooLarge):  # chunked: stops once past the limit
        asyncio.run(body({}, [b"x" * 600, b"x" * 600, b"x" * 600], 1024))
    assert len(read) == 2
    assert asyncio.run(body({"content-length": "3"}, [b"abc"], 3)) == b"abc"


# -- keys and ids ------------------------------------------------------------------------------------
def test_keys_short_conflicting_or_with_bad_tenants_are_refused_at_start():
    long_a, long_b = "a" * 16, "b" * 20
    assert parse_env_keys(f"{long_a}:t1,{long_b}:t2") == {hash_key(long_a): "t1", hash_key(long_b): "t2"}
    with pytest.raises(ValueError, match="shorter than 16") as err:
        parse_env_keys("x:t1")
    assert "x:" not in str(err.value)
    with pytest.raises(ValueError, match="two tenants"):
        parse_env_keys(f"{long_a}:t1,{long_a}:t2")
    with pytest.raises(ValueError, match="two tenants"):
        merge_digests({hash_key(long_a): "t1"}, {hash_key(long_a).upper(): "t2"})
    with pytest.raises(ValueError, match="two tenants"):  # config digest vs the same key in the env
        KeyRing.from_config(ServeConfig(api_keys={hash_key(long_a): "t1"}), environ={"RAYDB_API_KEYS":
                                                                                    f"{long_a}:t2"})
    with pytest.raises(ValueError, match="tenant"):
        KeyRing({hash_key(long_a): "../other"})
    ring = KeyRing.from_config(ServeConfig(api_keys={hash_key(long_a): "t1"}), environ={})
    assert ring.tenant_for(long_a) == "t1" and ring.digests() == {hash_key(long_a): "t1"}


@pytest.mark.parametrize("bad", ["alice@v0001\n", "alice@v\u0661\u0662\u0663\u0664", "alice@v001",
                                 "../x@v0001", "alice@v0001/../../x"])
def test_adapter_ids_are_strict(bad):
    with pytest.raises(ValueError):
        parse_model_id(bad)
    assert parse_model_id("alice@v0012") == ("alice", "v0012")


def test_every_string_field_has_a_length_cap():
    from pydantic import ValidationError

    for field in ("prompt", "negative_prompt", "subject_id"):
        body = {"subject_id": "a", "prompt": "p"} | {field: "x" * (MAX_TEXT_CHARS + 1)}
        with pytest.raises(ValidationError) as err:
            GenerateRequest(**body)
        assert err.value.errors()[0]["loc"] == (field,) and "at most" in err.value.errors()[0]["msg"]


# -- adapters ----------------------------------------------------------------------------------------
def test_failure_cache_expires():
    clock = Clock()
    cache = FailureCache(ttl_s=5, clock=clock)
    error = AdapterCorrupt("bad")
    cache.put("a@v0001", error)
    assert cache.get("a@v0001") is error and cache.get("b@v0001") is None
    clock.now += 5
    assert cache.get("a@v0001") is None
    FailureCache(ttl_s=0).put("x@v0001", error)  # ttl 0: nothing cached


def test_adapter_errors_have_generic_public_messages():
    exc = AdapterMismatch("adapter was trained on base model 'x', this server runs 'local-abc'")
    assert "local-abc" not in exc.public and "/" not in exc.public and exc.status == 409


# -- config ------------------------------------------------------------------------------------------
def test_auth_none_only_on_loopback():
    from pydantic import ValidationError

    for host in ("127.0.0.1", "::1", "localhost"):
        ServeConfig(auth="none", host=host)
    with pytest.raises(ValidationError, match="loopback"):
        ServeConfig(auth="none", host="0.0.0.0")
    ServeConfig(auth="api_key", host="0.0.0.0")


def test_serve_limits_have_descriptions():
    for name in ("max_queued_requests", "request_timeout_s", "max_body_bytes", "tenant_max_concurrent",
                 "tenant_rate_per_s", "tenant_burst", "adapter_failure_ttl_s", "docs", "api_keys_file"):
        assert ServeConfig.model_fields[name].description, name


def test_keys_are_read_once_where_the_app_is_built(tmp_path):
    import json

    from raydb.config import RaydbConfig, load_config
    from raydb.serving.auth import with_env_keys

    file_key, env_key = "file-key-0123456789", "env-key-0123456789"
    (tmp_path / "keys").write_text(f"{file_key}:t1\n")
    cfg = load_config(data={"serve": {"api_keys_file": str(tmp_path / "keys")}})
    built = with_env_keys(cfg, environ={"RAYDB_API_KEYS": f"{env_key}:t2"})
    assert built.serve.api_keys == {hash_key(file_key): "t1", hash_key(env_key): "t2"}
    text = json.dumps(built.to_dict())  # what travels to the replicas
    assert file_key not in text and env_key not in text and built.serve.api_keys_file is None
    replica = KeyRing(RaydbConfig.model_validate(built.to_dict()).serve.api_keys)  # as the ingress does
    assert replica.tenant_for(file_key) == "t1" and replica.tenant_for(env_key) == "t2"
    with pytest.raises(ValueError, match="api_keys_file: cannot read"):
        with_env_keys(load_config(data={"serve": {"api_keys_file": str(tmp_path / "nope")}}), environ={})
    with pytest.raises(ValueError, match="shorter than 16"):
        with_env_keys(cfg, environ={"RAYDB_API_KEYS": "x:t3"})
