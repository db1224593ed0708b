"""Micro-batches built off the step's critical path: a background thread runs ``make_micro_batch``.

Building a micro-batch is CPU work — index the cached latents, draw per-sample noise and timesteps
from generators seeded by ``(train.seed, global position)``, concatenate ``[instance | class]`` —
about 20 ms per step at 512 px that a GPU step of 35 ms would otherwise wait for. ``BatchPrefetcher``
runs exactly ``step_micro_batches`` for steps ``start_step, start_step + 1, ...`` on a thread,
``depth`` steps ahead, into page-locked host memory when the target is CUDA; the consumer's copy to
the device is ``non_blocking``. The thread calls the very function the eager loop calls, so the
batches — tensors and order — are the ones ``make_micro_batch`` defines, including after a resume
(start at the checkpoint's step) and per DDP rank.

On the CPU the same thread overlaps batch building with the step; the tensors are identical, so
nothing changes numerically (tests compare them).
"""

from __future__ import annotations

import queue
import threading

import torch

from raydb.config import TrainConfig
from raydb.train.data import MicroBatch, TrainingData, step_micro_batches

__all__ = ["BatchPrefetcher"]


class BatchPrefetcher:
    """Yields each optimizer step's micro-batches (on ``device``), built ``depth`` steps ahead.

    ``next()`` returns ``list[MicroBatch]`` for steps ``start_step``, ``start_step + 1``, ... up to
    ``stop_step`` (exclusive; None: no end). Use as a context manager, or call ``close()``.
    An error on the thread is raised by the ``next()`` that would have returned its batches.
    """

    def __init__(
        self, data: TrainingData, tc: TrainConfig, *, start_step: int, num_train_timesteps: int,
        device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, depth: int = 2,
        stop_step: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.step, self.stop_step = start_step, stop_step
        self._pin = self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._args = dict(data=data, tc=tc, num_train_timesteps=num_train_timesteps, rank=rank,
                          world_size=world_size)
        self._thread = threading.Thread(target=self._produce, args=(start_step, stop_step),
                                        name="raydb-batch-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, step: int, stop_step: int | None) -> None:
        while not self._stop.is_set() and (stop_step is None or step < stop_step):
            try:
                batches = step_micro_batches(step=step, device="cpu", **self._args)
                if self._pin:
                    batches = [b.pin_memory() for b in batches]
                item: tuple[int, list[MicroBatch] | BaseException] = (step, batches)
            except BaseException as exc:  # noqa: BLE001 — handed to the consumer, which raises it
                item = (step, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            step += 1

    def next(self, *, to_device: bool = True) -> list[MicroBatch]:
        """The micro-batches of the next step, on the device (the copy is ``non_blocking``).

        ``to_device=False`` returns them in (pinned) host memory: ``GraphStep`` copies them
        straight into its static device buffers, saving one device allocation and copy.
        """
        if self.stop_step is not None and self.step >= self.stop_step:  # the thread has stopped
            raise RuntimeError(f"prefetcher: no step {self.step}; it was built to stop at {self.stop_step}")
        step, batches = self._queue.get()
        if isinstance(batches, BaseException):
            raise batches
        if step != self.step:  # the thread produces in order; a gap would be a bug here
            raise RuntimeError(f"prefetcher out of order: expected step {self.step}, got {step}")
        self.step += 1
        if self.device.type == "cpu" or not to_device:
            return batches
        return [b.to(self.device, non_blocking=True) for b in batches]

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
