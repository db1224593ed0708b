"""``raydb.train.step`` wired to float64 stand-ins (no diffusers UNet, no Ray; milliseconds each).

``_Net`` is a UNet-shaped module (1x1 "attention projections" ``to_q``/``to_k`` over channels plus the
text, timestep and SDXL conditioning) that takes LoRA through diffusers' own ``add_adapter`` and
records what it was called with; ``_Vae`` supplies ``scaling_factor``/``shift_factor`` and a linear
encoder. Everything is float64, so the expected values below are computed with the same operations
and compared exactly (or to 1e-12 where the summation order differs).
"""

from __future__ import annotations

import contextlib
import math
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.loaders.peft import PeftAdapterMixin

from raydb.config import LoraConfig, RaydbConfig, TrainConfig
from raydb.train.data import MicroBatch
from raydb.train.lora import add_lora
from raydb.train.loss import dreambooth_loss, training_target
from raydb.train.step import autocast_dtype, build_train_state, forward_loss, optimizer_step
from tests.helpers.lr_oracle import expected_lr

C, H, L, D, D2P = 2, 2, 3, 4, 5
F64 = torch.float64


class _Net(torch.nn.Module, PeftAdapterMixin):
    def __init__(self, dtype: torch.dtype = F64) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights whatever ran before (fp16 tests depend on them)
            torch.manual_seed(0)
            self.to_q = torch.nn.Linear(C, C, dtype=dtype)
            self.to_k = torch.nn.Linear(C, C, dtype=dtype)
        self.calls: list[dict] = []
        self.checkpointing = False
        self.eval()

    def enable_gradient_checkpointing(self) -> None:
        self.checkpointing = True

    def forward(self, x, t, cond, added_cond_kwargs=None):
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "cond": cond.detach().clone(),
                           "added": added_cond_kwargs, "autocast": torch.is_autocast_enabled("cpu"),
                           "autocast_dtype": torch.get_autocast_dtype("cpu"),
                           "cache": torch.is_autocast_cache_enabled()})
        h = self.to_k(self.to_q(x.movedim(1, -1))).movedim(-1, 1)
        h = h + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-3 * t.to(h.dtype).view(-1, 1, 1, 1)
        if added_cond_kwargs is not None:
            extra = added_cond_kwargs["text_embeds"].mean(1) + added_cond_kwargs["time_ids"].mean(1)
            h = h + extra.view(-1, 1, 1, 1)
        return SimpleNamespace(sample=h)


class _Vae(torch.nn.Module):
    def __init__(self, scaling: float = 0.5, shift: float | None = None) -> None:
        super().__init__()
        config = {"scaling_factor": scaling} | ({"shift_factor": shift} if shift is not None else {})
        self.config = FrozenDict(config)
        self.weight = torch.nn.Parameter(torch.tensor(0.25, dtype=F64), requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def encode(self, pixels):
        self.seen.append(pixels)
        mean = pixels[:, :C, ::4, ::4] * self.weight
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=mean.abs() + 0.5))


class _Encoder(torch.nn.Module):
    """A text encoder: ids -> ``out[0]`` = last hidden states ``[P, L, width]`` (CLIPTextModel) or,
    with ``projection``, the pooled ``[P, D2P]`` (CLIPTextModelWithProjection); ``hidden_states``."""

    def __init__(self, width: int, scale: float, projection: bool = False) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(1, width, dtype=F64)
        self.scale = scale
        self.projection = projection
        self.eval()

    def forward(self, ids, output_hidden_states=False):
        x = self.q_proj(ids.to(F64).unsqueeze(-1))
        hidden = (x * self.scale, x * 2 * self.scale, x * 3 * self.scale)  # embeddings, penultimate, last
        pooled = hidden[-1].mean(1)[:, :1].expand(-1, D2P)
        out = _Output((pooled,) if self.projection else (hidden[-1],))
        out.hidden_states = hidden
        return out


class _Output(tuple):
    hidden_states: tuple


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000)


def _batch(seed: int, n: int = 4, *, pixels: bool = False, sdxl: bool = False, embeds: bool = True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    return MicroBatch(
        latent_mean=None if pixels else r(n, C, H, H), latent_std=None if pixels else r(n, C, H, H).abs(),
        pixels=r(n, 3, 4 * H, 4 * H).float() if pixels else None, latent_eps=r(n, C, H, H),
        noise=r(n, C, H, H), timesteps=torch.randint(0, 1000, (n,), generator=g),
        encoder_hidden_states=r(n, L, D) if embeds else None,
        input_ids=torch.randint(0, 9, (n, L), generator=g),
        pooled=r(n, D2P) if sdxl and embeds else None, time_ids=r(n, 6) if sdxl else None,
        input_ids_2=torch.randint(0, 9, (n, L), generator=g) if sdxl else None)


def _cfg(**train) -> RaydbConfig:
    return RaydbConfig(train=TrainConfig(**{"dtype": "float64", **train}),
                       lora=LoraConfig(rank=2, target_modules=["to_q", "to_k"]))


def _state(cfg: RaydbConfig, net: _Net | None = None):
    state = build_train_state(cfg, net or _Net(), None)
    with torch.no_grad():  # LoRA B starts at zero; give every LoRA weight a gradient to carry
        g = torch.Generator().manual_seed(9)
        for p in state.params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return state


def _adapted(dtype: torch.dtype = F64) -> _Net:
    """A ``_Net`` as training sees it: frozen base, LoRA on ``to_q``/``to_k`` (random, not zero)."""
    net = _Net(dtype)
    params = add_lora(net, LoraConfig(rank=2, target_modules=["to_q", "to_k"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(8)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _loss(net, scheduler, batch, vae=None, **kw):
    args = {"prediction_type": "epsilon", "prior_loss_weight": 0.5, "with_prior": True} | kw
    return forward_loss(net, scheduler, batch, vae=vae or _Vae(), **args)


# -- forward_loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("shift", [None, 0.125])
def test_forward_loss_by_hand(scheduler, prediction_type, shift):
    """latents = (mean + std * eps - shift) * scaling -> add_noise -> UNet -> target -> dual loss."""
    net, vae, batch = _adapted(), _Vae(scaling=0.5, shift=shift), _batch(0)
    parts = _loss(net, scheduler, batch, vae, prediction_type=prediction_type, prior_loss_weight=0.25)
    latents = batch.latent_mean + batch.latent_std * batch.latent_eps
    latents = (latents - shift if shift is not None else latents) * 0.5
    noisy = scheduler.add_noise(latents, batch.noise, batch.timesteps)
    [call] = net.calls
    assert torch.equal(call["x"], noisy) and torch.equal(call["t"], batch.timesteps)
    assert torch.equal(call["cond"], batch.encoder_hidden_states) and call["added"] is None
    assert not call["autocast"]
    pred = net(noisy, batch.timesteps, batch.encoder_hidden_states).sample
    target = training_target(scheduler, latents, batch.noise, batch.timesteps, prediction_type)
    want = dreambooth_loss(pred, target, prior_loss_weight=0.25, with_prior=True)
    for name in ("total", "instance", "prior"):
        assert torch.equal(getattr(parts, name), getattr(want, name)), name
    assert parts.total.requires_grad
    alone = _loss(net, scheduler, batch, vae, prediction_type=prediction_type, with_prior=False)
    assert alone.prior is None
    plain = dreambooth_loss(pred, target, prior_loss_weight=0, with_prior=False)
    assert torch.equal(alone.total, plain.total)


def test_forward_loss_encodes_pixels_in_the_vae_dtype(scheduler):
    net, vae, batch = _adapted(), _Vae(scaling=2.0), _batch(1, pixels=True)
    _loss(net, scheduler, batch, vae)
    [pixels] = vae.seen
    assert pixels.dtype == F64 and torch.equal(pixels, batch.pixels.to(F64))
    dist = vae.encode(batch.pixels.to(F64)).latent_dist
    latents = (dist.mean.float() + dist.std.float() * batch.latent_eps) * 2.0
    assert torch.equal(net.calls[0]["x"], scheduler.add_noise(latents, batch.noise, batch.timesteps))


def test_forward_loss_encodes_ids_when_the_text_encoder_trains(scheduler):
    net, encoder, batch = _adapted(), _Encoder(D, 1.0), _batch(2, embeds=False)
    _loss(net, scheduler, batch, text_encoder=encoder)
    assert torch.equal(net.calls[0]["cond"], encoder(batch.input_ids)[0])


def test_forward_loss_sdxl_cached_conditioning(scheduler):
    net, batch = _adapted(), _batch(3, sdxl=True)
    _loss(net, scheduler, batch)
    added = net.calls[0]["added"]
    assert torch.equal(net.calls[0]["cond"], batch.encoder_hidden_states)
    assert set(added) == {"text_embeds", "time_ids"}
    assert torch.equal(added["text_embeds"], batch.pooled) and torch.equal(added["time_ids"], batch.time_ids)


def test_forward_loss_sdxl_encodes_with_both_encoders(scheduler):
    """Trained SDXL encoders: penultimate hidden states of both, concatenated; pooled from the second."""
    net, batch = _adapted(), _batch(4, sdxl=True, embeds=False)
    first, second = _Encoder(2, 1.0), _Encoder(2, 10.0, projection=True)
    _loss(net, scheduler, batch, text_encoder=first, text_encoder_2=second)
    call = net.calls[0]
    hidden = torch.cat([first(batch.input_ids).hidden_states[-2],
                        second(batch.input_ids_2).hidden_states[-2]], dim=-1)
    assert torch.equal(call["cond"], hidden)
    assert torch.equal(call["added"]["text_embeds"], second(batch.input_ids_2)[0])
    assert torch.equal(call["added"]["time_ids"], batch.time_ids)


@pytest.mark.parametrize(("mixed_precision", "cache"), [("bf16", True), ("fp16", False)])
def test_forward_loss_runs_the_unet_under_autocast(scheduler, mixed_precision, cache):
    net = _adapted(torch.float32)
    _loss(net, scheduler, _batch(5), mixed_precision=mixed_precision, autocast_cache=cache)
    call = net.calls[0]
    assert call["autocast"] and call["autocast_dtype"] == autocast_dtype(mixed_precision)
    assert call["cache"] is cache
    assert call["x"].dtype == call["cond"].dtype == torch.float32  # the frozen weights' dtype
    default = _adapted(torch.float32)  # autocast's weight cache is on unless a graph capture says no
    _loss(default, scheduler, _batch(5), mixed_precision=mixed_precision)
    assert default.calls[0]["cache"] is True and default.calls[0]["autocast"]
    assert autocast_dtype("no") is None
    assert autocast_dtype("bf16") == torch.bfloat16 and autocast_dtype("fp16") == torch.float16


def test_forward_loss_feeds_the_unet_in_its_frozen_weights_dtype(scheduler):
    """Under mixed precision the frozen base is bf16 while the LoRA master weights are fp32: the UNet's
    inputs (latents, text and SDXL conditioning) are cast to the base's dtype, not the LoRA's."""
    net = _adapted(torch.bfloat16)
    assert {p.dtype for p in net.parameters() if p.requires_grad} == {torch.float32}
    _loss(net, scheduler, _batch(7, sdxl=True), mixed_precision="bf16")
    call = net.calls[0]
    assert call["x"].dtype == call["cond"].dtype == torch.bfloat16
    assert call["added"]["text_embeds"].dtype == call["added"]["time_ids"].dtype == torch.bfloat16


# -- build_train_state ------------------------------------------------------------------------------
def test_build_train_state_optimizer_schedule_and_modes():
    cfg = _cfg(learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.125,
               adam_epsilon=1e-6, seed=4, gradient_checkpointing=True)
    net = _Net()
    state = build_train_state(cfg, net, None)
    assert net.training and net.checkpointing
    assert state.model is net and state.unet is net and state.step == 0
    assert state.text_encoder is None and state.text_encoder_2 is None and state.scaler is None
    lora = [p for n, p in net.named_parameters() if "lora_" in n]
    assert [id(p) for p in state.params] == [id(p) for p in lora] and len(lora) == 4
    assert isinstance(state.optimizer, torch.optim.AdamW)
    [group] = state.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in lora]
    assert group["lr"] == 3e-3 and group["betas"] == (0.8, 0.95)
    assert group["weight_decay"] == 0.125 and group["eps"] == 1e-6
    assert group["fused"] is None and group["foreach"] is None  # CPU: no fused kernel, default path
    assert not _Net().checkpointing and not build_train_state(_cfg(), _Net(), None).unet.checkpointing


def test_fused_adamw_when_speed_says_so(monkeypatch):
    """Where ``use_fused_adam`` says yes (CUDA, or ``train.fused_adam: true``) AdamW gets ``fused=True``
    and ``foreach=False``; the question is asked about the LoRA parameters being trained."""
    import raydb.train.device_options as device_options

    asked = []

    def fused_yes(tc, params):
        asked.append(params)
        return True

    monkeypatch.setattr(device_options, "use_fused_adam", fused_yes)
    state = build_train_state(_cfg(), _Net(), None)
    [params] = asked
    assert [id(p) for p in params] == [id(p) for p in state.params] and params
    [group] = state.optimizer.param_groups
    assert group["fused"] is True and group["foreach"] is False


def test_lora_init_is_seeded_by_train_seed():
    def init(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(1000 + seed)  # whatever the global state was before
        return [p.detach().clone() for p in build_train_state(_cfg(seed=seed), _Net(), None).params]

    a, b, c = init(3), init(3), init(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_text_encoders_train_and_are_kept_only_with_train_text_encoder():
    enc, enc2 = _Encoder(D, 1.0), _Encoder(D, 2.0)
    lora = LoraConfig(rank=2, target_modules=["to_q"], train_text_encoder=True,
                      text_encoder_target_modules=["q_proj"])
    cfg = _cfg().model_copy(update={"lora": lora})
    state = build_train_state(cfg, _Net(), enc, enc2)
    assert state.text_encoder is enc and state.text_encoder_2 is enc2
    assert enc.training and enc2.training
    assert len(state.params) == 6  # A and B of the UNet's to_q and of each encoder's q_proj
    frozen_enc, frozen_enc2 = _Encoder(D, 1.0), _Encoder(D, 2.0)
    plain = build_train_state(_cfg(), _Net(), frozen_enc, frozen_enc2)
    assert plain.text_encoder is None and plain.text_encoder_2 is None
    assert not frozen_enc.training and not frozen_enc2.training


def test_fp16_gets_a_grad_scaler_and_unscaled_gradients(scheduler):
    """fp16: the loss is scaled for backward and unscaled before clipping and the update."""
    cfg = RaydbConfig(train=TrainConfig(mixed_precision="fp16", max_grad_norm=1e9),
                      lora=LoraConfig(rank=2, target_modules=["to_q", "to_k"]))
    state = _state(cfg, _Net(torch.float32))
    assert isinstance(state.scaler, torch.amp.GradScaler)
    assert state.scaler.get_scale() > 1  # scaling is actually on
    # small fp32 inputs: 65536 times an O(1) gradient would overflow fp16 and the scaler would skip
    batch = _batch(6)
    batch = MicroBatch(**{k: 0.01 * v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                          for k, v in batch.__dict__.items()})
    batch.timesteps //= 100
    parts = forward_loss(state.unet, scheduler, batch, prediction_type="epsilon", prior_loss_weight=1.0,
                         with_prior=True, vae=_Vae(), mixed_precision="fp16")
    want = torch.autograd.grad(parts.total, state.params)
    seen = _observe(state)
    metrics = optimizer_step(state, [batch], cfg=cfg, noise_scheduler=scheduler, prediction_type="epsilon",
                             with_prior=True, vae=_Vae())
    for got, w in zip(seen[0]["grads"], want, strict=True):
        assert torch.allclose(got, w, rtol=1e-2, atol=1e-4)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in want])).item()
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-2)
    assert state.unet.calls[-1]["autocast"] and state.unet.calls[-1]["autocast_dtype"] == torch.float16


# -- optimizer_step ---------------------------------------------------------------------------------
def _observe(state) -> list[dict]:
    seen: list[dict] = []

    def hook(optimizer, args, kwargs):
        seen.append({"grads": [p.grad.detach().clone() for p in state.params],
                     "lr": optimizer.param_groups[0]["lr"]})

    state.optimizer.register_step_pre_hook(hook)
    return seen


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def _step(state, cfg, scheduler, batches, **kw):
    return optimizer_step(state, batches, cfg=cfg, noise_scheduler=scheduler, prediction_type="epsilon",
                          with_prior=kw.pop("with_prior", True), vae=_Vae(), **kw)


def test_accumulated_step_averages_micro_batches_clips_and_updates(scheduler):
    """Three micro-batches: the applied gradient is the clipped mean of their gradients, the logged
    losses are their means, ``grad_norm`` is the norm before clipping and the lr is the one used."""
    max_norm = 1e-3
    cfg = _cfg(max_grad_norm=max_norm, prior_loss_weight=0.5, learning_rate=1e-2,
               gradient_accumulation_steps=3)
    state = _state(cfg)
    batches = [_batch(10 + i, n=2 * (i + 1)) for i in range(3)]
    parts = [_loss(state.unet, scheduler, b, prior_loss_weight=0.5) for b in batches]
    # the loss is fp32 (loss.py), so its 1/3 is rounded in fp32: take the same path as backward()
    per_micro = [torch.autograd.grad(p.total / 3, state.params) for p in parts]
    mean_grad = [sum(gs) for gs in zip(*per_micro, strict=True)]
    raw_norm = _norm(mean_grad)
    before = [p.detach().clone() for p in state.params]
    seen = _observe(state)

    start = time.perf_counter()
    metrics = _step(state, cfg, scheduler, batches)
    elapsed = time.perf_counter() - start

    assert raw_norm > 10 * max_norm  # clipping has work to do
    scale = max_norm / (raw_norm + 1e-6)
    for got, want in zip(seen[0]["grads"], mean_grad, strict=True):
        assert torch.allclose(got, want * scale, rtol=1e-12, atol=0)
    assert metrics["grad_norm"] == pytest.approx(raw_norm, rel=1e-6)
    assert metrics["grad_norm_clipped"] == pytest.approx(_norm(seen[0]["grads"]), rel=1e-6)
    for key, name in (("loss", "total"), ("loss_instance", "instance"), ("loss_prior", "prior")):
        assert metrics[key] == pytest.approx(sum(float(getattr(p, name)) for p in parts) / 3, rel=1e-6)
    assert metrics["lr"] == seen[0]["lr"] == 1e-2
    assert metrics["step"] == state.step == 1
    assert metrics["images"] == 2 + 4 + 6
    assert 0 < metrics["seconds"] <= elapsed
    assert metrics["images_per_s"] == pytest.approx(12 / metrics["seconds"])
    assert all(p.grad is None for p in state.params)  # zero_grad(set_to_none=True)
    assert all(not torch.equal(a, p) for a, p in zip(before, state.params, strict=True))
    assert set(metrics) == {"step", "loss", "loss_instance", "loss_prior", "grad_norm", "grad_norm_clipped",
                            "lr", "images", "seconds", "images_per_s"}


def test_step_without_prior_and_unclipped(scheduler):
    cfg = _cfg(max_grad_norm=1e9)
    state = _state(cfg)
    batch = _batch(20, n=2)
    want = torch.autograd.grad(_loss(state.unet, scheduler, batch, with_prior=False).total, state.params)
    seen = _observe(state)
    metrics = _step(state, cfg, scheduler, [batch], with_prior=False)
    assert metrics["loss_prior"] == 0.0 and metrics["loss"] == metrics["loss_instance"] > 0
    assert all(torch.equal(g, w) for g, w in zip(seen[0]["grads"], want, strict=True))
    assert metrics["grad_norm"] == pytest.approx(metrics["grad_norm_clipped"], rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(_norm(want), rel=1e-6)


def test_adamw_update_uses_the_configured_lr_and_weight_decay(scheduler):
    """AdamW's first step moves each weight by ``-lr * (wd * p + g / (|g| + eps))`` (bias-corrected)."""
    lr, wd, eps = 1e-2, 0.5, 1e-3
    cfg = _cfg(max_grad_norm=1e9, learning_rate=lr, adam_weight_decay=wd, adam_epsilon=eps)
    state = _state(cfg)
    before = [p.detach().clone() for p in state.params]
    seen = _observe(state)
    _step(state, cfg, scheduler, [_batch(21)])
    for p0, g, p1 in zip(before, seen[0]["grads"], state.params, strict=True):
        want = p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
        assert torch.allclose(p1.detach(), want, rtol=1e-10, atol=1e-14)


class _Wrapper(torch.nn.Module):
    """A DDP-like wrapper: records, per forward, whether it ran inside ``no_sync``."""

    def __init__(self, net: _Net) -> None:
        super().__init__()
        self.module = net
        self.in_no_sync = False
        self.synced: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, *args, **kwargs):
        self.synced.append(not self.in_no_sync)
        return self.module(*args, **kwargs)


def test_only_the_last_micro_batch_synchronises_and_the_given_model_runs(scheduler):
    cfg = _cfg(gradient_accumulation_steps=3)
    state = _state(cfg)
    wrapper = _Wrapper(state.unet)
    _step(state, cfg, scheduler, [_batch(30 + i) for i in range(3)], model=wrapper)
    assert wrapper.synced == [False, False, True]
    assert len(state.unet.calls) == 3
    state.model = _Wrapper(state.unet)  # without ``model=``, the state's model (e.g. compiled) runs
    _step(state, cfg, scheduler, [_batch(40)])
    assert state.model.synced == [True]
    state.model = None  # ... and without either, the UNet itself
    _step(state, cfg, scheduler, [_batch(41)])
    assert len(state.unet.calls) == 5 and state.step == 3


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_lr_schedule(scheduler, kind):
    """The lr used and logged at each step follows the schedule: warmup 2 of 5 steps, base 1e-3."""
    base, warmup, total = 1e-3, 2, 5
    cfg = _cfg(lr_scheduler=kind, lr_warmup_steps=warmup, max_steps=total, learning_rate=base)
    state = _state(cfg)
    seen = _observe(state)
    logged = [_step(state, cfg, scheduler, [_batch(50, n=2)])["lr"] for _ in range(total)]
    expected = [expected_lr(kind, s, base, warmup, total) for s in range(total)]
    assert [s["lr"] for s in seen] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_a_step_where_no_lora_weight_got_a_gradient(scheduler):
    """A model that does not use the LoRA weights being trained leaves every ``.grad`` None: the
    step still runs and logs both gradient norms as 0."""
    cfg = _cfg()
    state = _state(cfg)
    before = [p.detach().clone() for p in state.params]
    metrics = _step(state, cfg, scheduler, [_batch(60)], model=_adapted())  # another net's LoRA
    assert metrics["grad_norm"] == 0.0 and metrics["grad_norm_clipped"] == 0.0
    assert all(torch.equal(a, p) for a, p in zip(before, state.params, strict=True))


@pytest.mark.parametrize("sdxl", [False, True])
def test_step_trains_the_text_encoders_it_holds(scheduler, sdxl):
    """With text-encoder LoRA the step encodes the ids with the state's encoder(s) (SDXL: both), so
    their LoRA weights receive gradients."""
    enc = _Encoder(2 if sdxl else D, 1.0)
    enc2 = _Encoder(2, 3.0, projection=True) if sdxl else None
    lora = LoraConfig(rank=2, target_modules=["to_q"], train_text_encoder=True,
                      text_encoder_target_modules=["q_proj"])
    cfg = _cfg(max_grad_norm=1e9).model_copy(update={"lora": lora})
    state = build_train_state(cfg, _Net(), enc, enc2)
    with torch.no_grad():
        for p in state.params:
            p.add_(0.5)  # B away from zero: A gets a gradient too
    seen = _observe(state)
    _step(state, cfg, scheduler, [_batch(61, sdxl=sdxl, embeds=False)])
    encoders = [enc, enc2] if sdxl else [enc]
    ids = {id(p) for m in encoders for n, p in m.named_parameters() if "lora_" in n}
    grads = [g for p, g in zip(state.params, seen[0]["grads"], strict=True) if id(p) in ids]
    assert len(grads) == 2 * len(encoders) and all(g.abs().sum() > 0 for g in grads)
