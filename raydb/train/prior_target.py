"""The prior half's target, per ``prior.mode``: the step's one seam between the two modes.

A micro-batch is ``[instance | prior]`` along dim 0 and ``training_target`` gives the denoising
target of every row (the noise, or the velocity). What the prior half should be pulled towards is
where the modes differ:

* ``images`` — DreamBooth's prior preservation: the prior rows are class images the base model
  generated beforehand, and their target is their own noise (or velocity), like the instance rows.
* ``model`` — the prior rows are the same noisy latents under the class prompt (see ``data.py``),
  and their target is what the frozen base model predicts for them: the UNet (and any trained text
  encoder) with every LoRA layer off, under ``no_grad``. The adapter is held to the base model's
  own output instead of to samples of it, so no class images are generated or read — the trick of
  ai-toolkit's ``diff_output_preservation``, kohya's DOP and OneTrainer's prior prediction.

Either way the loss keeps its dual form ``mse(instance) + λ·mse(prior)`` over the same chunked
batch, so accumulation, clipping, DDP, resume and the CUDA-graph step need nothing new. A family
whose step forms its prediction differently (flow matching) passes its own ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from raydb.train.lora import lora_disabled

__all__ = ["PRIOR_MODES", "prior_half_target", "without_ddp"]

PRIOR_MODES = ("images", "model")


def without_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run a local, gradient-free forward on: ``model`` itself, or the module
    inside a DDP wrapper (compiled or not) — the frozen base pass must not take part in DDP's
    collectives, and has no gradient to synchronise."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)
    return inner.module if isinstance(inner, DistributedDataParallel) else model


def prior_half_target(
    prior_mode: str,
    target: torch.Tensor,
    predict: Callable[[slice], torch.Tensor],
    modules: Sequence[torch.nn.Module | None],
) -> torch.Tensor:
    """The ``[instance | prior]`` target with its prior half set by ``prior_mode``.

    Args:
        target: ``[2B, C, h, w]`` denoising targets of all rows, ``[instance | prior]``.
        predict: ``predict(rows)`` -> the model's prediction ``[len(rows), C, h, w]`` for the batch
            rows ``rows`` (a slice), computing its own conditioning; called once, for the prior
            rows, with every LoRA layer of ``modules`` off and no gradient. Call this before the
            LoRA-enabled forward of the same step (peft flips the LoRA weights' ``requires_grad``
            while they are off; it is restored on return).
        modules: the modules carrying LoRA layers (UNet, trained text encoders; None skipped).
    Returns:
        ``target`` itself in image mode; in model mode a new ``[2B, C, h, w]`` tensor, the first
        half ``target``'s, the second the base model's prediction (detached, ``target``'s dtype).
    """
    if prior_mode == "images":
        return target
    if prior_mode != "model":
        raise ValueError(f"prior.mode: unknown mode {prior_mode!r}; expected one of {PRIOR_MODES}")
    if target.shape[0] % 2:
        raise ValueError(f"a prior-preservation batch needs an even size, got {target.shape[0]}")
    half = target.shape[0] // 2
    with torch.no_grad(), lora_disabled(*modules):
        base = predict(slice(half, None))
    return torch.cat([target[:half], base.to(target.dtype)])
