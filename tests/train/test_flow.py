"""Flow matching (FLUX.1's objective): sigma sampling and weighting, and the dual loss of a prior-
preservation batch computed the way it must be — each half with only its own samples' noise,
sigma, loss weight, prompt and guidance.

The reference is written out sample by sample (one transformer call per sample, in float64), so a
weighting that is not chunked with its half (diffusers' Flux/SD3 scripts before PR #13743), a
sigma drawn from the wrong stream or one sample's conditioning reaching another would all show.
"""

from __future__ import annotations

import math

import pytest
import torch

from raydb.config import FlowConfig
from raydb.encode.encoders import EncodedImages
from raydb.models.family import FLOW_MATCHING
from raydb.models.flux import flux_velocity
from raydb.train.data import make_micro_batch, training_data
from raydb.train.flow import draw_sigma, loss_weighting, shift_sigmas
from raydb.train.step import forward_loss

# -- sampling and weighting ------------------------------------------------------------------------


def _draws(flow: FlowConfig, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.tensor([draw_sigma(flow, g, 1000) for _ in range(n)], dtype=torch.float64)


def test_sigma_densities():
    uniform = _draws(FlowConfig(timestep_sampling="uniform"))
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.var() - 1 / 12) < 0.005
    logit = _draws(FlowConfig(timestep_sampling="logit_normal"))
    # sigmoid(N(0, 1)): median 1/2, and far more mass in the middle than uniform's
    assert abs(logit.median() - 0.5) < 0.03
    assert ((logit - 0.5).abs() < 0.25).float().mean() > 0.7 > ((uniform - 0.5).abs() < 0.25).float().mean()
    shifted = _draws(FlowConfig(timestep_sampling="logit_normal", logit_mean=1.0))
    assert shifted.median() > 0.65  # sigmoid(1) = 0.73: toward noise
    # mode sampling with scale 0 is uniform sampling (SD3's formula mirrors the draw: 1 - u)
    torch.testing.assert_close(_draws(FlowConfig(timestep_sampling="mode", mode_scale=0.0), 200),
                               1 - _draws(FlowConfig(timestep_sampling="uniform"), 200), rtol=0, atol=1e-12)
    mode = _draws(FlowConfig(timestep_sampling="mode", mode_scale=1.29))
    assert ((mode - 0.5).abs() < 0.25).float().mean() > 0.55  # heavier in the middle than uniform
    for draws in (uniform, logit, mode):
        assert draws.min() >= 1e-3 and draws.max() <= 1.0


def test_shift_and_weightings():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert torch.equal(shift_sigmas(s, 1.0), s)
    shifted = _draws(FlowConfig(timestep_sampling="uniform", shift=3.0), 400)
    assert torch.allclose(shifted, shift_sigmas(_draws(FlowConfig(timestep_sampling="uniform"), 400), 3.0)
                          .clamp(1e-3, 1), atol=1e-6)
    half = torch.tensor([0.5, 0.25])
    assert loss_weighting("none", half) is None
    assert torch.allclose(loss_weighting("sigma_sqrt", half), torch.tensor([4.0, 16.0]))
    assert torch.allclose(loss_weighting("cosmap", half),
                          torch.tensor([4 / math.pi, 2 / (math.pi * (1 - 0.5 + 0.125))]))
    with pytest.raises(ValueError, match="train.flow.weighting"):
        loss_weighting("snr", half)


# -- the dual loss of a flow-matching prior batch, against a per-sample reference ------------------


@pytest.fixture(scope="module")
def flux_f64(tiny_flux_dir):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    transformer.requires_grad_(False).to(torch.float64).eval()
    vae = AutoencoderKL.from_pretrained(tiny_flux_dir, subfolder="vae")
    return transformer, vae


def _data(flow: FlowConfig):
    """Instance images 0-2, class images 3-5 (latents differ per image), two prompts whose
    T5 states and pooled embeddings differ, guidance 1.0 (FLUX.1-dev is guidance-distilled)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 16, 4, 4, generator=g, dtype=torch.float64)
    std = torch.rand(6, 16, 4, 4, generator=g, dtype=torch.float64) * 0.1
    embeds = torch.randn(2, 7, 48, generator=g, dtype=torch.float64)
    pooled = torch.randn(2, 32, generator=g, dtype=torch.float64)
    return training_data(
        EncodedImages(mean[:3], std[:3]), EncodedImages(mean[3:], std[3:]), embeds,
        torch.zeros(2, 77, dtype=torch.long), prompt_pooled=pooled,
        prompt_ids_2=torch.zeros(2, 7, dtype=torch.long), prompt_text_ids=torch.zeros(2, 7, 3), flow=flow,
        guidance=1.0)


def _reference(transformer, vae, data, batch, *, prior_loss_weight, weights):
    """Sample by sample: latents of its image, its own noise and sigma, its half's prompt."""
    losses = []
    for i in range(batch.size):
        half = "instance" if i < batch.size // 2 else "class"
        latents = batch.latent_mean[i] + batch.latent_std[i] * batch.latent_eps[i]
        latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor)[None]
        noise, sigma = batch.noise[i][None], batch.sigmas[i:i + 1]
        noisy = (1 - sigma.double()) * latents + sigma.double() * noise
        pred = flux_velocity(transformer, noisy, sigma, t5_states=getattr(data, f"{half}_embeds"),
                             pooled=getattr(data, f"{half}_pooled"), text_ids=torch.zeros(7, 3),
                             guidance=torch.ones(1))
        losses.append(weights[i] * ((pred - (noise - latents)) ** 2).mean())
    k = batch.size // 2
    instance, prior = sum(losses[:k]) / k, sum(losses[k:]) / k
    return instance, prior, instance + prior_loss_weight * prior


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_prior_loss_with_weighting_equals_the_per_sample_reference(flux_f64, weighting):
    transformer, vae = flux_f64
    flow = FlowConfig(timestep_sampling="logit_normal", weighting=weighting)
    data = _data(flow)
    batch = make_micro_batch(data, step=3, micro=0, batch_size=2, accumulation=1, seed=0,
                             num_train_timesteps=1000)
    assert batch.size == 4 and batch.timesteps is None and batch.sigmas.dtype == torch.float32
    assert torch.equal(batch.guidance, torch.ones(4)) and batch.text_ids.shape == (4, 7, 3)
    # each half draws from its own stream: the instance half is what an instance-only batch draws
    alone = make_micro_batch(training_data(data.instance, None, torch.cat([data.instance_embeds] * 2),
                                           torch.zeros(2, 77, dtype=torch.long), flow=flow, guidance=1.0),
                             step=3, micro=0, batch_size=2, accumulation=1, seed=0, num_train_timesteps=1000)
    assert torch.equal(alone.sigmas, batch.sigmas[:2]) and torch.equal(alone.noise, batch.noise[:2])
    sigmas = batch.sigmas.double()
    assert (sigmas[:2] - sigmas[2:]).abs().min() > 0.01  # the halves' weights really differ

    parts = forward_loss(transformer, None, batch, prediction_type=FLOW_MATCHING, prior_loss_weight=0.7,
                         with_prior=True, vae=vae, loss_weighting=weighting)
    weights = loss_weighting(weighting, sigmas).double()
    instance, prior, total = _reference(transformer, vae, data, batch, prior_loss_weight=0.7, weights=weights)
    # the transformer runs in float64; the loss is reduced in fp32 by design (dreambooth_loss), so
    # the two agree to fp32 rounding — a thousand times finer than what a wrong weighting moves
    for got, want in ((parts.instance, instance), (parts.prior, prior), (parts.total, total)):
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # the halves' weights swapped, or the first half's weights on both halves (the old bug): wrong
    swapped = torch.cat([weights[2:], weights[:2]])
    unsplit = torch.cat([weights[:2], weights[:2]])
    for wrong in (swapped, unsplit):
        _, _, bad = _reference(transformer, vae, data, batch, prior_loss_weight=0.7, weights=wrong)
        assert parts.total.item() != pytest.approx(bad.item(), rel=1e-3)
