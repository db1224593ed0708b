"""Prior generation throughput, as the prior stage runs it: a diffusers pipeline over the bench's
components, seeded generators per image, PIL output, at ``--gen-batches`` images per call.

SD 1.x: ``StableDiffusionPipeline`` with DDIM and CFG 7.5; SDXL: ``StableDiffusionXLPipeline`` with
Euler and CFG 5.0 (the schedulers the tiny models ship, from ``raydb.models.architectures``'s noise
schedule). Each row: one 2-step call (kernels, allocator, PIL path), then ``--gen-calls`` timed calls
of ``--gen-steps`` steps (synchronised); images/s of the median call.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import training
from bench.harness import Run, markdown_table, time_steps
from raydb.models.architectures import SD_NOISE_SCHEDULE

__all__ = ["pipeline", "run_generation", "render_generation", "GUIDANCE", "SCHEDULER"]

GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
SCHEDULER = {"sd": "DDIM", "sdxl": "Euler"}


def pipeline(run: Run, parts: training.Frozen, unet: torch.nn.Module | None = None):
    """The family's pipeline over ``parts`` and a fresh UNet (progress bar off)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    unet = unet if unet is not None else training.unet(run)
    if parts.sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], unet=unet,
            scheduler=EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, steps_offset=1,
                                             timestep_spacing="leading"))
    else:
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], unet=unet,
            scheduler=DDIMScheduler(**SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_generation(run: Run, pipe, *, family: str, section: str = "generation") -> None:
    """One row per ``--gen-batches``: images/s of the median timed call."""
    a = run.args
    res, steps, guidance = run.resolution, a.gen_steps, GUIDANCE[family]
    run.results[section] = []

    def call(n: int, num_steps: int) -> None:
        pipe(prompt=[training.PROMPTS[1]] * n, num_inference_steps=num_steps, guidance_scale=guidance,
             height=res, width=res, generator=[torch.Generator(run.device).manual_seed(i) for i in range(n)],
             output_type="pil")

    for n in a.gen_batches:

        def one(n=n) -> None:
            run.reset_peak()
            call(n, 2)  # warm-up: kernels, allocator, PIL path
            t = time_steps(lambda: call(n, steps), warmup=0, min_steps=a.gen_calls, min_seconds=0.0,
                           max_steps=a.gen_calls, sync=run.sync)
            row = {"batch": n, "steps": steps, "resolution": res, "guidance_scale": guidance,
                   "scheduler": SCHEDULER[family], "images_per_s": round(n / t.median, 3),
                   "seconds_per_call": round(t.median, 3), "calls": len(t.times),
                   "peak_mem_gb": run.peak_gb()}
            run.results[section].append(row)
            print(f"    generation batch {n}: {row['images_per_s']:.2f} img/s", flush=True)

        run.measure(f"{family} generation batch {n}", one, needs_s=a.reserve_s)


def render_generation(results: dict[str, Any], section: str = "generation") -> list[str]:
    rows = results.get(section) or []
    if not rows:
        return []
    g0 = rows[0]
    lines = [f"Prior generation ({g0['steps']} {g0['scheduler']} steps, CFG {g0['guidance_scale']}, "
             f"{g0['resolution']} px, PIL output):", ""]
    lines += markdown_table(["batch", "images/s", "s/call", "peak GB"],
                            [[r["batch"], f"{r['images_per_s']:.2f}", f"{r['seconds_per_call']:.2f}",
                              r["peak_mem_gb"]] for r in rows])
    return lines + [""]
