"""``prior.mode``: class images (``images``) vs. the frozen base model's own prediction (``model``).

The pin below was recorded before ``prior.mode`` existed: image-mode training must stay what it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from raydb.config import ConfigError, load_config
from raydb.models.components import load_components
from raydb.models.sdxl import sdxl_text_conditioning, unet_added_conditions
from raydb.pipeline import inputs_key, stage_inputs
from raydb.prior.stage import generated_training_images, prior_total_images
from raydb.storage import Storage
from raydb.train.data import make_micro_batch
from raydb.train.local import prepare_training_data, train_subject
from raydb.train.lora import add_lora, lora_disabled
from raydb.train.prior_target import prior_half_target
from raydb.train.rundir import run_id
from raydb.train.step import build_train_state, forward_loss

# Recorded on 2026-12-04 from the code before prior.mode (commit 481bc29): a float64 run of three
# optimizer steps, two accumulated micro-batches each, clipped, through train_subject. The adapter
# file holds the float64 master weights rounded to fp32 and the logged losses are fp32 too, so
# platforms whose float64 kernels differ in the last bits (~1e-16 relative: BLAS, FMA, threads)
# still agree on every one of these bits; a change of the algorithm — draws, chunking, target,
# weighting, accumulation, clipping — changes them all.
IMAGE_MODE_PINS = {
    "sd": ("6ef647a8b5a2e331508dd15c8fb5264f08fc0147bb959dbd11ce063702cd1d45",
           [1.8205196857452393, 1.9079065322875977, 1.8032903671264648],
           [0.9695603251457214, 1.1997005939483643, 1.048168659210205]),
    "sd-text-encoder": ("b484f64b98fb634c13cd847e9ca883dc8d8d7540b78529f88fcfa39b9c8f25c8",
                        [1.8205196857452393, 1.910245656967163, 1.8009600639343262],
                        [0.9695603251457214, 1.2012287378311157, 1.0480717420578003]),
    "sdxl": ("7c5bf222df1272396c129c1ab8e49a8dcbebf0269442fad5b414aa61d2b1e385",
             [1.798067331314087, 1.8741662502288818, 1.772925615310669],
             [0.9925975799560547, 1.180540919303894, 1.0412647724151611]),
}


def _pinned_run(make_cfg, workspace: str, class_dir: str, variant: str, **prior) -> tuple[str, list, list]:
    """(sha256 of the adapter's tensors, losses, prior losses) of the pinned float64 run."""
    cfg = make_cfg(
        workspace=workspace,
        model={"pretrained": "tiny-sdxl" if variant == "sdxl" else "tiny"},
        prior={"class_data": class_dir, "num_class_images": 3, **prior},
        lora={"train_text_encoder": variant == "sd-text-encoder"},
        train={"max_steps": 3, "gradient_accumulation_steps": 2, "dtype": "float64",
               "mixed_precision": "no", "max_grad_norm": 0.05, "prior_loss_weight": 0.7, "seed": 3})
    run = Path(train_subject(cfg, quiet=True, samples=False)["run_dir"])
    weights = st_load((run / "adapter" / "pytorch_lora_weights.safetensors").read_bytes())
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].numpy().tobytes())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return digest.hexdigest(), [r["loss"] for r in rows], [r["loss_prior"] for r in rows]


@pytest.mark.heavy
@pytest.mark.parametrize("variant", sorted(IMAGE_MODE_PINS))
def test_image_mode_is_the_recorded_run(make_cfg, tmp_path, class_images_dir, variant):
    assert _pinned_run(make_cfg, str(tmp_path / "ws"), class_images_dir, variant) == IMAGE_MODE_PINS[variant]


def test_image_mode_keeps_the_run_ids_and_stage_keys_it_had():
    """Adding ``prior.mode`` (and ``tune.prior_mode``) must not re-key existing runs and manifests:
    values of main without it, for the default config (recorded at 481bc29, re-recorded from main
    at f3dbde0: FLUX.1's ``train.flow`` re-keyed the run id and the train stage, the digits base's
    ``tune.metric`` / ``eval.*`` keys the tune stage — neither is this mode's doing)."""
    cfg = load_config(data={"workspace": "/tmp/x"})
    assert run_id(cfg) == "demo-22405a8b84"
    keys = {stage: inputs_key(stage_inputs(cfg, Storage(), stage)) for stage in ("prior", "encode", "train")}
    assert keys == {"prior": "008d3e80656f3900c12f216da49ffad13b4c3d862728a70f1e48aa736ca7d946",
                    "encode": "cbdeda62e3961f251a2e19e69aff2e85f43f44cc69f8e3e1148082802532bffa",
                    "train": "cfc72d4599250ae7a021328c4ac2a4a3bebf2d165d5ca056be7df8d28e82bbd6"}
    tuned = load_config(data={"workspace": "/tmp/x", "tune": {}})
    assert inputs_key(stage_inputs(tuned, Storage(), "tune")) == \
        "d8c33bd2c8d6f9d22f372c9c73adebb9edd596a65dd50c31adda4572666241c0"
    model = load_config(data={"workspace": "/tmp/x", "prior": {"mode": "model"}})
    assert run_id(model) != run_id(cfg)
    assert stage_inputs(model, Storage(), "prior")["images"] == 0


@pytest.mark.parametrize(("prior", "tune", "expected"), [
    ({}, None, (100, 104)),                                      # image mode: training + held out
    ({"mode": "model"}, None, (0, 0)),                          # nothing to generate
    ({"mode": "model"}, {}, (0, 4)),                            # a search validates on held-out images
    ({"mode": "model", "num_holdout": 0}, {}, (0, 0)),
    ({"mode": "model"}, {"prior_mode": ["model", "images"]}, (100, 104)),  # image-mode trials
    ({"class_data": "/photos"}, None, (0, 0)),                  # given, not generated
    ({"mode": "model", "class_data": "/photos"}, {}, (0, 0)),   # the pool
    ({"enabled": False}, None, (0, 0)),
])
def test_what_the_prior_stage_generates(prior, tune, expected):
    cfg = load_config(data={"prior": prior} | ({"tune": tune} if tune is not None else {}))
    assert (generated_training_images(cfg), prior_total_images(cfg)) == expected


def test_prior_sources():
    def cfg(**prior):
        return load_config(data={"prior": prior}).prior

    assert cfg().uses_class_images and not cfg().from_instance
    assert cfg(mode="model").from_instance and not cfg(mode="model").uses_class_images
    pool = cfg(mode="model", class_data="/photos")
    assert pool.uses_class_images and not pool.from_instance
    off = cfg(mode="model", enabled=False)
    assert not off.uses_class_images and not off.from_instance
    with pytest.raises(ConfigError, match="prior.mode"):
        load_config(data={"prior": {"mode": "base"}})
    with pytest.raises(ConfigError, match="tune.prior_mode"):
        load_config(data={"tune": {"prior_mode": ["model", "model"]}})


# -- model mode: the target is the frozen base model's prediction ------------------------------------

B = 2  # instance rows per micro-batch (and as many prior rows)


def _model_mode_setup(make_cfg, variant: str, **prior):
    """Float64 components with LoRA whose up-projections are random (so adapter != base), a
    separate LoRA-free copy of the same base (the reference), and one micro-batch."""
    cfg = make_cfg(model={"pretrained": "tiny-sdxl" if variant == "sdxl" else "tiny"},
                   prior={"mode": "model", **prior},
                   lora={"train_text_encoder": variant == "sd-text-encoder"},
                   train={"dtype": "float64", "mixed_precision": "no", "batch_size": B})
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace, dtype=torch.float64)
    base = load_components(cfg.model, storage, cfg.workspace, dtype=torch.float64)
    data = prepare_training_data(cfg, comps, storage)
    state = build_train_state(cfg, comps.unet, comps.text_encoder, comps.text_encoder_2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (comps.unet, comps.text_encoder, comps.text_encoder_2):
            for name, p in module.named_parameters() if module is not None else ():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = make_micro_batch(data, step=0, micro=0, batch_size=B, accumulation=1, seed=cfg.train.seed,
                             num_train_timesteps=comps.noise_scheduler.config.num_train_timesteps)
    return cfg, comps, base, data, state, batch


def _conditioning(comps, batch, rows: slice):
    """What the step conditions on for ``rows``: cached embeddings or the (given) text encoder(s)."""
    if batch.encoder_hidden_states is not None:
        return batch.encoder_hidden_states[rows], None if batch.pooled is None else batch.pooled[rows]
    if comps.text_encoder_2 is not None:
        return sdxl_text_conditioning((comps.text_encoder, comps.text_encoder_2),
                                      (batch.input_ids[rows], batch.input_ids_2[rows]))
    return comps.text_encoder(batch.input_ids[rows])[0], None


def _predict(comps, noisy, batch, rows: slice) -> torch.Tensor:
    """The UNet of ``comps`` on ``rows``, inputs in its float64 (as the step casts them)."""
    f64 = torch.float64
    cond, pooled = _conditioning(comps, batch, rows)
    added = None if batch.time_ids is None else unet_added_conditions(pooled.to(f64),
                                                                      batch.time_ids[rows].to(f64))
    return comps.unet(noisy[rows].to(f64), batch.timesteps[rows], cond.to(f64),
                      added_cond_kwargs=added).sample


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss's MSE: in fp32 whatever the prediction's dtype (``dreambooth_loss``)."""
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def _lora_params(comps) -> list[torch.nn.Parameter]:
    return [p for m in (comps.unet, comps.text_encoder, comps.text_encoder_2) if m is not None
            for name, p in m.named_parameters() if "lora_" in name]


@pytest.mark.heavy
@pytest.mark.parametrize("variant", ["sd", "sd-text-encoder", "sdxl"])
def test_model_mode_prior_target_is_the_frozen_base_prediction(make_cfg, variant):
    """Float64: loss_prior = mse(adapted prediction, base prediction) on the prior rows, where the
    base prediction comes from a separate copy of the base model that never had LoRA; and the
    adapter's gradient is that of ``mse(inst) + λ·mse(adapted prior rows, constant target)``, so it
    flows only through the LoRA-enabled pass (with the LoRA layers left on in the target pass the
    prior loss would be exactly 0, far below the value checked here)."""
    cfg, comps, base, data, state, batch = _model_mode_setup(make_cfg, variant)
    assert data.prior_from_instance and data.class_ is None
    # the prior rows repeat the instance rows' draws under the class prompt
    for name in ("latent_mean", "latent_std", "latent_eps", "noise", "timesteps", "time_ids"):
        rows = getattr(batch, name)
        if rows is not None:
            assert torch.equal(rows[B:], rows[:B]), name
    prompts = batch.input_ids
    assert torch.equal(prompts[:B], data.instance_ids.expand(B, -1))
    assert torch.equal(prompts[B:], data.class_ids.expand(B, -1))

    weight = 0.7
    parts = forward_loss(comps.unet, comps.noise_scheduler, batch, prediction_type=comps.prediction_type,
                         prior_loss_weight=weight, with_prior=True, vae=comps.vae,
                         text_encoder=state.text_encoder, text_encoder_2=state.text_encoder_2,
                         prior_mode="model")
    parts.total.backward()
    grads = [p.grad.clone() for p in state.params]
    state.optimizer.zero_grad(set_to_none=True)

    vae = comps.vae.config
    latents = (batch.latent_mean + batch.latent_std * batch.latent_eps) * vae.scaling_factor
    noisy = comps.noise_scheduler.add_noise(latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        base_pred = _predict(base, noisy, batch, slice(B, None))
    pred = _predict(comps, noisy, batch, slice(None))
    instance = _mse(pred[:B], batch.noise[:B])
    prior = _mse(pred[B:], base_pred)
    assert prior.item() > 1e-4  # the adapter really differs from the base on the prior rows
    assert parts.instance.item() == instance.item()
    assert parts.prior.item() == pytest.approx(prior.item(), rel=1e-6, abs=0)
    (instance + weight * prior).backward()
    assert len(grads) == len(state.params) > 0
    for got, p in zip(grads, state.params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-12)
    # afterwards every LoRA layer is on and trains again
    assert all(p.requires_grad for p in _lora_params(comps))
    with torch.no_grad():
        again = _predict(comps, noisy, batch, slice(B, None))
    assert not torch.allclose(again, base_pred)


@pytest.mark.heavy
def test_model_mode_prior_target_is_the_frozen_base_prediction_for_flux(make_cfg):
    """FLUX.1 (flow matching), float64: the prior rows repeat the instance rows' sigmas, noise and
    guidance under the class prompt, and their target is the prediction of a separate LoRA-free
    copy of the base transformer; the instance rows' target is the flow velocity."""
    from raydb.train.flow import velocity_target
    from raydb.train.step import denoiser_prediction, sample_latents

    cfg = make_cfg(model={"pretrained": "tiny-flux"}, prior={"mode": "model"},
                   train={"dtype": "float64", "mixed_precision": "no", "batch_size": B})
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace, dtype=torch.float64)
    base = load_components(cfg.model, storage, cfg.workspace, dtype=torch.float64)
    data = prepare_training_data(cfg, comps, storage)
    build_train_state(cfg, comps.denoiser, *comps.lora_text_encoders)  # adds the LoRA layers
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in comps.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = make_micro_batch(data, step=0, micro=0, batch_size=B, accumulation=1, seed=cfg.train.seed,
                             num_train_timesteps=comps.noise_scheduler.config.num_train_timesteps)
    assert data.prior_from_instance and batch.sigmas is not None and batch.timesteps is None
    for name in ("latent_mean", "latent_eps", "noise", "sigmas", "guidance", "text_ids"):
        rows = getattr(batch, name)
        if rows is not None:
            assert torch.equal(rows[B:], rows[:B]), name
    assert not torch.equal(batch.encoder_hidden_states[B:], batch.encoder_hidden_states[:B])  # prompts

    weight = 0.7
    parts = forward_loss(comps.denoiser, comps.noise_scheduler, batch, prediction_type=comps.prediction_type,
                         prior_loss_weight=weight, with_prior=True, vae=comps.vae, prior_mode="model")
    vae = comps.vae.config
    latents = sample_latents(batch, comps.vae, vae.scaling_factor, vae.get("shift_factor"))
    with torch.no_grad():
        base_pred = denoiser_prediction(base.denoiser, base.noise_scheduler, batch.rows(slice(B, None)),
                                        latents[B:])
        pred = denoiser_prediction(comps.denoiser, comps.noise_scheduler, batch, latents)
    instance = _mse(pred[:B], velocity_target(latents, batch.noise)[:B])
    prior = _mse(pred[B:], base_pred)
    assert prior.item() > 1e-6  # the adapter really differs from the base on the prior rows
    assert parts.instance.item() == pytest.approx(instance.item(), rel=1e-9, abs=0)
    assert parts.prior.item() == pytest.approx(prior.item(), rel=1e-6, abs=0)
    assert all(p.requires_grad for name, p in comps.denoiser.named_parameters() if "lora_" in name)


@pytest.mark.heavy
def test_a_pool_gives_the_prior_half_image_mode_draws_and_the_model_target(make_cfg, class_images_dir):
    """With ``prior.class_data`` in model mode the prior rows are drawn exactly as image mode draws
    class rows (own stream, own images); only their target differs."""
    cfg, comps, base, data, state, batch = _model_mode_setup(
        make_cfg, "sd", class_data=class_images_dir, num_class_images=4)
    assert not data.prior_from_instance and data.class_ is not None
    images_cfg = make_cfg(prior={"class_data": class_images_dir, "num_class_images": 4},
                          train={"dtype": "float64", "mixed_precision": "no", "batch_size": B})
    images_data = prepare_training_data(images_cfg, comps, Storage())
    images_batch = make_micro_batch(images_data, step=0, micro=0, batch_size=B, accumulation=1,
                                    seed=cfg.train.seed, num_train_timesteps=1000)
    for name, value in batch.__dict__.items():
        other = getattr(images_batch, name)
        assert (value is None and other is None) or torch.equal(value, other), name
    assert not torch.equal(batch.latent_mean[B:], batch.latent_mean[:B])  # class images, not instance

    kw = dict(prediction_type=comps.prediction_type, prior_loss_weight=1.0, with_prior=True, vae=comps.vae)
    with torch.no_grad():
        model = forward_loss(comps.unet, comps.noise_scheduler, batch, prior_mode="model", **kw)
        images = forward_loss(comps.unet, comps.noise_scheduler, batch, prior_mode="images", **kw)
        latents = (batch.latent_mean + batch.latent_std * batch.latent_eps) * comps.vae.config.scaling_factor
        noisy = comps.noise_scheduler.add_noise(latents, batch.noise, batch.timesteps)
        pred = _predict(comps, noisy, batch, slice(B, None))
        base_pred = _predict(base, noisy, batch, slice(B, None))
    assert model.instance.item() == images.instance.item()
    assert images.prior.item() == _mse(pred, batch.noise[B:]).item()
    assert model.prior.item() == pytest.approx(_mse(pred, base_pred).item(), rel=1e-6)
    assert abs(model.prior.item() - images.prior.item()) > 0.1


def test_prior_half_target_keeps_image_targets_and_refuses_unknown_modes():
    target = torch.arange(8.0).reshape(4, 2)
    calls = []
    assert prior_half_target("images", target, lambda rows: calls.append(rows), []) is target
    assert not calls
    out = prior_half_target("model", target, lambda rows: torch.full((2, 2), -1.0), [])
    assert torch.equal(out[:2], target[:2]) and torch.equal(out[2:], torch.full((2, 2), -1.0))
    with pytest.raises(ValueError, match="prior.mode"):
        prior_half_target("noise", target, lambda rows: target, [])
    with pytest.raises(ValueError, match="even size"):
        prior_half_target("model", target[:3], lambda rows: target, [])


def test_lora_disabled_restores_each_layer_and_flag_even_after_an_error(make_cfg):
    cfg = make_cfg()
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    add_lora(comps.unet, cfg.lora)
    layers = [m for m in comps.unet.modules() if hasattr(m, "lora_A")]
    lora = [p for n, p in comps.unet.named_parameters() if "lora_" in n]
    lora[0].requires_grad_(False)  # a frozen LoRA weight stays frozen
    layers[1].enable_adapters(False)  # and an already-off layer stays off
    with pytest.raises(RuntimeError, match="boom"), lora_disabled(None, comps.unet):
        assert all(m.disable_adapters for m in layers)
        assert not any(p.requires_grad for p in lora)
        raise RuntimeError("boom")
    assert [m.disable_adapters for m in layers] == [i == 1 for i in range(len(layers))]
    assert [p.requires_grad for p in lora] == [i != 0 and p not in set(layers[1].parameters())
                                                for i, p in enumerate(lora)]


def _run_outputs(result: dict) -> tuple[list[dict], bytes, dict]:
    run = Path(result["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (rows, (run / "adapter" / "pytorch_lora_weights.safetensors").read_bytes(),
            json.loads((run / "adapter" / "adapter.json").read_text()))


@pytest.mark.heavy
@pytest.mark.parametrize("variant", ["sd", "sdxl", "flux"])
def test_model_mode_trains_without_class_images_and_resumes_exactly(make_cfg, tmp_path, variant):
    """``prior.mode: model`` end to end in one process (tiny SD, SDXL and FLUX.1): nothing is generated,
    the first step's prior loss is zero (LoRA starts as the identity, so adapted == base), later
    ones are not, ``adapter.json`` records the mode, and a run resumed from its checkpoint ends
    bit for bit where an uninterrupted one does."""
    cfg = make_cfg(model={"pretrained": {"sd": "tiny", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}[variant]},
                   prior={"mode": "model"},
                   train={"max_steps": 4, "checkpoint_every": 2, "dtype": "float64", "batch_size": 2,
                          "gradient_accumulation_steps": 2, "learning_rate": 1e-2})
    full = train_subject(cfg, quiet=True)
    ws = Path(cfg.workspace)
    assert not (ws / "priors").exists() and not (ws / "encoded").exists()
    rows, weights, meta = _run_outputs(full)
    assert meta["training"]["prior_mode"] == "model" and meta["training"]["prior_enabled"]
    assert rows[0]["loss_prior"] < 1e-20
    assert all(r["loss_prior"] > 1e-8 for r in rows[1:])

    run = Path(full["run_dir"])
    shutil.rmtree(run / "adapter")
    (run / "metrics.jsonl").unlink()
    resumed_rows, resumed_weights, _ = _run_outputs(train_subject(cfg, quiet=True))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows]
    assert resumed_weights == weights


@pytest.mark.heavy
def test_model_mode_accumulation_matches_one_larger_batch(make_cfg, tmp_path):
    """k micro-batches of b == one of k*b in model mode too: positions, not micro-batches, decide
    every draw, and the prior rows share the instance rows' draws."""
    results = {}
    for name, accumulation, batch in (("accumulated", 2, 1), ("batched", 1, 2)):
        cfg = make_cfg(workspace=str(tmp_path / name), prior={"mode": "model"},
                       train={"max_steps": 2, "dtype": "float64", "learning_rate": 1e-2,
                              "gradient_accumulation_steps": accumulation, "batch_size": batch})
        results[name] = _run_outputs(train_subject(cfg, quiet=True))
    (rows_a, weights_a, _), (rows_b, weights_b, _) = results["accumulated"], results["batched"]
    for a, b in zip(rows_a, rows_b, strict=True):
        for key in ("loss", "loss_instance", "loss_prior", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), key
    a, b = st_load(weights_a), st_load(weights_b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=2.5e-7, atol=1e-12)
    assert rows_a[1]["loss_prior"] > 1e-8


@pytest.mark.heavy
def test_a_model_mode_search_generates_only_the_held_out_images(make_cfg):
    """Model mode trains on no class image; a search still scores ``val_prior`` on held-out base
    samples, so those alone are generated (in-process here), and they come first in the cache."""
    from raydb.prior.stage import class_images_with_geometry, resolve_prior_cache

    cfg = make_cfg(prior={"mode": "model", "num_holdout": 2}, tune={"prior_mode": ["model"]})
    storage = Storage()
    assert class_images_with_geometry(cfg, storage) == []
    assert not (Path(cfg.workspace) / "priors").exists()  # asking for training images generated nothing
    holdout = class_images_with_geometry(cfg, storage, holdout=True)
    assert len(holdout) == 2
    cache = resolve_prior_cache(cfg, storage, use_ray=False)
    assert cache.done_blocks(storage) == {0}  # one block of prior.sample_batch_size (2) images
    first = cache.read_images(storage, 2)
    assert [im.tobytes() for im, _ in holdout] == [im.tobytes() for im in first]
