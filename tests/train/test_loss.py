"""The dual loss and the training target against hand-computed values (no model, no Ray)."""

from __future__ import annotations

import re

import pytest
import torch

from raydb.train.loss import dreambooth_loss, training_target


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    """[instance | class] batch of 2 with errors chosen so both MSEs are easy to do by hand.

    Instance row: prediction 1 everywhere against target 0 -> squared error 1 -> MSE 1.
    Class row: prediction 0, target 2 on half the entries, 0 elsewhere -> MSE (4 * 2) / 4 = 2.
    """
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    pred[0] = 1.0
    target[1, 0, 0, :] = 2.0
    return pred, target


def test_parts_and_weighting():
    pred, target = _pair()
    parts = dreambooth_loss(pred, target, prior_loss_weight=0.5, with_prior=True)
    assert parts.instance.item() == pytest.approx(1.0)
    assert parts.prior.item() == pytest.approx(2.0)
    assert parts.total.item() == pytest.approx(1.0 + 0.5 * 2.0)
    for value in (parts.total, parts.instance, parts.prior):
        assert value.dtype == torch.float32 and value.dim() == 0


def test_zero_weight_is_instance_loss():
    pred, target = _pair()
    parts = dreambooth_loss(pred, target, prior_loss_weight=0.0, with_prior=True)
    assert parts.total.item() == pytest.approx(parts.instance.item()) == pytest.approx(1.0)
    assert parts.prior.item() == pytest.approx(2.0)  # still reported for logging


def test_instance_half_comes_first():
    pred, target = _pair()
    swapped = dreambooth_loss(pred.flip(0), target.flip(0), prior_loss_weight=1.0, with_prior=True)
    assert swapped.instance.item() == pytest.approx(2.0)
    assert swapped.prior.item() == pytest.approx(1.0)


def test_chunk_order_with_larger_batch():
    # [i0, i1 | c0, c1]: only instance rows carry error, so the prior part must be exactly zero.
    pred = torch.zeros(4, 2, 2, 2)
    pred[:2] = 3.0
    parts = dreambooth_loss(pred, torch.zeros_like(pred), prior_loss_weight=1.0, with_prior=True)
    assert parts.instance.item() == pytest.approx(9.0)
    assert parts.prior.item() == 0.0


def test_no_prior_mode_is_plain_mse():
    pred, target = _pair()
    parts = dreambooth_loss(pred, target, prior_loss_weight=1.0, with_prior=False)
    # Whole batch: squared errors 4 * 1 (instance row) + 2 * 4 (class row) over 8 entries.
    assert parts.instance.item() == pytest.approx((4 * 1 + 2 * 4) / 8)
    assert parts.total is parts.instance
    assert parts.prior is None
    odd = dreambooth_loss(pred[:1], target[:1], prior_loss_weight=1.0, with_prior=False)
    assert odd.total.item() == pytest.approx(1.0)  # odd batches are fine without prior


def test_mse_in_fp32_for_bf16_inputs():
    # Errors 256 and 1 are exact in bf16; their mean square (65536 + 1) / 2 = 32768.5 is exact in
    # fp32 but not in bf16 (its spacing near 2**15 is 256), so a bf16 reduction would say 32768.
    pred = torch.tensor([256.0, 1.0], dtype=torch.bfloat16).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    target = torch.zeros_like(pred)
    parts = dreambooth_loss(pred, target, prior_loss_weight=1.0, with_prior=True)
    assert parts.total.dtype == torch.float32
    assert parts.instance.item() == 32768.5
    assert parts.prior.item() == 32768.5
    assert parts.total.item() == 65537.0
    assert (pred - target).pow(2).mean().item() != 32768.5  # what bf16 math would have given


def test_gradient_flows_to_prediction():
    pred, target = _pair()
    pred.requires_grad_(True)
    parts = dreambooth_loss(pred, target, prior_loss_weight=0.5, with_prior=True)
    parts.total.backward()
    # d/dpred of mean((pred - target)^2) over the 4 entries of a half is 2 (pred - target) / 4.
    assert torch.allclose(pred.grad[0], torch.full((1, 2, 2), 2 * 1.0 / 4))
    assert torch.allclose(pred.grad[1], 0.5 * 2 * (pred[1] - target[1]).detach() / 4)


def test_odd_batch_with_prior_raises():
    pred = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="even"):
        dreambooth_loss(pred, pred.clone(), prior_loss_weight=1.0, with_prior=True)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="differ"):
        dreambooth_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 4),
                        prior_loss_weight=1.0, with_prior=True)


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000)


def test_v_prediction_target_by_hand(scheduler):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g)
    noise = torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 499, 999])
    v = training_target(scheduler, x0, noise, t, "v_prediction")
    for i, step in enumerate(t.tolist()):
        alpha_bar = scheduler.alphas_cumprod[step].item()
        by_hand = alpha_bar**0.5 * noise[i] - (1 - alpha_bar) ** 0.5 * x0[i]
        assert torch.allclose(v[i], by_hand, atol=1e-6)
    # Near t=0 the velocity is almost the noise; at t=T-1 it is dominated by -x0.
    assert scheduler.alphas_cumprod[0] > 0.99 and scheduler.alphas_cumprod[999] < 0.01


def test_epsilon_target_is_the_noise(scheduler):
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    target = training_target(scheduler, x0, noise, torch.tensor([10, 900]), "epsilon")
    assert torch.equal(target, noise)


def test_unknown_prediction_type_raises(scheduler):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="sample"):
        training_target(scheduler, x, x, torch.tensor([1]), "sample")


def test_error_messages_name_the_shapes_exactly():
    with pytest.raises(ValueError, match=r"^prediction \(2, 4, 8, 8\) and target \(2, 4, 8, 4\) differ$"):
        dreambooth_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 4), prior_loss_weight=1.0,
                        with_prior=True)
    with pytest.raises(ValueError, match=r"^a prior-preservation batch needs an even size, got 3$"):
        dreambooth_loss(torch.zeros(3, 1), torch.zeros(3, 1), prior_loss_weight=1.0, with_prior=True)
    with pytest.raises(ValueError, match=re.escape(
            "unknown prediction type 'sample'; expected one of ('epsilon', 'v_prediction')")):
        training_target(None, torch.zeros(1), torch.zeros(1), torch.tensor([1]), "sample")


def test_halves_of_three_and_exact_float64_values():
    """``[i0, i1, i2 | c0, c1, c2]``: the batch splits in two halves of three (not three pairs), and
    float64 inputs give the fp32 rounding of the exact means."""
    pred = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], dtype=torch.float64).view(6, 1, 1, 1)
    parts = dreambooth_loss(pred, torch.zeros_like(pred), prior_loss_weight=0.25, with_prior=True)
    assert parts.instance.item() == torch.tensor(14 / 3, dtype=torch.float32).item()
    assert parts.prior.item() == torch.tensor(16 / 3, dtype=torch.float32).item()
    assert parts.total.item() == (parts.instance + 0.25 * parts.prior).item()
    assert parts.total.dtype == torch.float32
