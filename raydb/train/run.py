"""Single-process DreamBooth-LoRA training: ``raydb train`` without workers, and the shared setup.

Order of work (each a small function, reused by the Ray Train worker loop):
  1. ``load_class_images`` — from ``prior.class_data`` or the shared prior cache (generated if missing)
  2. ``prepare_training_data`` — ingest instance images, encode images + prompts once (cached path)
  3. ``build_train_state`` (step.py) — LoRA, AdamW, lr schedule
  4. the loop — ``step_micro_batches`` -> ``optimizer_step``; checkpoints every
     ``train.checkpoint_every`` steps into the run folder; a rerun resumes from the newest one
  5. outputs — adapter, adapter.json, metrics.jsonl, loss curve, sample grid; registry entry
"""

from __future__ import annotations

import hashlib
import json
import statistics
from typing import Any

import torch
from PIL import Image

from raydb.config import RaydbConfig
from raydb.data.ingest import load_images
from raydb.models.components import Components, load_components
from raydb.storage import Storage, join
from raydb.train.checkpoint import state_from_bytes, state_to_bytes
from raydb.train.data import TrainingData, step_micro_batches
from raydb.train.encode import add_flips, encode_images, encode_prompts, images_to_tensor, tokenize
from raydb.train.lora import load_lora_state, lora_state_dicts, save_lora
from raydb.train.outputs import adapter_metadata, loss_curve_png, metrics_line, sample_grid_png, write_adapter
from raydb.train.step import TrainState, build_train_state, optimizer_step, weights_dtype

__all__ = [
    "run_id", "run_uri", "load_class_images", "prepare_training_data", "checkpoint_payload",
    "restore_payload", "finish_run", "finished_result", "train_subject", "summarize_speed",
]


def run_id(cfg: RaydbConfig) -> str:
    """Deterministic id of a training run: the same command resumes the same run."""
    relevant = {k: cfg.to_dict()[k] for k in ("model", "subject", "prior", "lora", "train")}
    relevant["num_workers"] = cfg.cluster.num_workers
    relevant["train"].pop("checkpoint_every", None)
    relevant["train"].pop("checkpoints_to_keep", None)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.subject.id}-{digest}"


def run_uri(cfg: RaydbConfig) -> str:
    return join(cfg.workspace, "runs", cfg.subject.id, run_id(cfg))


def load_class_images(cfg: RaydbConfig, storage: Storage, *, holdout: bool = False) -> list[Image.Image]:
    """The training class images (or, with ``holdout``, the held-out ones), generating if needed."""
    if not cfg.prior.enabled:
        return []
    if cfg.prior.class_data:
        images = load_images(cfg.prior.class_data, cfg.train.resolution, storage=storage,
                             center_crop=cfg.train.center_crop, field="prior.class_data")
        n = cfg.prior.num_class_images
        return images[n:] if holdout else images[:n]
    from raydb.prior.pipeline import ensure_prior_images, prior_total_images, resolve_prior_cache

    total = prior_total_images(cfg)
    ensure_prior_images(cfg, storage)
    images = resolve_prior_cache(cfg, storage).read_images(storage, total)
    n = cfg.prior.num_class_images
    return images[n:] if holdout else images[:n]


def prepare_training_data(
    cfg: RaydbConfig, components: Components, storage: Storage, *,
    class_images: list[Image.Image] | None = None, instance_images: list[Image.Image] | None = None,
) -> TrainingData:
    """Ingest and (with ``train.cache_latents``) encode everything once. Tensors stay on CPU."""
    tc = cfg.train
    if instance_images is None:
        instance_images = load_images(cfg.subject.instance_data, tc.resolution, storage=storage,
                                      center_crop=tc.center_crop)
    if class_images is None:
        class_images = load_class_images(cfg, storage)
    if tc.random_flip:
        instance_images, class_images = add_flips(instance_images), add_flips(class_images)
    tok, te, vae = components.tokenizer, components.text_encoder, components.vae
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    ids = tokenize(tok, prompts)
    embeds = None if cfg.lora.train_text_encoder else encode_prompts(tok, te, prompts)

    def source(images: list[Image.Image]):
        pixels = images_to_tensor(images)
        return encode_images(vae, pixels) if tc.cache_latents else pixels

    c = vae.config.latent_channels
    h = tc.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    with_prior = cfg.prior.enabled and bool(class_images)
    return TrainingData(
        instance=source(instance_images),
        class_=source(class_images) if with_prior else None,
        instance_embeds=None if embeds is None else embeds[0:1],
        class_embeds=None if embeds is None or not with_prior else embeds[1:2],
        instance_ids=ids[0:1], class_ids=ids[1:2] if with_prior else None,
        latent_shape=(c, h, h),
    )


def checkpoint_payload(state: TrainState, metrics: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """Checkpoint as (safetensors, JSON): LoRA, optimizer, lr schedule, scaler, step, RNG, metrics."""
    return state_to_bytes({
        "lora": lora_state_dicts(state.unet, state.text_encoder),
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler else None,
        "step": state.step,
        "rng": torch.get_rng_state(),
        "metrics": json.dumps(metrics),
    })


def restore_payload(state: TrainState, tensor_bytes: bytes, json_bytes: bytes) -> list[dict[str, Any]]:
    """Load a checkpoint into ``state``; returns the metrics history up to its step."""
    payload = state_from_bytes(tensor_bytes, json_bytes)
    load_lora_state(state.unet, payload["lora"], state.text_encoder)
    state.optimizer.load_state_dict(payload["optimizer"])
    state.lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if state.scaler and payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    state.step = int(payload["step"])
    torch.set_rng_state(payload["rng"])
    return json.loads(payload["metrics"])


def summarize_speed(metrics: list[dict[str, Any]]) -> float:
    """Median images/s over the steps after the first five (warm-up excluded)."""
    vals = [m["images_per_s"] for m in metrics[5:]] or [m["images_per_s"] for m in metrics]
    return float(statistics.median(vals)) if vals else 0.0


def _latest_checkpoint(storage: Storage, run: str) -> str | None:
    names = [n.rstrip("/") for n in storage.list(join(run, "checkpoints")) if n.startswith("step-")]
    for name in sorted(names, reverse=True):
        uri = join(run, "checkpoints", name)
        if storage.exists(join(uri, "state.json")):
            return uri
    return None


def finish_run(
    cfg: RaydbConfig, storage: Storage, state: TrainState, components: Components,
    metrics: list[dict[str, Any]], *, register: bool = True, samples: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the adapter, adapter.json, metrics.jsonl and pictures; register the adapter."""
    from raydb.registry import register_adapter

    run = run_uri(cfg)
    weights = save_lora(state.unet, state.text_encoder)
    final = {k: metrics[-1][k] for k in ("loss", "loss_instance", "loss_prior") if metrics}
    final |= {"steps": state.step, "images_per_s": summarize_speed(metrics)} | (extra_metrics or {})
    meta = adapter_metadata(cfg, model_identity=components.identity, weights=weights,
                            metrics=final, prediction_type=components.prediction_type)
    adapter = join(run, "adapter")
    write_adapter(storage, adapter, weights, meta)
    storage.write_bytes(join(run, "metrics.jsonl"), "".join(metrics_line(m) + "\n" for m in metrics).encode())
    storage.write_bytes(join(run, "loss_curve.png"), loss_curve_png(metrics, f"{cfg.subject.id} loss"))
    if samples and cfg.train.num_sample_images:
        storage.write_bytes(join(run, "samples.png"), sample_grid_png(cfg, storage, weights))
    result = {"adapter_uri": adapter, "run_dir": run, "steps": state.step,
              "images_per_s": final["images_per_s"], "loss": final.get("loss")}
    if register:
        record = register_adapter(storage, cfg.workspace, cfg.subject.id, adapter)
        result["registered"] = record["uri"]
    return result


def train_subject(
    cfg: RaydbConfig, storage: Storage | None = None, *, resume: bool = True, quiet: bool = False,
    register: bool = True, samples: bool = True,
) -> dict[str, Any]:
    """Train one subject in this process; returns the summary printed by ``raydb train``."""
    from tqdm.auto import tqdm

    storage = storage or Storage(cfg.s3_endpoint_url)
    tc = cfg.train
    run = run_uri(cfg)
    finished = storage.read_json_or(join(run, "adapter", "adapter.json")) if resume else None
    if finished and finished.get("metrics", {}).get("steps", 0) >= tc.max_steps:
        return finished_result(cfg, storage, run, finished, register=register, quiet=quiet)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = weights_dtype(tc)
    components = load_components(cfg.model, storage, cfg.workspace, device=device, dtype=dtype)
    data = prepare_training_data(cfg, components, storage)
    state = build_train_state(cfg, components.unet, components.text_encoder)
    metrics: list[dict[str, Any]] = []
    latest = _latest_checkpoint(storage, run) if resume else None
    if latest:
        metrics = restore_payload(state, storage.read_bytes(join(latest, "state.safetensors")),
                                  storage.read_bytes(join(latest, "state.json")))
        if not quiet:
            print(f"resuming {run} from step {state.step}")
    n_timesteps = components.noise_scheduler.config.num_train_timesteps
    bar = tqdm(total=tc.max_steps, initial=state.step, desc=f"train {cfg.subject.id}", disable=quiet)
    while state.step < tc.max_steps:
        micro = step_micro_batches(data, tc, step=state.step, num_train_timesteps=n_timesteps,
                                   device=device)
        m = optimizer_step(state, micro, cfg=cfg, noise_scheduler=components.noise_scheduler,
                           prediction_type=components.prediction_type, with_prior=data.with_prior,
                           vae=components.vae)
        metrics.append(m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", ips=f"{m['images_per_s']:.1f}")
        if state.step % tc.checkpoint_every == 0 and state.step < tc.max_steps:
            _save_checkpoint(storage, run, state, metrics, tc.checkpoints_to_keep)
    bar.close()
    return finish_run(cfg, storage, state, components, metrics, register=register, samples=samples)


def finished_result(cfg: RaydbConfig, storage: Storage, run: str, meta: dict[str, Any], *,
                     register: bool, quiet: bool) -> dict[str, Any]:
    """A rerun of a finished run: nothing to train; make sure it is registered."""
    from raydb.registry import register_adapter

    adapter = join(run, "adapter")
    result = {"adapter_uri": adapter, "run_dir": run, "steps": meta["metrics"]["steps"],
              "images_per_s": meta["metrics"].get("images_per_s"), "loss": meta["metrics"].get("loss"),
              "skipped": True}
    if register:
        result["registered"] = register_adapter(storage, cfg.workspace, cfg.subject.id, adapter)["uri"]
    if not quiet:
        print(f"run {run} already finished ({result['steps']} steps); nothing to train")
    return result


def _save_checkpoint(storage: Storage, run: str, state: TrainState, metrics, keep: int) -> None:
    tensors, skeleton = checkpoint_payload(state, metrics)
    uri = join(run, "checkpoints", f"step-{state.step:07d}")
    storage.write_bytes(join(uri, "state.safetensors"), tensors)
    storage.write_bytes(join(uri, "state.json"), skeleton)  # written last: marks it complete
    names = sorted(n.rstrip("/") for n in storage.list(join(run, "checkpoints")) if n.startswith("step-"))
    for old in names[:-keep]:
        storage.delete(join(run, "checkpoints", old), recursive=True)


