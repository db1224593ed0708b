"""Benchmark: cached-latent training vs. a diffusers-style loop that runs the VAE encoder every step.

Both arms use the same model, LoRA, optimizer and micro-batches (``step_micro_batches`` with the same
seed); the only difference is ``train.cache_latents``: the cached arm samples latents from the
stored distribution, the uncached arm encodes the pixels with the VAE inside every step (exactly
what diffusers' ``train_dreambooth_lora.py`` does). Measurements are interleaved A, B, A, B ... so
drifting machine load hits both arms alike. Timed: building the micro-batches + ``optimizer_step``.

    .venv/bin/python bench/train_cache.py --resolution 128 --steps 40 --batch-size 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from raydb.config import RaydbConfig, load_config  # noqa: E402
from raydb.models.components import load_components  # noqa: E402
from raydb.storage import Storage  # noqa: E402
from raydb.train.data import TrainingData, step_micro_batches  # noqa: E402
from raydb.train.local import prepare_training_data  # noqa: E402
from raydb.train.step import TrainState, build_train_state, optimizer_step  # noqa: E402


def _arm(cfg: RaydbConfig, storage: Storage, device: str):
    components = load_components(cfg.model, storage, cfg.workspace, device=device)
    data = prepare_training_data(cfg, components, storage)
    state = build_train_state(cfg, components.unet, None)
    return components, data, state


def _step(
    cfg: RaydbConfig, components, data: TrainingData, state: TrainState, device: str,
) -> tuple[int, float]:
    """One optimizer step; returns (images, seconds) including micro-batch assembly."""
    tc = cfg.train
    start = time.perf_counter()
    micro = step_micro_batches(data, tc, step=state.step, device=device,
                               num_train_timesteps=components.noise_scheduler.config.num_train_timesteps)
    m = optimizer_step(state, micro, cfg=cfg, noise_scheduler=components.noise_scheduler,
                       prediction_type=components.prediction_type, with_prior=data.with_prior,
                       vae=components.vae)
    return m["images"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per arm")
    parser.add_argument("--batch-size", type=int, default=1, help="instance images per step "
                        "(the same number of class images is added)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm")
    parser.add_argument("--chunk", type=int, default=5, help="steps per arm before switching")
    parser.add_argument("--model", default="tiny", help="model.pretrained")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    storage = Storage()
    workspace = tempfile.mkdtemp(prefix="raydb-bench-")
    base = {"workspace": workspace, "model": {"pretrained": args.model},
            "train": {"resolution": args.resolution, "batch_size": args.batch_size,
                      "max_steps": args.warmup + args.steps, "num_sample_images": 0},
            "prior": {"num_class_images": 4, "sample_batch_size": 2, "num_inference_steps": 2,
                      "num_holdout": 0}}
    arms = {}
    for name, cached in (("cached latents", True), ("VAE every step", False)):
        cfg = load_config(data=base | {"train": base["train"] | {"cache_latents": cached}})
        arms[name] = (cfg, *_arm(cfg, storage, device))

    for cfg, components, data, state in arms.values():
        for _ in range(args.warmup):
            _step(cfg, components, data, state, device)
    times: dict[str, list[float]] = {name: [] for name in arms}
    images: dict[str, int] = dict.fromkeys(arms, 0)
    done = 0
    while done < args.steps:
        n = min(args.chunk, args.steps - done)
        for name, (cfg, components, data, state) in arms.items():
            for _ in range(n):
                count, seconds = _step(cfg, components, data, state, device)
                times[name].append(seconds)
                images[name] += count
        done += n

    print(f"device={device} resolution={args.resolution} batch={args.batch_size} (+{args.batch_size} class) "
          f"steps={args.steps} threads={torch.get_num_threads()}")
    print(f"{'arm':<16} {'images/s':>9} {'median ms/step':>15}")
    rate = {}
    for name in arms:
        rate[name] = images[name] / sum(times[name])
        print(f"{name:<16} {rate[name]:>9.1f} {1000 * statistics.median(times[name]):>15.1f}")
    print(f"speed-up (cached / VAE every step): {rate['cached latents'] / rate['VAE every step']:.2f}x")


if __name__ == "__main__":
    main()
