"""Steady-state training images/s on Ray Train with 1 and 2 workers (tiny model, CPU).

Usage: python bench/train_workers.py [--steps 40] [--resolution 64] [--batch-size 2]
Each arm is a full ``train_distributed`` run in a fresh workspace on one local Ray cluster;
images/s is the median over the steps after the first five, summed over workers (all images of a
step divided by the slowest worker's step time). On 2 cores two workers share the same cores, so
expect little or no scaling here: the point is the overhead of DDP + Ray Train, measured side by
side. For cached versus uncached encoding see bench/train_cache.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from raydb.cluster import init_ray
    from raydb.config import load_config
    from raydb.train.stage import train_distributed

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        init_ray(load_config(data={"workspace": root}))
        for workers in (1, 2):
            cfg = load_config(data={
                "workspace": f"{root}/w{workers}", "cluster": {"num_workers": workers},
                "train": {"resolution": args.resolution, "max_steps": args.steps,
                          "batch_size": args.batch_size, "checkpoint_every": 10_000,
                          "num_sample_images": 0},
                "prior": {"num_class_images": 8, "num_holdout": 0, "sample_batch_size": 4,
                          "num_inference_steps": 2}})
            start = time.perf_counter()
            result = train_distributed(cfg, quiet=True)
            wall = time.perf_counter() - start
            import json
            from pathlib import Path

            log = (Path(result["run_dir"]) / "metrics.jsonl").read_text()
            lines = [json.loads(x) for x in log.splitlines()]
            ips = statistics.median(m["images_per_s"] for m in lines[5:])
            rows.append((workers, ips, wall))
    base = rows[0][1]
    print(f"tiny model, {args.resolution} px, per-worker batch {args.batch_size}+{args.batch_size}, "
          f"{args.steps} steps, {os.cpu_count()} cores")
    print(f"{'workers':>7s} {'images/s':>9s} {'vs 1 worker':>12s} {'run wall s':>11s}")
    for workers, ips, wall in rows:
        print(f"{workers:7d} {ips:9.1f} {ips / base:11.2f}x {wall:11.1f}")


if __name__ == "__main__":
    main()
