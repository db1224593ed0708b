"""The peer arm of ``gpu_truth.py``: diffusers' ``train_dreambooth_lora.py``, unmodified, same model.

The benchmark writes its (random-weight) components with ``save_pretrained`` into a regular
diffusers folder, plus instance and class images at the training resolution, and runs the peer
script on it as a subprocess with the same resolution, per-step batch, LoRA rank, precision and
prior preservation. Its speed is read from its own tqdm bar (``Steps: ... N/N [..., X.XXit/s``):
the bar's final rate (tqdm's moving average, i.e. steady state) and the whole call's wall time.
Nothing from the script is imported or copied; it only runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["write_model_folder", "write_images", "peer_command", "parse_rate", "run_peer"]

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"


def write_model_folder(path: Path, *, unet, vae, text_encoder, tokenizer, scheduler_config: dict) -> Path:
    """``StableDiffusionPipeline(...).save_pretrained(path)`` of the benchmark's components (fp32)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float32)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_images(folder: Path, count: int, resolution: int, *, seed: int) -> Path:
    """``count`` random RGB PNGs of ``resolution`` px (the peer reads image folders)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def peer_command(script: Path, *, model: Path, instance_dir: Path, class_dir: Path, output_dir: Path,
                 resolution: int, batch_size: int, rank: int, mixed_precision: str, steps: int,
                 num_class_images: int, python: str = sys.executable) -> list[str]:
    """The peer's command line: our settings in its flags (prior preservation on, no validation,
    no checkpoints, no tracker, class images present so it generates none)."""
    return [
        python, str(script),
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
        "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", CLASS_PROMPT, "--num_class_images", str(num_class_images),
        "--prior_loss_weight", "1.0",
        "--output_dir", str(output_dir), "--seed", "0",
        "--resolution", str(resolution), "--center_crop",
        "--train_batch_size", str(batch_size), "--rank", str(rank),
        "--mixed_precision", mixed_precision,
        "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps + 1000),
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--dataloader_num_workers", "0", "--report_to", "all",
    ]


_RATE = re.compile(r"Steps:.*?(\d+)/(\d+) \[[^\]]*?(\d+(?:\.\d+)?)(it/s|s/it)")


def parse_rate(log: str) -> dict[str, Any] | None:
    """The last ``Steps`` tqdm update: ``{"done": n, "total": N, "it_per_s": rate}``, or None."""
    found = None
    for line in re.split(r"[\r\n]", log):
        m = _RATE.search(line)
        if m:
            value = float(m.group(3))
            rate = value if m.group(4) == "it/s" else 1.0 / value
            found = {"done": int(m.group(1)), "total": int(m.group(2)), "it_per_s": rate}
    return found


def run_peer(command: list[str], *, timeout_s: float, site: str | None = None) -> dict[str, Any]:
    """Run the peer (``site``: a folder of packages only it needs, first on its path); its rate,
    wall time, exit code and the tail of its log."""
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    rate = parse_rate(log)
    row = {"exit_code": proc.returncode, "wall_s": round(wall, 1),
           "log_tail": log[-1500:] if proc.returncode or rate is None else None}
    if rate:
        row |= {"it_per_s": round(rate["it_per_s"], 3), "steps_done": rate["done"],
                "steps": rate["total"]}
    return row
