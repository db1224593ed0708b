"""Does training learn? The denoising loss on the instance images, with fixed noise and timesteps,
must drop clearly below the base model's after a short run on the tiny model."""

from __future__ import annotations

from raydb.models.components import load_components
from raydb.storage import Storage
from raydb.train.data import make_micro_batch
from raydb.train.evaluate import denoising_loss
from raydb.train.local import prepare_training_data
from raydb.train.step import build_train_state, optimizer_step

STEPS = 120


def test_training_lowers_the_instance_denoising_loss(make_cfg):
    cfg = make_cfg(train={"max_steps": STEPS, "learning_rate": 3e-3})
    storage = Storage()
    components = load_components(cfg.model, storage, cfg.workspace)
    data = prepare_training_data(cfg, components, storage)

    def instance_loss() -> float:
        return denoising_loss(components.unet, components.noise_scheduler, components.vae,
                              data.instance, data.instance_embeds,
                              prediction_type=components.prediction_type, seed=123)

    base = instance_loss()
    assert instance_loss() == base  # fixed draws: a deterministic function of the weights
    state = build_train_state(cfg, components.unet, None)
    assert instance_loss() == base  # lora_B starts at zero: the adapted model is the base model

    n_timesteps = components.noise_scheduler.config.num_train_timesteps
    for step in range(STEPS):
        batch = make_micro_batch(data, step=step, micro=0, batch_size=1, accumulation=1,
                                 seed=cfg.train.seed, num_train_timesteps=n_timesteps)
        optimizer_step(state, [batch], cfg=cfg, noise_scheduler=components.noise_scheduler,
                       prediction_type=components.prediction_type, with_prior=data.with_prior,
                       vae=components.vae)
    trained = instance_loss()
    assert trained < 0.9 * base, f"instance denoising loss {base:.4f} -> {trained:.4f}"
    assert components.unet.training  # evaluation restored the training mode
