"""The generator: one diffusers pipeline per actor (or process), producing whole blocks.

``BlockGenerator`` is a plain class — Ray Data instantiates it as an actor per device and calls it
on batches of block numbers; the single-process path calls it directly. Each call generates a block
with one pipeline call of ``sample_batch_size`` images and publishes it atomically.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
import torch

from raydb.config import RaydbConfig
from raydb.models.components import load_pipeline
from raydb.prior.cache import PriorCache, image_seed
from raydb.storage import Storage

__all__ = ["BlockGenerator", "generate_block_images", "FAIL_AFTER_ENV"]

# Fault injection for tests: an actor process exits hard after this many blocks (see tests).
FAIL_AFTER_ENV = "RAYDB_TEST_PRIOR_FAIL_AFTER"


def generate_block_images(pipe, cache: PriorCache, block: int, device: str = "cpu") -> list[dict]:
    """Rows (see BLOCK_SCHEMA) of one block: indices ``[block*S, (block+1)*S)``."""
    s = cache.settings
    indices = list(range(block * cache.block_size, (block + 1) * cache.block_size))
    seeds = [image_seed(s["seed"], i) for i in indices]
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    n = len(indices)
    images = pipe(
        prompt=[s["class_prompt"]] * n,
        negative_prompt=[s["negative_prompt"]] * n if s["negative_prompt"] else None,
        num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
        height=s["resolution"], width=s["resolution"], generator=generators,
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
    """Holds one pipeline; ``__call__({"block": [...]})`` generates and publishes those blocks."""

    def __init__(self, cfg: dict[str, Any], cache: dict[str, Any], endpoint_url: str | None = None):
        self.cfg = RaydbConfig.model_validate(cfg)
        self.cache = PriorCache(**cache)
        self.storage = Storage(endpoint_url or self.cfg.s3_endpoint_url)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.pipe = load_pipeline(self.cfg.model, self.storage, self.cfg.workspace,
                                  dtype=dtype, device=self.device)
        self.done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_blocks, written, seconds = [], [], []
        for block in batch["block"].tolist():
            fail_after = os.environ.get(FAIL_AFTER_ENV)
            if fail_after is not None and self.done >= int(fail_after) and _first_failure():
                os._exit(1)  # simulate a lost actor (preemption): no cleanup, no exception
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
        return {"block": np.array(out_blocks, dtype=np.int64), "written": np.array(written),
                "seconds": np.array(seconds)}


def _first_failure() -> bool:
    """Fail once per test run: the marker file makes the restarted actor behave."""
    marker = os.environ.get(FAIL_AFTER_ENV + "_MARKER")
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True
