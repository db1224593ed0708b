"""GPU truth, SDXL rows: SDXL-size DreamBooth-LoRA training and prior generation, plus the diffusers
SDXL script run side by side.

``gpu_truth``'s sections at SDXL base 1.0's architecture (``raydb.models.architectures.sdxl_base``:
UNet 320/640/1280 with 1/2/10 transformer layers, ``text_time`` conditioning and 2048-wide
cross-attention; CLIP ViT-L (768) and OpenCLIP bigG (1280, projected) text encoders; the 4-level
VAE) with seeded random weights, nothing downloaded, at 1024 px in bf16, 1 instance + 1 class image
per step, all through the shipped ``TrainEngine`` (``bench/training.py``, same timing rules):

* ``train``: cached latents (the encode stage's cache: both encoders' hidden states, the pooled
  embedding, per-image time ids) vs the VAE every step, eager step, with peak memory and MFU;
* ``engine``: eager vs eager + prefetch vs the CUDA-graph step (SDXL's pooled embedding and time ids
  in the graph's static buffers), with the same-math flag against eager;
* ``generation``: ``StableDiffusionXLPipeline``, Euler, 25 steps, CFG 5.0;
* ``--peer``: diffusers' ``train_dreambooth_lora_sdxl.py`` (``--peer-script``, default under
  ``$RAYDB_PEERS_DIR`` or ``../shared/peers``; run as a subprocess, never imported or copied) on the
  same model saved with ``save_pretrained``, same resolution / batch / rank / bf16 / prior
  preservation, timed by the difference of a short and a long run (``bench/peer_dreambooth.py``).

    python -m bench.gpu_truth_sdxl --out bench/results/gpu_truth_sdxl.json --peer   # on a GPU
    python -m bench.gpu_truth_sdxl --tiny --out /tmp/gpu_truth_sdxl_tiny.json         # CPU smoke run
    python -m bench.gpu_truth_sdxl --render bench/results/gpu_truth_sdxl.json        # tables

Result keys as ``gpu_truth``'s (``train``, ``cached_over_uncached``, ``micro_batch_ms``, ``engine``,
``generation``), ``params_m`` with ``text_encoder_2``, and ``peer`` ``{images_per_s, step_ms,
ours_uncached_over_peer, ...}``.
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

from bench import gpu_engine, gpu_train, training  # noqa: E402
from bench.generation import pipeline, render_generation, run_generation  # noqa: E402
from bench.harness import Run, add_common_args, measure_matmul, peers_dir  # noqa: E402
from bench.peer_dreambooth import run_sdxl_peer  # noqa: E402
from raydb.models.architectures import sdxl_base  # noqa: E402
from raydb.models.tiny_sdxl import tiny_sdxl_architecture  # noqa: E402

SECTIONS = ("train", "engine", "generation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, out="bench/results/gpu_truth_sdxl.json", budget_s=480.0, reserve_s=20.0,
                    max_steps=40)
    p.add_argument("--render", metavar="JSON", help="print the markdown tables of a result file and exit")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="instance images per step")
    p.add_argument("--engine-batches", type=int, nargs="+", default=[1])
    p.add_argument("--engine-warmup", type=int, default=6, help="untimed steps per engine row")
    p.add_argument("--profile-steps", type=int, default=5, help="steps profiled for GPU busy")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-calls", type=int, default=2)
    p.add_argument("--peer", action="store_true", help="also run diffusers' SDXL script side by side")
    p.add_argument("--peer-script", default=str(peers_dir() / "diffusers" / "train_dreambooth_lora_sdxl.py"),
                   help="diffusers' SDXL DreamBooth-LoRA script")
    p.add_argument("--peer-steps", type=int, nargs=2, default=[5, 25], help="short and long run")
    p.add_argument("--peer-site", help="packages only the peer needs (accelerate, torchvision), "
                   "put first on its PYTHONPATH")
    args = p.parse_args(argv)
    if args.tiny:
        args.gen_batches, args.gen_steps, args.gen_calls = [1], 2, 1
        args.warmup, args.min_steps, args.min_seconds, args.max_steps = 1, 2, 0.0, 2
        args.engine_warmup, args.profile_steps, args.peer_steps = 2, 1, [1, 3]
    return args


def render(r: dict[str, Any]) -> str:
    env = r.get("env", {})
    lines = [f"SDXL rows — **{env.get('chip')}**, {r.get('date', '?')[:10]}, torch {env.get('torch')}, "
             f"driver {env.get('driver')}; {r.get('model')}.", ""]
    lines += gpu_train.render_training(r) + render_generation(r) + gpu_engine.render_engine(r)
    if r.get("peer"):
        p = r["peer"]
        lines.append(f"diffusers SDXL script: {p['images_per_s']} images/s, {p['step_ms']} ms/step; ours "
                     f"(VAE every step, like it) / peer: {p.get('ours_uncached_over_peer')}")
    lines += [f"- error in {k}: `{v.splitlines()[0][:200]}`" for k, v in r.get("errors", {}).items()]
    lines += [f"- skipped {item}" for item in r.get("skipped", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return {}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    run = Run(args, tiny_sdxl_architecture() if args.tiny else sdxl_base())
    r = run.results
    r.update(model="tiny-sdxl" if args.tiny else "sdxl-base-1.0-architecture-random-weights",
             peak_bf16_tflops=run.peak_tflops(),
             settings={"resolution": run.resolution, "mixed_precision": run.mixed_precision,
                       "weights_dtype": str(run.dtype), "lora": "rank 4, alpha 4, to_q/to_k/to_v/to_out.0",
                       "prior_preservation": True, "timed": "TrainEngine.step(), as gpu_truth",
                       "argv": sys.argv[1:] if argv is None else argv})
    print(f"gpu_truth_sdxl: {r['env']['chip']} -> {run.out}", flush=True)
    if run.cuda:
        run.measure("matmul ceiling",
                    lambda: r.__setitem__("measured_matmul_tflops", measure_matmul(run.device)))
    parts = run.measure("build SDXL VAE + text encoders", lambda: training.frozen(run))
    if parts is None:
        return run.finish()
    sections = set(args.sections)
    if "train" in sections:
        gpu_train.run_training(run, parts)
    if "engine" in sections:
        gpu_engine.run_engine(run, parts)
    pipe = run.measure("build SDXL pipeline", lambda: pipeline(run, parts))
    if pipe is not None:
        r["params_m"] = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for name, m in
                         (("unet", pipe.unet), ("vae", parts.vae), ("text_encoder", parts.text_encoders[0]),
                          ("text_encoder_2", parts.text_encoders[1]))}
        if "generation" in sections:
            run_generation(run, pipe, family="sdxl")
        if args.peer:
            run.measure("sdxl peer (diffusers script)", lambda: run_sdxl_peer(run, pipe), needs_s=120)
    run.finish()
    print(render(r), flush=True)
    return r


if __name__ == "__main__":
    main()
