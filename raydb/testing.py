"""Test and benchmark support — nothing in the pipeline imports it.

* **Random adapters**: serving tests and benchmarks need eight or more subjects (and adapters of a
  chosen rank, e.g. one above ``serve.max_lora_rank``); training each costs seconds.
  :func:`write_random_adapter` takes a trained subject's ``adapter.json`` as the template (tenant,
  tokens, base model) and writes seeded random LoRA factors for the same modules in diffusers'
  format — with the LoRA config in the safetensors header, exactly as training writes it — into an
  adapter folder the caller registers.
* **The prior-preservation finding** behind the README's table (:func:`prior_preservation_finding`):
  the same subject trained with each ``prior_loss_weight``, scored on held-out class images.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from raydb.config import RaydbConfig
from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS, latest_version
from raydb.serving.adapters import read_adapter
from raydb.storage import Storage, join

__all__ = ["random_lora_weights", "write_random_adapter", "prior_preservation_finding"]


def random_lora_weights(shapes: dict[str, tuple[int, int]], *, rank: int, alpha: float, seed: int,
                        config: dict | None = None, std: float = 0.5) -> bytes:
    """safetensors bytes: for each ``"unet.<module>"`` -> (out, in), a random rank-``rank`` LoRA.

    ``config``: the template's header LoRA config (diffusers needs its ``unet.target_modules``).
    ``down`` [rank, in] ~ N(0, 1/in), ``up`` [out, rank] ~ N(0, std^2/rank): a delta of roughly
    ``std * alpha / rank`` times the input's scale, enough to change images visibly.
    """
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_features, in_features) in sorted(shapes.items()):
        tensors[f"{key}.lora.down.weight"] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        tensors[f"{key}.lora.up.weight"] = torch.randn(out_features, rank, generator=gen) * std / rank**0.5
    config = {k: v for k, v in (config or {}).items() if k.startswith("unet.")}
    config |= {"unet.r": rank, "unet.lora_alpha": alpha, "unet.use_rslora": False, "unet.use_dora": False}
    return save(tensors, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})


def write_random_adapter(storage: Storage, workspace: str, template_subject: str, subject_id: str, *,
                         rank: int, seed: int, alpha: float | None = None, tenant: str = "default") -> str:
    """An adapter folder for ``subject_id``: ``tenant``'s registered ``template_subject``'s
    adapter.json with seeded random weights of ``rank``, under
    ``<workspace>/synthetic-adapters/<subject_id>``.

    Returns the folder's URI; the caller registers it (``raydb.registry.register_adapter``), as the
    pipeline registers a trained one.
    """
    template = latest_version(storage, workspace, tenant, template_subject)["uri"]
    meta = storage.read_json(join(template, ADAPTER_META))
    _, state, lora_config = read_adapter(storage, template, meta["base_model"]["identity"])
    shapes = {key.removesuffix(".lora.down.weight"): (0, tensor.shape[1])
              for key, tensor in state.items() if key.endswith(".lora.down.weight")}
    for key, tensor in state.items():
        if key.endswith(".lora.up.weight"):
            module = key.removesuffix(".lora.up.weight")
            shapes[module] = (tensor.shape[0], shapes[module][1])
    weights = random_lora_weights(shapes, rank=rank, alpha=float(alpha or rank), seed=seed,
                                  config=lora_config)
    meta = meta | {"weights": ADAPTER_WEIGHTS, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                   "subject": meta["subject"] | {"id": subject_id},
                   "lora": meta.get("lora", {}) | {"rank": rank, "alpha": float(alpha or rank)}}
    staging = join(workspace, "synthetic-adapters", subject_id)
    storage.write_bytes(join(staging, ADAPTER_WEIGHTS), weights)
    storage.write_json(join(staging, ADAPTER_META), meta)
    return staging


def prior_preservation_finding(
    cfg: RaydbConfig, *, weights: tuple[float, ...] = (0.0, 1.0), storage: Storage | None = None,
) -> dict[str, Any]:
    """Train the same subject with each ``prior_loss_weight`` (same steps, lr, seeds, batches) and
    score ``val_instance`` (instance images, instance prompt) and ``val_prior`` (held-out class
    images never trained on, class prompt) on fixed noise and timesteps.

    The images are prepared once, by the one preparation path (``encode/inputs.py``), and every run
    trains with :class:`~raydb.train.engine.TrainEngine`, the step users run.

    Returns ``{"base": {...}, "lambda_<w>": {...}, "settings": {...}}`` with ``val_instance`` and
    ``val_prior`` per entry; ``base`` is the untrained model.
    """
    from raydb.encode.encoders import encode_images, encode_prompt_set, images_to_tensor
    from raydb.encode.inputs import prepare_inputs
    from raydb.models.components import load_components
    from raydb.train.engine import TrainEngine
    from raydb.train.evaluate import Validator
    from raydb.train.local import prepare_training_data
    from raydb.train.step import build_train_state

    storage = storage or Storage(cfg.s3_endpoint_url)
    tc = cfg.train
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    inputs = None
    out: dict[str, Any] = {}
    for weight in weights:
        data = cfg.to_dict()
        data["train"]["prior_loss_weight"] = weight
        run_cfg = RaydbConfig.model_validate(data)
        comps = load_components(run_cfg.model, storage, run_cfg.workspace)
        if inputs is None:  # the same images for every run
            inputs = prepare_inputs(run_cfg, storage, family=comps.family, with_holdout=True)
            if not inputs.holdout:
                raise ValueError("prior.num_holdout must be > 0: val_prior needs held-out class images")
            out["settings"] = {"steps": tc.max_steps, "learning_rate": tc.learning_rate,
                               "resolution": tc.resolution, "seed": tc.seed,
                               "num_class_images": len(inputs.classes), "num_holdout": len(inputs.holdout)}
        train_data = prepare_training_data(run_cfg, comps, storage, inputs=inputs)
        encoded = [encode_images(comps.vae, images_to_tensor(prepared.images))
                   for prepared in (inputs.instance, inputs.holdout)]
        conditioning = inputs.conditioning()
        if conditioning:  # SDXL: each image's size/crop conditioning
            encoded[0].time_ids, encoded[1].time_ids = conditioning["instance"], conditioning["holdout"]
        validator = Validator(run_cfg, comps, *encoded, encode_prompt_set(comps, prompts),
                              inputs.instance.images)
        if "base" not in out:
            out["base"] = _losses(validator(comps.denoiser))
        state = build_train_state(run_cfg, comps.denoiser, *comps.lora_text_encoders)
        device = next(comps.denoiser.parameters()).device
        with TrainEngine(run_cfg, state, train_data, noise_scheduler=comps.noise_scheduler,
                         prediction_type=comps.prediction_type, vae=comps.vae, device=device) as engine:
            while state.step < tc.max_steps:
                engine.step()
        out[f"lambda_{weight:g}"] = _losses(validator(comps.denoiser))
    return out


def _losses(scores: dict[str, float]) -> dict[str, float]:
    return {k: scores[k] for k in ("val_instance", "val_prior")}
