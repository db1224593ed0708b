"""ShapeBatcher's metrics: each batch's size and how many adapters it mixes, each item's queue wait."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from raydb.serving import batcher as batcher_mod
from raydb.serving.batcher import ShapeBatcher


def test_a_batch_records_its_size_subjects_and_every_items_wait(monkeypatch):
    recorded = []
    monkeypatch.setattr(batcher_mod, "record",
                        lambda name, value=1.0, **tags: recorded.append((name, value, tags)))

    def run(items):
        done: Future = Future()
        done.set_result([f"image of {subject}" for subject, _ in items])
        return done

    async def main():
        b = ShapeBatcher(run, key=lambda item: item[1], max_batch_size=3, wait_s=0.05,
                         subject=lambda item: item[0])
        return await asyncio.gather(*(b.submit(item) for item in [("dog", 64), ("cat", 64), ("dog", 64)]))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == ["image of dog", "image of cat", "image of dog"]
    sizes = [(v, t) for n, v, t in recorded if n == "raydb_batch_size"]
    waits = [v for n, v, _ in recorded if n == "raydb_batch_queue_wait_seconds"]
    assert sizes == [(3, {"subject_count": "2"})]
    assert len(waits) == 3 and all(0 <= w < 5 for w in waits)
