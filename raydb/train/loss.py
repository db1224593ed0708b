"""The DreamBooth dual objective as pure tensor functions (see shared/seeds: prior preservation).

A batch is laid out ``[instance | class]`` along dim 0; the UNet prediction and the target are split
with ``torch.chunk(·, 2, dim=0)`` so both halves share one forward pass:

    loss = mse(instance) + prior_loss_weight * mse(prior)

Without prior preservation the batch is instance-only and ``loss = mse(instance)``. Flow matching
may weight each sample's squared error (``weighting`` ``[N]``, from its own sigma); the weights are
chunked with the prediction and the target, so each half is weighted by its own samples' weights —
what diffusers' Flux/SD3 DreamBooth scripts got wrong until 2026-05 (PR #13743: one unsplit
``weighting`` paired the first half's weights with both halves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raydb.models.family import FLOW_MATCHING

__all__ = ["LossParts", "dreambooth_loss", "training_target", "PREDICTION_TYPES", "FLOW_MATCHING"]

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
    weighting: torch.Tensor | None = None,
) -> LossParts:
    """Dual-objective loss.

    Args:
        model_pred, target: ``[2B, C, h, w]`` laid out ``[instance | class]`` when ``with_prior``,
            else ``[B, C, h, w]`` of instance samples only.
        weighting: ``[2B]`` / ``[B]`` per-sample weights (flow matching), same layout; None: all 1.
            A half's loss is then ``mean_i(w_i * mean(err_i^2))`` over its own samples.
    Returns:
        LossParts with scalar fp32 tensors; ``prior`` is None without prior preservation.
    """
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(model_pred.shape)} and target {tuple(target.shape)} differ")
    if weighting is not None and weighting.shape != model_pred.shape[:1]:
        raise ValueError(f"weighting {tuple(weighting.shape)} must have one weight per sample "
                         f"({model_pred.shape[0]})")
    pred, tgt = model_pred.float(), target.float()  # MSE in fp32 even under autocast
    w = None if weighting is None else weighting.float()
    if not with_prior:
        instance = _mse(pred, tgt, w)
        return LossParts(total=instance, instance=instance, prior=None)
    if pred.shape[0] % 2:
        raise ValueError(f"a prior-preservation batch needs an even size, got {pred.shape[0]}")
    pred_instance, pred_prior = torch.chunk(pred, 2, dim=0)
    tgt_instance, tgt_prior = torch.chunk(tgt, 2, dim=0)
    w_instance, w_prior = torch.chunk(w, 2, dim=0) if w is not None else (None, None)
    instance = _mse(pred_instance, tgt_instance, w_instance)
    prior = _mse(pred_prior, tgt_prior, w_prior)
    return LossParts(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)


def _mse(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error; with ``weighting`` ``[n]`` each sample's squared errors are scaled by its
    weight (samples have equal sizes, so this is the mean over samples of weighted per-sample MSEs)."""
    if weighting is None:
        return F.mse_loss(pred, target, reduction="mean")
    squared = F.mse_loss(pred, target, reduction="none")
    return (weighting.reshape(-1, *([1] * (squared.ndim - 1))) * squared).mean()


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
