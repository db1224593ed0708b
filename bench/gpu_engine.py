"""The engine arms of ``gpu_truth.py``: today's eager step vs the graph step, measured the same way.

Arms, each on a fresh UNet + LoRA from the same init and the same batches (so their first steps
must agree):

* ``eager``: ``step_micro_batches`` (on the step's critical path) + ``optimizer_step`` — raydb today;
* ``eager + prefetch``: the same step, batches from ``BatchPrefetcher`` (background thread);
* ``graphs``: ``BatchPrefetcher`` + ``GraphStep`` (captured on CUDA after its warm-up steps; on the
  CPU the same step runs eagerly, which is what the ``--tiny`` smoke test checks);
* ``graphs + compile``: the graph step over ``train.compile=full``, measured in a fresh process
  (``--compile-probe``) so its compile time is honest, once cold and once warm from the workspace
  compile cache (``raydb.compile_cache``).

Per row: images/s and step time (median, synchronized), the GPU busy fraction of a few profiled
steps (``torch.profiler``: union of kernel intervals / wall span of those steps), peak memory, and
the first steps' loss and grad norm, which ``compare_steps`` checks against the eager arm.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from raydb.config import RaydbConfig
from raydb.train.data import TrainingData, step_micro_batches
from raydb.train.device_options import resolve_mixed_precision
from raydb.train.graphs import GraphStep
from raydb.train.prefetch import BatchPrefetcher
from raydb.train.step import build_train_state, optimizer_step

__all__ = ["ENGINES", "EngineTrainer", "busy_fraction", "profile_busy", "measure_engine",
           "compare_steps", "acceptance", "render_engine"]

ENGINES = ("eager", "eager + prefetch", "graphs")


class EngineTrainer:
    """One UNet with LoRA stepping through one engine over fixed ``[instance | class]`` batches."""

    def __init__(self, cfg: RaydbConfig, unet: torch.nn.Module, vae, data: TrainingData, *,
                 engine: str, device: torch.device, noise_scheduler) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
        self.cfg, self.vae, self.data, self.engine, self.device = cfg, vae, data, engine, device
        self.noise_scheduler = noise_scheduler
        self.state = build_train_state(cfg, unet, None)
        self.kw = dict(noise_scheduler=noise_scheduler, prediction_type="epsilon",
                       with_prior=data.with_prior, vae=vae)
        self.prefetcher = None if engine == "eager" else BatchPrefetcher(
            data, cfg.train, start_step=self.state.step,
            num_train_timesteps=noise_scheduler.config.num_train_timesteps, device=device)
        self.graph_step = None
        if engine == "graphs":
            self.graph_step = GraphStep(self.state, cfg, capture=device.type == "cuda", **self.kw)

    @property
    def mixed_precision(self) -> str:
        return resolve_mixed_precision(self.cfg.train, self.device)

    def step(self) -> dict[str, float]:
        if self.graph_step is not None:
            return self.graph_step(self.prefetcher.next(to_device=False))
        if self.prefetcher is not None:
            micro = self.prefetcher.next()
        else:
            micro = step_micro_batches(
                self.data, self.cfg.train, step=self.state.step, device=self.device,
                num_train_timesteps=self.noise_scheduler.config.num_train_timesteps)
        return optimizer_step(self.state, micro, cfg=self.cfg, **self.kw)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()


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
    """Profile ``steps`` steps on CUDA: busy fraction, kernels per step, GPU ms per step."""
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


def measure_engine(trainer: EngineTrainer, *, warmup: int, min_steps: int, min_seconds: float,
                   max_steps: int, profile_steps: int, cuda: bool,
                   sync: Callable[[], None]) -> dict[str, Any]:
    """Warm up (graphs: warm-up steps + capture), time steps, profile a few. One row."""
    images_per_step = 0
    first: list[dict[str, float]] = []
    warm_s = []
    for _ in range(warmup):
        s0 = time.perf_counter()
        m = trainer.step()
        sync()
        warm_s.append(time.perf_counter() - s0)
        first.append({"loss": m["loss"], "grad_norm": m["grad_norm"]})
        images_per_step = m["images"]
    times: list[float] = []
    while len(times) < min_steps or (sum(times) < min_seconds and len(times) < max_steps):
        s0 = time.perf_counter()
        m = trainer.step()
        sync()
        times.append(time.perf_counter() - s0)
    median = statistics.median(times)
    row: dict[str, Any] = {
        "engine": trainer.engine,
        "instance_per_step": images_per_step // 2,
        "images_per_step": images_per_step,
        "it_per_s": round(1 / median, 3),
        "images_per_s": round(images_per_step / median, 3),
        "step_ms_median": round(1000 * median, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "timed_steps": len(times),
        "warmup_s": [round(s, 3) for s in warm_s],
        "first_steps": first,
        "captured": bool(trainer.graph_step and trainer.graph_step.captured),
        "mixed_precision": trainer.mixed_precision,
    }
    if cuda:
        row |= profile_busy(trainer.step, profile_steps, sync)
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def compare_steps(eager: list[dict[str, float]], other: list[dict[str, float]], *,
                  tolerance: float) -> dict[str, Any]:
    """Largest relative loss / grad-norm difference over the steps both recorded, and the flag."""
    pairs = list(zip(eager, other, strict=False))
    worst = max((abs(o[k] - e[k]) / max(abs(e[k]), 1e-12) for e, o in pairs
                 for k in ("loss", "grad_norm")), default=None)
    return {"compared_steps": len(pairs), "max_rel_diff_vs_eager": worst,
            "same_math": worst is not None and worst <= tolerance, "tolerance": tolerance}


def _row(results: dict[str, Any], engine: str, bs: int) -> dict[str, Any]:
    return next((r for r in results.get("engine", []) if r["engine"] == engine
                 and r["instance_per_step"] == bs), {})


def acceptance(results: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """Issue 13's "done when" on a GPU run: ``(criterion, measured, met)`` for each."""
    g1, g4 = _row(results, "graphs", 1), _row(results, "graphs", 4)
    cold = _row(results, "graphs + compile (cold)", 8)
    peer1 = next((p for p in results.get("peer", []) if p["instance_per_step"] == 1
                  and p.get("it_per_s")), {})
    warm = next((c for c in results.get("compile_cache", []) if c.get("label") == "warm"), {})
    ratio = g1["it_per_s"] / peer1["it_per_s"] if g1.get("it_per_s") and peer1 else None
    return [
        ("1+1 graphs >= 20 it/s", g1.get("it_per_s"), (g1.get("it_per_s") or 0) >= 20),
        ("1+1 graphs >= 5.7x diffusers (same run)", ratio, (ratio or 0) >= 5.7),
        ("1+1 graphs GPU busy >= 80 %", g1.get("gpu_busy"), (g1.get("gpu_busy") or 0) >= 0.8),
        ("1+1 graphs captured, same math as eager", g1.get("max_rel_diff_vs_eager"),
         bool(g1.get("captured") and g1.get("same_math"))),
        ("4+4 graphs >= 80 images/s", g4.get("images_per_s"), (g4.get("images_per_s") or 0) >= 80),
        ("8+8 graphs + compile >= 140 images/s (MFU stated)", (cold.get("images_per_s"), cold.get("mfu")),
         (cold.get("images_per_s") or 0) >= 140 and cold.get("mfu") is not None),
        ("warm compile <= 20 s, cache loaded (cold stated)",
         (warm.get("first_step_s"), cold.get("first_step_s")),
         bool(warm.get("cache_loaded")) and (warm.get("first_step_s") or 1e9) <= 20),
    ]


def render_engine(results: dict[str, Any]) -> list[str]:
    """Markdown rows of the engine section (``gpu_truth.render`` calls this)."""
    rows = results.get("engine", [])
    peer = {r["instance_per_step"]: r for r in results.get("peer", []) if r.get("it_per_s")}
    if not rows and not peer:
        return []
    lines = ["Training engine (cached latents, [instance | class] per step, "
             f"{results.get('settings', {}).get('mixed_precision')}):", "",
             "| instance + class / step | engine | it/s | images/s | ms/step | GPU busy | "
             "vs diffusers | same math as eager | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = peer.get(r["instance_per_step"])
        ratio = f"{r['it_per_s'] / p['it_per_s']:.2f}×" if p else "—"
        busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "—"
        same = r.get("same_math", "—")
        lines.append(f"| {r['instance_per_step']} + {r['instance_per_step']} | {r['engine']} | "
                     f"{r['it_per_s']:.2f} | {r['images_per_s']:.1f} | {r['step_ms_median']:.1f} | "
                     f"{busy} | {ratio} | {same} | {r.get('peak_mem_gb', '—')} |")
    for bs, p in sorted(peer.items()):
        lines.append(f"| {bs} + {bs} | diffusers train_dreambooth_lora.py | {p['it_per_s']:.2f} | "
                     f"{2 * bs * p['it_per_s']:.1f} | {1000 / p['it_per_s']:.1f} | — | 1.00× | — | — |")
    for c in results.get("compile_cache", []):
        use = "loaded" if c.get("cache_loaded") else "saved" if c.get("cache_saved") else "unused"
        lines.append(f"- compile ({c.get('label')}): first step (compile included) "
                     f"{c.get('first_step_s')} s, workspace cache {use}")
    if results.get("env", {}).get("device_type") == "cuda":
        lines += ["", "Issue 13 acceptance:", ""]
        lines += [f"- [{'x' if ok else ' '}] {name}: {value}" for name, value, ok in acceptance(results)]
    lines.append("")
    return lines
