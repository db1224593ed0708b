"""Retrying a generate call whose diffusion replica died, so a lost replica never reaches the client.

A generate request is idempotent once the ingress has fixed its seed: the same prompt, settings,
adapter version and seed give the same image on any replica (every image ``i`` is sampled from its
own ``torch.Generator`` seeded ``seed + i``). So when the replica holding a request dies — SIGKILL,
OOM, a lost node — the ingress may simply send the same parameters again: Serve routes the retry to
a live replica, or, with one replica, queues it until the controller has started the replacement.

Only a replica's *death* is retried (the errors in :func:`replica_lost_errors`); answers the replica
gave — a bad adapter, a bad request — are returned as they are. Attempts are bounded, so a request
that kills every replica it lands on (a poison request) fails after ``attempts`` tries instead of
taking the whole deployment down in a loop. Plain asyncio, no Ray needed to test it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["DEFAULT_ATTEMPTS", "replica_lost_errors", "safe_to_repeat", "call_with_retry"]

T = TypeVar("T")
logger = logging.getLogger("ray.serve")

# One first try plus two retries: with two replicas one retry suffices; the second covers a kill
# that lands while the first retry is in flight.
DEFAULT_ATTEMPTS = 3


def replica_lost_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a ``DeploymentHandle`` call raises when its replica died or vanished."""
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ReplicaUnavailableError)


def safe_to_repeat(params: dict[str, Any]) -> bool:
    """A generate call may be repeated when it carries a concrete seed (the image is then fixed)."""
    return isinstance(params.get("seed"), int)


async def call_with_retry(
    send: Callable[[], Awaitable[T]],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    retry_on: tuple[type[BaseException], ...] | None = None,
    backoff_s: float = 0.05,
    what: str = "request",
) -> T:
    """``await send()``; when it raises one of ``retry_on`` (default :func:`replica_lost_errors`),
    call ``send()`` again, at most ``attempts`` calls in all, sleeping ``backoff_s * 2**k`` between.

    ``send`` must build a *new* call each time (a handle's ``.remote(...)``), with the same arguments.
    The last error propagates when every attempt failed.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    errors = replica_lost_errors() if retry_on is None else retry_on
    attempt = 0
    while True:
        try:
            return await send()
        except errors as exc:
            attempt += 1
            if attempt >= attempts:
                raise
            logger.warning("%s: replica lost (%s); retrying (%d of %d)", what, type(exc).__name__,
                           attempt + 1, attempts)
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
