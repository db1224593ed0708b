"""Flow matching (rectified flow), the objective FLUX.1 trains on, as pure tensor functions.

A sample at time ``sigma`` in [0, 1] is the straight line between the clean latents and noise::

    x_sigma = (1 - sigma) * latents + sigma * noise,     target velocity  v = noise - latents

and the transformer learns ``v`` (the derivative of ``x_sigma`` in ``sigma``). What a trainer chooses
is *which* sigmas it trains on and how much each sample's error counts (``train.flow``):

* ``timestep_sampling``: ``uniform``; ``logit_normal`` — ``sigmoid(m + s * z)``, z ~ N(0, 1), which
  concentrates on mid-range sigmas; ``mode`` — SD3's ``1 - u - scale * (cos^2(pi u / 2) - 1 + u)``,
  u ~ U(0, 1), heavier tails. Then an optional ``shift`` toward noise:
  ``shift * s / (1 + (shift - 1) * s)`` (what sampling at a higher resolution does).
* ``weighting``: ``none`` (1), ``sigma_sqrt`` (``sigma^-2``) or ``cosmap`` (``2 / (pi (1 - 2 sigma +
  2 sigma^2))``), one weight per sample.

Every draw comes from the generator ``train/data.py`` seeds per sample, so sigmas follow the same
determinism rules as the noise (resume, DDP split). Sigmas are kept in ``[1 / num_train_timesteps,
1]``, the range of the scheduler's own sigmas, so ``sigma_sqrt`` never divides by zero.
"""

from __future__ import annotations

import math

import torch

from raydb.config import FlowConfig

__all__ = ["SAMPLINGS", "WEIGHTINGS", "draw_sigma", "shift_sigmas", "noisy_latents", "velocity_target",
           "loss_weighting", "fixed_sigmas"]

SAMPLINGS = ("logit_normal", "uniform", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``: monotone, fixes 0 and 1, moves mass toward noise for
    ``shift > 1``."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_sigma(flow: FlowConfig, generator: torch.Generator, num_train_timesteps: int) -> float:
    """One sample's sigma, drawn with ``generator`` from ``flow.timestep_sampling``, shifted and
    clamped to ``[1 / num_train_timesteps, 1]``."""
    if flow.timestep_sampling == "logit_normal":
        z = torch.randn((1,), generator=generator, dtype=torch.float64)
        u = torch.sigmoid(flow.logit_mean + flow.logit_std * z)
    elif flow.timestep_sampling == "uniform":
        u = torch.rand((1,), generator=generator, dtype=torch.float64)
    elif flow.timestep_sampling == "mode":
        r = torch.rand((1,), generator=generator, dtype=torch.float64)
        u = 1 - r - flow.mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        raise ValueError(f"train.flow.timestep_sampling: unknown {flow.timestep_sampling!r} "
                         f"(known: {', '.join(SAMPLINGS)})")
    sigma = shift_sigmas(u, flow.shift)
    return float(sigma.clamp(1.0 / num_train_timesteps, 1.0))


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * latents + sigma * noise``; latents/noise ``[N, C, h, w]``, sigmas ``[N]``."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer should predict: ``noise - latents`` ``[N, C, h, w]``."""
    return noise - latents


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """``[N]`` per-sample loss weights of ``scheme`` at ``sigmas`` (fp32, like the loss); None for
    ``none``."""
    s = sigmas.float()
    if scheme == "none":
        return None
    if scheme == "sigma_sqrt":
        return s ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    raise ValueError(f"train.flow.weighting: unknown {scheme!r} (known: {', '.join(WEIGHTINGS)})")


def fixed_sigmas(num_sigmas: int) -> torch.Tensor:
    """``[num_sigmas]`` fp32: the midpoints of ``num_sigmas`` equal slices of [0, 1] (validation's
    fixed times, like :func:`raydb.train.evaluate.fixed_timesteps` for the DDPM schedule)."""
    if num_sigmas < 1:
        raise ValueError(f"num_sigmas must be at least 1, got {num_sigmas}")
    return (torch.arange(num_sigmas, dtype=torch.float64) + 0.5).div(num_sigmas).float()
