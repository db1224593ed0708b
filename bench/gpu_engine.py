"""``gpu_truth``'s engine section: the shipped ``TrainEngine`` per arm, each on a fresh UNet + LoRA
from the same init over the same batches (so their first steps must agree).

Arms (the engine's measuring seams; ``raydb/train/engine.py``):

* ``eager``: ``prefetch=False, graph_step=False`` — batches built on the step's critical path, then
  ``optimizer_step`` (the engine before the prefetcher; the same-math reference);
* ``eager + prefetch``: ``graph_step=False`` — batches from ``BatchPrefetcher``;
* ``graphs``: ``graph_step=True`` — prefetcher + ``GraphStep``, captured on CUDA after its warm-up
  steps; on the CPU its eager path runs (what the ``--tiny`` smoke test checks against ``eager``);
* ``graphs + compile``: ``train.compile=full`` under the graph step with the workspace compile cache
  (``train.compile_cache``, ``engine_compile_cache``), each in a fresh process (``--compile-probe``)
  so its compile time is honest: once cold (compiles, the engine saves the entry), once warm (the
  engine loads it before its first step).

Per row: it/s, images/s and step times (median, synchronised), the GPU busy fraction of a few
profiled steps (union of kernel intervals / wall span), peak memory, the first steps' loss and grad
norm (``compare_steps`` against ``eager``: ``same_math``), and on ``eager`` the FLOPs of one step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import training
from bench.harness import REPO, Run, markdown_table
from raydb.storage import Storage
from raydb.train.engine import engine_compile_cache

__all__ = ["ENGINES", "run_engine", "compile_probe", "run_compile", "compare_steps", "acceptance",
           "render_engine"]

ENGINES = {"eager": {"prefetch": False, "graph_step": False},
           "eager + prefetch": {"prefetch": True, "graph_step": False},
           "graphs": {"prefetch": True, "graph_step": True}}


def compare_steps(eager: list[dict[str, float]], other: list[dict[str, float]], *,
                  tolerance: float) -> dict[str, Any]:
    """Largest relative loss / grad-norm difference over the steps both recorded, and the flag."""
    pairs = list(zip(eager, other, strict=False))
    worst = max((abs(o[k] - e[k]) / max(abs(e[k]), 1e-12) for e, o in pairs
                 for k in ("loss", "grad_norm")), default=None)
    return {"compared_steps": len(pairs), "max_rel_diff_vs_eager": worst,
            "same_math": worst is not None and worst <= tolerance, "tolerance": tolerance}


def _tolerance(run: Run) -> float:
    # bf16 on the GPU: kernels of another launch order round differently (the options table uses
    # the same 2 %); fp32 on the CPU runs the very same kernels, so only reduction order differs
    return 0.02 if run.cuda else 1e-4


def _compare_with_eager(run: Run, row: dict[str, Any]) -> None:
    eager = next((r for r in run.results["engine"] if r["engine"] == "eager"
                  and r["instance_per_step"] == row["instance_per_step"]), None)
    if eager is None or eager is row:
        return
    row.update(compare_steps(eager["first_steps"], row["first_steps"], tolerance=_tolerance(run)))
    row["speedup_vs_eager"] = round(row["it_per_s"] / eager["it_per_s"], 3)
    if eager.get("flops_per_step"):
        training.add_mfu(run, row, eager["flops_per_step"])


def run_engine(run: Run, parts: training.Frozen) -> None:
    """Each arm of ``ENGINES`` at each ``--engine-batches`` instance images (+ as many class)."""
    a = run.args
    data = training.training_data(run, parts, cached=True)
    run.results["engine"] = []
    for bs in a.engine_batches:
        for name, seams in ENGINES.items():

            def one(bs=bs, name=name, seams=seams):
                cfg = training.train_config(run, bs)
                with training.make_engine(run, cfg, training.unet(run), parts.vae, data, **seams) as engine:
                    row = {"engine": name, **training.measure(
                        run, engine, warmup=a.engine_warmup, profile_steps=a.profile_steps,
                        count_flops=name == "eager")}
                run.results["engine"].append(row)
                _compare_with_eager(run, row)
                print(f"    {name:<18} {bs}+{bs}: {row['it_per_s']:.2f} it/s {row['images_per_s']:.1f} img/s "
                      f"busy={row.get('gpu_busy')} same_math={row.get('same_math', '-')}", flush=True)

            run.measure(f"engine {name} {bs}+{bs}", one, needs_s=a.reserve_s)


def compile_probe(run: Run) -> dict[str, Any]:
    """``--compile-probe``: the graph step over ``compile=full`` in this (fresh) process, the engine
    loading the workspace compile-cache entry first and saving it after its first steps when cold."""
    a = run.args
    parts = training.frozen(run)
    data = training.training_data(run, parts, cached=True)
    cfg = training.train_config(run, a.compile_batch, workspace=a.compile_cache_ws, compile="full",
                                compile_backend=a.compile_backend, compile_cache=True)
    cache = engine_compile_cache(cfg, Storage(), model_identity=f"{run.results.get('model')}-seed0",
                                 device=run.device, data=data, graphs=True)
    unet = training.unet(run)
    t0 = time.perf_counter()
    engine = training.make_engine(run, cfg, unet, parts.vae, data, graph_step=True, compile_cache=cache)
    init_s = time.perf_counter() - t0  # build_train_state + loading the entry
    with engine:
        t0 = time.perf_counter()
        first = engine.step()
        run.sync()
        first_s = time.perf_counter() - t0
        row = training.measure(run, engine, warmup=a.engine_warmup, profile_steps=a.profile_steps)
    row["first_steps"].insert(0, {"loss": first["loss"], "grad_norm": first["grad_norm"]})
    return {"engine": f"graphs + compile ({a.compile_probe})", **row, "label": a.compile_probe,
            "first_step_s": round(first_s, 2), "cache_loaded": cache.loaded, "cache_saved": cache.saved,
            "cache_load_s": round(init_s, 2), "cache_key": cache.key}


def run_compile(run: Run) -> None:
    """Two fresh processes (empty local inductor caches): cold compiles and saves, warm loads."""
    a = run.args
    run.results["compile_cache"] = []
    run.results.setdefault("engine", [])
    ws = tempfile.mkdtemp(prefix="raydb-compile-ws-")
    for label in ("cold", "warm"):

        def one(label=label):
            out = Path(tempfile.mkdtemp()) / f"probe_{label}.json"
            cmd = [sys.executable, "-m", "bench.gpu_truth", "--compile-probe", label,
                   "--compile-batch", str(a.compile_batch), "--compile-cache-ws", ws,
                   "--compile-backend", a.compile_backend, "--out", str(out),
                   "--engine-warmup", str(a.engine_warmup), "--min-steps", str(a.min_steps),
                   "--min-seconds", str(a.min_seconds), "--max-steps", str(a.max_steps),
                   "--profile-steps", str(a.profile_steps)]
            cmd += ["--tiny"] if a.tiny else []
            cmd += ["--cpu"] if not run.cuda else []
            cmd += ["--resolution", str(a.resolution)] if a.resolution else []
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=max(60.0, run.left()))
            probe = json.loads(out.read_text()) if out.exists() else {}
            row = probe.get("compile_probe")
            if proc.returncode or row is None:
                raise RuntimeError(f"compile probe {label}: exit {proc.returncode}; "
                                   f"{probe.get('errors')} {(proc.stdout + proc.stderr)[-1500:]}")
            run.results["compile_cache"].append({k: row.get(k) for k in (
                "label", "first_step_s", "cache_loaded", "cache_saved", "cache_load_s", "cache_key")})
            run.results["engine"].append(row)
            _compare_with_eager(run, row)
            print(f"    compile {label}: first step {row['first_step_s']} s, "
                  f"{row['images_per_s']:.1f} img/s", flush=True)

        run.measure(f"graphs + compile ({label})", one,
                    needs_s=a.compile_needs_s if label == "cold" else a.reserve_s * 3)


def _row(results: dict[str, Any], engine: str, bs: int) -> dict[str, Any]:
    return next((r for r in results.get("engine", []) if r["engine"] == engine
                 and r["instance_per_step"] == bs), {})


def acceptance(results: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """Issue 13's (and 30's) "done when" on a GPU run: ``(criterion, measured, met)`` for each."""
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
    table = []
    for r in rows:
        p = peer.get(r["instance_per_step"])
        busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "—"
        table.append([f"{r['instance_per_step']} + {r['instance_per_step']}", r["engine"],
                      f"{r['it_per_s']:.2f}", f"{r['images_per_s']:.1f}", f"{r['step_ms_median']:.1f}", busy,
                      f"{r['it_per_s'] / p['it_per_s']:.2f}×" if p else "—", r.get("same_math", "—"),
                      r.get("peak_mem_gb") or "—"])
    for bs, p in sorted(peer.items()):
        table.append([f"{bs} + {bs}", "diffusers train_dreambooth_lora.py", f"{p['it_per_s']:.2f}",
                      f"{2 * bs * p['it_per_s']:.1f}", f"{1000 / p['it_per_s']:.1f}", "—", "1.00×", "—", "—"])
    lines = ["Training engine (cached latents, [instance | class] per step, "
             f"{results.get('settings', {}).get('mixed_precision')}):", ""]
    lines += markdown_table(["instance + class / step", "engine", "it/s", "images/s", "ms/step", "GPU busy",
                             "vs diffusers", "same math as eager", "peak GB"], table)
    for c in results.get("compile_cache", []):
        use = "loaded" if c.get("cache_loaded") else "saved" if c.get("cache_saved") else "unused"
        lines.append(f"- compile ({c.get('label')}): first step (compile included) "
                     f"{c.get('first_step_s')} s, workspace cache {use}")
    if results.get("env", {}).get("device_type") == "cuda":
        lines += ["", "Issue 13 acceptance:", ""]
        lines += [f"- [{'x' if ok else ' '}] {name}: {value}" for name, value, ok in acceptance(results)]
    lines.append("")
    return lines
