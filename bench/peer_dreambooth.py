"""The peer arm: diffusers' DreamBooth-LoRA scripts, unmodified, on the bench's own model.

The benchmark writes its (random-weight) components with ``save_pretrained`` into a regular
diffusers folder, plus instance and class images at the training resolution, and runs the peer
script (``train_dreambooth_lora.py`` for SD, ``train_dreambooth_lora_sdxl.py`` for SDXL; from
``harness.peers_dir()`` or ``--peer-script``; carried to the device as ``.peer/``) as a subprocess
with the same resolution, per-step batch, LoRA rank, precision and prior preservation. Nothing from
a script is imported or copied; it only runs.

Its speed: SD reads the script's own tqdm bar (``Steps: ... N/N [..., X.XXit/s``; the final rate is
tqdm's moving average, i.e. steady state); SDXL times two runs (``--peer-steps`` short and long) and
divides the difference by the extra steps, so start-up, model loading and the adapter save cancel.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import training
from bench.harness import Run, free_memory
from raydb.models.architectures import SD_NOISE_SCHEDULE

__all__ = ["write_model_folder", "write_images", "peer_command", "parse_rate", "run_peer",
           "run_peer_section", "run_sdxl_peer"]

INSTANCE_PROMPT, CLASS_PROMPT = training.PROMPTS


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
    no checkpoints, no tracker, class images present so it generates none). Both scripts take them."""
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


def _env(site: str | None) -> dict[str, str]:
    """The peer's environment: ``site`` (a folder of packages only it needs) first on its path."""
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    return env


def run_peer(command: list[str], *, timeout_s: float, site: str | None = None) -> dict[str, Any]:
    """Run the peer; its rate, wall time, exit code and the tail of its log."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=_env(site))
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    rate = parse_rate(log)
    row = {"exit_code": proc.returncode, "wall_s": round(wall, 1),
           "log_tail": log[-1500:] if proc.returncode or rate is None else None}
    if rate:
        row |= {"it_per_s": round(rate["it_per_s"], 3), "steps_done": rate["done"],
                "steps": rate["total"]}
    return row


def run_peer_section(run: Run, parts: training.Frozen) -> None:
    """SD: the peer at each ``--peer-batches`` (+ as many class images), same settings as ours."""
    a = run.args
    root = Path(tempfile.mkdtemp(prefix="raydb-peer-"))
    res = run.resolution
    model = write_model_folder(
        root / "model", unet=training.unet(run), vae=copy.deepcopy(parts.vae),
        text_encoder=copy.deepcopy(parts.text_encoders[0]), tokenizer=parts.tokenizers[0],
        scheduler_config=SD_NOISE_SCHEDULE)
    n_class = max(a.peer_batches) * 2
    instance = write_images(root / "instance", training.NUM_INSTANCE_IMAGES, res, seed=1)
    klass = write_images(root / "class", n_class, res, seed=2)
    run.results["peer"] = []
    run.results["peer_model_dir"] = str(model)
    for bs in a.peer_batches:
        cmd = peer_command(Path(a.peer_script), model=model, instance_dir=instance, class_dir=klass,
                           output_dir=root / f"out-{bs}", resolution=res, batch_size=bs, rank=4,
                           mixed_precision=run.mixed_precision, steps=a.peer_steps, num_class_images=n_class)

        def one(bs=bs, cmd=cmd):
            row = {"instance_per_step": bs, "images_per_step": 2 * bs, "command": cmd}
            if not a.peer_dry_run:
                free_memory()
                row |= run_peer(cmd, timeout_s=a.peer_timeout_s, site=a.peer_site)
                if row["exit_code"] or "it_per_s" not in row:
                    run.results["peer"].append(row)
                    raise RuntimeError(f"peer script exit {row['exit_code']}: {row['log_tail']}")
                row["images_per_s"] = round(2 * bs * row["it_per_s"], 3)
                print(f"    diffusers peer {bs}+{bs}: {row['it_per_s']:.2f} it/s", flush=True)
            run.results["peer"].append(row)

        run.measure(f"peer {bs}+{bs}", one, needs_s=a.reserve_s * 4)


def run_sdxl_peer(run: Run, pipe) -> None:
    """SDXL: the peer on ``pipe`` saved as a folder, timed by the two-run difference."""
    a = run.args
    script = Path(a.peer_script)
    if not script.is_file():
        raise FileNotFoundError(f"--peer-script {script} not found")
    root = Path(tempfile.mkdtemp(prefix="raydb-sdxl-peer-"))
    model = root / "model"
    pipe.save_pretrained(model, safe_serialization=True)
    res, bs = run.resolution, a.batch_sizes[0]
    instance = write_images(root / "instance", training.NUM_INSTANCE_IMAGES, res, seed=3)
    klass = write_images(root / "class", training.NUM_CLASS_IMAGES, res, seed=4)
    short, long = a.peer_steps

    def wall(steps: int) -> float:
        cmd = peer_command(script, model=model, instance_dir=instance, class_dir=klass,
                           output_dir=root / f"out{steps}", resolution=res, batch_size=bs, rank=4,
                           mixed_precision=run.mixed_precision, steps=steps,
                           num_class_images=training.NUM_CLASS_IMAGES)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, run.left()),
                              env=_env(a.peer_site))
        if proc.returncode != 0:
            raise RuntimeError(f"peer exited {proc.returncode}: {proc.stderr[-1500:]}")
        return time.perf_counter() - t0

    t_short, t_long = wall(short), wall(long)
    step_s = (t_long - t_short) / (long - short)
    peer = {"script": str(script), "instance_per_step": bs, "images_per_step": 2 * bs,
            "steps": [short, long], "wall_s": [round(t_short, 1), round(t_long, 1)],
            "step_ms": round(1000 * step_s, 2), "images_per_s": round(2 * bs / step_s, 3)}
    ours = next((r for r in run.results.get("train", [])
                 if r["arm"] == "VAE every step" and r["instance_per_step"] == bs), None)
    if ours:  # the peer runs its VAE every step too: the like-for-like comparison
        peer["ours_uncached_over_peer"] = round(ours["images_per_s"] / peer["images_per_s"], 3)
    run.results["peer"] = peer
