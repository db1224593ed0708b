"""Serving engine at SD 1.5 size, without Ray: batched multi-subject throughput and latency on a GPU.

Builds SD 1.5's architecture with seeded random weights (``gpu_truth.SD15``; nothing downloaded),
wraps it in :class:`raydb.serving.engine.DiffusionEngine` (fp16 on CUDA, as the replica runs it)
with random rank-8 adapters written into its slots, and drives it the way a replica does —
:class:`raydb.serving.batcher.ShapeBatcher` in front, closed-loop clients — for:

* concurrency 1, 8, 32;
* loads: (a) one subject, (b) 8 subjects uniformly mixed, (c) 16 subjects over 8 resident slots
  (a miss evicts the least recently used subject and copies the new one into its slot);
* batching on (``max_batch_size=8``) and off (1);
* the UNet eager and under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) — the faster one
  is what a replica should run.

What it must show (issue 16) on an H100/H200, 512 px, 25 steps, CFG 7.5: at concurrency 8 with
mixed subjects, batched images/s ≥ 4× the concurrency-1 unbatched images/s; p50 latency at
concurrency 1 ≤ 0.6 s. ``checks`` in the JSON states both.

    python bench/serve_engine_gpu.py --out bench/results/serve_engine_<chip>_<date>.json   # GPU
    python bench/serve_engine_gpu.py --tiny --seconds 2 --out /tmp/serve_engine_tiny.json   # CPU smoke

On a lent device machine (no network): ``bash bench/device_wheels.sh`` here once, then
``run(command="pip install -q --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD
python3 bench/serve_engine_gpu.py --seconds 5 --out $OUT/serve_engine.json", carry=[".whl"],
timeout_s=570)`` — 36 arms of 5 s plus model build and compile, about 5 minutes; the JSON is
rewritten after every arm, so a run cut short keeps what it measured. Batch sizes other than 1 and
8 (partial batches) may compile during an arm under ``reduce-overhead``; ``mean_batch`` shows them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_truth import SD_SCHEDULE, Bench, build_frozen, build_unet  # noqa: E402

from raydb.serving.batcher import ShapeBatcher  # noqa: E402
from raydb.serving.engine import DiffusionEngine, EngineRequest  # noqa: E402
from raydb.serving.multi_lora import LoraFactors  # noqa: E402

RANK = 8


def build_engine(b: Bench, num_slots: int) -> DiffusionEngine:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae, text_encoder, tokenizer = build_frozen(b)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=build_unet(b),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (smoke run)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per arm")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--compile", nargs="+", default=["eager", "reduce-overhead"],
                        help="UNet modes to measure: eager and/or torch.compile modes")
    args = parser.parse_args()
    b = Bench(argparse.Namespace(tiny=args.tiny, resolution=None, cpu=False, budget_s=1e9, out=args.out))
    size = b.spec["resolution"]
    if b.cuda:  # the replica's serving dtype
        b.dtype = torch.float16
    engine = build_engine(b, num_slots=8)
    adapters = random_adapters(engine, 16)
    results: dict[str, Any] = {
        "schema": 1, "date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name()
        if b.cuda else platform.processor() or "cpu", "torch": torch.__version__, "resolution": size,
        "steps": args.steps, "dtype": str(b.dtype), "rank": RANK, "rows": [], "errors": {}}
    loads = [("one subject", 1), ("8 subjects mixed", 8), ("16 subjects / 8 slots", 16)]
    for mode in args.compile:
        try:
            engine.unet = engine.pipe.unet if mode == "eager" else torch.compile(engine.pipe.unet, mode=mode)
            warm = Residency(engine, adapters, 8)
            for batch in (1, 8):  # compile / capture each batch size before timing
                load_test(engine, warm, 8, concurrency=batch, batch=batch, seconds=0.1, size=size,
                          steps=args.steps)
        except Exception as exc:  # noqa: BLE001 - record and measure the other modes
            results["errors"][mode] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        for label, subjects in loads:
            for concurrency in args.concurrency:
                for batch in (1, 8):
                    residency = Residency(engine, adapters, 8)
                    row = {"unet": mode, "load": label, "concurrency": concurrency, "max_batch_size": batch}
                    row |= load_test(engine, residency, subjects, concurrency=concurrency, batch=batch,
                                     seconds=args.seconds, size=size, steps=args.steps)
                    row["adapter_loads"] = residency.loads
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    results["checks"] = checks(results["rows"])
    print(json.dumps(results["checks"], indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    engine.close()


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
