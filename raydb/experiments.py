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
    from raydb.data.ingest import ImageGeometry, load_images_with_geometry
    from raydb.encode.encoders import encode_images, encode_prompt_set, images_to_tensor
    from raydb.models.components import load_components
    from raydb.models.family import SDXL
    from raydb.models.sdxl import time_ids_for
    from raydb.prior.stage import class_images
    from raydb.train.data import step_micro_batches
    from raydb.train.evaluate import Validator
    from raydb.train.local import prepare_training_data
    from raydb.train.step import build_train_state, optimizer_step

    storage = storage or Storage(cfg.s3_endpoint_url)
    tc = cfg.train
    ingested = load_images_with_geometry(cfg.subject.instance_data, tc.resolution, storage=storage,
                                         center_crop=tc.center_crop)
    instance = [image for image, _ in ingested]
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
        encoded = [encode_images(comps.vae, images_to_tensor(images)) for images in (instance, holdout)]
        if comps.family == SDXL:  # each image's size/crop conditioning (holdout: generated, whole)
            encoded[0].time_ids = time_ids_for([g for _, g in ingested])
            encoded[1].time_ids = time_ids_for([ImageGeometry.whole(i) for i in holdout])
        validator = Validator(run_cfg, comps, *encoded, encode_prompt_set(comps, prompts), instance)
        if "base" not in out:
            out["base"] = _losses(validator(comps.denoiser))
        state = build_train_state(run_cfg, comps.denoiser, *comps.lora_text_encoders)
        n_t = comps.noise_scheduler.config.num_train_timesteps
        while state.step < tc.max_steps:
            micro = step_micro_batches(train_data, tc, step=state.step, num_train_timesteps=n_t)
            optimizer_step(state, micro, cfg=run_cfg, noise_scheduler=comps.noise_scheduler,
                           prediction_type=comps.prediction_type, with_prior=train_data.with_prior,
                           vae=comps.vae)
        out[f"lambda_{weight:g}"] = _losses(validator(comps.denoiser))
    return out


def _losses(scores: dict[str, float]) -> dict[str, float]:
    return {k: scores[k] for k in ("val_instance", "val_prior")}
