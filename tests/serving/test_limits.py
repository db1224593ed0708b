"""Tenant isolation on the serving side without Ray (issue 18): limits, keys, ids, adapter validation.

Clocks are injected, so nothing here sleeps or depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from raydb.config import ServeConfig
from raydb.serving.adapters import AdapterCorrupt, AdapterMismatch, FailureCache
from raydb.serving.api import MAX_TEXT_CHARS, GenerateRequest
from raydb.serving.auth import KeyRing, hash_key, merge_digests, parse_env_keys
from raydb.serving.limits import (
    BodyTimedOut,
    BodyTooLarge,
    BoundedBody,
    Capacity,
    IngressFull,
    TenantLimiter,
    TokenBucket,
    TooManyRequests,
    check_declared_length,
)
from raydb.serving.status import http_status
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


def test_idle_tenants_with_full_buckets_are_forgotten_when_the_table_grows(monkeypatch):
    """Callers without a key are limited per client address: addresses that came once must not stay
    in memory for ever, and forgetting only idle, refilled buckets changes no answer."""
    import raydb.serving.limits as limits

    monkeypatch.setattr(limits, "_SWEEP_AT", 4)
    clock = Clock()
    limiter = TenantLimiter(max_concurrent=2, rate_per_s=1.0, burst=2, clock=clock)
    for i in range(3):
        with limiter.admit(f"addr:{i}"):
            pass
    with limiter.admit("busy"):
        assert sorted(limiter._buckets) == ["addr:0", "addr:1", "addr:2", "busy"]  # none full yet
        busy = limiter._buckets["busy"]
        clock.now += 1.0  # addr:0..3 refill; busy is in flight
        with limiter.admit("addr:9"):  # a new tenant past the table's size: the sweep
            pass
        assert sorted(limiter._buckets) == ["addr:9", "busy"] and limiter._sweep_at == 4
        assert limiter._buckets["busy"] is busy  # in flight: its bucket (and its count) is kept
    bucket = TokenBucket(1.0, 2, clock)
    assert bucket.is_full() and bucket.take() == 0.0 and not bucket.is_full()
    clock.now += 0.999
    assert not bucket.is_full()
    clock.now += 0.001
    assert bucket.is_full() and TokenBucket(0.0, 1, clock).is_full()


def test_capacity_bounds_all_holders_together():
    capacity = Capacity(2)
    with capacity.admit(), capacity.admit():
        with pytest.raises(IngressFull, match=r"at capacity \(2 requests in progress\)") as err:
            with capacity.admit():
                pass
        assert err.value.retry_after == 1 and http_status(err.value) == 503 and capacity.in_use == 2
    assert capacity.in_use == 0
    with capacity.admit():
        assert capacity.in_use == 1


def test_a_declared_length_over_the_cap_is_refused_before_reading():
    check_declared_length({"content-length": "1024"}, 1024)
    check_declared_length({}, 1024)  # chunked: BoundedBody counts it
    with pytest.raises(BodyTooLarge, match="request body of 1025 bytes; at most 1024 allowed"):
        check_declared_length({"content-length": "1025"}, 1024)
    with pytest.raises(BodyTooLarge, match="invalid Content-Length"):
        check_declared_length({"content-length": "ten"}, 1024)


def test_bounded_body_stops_at_its_cap_and_its_deadline():
    clock = Clock()

    def receive_from(messages, delays=None):
        it = iter(messages)
        waits = iter(delays or [0.0] * len(messages))

        async def receive():
            wait = next(waits)
            if wait == float("inf"):
                await asyncio.sleep(3600)
            clock.now += wait
            return next(it)

        return receive

    async def drain(body):
        out = []
        while True:
            message = await body()
            out.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                return out

    def part(data: bytes, more: bool = True) -> dict:
        return {"type": "http.request", "body": data, "more_body": more}

    parts = [part(b"x" * 600), part(b"x" * 600), part(b"x" * 600, False)]
    body = BoundedBody(receive_from(parts), 1024, clock.now + 10, 10, clock)
    with pytest.raises(BodyTooLarge, match="request body over 1024 bytes"):
        asyncio.run(asyncio.wait_for(drain(body), 10))
    assert body.size == 1200  # stopped at the second part
    exact = BoundedBody(receive_from([part(b"x" * 1000), part(b"x" * 24, False)]), 1024, clock.now + 10, 10,
                        clock)
    assert len(asyncio.run(asyncio.wait_for(drain(exact), 10))) == 2 and exact.done
    # a body that comes too slowly: each part takes 4 s of a 10 s deadline (the third arrives at
    # 12 s on this fake clock, when the deadline is checked next)
    slow = BoundedBody(receive_from([part(b"ab"), part(b"cd"), part(b"ef"), part(b"", False)], [4, 4, 4, 4]),
                       1024, clock.now + 10, 10, clock)
    with pytest.raises(BodyTimedOut, match=r"did not arrive within 10 s \(6 bytes came\)"):
        asyncio.run(asyncio.wait_for(drain(slow), 10))
    assert http_status(BodyTimedOut("x")) == 408
    # a part that never comes: the deadline is real time too (asyncio.wait_for)
    stuck = BoundedBody(receive_from([part(b"a")], [float("inf")]), 1024, time.monotonic() + 0.05, 0.05)
    with pytest.raises(BodyTimedOut, match="0 bytes came"):
        asyncio.run(asyncio.wait_for(stuck(), 10))
    # once the body is complete, receive is the app's own (no deadline): a disconnect passes
    done = BoundedBody(receive_from([part(b"", False), {"type": "http.disconnect"}], [0, 100]), 1024,
                       clock.now + 1, 1, clock)
    assert asyncio.run(asyncio.wait_for(drain(done), 10))[0]["more_body"] is False
    assert asyncio.run(asyncio.wait_for(done(), 10)) == {"type": "http.disconnect"}


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


@pytest.mark.parametrize("bad", ["t1/alice@v0001\n", "t1/alice@v\u0661\u0662\u0663\u0664", "t1/alice@v001",
                                 "t1/../x@v0001", "t1/alice@v0001/../../x", "alice@v0001", "../t1/x@v0001"])
def test_adapter_ids_are_strict(bad):
    with pytest.raises(ValueError):
        parse_model_id(bad)
    assert parse_model_id("t1/alice@v0012") == ("t1", "alice", "v0012")


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
    assert "local-abc" not in exc.public and "/" not in exc.public and http_status(exc) == 409


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
