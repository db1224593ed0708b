"""Prior-image throughput: the Ray Data path (1 and 2 actors) against a plain diffusers loop.

    .venv/bin/python bench/prior_bench.py [--images 64 --resolution 128 --steps 10 --batch 4]

All runs make the same images (same seeds, same batch composition, the same single torch thread per
generator — see raydb/prior/cache.py) and the script checks the PNG bytes agree. Ray is started
before any timing; each Ray run still pays its own actor start-up (a fresh worker process imports
torch/diffusers and loads the pipeline), so the table shows end-to-end images/s and the steady
rate after the first block. On a 2-core machine shared with other work, 2 actors cannot scale far.
Not a test: it prints a table and exits 0.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from raydb.config import RaydbConfig, load_config  # noqa: E402
from raydb.models.components import load_pipeline  # noqa: E402
from raydb.prior.cache import CPU_THREADS, image_seed  # noqa: E402
from raydb.prior.stage import ensure_prior_images, resolve_prior_cache  # noqa: E402
from raydb.storage import Storage  # noqa: E402


def _cfg(workspace: str, args: argparse.Namespace, actors: int) -> RaydbConfig:
    return load_config(data={
        "workspace": workspace, "model": {"pretrained": "tiny"}, "train": {"resolution": args.resolution},
        "prior": {"num_class_images": args.images, "num_holdout": 0, "sample_batch_size": args.batch,
                  "num_inference_steps": args.steps, "concurrency": actors},
    })


def plain_loop(cfg: RaydbConfig, threads: int) -> tuple[dict, list[bytes]]:
    """What a single-process script does: load a pipeline, generate batch after batch, save PNGs."""
    storage, p = Storage(), cfg.prior
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = load_pipeline(cfg.model, storage, cfg.workspace)
    loaded = time.perf_counter()
    pngs: list[bytes] = []
    first_block_s = 0.0
    for first in range(0, p.num_class_images, p.sample_batch_size):
        indices = range(first, first + p.sample_batch_size)
        generators = [torch.Generator("cpu").manual_seed(image_seed(p.seed, i)) for i in indices]
        images = pipe(prompt=[cfg.subject.class_prompt] * len(indices),
                      num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                      height=cfg.train.resolution, width=cfg.train.resolution, generator=generators).images
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        first_block_s = first_block_s or time.perf_counter() - start
    seconds = time.perf_counter() - start
    torch.set_num_threads(before)
    return {"seconds": seconds, "first_block_s": first_block_s, "load_s": loaded - start}, pngs


def ray_run(cfg: RaydbConfig) -> tuple[dict, list[bytes]]:
    storage = Storage()
    resolve_prior_cache(cfg, storage)  # materialise the tiny model before timing
    stats = ensure_prior_images(cfg, storage, use_ray=True, quiet=True)
    assert stats.images_generated == cfg.prior.num_class_images, stats
    pngs = resolve_prior_cache(cfg, storage).read_table(storage, cfg.prior.num_class_images)["png"]
    return {"seconds": stats.seconds, "first_block_s": stats.first_block_s}, pngs.to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--default-threads", action="store_true",
                        help=f"also time the plain loop at torch's default {torch.get_num_threads()} threads "
                             "(different bytes; very slow when the cores are shared)")
    args = parser.parse_args()

    import ray

    root = tempfile.mkdtemp(prefix="prior-bench-")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{args.images} images, {args.resolution}px, {args.steps} steps, batch {args.batch}, "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}, torch threads/generator {CPU_THREADS}")

    rows: list[tuple[str, dict]] = []
    base_cfg = _cfg(os.path.join(root, "plain"), args, 1)
    resolve_prior_cache(base_cfg, Storage())
    base, base_pngs = plain_loop(base_cfg, CPU_THREADS)
    rows.append((f"plain loop, {CPU_THREADS} thread", base))
    if args.default_threads:
        rows.append((f"plain loop, {os.cpu_count()} threads", plain_loop(base_cfg, os.cpu_count() or 1)[0]))
    for actors in args.actors:
        result, pngs = ray_run(_cfg(os.path.join(root, f"ray{actors}"), args, actors))
        rows.append((f"Ray Data, {actors} actor(s)", result))
        result["same_bytes"] = pngs == base_pngs

    n, batch = args.images, args.batch
    print(f"{'run':<24} {'seconds':>8} {'img/s':>7} {'ratio':>6} {'1st blk s':>9} "
          f"{'steady img/s':>12} {'ratio':>6}  same bytes")
    base_rate = n / base["seconds"]
    base_steady = (n - batch) / (base["seconds"] - base["first_block_s"])
    for name, r in rows:
        rate = n / r["seconds"]
        steady = (n - batch) / max(r["seconds"] - r["first_block_s"], 1e-9)
        print(f"{name:<24} {r['seconds']:>8.1f} {rate:>7.2f} {rate / base_rate:>6.2f} "
              f"{r['first_block_s']:>9.1f} {steady:>12.2f} {steady / base_steady:>6.2f}  "
              f"{r.get('same_bytes', '-')}")
    ray.shutdown()


if __name__ == "__main__":
    main()
