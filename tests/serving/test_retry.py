"""The ingress's retry of a generate call whose replica died (no Ray: plain asyncio and fakes).

The end-to-end check — a SIGKILLed replica under load, zero client-visible errors — is the Ray-tier
test in test_serve_faults.py.
"""

from __future__ import annotations

import asyncio
import logging

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
    return asyncio.run(asyncio.wait_for(coro, 30))  # a lost retry fails here instead of hanging


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


def test_one_attempt_means_no_retry():
    send, calls = _flaky(0)
    assert _run(call_with_retry(send, attempts=1, retry_on=(ReplicaDied,)))["attempt"] == 1
    send, calls = _flaky(1)
    with pytest.raises(ReplicaDied):
        _run(call_with_retry(send, attempts=1, retry_on=(ReplicaDied,)))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="^attempts must be at least 1, got -1$"):
        _run(call_with_retry(send, attempts=-1))


def test_by_default_rays_lost_replica_errors_are_retried():
    from ray.exceptions import ActorUnavailableError

    send, calls = _flaky(1, exc=lambda message: ActorUnavailableError(message, None))
    assert _run(call_with_retry(send, backoff_s=0))["attempt"] == 2
    send, calls = _flaky(1, exc=KeyError)  # anything else is not
    with pytest.raises(KeyError):
        _run(call_with_retry(send, backoff_s=0))
    assert len(calls) == 1


def test_backoff_doubles_from_backoff_s_and_each_retry_is_logged(monkeypatch, caplog):
    """Sleeps are ``backoff_s * 2**k`` (0.05 s, then 0.1 s by default); each retry logs what, the
    error's type and the attempt about to be made."""
    sleeps: list[float] = []

    async def fake_sleep(seconds):
        sleeps.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    # Importing ray.serve configures its logger (handlers; in some Ray releases no propagation to
    # the root): listen on it alone, for the length of this test
    serve_logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(serve_logger, "handlers", [caplog.handler])
    monkeypatch.setattr(serve_logger, "propagate", False)
    send, calls = _flaky(2)
    with caplog.at_level("WARNING", logger="ray.serve"):
        _run(call_with_retry(send, retry_on=(ReplicaDied,)))
    assert sleeps == [0.05, 0.1]
    assert [r.getMessage() for r in caplog.records] == [
        "request: replica lost (ReplicaDied); retrying (2 of 3)",
        "request: replica lost (ReplicaDied); retrying (3 of 3)"]
    sleeps.clear()
    caplog.clear()
    send, calls = _flaky(3)
    with caplog.at_level("WARNING", logger="ray.serve"):
        _run(call_with_retry(send, attempts=4, retry_on=(ReplicaDied,), backoff_s=1.0, what="generate alice"))
    assert sleeps == [1.0, 2.0, 4.0]
    assert caplog.records[-1].getMessage() == "generate alice: replica lost (ReplicaDied); retrying (4 of 4)"
