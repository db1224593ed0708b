"""Serving engine at SD 1.5 size, without Ray: batched multi-subject throughput and latency on a GPU.

Builds SD 1.5's architecture with seeded random weights (``raydb.models.architectures.sd15``;
nothing downloaded; the components from ``bench/training.py``),
wraps it in :class:`raydb.serving.engine.DiffusionEngine` (fp16 on CUDA, as the replica runs it)
with random rank-8 adapters written into its slots. Two sections, results in one JSON:

1. ``variants`` — the denoising loop at a fixed shape (512 px, 25 steps, CFG; one loop of 1 and of 8
   images for 8 different subjects) under each UNet mode of ``--modes``: ``eager``, ``cudagraphs``
   (dynamo's CUDA-graph backend: the eager kernels captured, no inductor), ``reduce-overhead``
   (inductor's kernels under CUDA graphs) and, if asked, ``default`` / ``max-autotune``. Each
   compiled mode is compiled the way a replica does it (``compile_unet`` with warm-up loops at batch 1
   and 8) twice: *cold* (empty local inductor/triton caches, no workspace entry; the entry is saved
   after the warm-up) and *warm* (``torch.compiler.reset()``, new empty local caches, the workspace
   entry loaded first) — ``compile_cold_s`` / ``compile_warm_s`` and inductor's FX-graph cache hits
   and misses. Both runs are in this process (a new replica would also pay imports and inductor's
   worker start-up). ``fastest`` names the mode with the shortest loop at batch 8 and at batch 1.
2. ``rows`` — the replica's load test for ``--load-modes`` (``fastest`` = the fastest compiled mode
   at batch 8, then eager): :class:`raydb.serving.batcher.ShapeBatcher` in front, closed-loop
   clients, concurrency 1, 8, 32; loads (a) one subject, (b) 8 subjects uniformly mixed, (c) 16
   subjects over 8 resident slots (a miss evicts the least recently used subject and copies the new
   one into its slot); batching on (``max_batch_size=8``) and off (1).

What it must show (issue 16) on an H100/H200, 512 px, 25 steps, CFG 7.5: at concurrency 8 with
mixed subjects, batched images/s ≥ 4× the concurrency-1 unbatched images/s; p50 latency at
concurrency 1 ≤ 0.6 s (``checks``, per load mode); which of CUDA graphs and torch.compile runs the
loop faster (``fastest``: set ``serve.compile`` to it if it beats eager); and that the workspace
compile cache makes the second compile a warm one (``compile_warm_s`` well below ``compile_cold_s``,
``fxgraph_cache_miss`` 0 in the warm run of the inductor modes).

    python -m bench.serve_engine_gpu --out bench/results/serve_engine_<chip>_<date>.json   # GPU
    python -m bench.serve_engine_gpu --tiny --seconds 1 --concurrency 1 8 --out /tmp/tiny.json  # CPU smoke

On the CPU smoke (``--tiny``) the default modes are eager and cudagraphs (which runs the eager
kernels off CUDA); add ``--modes eager default`` to exercise inductor and the compile cache (minutes
on a small CPU). On a lent device machine (no network): ``bash bench/device_wheels.sh`` here once,
then ``run(command="MODE=serve bash bench/device_run.sh", carry=[".whl"], timeout_s=580)``.
``--budget-s`` (default 540) skips what would not finish in time and says so in ``skipped``; the
JSON is rewritten after every measurement (``bench/harness.py``), so a run cut short keeps what it
measured.
Batch sizes other than 1 and 8 (partial batches) may record new CUDA graphs during an arm;
``mean_batch`` shows them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections import OrderedDict
from typing import Any

import torch

from bench import training
from bench.harness import Run
from raydb.models.architectures import SD_NOISE_SCHEDULE, sd15
from raydb.models.tiny import tiny_architecture
from raydb.serving.batcher import ShapeBatcher
from raydb.serving.engine import (
    DiffusionEngine,
    EngineRequest,
    compile_options,
    serving_compile_cache,
    warm_up_batches,
)
from raydb.serving.multi_lora import LoraFactors
from raydb.storage import Storage

RANK = 8
MAX_BATCH = 8


def build_engine(b: Run, num_slots: int) -> DiffusionEngine:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    parts = training.frozen(b)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0],
        unet=training.unet(b), scheduler=PNDMScheduler(**SD_NOISE_SCHEDULE, skip_prk_steps=True,
                                                      steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.raydb_identity = "sd15-random"
    return DiffusionEngine(pipe, num_slots=num_slots, max_lora_rank=RANK)


def random_adapters(engine: DiffusionEngine, n: int) -> list[dict[str, dict[str, LoraFactors]]]:
    """``n`` random rank-8 adapters over the engine's UNet layers, on the CPU (copied on load)."""
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        layers = {}
        for path, layer in engine.layers["unet"].items():
            down = torch.randn(RANK, layer.in_features, generator=gen) / layer.in_features**0.5
            up = torch.randn(layer.out_features, RANK, generator=gen) * 0.05
            layers[path] = LoraFactors(down.to(layer.lora_down.dtype), up.to(layer.lora_up.dtype), 1.0)
        out.append({"unet": layers})
    return out


class Residency:
    """LRU of subjects in the engine's slots (what Serve's multiplexer does in a replica)."""

    def __init__(self, engine: DiffusionEngine, adapters: list[dict], slots: int) -> None:
        self.engine, self.adapters, self.slots = engine, adapters, slots
        self.where: OrderedDict[int, int] = OrderedDict()
        self.loads = 0

    def slot(self, subject: int) -> int:
        if subject in self.where:
            self.where.move_to_end(subject)
            return self.where[subject]
        slot = len(self.where) if len(self.where) < self.slots else self.where.popitem(last=False)[1]
        self.engine.write_slot(slot, self.adapters[subject])
        self.where[subject] = slot
        self.loads += 1
        return slot


def load_test(engine: DiffusionEngine, residency: Residency, subjects: int, *, concurrency: int,
              batch: int, seconds: float, size: int, steps: int) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, each sends its next request when the last returns."""

    def run(requests: list[EngineRequest]):
        # Slots are assigned here, in the engine's thread, so a batch never evicts its own members.
        for r in requests:
            r.slot = residency.slot(r.params["subject"])
        return engine.run_batch(requests)

    batcher = ShapeBatcher(run, key=lambda r: engine.key(r.params), max_batch_size=batch,
                           wait_s=0.01 if batch > 1 else 0.0)
    latencies: list[float] = []

    async def client(worker: int, deadline: float) -> None:
        i = worker
        while time.perf_counter() < deadline:
            params = {"prompt": "a photo of a dog", "negative_prompt": None, "num_inference_steps": steps,
                      "guidance_scale": 7.5, "seed": i, "width": size, "height": size, "num_images": 1,
                      "subject": i % subjects}
            t0 = time.perf_counter()
            await batcher.submit(EngineRequest(params))
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, start + seconds) for w in range(concurrency)))
        return time.perf_counter() - start

    forwards = engine.unet_forwards
    elapsed = asyncio.run(main())
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "images_per_s": round(n / elapsed, 3),
            "p50_s": round(latencies[n // 2], 4) if n else None,
            "p99_s": round(latencies[min(n - 1, int(n * 0.99))], 4) if n else None,
            "mean_batch": round(statistics.mean(size for _, size in batcher.batches), 2)
            if batcher.batches else None,
            "unet_forwards": engine.unet_forwards - forwards}


def sync(b: Run) -> None:
    if b.cuda:
        torch.cuda.synchronize()


def fresh_local_caches() -> None:
    """Empty local inductor and triton caches: what a new machine starts with."""
    root = tempfile.mkdtemp(prefix="raydb-serve-compile-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")


def use_mode(b: Run, engine: DiffusionEngine, mode: str, workspace: str) -> dict[str, Any]:
    """Put ``mode``'s UNet in the engine as a replica does (compile + warm-up, cache loaded/saved);
    returns ``compile_unet``'s info plus the wall time and inductor's FX-graph cache counters."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    engine.unet = engine.pipe.unet
    start = time.perf_counter()
    if mode == "eager":  # the warm-up loops alone: the baseline a compile's cost is read against
        for n in warm_up_batches(MAX_BATCH):
            engine.denoise([EngineRequest(engine.warm_up_params(n))])
        sync(b)
        return {"wall_s": round(time.perf_counter() - start, 2)}
    counters.clear()
    cache = serving_compile_cache(engine, Storage(), workspace, mode=mode, max_batch_size=MAX_BATCH)
    info = engine.compile_unet(cache=cache, warm_up=warm_up_batches(MAX_BATCH), **compile_options(mode))
    sync(b)
    return info | {"wall_s": round(time.perf_counter() - start, 2),
                   "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
                   "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
                   "entry_bytes": (Storage().read_json_or(cache.meta_uri) or {}).get("bytes")}


def time_loops(b: Run, engine: DiffusionEngine, residency: Residency, *, size: int, steps: int,
               repeats: int) -> dict[str, Any]:
    """Median seconds of one denoising loop of 1 and of ``MAX_BATCH`` images (one subject each)."""
    out: dict[str, Any] = {}
    for n in (1, MAX_BATCH):
        requests = [EngineRequest({"prompt": "a photo of a dog", "negative_prompt": None,
                                   "num_inference_steps": steps, "guidance_scale": 7.5, "seed": i,
                                   "width": size, "height": size, "num_images": 1}, residency.slot(i))
                    for i in range(n)]
        times = []
        for _ in range(repeats + 1):  # the first loop at a new step count is not timed
            sync(b)
            t0 = time.perf_counter()
            engine.denoise(requests)
            sync(b)
            times.append(time.perf_counter() - t0)
        loop_s = statistics.median(times[1:])
        out[f"batch_{n}"] = {"loop_s": round(loop_s, 4), "images_per_s": round(n / loop_s, 3)}
    return out


def variants(b: Run, engine: DiffusionEngine, adapters: list[dict], results: dict[str, Any],
             args: argparse.Namespace, size: int, workspaces: dict[str, str]) -> None:
    """Section 1: each UNet mode at a fixed shape, with its cold and warm compile (each mode's
    compile-cache entry in its own workspace, kept in ``workspaces`` for the load test)."""
    for mode in args.modes:
        if b.left() < (30 if mode == "eager" else 240):
            results["skipped"].append(f"variant {mode}: {b.left():.0f} s of budget left")
            continue
        workspace = workspaces.setdefault(mode, tempfile.mkdtemp(prefix="raydb-serve-ws-"))
        row: dict[str, Any] = {"unet": mode}
        try:
            fresh_local_caches()
            row["cold"] = use_mode(b, engine, mode, workspace)
            if mode != "eager":
                fresh_local_caches()  # a new replica: nothing local, only the workspace entry
                row["warm"] = use_mode(b, engine, mode, workspace)
                row["compile_cold_s"], row["compile_warm_s"] = row["cold"]["wall_s"], row["warm"]["wall_s"]
            row |= time_loops(b, engine, Residency(engine, adapters, 8), size=size, steps=args.steps,
                              repeats=args.repeats)
        except Exception as exc:  # noqa: BLE001 - record and measure the other modes
            results["errors"][f"variant {mode}"] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        finally:
            engine.unet = engine.pipe.unet
        results["variants"].append(row)
        print(json.dumps(row), flush=True)
        b.save()
    timed = [v for v in results["variants"] if "batch_1" in v]
    if timed:
        results["fastest"] = {f"batch_{n}": min(timed, key=lambda v, n=n: v[f"batch_{n}"]["loop_s"])["unet"]
                              for n in (1, MAX_BATCH)}
        eager = next((v for v in timed if v["unet"] == "eager"), None)
        if eager:
            results["fastest"]["over_eager"] = {
                v["unet"]: {f"batch_{n}": round(eager[f"batch_{n}"]["loop_s"] / v[f"batch_{n}"]["loop_s"], 3)
                            for n in (1, MAX_BATCH)} for v in timed}
        b.save()


def load_modes(args: argparse.Namespace, results: dict[str, Any]) -> list[str]:
    """``--load-modes`` with ``fastest`` resolved to the fastest compiled mode at batch ``MAX_BATCH``."""
    compiled = [v for v in results["variants"] if v["unet"] != "eager" and "batch_1" in v]
    best = min(compiled, key=lambda v: v[f"batch_{MAX_BATCH}"]["loop_s"])["unet"] if compiled else None
    modes = [best if m == "fastest" else m for m in args.load_modes]
    return list(dict.fromkeys(m for m in modes if m))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (smoke run)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    parser.add_argument("--seconds", type=float, default=5.0, help="per load-test arm")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per variant and batch size")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", default=None,
                        help="UNet modes of the fixed-shape section: eager, cudagraphs, default, "
                             "reduce-overhead, max-autotune (default: eager cudagraphs reduce-overhead; "
                             "--tiny: eager cudagraphs)")
    parser.add_argument("--load-modes", nargs="+", default=["fastest", "eager"],
                        help="UNet modes of the load test ('fastest': the fastest compiled variant)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget: measurements that would not finish are skipped")
    args = parser.parse_args(argv)
    args.resolution = None
    args.modes = args.modes or (["eager", "cudagraphs"] if args.tiny else ["eager", "cudagraphs",
                                                                           "reduce-overhead"])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    b = Run(args, tiny_architecture() if args.tiny else sd15())
    size = b.resolution
    if b.cuda:  # the replica's serving dtype
        b.dtype = torch.float16
    else:  # as a CPU replica runs (serve.num_cpus_per_replica = 1); OpenMP teams thrash a busy CPU
        torch.set_num_threads(1)
    engine = build_engine(b, num_slots=8)
    adapters = random_adapters(engine, 16)
    results = b.results
    results.update({
        "schema": 2, "device": torch.cuda.get_device_name()
        if b.cuda else platform.processor() or "cpu", "torch": torch.__version__, "resolution": size,
        "steps": args.steps, "dtype": str(b.dtype), "rank": RANK, "variants": [], "rows": []})
    workspaces: dict[str, str] = {}
    variants(b, engine, adapters, results, args, size, workspaces)
    loads = [("one subject", 1), ("8 subjects mixed", 8), ("16 subjects / 8 slots", 16)]
    arm_s = args.seconds + (3 if b.cuda else 5)  # the arm, then its last batches drain
    for mode in load_modes(args, results):
        workspace = workspaces.setdefault(mode, tempfile.mkdtemp(prefix="raydb-serve-ws-"))
        try:  # warm from the variant's entry (a replica started after the first one)
            results.setdefault("load_compile", {})[mode] = use_mode(b, engine, mode, workspace)
        except Exception as exc:  # noqa: BLE001
            results["errors"][f"load {mode}"] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        for label, subjects in loads:
            for concurrency in args.concurrency:
                for batch in (1, MAX_BATCH):
                    row = {"unet": mode, "load": label, "concurrency": concurrency, "max_batch_size": batch}
                    if b.left() < arm_s:
                        results["skipped"].append(f"{row}: {b.left():.0f} s of budget left")
                        continue
                    residency = Residency(engine, adapters, 8)
                    row |= load_test(engine, residency, subjects, concurrency=concurrency, batch=batch,
                                     seconds=args.seconds, size=size, steps=args.steps)
                    row["adapter_loads"] = residency.loads
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    b.save()
        engine.unet = engine.pipe.unet
    results["checks"] = checks(results["rows"])
    results["complete"] = True
    print(json.dumps({k: results.get(k) for k in ("fastest", "checks", "skipped", "errors")}, indent=2))
    b.save()
    engine.close()
    return results


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 16's GPU targets, per UNet mode: speed-up over batch 1 and p50 at concurrency 1."""
    out = {}
    for mode in sorted({r["unet"] for r in rows}):
        def find(load: str, concurrency: int, batch: int, mode: str = mode) -> dict[str, Any] | None:
            return next((r for r in rows if (r["unet"], r["load"], r["concurrency"], r["max_batch_size"])
                         == (mode, load, concurrency, batch)), None)

        mixed, single = find("8 subjects mixed", 8, 8), find("8 subjects mixed", 1, 1)
        if mixed and single:
            speedup = mixed["images_per_s"] / single["images_per_s"]
            out[mode] = {"mixed_c8_batched_over_batch1": round(speedup, 2), "speedup_ok": speedup >= 4.0,
                         "p50_c1_s": single["p50_s"], "p50_ok": single["p50_s"] <= 0.6}
    return out


if __name__ == "__main__":
    main()
