"""Benchmark: cached-latent training vs. a diffusers-style loop that runs the VAE encoder every step.

Both arms are the shipped training loop (``TrainEngine``, as ``raydb.train.local`` builds it) on the
same model, LoRA, optimizer and batches (same seed); the only difference is
``train.cache_latents``: the cached arm samples latents from the stored distribution, the uncached
arm encodes the pixels with the VAE inside every step (exactly what diffusers'
``train_dreambooth_lora.py`` does). Steps are interleaved A, B, A, B ... in chunks so drifting
machine load hits both arms alike. Timed: ``TrainEngine.step()`` (``bench/harness.py``'s rules).

    python -m bench.train_cache --resolution 128 --steps 40 --batch-size 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.harness import time_steps  # noqa: E402
from raydb.config import load_config  # noqa: E402
from raydb.models.components import load_components  # noqa: E402
from raydb.storage import Storage  # noqa: E402
from raydb.train.engine import TrainEngine  # noqa: E402
from raydb.train.local import prepare_training_data  # noqa: E402
from raydb.train.step import build_train_state  # noqa: E402

ARMS = (("cached latents", True), ("VAE every step", False))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per arm")
    parser.add_argument("--batch-size", type=int, default=1, help="instance images per step "
                        "(the same number of class images is added)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm")
    parser.add_argument("--chunk", type=int, default=5, help="steps per arm before switching")
    parser.add_argument("--model", default="tiny", help="model.pretrained")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    storage = Storage()
    workspace = tempfile.mkdtemp(prefix="raydb-bench-")
    base = {"workspace": workspace, "model": {"pretrained": args.model},
            "train": {"resolution": args.resolution, "batch_size": args.batch_size,
                      "max_steps": args.warmup + args.steps, "num_sample_images": 0},
            "prior": {"num_class_images": 4, "sample_batch_size": 2, "num_inference_steps": 2,
                      "num_holdout": 0}}
    engines: dict[str, TrainEngine] = {}
    for name, cached in ARMS:
        cfg = load_config(data=base | {"train": base["train"] | {"cache_latents": cached}})
        comps = load_components(cfg.model, storage, cfg.workspace, device=device)
        data = prepare_training_data(cfg, comps, storage)
        engines[name] = TrainEngine(cfg, build_train_state(cfg, comps.unet, None), data,
                                    noise_scheduler=comps.noise_scheduler,
                                    prediction_type=comps.prediction_type, vae=comps.vae, device=device)
    times: dict[str, list[float]] = {name: [] for name in engines}
    images: dict[str, int] = {}
    try:
        for engine in engines.values():
            time_steps(engine.step, warmup=args.warmup, min_steps=0, min_seconds=0, max_steps=0, sync=sync)
        while len(times[ARMS[0][0]]) < args.steps:
            n = min(args.chunk, args.steps - len(times[ARMS[0][0]]))
            for name, engine in engines.items():
                t = time_steps(engine.step, warmup=0, min_steps=n, min_seconds=0, max_steps=n, sync=sync)
                times[name] += t.times
                images[name] = t.last["images"]
    finally:
        for engine in engines.values():
            engine.close()

    print(f"device={device} resolution={args.resolution} batch={args.batch_size} (+{args.batch_size} class) "
          f"steps={args.steps} threads={torch.get_num_threads()}")
    print(f"{'arm':<16} {'images/s':>9} {'median ms/step':>15} {'max ms/step':>12}")
    rate, median = {}, {}
    for name in engines:
        rate[name] = images[name] * len(times[name]) / sum(times[name])
        median[name] = statistics.median(times[name])
        print(f"{name:<16} {rate[name]:>9.1f} {1000 * median[name]:>15.1f} {1000 * max(times[name]):>12.1f}")
    speedup = rate["cached latents"] / rate["VAE every step"]
    median_speedup = median["VAE every step"] / median["cached latents"]
    # on a shared machine a few stalled steps move the mean; the median ratio is the robust one
    print(f"speed-up (cached / VAE every step): {speedup:.2f}x (images/s), "
          f"{median_speedup:.2f}x (median step)")
    return {"images_per_s": rate, "speedup": speedup, "median_speedup": median_speedup,
            "steps": {k: len(v) for k, v in times.items()}}


if __name__ == "__main__":
    main()
