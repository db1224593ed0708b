"""The ingress's retry of a generate call whose replica died (no Ray: plain asyncio and fakes).

The end-to-end check — a SIGKILLed replica under load, zero client-visible errors — is the Ray-tier
test in test_serve_faults.py.
"""

from __future__ import annotations

import asyncio

import pytest

from raydb.serving.retry import DEFAULT_ATTEMPTS, call_with_retry, replica_lost_errors, safe_to_repeat


class ReplicaDied(Exception):
    pass


def _flaky(failures: int, exc: type[BaseException] = ReplicaDied):
    """A ``send`` that fails ``failures`` times, then answers; records the arguments of every call."""
    calls: list[dict] = []

    async def send():
        calls.append({"seed": 7})
        if len(calls) <= failures:
            raise exc("replica gone")
        return {"images": ["png"], "attempt": len(calls)}

    return send, calls


def _run(coro):
    return asyncio.run(coro)


def test_a_lost_replica_is_retried_with_the_same_arguments():
    """Deliberate break caught: no retry (the loop cut to ``range(1)``)."""
    send, calls = _flaky(2)
    result = _run(call_with_retry(send, attempts=3, retry_on=(ReplicaDied,), backoff_s=0))
    assert result == {"images": ["png"], "attempt": 3}
    assert calls == [{"seed": 7}] * 3


def test_attempts_are_bounded_and_the_last_error_propagates():
    """A request that kills every replica fails after ``attempts`` calls, not in an endless loop.

    Deliberate break caught: the last-attempt check off by one (``attempt == attempts``): the
    final error is swallowed instead of reaching the caller.
    """
    send, calls = _flaky(10)
    with pytest.raises(ReplicaDied):
        _run(call_with_retry(send, attempts=3, retry_on=(ReplicaDied,), backoff_s=0))
    assert len(calls) == 3
    with pytest.raises(ValueError, match="attempts"):
        _run(call_with_retry(send, attempts=0, retry_on=(ReplicaDied,)))


def test_other_errors_are_not_retried():
    """Deliberate break caught: ``except Exception`` (a bad request would be sent three times)."""
    send, calls = _flaky(1, exc=KeyError)
    with pytest.raises(KeyError):
        _run(call_with_retry(send, attempts=3, retry_on=(ReplicaDied,), backoff_s=0))
    assert len(calls) == 1


def test_ray_replica_errors_are_the_retried_ones():
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    errors = replica_lost_errors()
    for exc in (ActorDiedError, ActorUnavailableError, ReplicaUnavailableError):
        assert issubclass(exc, errors), exc
    assert not issubclass(BackPressureError, errors)  # overload is answered, not retried
    assert DEFAULT_ATTEMPTS >= 2


def test_only_seeded_requests_are_safe_to_repeat():
    assert safe_to_repeat({"seed": 0, "prompt": "p"})
    assert not safe_to_repeat({"seed": None, "prompt": "p"})
    assert not safe_to_repeat({"prompt": "p"})
