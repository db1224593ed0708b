"""Small, seeded experiments that back claims in the README (run by tests and bench scripts)."""

from __future__ import annotations

from typing import Any

from raydb.config import RaydbConfig
from raydb.storage import Storage

__all__ = ["prior_preservation_finding"]


def prior_preservation_finding(
    cfg: RaydbConfig, *, weights: tuple[float, ...] = (0.0, 1.0), storage: Storage | None = None,
) -> dict[str, Any]:
    """Train the same subject with each ``prior_loss_weight`` (same steps, lr, seeds, batches) and
    score ``val_instance`` (instance images, instance prompt) and ``val_prior`` (held-out class
    images never trained on, class prompt) on fixed noise and timesteps.

    Returns ``{"base": {...}, "lambda_<w>": {...}, "settings": {...}}`` with ``val_instance`` and
    ``val_prior`` per entry; ``base`` is the untrained model.
    """
    from raydb.data.ingest import load_images
    from raydb.encode.encoders import encode_images, encode_prompts, images_to_tensor, tokenize
    from raydb.models.components import load_components
    from raydb.prior.stage import class_images
    from raydb.train.data import step_micro_batches
    from raydb.train.evaluate import Validator
    from raydb.train.local import prepare_training_data
    from raydb.train.step import build_train_state, optimizer_step

    storage = storage or Storage(cfg.s3_endpoint_url)
    tc = cfg.train
    instance = load_images(cfg.subject.instance_data, tc.resolution, storage=storage,
                           center_crop=tc.center_crop)
    classes = class_images(cfg, storage)
    holdout = class_images(cfg, storage, holdout=True)
    if not holdout:
        raise ValueError("prior.num_holdout must be > 0: val_prior needs held-out class images")
    out: dict[str, Any] = {"settings": {"steps": tc.max_steps, "learning_rate": tc.learning_rate,
                                        "resolution": tc.resolution, "seed": tc.seed,
                                        "num_class_images": len(classes),
                                        "num_holdout": len(holdout)}}
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    for weight in weights:
        data = cfg.to_dict()
        data["train"]["prior_loss_weight"] = weight
        run_cfg = RaydbConfig.model_validate(data)
        comps = load_components(run_cfg.model, storage, run_cfg.workspace)
        train_data = prepare_training_data(run_cfg, comps, storage, class_images=classes,
                                           instance_images=instance)
        validator = Validator(run_cfg, comps, encode_images(comps.vae, images_to_tensor(instance)),
                              encode_images(comps.vae, images_to_tensor(holdout)),
                              {"embeds": encode_prompts(comps.tokenizer, comps.text_encoder, prompts),
                               "ids": tokenize(comps.tokenizer, prompts)}, instance)
        if "base" not in out:
            out["base"] = _losses(validator(comps.unet))
        state = build_train_state(run_cfg, comps.unet, comps.text_encoder)
        n_t = comps.noise_scheduler.config.num_train_timesteps
        while state.step < tc.max_steps:
            micro = step_micro_batches(train_data, tc, step=state.step, num_train_timesteps=n_t)
            optimizer_step(state, micro, cfg=run_cfg, noise_scheduler=comps.noise_scheduler,
                           prediction_type=comps.prediction_type, with_prior=train_data.with_prior,
                           vae=comps.vae)
        out[f"lambda_{weight:g}"] = _losses(validator(comps.unet))
    return out


def _losses(scores: dict[str, float]) -> dict[str, float]:
    return {k: scores[k] for k in ("val_instance", "val_prior")}
