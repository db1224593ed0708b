"""The recipe that trains the shipped ``digits`` base model (``make digits-base``).

    python -m raydb.models.digits_recipe --output raydb/models/weights/digits

Three phases, seeded and single-threaded so the same torch build on the same kind of CPU writes
the same bytes (the shipped ``provenance.json`` records every setting, the data's sha256 and the
weights' sha256; :func:`verify_provenance` re-hashes a folder against it):

1. **VAE** (``vae_steps`` x ``vae_batch``): reconstruction MSE + ``vae_kl_weight`` x KL on digits
   rendered at 32 px, ``vae_colour_fraction`` of them in random ink and background colours. A VAE
   trained on black-on-white alone decodes the subject's red-on-yellow as grey, and then no
   adapter could learn the subject. Then ``scaling_factor`` = 1 / std of the latents of the
   black-on-white digits (as SD's 0.18215 was measured), so the UNet sees unit-variance latents.
2. **UNet** (``unet_steps`` x ``unet_batch``): DDPM epsilon-prediction on the black-on-white digits'
   cached latent distributions (a fresh latent sample every step, as raydb's trainer does), the
   prompt naming the digit, replaced by the empty prompt ``prompt_dropout`` of the time (so
   classifier-free guidance is possible); AdamW, warm-up then cosine decay, gradient clipping, an
   EMA of the weights (what is shipped). The text encoder stays random and frozen.
3. **Measure**: ``eval_samples`` images per digit prompt (DDIM, ``eval_steps`` steps, no guidance,
   seeds 0..n-1), read by :class:`~raydb.fidelity.judge.DigitJudge`: the per-digit accuracy goes
   into the provenance.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from raydb.data.digits import (
    DIGIT_NAMES,
    base_training_indices,
    digit_prompt,
    digits_sha256,
    load_digit_ink,
    render,
    upsample_ink,
)
from raydb.models.digits import DIGITS_SPEC, DigitsParts, build_untrained, save_digits_model

__all__ = ["RecipeSettings", "train_digits_model", "measure", "verify_provenance", "main"]

PROVENANCE = "provenance.json"


@dataclass(frozen=True)
class RecipeSettings:
    """Every knob of the recipe (recorded in ``provenance.json``)."""

    seed: int = 0
    threads: int = 1  # torch intra-op threads: part of what makes the bytes reproducible
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    vae_colour_fraction: float = 0.75
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    eval_samples: int = 30
    eval_steps: int = 25


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_vae(vae: torch.nn.Module, ink32: torch.Tensor, s: RecipeSettings, g: torch.Generator,
              log_every: int = 100) -> list[float]:
    """Phase 1 on ``ink32`` (``[N, 32, 32]`` ink maps); returns the loss every ``log_every`` steps."""
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    vae.train()
    history: list[float] = []
    n, b = ink32.shape[0], s.vae_batch
    for step in range(s.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.vae_steps, s.vae_lr, 50)
        idx = torch.randint(n, (b,), generator=g)
        coloured = torch.rand(b, generator=g) < s.vae_colour_fraction
        ink_rgb = torch.where(coloured[:, None], torch.rand(b, 3, generator=g), torch.zeros(b, 3))
        bg_rgb = torch.where(coloured[:, None], torch.rand(b, 3, generator=g), torch.ones(b, 3))
        x = render(ink32[idx], ink_rgb, bg_rgb) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + s.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), s.max_grad_norm)
        opt.step()
        if step % log_every == 0 or step == s.vae_steps - 1:
            history.append(round(loss.item(), 5))
            _log(f"vae step {step}/{s.vae_steps} loss {loss.item():.5f}")
    vae.eval()
    return history


@torch.no_grad()
def _encode(vae: torch.nn.Module, images: torch.Tensor,
            batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 3, S, S]`` in [0, 1] -> latent distributions ``(mean, std)``, each ``[N, 4, S/4, S/4]``."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch):
        dist = vae.encode(images[start:start + batch] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _prompt_embeds(parts: DigitsParts, prompts: list[str]) -> torch.Tensor:
    ids = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return parts.text_encoder(ids)[0]


def train_unet(parts: DigitsParts, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor,
               s: RecipeSettings, g: torch.Generator,
               log_every: int = 100) -> tuple[torch.nn.Module, list[float]]:
    """Phase 2; returns the EMA UNet and the (EMA-smoothed) training loss every ``log_every`` steps."""
    unet, scheduler = parts.unet, parts.scheduler
    embeds = _prompt_embeds(parts, [digit_prompt(d) for d in range(10)] + [""])  # [11, L, D]
    scale = parts.vae.config.scaling_factor
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=1e-2)
    unet.train()
    history: list[float] = []
    smooth = None
    n, b = mean.shape[0], s.unet_batch
    for step in range(s.unet_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s.unet_steps, s.unet_lr, s.unet_warmup)
        idx = torch.randint(n, (b,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (b,), generator=g)
        dropped = torch.rand(b, generator=g) < s.prompt_dropout
        cond = embeds[torch.where(dropped, torch.full_like(labels[idx], 10), labels[idx])]
        pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), s.max_grad_norm)
        opt.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % log_every == 0 or step == s.unet_steps - 1:
            history.append(round(smooth, 5))
            _log(f"unet step {step}/{s.unet_steps} loss {loss.item():.5f} (smoothed {smooth:.5f})")
    return ema.eval(), history


def measure(pipe: Any, num: int, steps: int) -> dict[str, Any]:
    """Per-digit accuracy of ``num`` samples per digit prompt (seeds 0..num-1), read by the judge."""
    from raydb.fidelity.judge import DigitJudge
    from raydb.fidelity.metrics import sample_images

    judge = DigitJudge(resolution=DIGITS_SPEC["resolution"])
    per_digit = {}
    for d in range(10):
        images = sample_images(pipe, digit_prompt(d), list(range(num)), steps=steps)
        per_digit[DIGIT_NAMES[d]] = float((judge.classify(images) == d).mean())
    return {"per_digit_accuracy": per_digit, "mean_accuracy": sum(per_digit.values()) / 10,
            "samples_per_digit": num, "steps": steps, "guidance_scale": 1.0,
            "judge_held_out_accuracy": judge.held_out_accuracy}


def _weights_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def verify_provenance(folder: str | Path) -> dict[str, Any]:
    """Re-hash a digits model folder against its ``provenance.json`` (and the data against the
    recorded sha256); raises ``ValueError`` naming what differs. Returns the provenance."""
    folder = Path(folder)
    prov = json.loads((folder / PROVENANCE).read_text())
    if prov["data"]["sha256"] != digits_sha256():
        raise ValueError(f"{folder}: load_digits' data differs from the data the weights were trained on")
    if prov["weights_sha256"] != _weights_sha256(folder):
        raise ValueError(f"{folder}: the weight files differ from those the recipe recorded")
    return prov


def train_digits_model(output: str | Path, s: RecipeSettings = RecipeSettings()) -> dict[str, Any]:
    """Run the three phases and write the model folder with its ``provenance.json``."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(Path(output), s)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(output: Path, s: RecipeSettings) -> dict[str, Any]:
    started = time.time()
    g = torch.Generator().manual_seed(s.seed)
    ink, labels = load_digit_ink()
    keep = base_training_indices(labels)
    ink32 = upsample_ink(ink[keep], DIGITS_SPEC["resolution"])
    labels_t = torch.from_numpy(labels[keep])
    parts = build_untrained()
    parts.text_encoder.requires_grad_(False).eval()

    _log(f"phase 1: VAE on {len(keep)} digits")
    vae_history = train_vae(parts.vae, ink32, s, g)
    black_on_white = render(ink32, torch.zeros(len(keep), 3), torch.ones(len(keep), 3))
    mean, std = _encode(parts.vae, black_on_white)
    latents = mean + std * torch.randn(mean.shape, generator=g)
    scaling_factor = float(1.0 / latents.std())
    parts.vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        recon = parts.vae.decode(mean[:256]).sample
        vae_mse = F.mse_loss(recon, black_on_white[:256] * 2 - 1).item()
    vae_seconds = time.time() - started

    _log(f"phase 2: UNet (scaling_factor {scaling_factor:.4f}, VAE reconstruction MSE {vae_mse:.5f})")
    parts.unet, unet_history = train_unet(parts, mean, std, labels_t, s, g)
    train_seconds = time.time() - started

    from diffusers import StableDiffusionPipeline

    # the shipped weights are fp16: measure what ships
    save_digits_model(parts, output, identity="pending")
    weights = _weights_sha256(output)
    digest = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:8]
    identity = f"digits-v{DIGITS_SPEC['version']}-{digest}"
    (output / "raydb_identity.json").write_text(json.dumps({"identity": identity}) + "\n")
    shipped = StableDiffusionPipeline.from_pretrained(output, dtype=torch.float32, safety_checker=None,
                                                      requires_safety_checker=False)
    shipped.set_progress_bar_config(disable=True)
    _log("phase 3: measuring the shipped weights")
    figures = measure(shipped, s.eval_samples, s.eval_steps)
    _log(f"per-digit accuracy {figures['per_digit_accuracy']} mean {figures['mean_accuracy']:.3f}")
    import diffusers
    import sklearn
    import transformers

    provenance = {
        "identity": identity,
        "script": "python -m raydb.models.digits_recipe (raydb/models/digits_recipe.py)",
        "settings": asdict(s),
        "spec": DIGITS_SPEC,
        "data": {"source": "sklearn.datasets.load_digits (ink / 16, labels)", "sha256": digits_sha256(),
                 "num_images": int(len(labels)), "trained_on": int(len(keep)),
                 "left_out": "the built-in subject's five threes (raydb.data.digits.SUBJECT_INDICES)"},
        "vae": {"scaling_factor": scaling_factor, "reconstruction_mse_black_on_white": round(vae_mse, 6),
                "loss_every_100_steps": vae_history, "seconds": round(vae_seconds)},
        "unet": {"smoothed_loss_every_100_steps": unet_history,
                 "seconds": round(train_seconds - vae_seconds)},
        "figures": figures,
        "weights_sha256": weights,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                        "scikit-learn": sklearn.__version__, "machine": platform.machine(),
                        "processor": platform.processor() or "unknown"},
        "reproducibility": "seeded, deterministic algorithms, settings.threads torch threads: the same "
                           "torch build on the same kind of CPU writes the same bytes; another CPU "
                           "(another SIMD path) may differ in the last bits",
        "trained_at": time.strftime("%Y-%m-%d", time.gmtime()),
        "total_seconds": round(time.time() - started),
    }
    (output / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    _log(f"wrote {output} ({identity})")
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydb.models.digits_recipe",
                                     description="Train the digits base model (see the module docstring).")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--compare", help="a model folder (e.g. the shipped raydb/models/weights/digits) "
                        "whose weights the new ones must equal byte for byte (exit 1 if not)")
    for name, default in asdict(RecipeSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    output, compare = args.pop("output"), args.pop("compare")
    if Path(output).exists() and any(Path(output).iterdir()):
        print(f"--output: {output} is not empty; remove it first", file=sys.stderr)
        return 2
    if compare and not (Path(compare) / PROVENANCE).is_file():
        print(f"--compare: {compare} has no {PROVENANCE}", file=sys.stderr)
        return 2
    provenance = train_digits_model(output, RecipeSettings(**args))
    if compare:
        expected = json.loads((Path(compare) / PROVENANCE).read_text())["weights_sha256"]
        same = provenance["weights_sha256"] == expected
        print(f"weights {'equal' if same else 'DIFFER from'} those in {compare}: "
              + json.dumps({k: v[:12] for k, v in provenance["weights_sha256"].items()}))
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
