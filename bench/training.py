"""The bench's side of the shipped training loop: components at a real architecture with random
weights, stand-in data with the real shapes, and ``TrainEngine`` built as ``raydb.train.local`` does.

Every training row in ``bench/`` is ``measure(run, make_engine(...))``: the engine users run
(prefetched batches, the graph step or ``optimizer_step``, the workspace compile cache), chosen by
config (``train.*``) and, for an arm that differs from the defaults, by the engine's two measuring
seams (``prefetch``, ``graph_step``). Nothing here steps an optimizer.

Data: 4 instance and 8 class stand-ins per ``TrainingData``; cached arms hold latent distributions
``[N, 4, h, w]`` (mean, std), uncached arms pixels ``[N, 3, H, W]`` that the step runs through the
VAE encoder (``train.cache_latents=False``, the diffusers-style loop). Prompt embeddings come from the
frozen text encoder(s) at their real width; SDXL rows add the pooled embedding and time ids.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench.harness import Run, profile_busy, time_steps, timing
from raydb.config import RaydbConfig, load_config
from raydb.encode.encoders import EncodedImages
from raydb.models.architectures import SD_NOISE_SCHEDULE, build_text_encoder, build_unet, build_vae
from raydb.models.sdxl import encode_prompts_sdxl, tokenize_sdxl
from raydb.models.tiny import build_tiny_tokenizer
from raydb.train.data import TrainingData
from raydb.train.device_options import resolve_mixed_precision
from raydb.train.engine import TrainEngine
from raydb.train.step import build_train_state

__all__ = ["PROMPTS", "Frozen", "unet", "frozen", "training_data", "train_config", "make_engine",
           "measure", "flops_per_step", "add_mfu"]

PROMPTS = ["a photo of sks dog", "a photo of a dog"]
NUM_INSTANCE_IMAGES, NUM_CLASS_IMAGES = 4, 8


@dataclass
class Frozen:
    """The frozen parts (training dtype, eval, no grad) and the tokenizers built in code (their ids
    index the real-size embeddings)."""

    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple[Any, ...]

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def unet(run: Run, seed: int = 0) -> torch.nn.Module:
    """A fresh UNet of ``run.arch`` on the device, in the training dtype, seeded (same init every row)."""
    torch.manual_seed(seed)
    with run.device:
        module = build_unet(_arch(run))
    return module.to(run.dtype).eval().requires_grad_(False)


def frozen(run: Run) -> Frozen:
    arch = _arch(run)
    tokenizers = (build_tiny_tokenizer(),)
    if "text_2" in arch:
        tokenizers += (build_tiny_tokenizer(pad_token="!"),)  # open_clip pads with "!"
    torch.manual_seed(1)
    with run.device:
        vae = build_vae(arch)
        encoders = tuple(build_text_encoder(arch, tok, which)
                         for tok, which in zip(tokenizers, ("text", "text_2"), strict=False))
    for m in (vae, *encoders):
        m.to(run.dtype).eval().requires_grad_(False)
    return Frozen(vae, encoders, tokenizers)


def _arch(run: Run) -> dict[str, Any]:
    """``run.arch`` at the run's resolution (the VAE's and UNet's ``sample_size`` follow it)."""
    arch = dict(run.arch)
    if run.resolution != arch["resolution"]:
        arch["unet"] = arch["unet"] | {"sample_size": run.resolution // 8}
        arch["vae"] = arch["vae"] | {"sample_size": run.resolution}
    return arch


def training_data(run: Run, parts: Frozen, *, cached: bool) -> TrainingData:
    """Random stand-ins with the real shapes (seeded): latent distributions or pixels, prompts."""
    res = run.resolution
    latent_shape = (4, res // 8, res // 8)
    g = torch.Generator().manual_seed(7)

    def source(n: int):
        if cached:
            return EncodedImages(torch.randn(n, *latent_shape, generator=g),
                                 0.05 + 0.1 * torch.rand(n, *latent_shape, generator=g))
        return torch.rand(n, 3, res, res, generator=g) * 2 - 1

    n_inst, n_class = NUM_INSTANCE_IMAGES, NUM_CLASS_IMAGES
    if parts.sdxl:
        hidden, pooled = encode_prompts_sdxl(parts.tokenizers, parts.text_encoders, PROMPTS)
        ids, ids_2 = tokenize_sdxl(parts.tokenizers, PROMPTS)
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)  # uncropped
        sdxl = dict(instance_pooled=pooled[:1], class_pooled=pooled[1:], instance_ids_2=ids_2[:1],
                    class_ids_2=ids_2[1:], instance_time_ids=time_ids.expand(n_inst, 6),
                    class_time_ids=time_ids.expand(n_class, 6))
    else:
        ids = parts.tokenizers[0](PROMPTS, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = parts.text_encoders[0](ids.to(run.device))[0].float().cpu()
        sdxl = {}
    return TrainingData(instance=source(n_inst), class_=source(n_class), instance_embeds=hidden[:1],
                        class_embeds=hidden[1:], instance_ids=ids[:1], class_ids=ids[1:],
                        latent_shape=latent_shape, **sdxl)


def train_config(run: Run, batch_size: int, *, workspace: str | None = None, **options: Any) -> RaydbConfig:
    """The trainer's config at the run's resolution and precision; ``options`` are ``train.*``."""
    return load_config(data={
        "workspace": workspace or tempfile.mkdtemp(prefix="raydb-bench-"),
        "train": {"resolution": run.resolution, "batch_size": batch_size, "max_steps": 100_000,
                  "mixed_precision": run.mixed_precision, **options}})


def make_engine(run: Run, cfg: RaydbConfig, unet_module: torch.nn.Module | None, vae, data: TrainingData,
                *, state=None, noise_scheduler=None, prediction_type: str = "epsilon",
                **engine_options: Any) -> TrainEngine:
    """``build_train_state`` (LoRA, speed options, AdamW, schedule) + ``TrainEngine`` over ``data``.

    ``state``: reuse a built state (rows that only change the batch or the data); ``noise_scheduler``:
    default SD's DDPM training schedule; ``engine_options``: ``prefetch``, ``graph_step``,
    ``compile_cache`` (``TrainEngine``'s keywords).
    """
    from diffusers import DDPMScheduler

    state = state or build_train_state(cfg, unet_module, None)
    noise_scheduler = noise_scheduler or DDPMScheduler(**SD_NOISE_SCHEDULE)
    return TrainEngine(cfg, state, data, noise_scheduler=noise_scheduler, prediction_type=prediction_type,
                       vae=vae, device=run.device, **engine_options)


def measure(run: Run, engine: TrainEngine, *, warmup: int | None = None, profile_steps: int = 0,
            count_flops: bool = False) -> dict[str, Any]:
    """One row: warm-up (untimed), timed ``engine.step()`` calls, peak memory, first steps' loss
    and grad norm (what same-math checks compare), then optionally the GPU-busy profile of
    ``profile_steps`` steps and the FLOPs of one step (eager steps only: a replayed graph runs no
    operator the counter sees)."""
    a = run.args
    tc = engine.cfg.train
    run.reset_peak()
    t0 = time.perf_counter()
    t = time_steps(engine.step, warmup=a.warmup if warmup is None else warmup, min_steps=a.min_steps,
                   min_seconds=a.min_seconds, max_steps=a.max_steps, sync=run.sync)
    images = t.last["images"]
    first = [{"loss": m["loss"], "grad_norm": m["grad_norm"]} for m in t.warmup_out]
    row: dict[str, Any] = {
        "instance_per_step": tc.batch_size * tc.gradient_accumulation_steps, "images_per_step": images,
        **timing(t, images), "warmup_s": [round(s, 3) for s in t.warmup_s],
        "first_step_s": round(t.warmup_s[0], 2) if t.warmup_s else None, "first_steps": first,
        "loss": round(t.last["loss"], 5), "peak_mem_gb": run.peak_gb(),
        "cuda_graphs": engine.graph_step is not None,
        "captured": bool(engine.graph_step is not None and engine.graph_step.captured),
        "prefetch": engine.prefetcher is not None,
        "mixed_precision": resolve_mixed_precision(tc, run.device)}
    if first:  # same init, same batches: arms that change layout, not math, must agree here
        row["first_step_loss"] = round(first[0]["loss"], 5)
        row["first_step_grad_norm"] = round(first[0]["grad_norm"], 5)
    if run.cuda and profile_steps:
        row |= profile_busy(engine.step, profile_steps, run.sync)
    if count_flops and engine.graph_step is None:
        row["flops_per_step"] = flops_per_step(engine)
        add_mfu(run, row, row["flops_per_step"])
    row["measure_s"] = round(time.perf_counter() - t0, 1)
    return row


def flops_per_step(engine: TrainEngine) -> int:
    """FLOPs of one ``engine.step()`` (``torch.utils.flop_counter``: forward, the backward LoRA
    needs, the VAE encoder on the uncached path)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        engine.step()
    return counter.get_total_flops()


def add_mfu(run: Run, row: dict[str, Any], flops: int) -> None:
    """``tflops_per_s``, ``mfu`` (of the datasheet peak) and ``mfu_vs_measured_matmul``."""
    per_s = flops / (row["step_ms_median"] / 1000)
    row["tflops_per_s"] = round(per_s / 1e12, 1)
    peak = run.peak_tflops()
    row["mfu"] = round(per_s / (peak * 1e12), 4) if peak else None
    matmul = run.results.get("measured_matmul_tflops")
    row["mfu_vs_measured_matmul"] = round(per_s / (matmul * 1e12), 4) if matmul else None
