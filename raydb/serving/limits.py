"""Per-tenant capacity limits and bounded requests for the ingress (plain Python, no Ray).

Why: every tenant shares the same diffusion replicas, so without limits one API key can fill every
replica queue and starve the others. The ingress admits a request only when its tenant

- has fewer than ``max_concurrent`` requests in flight (a cap on how many of one tenant's requests
  can sit in front of another tenant's in a replica queue), and
- has a token in its bucket (``rate_per_s`` tokens per second, at most ``burst`` saved up).

Otherwise it answers 429 with ``Retry-After`` (:class:`TooManyRequests`). Both are checked before
the body is read. The helper for bounded bodies lives here too: :func:`read_body_capped` (413
before reading a too-large body).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager

__all__ = ["TokenBucket", "TenantLimiter", "TooManyRequests", "BodyTooLarge", "read_body_capped"]


class TooManyRequests(Exception):
    """The tenant is over its concurrency cap or rate; ``retry_after`` in whole seconds (>= 1)."""

    def __init__(self, reason: str, retry_after: float, kind: str = "rate") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # "concurrency" or "rate": the metrics' reason tag
        self.retry_after = max(1, math.ceil(retry_after))


class TokenBucket:
    """``rate_per_s`` tokens per second, holding at most ``burst``; starts full.

    ``rate_per_s <= 0`` disables the bucket (every take succeeds).
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.clock = clock
        self.tokens = float(self.burst)
        self.updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is available (none taken)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class TenantLimiter:
    """Concurrency cap + token bucket per tenant. Use ``with limiter.admit(tenant): ...``."""

    def __init__(self, max_concurrent: int, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_concurrent = max_concurrent
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)

    @contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s slots for the block; TooManyRequests when there is none.

        The concurrency check comes first, so a request refused for concurrency spends no token.
        """
        with self._lock:
            if self._in_flight.get(tenant, 0) >= self.max_concurrent:
                raise TooManyRequests(f"at most {self.max_concurrent} requests in flight per tenant", 1.0,
                                      "concurrency")
            bucket = self._buckets.setdefault(tenant, TokenBucket(self.rate_per_s, self.burst, self.clock))
            wait = bucket.take()
            if wait > 0:
                raise TooManyRequests(f"at most {self.rate_per_s:g} requests per second per tenant", wait,
                                      "rate")
            self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[tenant] -= 1


class BodyTooLarge(Exception):
    """A request body over the configured byte limit (served as 413)."""


async def read_body_capped(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, or BodyTooLarge as soon as it is known to exceed ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before a single byte is read; a body
    without one (chunked) is read only until it passes the limit.
    """
    declared = headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLarge(f"request body of {int(declared)} bytes; at most {limit} allowed")
        except ValueError:
            raise BodyTooLarge("invalid Content-Length") from None
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)
