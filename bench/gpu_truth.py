"""GPU truth: SD 1.5-size DreamBooth-LoRA training and prior-generation throughput, without Ray.

Builds Stable Diffusion 1.5's architecture from its published configs (UNet 320/640/1280/1280 with
768-wide cross-attention, the 4-level VAE, a 12-layer 768-wide CLIP text encoder) with seeded random
weights — nothing is downloaded — and measures, at 512 px in bf16:

* training images/s of our trainer core (``build_train_state`` + ``step_micro_batches`` +
  ``optimizer_step``, unchanged) with cached latents vs. the diffusers-style loop that runs the VAE
  encoder every step (our own ``train.cache_latents=False`` path), for 1, 2 and 4 instance images
  per step (batches ``[instance | class]`` of 2, 4 and 8), with peak GPU memory and model FLOP
  utilisation (FLOPs of one step counted by ``torch.utils.flop_counter``);
* the speed options, each on a fresh UNet from the same init, set through the trainer's own
  ``train.*`` fields: an eager NCHW/foreach baseline, classic attention instead of SDPA,
  ``channels_last``, ``fused_adam``, ``gradient_checkpointing``, the defaults (channels_last +
  fused AdamW on CUDA) and the defaults with ``compile=blocks`` and ``compile=full``; each row also
  keeps its first step's loss and grad norm, which must agree across options (same math);
* prior generation images/s (``StableDiffusionPipeline``, DDIM, 25 steps, CFG 7.5, batch 1/4/8);
* the training engine (``bench/gpu_engine.py``): eager vs eager + prefetch vs CUDA graphs at 1, 4
  and 8 instance images per step, graphs + ``compile=full`` at 8 in two fresh processes (cold, then
  warm from the workspace compile cache), GPU busy fraction from ``torch.profiler`` and an
  eager-vs-graphs same-math flag; with ``--peer-script``, diffusers' ``train_dreambooth_lora.py``
  run unmodified on a ``save_pretrained`` folder of the same components (``bench/peer_dreambooth.py``).
  ``--sections`` picks what runs (``bench/device_run.sh`` runs ``engine peer compile``).

Micro-batches are built exactly as the trainer builds them: ``make_micro_batch`` on the CPU (seeded
per-sample noise) then ``.to(device)``; its CPU cost is part of every timed step and is also
reported on its own (``micro_batch_ms``). Every measurement is wrapped: a failure records an error
string and the run goes on; the JSON is rewritten after each measurement, so a run cut short still
leaves its figures. ``--tiny`` runs the same code on a toy model on the CPU (the smoke test).

    python bench/gpu_truth.py --out bench/results/gpu_truth.json          # on a GPU
    python bench/gpu_truth.py --tiny --out /tmp/gpu_truth_tiny.json         # CPU smoke run
    python bench/gpu_truth.py --render bench/results/gpu_truth_*.json       # markdown table
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import gpu_engine, peer_dreambooth  # noqa: E402
from raydb.config import RaydbConfig, load_config  # noqa: E402
from raydb.encode.encoders import EncodedImages  # noqa: E402
from raydb.models.tiny import TINY_SPEC, build_tiny_tokenizer  # noqa: E402
from raydb.train.data import TrainingData, make_micro_batch, step_micro_batches  # noqa: E402
from raydb.train.step import TrainState, build_train_state, optimizer_step  # noqa: E402

# Dense bf16 tensor-core peak (datasheet, SXM parts). The H200 has the H100's compute.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}

# Stable Diffusion 1.5's published configs (unet/, vae/, text_encoder/ config.json).
SD15 = {
    "resolution": 512,
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 512, 512),
        "norm_num_groups": 32,
        "sample_size": 512,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
    },
    "text": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
    },
}

# The embedded tiny model's widths (raydb.models.tiny), at 64 px: the CPU smoke configuration.
TINY = {
    "resolution": 64,
    "unet": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": TINY_SPEC["unet"]["layers_per_block"],
        "block_out_channels": tuple(TINY_SPEC["unet"]["block_out_channels"]),
        "down_block_types": tuple(TINY_SPEC["unet"]["down_block_types"]),
        "up_block_types": tuple(TINY_SPEC["unet"]["up_block_types"]),
        "cross_attention_dim": TINY_SPEC["unet"]["cross_attention_dim"],
        "attention_head_dim": TINY_SPEC["unet"]["attention_head_dim"],
        "norm_num_groups": TINY_SPEC["unet"]["norm_num_groups"],
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": TINY_SPEC["vae"]["layers_per_block"],
        "block_out_channels": tuple(TINY_SPEC["vae"]["block_out_channels"]),
        "norm_num_groups": TINY_SPEC["vae"]["norm_num_groups"],
        "sample_size": 64,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
    },
    "text": {"vocab_size": 1000, "max_position_embeddings": 77, **TINY_SPEC["text"]},
}

SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
NUM_INSTANCE_IMAGES, NUM_CLASS_IMAGES = 4, 8
SECTIONS = ("train", "generation", "options", "engine", "compile", "peer")


class Bench:
    """Run settings, the results dict, the time budget and incremental JSON writes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.spec = dict(TINY if args.tiny else SD15)
        if args.resolution:
            self.spec["resolution"] = args.resolution
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.mixed_precision = "bf16" if self.cuda else "no"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.start = time.perf_counter()
        self.workspace = tempfile.mkdtemp(prefix="raydb-gpu-truth-")
        self.out = Path(args.out)
        self.results: dict[str, Any] = {"schema": 1, "complete": False, "errors": {}, "skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.out)

    def guarded(self, name: str, fn: Callable[[], Any], *, needs_s: float = 0.0) -> Any:
        """Run one measurement; on failure record the error and go on. Skip if the budget is short."""
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
            print(
                f"[{time.perf_counter() - self.start:6.1f}s] {name} ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
            _free()
            self.save()

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
        if not self.cuda:
            return None
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _quiet_diffusers() -> None:
    # "modules that should be kept in float32: []" on every .to(bf16) of a freshly built UNet.
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- models and data


def build_unet(b: Bench):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with b.device:
        unet = UNet2DConditionModel(**b.spec["unet"])
    return unet.to(b.dtype).eval().requires_grad_(False)


def build_frozen(b: Bench):
    """VAE and text encoder (frozen, in the training dtype) plus the tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()  # built in code; the ids index the real-size embedding
    torch.manual_seed(1)
    with b.device:
        vae = AutoencoderKL(**b.spec["vae"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **b.spec["text"],
            )
        )
    for m in (vae, text_encoder):
        m.to(b.dtype).eval().requires_grad_(False)
    return vae, text_encoder, tokenizer


def training_data(b: Bench, text_encoder, tokenizer, *, cached: bool) -> TrainingData:
    """Random stand-ins with the real shapes: latent distributions (cached) or pixels (uncached)."""
    res = b.spec["resolution"]
    latent_shape = (4, res // 8, res // 8)
    g = torch.Generator().manual_seed(7)

    def source(n: int):
        if cached:
            return EncodedImages(
                torch.randn(n, *latent_shape, generator=g),
                0.05 + 0.1 * torch.rand(n, *latent_shape, generator=g),
            )
        return torch.rand(n, 3, res, res, generator=g) * 2 - 1

    ids = tokenizer(
        ["a photo of sks dog", "a photo of a dog"],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = text_encoder(ids.to(b.device))[0].float().cpu()
    return TrainingData(
        instance=source(NUM_INSTANCE_IMAGES),
        class_=source(NUM_CLASS_IMAGES),
        instance_embeds=embeds[:1],
        class_embeds=embeds[1:],
        instance_ids=ids[:1],
        class_ids=ids[1:],
        latent_shape=latent_shape,
    )


def train_config(b: Bench, batch_size: int, **options: Any) -> RaydbConfig:
    """The trainer's config at the bench's resolution; ``options`` are ``train.*`` overrides."""
    return load_config(
        data={
            "workspace": b.workspace,
            "train": {
                "resolution": b.spec["resolution"],
                "batch_size": batch_size,
                "max_steps": 100_000,
                "mixed_precision": b.mixed_precision,
                **options,
            },
        }
    )


# ---------------------------------------------------------------- training


class Trainer:
    """One UNet with LoRA and its train state; ``step(data, batch_size)`` is one optimizer step.

    ``train_options`` are the trainer's own ``train.*`` speed settings (channels_last, fused_adam,
    compile, gradient_checkpointing), applied by ``build_train_state`` exactly as in a real run;
    ``classic_attention`` (bench only) swaps SDPA for diffusers' unfused attention.
    """

    def __init__(self, b: Bench, vae, *, classic_attention: bool = False, **train_options: Any):
        from diffusers import DDPMScheduler

        self.b, self.vae = b, vae
        self.cfg = train_config(b, 1, **train_options)
        self.unet = build_unet(b)
        if classic_attention:
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
        self.state: TrainState = build_train_state(self.cfg, self.unet, None)
        self.model = self.state.model
        self.scheduler = DDPMScheduler(**SD_SCHEDULE)

    def step(self, data: TrainingData, batch_size: int) -> dict[str, float]:
        cfg = self.cfg.model_copy(
            update={"train": self.cfg.train.model_copy(update={"batch_size": batch_size})}
        )
        micro = step_micro_batches(data, cfg.train, step=self.state.step, num_train_timesteps=1000,
                                   device=self.b.device)
        return optimizer_step(
            self.state,
            micro,
            cfg=cfg,
            noise_scheduler=self.scheduler,
            prediction_type="epsilon",
            with_prior=True,
            vae=self.vae,
            model=self.model,
        )


def measure_training(
    b: Bench, trainer: Trainer, data: TrainingData, batch_size: int, *, count_flops: bool = True
) -> dict[str, Any]:
    """Warm up, time steps (wall clock, synchronized), count one step's FLOPs, read peak memory."""
    a = b.args
    b.reset_peak()
    t0 = time.perf_counter()
    warm, first = [], None
    for _ in range(a.warmup):
        s0 = time.perf_counter()
        m = trainer.step(data, batch_size)
        b.sync()
        warm.append(time.perf_counter() - s0)
        first = first or m
    times: list[float] = []
    images = 0
    while len(times) < a.min_steps or (sum(times) < a.min_seconds and len(times) < a.max_steps):
        s0 = time.perf_counter()
        m = trainer.step(data, batch_size)
        b.sync()
        times.append(time.perf_counter() - s0)
        images += m["images"]
    peak = b.peak_gb()
    median = statistics.median(times)
    row = {
        "instance_per_step": batch_size,
        "images_per_step": 2 * batch_size,
        "images_per_s": round(2 * batch_size / median, 3),
        "images_per_s_mean": round(images / sum(times), 3),
        "step_ms_median": round(1000 * median, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "step_ms_max": round(1000 * max(times), 2),
        "timed_steps": len(times),
        "first_step_s": round(warm[0], 2) if warm else None,
        "peak_mem_gb": peak,
        "loss": round(m["loss"], 5),
    }
    if first:  # same init, same batch: options that change layout, not math, must agree here
        row["first_step_loss"] = round(first["loss"], 5)
        row["first_step_grad_norm"] = round(first["grad_norm"], 5)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            trainer.step(data, batch_size)
        flops = counter.get_total_flops()
        row["flops_per_step"] = flops
        row["tflops_per_s"] = round(flops / median / 1e12, 1)
        peak_tflops = b.peak_tflops()
        row["mfu"] = round(flops / median / (peak_tflops * 1e12), 4) if peak_tflops else None
        matmul = b.results.get("measured_matmul_tflops")
        row["mfu_vs_measured_matmul"] = round(flops / median / (matmul * 1e12), 4) if matmul else None
    row["measure_s"] = round(time.perf_counter() - t0, 1)
    return row


def run_training(b: Bench, vae, text_encoder, tokenizer) -> None:
    """Cached vs. VAE-every-step for each batch size, one train state shared by all rows."""
    datasets = {
        True: training_data(b, text_encoder, tokenizer, cached=True),
        False: training_data(b, text_encoder, tokenizer, cached=False),
    }
    b.results["micro_batch_ms"] = {}
    for cached, data in datasets.items():
        for bs in b.args.batch_sizes:
            t0 = time.perf_counter()
            for s in range(20):
                make_micro_batch(
                    data, step=s, micro=0, batch_size=bs, accumulation=1, seed=0, num_train_timesteps=1000
                ).to(b.device)
            b.sync()
            key = f"{'cached' if cached else 'uncached'}_b{bs}"
            b.results["micro_batch_ms"][key] = round((time.perf_counter() - t0) / 20 * 1000, 3)
    trainer = Trainer(b, vae)
    b.results["train"] = []
    for bs in b.args.batch_sizes:
        for cached in (True, False):
            arm = "cached latents" if cached else "VAE every step"

            def one(cached=cached, bs=bs, arm=arm):
                row = {"arm": arm, **measure_training(b, trainer, datasets[cached], bs)}
                b.results["train"].append(row)
                print(
                    f"    {arm:<16} b={bs}: {row['images_per_s']:.2f} img/s  mfu={row['mfu']}  "
                    f"peak={row['peak_mem_gb']} GB",
                    flush=True,
                )

            b.guarded(f"train {arm} b={bs}", one, needs_s=b.args.reserve_s)
    ratios = {}
    for bs in b.args.batch_sizes:
        rows = {r["arm"]: r for r in b.results["train"] if r["instance_per_step"] == bs}
        if len(rows) == 2:
            ratios[str(bs)] = round(
                rows["cached latents"]["images_per_s"] / rows["VAE every step"]["images_per_s"], 3
            )
    b.results["cached_over_uncached"] = ratios


def run_options(b: Bench, vae, text_encoder, tokenizer) -> None:
    """Each speed option on a fresh UNet + LoRA, cached latents, ``options_batch`` instance images."""
    data = training_data(b, text_encoder, tokenizer, cached=True)
    bs = b.args.options_batch
    eager = {"channels_last": False, "fused_adam": False}
    variants: list[tuple[str, dict[str, Any], float]] = [
        ("baseline (eager, NCHW, foreach AdamW)", eager, b.args.reserve_s),
        ("classic attention (no SDPA)", eager | {"classic_attention": True}, b.args.reserve_s),
        ("channels_last", eager | {"channels_last": True}, b.args.reserve_s),
        ("fused AdamW", eager | {"fused_adam": True}, b.args.reserve_s),
        ("gradient checkpointing", eager | {"gradient_checkpointing": True}, b.args.reserve_s),
        ("defaults (channels_last + fused AdamW on CUDA)", {}, b.args.reserve_s),
    ]
    if not b.args.no_compile:
        variants.append(("defaults + compile=blocks", {"compile": "blocks"}, b.args.compile_needs_s / 2))
        variants.append(("defaults + compile=full", {"compile": "full"}, b.args.compile_needs_s))
    else:
        b.results["skipped"].append("torch.compile: --no-compile")
    b.results["options"] = []
    for name, kw, needs in variants:

        def one(name=name, kw=kw):
            trainer = Trainer(b, vae, **kw)
            try:
                row = {
                    "option": name,
                    **measure_training(b, trainer, data, bs, count_flops="compile" not in kw),
                }
            finally:
                del trainer
            base = next((r for r in b.results["options"] if r["option"].startswith("baseline")), None)
            if base:
                row["speedup_vs_baseline"] = round(row["images_per_s"] / base["images_per_s"], 3)
                if "first_step_grad_norm" in row and base.get("first_step_grad_norm"):
                    # same init, same batch: a layout option must give the same gradient (bf16
                    # rounding aside); a compile bug shows here (see bench/compile_parity.py)
                    ratio = row["first_step_grad_norm"] / base["first_step_grad_norm"]
                    row["grad_norm_vs_baseline"] = round(ratio, 4)
                    row["same_math"] = abs(ratio - 1) < 0.02
                if "flops_per_step" not in row and "flops_per_step" in base:  # compile: same math
                    row["tflops_per_s"] = round(
                        base["flops_per_step"] / (row["step_ms_median"] / 1000) / 1e12, 1
                    )
                    peak = b.peak_tflops()
                    row["mfu"] = round(row["tflops_per_s"] / peak, 4) if peak else None
            b.results["options"].append(row)
            print(
                f"    {name:<44} {row['images_per_s']:.2f} img/s  x{row.get('speedup_vs_baseline')}  "
                f"peak={row['peak_mem_gb']} GB",
                flush=True,
            )

        b.guarded(f"option {name}", one, needs_s=needs)
        if "compile" in kw:
            torch._dynamo.reset()


# ---------------------------------------------------------------- the engine: eager vs graphs


def _engine_trainer(b: Bench, vae, data: TrainingData, bs: int, engine: str, **options: Any):
    from diffusers import DDPMScheduler

    cfg = train_config(b, bs, **options)
    return gpu_engine.EngineTrainer(cfg, build_unet(b), vae, data, engine=engine, device=b.device,
                                    noise_scheduler=DDPMScheduler(**SD_SCHEDULE))


def _measure(b: Bench, trainer) -> dict[str, Any]:
    a = b.args
    return gpu_engine.measure_engine(
        trainer, warmup=a.engine_warmup, min_steps=a.min_steps, min_seconds=a.min_seconds,
        max_steps=a.max_steps, profile_steps=a.profile_steps, cuda=b.cuda, sync=b.sync)


def _same_math_tolerance(b: Bench) -> float:
    # bf16 on the GPU: kernels of another launch order round differently (the options table uses
    # the same 2 %); fp32 on the CPU runs the very same kernels, so only reduction order differs
    return 0.02 if b.cuda else 1e-4


def _add_flops_and_comparison(b: Bench, row: dict[str, Any]) -> None:
    eager = next((r for r in b.results["engine"] if r["engine"] == "eager"
                  and r["instance_per_step"] == row["instance_per_step"]), None)
    if eager is None or eager is row:
        return
    row.update(gpu_engine.compare_steps(eager["first_steps"], row["first_steps"],
                                        tolerance=_same_math_tolerance(b)))
    row["speedup_vs_eager"] = round(row["it_per_s"] / eager["it_per_s"], 3)
    if eager.get("flops_per_step"):
        row["tflops_per_s"] = round(eager["flops_per_step"] * row["it_per_s"] / 1e12, 1)
        peak = b.peak_tflops()
        row["mfu"] = round(row["tflops_per_s"] / peak, 4) if peak else None


def run_engine(b: Bench, vae, text_encoder, tokenizer) -> None:
    """Eager, eager + prefetch and graphs at each ``--engine-batches``, fresh UNet per row."""
    from torch.utils.flop_counter import FlopCounterMode

    data = training_data(b, text_encoder, tokenizer, cached=True)
    b.results["engine"] = []
    for bs in b.args.engine_batches:
        for engine in gpu_engine.ENGINES:

            def one(bs=bs, engine=engine):
                b.reset_peak()
                trainer = _engine_trainer(b, vae, data, bs, engine)
                try:
                    row = _measure(b, trainer)
                    if engine == "eager":  # FLOPs of one step (same math in every arm)
                        with FlopCounterMode(display=False) as counter:
                            trainer.step()
                        row["flops_per_step"] = counter.get_total_flops()
                        row["tflops_per_s"] = round(row["flops_per_step"] * row["it_per_s"] / 1e12, 1)
                        peak = b.peak_tflops()
                        row["mfu"] = round(row["tflops_per_s"] / peak, 4) if peak else None
                finally:
                    trainer.close()
                    del trainer
                b.results["engine"].append(row)
                _add_flops_and_comparison(b, row)
                print(f"    {engine:<18} {bs}+{bs}: {row['it_per_s']:.2f} it/s "
                      f"{row['images_per_s']:.1f} img/s busy={row.get('gpu_busy')} "
                      f"same_math={row.get('same_math', '-')}", flush=True)

            b.guarded(f"engine {engine} {bs}+{bs}", one, needs_s=b.args.reserve_s)


def compile_probe(b: Bench) -> dict[str, Any]:
    """``--compile-probe``: the graph step over ``compile=full`` in this (fresh) process, with the
    workspace compile cache loaded first and saved after the compile (when it was cold)."""
    from raydb.compile_cache import CompileCache, compile_cache_key
    from raydb.storage import Storage

    a = b.args
    vae, text_encoder, tokenizer = build_frozen(b)
    data = training_data(b, text_encoder, tokenizer, cached=True)
    bs, res = a.compile_batch, b.spec["resolution"]
    options = {"compile": "full", "backend": a.compile_backend, "mixed_precision": b.mixed_precision,
               "engine": "graphs", "lora_rank": 4, "channels_last": "auto"}
    key, parts = compile_cache_key(
        model_identity=f"{b.results.get('model')}-seed0", shapes={
            "micro_batch": [2 * bs, 4, res // 8, res // 8], "accumulation": 1},
        device_name=b.results["env"]["chip"], options=options)
    cache = CompileCache(Storage(), a.compile_cache_ws, key, parts)
    t0 = time.perf_counter()
    loaded = cache.load()
    load_s = time.perf_counter() - t0
    trainer = _engine_trainer(b, vae, data, bs, "graphs", compile="full",
                              compile_backend=a.compile_backend)
    try:
        t0 = time.perf_counter()
        first = trainer.step()
        b.sync()
        first_s = time.perf_counter() - t0
        row = _measure(b, trainer)
        row["first_steps"].insert(0, {"loss": first["loss"], "grad_norm": first["grad_norm"]})
    finally:
        trainer.close()
    saved = cache.save()
    row.update(engine=f"graphs + compile ({a.compile_probe})", label=a.compile_probe,
               first_step_s=round(first_s, 2), cache_loaded=loaded, cache_saved=saved,
               cache_load_s=round(load_s, 2), cache_key=key)
    return row


def run_compile(b: Bench) -> None:
    """Two fresh processes (empty local inductor caches): cold compiles and saves, warm loads."""
    import subprocess

    b.results["compile_cache"] = []
    ws = tempfile.mkdtemp(prefix="raydb-compile-ws-")
    for label in ("cold", "warm"):

        def one(label=label):
            out = Path(tempfile.mkdtemp()) / f"probe_{label}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-probe", label,
                   "--compile-batch", str(b.args.compile_batch), "--compile-cache-ws", ws,
                   "--compile-backend", b.args.compile_backend, "--out", str(out),
                   "--engine-warmup", str(b.args.engine_warmup),
                   "--min-steps", str(b.args.min_steps), "--min-seconds", str(b.args.min_seconds),
                   "--max-steps", str(b.args.max_steps), "--profile-steps", str(b.args.profile_steps)]
            cmd += ["--tiny"] if b.tiny else []
            cmd += ["--cpu"] if not b.cuda else []
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=max(60.0, b.left()))
            probe = json.loads(out.read_text()) if out.exists() else {}
            row = probe.get("compile_probe")
            if proc.returncode or row is None:
                raise RuntimeError(f"compile probe {label}: exit {proc.returncode}; "
                                   f"{probe.get('errors')} {(proc.stdout + proc.stderr)[-1500:]}")
            b.results["compile_cache"].append({k: row.get(k) for k in (
                "label", "first_step_s", "cache_loaded", "cache_saved", "cache_load_s", "cache_key")})
            b.results["engine"] = b.results.get("engine", [])
            b.results["engine"].append(row)
            _add_flops_and_comparison(b, row)
            print(f"    compile {label}: first step {row['first_step_s']} s, "
                  f"{row['images_per_s']:.1f} img/s", flush=True)

        b.guarded(f"graphs + compile ({label})", one,
                  needs_s=b.args.compile_needs_s if label == "cold" else b.args.reserve_s * 3)


# ---------------------------------------------------------------- the peer: diffusers' script


def run_peer(b: Bench, vae, text_encoder, tokenizer) -> None:
    """diffusers' train_dreambooth_lora.py (unmodified) on our components, same settings."""
    import copy

    a = b.args
    root = Path(tempfile.mkdtemp(prefix="raydb-peer-"))
    res = b.spec["resolution"]
    model = peer_dreambooth.write_model_folder(
        root / "model", unet=build_unet(b), vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder),
        tokenizer=tokenizer, scheduler_config=SD_SCHEDULE)
    n_class = max(a.peer_batches) * 2
    instance = peer_dreambooth.write_images(root / "instance", NUM_INSTANCE_IMAGES, res, seed=1)
    klass = peer_dreambooth.write_images(root / "class", n_class, res, seed=2)
    b.results["peer"] = []
    b.results["peer_model_dir"] = str(model)
    for bs in a.peer_batches:
        cmd = peer_dreambooth.peer_command(
            Path(a.peer_script), model=model, instance_dir=instance, class_dir=klass,
            output_dir=root / f"out-{bs}", resolution=res, batch_size=bs, rank=4,
            mixed_precision=b.mixed_precision, steps=a.peer_steps, num_class_images=n_class)

        def one(bs=bs, cmd=cmd):
            row = {"instance_per_step": bs, "images_per_step": 2 * bs, "command": cmd}
            if not a.peer_dry_run:
                _free()
                row |= peer_dreambooth.run_peer(cmd, timeout_s=a.peer_timeout_s, site=a.peer_site)
                if row["exit_code"] or "it_per_s" not in row:
                    b.results["peer"].append(row)
                    raise RuntimeError(f"peer script exit {row['exit_code']}: {row['log_tail']}")
                row["images_per_s"] = round(2 * bs * row["it_per_s"], 3)
                print(f"    diffusers peer {bs}+{bs}: {row['it_per_s']:.2f} it/s", flush=True)
            b.results["peer"].append(row)

        b.guarded(f"peer {bs}+{bs}", one, needs_s=b.args.reserve_s * 4)


# ---------------------------------------------------------------- prior generation


def run_generation(b: Bench, vae, text_encoder, tokenizer) -> None:
    """``StableDiffusionPipeline`` from the components: DDIM, CFG 7.5, PIL output (as the prior stage)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(b),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    res, steps = b.spec["resolution"], b.args.gen_steps
    b.results["generation"] = []

    def call(n: int, num_steps: int) -> None:
        gens = [torch.Generator(b.device).manual_seed(i) for i in range(n)]
        pipe(
            prompt=["a photo of a dog"] * n,
            num_inference_steps=num_steps,
            guidance_scale=7.5,
            height=res,
            width=res,
            generator=gens,
            output_type="pil",
        )

    for n in b.args.gen_batches:

        def one(n=n):
            b.reset_peak()
            call(n, 2)  # warm-up: kernels, allocator, PIL path
            times = []
            for _ in range(b.args.gen_calls):
                b.sync()
                t0 = time.perf_counter()
                call(n, steps)
                b.sync()
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            row = {
                "batch": n,
                "steps": steps,
                "resolution": res,
                "guidance_scale": 7.5,
                "scheduler": "DDIM",
                "images_per_s": round(n / median, 3),
                "seconds_per_call": round(median, 3),
                "calls": len(times),
                "peak_mem_gb": b.peak_gb(),
            }
            b.results["generation"].append(row)
            print(f"    generation batch {n}: {row['images_per_s']:.2f} img/s", flush=True)

        b.guarded(f"generation batch {n}", one, needs_s=b.args.reserve_s)


# ---------------------------------------------------------------- environment and report


def environment(b: Bench) -> dict[str, Any]:
    import diffusers
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "device_type": b.device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    if b.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            chip=torch.cuda.get_device_name(),
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
    else:
        env["chip"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def measure_matmul(b: Bench) -> float:
    """The achievable bf16 ceiling: median of 10 random 8192^3 products after 3 warm-ups (TFLOP/s)."""
    n = 8192
    x, y = (torch.randn(n, n, device=b.device, dtype=torch.bfloat16) for _ in range(2))
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


def render(results: dict[str, Any]) -> str:
    """Markdown tables of a result file (what docs/performance.md quotes)."""
    env = results.get("env", {})
    lines = [
        f"Chip: **{env.get('chip')}** — {results.get('date', '?')[:10]}; torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, diffusers {env.get('diffusers')}, peft {env.get('peft')}, "
        f"transformers {env.get('transformers')}. bf16 peak used for MFU: "
        f"{results.get('peak_bf16_tflops')} TFLOP/s (datasheet); measured 8192³ bf16 matmul: "
        f"{results.get('measured_matmul_tflops')} TFLOP/s.",
        "",
    ]
    s = results.get("settings", {})
    lines += [
        f"Training (LoRA r=4 on to_q/k/v/out, [instance | class] batches, {s.get('mixed_precision')}, "
        f"{s.get('resolution')} px):",
        "",
        "| instance imgs/step | arm | images/s | ms/step | peak GB | TFLOP/s | MFU (989) | MFU (matmul) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("train", []):
        lines.append(
            f"| {r['instance_per_step']} | {r['arm']} | {r['images_per_s']:.1f} | "
            f"{r['step_ms_median']:.1f} | "
            f"{r['peak_mem_gb']} | {r.get('tflops_per_s')} | {_pct(r.get('mfu'))} | "
            f"{_pct(r.get('mfu_vs_measured_matmul'))} |"
        )
    ratios = results.get("cached_over_uncached", {})
    lines += [
        "",
        "Cached / VAE-every-step speed-up: "
        + ", ".join(f"{k} instance: {v:.2f}×" for k, v in ratios.items()),
        "",
    ]
    if results.get("options"):
        lines += [
            "Speed options (cached latents, "
            f"{results['options'][0]['instance_per_step']} instance + same class images per step):",
            "",
            "| option | images/s | vs baseline | ms/step | peak GB | MFU (989) |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["options"]:
            lines.append(
                f"| {r['option']} | {r['images_per_s']:.1f} | {r.get('speedup_vs_baseline', '—')} | "
                f"{r['step_ms_median']:.1f} | {r['peak_mem_gb']} | {_pct(r.get('mfu'))} |"
            )
        lines.append("")
    if results.get("generation"):
        g0 = results["generation"][0]
        lines += [
            f"Prior generation ({g0['steps']} {g0['scheduler']} steps, CFG {g0['guidance_scale']}, "
            f"{g0['resolution']} px, PIL output):",
            "",
            "| batch | images/s | s/call | peak GB |",
            "|---|---|---|---|",
        ]
        for r in results["generation"]:
            lines.append(
                f"| {r['batch']} | {r['images_per_s']:.2f} | {r['seconds_per_call']:.2f} | "
                f"{r['peak_mem_gb']} |"
            )
        lines.append("")
    lines += gpu_engine.render_engine(results)
    for name, err in results.get("errors", {}).items():
        lines.append(f"- error in {name}: `{err.splitlines()[0][:200]}`")
    for item in results.get("skipped", []):
        lines.append(f"- skipped {item}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "—"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/gpu_truth.json", help="result JSON (rewritten as it goes)")
    p.add_argument("--tiny", action="store_true", help="toy model at 64 px (CPU smoke test)")
    p.add_argument("--resolution", type=int, help="override the resolution (quick CPU checks of SD 1.5)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    p.add_argument("--render", metavar="JSON", help="print the markdown tables of a result file and exit")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting measurements after this")
    p.add_argument("--reserve-s", type=float, default=15.0, help="budget an ordinary measurement needs")
    p.add_argument("--compile-needs-s", type=float, default=150.0, help="budget a torch.compile run needs")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--options-batch", type=int, default=1)
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-calls", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=60)
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
    p.add_argument("--peer-script", help="diffusers' train_dreambooth_lora.py: run it as the peer arm")
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
        args.no_compile = True
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return {}
    _quiet_diffusers()
    b = Bench(args)
    r = b.results
    if args.compile_probe:  # a child of run_compile: one row, in a process of its own
        r.update(model="tiny" if args.tiny else "sd15-architecture-random-weights", env=environment(b))
        b.guarded("compile probe", lambda: r.__setitem__("compile_probe", compile_probe(b)))
        return r
    r.update(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model="tiny" if args.tiny else "sd15-architecture-random-weights",
        env=environment(b),
        peak_bf16_tflops=b.peak_tflops(),
        settings={
            "resolution": b.spec["resolution"],
            "mixed_precision": b.mixed_precision,
            "weights_dtype": str(b.dtype),
            "lora": "rank 4, alpha 4, to_q/to_k/to_v/to_out.0",
            "prior_preservation": True,
            "timed": "step_micro_batches(...) (built on the CPU, moved to the device) + optimizer_step, "
            "wall clock, cuda-synchronized, median over steps after warm-up",
            "argv": sys.argv[1:] if argv is None else argv,
        },
    )
    print(f"gpu_truth: {r['env']['chip']} torch {torch.__version__} -> {b.out}", flush=True)
    if b.cuda:
        b.guarded("matmul ceiling", lambda: r.__setitem__("measured_matmul_tflops", measure_matmul(b)))
    frozen = b.guarded("build VAE + text encoder", lambda: build_frozen(b))
    if frozen is None:
        return r
    vae, text_encoder, tokenizer = frozen
    with torch.no_grad():
        r["params_m"] = {
            "unet": round(sum(p.numel() for p in build_unet(b).parameters()) / 1e6, 1),
            "vae": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
            "text_encoder": round(sum(p.numel() for p in text_encoder.parameters()) / 1e6, 1),
        }
    _free()
    sections = set(args.sections)
    if "engine" in sections:
        run_engine(b, vae, text_encoder, tokenizer)
    if "peer" in sections and args.peer_script:
        run_peer(b, vae, text_encoder, tokenizer)
    if "compile" in sections and not args.no_compile:
        run_compile(b)
    if "train" in sections:
        run_training(b, vae, text_encoder, tokenizer)
    if "generation" in sections:
        run_generation(b, vae, text_encoder, tokenizer)
    if "options" in sections:
        run_options(b, vae, text_encoder, tokenizer)
    r["complete"] = not r["errors"] and not r["skipped"]
    b.save()
    print(render(r), flush=True)
    return r


if __name__ == "__main__":
    main()
