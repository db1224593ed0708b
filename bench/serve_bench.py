"""Serving benchmark (not a test): adapter switch cost and throughput of mixed vs single-subject load.

    .venv/bin/python bench/serve_bench.py [--subjects 3] [--seconds 8] [--concurrency 8] [--steps 4]

1. Trains ``--subjects`` tiny subjects into a temporary workspace (a few seconds each).
2. Switch cost, in this process on one pipeline (no Ray): cold load (registry read + sha256 check +
   safetensors parse + ``load_lora_weights``), warm switch (``set_adapters``), unload.
3. Over HTTP against the Serve app (one diffusion replica): requests/s and p50/p99 latency for a
   single-subject load, a mixed load with every adapter resident, and a mixed load with only two
   adapter slots (every request cold-loads), each for ``--seconds`` with ``--concurrency`` clients.

Uses the tiny model at 64x64, so absolute numbers measure the serving overhead, not diffusion speed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_subjects(workspace: str, n: int) -> list[str]:
    from raydb.config import load_config
    from raydb.train.local import train_subject

    ids = [f"subject{i}" for i in range(n)]
    for i, sid in enumerate(ids):
        cfg = load_config(data={
            "workspace": workspace, "model": {"pretrained": "tiny"}, "prior": {"enabled": False},
            "subject": {"id": sid, "tenant": "bench", "instance_prompt": f"a photo of tok{i} dog",
                        "class_prompt": "a photo of a dog"},
            "train": {"resolution": 64, "max_steps": 2, "learning_rate": 1e-2, "checkpoint_every": 1000,
                      "num_sample_images": 0, "seed": i},
        })
        train_subject(cfg, quiet=True, samples=False)
    return ids


def switch_costs(workspace: str, ids: list[str], repeats: int = 5) -> dict[str, list[float]]:
    """Seconds per cold load, warm switch and unload, on one in-process pipeline."""
    from raydb.config import ModelConfig
    from raydb.models.components import load_pipeline
    from raydb.registry import latest_version
    from raydb.serving.adapters import AdapterPool
    from raydb.storage import Storage

    storage = Storage()
    pool = AdapterPool(load_pipeline(ModelConfig(pretrained="tiny"), storage, workspace))
    out: dict[str, list[float]] = {"cold load": [], "warm switch": [], "unload": []}
    for _ in range(repeats):
        adapters = []
        for sid in ids:
            uri = latest_version(storage, workspace, sid)["uri"]
            t = time.perf_counter()
            adapters.append(pool.load(storage, uri, sid, "v0001"))
            out["cold load"].append(time.perf_counter() - t)
        for adapter in adapters * 2:
            t = time.perf_counter()
            pool.pipe.set_adapters([adapter.name])
            out["warm switch"].append(time.perf_counter() - t)
        for adapter in adapters:
            t = time.perf_counter()
            pool.unload(adapter)
            out["unload"].append(time.perf_counter() - t)
            adapter.loaded = False
    return out


def load_test(base_url: str, ids: list[str], seconds: float, concurrency: int, steps: int) -> dict:
    """Closed loop: ``concurrency`` clients, each sends the next request when the last returns."""
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=base_url, timeout=120, headers={"X-API-Key": KEY}) as http:
            i = worker
            while time.perf_counter() < deadline:
                body = {"subject_id": ids[i % len(ids)], "prompt": "a photo of a dog", "seed": i,
                        "num_inference_steps": steps, "width": 64, "height": 64}
                t = time.perf_counter()
                resp = http.post("/v1/generate", json=body, headers={"Accept": "image/png"})
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
                i += concurrency

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)

    def percentile(q: float) -> float:
        return latencies[min(n - 1, int(n * q))] if n else float("nan")

    return {"requests": n, "errors": errors, "rps": n / elapsed, "p50": percentile(0.5),
            "p99": percentile(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from raydb.config import load_config
    from raydb.serving import deploy
    from raydb.serving.auth import hash_key

    t0 = time.perf_counter()
    workspace = tempfile.mkdtemp(prefix="raydb-serve-bench-")
    ids = train_subjects(workspace, args.subjects)
    print(f"trained {len(ids)} subjects in {time.perf_counter() - t0:.1f}s")
    costs = switch_costs(workspace, ids)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    rows = []
    for label, run_ids, slots in [("single subject", ids[:1], len(ids)),
                                  (f"mixed, {len(ids)} subjects resident", ids, len(ids)),
                                  (f"mixed, {len(ids)} subjects / 2 slots", ids, 2)]:
        cfg = load_config(data={"workspace": workspace, "model": {"pretrained": "tiny"}, "serve": {
            "api_keys": {hash_key(KEY): "bench"}, "port": port, "max_num_models_per_replica": slots,
            "max_size": 64, "max_inference_steps": args.steps}})
        deploy(cfg)  # redeploying replaces the app; the HTTP proxy keeps its port
        with httpx.Client(base_url=base_url, headers={"X-API-Key": KEY}, timeout=120) as http:
            for sid in run_ids:  # warm-up: load what fits
                http.post("/v1/generate", json={"subject_id": sid, "prompt": "a dog", "width": 64,
                                                "height": 64, "num_inference_steps": 1})
        rows.append((label, load_test(base_url, run_ids, args.seconds, args.concurrency, args.steps)))
    serve.shutdown()
    ray.shutdown()

    print(f"\nadapter switch cost (tiny model, in-process, {len(costs['cold load'])} samples each)")
    print(f"{'operation':<14}{'median ms':>11}{'max ms':>9}")
    for name, values in costs.items():
        print(f"{name:<14}{statistics.median(values) * 1e3:>11.2f}{max(values) * 1e3:>9.2f}")
    print(f"\nHTTP load: {args.concurrency} concurrent clients, {args.seconds:.0f}s each, "
          f"{args.steps} steps, 64x64, 1 diffusion replica")
    print(f"{'load':<32}{'requests':>9}{'errors':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for label, r in rows:
        print(f"{label:<32}{r['requests']:>9}{r['errors']:>7}{r['rps']:>8.2f}"
              f"{r['p50'] * 1e3:>9.0f}{r['p99'] * 1e3:>9.0f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
