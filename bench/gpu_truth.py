"""GPU truth: SD 1.5-size DreamBooth-LoRA training and prior generation, without Ray.

Builds Stable Diffusion 1.5's architecture (``raydb.models.architectures.sd15``: UNet
320/640/1280/1280 with 768-wide cross-attention, the 4-level VAE, a 12-layer 768-wide CLIP text
encoder) with seeded random weights — nothing is downloaded — and measures, at 512 px in bf16, the
shipped training loop (``TrainEngine``; ``bench/training.py``) in these sections (``--sections``):

* ``engine`` (``bench/gpu_engine.py``): eager vs eager + prefetch vs CUDA graphs at 1, 4 and 8
  instance images per step (+ as many class images), GPU busy fraction, eager-vs-graphs same-math;
* ``compile``: graphs + ``compile=full`` at 8 + 8 in two fresh processes (cold, then warm from the
  workspace compile cache the engine keeps);
* ``peer`` (``bench/peer_dreambooth.py``, with ``--peer-script``): diffusers'
  ``train_dreambooth_lora.py`` run unmodified on a ``save_pretrained`` folder of the same components;
* ``train`` (``bench/gpu_train.py``): cached latents vs the VAE every step (our
  ``train.cache_latents=False`` path, the diffusers-style loop) at 1, 2 and 4 instance images per
  step, with peak memory and model FLOP utilisation (FLOPs of one step by ``torch.utils.flop_counter``);
* ``options``: the speed options through ``train.*`` (eager NCHW/foreach baseline, classic
  attention, ``channels_last``, ``fused_adam``, ``gradient_checkpointing``, the defaults, the
  defaults with ``compile=blocks`` / ``full``), each row's first step checked against the baseline's;
* ``generation`` (``bench/generation.py``): ``StableDiffusionPipeline``, DDIM, 25 steps, CFG 7.5,
  batch 1/4/8.

Every measurement is wrapped (``bench/harness.py``): a failure records an error string and the run
goes on; the JSON is rewritten after each, so a run cut short keeps its figures. ``--tiny`` runs the
same code on the tiny model on the CPU (``tests/bench/test_gpu_truth.py``).

    python -m bench.gpu_truth --out bench/results/gpu_truth.json          # on a GPU
    python -m bench.gpu_truth --tiny --out /tmp/gpu_truth_tiny.json         # CPU smoke run
    python -m bench.gpu_truth --render bench/results/gpu_truth_*.json       # markdown tables

Result keys (schema 1, unchanged since the 2026-11-26 files; rows gained keys, none lost): ``train``
``[{arm, instance_per_step, images_per_s, step_ms_median, flops_per_step, mfu, ...}]``,
``cached_over_uncached``, ``micro_batch_ms``, ``options`` ``[{option, speedup_vs_baseline,
same_math, ...}]``, ``generation``, ``engine`` ``[{engine, it_per_s, gpu_busy, same_math, ...}]``,
``compile_cache``, ``peer``; ``settings.timed`` says what a step's time covers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench import gpu_engine, gpu_train, training  # noqa: E402
from bench.generation import pipeline, render_generation, run_generation  # noqa: E402
from bench.harness import Run, add_common_args, free_memory, measure_matmul, peers_dir  # noqa: E402
from bench.peer_dreambooth import run_peer_section  # noqa: E402
from raydb.models.architectures import sd15  # noqa: E402
from raydb.models.tiny import tiny_architecture  # noqa: E402

SECTIONS = ("train", "generation", "options", "engine", "compile", "peer")


def render(results: dict[str, Any]) -> str:
    """Markdown tables of a result file (what docs/performance.md quotes)."""
    env = results.get("env", {})
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    lines = [
        f"Chip: **{env.get('chip')}** — {results.get('date', '?')[:10]}; torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}{driver}, diffusers {env.get('diffusers')}, peft {env.get('peft')}, "
        f"transformers {env.get('transformers')}. bf16 peak used for MFU: "
        f"{results.get('peak_bf16_tflops')} TFLOP/s (datasheet); measured 8192³ bf16 matmul: "
        f"{results.get('measured_matmul_tflops')} TFLOP/s.",
        "",
    ]
    lines += gpu_train.render_training(results)
    lines += render_generation(results)
    lines += gpu_engine.render_engine(results)
    for name, err in results.get("errors", {}).items():
        lines.append(f"- error in {name}: `{err.splitlines()[0][:200]}`")
    for item in results.get("skipped", []):
        lines.append(f"- skipped {item}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, out="bench/results/gpu_truth.json")
    p.add_argument("--render", metavar="JSON", help="print the markdown tables of a result file and exit")
    p.add_argument("--compile-needs-s", type=float, default=150.0, help="budget a torch.compile run needs")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--options-batch", type=int, default=1)
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-calls", type=int, default=2)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="what to run (the device script runs: engine compile peer)")
    p.add_argument("--engine-batches", type=int, nargs="+", default=[1, 4, 8],
                   help="instance images per step for the engine arms (+ as many class images)")
    p.add_argument("--engine-warmup", type=int, default=6,
                   help="untimed steps per engine row (the graph step captures at its 4th)")
    p.add_argument("--profile-steps", type=int, default=5, help="steps profiled for GPU busy")
    p.add_argument("--compile-batch", type=int, default=8, help="instance images per step, compile arm")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-probe", choices=("cold", "warm"), help=argparse.SUPPRESS)
    p.add_argument("--compile-cache-ws", help=argparse.SUPPRESS)
    peer = peers_dir() / "diffusers" / "train_dreambooth_lora.py"
    p.add_argument("--peer-script", default=str(peer) if peer.is_file() else None,
                   help="diffusers' train_dreambooth_lora.py, run as the peer arm (default: the one "
                        "under $RAYDB_PEERS_DIR or ../shared/peers, when there)")
    p.add_argument("--peer-site", help="packages only the peer needs (accelerate, torchvision), "
                   "put first on its PYTHONPATH")
    p.add_argument("--peer-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--peer-steps", type=int, default=40)
    p.add_argument("--peer-timeout-s", type=float, default=150.0)
    p.add_argument("--peer-dry-run", action="store_true",
                   help="write the peer's model folder and commands, do not run it")
    args = p.parse_args(argv)
    if args.tiny:  # small enough for a < 30 s smoke test on two CPU cores
        args.batch_sizes, args.gen_batches, args.gen_steps, args.gen_calls = [1, 2], [1, 2], 2, 1
        args.warmup, args.min_steps, args.min_seconds, args.max_steps = 1, 2, 0.0, 2
        args.engine_batches, args.engine_warmup, args.compile_batch = [1], 2, 1
        args.profile_steps = 1
        # compile=full with inductor is refused on the CPU (raydb/train/device_options.py) and blocks take
        # minutes: --tiny compiles only with another backend (--compile-backend aot_eager)
        args.no_compile = args.no_compile or args.compile_backend == "inductor"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return {}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "should be kept in float32: []" on every .to(bf16)
    run = Run(args, tiny_architecture() if args.tiny else sd15())
    r = run.results
    r["model"] = "tiny" if args.tiny else "sd15-architecture-random-weights"
    if args.compile_probe:  # a child of gpu_engine.run_compile: one row, in a process of its own
        run.measure("compile probe", lambda: r.__setitem__("compile_probe", gpu_engine.compile_probe(run)))
        return r
    r.update(peak_bf16_tflops=run.peak_tflops(), settings={
        "resolution": run.resolution, "mixed_precision": run.mixed_precision,
        "weights_dtype": str(run.dtype), "lora": "rank 4, alpha 4, to_q/to_k/to_v/to_out.0",
        "prior_preservation": True,
        "timed": "TrainEngine.step() (raydb/train/engine.py: prefetched batches, then optimizer_step, or "
                 "the graph step in the engine arms), wall clock, cuda-synchronized, median over steps "
                 "after warm-up; train and options rows with train.cuda_graphs=off",
        "argv": sys.argv[1:] if argv is None else argv})
    print(f"gpu_truth: {r['env']['chip']} torch {torch.__version__} -> {run.out}", flush=True)
    if run.cuda:
        run.measure("matmul ceiling",
                    lambda: r.__setitem__("measured_matmul_tflops", measure_matmul(run.device)))
    parts = run.measure("build VAE + text encoder", lambda: training.frozen(run))
    if parts is None:
        return run.finish()
    with torch.no_grad():
        r["params_m"] = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for name, m in
                         (("unet", training.unet(run)), ("vae", parts.vae),
                          ("text_encoder", parts.text_encoders[0]))}
    free_memory()
    sections = set(args.sections)
    if "engine" in sections:
        gpu_engine.run_engine(run, parts)
    if "peer" in sections and args.peer_script:
        run_peer_section(run, parts)
    if "compile" in sections and not args.no_compile:
        gpu_engine.run_compile(run)
    if "train" in sections:
        gpu_train.run_training(run, parts)
    if "generation" in sections:
        pipe = run.measure("build SD pipeline", lambda: pipeline(run, parts))
        if pipe is not None:
            run_generation(run, pipe, family="sd")
        del pipe
    if "options" in sections:
        gpu_train.run_options(run, parts)
    run.finish()
    print(render(r), flush=True)
    return r


if __name__ == "__main__":
    main()
