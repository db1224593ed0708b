"""The ingress's capacity limits as plain Python (no Ray, no HTTP): what :mod:`raydb.serving.gate`
applies to every request.

Why: every tenant shares one ingress and the same diffusion replicas, so without limits one API key
can hold every ingress slot (72 uploads trickling 1 byte/s did, in review), every replica queue or
every image worker, and the others wait. The pieces:

- :class:`TenantLimiter`: per tenant, at most ``max_concurrent`` requests in flight and a token
  bucket of ``rate_per_s`` tokens per second (:class:`TokenBucket`, at most ``burst`` saved up);
  over either -> :class:`TooManyRequests` (429 + ``Retry-After``);
- :class:`Capacity`: the ingress's own bound, all tenants together -> :class:`IngressFull` (503);
- :class:`BoundedBody`: an ASGI ``receive`` that ends a body over its byte cap
  (:class:`BodyTooLarge`, 413; a declared ``Content-Length`` over it is refused before a byte is
  read: :func:`check_declared_length`) or one that has not all arrived by its deadline
  (:class:`BodyTimedOut`, 408);
- :class:`ImageWorkers`: the threads that decode and prepare uploaded photos, apart from the event
  loop and from the default executor every other route's blocking work uses; a bounded number wait,
  more -> :class:`ImageWorkersBusy` (503).

Which HTTP status each error answers is :data:`raydb.serving.status.HTTP_STATUS`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from raydb.errors import Unavailable

__all__ = ["TokenBucket", "TenantLimiter", "TooManyRequests", "Capacity", "IngressFull", "BodyTooLarge",
           "BodyTimedOut", "check_declared_length", "BoundedBody", "ImageWorkers", "ImageWorkersBusy"]

T = TypeVar("T")
_SWEEP_AT = 1024  # tenants' buckets kept before idle, refilled ones are forgotten


class TooManyRequests(Exception):
    """The tenant is over its concurrency cap or rate; ``retry_after`` in whole seconds (>= 1)."""

    def __init__(self, reason: str, retry_after: float, rejection: str = "rate") -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejection = rejection  # the metrics' reason tag: "rate", "concurrency" or "uploads"
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

    def is_full(self) -> bool:
        """Whether the bucket has refilled to ``burst`` (a new bucket would be the same)."""
        return self.rate <= 0 or self.tokens + (self.clock() - self.updated) * self.rate >= self.burst


class TenantLimiter:
    """Concurrency cap + token bucket per tenant. Use ``with limiter.admit(tenant): ...``.

    ``what`` names the requests in messages ("requests", "uploads"). ``rate_per_s <= 0``: no rate.
    """

    def __init__(self, max_concurrent: int, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic, *, what: str = "requests") -> None:
        self.max_concurrent = max_concurrent
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.what = what
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = _SWEEP_AT
        self._lock = threading.Lock()

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)

    @contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s slots for the block; TooManyRequests when there is none.

        The concurrency check comes first, so a request refused for concurrency spends no token.
        The slot is given back however the block ends (an error answer included).
        """
        with self._lock:
            if self._in_flight.get(tenant, 0) >= self.max_concurrent:
                raise TooManyRequests(f"at most {self.max_concurrent} {self.what} in flight per tenant", 1.0,
                                      "concurrency" if self.what == "requests" else self.what)
            if tenant not in self._buckets and len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets.setdefault(tenant, TokenBucket(self.rate_per_s, self.burst, self.clock))
            wait = bucket.take()
            if wait > 0:
                raise TooManyRequests(f"at most {self.rate_per_s:g} {self.what} per second per tenant", wait,
                                      "rate")
            self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._in_flight[tenant] - 1
                if left:
                    self._in_flight[tenant] = left
                else:
                    del self._in_flight[tenant]

    def _sweep(self) -> None:
        """Forget the buckets of idle tenants that have refilled (a new bucket would be the same):
        callers without a key are limited per client address, and addresses come and go. Runs when
        the table doubles, so its cost per request stays constant."""
        for tenant in [t for t, b in self._buckets.items() if t not in self._in_flight and b.is_full()]:
            del self._buckets[tenant]
        self._sweep_at = max(_SWEEP_AT, 2 * len(self._buckets))


class IngressFull(Unavailable):
    """The ingress is working on as many requests as it may (``serve.ingress_max_requests``)."""

    rejection = "ingress"


class Capacity:
    """At most ``limit`` holders at once, whoever they are: ``with capacity.admit(): ...``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self.in_use >= self.limit:
                raise IngressFull(f"the server is at capacity ({self.limit} requests in progress); retry",
                                  retry_after=1)
            self.in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= 1


class BodyTooLarge(Exception):
    """A request body over its byte limit (413)."""


class BodyTimedOut(Exception):
    """A request body that did not arrive within ``serve.body_timeout_s`` (408)."""


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """BodyTooLarge for a ``Content-Length`` over ``limit`` (or not a number): refused before a
    single byte of the body is read."""
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise BodyTooLarge("invalid Content-Length") from None
    if size > limit:
        raise BodyTooLarge(f"request body of {size} bytes; at most {limit} allowed")


class BoundedBody:
    """An ASGI ``receive`` passing the body on while it stays within ``limit`` bytes and arrives
    before ``deadline`` (a ``clock()`` time).

    Only reads of the body are bounded: once the last body message has arrived, ``receive`` is the
    app's own (a route waiting for the client to disconnect waits as long as it likes).
    """

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], limit: int, deadline: float,
                 timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.receive, self.limit, self.deadline = receive, limit, deadline
        self.timeout_s, self.clock = timeout_s, clock
        self.size = 0
        self.done = False

    async def __call__(self) -> dict[str, Any]:
        if self.done:
            return await self.receive()
        left = self.deadline - self.clock()
        try:
            if left <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self.receive(), left)
        except TimeoutError:
            raise BodyTimedOut(f"the request body did not arrive within {self.timeout_s:g} s "
                               f"({self.size} bytes came)") from None
        if message["type"] != "http.request":
            self.done = True  # http.disconnect: the app sees it as it is
            return message
        self.size += len(message.get("body", b""))
        if self.size > self.limit:
            raise BodyTooLarge(f"request body over {self.limit} bytes")
        self.done = not message.get("more_body", False)
        return message


class ImageWorkersBusy(Unavailable):
    """Every image worker is busy and ``serve.image_queue`` checks already wait."""

    rejection = "image_workers"


class ImageWorkers:
    """``await workers.run(fn, *args)``: ``fn`` on one of ``workers`` threads of its own, with at
    most ``queue`` calls waiting for a thread (more: :class:`ImageWorkersBusy`).

    Decoding and resizing photos is seconds of CPU and a few hundred MB per upload; on the default
    executor it would delay every other route's blocking work (registry reads), and unbounded it
    would take the ingress's memory. Pillow releases the GIL while it decodes and resizes, so the
    event loop keeps answering meanwhile.
    """

    def __init__(self, workers: int, queue: int) -> None:
        self.limit = workers + queue
        self.pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="raydb-images")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self.pending >= self.limit:
                raise ImageWorkersBusy("the server is busy checking other uploads; retry", retry_after=5)
            self.pending += 1
        try:
            work = self._pool.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        # released when the work ends, not when the caller stops waiting (a client that went away
        # does not stop a thread that already runs: its place is taken until then)
        work.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(work)

    def _release(self) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
