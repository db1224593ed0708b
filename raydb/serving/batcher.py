"""An asyncio queue that groups same-shape requests into batches for the engine (no Ray).

Ray Serve's ``@serve.batch`` keeps one queue per method, so a batch could mix shapes (sizes, step
counts) that cannot share a denoising loop. Here each shape key has its own bucket:

* a request joins its key's bucket; the bucket's first arrival starts its ``wait_s`` clock;
* when the engine is free, the oldest bucket runs as soon as it holds ``max_batch_size`` requests
  or its clock has run out (a bucket that filled while the engine was busy runs at once);
* the engine call (``run``, in a worker thread) returns after the denoising loop with a future of
  the decoded results, so the next batch's loop starts while this batch decodes.

``wait_s`` trades latency for throughput: a lone request waits up to ``wait_s`` for batch-mates.
With ``max_batch_size=1`` nothing waits and every request runs its own loop (batching off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from raydb.metrics import record

__all__ = ["ShapeBatcher"]

logger = logging.getLogger("ray.serve.raydb.batcher")  # under Serve's logger: its handlers and format


class ShapeBatcher:
    """``await batcher.submit(item)`` -> that item's result from ``run(batch)``.

    ``run(items) -> Future[list[result]]`` (blocking; called in a thread, one batch at a time);
    ``key(item)``: the shape key — items with different keys are never in one batch.
    """

    def __init__(self, run: Callable[[list[Any]], Future], key: Callable[[Any], Hashable], *,
                 max_batch_size: int, wait_s: float,
                 subject: Callable[[Any], Hashable] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run = run
        self.key = key
        self.subject = subject  # an item's adapter: batches count how many they mix (metrics)
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        # (shape key, size) of the last batches run, for stats, tests and benchmarks.
        self.batches: deque[tuple[Hashable, int]] = deque(maxlen=1000)
        self._buckets: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}
        self._born: dict[Hashable, float] = {}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._submitted: dict[asyncio.Future, float] = {}  # when each waiting item arrived
        self._batch_of: dict[asyncio.Future, tuple[int, int, int]] = {}  # (batch id, size, adapters)
        self._batch_seq = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work())
        key = self.key(item)
        result: asyncio.Future = loop.create_future()
        self._submitted[result] = time.monotonic()
        if key not in self._buckets:
            self._buckets[key], self._born[key] = [], time.monotonic()
        self._buckets[key].append((item, result))
        self._wake.set()
        try:
            return await result
        finally:
            self._submitted.pop(result, None)
            batch = self._batch_of.pop(result, None)
            if batch is not None:  # logged in the request's own context: Serve adds its request id
                logger.info("batch %d: %d request(s), %d adapter(s)", *batch, extra={"batch_id": batch[0]})

    def _next_batch(self) -> tuple[list[tuple[Any, asyncio.Future]] | None, float]:
        """The batch to run now, or (None, seconds until the oldest bucket is due)."""
        if not self._buckets:
            return None, float("inf")
        key = min(self._born, key=self._born.__getitem__)
        bucket = self._buckets[key]
        due = self._born[key] + self.wait_s - time.monotonic()
        if len(bucket) < self.max_batch_size and due > 0:
            return None, due
        batch, rest = bucket[:self.max_batch_size], bucket[self.max_batch_size:]
        if rest:
            self._buckets[key], self._born[key] = rest, time.monotonic()
        else:
            del self._buckets[key], self._born[key]
        return batch, 0.0

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            batch, due = self._next_batch()
            if batch is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), None if due == float("inf") else due)
                except TimeoutError:
                    pass
                continue
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled callers
            if not batch:
                continue
            self.batches.append((self.key(batch[0][0]), len(batch)))
            self._record(batch)
            try:
                decoded = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the batch's callers get the error
                _fail(batch, exc)
                continue
            asyncio.get_running_loop().create_task(_deliver(decoded, batch))


    def _record(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        """Batch size (and how many adapters it mixes) and each item's wait in the queue."""
        now = time.monotonic()
        subjects = len({self.subject(item) for item, _ in batch}) if self.subject else 1
        self._batch_seq += 1
        record("raydb_batch_size", len(batch), subject_count=str(subjects))
        for _, fut in batch:
            self._batch_of[fut] = (self._batch_seq, len(batch), subjects)
            if fut in self._submitted:
                record("raydb_batch_queue_wait_seconds", now - self._submitted[fut])


async def _deliver(decoded: Future, batch: list[tuple[Any, asyncio.Future]]) -> None:
    try:
        results = await asyncio.wrap_future(decoded)
    except Exception as exc:  # noqa: BLE001
        _fail(batch, exc)
        return
    for (_, fut), result in zip(batch, results, strict=True):
        if not fut.done():
            fut.set_result(result)


def _fail(batch: list[tuple[Any, asyncio.Future]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
