"""Serving benchmark (not a test): batched multi-subject serving over HTTP, batching on vs off.

    .venv/bin/python bench/serve_bench.py [--seconds 5] [--steps 4] [--concurrency 1 8 32]

1. Trains one tiny subject and registers 15 more with random adapters (``raydb.testing``).
2. Adapter cost, in this process on one engine (no Ray): cold load (registry read + sha256 check +
   safetensors parse + copy into a slot) and unload. Switching subjects costs nothing: every sample
   is routed to its own slot inside the batch.
3. Over HTTP against the Serve app (one diffusion replica, 8 adapter slots), batching on
   (``serve.max_batch_size=8``) and off (1), at each ``--concurrency``: images/s and p50/p99 latency
   for (a) one subject, (b) 8 subjects uniformly mixed, (c) 16 subjects over the 8 slots (misses
   evict and load). Then the ratios issue 16 asks for at concurrency 8: mixed batched / mixed
   unbatched (target ≥ 2) and mixed batched / single-subject batched (target ≥ 0.9).

Uses the tiny model at 64x64, so absolute numbers measure serving overhead, not diffusion speed
(``bench/serve_engine_gpu.py`` is the GPU, SD 1.5-size counterpart without Ray).
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


def make_subjects(workspace: str, n: int) -> list[str]:
    """One trained subject (the template) plus ``n - 1`` random rank-4 adapters, all in tenant bench."""
    from raydb.config import load_config
    from raydb.pipeline import run_pipeline
    from raydb.registry import register_adapter
    from raydb.storage import Storage
    from raydb.testing import write_random_adapter

    cfg = load_config(data={
        "workspace": workspace, "model": {"pretrained": "tiny"}, "prior": {"enabled": False},
        "subject": {"id": "subject0", "tenant": "bench", "instance_prompt": "a photo of sks dog",
                    "class_prompt": "a photo of a dog"},
        "train": {"resolution": 64, "max_steps": 2, "learning_rate": 1e-2, "checkpoint_every": 1000,
                  "num_sample_images": 0},
    })
    run_pipeline(cfg, local=True, quiet=True)  # trained and registered: the pipeline registers
    for i in range(1, n):
        folder = write_random_adapter(Storage(), workspace, "subject0", f"subject{i}", rank=4, seed=i,
                                      tenant="bench")
        register_adapter(Storage(), workspace, "bench", f"subject{i}", folder)
    return [f"subject{i}" for i in range(n)]


def adapter_costs(workspace: str, ids: list[str]) -> dict[str, list[float]]:
    """Seconds per cold load and unload on one in-process engine."""
    from raydb.config import ModelConfig
    from raydb.models.components import load_pipeline
    from raydb.registry import latest_version
    from raydb.serving.engine import DiffusionEngine
    from raydb.serving.slots import SlotPool
    from raydb.storage import Storage

    storage = Storage()
    engine = DiffusionEngine(load_pipeline(ModelConfig(pretrained="tiny"), storage, workspace),
                             num_slots=len(ids), max_lora_rank=8)
    pool = SlotPool(engine)
    out: dict[str, list[float]] = {"cold load": [], "unload": []}
    adapters = []
    for sid in ids:
        uri = latest_version(storage, workspace, "bench", sid)["uri"]
        t = time.perf_counter()
        adapters.append(pool.load(storage, uri, sid, "v0001"))
        out["cold load"].append(time.perf_counter() - t)
    for adapter in adapters:
        t = time.perf_counter()
        pool.unload(adapter)
        out["unload"].append(time.perf_counter() - t)
        adapter.loaded = False
    engine.close()
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
    parser.add_argument("--seconds", type=float, default=5.0, help="per arm")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from raydb.config import load_config
    from raydb.serving import deploy
    from raydb.serving.auth import hash_key

    t0 = time.perf_counter()
    workspace = tempfile.mkdtemp(prefix="raydb-serve-bench-")
    ids = make_subjects(workspace, 16)
    print(f"made {len(ids)} subjects in {time.perf_counter() - t0:.1f}s")
    costs = adapter_costs(workspace, ids[:8])

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    loads = [("a: one subject", ids[:1]), ("b: 8 subjects mixed", ids[:8]), ("c: 16 subjects / 8 slots", ids)]
    rows = []
    for batch in (8, 1):
        cfg = load_config(data={"workspace": workspace, "model": {"pretrained": "tiny"}, "serve": {
            "api_keys": {hash_key(KEY): "bench"}, "port": port, "max_num_models_per_replica": 8,
            "max_size": 64, "max_inference_steps": args.steps, "max_batch_size": batch,
            "batch_wait_ms": args.batch_wait_ms, "max_ongoing_requests": 2 * max(args.concurrency),
            # one tenant drives the whole load here: its limits would measure themselves, not serving
            "tenant_max_concurrent": max(args.concurrency), "tenant_rate_per_s": 0}})
        deploy(cfg)  # redeploying replaces the app; the HTTP proxy keeps its port
        for label, run_ids in loads:
            with httpx.Client(base_url=base_url, headers={"X-API-Key": KEY}, timeout=120) as http:
                for sid in run_ids[-8:]:  # warm-up: load what fits
                    http.post("/v1/generate", json={"subject_id": sid, "prompt": "a dog", "width": 64,
                                                    "height": 64, "num_inference_steps": 1})
            for concurrency in args.concurrency:
                r = load_test(base_url, run_ids, args.seconds, concurrency, args.steps)
                rows.append((label, concurrency, batch, r))
                print(f"{label:<26} c={concurrency:<3} batch={batch}: {r['rps']:.2f} img/s", flush=True)
    serve.shutdown()
    ray.shutdown()

    print(f"\nadapter cost (tiny model, in-process engine, {len(costs['cold load'])} samples each)")
    print(f"{'operation':<14}{'median ms':>11}{'max ms':>9}")
    for name, values in costs.items():
        print(f"{name:<14}{statistics.median(values) * 1e3:>11.2f}{max(values) * 1e3:>9.2f}")
    print(f"\nHTTP load: closed loop, {args.seconds:.0f}s per arm, {args.steps} steps, 64x64, 1 diffusion "
          f"replica, 8 adapter slots, batch_wait_ms={args.batch_wait_ms:g}")
    print(f"{'load':<26}{'conc':>5}{'batch':>6}{'requests':>9}{'errors':>7}{'img/s':>8}{'p50 ms':>9}"
          f"{'p99 ms':>9}")
    for label, concurrency, batch, r in rows:
        print(f"{label:<26}{concurrency:>5}{batch:>6}{r['requests']:>9}{r['errors']:>7}{r['rps']:>8.2f}"
              f"{r['p50'] * 1e3:>9.0f}{r['p99'] * 1e3:>9.0f}")

    def rps(label: str, batch: int, concurrency: int = 8) -> float:
        return next((r["rps"] for lb, c, b, r in rows if (lb, c, b) == (label, concurrency, batch)),
                    float("nan"))

    mixed_on, mixed_off, single_on = rps(loads[1][0], 8), rps(loads[1][0], 1), rps(loads[0][0], 8)
    print(f"\nconcurrency 8: mixed batched / mixed unbatched = {mixed_on / mixed_off:.2f} (target >= 2)")
    print(f"concurrency 8: mixed batched / single-subject batched = {mixed_on / single_on:.2f} "
          "(target >= 0.9)")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
