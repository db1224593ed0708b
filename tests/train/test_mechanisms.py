"""Mechanisms of the training step, pinned one by one (fast tier: no Ray).

Each test names, in its docstring, the deliberate break it was seen to catch (edit, run, revert).
The batches are synthetic ``TrainingData`` whose latent means encode which image a row came from, so
a row can be traced to its source without a VAE. Where the tiny UNet runs, it runs in float64
(``train.dtype: float64``): the claims below (equal gradients, a norm bound) are then exact or hold
with a margin far above float64 rounding, on any CPU.
"""

from __future__ import annotations

import pytest
import torch

from raydb.models.components import load_components
from raydb.storage import Storage
from raydb.train.data import TrainingData
from raydb.train.step import build_train_state, optimizer_step
from tests.helpers.lr_oracle import expected_lr
from tests.helpers.training_data import coded_data, image_code, micro_batch

LATENT = (4, 8, 8)  # the tiny VAE's latent shape at 64 px


def _data(n_instance: int = 3, n_class: int | None = 4, embed_dim: int = 32,
          dtype: torch.dtype = torch.float32) -> TrainingData:
    return coded_data(n_instance, n_class, LATENT, embed_dim=embed_dim, dtype=dtype)


def _image_of(batch, row: int) -> int:
    """Which image a row's latent mean came from: ``+i`` for instance image i, ``-(j+1)`` for class j."""
    return image_code(batch.latent_mean)[row]


# -- data: layout, positions, epochs ------------------------------------------------------------------
def test_rows_before_b_are_instance_rows_after_b_are_class():
    """``[:B]`` rows come from instance data and ``[B:]`` from class data, conditioning included.

    Deliberate break caught: ``parts`` built as ``[class, instance]`` in ``make_micro_batch`` (the
    ``[class | instance]`` layout that the loss-level tests cannot see).
    """
    data = _data()
    b = 2
    for step in range(4):
        batch = micro_batch(data, step, batch_size=b)
        assert batch.size == 2 * b
        assert all(_image_of(batch, r) >= 0 for r in range(b))
        assert all(_image_of(batch, r) < 0 for r in range(b, 2 * b))
        assert torch.equal(batch.encoder_hidden_states[:b], data.instance_embeds.expand(b, -1, -1))
        assert torch.equal(batch.encoder_hidden_states[b:], data.class_embeds.expand(b, -1, -1))
        assert torch.equal(batch.input_ids[:b], data.instance_ids.expand(b, -1))
        assert torch.equal(batch.input_ids[b:], data.class_ids.expand(b, -1))
    # Without prior preservation the batch is the instance half only.
    plain = micro_batch(_data(n_class=None), 0, batch_size=b)
    assert plain.size == b and all(_image_of(plain, r) >= 0 for r in range(b))


@pytest.mark.parametrize(("accumulation", "world_size", "batch_size"), [(1, 1, 1), (2, 3, 2), (3, 2, 1)])
def test_positions_follow_the_documented_formula(accumulation, world_size, batch_size):
    """Row j of micro-batch ``micro`` of step ``step`` on rank r is the sample at global position
    ``((step * accum + micro) * W + r) * b + j`` — the same sample a 1-worker, batch-1 run sees at
    that position (data.py's docstring). Checked for image, latent noise, diffusion noise, timestep.

    Deliberate break caught: positions computed as ``(step * accumulation + micro) * batch_size``
    (rank and world size ignored: every DDP worker would train on the same samples).
    """
    data = _data(n_instance=5, n_class=3)
    single = {}

    def at(position: int):
        if position not in single:
            single[position] = micro_batch(data, position)  # b=1, accum=1, W=1: position == step
        return single[position]

    for step in range(2):
        for micro in range(accumulation):
            for rank in range(world_size):
                batch = micro_batch(data, step, micro=micro, batch_size=batch_size,
                                    accumulation=accumulation, rank=rank, world_size=world_size)
                for j in range(batch_size):
                    p = ((step * accumulation + micro) * world_size + rank) * batch_size + j
                    ref = at(p)
                    for half in (0, 1):  # instance row j, class row batch_size + j
                        row, ref_row = half * batch_size + j, half
                        assert _image_of(batch, row) == _image_of(ref, ref_row)
                        for name in ("latent_eps", "noise", "timesteps"):
                            assert torch.equal(getattr(batch, name)[row], getattr(ref, name)[ref_row]), \
                                (name, step, micro, rank, j)


def test_each_epoch_visits_every_image_once_in_a_fresh_order():
    """Positions ``[e*N, (e+1)*N)`` visit each of the N images exactly once (epoch e), in a
    permutation that changes from epoch to epoch and is not the identity order.

    Deliberate breaks caught: the per-epoch shuffle replaced by a fixed order (``position % count``),
    and one permutation reused for every epoch (``epoch`` dropped from the generator's seed).
    """
    n = 6
    data = _data(n_instance=n, n_class=None)
    orders = []
    for epoch in range(4):
        order = [_image_of(micro_batch(data, epoch * n + k), 0) for k in range(n)]
        assert sorted(order) == list(range(n)), order
        orders.append(tuple(order))
    assert len(set(orders)) == len(orders)  # a fresh permutation every epoch
    assert tuple(range(n)) not in orders


def test_every_step_draws_different_samples():
    """Consecutive steps get different latent noise, diffusion noise and timesteps, and the class
    half draws independently of the instance half.

    Deliberate break caught: ``positions = range(batch_size)`` (every step draws the samples of
    step 0; the loss still falls, so no learning test notices).
    """
    data = _data()
    batches = [micro_batch(data, s, batch_size=2) for s in range(8)]
    for name in ("latent_eps", "noise"):
        rows = [tuple(getattr(b, name)[0].flatten().tolist()) for b in batches]
        assert len(set(rows)) == len(rows), name
    assert len({tuple(b.timesteps.tolist()) for b in batches}) == len(batches)
    for b in batches:  # instance and class streams are not the same draws
        assert not torch.equal(b.noise[:2], b.noise[2:])


# -- the optimizer step on the tiny UNet (float64) --------------------------------------------------
@pytest.fixture
def f64_setup(make_cfg, shared_workspace):
    """``(make, data)``: ``make(**train)`` builds a float64 config + components + train state."""

    def make(**train):
        cfg = make_cfg(workspace=shared_workspace, train={"dtype": "float64", **train})
        comps = load_components(cfg.model, Storage(), cfg.workspace, dtype=torch.float64)
        state = build_train_state(cfg, comps.unet, None)
        return cfg, comps, state

    return make


def _applied_gradients(state) -> list[dict]:
    """Record, at the moment ``optimizer.step`` runs (a step pre-hook), the gradients it applies and
    its lr."""
    seen: list[dict] = []

    def observe(optimizer, args, kwargs):
        seen.append({"grads": [p.grad.detach().clone() for p in state.params],
                     "lr": optimizer.param_groups[0]["lr"]})

    state.optimizer.register_step_pre_hook(observe)
    return seen


def _step(state, cfg, comps, batches, with_prior=True):
    return optimizer_step(state, batches, cfg=cfg, noise_scheduler=comps.noise_scheduler,
                          prediction_type=comps.prediction_type, with_prior=with_prior, vae=comps.vae)


def test_applied_gradient_norm_is_at_most_max_grad_norm(f64_setup):
    """The gradient the optimizer applies (observed inside ``optimizer.step``) has L2 norm at most
    ``train.max_grad_norm`` while the raw gradient is far larger, and it points the same way.

    Deliberate break caught: ``clip_grad_norm_`` moved after ``optimizer.step()`` — the update then
    uses the unclipped gradient although the logged ``grad_norm_clipped`` still looks right.
    """
    max_norm = 1e-4
    cfg, comps, state = f64_setup(max_grad_norm=max_norm)
    seen = _applied_gradients(state)
    data = _data(dtype=torch.float64)
    for s in range(2):
        metrics = _step(state, cfg, comps, [micro_batch(data, s)])
        applied = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in seen[-1]["grads"]])).item()
        assert metrics["grad_norm"] > 100 * max_norm  # clipping had work to do
        # clip_grad_norm_ scales by max_norm / (norm + 1e-6): a hair under max_norm
        assert max_norm * 0.98 < applied <= max_norm * (1 + 1e-9)
        assert metrics["grad_norm_clipped"] == pytest.approx(applied, rel=1e-6)  # logged in fp32


def test_zero_prior_weight_class_half_cannot_change_the_gradient(f64_setup):
    """With ``prior_loss_weight=0`` the applied LoRA gradient is a function of the instance half only:
    replacing every class row (images, noise, timesteps, prompt) leaves it bit-identical, while with
    weight 1 the same replacement changes it.

    Deliberate breaks caught: the loss's halves swapped (``pred_prior, pred_instance = chunk``) and
    ``prior_loss_weight`` not passed through ``optimizer_step`` (a fixed 1.0).
    """
    def gradients(weight: float, class_seed: int) -> list[torch.Tensor]:
        cfg, comps, state = f64_setup(prior_loss_weight=weight, max_grad_norm=1e9)
        seen = _applied_gradients(state)
        batch = micro_batch(_data(dtype=torch.float64), 0, batch_size=2)
        other = micro_batch(_data(dtype=torch.float64), 5, batch_size=2, seed=class_seed)
        for name in ("latent_mean", "latent_std", "latent_eps", "noise", "timesteps"):
            getattr(batch, name)[2:] = getattr(other, name)[2:]
        batch.encoder_hidden_states[2:] *= 1.5  # another class prompt, too
        _step(state, cfg, comps, [batch])
        return seen[0]["grads"]

    base, changed = gradients(0.0, 1), gradients(0.0, 2)
    assert all(torch.equal(a, b) for a, b in zip(base, changed, strict=True))
    assert any(g.abs().sum() > 0 for g in base)
    weighted, weighted_changed = gradients(1.0, 1), gradients(1.0, 2)
    assert not all(torch.equal(a, b) for a, b in zip(weighted, weighted_changed, strict=True))


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_lr_schedule_values_over_steps(f64_setup, kind):
    """The lr the optimizer uses at each step (read inside ``optimizer.step``) and the logged lr
    follow the schedule's definition: warmup 2 of 6 steps, base lr 1e-3.

    Deliberate break caught: ``state.lr_scheduler.step()`` removed from ``optimizer_step`` (every
    schedule silently constant, and for warmup schedules a constant 0).
    """
    base, warmup, total = 1e-3, 2, 6
    cfg, comps, state = f64_setup(lr_scheduler=kind, lr_warmup_steps=warmup, max_steps=total,
                                  learning_rate=base)
    seen = _applied_gradients(state)
    data = _data(n_class=None, dtype=torch.float64)
    logged = [_step(state, cfg, comps, [micro_batch(data, s)], with_prior=False)["lr"] for s in range(total)]
    expected = [expected_lr(kind, s, base, warmup, total) for s in range(total)]
    assert [s["lr"] for s in seen] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-18)
    if kind != "constant":
        assert len(set(expected)) > 2  # the schedule has something to show


# -- augmentation -----------------------------------------------------------------------------------
def test_flipped_copies_are_the_encodings_of_mirrored_images(make_cfg, shared_workspace):
    """With ``train.random_flip`` the second half of the cached instance and class latents equals the
    VAE encoding of the horizontally mirrored images — and differs from the unmirrored encoding.
    The float64 VAE makes both encodings exact up to the final float32 cast (1 ulp ~ 1e-7).

    Deliberate break caught: ``PreparedImages.flipped`` returning plain copies (``images +
    list(images)``): twice the entries, none of them mirrored, so the existing "doubles the entries"
    test stays green.
    """
    from PIL import ImageOps

    from raydb.data.demo_subject import demo_images
    from raydb.data.ingest import prepare_image
    from raydb.encode.encoders import encode_images, images_to_tensor
    from raydb.encode.inputs import PreparedImages, prepare_inputs
    from raydb.train.local import prepare_training_data

    cfg = make_cfg(workspace=shared_workspace, train={"dtype": "float64", "random_flip": True})
    comps = load_components(cfg.model, Storage(), cfg.workspace, dtype=torch.float64)
    pictures = [prepare_image(im, 64) for im in demo_images(5, size=64)]
    instance, klass = pictures[:2], pictures[2:]
    inputs = prepare_inputs(cfg, Storage(), family=comps.family, instance=PreparedImages.whole(instance),
                            classes=PreparedImages.whole(klass))
    data = prepare_training_data(cfg, comps, Storage(), inputs=inputs)
    for encoded, originals in ((data.instance, instance), (data.class_, klass)):
        n = len(originals)
        assert len(encoded) == 2 * n
        mirrored = encode_images(comps.vae, images_to_tensor([ImageOps.mirror(im) for im in originals]))
        plain = encode_images(comps.vae, images_to_tensor(originals))
        assert torch.allclose(encoded.mean[n:], mirrored.mean, rtol=0, atol=1e-6)
        assert torch.allclose(encoded.std[n:], mirrored.std, rtol=0, atol=1e-6)
        assert torch.allclose(encoded.mean[:n], plain.mean, rtol=0, atol=1e-6)
        assert (encoded.mean[n:] - plain.mean).abs().max() > 1e-2  # mirroring changed the latents
