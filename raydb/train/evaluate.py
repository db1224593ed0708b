"""Validation without sampling: the denoising loss on fixed noise and fixed timesteps.

Training losses are noisy because every step draws fresh noise and timesteps. To compare two
adapters (or an adapter against the base model) we instead score the *same* draws every time: a
generator seeded by ``seed`` fixes the latent sample and the diffusion noise of every image, and
the timesteps are spread evenly over the schedule. The number is then a deterministic function of
the weights, which is what a learning test or a Tune trial's ``val_instance`` / ``val_prior`` needs.

:class:`Validator` bundles the scores a trial reports (and the README's prior-preservation finding,
``raydb.testing.prior_preservation_finding``, measures): the denoising losses of the instance
images and of held-out class images, their weighted sum, and — with ``eval.clip_model`` /
``eval.dino_model`` — CLIP-I / CLIP-T / DINO on a few sampled images, with ``eval.fidelity`` the
judged fidelity figures of sampled images (:mod:`raydb.fidelity.validation`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from raydb.config import RaydbConfig
from raydb.encode.encoders import EncodedImages
from raydb.models.family import FLOW_MATCHING, FLUX
from raydb.models.flux import flux_text_conditioning
from raydb.models.sdxl import sdxl_text_conditioning
from raydb.train.data import MicroBatch, flow_inputs
from raydb.train.flow import fixed_sigmas
from raydb.train.step import denoiser_prediction, denoiser_target

__all__ = ["fixed_timesteps", "denoising_loss", "Validator"]


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
    pooled: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    guidance: float | None = None,
) -> float:
    """Mean fp32 MSE between the denoiser's prediction and its target over fixed (image, t) pairs.

    Every image of ``encoded`` (latent distributions ``[N, C, h, w]``) is scored at each of
    ``num_timesteps`` evenly spaced timesteps (flow matching: sigmas), N * num_timesteps samples in
    all. The latent sample (``mean + std * eps``) and the noise come from
    ``torch.Generator().manual_seed(seed)``, so two calls with the same weights and seed return the
    same number. The prediction and target are the training step's own
    (:func:`raydb.train.step.denoiser_prediction` / ``denoiser_target``); flow-matching samples
    are not weighted (``train.flow.weighting``), so scores compare across weightings.

    Args:
        unet: the (possibly LoRA-adapted) denoiser; evaluated in eval mode, its mode restored after.
        noise_scheduler: the training scheduler (``add_noise``, ``get_velocity``).
        vae: supplies ``config.scaling_factor`` (and ``shift_factor`` if any); never run.
        prompt_embeds: ``[1, L, D]`` (one prompt for all images) or ``[N, L, D]``.
        prediction_type: "epsilon", "v_prediction" or "flow_matching".
        pooled: SDXL / FLUX.1, ``[1, D2p]`` pooled prompt embedding; SDXL's time ids come from
            ``encoded.time_ids``.
        text_ids, guidance: FLUX.1, ``[1, L, 3]`` and the guidance input (distilled models).
    """
    n = len(encoded)
    if prompt_embeds.shape[0] not in (1, n):
        raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows for {n} images")
    flow = prediction_type == FLOW_MATCHING
    g = torch.Generator().manual_seed(seed)
    latent_eps = torch.randn(encoded.mean.shape, generator=g)
    noise = torch.randn((num_timesteps, *encoded.mean.shape), generator=g)  # [T, N, C, h, w]
    steps = (fixed_sigmas(num_timesteps) if flow
             else fixed_timesteps(noise_scheduler.config.num_train_timesteps, num_timesteps))
    shift = vae.config.get("shift_factor")
    latents = encoded.mean + encoded.std * latent_eps
    latents = (latents - shift if shift is not None else latents) * vae.config.scaling_factor

    # Flatten (timestep, image) pairs into one batch axis: row k is image k % N at step k // N.
    total_rows = num_timesteps * n
    rows = {
        "latents": latents.repeat(num_timesteps, 1, 1, 1), "noise": noise.flatten(0, 1),
        "steps": steps.repeat_interleave(n),
        "embeds": prompt_embeds.expand(n, -1, -1).repeat(num_timesteps, 1, 1),
        "pooled": None if pooled is None else pooled.expand(n, -1).repeat(num_timesteps, 1),
        "time_ids": None if encoded.time_ids is None else encoded.time_ids.repeat(num_timesteps, 1),
        "text_ids": None if text_ids is None else text_ids.expand(total_rows, -1, -1),
        "guidance": None if guidance is None else torch.full((total_rows,), float(guidance)),
    }
    if rows["time_ids"] is not None and pooled is None:
        raise ValueError("SDXL validation needs the pooled prompt embedding")

    frozen = next(p for p in unet.parameters() if not p.requires_grad)
    was_training = unet.training
    unet.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, total_rows, batch_size):
            chunk = {k: None if v is None else v[start:start + batch_size].to(frozen.device)
                     for k, v in rows.items()}
            embeds = chunk["embeds"].to(frozen.dtype)
            batch = MicroBatch(
                # latent_eps is unused: the clean latents are passed in already sampled
                latent_mean=None, latent_std=None, pixels=None, latent_eps=chunk["noise"],
                noise=chunk["noise"],
                timesteps=None if flow else chunk["steps"], sigmas=chunk["steps"] if flow else None,
                encoder_hidden_states=embeds, input_ids=None,
                pooled=None if chunk["pooled"] is None else chunk["pooled"].to(frozen.dtype),
                time_ids=chunk["time_ids"], text_ids=chunk["text_ids"], guidance=chunk["guidance"])
            pred = denoiser_prediction(unet, noise_scheduler, batch, chunk["latents"]).float()
            target = denoiser_target(noise_scheduler, batch, chunk["latents"], prediction_type).float()
            total += F.mse_loss(pred, target, reduction="sum").item()
            count += target.numel()
    finally:
        unet.train(was_training)
    return total / count


class Validator:
    """``val_instance`` / ``val_prior`` / ``val_score`` (+ ``val_clip_i`` / ``val_clip_t``, ``val_dino``,
    ``val_fidelity`` and its parts).

    val_instance: denoising MSE of the instance images with the instance prompt (subject fit);
    val_prior: the same on held-out class images with the class prompt (prior kept). Both use the
    same seed in every trial, so ``val_score = val_instance + w * val_prior`` (``w`` =
    ``tune.prior_weight_in_score``) compares trials whatever their ``prior_loss_weight``.

    Args:
        instance / holdout: latent distributions of the instance and held-out class images.
        prompts: ``{"embeds": [2, L, D], "ids": [2, L]}`` for (instance prompt, class prompt)
            (SDXL: also ``"pooled": [2, D2p]`` and ``"ids_2": [2, L]``; FLUX.1: T5 ``embeds``,
            CLIP ``pooled``, ``"text_ids": [2, L, 3]``).
        instance_images: the prepared instance photos; needed only for CLIP-I (``eval.clip_model``),
            DINO (``eval.dino_model``) and the fidelity metrics (``eval.fidelity``).
    """

    def __init__(self, cfg: RaydbConfig, comps: Any, instance: EncodedImages,
                 holdout: EncodedImages | None, prompts: dict[str, torch.Tensor],
                 instance_images: list[Image.Image] | None = None) -> None:
        self.cfg, self.comps = cfg, comps
        self.instance, self.holdout = instance, holdout
        self.embeds, self.prompt_ids = prompts["embeds"], prompts["ids"]
        self.pooled, self.prompt_ids_2 = prompts.get("pooled"), prompts.get("ids_2")
        self.text_ids = prompts.get("text_ids")  # FLUX.1
        self.guidance = flow_inputs(cfg.train, comps).get("guidance")
        self.weight = cfg.tune.prior_weight_in_score if cfg.tune else 1.0
        self.clip = self.dino = self.fidelity = None
        self.instance_images = instance_images
        for key, score in (("clip_model", "CLIP-I"), ("dino_model", "DINO")):
            if getattr(cfg.eval, key) and instance_images is None:
                raise ValueError(f"eval.{key}: {score} needs the instance images")
        if cfg.eval.fidelity == "digits":
            from raydb.fidelity.validation import DigitsFidelity

            if instance_images is None:
                raise ValueError("eval.fidelity: the fidelity metrics need the instance images")
            self.fidelity = DigitsFidelity(cfg, instance_images)
        if cfg.eval.clip_model:
            from raydb.train.clip_eval import load_clip

            self.clip = load_clip(cfg.eval.clip_model)
        if cfg.eval.dino_model:
            from raydb.fidelity.dino import load_dino

            self.dino = load_dino(cfg.eval.dino_model)

    @classmethod
    def from_cache(cls, cfg: RaydbConfig, comps: Any, storage: Any, cache: Any) -> Validator:
        """A validator over the encode stage's cache (an ``EncodedCache`` with held-out images)."""
        from raydb.encode.cache import load_prompts, read_encoded

        images = None
        if cfg.eval.samples_images:
            from raydb.encode.inputs import subject_photos

            images = subject_photos(cfg, storage).images
        holdout = read_encoded(storage, cache.holdout_uri) if cache.num_holdout else None
        return cls(cfg, comps, read_encoded(storage, cache.instance_uri), holdout,
                   load_prompts(storage, cache), images)

    def __call__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                 text_encoder_2: torch.nn.Module | None = None) -> dict[str, float]:
        """Scores ``unet``; with ``text_encoder`` (its LoRA trains; SDXL: and ``text_encoder_2``)
        the prompts are re-encoded by it, so validation sees the conditioning the adapter will be
        served with."""
        embeds, pooled = self.embeds, self.pooled
        encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        if encoders:
            modes = [e.training for e in encoders]
            for e in encoders:
                e.eval()
            with torch.no_grad():
                device = next(text_encoder.parameters()).device
                if self.comps.family == FLUX:  # only CLIP trains: its pooled output changes
                    _, pooled = flux_text_conditioning((text_encoder, None), (self.prompt_ids, None))
                    pooled = pooled.float().cpu()
                elif text_encoder_2 is not None:
                    embeds, pooled = (t.float().cpu() for t in sdxl_text_conditioning(
                        encoders, (self.prompt_ids, self.prompt_ids_2)))
                else:
                    embeds = text_encoder(self.prompt_ids.to(device))[0].float().cpu()
            for e, mode in zip(encoders, modes, strict=True):
                e.train(mode)

        def loss(encoded: EncodedImages, half: int) -> float:
            return denoising_loss(
                unet, self.comps.noise_scheduler, self.comps.vae, encoded, embeds[half:half + 1],
                prediction_type=self.comps.prediction_type, seed=self.cfg.train.seed + 7919,
                pooled=None if pooled is None else pooled[half:half + 1],
                text_ids=None if self.text_ids is None else self.text_ids[half:half + 1],
                guidance=self.guidance)

        out = {"val_instance": loss(self.instance, 0)}
        if self.holdout is not None:
            out["val_prior"] = loss(self.holdout, 1)
        out["val_score"] = out["val_instance"] + self.weight * out.get("val_prior", 0.0)
        if self.clip is not None:
            from raydb.train.clip_eval import sample_clip_metrics

            clip = sample_clip_metrics(self.cfg, self.comps, unet, self.instance_images, *self.clip)
            out |= {"val_clip_i": clip["clip_i"], "val_clip_t": clip["clip_t"]}
        if self.dino is not None:  # the same seeds as CLIP's samples, so the same images
            from raydb.fidelity.dino import dino_score
            from raydb.train.clip_eval import sample_instance_images

            images = sample_instance_images(self.cfg, self.comps, unet)
            out["val_dino"] = dino_score(self.dino, images, self.instance_images)
        if self.fidelity is not None:
            out |= self.fidelity(self.comps, unet)
        return out
