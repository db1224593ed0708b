"""Single-process DreamBooth-LoRA training: ``raydb train --local``, with no Ray at all.

Order of work:
  1. ``prepare_training_data`` — the subject's photos and the class images, prepared by
     ``encode/inputs.py`` (the one preparation path) and encoded once in this process
     (``train.cache_latents``; raw pixels otherwise)
  2. ``build_train_state`` (step.py) — LoRA, AdamW, lr schedule
  3. the loop — ``step_micro_batches`` -> ``optimizer_step``; a checkpoint every
     ``train.checkpoint_every`` steps into the run folder (rundir.py); a rerun resumes from the newest
  4. ``finish_run`` (outputs.py) — adapter, adapter.json, metrics.jsonl, loss curve, samples

It returns the finished adapter; registering it is the pipeline's (``raydb train --local`` runs
this through :func:`raydb.pipeline.run_pipeline`).

The Ray Train worker loop (stage.py) runs the same step over the same batches.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from raydb.config import RaydbConfig
from raydb.encode.encoders import encode_images, encode_prompt_set, images_to_tensor
from raydb.encode.inputs import EncodeInputs, prepare_inputs
from raydb.models.components import Components, load_components
from raydb.storage import Storage, join
from raydb.terminal import show_progress
from raydb.train.data import TrainingData, flow_inputs, prompt_inputs, training_data
from raydb.train.device_options import use_cuda_graphs
from raydb.train.engine import TrainEngine, engine_compile_cache
from raydb.train.outputs import finish_run, finished_result
from raydb.train.progress import ProgressWriter
from raydb.train.rundir import (
    CHECKPOINT_META,
    CHECKPOINT_TENSORS,
    finished_adapter,
    latest_checkpoint,
    restore_payload,
    run_uri,
    save_checkpoint,
)
from raydb.train.step import build_train_state, weights_dtype

__all__ = ["prepare_training_data", "train_subject"]

log = logging.getLogger(__name__)


def prepare_training_data(
    cfg: RaydbConfig, components: Components, storage: Storage, *, inputs: EncodeInputs | None = None,
) -> TrainingData:
    """Prepare (``encode/inputs.py``) and, with ``train.cache_latents``, encode everything once.
    Tensors stay on CPU. ``inputs``: images prepared already (by default the subject's photos and
    the class images, flipped with ``train.random_flip``); SDXL's time ids come with them. In model
    mode without a pool the class half repeats the instance half (``inputs.classes`` is then
    ignored; nothing is generated for it).
    """
    tc = cfg.train
    if inputs is None:
        inputs = prepare_inputs(cfg, storage, family=components.family)
    vae = components.vae
    prompts = encode_prompt_set(components, [cfg.subject.instance_prompt, cfg.subject.class_prompt])

    def source(images: list[Image.Image]):
        pixels = images_to_tensor(images)
        return encode_images(vae, pixels) if tc.cache_latents else pixels

    h = tc.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    with_class = cfg.prior.uses_class_images and bool(inputs.classes.images)
    conditioning = inputs.conditioning()
    time_ids = (conditioning["instance"], conditioning["class"]) if conditioning else (None, None)
    classes = source(inputs.classes.images) if with_class else None
    return training_data(source(inputs.instance.images), classes,
                         **prompt_inputs(prompts, cfg.lora.train_text_encoder),
                         latent_shape=(vae.config.latent_channels, h, h), time_ids=time_ids,
                         prior_from_instance=cfg.prior.from_instance, **flow_inputs(tc, components))


def train_subject(
    cfg: RaydbConfig, storage: Storage | None = None, *, resume: bool = True, quiet: bool = False,
    samples: bool = True,
) -> dict[str, Any]:
    """Train one subject in this process; returns the finished adapter's summary (``adapter_uri``,
    ``run_dir``, ``steps``, ``images_per_s``, ``loss``). Registers nothing.

    ``resume=False`` ignores existing checkpoints and a finished adapter (a fresh run).
    """
    from tqdm.auto import tqdm

    storage = storage or Storage(cfg.s3_endpoint_url)
    tc = cfg.train
    run = run_uri(cfg)
    finished = finished_adapter(cfg, storage) if resume else None
    if finished:
        return finished_result(cfg, finished, quiet=quiet)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components = load_components(cfg.model, storage, cfg.workspace, device=device,
                                 dtype=weights_dtype(tc, device))
    data = prepare_training_data(cfg, components, storage)
    state = build_train_state(cfg, components.denoiser, *components.lora_text_encoders)
    metrics: list[dict[str, Any]] = []
    latest = latest_checkpoint(storage, run) if resume else None
    if latest:
        metrics = restore_payload(state, storage.read_bytes(join(latest, CHECKPOINT_TENSORS)),
                                  storage.read_bytes(join(latest, CHECKPOINT_META)))
        if not quiet:
            log.info("resuming %s from step %d", run, state.step)
    progress = ProgressWriter(storage, run, tc.max_steps)
    bar = tqdm(total=tc.max_steps, initial=state.step, desc=f"train {cfg.subject.id}",
               disable=quiet or not show_progress())
    graphs = use_cuda_graphs(tc, device)
    cache = engine_compile_cache(cfg, storage, model_identity=components.identity, device=device,
                                 data=data, graphs=graphs)
    with TrainEngine(cfg, state, data, noise_scheduler=components.noise_scheduler,
                     prediction_type=components.prediction_type, vae=components.vae, device=device,
                     compile_cache=cache) as engine:
        while state.step < tc.max_steps:
            m = engine.step()
            metrics.append(m)
            progress.update(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", ips=f"{m['images_per_s']:.1f}")
            if state.step % tc.checkpoint_every == 0 and state.step < tc.max_steps:
                save_checkpoint(storage, run, state, metrics, tc.checkpoints_to_keep)
    bar.close()
    return finish_run(cfg, storage, state, components, metrics, samples=samples, device=device)
