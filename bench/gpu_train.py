"""``gpu_truth``'s training sections: cached latents vs the VAE every step, and the speed options.

Both time ``TrainEngine.step()`` with ``train.cuda_graphs=off`` — the eager step, as in the
2026-11-26 rows they continue (the engine section, ``bench/gpu_engine.py``, measures the graph step):
prefetched batches, then ``optimizer_step``.

* ``train``: one UNet + LoRA state shared by every row (rows change only the batch and the data),
  cached latents and pixels through the VAE encoder, at each ``--batch-sizes`` instance images per
  step (+ as many class images); FLOPs per step, MFU. ``cached_over_uncached``: the ratio per batch.
  ``micro_batch_ms``: building one step's batches (``step_micro_batches`` to the device) alone.
* ``options``: each speed option on a fresh UNet from the same init, set through ``train.*`` as
  a user sets it (plus ``classic attention``, bench only: diffusers' unfused attention processor);
  each row's first-step grad norm is compared with the baseline's (``same_math``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench import training
from bench.harness import Run, markdown_table, pct
from raydb.train.data import step_micro_batches
from raydb.train.step import build_train_state

__all__ = ["run_training", "run_options", "render_training"]

EAGER = {"cuda_graphs": "off"}


def _micro_batch_ms(run: Run, datasets: dict[bool, Any]) -> dict[str, float]:
    out = {}
    for cached, data in datasets.items():
        for bs in run.args.batch_sizes:
            tc = training.train_config(run, bs).train
            t0 = time.perf_counter()
            for s in range(20):
                step_micro_batches(data, tc, step=s, num_train_timesteps=1000, device=run.device)
            run.sync()
            key = f"{'cached' if cached else 'uncached'}_b{bs}"
            out[key] = round((time.perf_counter() - t0) / 20 * 1000, 3)
    return out


def run_training(run: Run, parts: training.Frozen) -> None:
    """Cached vs. VAE-every-step for each batch size, one train state shared by all rows."""
    datasets = {cached: training.training_data(run, parts, cached=cached) for cached in (True, False)}
    run.results["micro_batch_ms"] = _micro_batch_ms(run, datasets)
    base = training.train_config(run, 1, **EAGER)
    state = build_train_state(base, training.unet(run), None)
    run.results["train"] = []
    for bs in run.args.batch_sizes:
        for cached in (True, False):
            arm = "cached latents" if cached else "VAE every step"

            def one(cached=cached, bs=bs, arm=arm):
                cfg = training.train_config(run, bs, workspace=base.workspace, **EAGER)
                with training.make_engine(run, cfg, state.unet, parts.vae, datasets[cached],
                                          state=state) as engine:
                    row = {"arm": arm, **training.measure(run, engine, count_flops=True)}
                run.results["train"].append(row)
                print(f"    {arm:<16} b={bs}: {row['images_per_s']:.2f} img/s  mfu={row.get('mfu')}  "
                      f"peak={row['peak_mem_gb']} GB", flush=True)

            run.measure(f"train {arm} b={bs}", one, needs_s=run.args.reserve_s)
    run.results["cached_over_uncached"] = cached_over_uncached(run.results["train"], run.args.batch_sizes)


def cached_over_uncached(rows: list[dict[str, Any]], batch_sizes: list[int]) -> dict[str, float]:
    by = {(r["arm"], r["instance_per_step"]): r["images_per_s"] for r in rows}
    return {str(bs): round(by[("cached latents", bs)] / by[("VAE every step", bs)], 3)
            for bs in batch_sizes if ("cached latents", bs) in by and ("VAE every step", bs) in by}


def run_options(run: Run, parts: training.Frozen) -> None:
    """Each speed option on a fresh UNet + LoRA, cached latents, ``--options-batch`` instance images."""
    a = run.args
    data = training.training_data(run, parts, cached=True)
    eager = {"channels_last": False, "fused_adam": False}
    variants: list[tuple[str, dict[str, Any], float]] = [
        ("baseline (eager, NCHW, foreach AdamW)", eager, a.reserve_s),
        ("classic attention (no SDPA)", eager | {"classic_attention": True}, a.reserve_s),
        ("channels_last", eager | {"channels_last": True}, a.reserve_s),
        ("fused AdamW", eager | {"fused_adam": True}, a.reserve_s),
        ("gradient checkpointing", eager | {"gradient_checkpointing": True}, a.reserve_s),
        ("defaults (channels_last + fused AdamW on CUDA)", {}, a.reserve_s),
    ]
    if not a.no_compile:
        for mode, needs in (("blocks", a.compile_needs_s / 2), ("full", a.compile_needs_s)):
            options = {"compile": mode, "compile_backend": a.compile_backend}
            variants.append((f"defaults + compile={mode}", options, needs))
    else:
        run.results["skipped"].append("torch.compile: --no-compile")
    run.results["options"] = []
    for name, kw, needs in variants:

        def one(name=name, kw=kw):
            kw = dict(kw)
            unet = training.unet(run)
            if kw.pop("classic_attention", False):
                from diffusers.models.attention_processor import AttnProcessor

                unet.set_attn_processor(AttnProcessor())
            cfg = training.train_config(run, a.options_batch, **EAGER, **kw)
            with training.make_engine(run, cfg, unet, parts.vae, data) as engine:
                row = {"option": name, **training.measure(run, engine, count_flops="compile" not in kw)}
            _compare_with_baseline(run, row)
            run.results["options"].append(row)
            print(f"    {name:<44} {row['images_per_s']:.2f} img/s  x{row.get('speedup_vs_baseline')}  "
                  f"peak={row['peak_mem_gb']} GB", flush=True)

        run.measure(f"option {name}", one, needs_s=needs)
        if "compile" in kw:
            torch._dynamo.reset()


def _compare_with_baseline(run: Run, row: dict[str, Any]) -> None:
    base = next((r for r in run.results["options"] if r["option"].startswith("baseline")), None)
    if not base:
        return
    row["speedup_vs_baseline"] = round(row["images_per_s"] / base["images_per_s"], 3)
    if "first_step_grad_norm" in row and base.get("first_step_grad_norm"):
        # same init, same batch: a layout option must give the same gradient (bf16 rounding
        # aside); a compile bug shows here (see bench/compile_parity.py)
        ratio = row["first_step_grad_norm"] / base["first_step_grad_norm"]
        row["grad_norm_vs_baseline"] = round(ratio, 4)
        row["same_math"] = abs(ratio - 1) < 0.02
    if "flops_per_step" not in row and "flops_per_step" in base:  # compile: same math, same FLOPs
        training.add_mfu(run, row, base["flops_per_step"])


def render_training(results: dict[str, Any]) -> list[str]:
    """The train and options tables of ``gpu_truth`` (what docs/performance.md quotes)."""
    s = results.get("settings", {})
    if not results.get("train") and not results.get("options"):
        return []
    lines = [f"Training (LoRA r=4 on to_q/k/v/out, [instance | class] batches, {s.get('mixed_precision')}, "
             f"{s.get('resolution')} px):", ""]
    lines += markdown_table(
        ["instance imgs/step", "arm", "images/s", "ms/step", "peak GB", "TFLOP/s", "MFU (989)",
         "MFU (matmul)"],
        [[r["instance_per_step"], r["arm"], f"{r['images_per_s']:.1f}", f"{r['step_ms_median']:.1f}",
          r["peak_mem_gb"], r.get("tflops_per_s"), pct(r.get("mfu")), pct(r.get("mfu_vs_measured_matmul"))]
         for r in results.get("train", [])])
    ratios = results.get("cached_over_uncached", {})
    lines += ["", "Cached / VAE-every-step speed-up: "
              + ", ".join(f"{k} instance: {v:.2f}×" for k, v in ratios.items()), ""]
    if results.get("options"):
        lines += ["Speed options (cached latents, "
                  f"{results['options'][0]['instance_per_step']} instance + same class images per step):", ""]
        lines += markdown_table(
            ["option", "images/s", "vs baseline", "ms/step", "peak GB", "MFU (989)"],
            [[r["option"], f"{r['images_per_s']:.1f}", r.get("speedup_vs_baseline", "—"),
              f"{r['step_ms_median']:.1f}", r["peak_mem_gb"], pct(r.get("mfu"))]
             for r in results["options"]])
        lines.append("")
    return lines
