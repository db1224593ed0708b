"""The training step: encode (or sample cached latents) -> noise -> predict -> dual loss -> update.

``forward_loss`` is one micro-batch's forward pass and loss; ``optimizer_step`` accumulates
``gradient_accumulation_steps`` micro-batches, clips, steps AdamW and the lr schedule. Both are
plain PyTorch: the single-process trainer, Ray Train workers, Tune trials and the GPU benchmark all
call these same two functions.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from raydb.config import RaydbConfig, TrainConfig
from raydb.models.family import FLOW_MATCHING
from raydb.models.flux import flux_text_conditioning, flux_velocity
from raydb.models.sdxl import sdxl_text_conditioning, unet_added_conditions
from raydb.train.data import MicroBatch
from raydb.train.flow import loss_weighting as loss_weighting_for
from raydb.train.flow import noisy_latents, velocity_target
from raydb.train.lora import add_lora
from raydb.train.loss import LossParts, dreambooth_loss, training_target
from raydb.train.prior_target import prior_half_target, without_ddp

__all__ = ["TrainState", "build_train_state", "forward_loss", "denoiser_prediction", "denoiser_target",
           "optimizer_step", "autocast_dtype", "weights_dtype", "sample_latents"]

_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    return _DTYPES[mixed_precision]


def weights_dtype(tc: TrainConfig, device: torch.device | str = "cpu") -> torch.dtype:
    """Dtype the frozen base weights are loaded in for training on ``device``: the autocast dtype
    under mixed precision (``auto`` resolved for that device), else ``train.dtype`` (float32, or
    float64 for exactness checks)."""
    from raydb.train.device_options import resolve_mixed_precision

    return autocast_dtype(resolve_mixed_precision(tc, device)) or getattr(torch, tc.dtype)


@dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    unet: torch.nn.Module  # the denoiser with LoRA: the UNet, or FLUX.1's transformer
    text_encoder: torch.nn.Module | None  # set only when its LoRA trains (FLUX.1: CLIP)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    model: torch.nn.Module | None = None  # what the step calls: the denoiser, or its compiled wrapper
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second encoder, set when its LoRA trains


def build_train_state(
    cfg: RaydbConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
    text_encoder_2: torch.nn.Module | None = None,
) -> TrainState:
    """Add LoRA, apply the speed options, build AdamW over the LoRA parameters and the lr schedule.

    LoRA init is seeded by ``train.seed`` so every worker (and every rerun) starts identical.
    ``state.model`` is what the step calls: the UNet, or its compiled wrapper (``train.compile``).
    """
    from diffusers.optimization import get_scheduler

    from raydb.train.device_options import (
        compile_for_training,
        prepare_unet,
        resolve_mixed_precision,
        use_fused_adam,
    )

    torch.manual_seed(cfg.train.seed)
    params = add_lora(unet, cfg.lora, text_encoder, text_encoder_2)
    # load_components leaves everything in eval mode; LoRA dropout only acts in train mode.
    unet.train()
    encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
    if cfg.lora.train_text_encoder:
        for encoder in encoders:
            encoder.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    tc = cfg.train
    prepare_unet(tc, unet)
    fused = use_fused_adam(tc, params)
    optimizer = torch.optim.AdamW(
        params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
        weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon,
        # foreach=None picks the multi-tensor path where the device has it
        fused=fused or None, foreach=False if fused else None,
    )
    lr_scheduler = get_scheduler(
        tc.lr_scheduler, optimizer=optimizer, num_warmup_steps=tc.lr_warmup_steps,
        num_training_steps=tc.max_steps,
    )
    device_type = params[0].device.type
    fp16 = resolve_mixed_precision(tc, params[0].device) == "fp16"
    scaler = torch.amp.GradScaler(device_type) if fp16 else None
    trains_te = cfg.lora.train_text_encoder
    return TrainState(unet, text_encoder if trains_te else None, params,
                      optimizer, lr_scheduler, scaler, model=compile_for_training(tc, unet),
                      text_encoder_2=text_encoder_2 if trains_te else None)


def sample_latents(batch: MicroBatch, vae, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """``latent_dist.sample() * scaling_factor`` — from cached mean/std, or by running the VAE."""
    if batch.pixels is not None:
        param = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(batch.pixels.to(param.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    else:
        mean, std = batch.latent_mean, batch.latent_std
    latents = mean + std * batch.latent_eps
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def denoiser_prediction(
    model: torch.nn.Module, noise_scheduler, batch: MicroBatch, latents: torch.Tensor, *,
    text_encoder: torch.nn.Module | None = None, text_encoder_2: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The denoiser's prediction ``[N, C, h, w]`` for ``batch``'s noised ``latents`` (call it under
    the step's autocast).

    Diffusion (SD/SDXL, ``batch.timesteps``): ``add_noise`` on the DDPM schedule, then the UNet on
    the text states (SDXL: plus the pooled embedding and size/crop time ids); its text
    conditioning comes from the trained encoder(s) when ``batch.input_ids`` must be encoded.
    Flow matching (FLUX.1, ``batch.sigmas``): ``(1 - s) x + s n``, then the transformer on packed
    latents with T5 states, CLIP's pooled output (from the trained CLIP when ``batch.pooled`` is
    None), text ids and, for guidance-distilled models, ``batch.guidance``.
    """
    if batch.sigmas is not None:
        noisy = noisy_latents(latents, batch.noise, batch.sigmas)
        pooled = batch.pooled
        if pooled is None:
            _, pooled = flux_text_conditioning((text_encoder, None), (batch.input_ids, None))
        return flux_velocity(model, noisy, batch.sigmas, t5_states=batch.encoder_hidden_states,
                             pooled=pooled, text_ids=batch.text_ids, guidance=batch.guidance)
    noisy = noise_scheduler.add_noise(latents, batch.noise, batch.timesteps)
    pooled = batch.pooled
    if batch.encoder_hidden_states is not None:
        cond = batch.encoder_hidden_states
    elif batch.time_ids is not None:
        cond, pooled = sdxl_text_conditioning((text_encoder, text_encoder_2),
                                              (batch.input_ids, batch.input_ids_2))
    else:
        cond = text_encoder(batch.input_ids)[0]
    unet_dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    added = None
    if batch.time_ids is not None:
        added = unet_added_conditions(pooled.to(unet_dtype), batch.time_ids.to(unet_dtype))
    return model(noisy.to(unet_dtype), batch.timesteps, cond.to(unet_dtype), added_cond_kwargs=added).sample


def denoiser_target(
    noise_scheduler, batch: MicroBatch, latents: torch.Tensor, prediction_type: str,
) -> torch.Tensor:
    """What the denoiser should predict for every sample, ``[instance | class]``: the noise or the
    velocity on the DDPM schedule, or the flow velocity ``noise - latents``.

    This is the one place a batch's targets are made, so it is where ``prior.mode: model`` plugs
    in: that mode replaces the class half with the frozen base's own prediction (LoRA disabled,
    :func:`denoiser_prediction` on the same inputs).
    """
    if batch.sigmas is not None:
        if prediction_type != FLOW_MATCHING:
            raise ValueError(f"a flow-matching batch (sigmas) needs prediction_type {FLOW_MATCHING!r}, "
                             f"got {prediction_type!r}")
        return velocity_target(latents, batch.noise)
    return training_target(noise_scheduler, latents, batch.noise, batch.timesteps, prediction_type)


def forward_loss(
    unet: torch.nn.Module,
    noise_scheduler,
    batch: MicroBatch,
    *,
    prediction_type: str,
    prior_loss_weight: float,
    with_prior: bool,
    vae,
    text_encoder: torch.nn.Module | None = None,
    mixed_precision: str = "no",
    autocast_cache: bool = True,
    text_encoder_2: torch.nn.Module | None = None,
    loss_weighting: str = "none",
    prior_mode: str = "images",
) -> LossParts:
    """One micro-batch: latents -> noised -> denoiser -> target -> dual loss (fp32).

    ``unet`` is the denoiser (the UNet, or FLUX.1's transformer). ``vae`` supplies
    ``scaling_factor`` (and ``shift_factor``; it encodes ``batch.pixels`` on the uncached path).
    ``mixed_precision`` is resolved (``no``/``fp16``/``bf16``); ``autocast_cache=False`` inside a
    CUDA graph capture, where autocast's cache of cast weights must not outlive the capture.
    ``loss_weighting`` (``train.flow.weighting``) weights flow-matching samples by their sigma;
    the weights are chunked into halves with the prediction and the target. ``prior_mode``
    (``prior.mode``) sets the prior half's target (``prior_target.py``): in model mode a
    gradient-free :func:`denoiser_prediction` of the prior rows with every LoRA layer off runs
    first, for every family (the UNet's or FLUX.1's transformer's own prediction).
    """
    latents = sample_latents(batch, vae, vae.config.scaling_factor, vae.config.get("shift_factor"))
    target = denoiser_target(noise_scheduler, batch, latents, prediction_type)
    dtype = autocast_dtype(mixed_precision)
    ctx = (torch.autocast(latents.device.type, dtype=dtype, cache_enabled=autocast_cache) if dtype
           else contextlib.nullcontext())
    with ctx:
        if with_prior:
            base = without_ddp(unet)
            target = prior_half_target(
                prior_mode, target,
                lambda rows: denoiser_prediction(base, noise_scheduler, batch.rows(rows), latents[rows],
                                                 text_encoder=text_encoder, text_encoder_2=text_encoder_2),
                (base, text_encoder, text_encoder_2))
        pred = denoiser_prediction(unet, noise_scheduler, batch, latents, text_encoder=text_encoder,
                                   text_encoder_2=text_encoder_2)
    weighting = loss_weighting_for(loss_weighting, batch.sigmas) if batch.sigmas is not None else None
    return dreambooth_loss(pred, target, prior_loss_weight=prior_loss_weight, with_prior=with_prior,
                           weighting=weighting)


def _average_encoder_grads(state: TrainState) -> None:
    """Under DDP, average the trained text encoders' LoRA gradients over the workers.

    DDP wraps only the denoiser, so without this each worker would step its encoder LoRA on its own
    shard's gradient and the workers' encoders would drift apart. One all-reduce of the
    concatenated gradients, after the last micro-batch (as DDP does for the denoiser)."""
    import torch.distributed as dist

    grads = [p.grad for e in (state.text_encoder, state.text_encoder_2) if e is not None
             for p in e.parameters() if p.requires_grad and p.grad is not None]
    if not grads or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm over all gradients as a 0-d tensor (no host sync; one multi-tensor kernel)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads).float()


def optimizer_step(
    state: TrainState,
    micro_batches: list[MicroBatch],
    *,
    cfg: RaydbConfig,
    noise_scheduler,
    prediction_type: str,
    with_prior: bool,
    vae,
    model: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Accumulate the micro-batches, clip, step. Returns the step's metrics.

    ``model`` is the UNet to call (a DDP wrapper under Ray Train; its ``no_sync`` skips the
    gradient all-reduce on every micro-batch but the last). Losses are averaged over micro-batches
    so k micro-batches of size b update exactly like one batch of size k*b. ``grad_norm`` is the
    norm before clipping, ``grad_norm_clipped`` the norm of the gradient actually applied.
    """
    from raydb.train.device_options import resolve_mixed_precision

    model = model if model is not None else (state.model if state.model is not None else state.unet)
    mixed_precision = resolve_mixed_precision(cfg.train, state.params[0].device)
    n = len(micro_batches)
    start = time.perf_counter()
    # loss parts stay on the device until the end of the step: one host sync per step, not three
    # per micro-batch (a sync stalls the host, which is what limits small steps on a large GPU)
    sums: torch.Tensor | None = None
    images = 0
    for i, batch in enumerate(micro_batches):
        sync = not hasattr(model, "no_sync") or i == n - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            parts = forward_loss(
                model, noise_scheduler, batch, prediction_type=prediction_type,
                prior_loss_weight=cfg.train.prior_loss_weight, with_prior=with_prior, vae=vae,
                text_encoder=state.text_encoder, mixed_precision=mixed_precision,
                text_encoder_2=state.text_encoder_2, loss_weighting=cfg.train.flow.weighting,
                prior_mode=cfg.prior.mode,
            )
            loss = parts.total / n
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        prior = parts.prior if parts.prior is not None else torch.zeros_like(parts.total)
        step_parts = torch.stack([parts.total, parts.instance, prior]).detach().float() / n
        sums = step_parts if sums is None else sums + step_parts
        images += batch.size
    if hasattr(model, "no_sync"):
        _average_encoder_grads(state)
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, cfg.train.max_grad_norm)
    grad_norm_clipped = _grad_norm(state.params).to(grad_norm.device)
    lr = state.optimizer.param_groups[0]["lr"]
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    values = torch.cat([sums.to(grad_norm.device), grad_norm.float().reshape(1),
                        grad_norm_clipped.reshape(1)]).tolist()  # the step's one sync
    if grad_norm.device.type == "cuda":
        torch.cuda.synchronize()  # the optimizer's kernels belong to this step's time
    seconds = time.perf_counter() - start
    totals = dict(zip(("loss", "loss_instance", "loss_prior", "grad_norm", "grad_norm_clipped"),
                      values, strict=True))
    return {"step": state.step, **totals, "lr": lr,
            "images": images, "seconds": seconds, "images_per_s": images / seconds}
