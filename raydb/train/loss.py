"""The DreamBooth dual objective as pure tensor functions (see shared/seeds: prior preservation).

A batch is laid out ``[instance | class]`` along dim 0; the UNet prediction and the target are split
with ``torch.chunk(·, 2, dim=0)`` so both halves share one forward pass:

    loss = mse(instance) + prior_loss_weight * mse(prior)

Without prior preservation the batch is instance-only and ``loss = mse(instance)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossParts", "dreambooth_loss", "training_target", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class LossParts:
    """``total`` is what backward() sees; the parts are for logging (detached by the caller)."""

    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    prior_loss_weight: float,
    with_prior: bool,
) -> LossParts:
    """Dual-objective loss.

    Args:
        model_pred, target: ``[2B, C, h, w]`` laid out ``[instance | class]`` when ``with_prior``,
            else ``[B, C, h, w]`` of instance samples only.
    Returns:
        LossParts with scalar fp32 tensors; ``prior`` is None without prior preservation.
    """
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(model_pred.shape)} and target {tuple(target.shape)} differ")
    pred, tgt = model_pred.float(), target.float()  # MSE in fp32 even under autocast
    if not with_prior:
        instance = F.mse_loss(pred, tgt, reduction="mean")
        return LossParts(total=instance, instance=instance, prior=None)
    if pred.shape[0] % 2:
        raise ValueError(f"a prior-preservation batch needs an even size, got {pred.shape[0]}")
    pred_instance, pred_prior = torch.chunk(pred, 2, dim=0)
    tgt_instance, tgt_prior = torch.chunk(tgt, 2, dim=0)
    instance = F.mse_loss(pred_instance, tgt_instance, reduction="mean")
    prior = F.mse_loss(pred_prior, tgt_prior, reduction="mean")
    return LossParts(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)


def training_target(
    noise_scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction).

    ``v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents`` via the scheduler.
    Shapes: latents, noise ``[N, C, h, w]``; timesteps ``[N]`` (long).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
