"""The prior stage: ``ensure_prior_images`` makes sure the first ``num_class_images`` (+ holdout)
class images exist in the shared cache; ``class_images`` hands them (or ``prior.class_data``) to
the stages that train on them.

Only the missing blocks are generated. With Ray (the default when Ray is importable and running or
``use_ray=True``) the blocks are a Ray Data dataset mapped by a fixed-size actor pool of
``BlockGenerator`` s, one pipeline per GPU (``num_gpus=1`` each) or ``prior.concurrency`` CPU actors
(default 1) reserving ``cpu_threads`` CPUs each; Ray Data restarts a lost actor and retries its
blocks (``max_restarts=-1``, ``max_task_retries=-1`` are its defaults), and since blocks are
published atomically and only once, a failure costs at most the blocks in flight. Without Ray the
same generator runs in-process; the bytes are the same either way.

Progress: one tqdm bar in the driver counts images as blocks come back (Ray Data's own operator bars
are switched off for this dataset), and a last line reports images/s over the blocks this call wrote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from raydb import faults
from raydb.config import RaydbConfig
from raydb.data.ingest import ImageGeometry
from raydb.models.family import check_resolution
from raydb.prior.cache import PriorCache, prior_cache_for
from raydb.prior.generate import BlockGenerator, cpu_threads
from raydb.storage import Storage
from raydb.terminal import is_verbose, show_progress

__all__ = ["PriorRunStats", "ensure_prior_images", "prior_total_images", "generated_training_images",
           "resolve_prior_cache",
           "generation_device", "class_images", "class_images_with_geometry"]

log = logging.getLogger(__name__)


@dataclass
class PriorRunStats:
    """What one ``ensure_prior_images`` call did; ``*_generated`` count only blocks it published."""

    cache_uri: str
    key: str
    requested: int
    blocks_generated: int = 0
    images_generated: int = 0
    seconds: float = 0.0
    first_block_s: float = 0.0  # start-up (actors, pipeline load) + the first block
    images_per_s: float = 0.0
    actors: int = 0
    blocks: list[int] = field(default_factory=list)  # blocks processed (published or found done)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def generated_training_images(cfg: RaydbConfig) -> int:
    """Generated class images that training reads: ``num_class_images`` when a run (or a trial of
    the search) trains in image mode on generated images, else none (``prior.mode: model`` needs
    none; ``prior.class_data`` replaces them)."""
    p = cfg.prior
    if not p.enabled or p.class_data or "images" not in cfg.prior_modes():
        return 0
    return p.num_class_images


def prior_total_images(cfg: RaydbConfig) -> int:
    """Class images the prior stage generates: the training ones plus the held-out ones that only
    validation scores. In model mode only a search validates, so without one nothing is generated."""
    p = cfg.prior
    if not p.enabled or p.class_data:
        return 0
    training = generated_training_images(cfg)
    return training + (p.num_holdout if training or cfg.tune is not None else 0)


def generation_device(use_ray: bool | None = None) -> str:
    """Where class images are generated: ``cuda`` when the Ray cluster (without Ray: this machine)
    has a GPU, else ``cpu``. Part of the cache key, so reading and generating agree on it."""
    use_ray = _ray_running() if use_ray is None else use_ray
    if use_ray:
        import ray

        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_prior_cache(cfg: RaydbConfig, storage: Storage, *, use_ray: bool | None = None) -> PriorCache:
    """The cache for ``cfg`` (resolves the base model's identity, scheduler name and device)."""
    import json
    from pathlib import Path

    from raydb.models.components import model_family, resolve_model

    path, identity = resolve_model(cfg.model, storage, cfg.workspace)
    scheduler_name = "unknown"
    sched_cfg = Path(path) / "scheduler" / "scheduler_config.json"
    if sched_cfg.is_file():
        scheduler_name = json.loads(sched_cfg.read_text()).get("_class_name", "unknown")
    family = model_family(path)
    check_resolution(cfg.train.resolution, family)  # before any image is drawn at it
    return prior_cache_for(cfg, identity, scheduler_name, generation_device(use_ray), family)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _generate_with_ray(cfg: RaydbConfig, cache: PriorCache, blocks: list[int],
                       progress: Callable[[int, bool], None], quiet: bool) -> int:
    """Map ``blocks`` through an actor pool of ``BlockGenerator``; returns the pool size."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = cfg.prior.concurrency or (gpus if gpus else 1)
    actors = max(1, min(actors, len(blocks)))
    # One row per block and one block per task, so blocks spread over actors and a lost actor
    # costs only the blocks it had in flight.
    ds = ray.data.from_items([{"block": b} for b in blocks], override_num_blocks=len(blocks))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": cpu_threads(cache)}
    out = ds.map_batches(
        BlockGenerator,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "cache": cache.__dict__,
                               "endpoint_url": Storage(cfg.s3_endpoint_url).endpoint_url,
                               "faults": faults.plan()},
        batch_size=1, batch_format="numpy",
        # Two blocks in flight per actor: the next block is already queued when one finishes (no
        # idle round trip through the executor); a lost actor costs at most those two blocks.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        **resources,
    )
    out.context.enable_progress_bars = False  # the driver's tqdm bar is the one progress bar
    out.context.print_on_execution_start = not quiet and is_verbose()
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for block, written in zip(batch["block"].tolist(), batch["written"].tolist(), strict=True):
            progress(int(block), bool(written))
    return actors


def ensure_prior_images(
    cfg: RaydbConfig, storage: Storage | None = None, *, use_ray: bool | None = None,
    count: int | None = None, quiet: bool = False,
) -> PriorRunStats:
    """Generate whatever blocks of the class-prior cache are missing; return what was done.

    ``count`` defaults to ``num_class_images + num_holdout``; blocks already published (by an
    earlier run or a concurrent job) are not regenerated.
    """
    from tqdm.auto import tqdm

    storage = storage or Storage(cfg.s3_endpoint_url)
    use_ray = _ray_running() if use_ray is None else use_ray
    cache = resolve_prior_cache(cfg, storage, use_ray=use_ray)
    count = count if count is not None else prior_total_images(cfg)
    stats = PriorRunStats(cache.uri, cache.key, count)
    missing = cache.missing_blocks(storage, count)
    if not missing:
        cache.write_manifest(storage)
        return stats
    bar = tqdm(total=len(missing) * cache.block_size, unit="img", desc="prior images",
               disable=quiet or not show_progress())
    start = time.perf_counter()

    def progress(block: int, written: bool) -> None:
        if not stats.blocks:
            stats.first_block_s = time.perf_counter() - start
        stats.blocks.append(block)
        stats.blocks_generated += int(written)
        bar.update(cache.block_size)

    if use_ray:
        stats.actors = _generate_with_ray(cfg, cache, missing, progress, quiet)
    else:
        gen = BlockGenerator(cfg.to_dict(), cache.__dict__, storage.endpoint_url, faults=faults.plan())
        stats.actors = 1
        for block in missing:
            result = gen({"block": np.array([block], dtype=np.int64)})
            progress(block, bool(result["written"][0]))
    bar.close()
    stats.seconds = time.perf_counter() - start
    stats.images_generated = stats.blocks_generated * cache.block_size
    stats.images_per_s = stats.images_generated / max(stats.seconds, 1e-9)
    cache.write_manifest(storage)
    if not quiet:
        log.info("prior images: generated %d in %.1fs (%.2f images/s, %d actor(s)) -> %s",
                 stats.images_generated, stats.seconds, stats.images_per_s, stats.actors, cache.uri)
    return stats


def class_images(cfg: RaydbConfig, storage: Storage, *, holdout: bool = False) -> list[Image.Image]:
    """The training class images (with ``holdout``: the held-out ones), prepared at the training
    resolution: from ``prior.class_data``, else the shared cache (generating what is missing)."""
    return [image for image, _ in class_images_with_geometry(cfg, storage, holdout=holdout)]


def class_images_with_geometry(
    cfg: RaydbConfig, storage: Storage, *, holdout: bool = False,
) -> list[tuple[Image.Image, ImageGeometry]]:
    """:func:`class_images` with each image's size/crop (SDXL's conditioning): ingestion's for
    ``prior.class_data``; generated images are whole, uncropped pictures at their own size.

    Generated images are laid out ``[training | held out]`` (:func:`generated_training_images`
    training ones, so in model mode the held-out ones come first); ``prior.class_data`` gives its
    first ``num_class_images`` to training (model mode: the pool) and the rest to validation.
    """
    if not cfg.prior.enabled:
        return []
    if cfg.prior.class_data:
        from raydb.data.ingest import load_images_with_geometry

        n = cfg.prior.num_class_images
        images = load_images_with_geometry(cfg.prior.class_data, cfg.train.resolution, storage=storage,
                                           center_crop=cfg.train.center_crop, field="prior.class_data")
    else:
        n, total = generated_training_images(cfg), prior_total_images(cfg)
        if not (total - n if holdout else n):
            return []  # nothing of this kind is needed: generate nothing
        ensure_prior_images(cfg, storage)
        images = [(im, ImageGeometry.whole(im))
                  for im in resolve_prior_cache(cfg, storage).read_images(storage, total)]
    return images[n:] if holdout else images[:n]
