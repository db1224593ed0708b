"""Validation without sampling: the denoising loss on fixed noise and fixed timesteps.

Training losses are noisy because every step draws fresh noise and timesteps. To compare two
adapters (or an adapter against the base model) we instead score the *same* draws every time: a
generator seeded by ``seed`` fixes the latent sample and the diffusion noise of every image, and
the timesteps are spread evenly over the schedule. The number is then a deterministic function of
the weights, which is what a learning test or a Tune trial's ``val_instance`` / ``val_prior`` needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raydb.train.encode import EncodedImages
from raydb.train.loss import training_target

__all__ = ["fixed_timesteps", "denoising_loss"]


def fixed_timesteps(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """``[num_timesteps]`` long: the midpoints of ``num_timesteps`` equal slices of the schedule."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    return ((torch.arange(num_timesteps) + 0.5) * num_train_timesteps / num_timesteps).long()


@torch.no_grad()
def denoising_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    vae,
    encoded: EncodedImages,
    prompt_embeds: torch.Tensor,
    *,
    prediction_type: str,
    seed: int,
    num_timesteps: int = 8,
    batch_size: int = 16,
) -> float:
    """Mean fp32 MSE between the UNet's prediction and its target over fixed (image, t) pairs.

    Every image of ``encoded`` (latent distributions ``[N, C, h, w]``) is scored at each of
    ``num_timesteps`` evenly spaced timesteps, N * num_timesteps samples in all. The latent sample
    (``mean + std * eps``) and the noise come from ``torch.Generator().manual_seed(seed)``, so two
    calls with the same weights and seed return the same number.

    Args:
        unet: the (possibly LoRA-adapted) UNet; evaluated in eval mode, its mode restored after.
        noise_scheduler: the training scheduler (``add_noise``, ``get_velocity``).
        vae: supplies ``config.scaling_factor`` (and ``shift_factor`` if any); never run.
        prompt_embeds: ``[1, L, D]`` (one prompt for all images) or ``[N, L, D]``.
        prediction_type: "epsilon" or "v_prediction".
    """
    n = len(encoded)
    if prompt_embeds.shape[0] not in (1, n):
        raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows for {n} images")
    g = torch.Generator().manual_seed(seed)
    latent_eps = torch.randn(encoded.mean.shape, generator=g)
    noise = torch.randn((num_timesteps, *encoded.mean.shape), generator=g)  # [T, N, C, h, w]
    steps = fixed_timesteps(noise_scheduler.config.num_train_timesteps, num_timesteps)
    shift = vae.config.get("shift_factor")
    latents = encoded.mean + encoded.std * latent_eps
    latents = (latents - shift if shift is not None else latents) * vae.config.scaling_factor

    # Flatten (timestep, image) pairs into one batch axis: row k is image k % N at step k // N.
    all_latents = latents.repeat(num_timesteps, 1, 1, 1)
    all_noise = noise.flatten(0, 1)
    all_steps = steps.repeat_interleave(n)
    all_embeds = prompt_embeds.expand(n, -1, -1).repeat(num_timesteps, 1, 1)

    frozen = next(p for p in unet.parameters() if not p.requires_grad)
    was_training = unet.training
    unet.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, all_latents.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            x0 = all_latents[sl].to(frozen.device)
            eps = all_noise[sl].to(frozen.device)
            t = all_steps[sl].to(frozen.device)
            noisy = noise_scheduler.add_noise(x0, eps, t)
            cond = all_embeds[sl].to(frozen.device, frozen.dtype)
            pred = unet(noisy.to(frozen.dtype), t, cond).sample.float()
            target = training_target(noise_scheduler, x0, eps, t, prediction_type).float()
            total += F.mse_loss(pred, target, reduction="sum").item()
            count += target.numel()
    finally:
        unet.train(was_training)
    return total / count
