"""The generator: one diffusers pipeline per actor (or process), producing whole blocks.

``BlockGenerator`` is a plain class — Ray Data instantiates it as an actor per device and calls it
on batches of block numbers; the single-process path calls it directly. Each call generates a block
with one pipeline call of ``sample_batch_size`` images and publishes it atomically.

Threads: on CPU a generator runs ``settings["cpu_threads"]`` (``CPU_THREADS`` = 1) torch intra-op
threads, set explicitly rather than left to torch's default of one per core. That keeps the bytes
independent of how many actors share a machine (thread count changes CPU reductions bit-wise) and
never oversubscribes cores: each CPU actor reserves ``num_cpus=cpu_threads``, so N actors on an
N-core node run N threads in all. To use more cores, raise ``prior.concurrency``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from raydb.config import RaydbConfig
from raydb.faults import maybe_die
from raydb.models.components import load_pipeline, pipeline_call_kwargs
from raydb.prior.cache import CPU_THREADS, PriorCache, image_seed
from raydb.storage import Storage

__all__ = ["BlockGenerator", "generate_block_images", "cpu_threads"]


def cpu_threads(cache: PriorCache) -> int:
    """Intra-op threads a CPU generator of ``cache`` uses (part of the cache key)."""
    return int(cache.settings.get("cpu_threads", CPU_THREADS))


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def generate_block_images(pipe, cache: PriorCache, block: int, device: str = "cpu") -> list[dict]:
    """Rows (see BLOCK_SCHEMA) of one block: indices ``[block*S, (block+1)*S)``.

    On CPU the pipeline runs with ``cpu_threads(cache)`` threads so the bytes do not depend on
    the caller's thread setting.
    """
    s = cache.settings
    indices = list(range(block * cache.block_size, (block + 1) * cache.block_size))
    seeds = [image_seed(s["seed"], i) for i in indices]
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    n = len(indices)
    threads = cpu_threads(cache) if str(device).startswith("cpu") else torch.get_num_threads()
    with _torch_threads(threads):
        images = pipe(
            prompt=[s["class_prompt"]] * n,
            num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
            height=s["resolution"], width=s["resolution"], generator=generators,
            **pipeline_call_kwargs(pipe, [s["negative_prompt"]] * n if s["negative_prompt"] else None),
        ).images
    rows = []
    for index, seed, img in zip(indices, seeds, images, strict=True):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"index": index, "seed": seed, "png": buf.getvalue(), "prompt": s["class_prompt"],
                     "negative_prompt": s["negative_prompt"],
                     "num_inference_steps": s["num_inference_steps"],
                     "guidance_scale": s["guidance_scale"], "width": img.width, "height": img.height})
    return rows


class BlockGenerator:
    """Holds one pipeline; ``__call__({"block": [...]})`` generates and publishes those blocks.

    Returns ``{"block": int64[n], "written": bool[n], "seconds": float64[n]}``; ``written`` is
    False when the block was already published (by another job, or before a retry).

    ``faults`` is a test's fault plan (:mod:`raydb.faults`, site ``prior_block``); ``None`` in
    production.
    """

    def __init__(self, cfg: dict[str, Any], cache: dict[str, Any], endpoint_url: str | None = None,
                 *, faults: dict[str, Any] | None = None):
        self.cfg = RaydbConfig.model_validate(cfg)
        self.cache = PriorCache(**cache)
        self.storage = Storage(endpoint_url or self.cfg.s3_endpoint_url)
        # the device is part of the cache key (fp16 on CUDA, fp32 on CPU give different pixels)
        self.device = self.cache.settings.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("prior cache key names device 'cuda' but this generator has no GPU")
        dtype = getattr(torch, self.cache.settings.get("dtype", "float32"))  # in the key too
        self.pipe = load_pipeline(self.cfg.model, self.storage, self.cfg.workspace,
                                  dtype=dtype, device=self.device)
        self.faults = faults
        self.done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_blocks, written, seconds = [], [], []
        for block in batch["block"].tolist():
            maybe_die(self.faults, "prior_block", done=self.done)
            start = time.perf_counter()
            if block in self.cache.done_blocks(self.storage):  # finished meanwhile by another job
                wrote = False
            else:
                rows = generate_block_images(self.pipe, self.cache, block, self.device)
                wrote = self.cache.write_block(self.storage, block, rows)
            out_blocks.append(block)
            written.append(wrote)
            seconds.append(time.perf_counter() - start)
            self.done += 1
        return {"block": np.array(out_blocks, dtype=np.int64), "written": np.array(written, dtype=bool),
                "seconds": np.array(seconds, dtype=np.float64)}

