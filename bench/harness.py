"""The benchmarks' shared harness: a budgeted run that records a JSON result as it goes, step timing
with warm-up and device synchronisation, the environment (chip, driver, torch, date), and markdown.

Why one harness: a benchmark is only as honest as its timing rules, and those rules — untimed
warm-up steps, a ``cuda.synchronize`` after every timed step, the median over enough steps, peak
memory reset per row, a failure recorded instead of ending the run, the JSON rewritten after every
measurement so a run cut short keeps its figures — are the same for every row. Rows measure
shipped code (``bench/training.py`` builds ``TrainEngine``; there is no training loop in ``bench/``).

Adding a GPU row (say a Flux or model-prior training row), in your script ``bench/<name>.py``:

1. Parse the shared flags and open a run::

       parser = argparse.ArgumentParser(); harness.add_common_args(parser, out="bench/results/x.json")
       run = harness.Run(parser.parse_args(argv), arch=my_architecture)   # arch: raydb.models
       run.results.update(model="...", settings={...})

2. Measure inside ``run.measure`` (a failure records ``errors[name]`` and the run goes on; a row
   that needs more than the budget left is listed in ``skipped``; the JSON is saved after each)::

       parts = training.frozen(run)                       # VAE + text encoder(s), random weights
       data = training.training_data(run, parts, cached=True)

       def one():
           cfg = training.train_config(run, 1, cuda_graphs="off")       # any train.* option
           with training.make_engine(run, cfg, training.unet(run), parts.vae, data) as engine:
               run.results.setdefault("x", []).append({"arm": "...", **training.measure(run, engine)})

       run.measure("x 1+1", one, needs_s=run.args.reserve_s)

   A model with its own components (another family, a flow-matching scheduler) passes its own
   UNet/transformer, ``vae``, ``TrainingData`` and ``noise_scheduler=`` / ``prediction_type=`` to
   ``make_engine``; if ``TrainEngine`` cannot run it, that is a gap in the engine, not in the bench.

   ``training.measure`` (warm-up, timed steps, first-step loss/grad norm, peak memory, optional
   FLOPs/MFU and GPU-busy profile) is built on ``time_steps`` and ``timing`` below; use those
   directly for anything that is not a training step (``bench/generation.py`` does).
3. Render: ``markdown_table(header, rows)`` returns lines; end with ``run.finish()``.
4. Ship it: a ``--tiny`` CPU smoke test in ``tests/bench/`` and a ``MODE`` in ``bench/device_run.sh``.

Result JSON (every script): ``schema``, ``complete`` (no error, nothing skipped), ``errors``
``{measurement: message}``, ``skipped`` ``[reason]``, ``date`` (UTC, ISO), ``env`` (``chip``,
``driver``, ``torch``, ``cuda``, diffusers/peft/transformers versions, ``device_type``, capability,
memory, SMs), ``elapsed_s``, then the script's own sections.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["REPO", "PEAK_BF16_TFLOPS", "Run", "StepTimes", "add_common_args", "environment",
           "time_steps", "timing", "busy_fraction", "profile_busy", "measure_matmul", "markdown_table",
           "pct", "peers_dir", "free_memory"]

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak (datasheet, SXM parts). The H200 has the H100's compute.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def peers_dir() -> Path:
    """The peer projects we compare against (diffusers' scripts): ``$RAYDB_PEERS_DIR``, else
    ``../shared/peers`` beside the repository."""
    return Path(os.environ.get("RAYDB_PEERS_DIR") or REPO.parent / "shared" / "peers")


def add_common_args(p: argparse.ArgumentParser, *, out: str, budget_s: float = 400.0,
                    reserve_s: float = 15.0, max_steps: int = 60) -> None:
    """The flags every GPU script shares (``Run`` reads them)."""
    p.add_argument("--out", default=out, help="result JSON (rewritten after every measurement)")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64 px (CPU smoke run)")
    p.add_argument("--resolution", type=int, help="override the architecture's resolution")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    p.add_argument("--budget-s", type=float, default=budget_s, help="start no measurement after this")
    p.add_argument("--reserve-s", type=float, default=reserve_s, help="budget an ordinary row needs")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row")
    p.add_argument("--min-steps", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=max_steps)


class Run:
    """One benchmark run: device and precision, the budget, the result dict and its JSON file.

    ``args`` needs ``out``, ``budget_s``, ``cpu`` and ``resolution`` (``add_common_args``); ``arch``
    is a ``raydb.models.architectures`` dict (its ``resolution`` unless ``--resolution`` is given).
    On CUDA the weights are bf16 and training uses bf16 autocast; on the CPU both are fp32.
    """

    def __init__(self, args: argparse.Namespace, arch: dict[str, Any] | None = None) -> None:
        self.args, self.arch = args, arch or {}
        self.resolution = getattr(args, "resolution", None) or self.arch.get("resolution")
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.mixed_precision = "bf16" if self.cuda else "no"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.start = time.perf_counter()
        self.out = Path(args.out)
        self.results: dict[str, Any] = {
            "schema": 1, "complete": False, "errors": {}, "skipped": [],
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "env": environment(self.device)}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        """Write the result atomically (a reader never sees half a file)."""
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.out)

    def measure(self, name: str, fn: Callable[[], Any], *, needs_s: float = 0.0) -> Any:
        """``fn()``; on failure record ``errors[name]`` and go on; skip when the budget is short."""
        if self.left() < needs_s:
            self.results["skipped"].append(f"{name}: {self.left():.0f}s of budget left, needs {needs_s:.0f}s")
            print(f"[skip] {name}", flush=True)
            self.save()
            return None
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 — one failure must not end the run
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
            return None
        finally:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {name} ({time.perf_counter() - t0:.1f}s)",
                  flush=True)
            free_memory()
            self.save()

    def finish(self) -> dict[str, Any]:
        self.results["complete"] = not self.results["errors"] and not self.results["skipped"]
        self.save()
        return self.results

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def peak_tflops(self) -> float | None:
        """The chip's dense bf16 peak (datasheet) for MFU; None off the known GPUs."""
        if not self.cuda:
            return None
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: torch.device) -> dict[str, Any]:
    """What a figure depends on besides the code: chip, driver, library versions."""
    import diffusers
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "peft": peft.__version__,
        "transformers": transformers.__version__, "device_type": device.type,
        "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(chip=torch.cuda.get_device_name(device), driver=_driver(),
                   capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    else:
        env.update(chip=f"CPU ({platform.processor() or platform.machine()})", driver=None)
    return env


@dataclass
class StepTimes:
    """Wall-clock seconds of untimed warm-up calls and timed calls, and what each call returned."""

    warmup_s: list[float] = field(default_factory=list)
    warmup_out: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    last: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_steps(step: Callable[[], Any], *, warmup: int, min_steps: int, min_seconds: float,
               max_steps: int, sync: Callable[[], None]) -> StepTimes:
    """``warmup`` untimed calls, then timed calls until at least ``min_steps`` and, within
    ``max_steps``, at least ``min_seconds`` in all. Every call is followed by ``sync()`` inside its
    time, so queued device work is charged to the call that queued it."""
    t = StepTimes()
    for _ in range(warmup):
        s0 = time.perf_counter()
        t.warmup_out.append(step())
        sync()
        t.warmup_s.append(time.perf_counter() - s0)
    while len(t.times) < min_steps or (sum(t.times) < min_seconds and len(t.times) < max_steps):
        s0 = time.perf_counter()
        t.last = step()
        sync()
        t.times.append(time.perf_counter() - s0)
    return t


def timing(t: StepTimes, items_per_step: int, *, unit: str = "images") -> dict[str, Any]:
    """The timing keys of a row: ``it_per_s``, ``{unit}_per_s`` (median step), ``{unit}_per_s_mean``,
    ``step_ms_median/min/max``, ``timed_steps``."""
    median = t.median
    return {"it_per_s": round(1 / median, 3), f"{unit}_per_s": round(items_per_step / median, 3),
            f"{unit}_per_s_mean": round(items_per_step * len(t.times) / sum(t.times), 3),
            "step_ms_median": round(1000 * median, 2), "step_ms_min": round(1000 * min(t.times), 2),
            "step_ms_max": round(1000 * max(t.times), 2), "timed_steps": len(t.times)}


def busy_fraction(kernels: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of ``[start, end]`` covered by at least one kernel (overlapping kernels count once)."""
    if end <= start:
        raise ValueError("empty span")
    busy, cursor = 0.0, start
    for a, b in sorted(kernels):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            busy += b - a
            cursor = b
    return busy / (end - start)


def profile_busy(step: Callable[[], Any], steps: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Profile ``steps`` calls on CUDA: GPU busy fraction, kernels per step, GPU ms per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    events = list(prof.events())
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    if not kernels:
        return {"gpu_busy": None, "kernels_per_step": 0}
    start = min(e.time_range.start for e in events)
    end = max(e.time_range.end for e in events)
    return {"gpu_busy": round(busy_fraction(kernels, start, end), 4),
            "kernels_per_step": round(len(kernels) / steps),
            "gpu_ms_per_step": round(sum(b - a for a, b in kernels) / steps / 1000, 2)}


def measure_matmul(device: torch.device) -> float:
    """The achievable bf16 ceiling: median of 10 random 8192^3 products after 3 warm-ups (TFLOP/s)."""
    n = 8192
    x, y = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x @ y
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table as lines: ``| a | b |``, ``|---|---|``, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "—"
