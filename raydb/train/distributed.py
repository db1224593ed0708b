"""``raydb train`` on Ray Train: a ``TorchTrainer`` whose workers run the same core step under DDP.

Driver (``train_distributed``):
  priors (Ray Data, shared cache) -> encode stage (Ray Data, skipped when unchanged) ->
  ``TorchTrainer(train_loop_per_worker, datasets={"class": encoded class rows})`` -> register.

Worker (``train_loop_per_worker``): the class rows arrive as this worker's Ray Data shard, the few
instance latents and the prompt embeddings are read from storage by every worker (so a run works
with more workers than instance images). The UNet with LoRA is wrapped in DDP; accumulation
micro-batches run under ``no_sync`` except the last. Every ``train.checkpoint_every`` steps rank 0
reports a checkpoint (safetensors + JSON: LoRA, optimizer, lr schedule, step, RNG, metrics); a
restarted worker group — or a rerun after the driver died, since the run name and storage path are
deterministic — resumes from ``ray.train.get_checkpoint()``. Rank 0 writes the outputs.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from raydb.config import RaydbConfig
from raydb.storage import Storage, is_s3, join

__all__ = ["train_distributed", "prepare_encoded", "build_trainer", "train_loop_per_worker",
           "resolve_use_gpu"]

# Test hook, read by the driver and passed to workers: "rank:step[:marker]" makes that worker
# SIGKILL itself at that step (once, if a marker file path is given) — a preempted node.
_KILL_ENV = "RAYDB_TEST_KILL_AT_STEP"


def resolve_use_gpu(cfg: RaydbConfig) -> bool:
    import ray

    if cfg.cluster.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.cluster.use_gpu)


def _storage_location(storage: Storage, cfg: RaydbConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: the subject's runs folder."""
    uri = join(cfg.workspace, "runs", cfg.subject.id)
    if is_s3(uri):
        fs, path = storage.arrow_fs(uri)
        return path, fs
    Path(uri).mkdir(parents=True, exist_ok=True)
    return str(Path(uri).resolve()), None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker. ``config``: cfg (dict), encoded cache fields, run uri."""
    import ray.train
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raydb.models.components import load_components
    from raydb.train.data import TrainingData, step_micro_batches
    from raydb.train.encode_stage import EncodedCache, load_prompts, read_encoded, rows_to_encoded
    from raydb.train.run import checkpoint_payload, finish_run, restore_payload
    from raydb.train.speed import compile_for_training
    from raydb.train.step import build_train_state, optimizer_step, weights_dtype

    cfg = RaydbConfig.model_validate(config["cfg"])
    storage = Storage(cfg.s3_endpoint_url)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    tc = cfg.train
    comps = load_components(cfg.model, storage, cfg.workspace, device=device,
                            dtype=weights_dtype(tc))

    cache = EncodedCache(**config["encoded"])
    prompts = load_prompts(storage, cache)
    instance = read_encoded(storage, cache.instance_uri)
    class_ = None
    shard = ray.train.get_dataset_shard("class") if cache.num_class else None
    if shard is not None:
        rows: dict[str, list] = {"index": [], "mean": [], "std": [], "shape": []}
        for batch in shard.iter_batches(batch_size=None, batch_format="numpy"):
            for col in rows:
                rows[col].extend(list(batch[col]))
        if not rows["index"]:
            raise RuntimeError(f"worker {rank} received no class images; use at least "
                               "cluster.num_workers class images (prior.num_class_images)")
        class_ = rows_to_encoded(rows)
    embeds = None if cfg.lora.train_text_encoder else prompts["embeds"]
    c, h, w = instance.mean.shape[1:]
    data = TrainingData(
        instance=instance, class_=class_,
        instance_embeds=None if embeds is None else embeds[0:1],
        class_embeds=None if embeds is None or class_ is None else embeds[1:2],
        instance_ids=prompts["ids"][0:1], class_ids=prompts["ids"][1:2] if class_ is not None else None,
        latent_shape=(c, h, w),
    )

    state = build_train_state(cfg, comps.unet, comps.text_encoder)
    model: torch.nn.Module = state.model if state.model is not None else comps.unet
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = compile_for_training(tc, DistributedDataParallel(comps.unet, device_ids=ids))
    metrics: list[dict[str, Any]] = []
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            d = Path(ckpt_dir)
            metrics = restore_payload(state, (d / "state.safetensors").read_bytes(),
                                      (d / "state.json").read_bytes())
        resumed_from = state.step

    eval_every = config.get("eval_every")
    validator = _Validator(cfg, comps, storage, cache, prompts) if eval_every and rank == 0 else None
    kill_at = config.get("test_kill_at")
    written = False

    def write_outputs() -> None:
        """Rank 0: adapter, metrics, pictures and ``result.json`` (what the driver reads)."""
        nonlocal written
        result = finish_run(cfg, storage, state, comps, metrics, register=False,
                            samples=bool(tc.num_sample_images),
                            extra_metrics={"resumed_from": resumed_from, "num_workers": world})
        storage.write_json(join(config["run"], "result.json"), result | {"resumed_from": resumed_from})
        written = True

    n_timesteps = comps.noise_scheduler.config.num_train_timesteps
    while state.step < tc.max_steps:
        if kill_at and rank == int(kill_at.split(":")[0]) and state.step == int(kill_at.split(":")[1]) \
                and _first_kill(kill_at):
            os.kill(os.getpid(), 9)  # a preempted worker: no cleanup, no exception
        micro = step_micro_batches(data, tc, step=state.step, num_train_timesteps=n_timesteps,
                                   device=device, rank=rank, world_size=world)
        m = optimizer_step(state, micro, cfg=cfg, noise_scheduler=comps.noise_scheduler,
                           prediction_type=comps.prediction_type, with_prior=data.with_prior,
                           vae=comps.vae, model=model)
        if world > 1:  # group metrics: losses averaged, all images over the slowest worker's time
            losses = torch.tensor([m["loss"], m["loss_instance"], m["loss_prior"], m["images"]],
                                  dtype=torch.float64)
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            seconds = torch.tensor([m["seconds"]], dtype=torch.float64)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            m["loss"], m["loss_instance"], m["loss_prior"] = (float(x) / world for x in losses[:3])
            m["images"], m["seconds"] = int(losses[3]), float(seconds[0])
            m["images_per_s"] = m["images"] / m["seconds"]
        metrics.append(m)
        last = state.step >= tc.max_steps
        evaluate = bool(eval_every) and (state.step % eval_every == 0 or last)
        if state.step % tc.checkpoint_every == 0 or last or evaluate:
            report = {"step": state.step, "loss": m["loss"], "resumed_from": resumed_from}
            if validator is not None:  # rank 0 scores; Tune keeps rank 0's metrics
                val = validator(state.unet, state.text_encoder)
                m.update(val)
                report.update(val)
            if rank == 0:
                if last:  # outputs before the final report: a Tune scheduler (ASHA at max_t)
                    write_outputs()  # may stop the trial as soon as it sees that report
                with tempfile.TemporaryDirectory() as tmp:
                    tensors, skeleton = checkpoint_payload(state, metrics)
                    (Path(tmp) / "state.safetensors").write_bytes(tensors)
                    (Path(tmp) / "state.json").write_bytes(skeleton)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"checkpoint-step-{state.step:07d}")
            else:
                ray.train.report(report)
    if rank == 0 and not written:  # resumed from the final checkpoint: nothing trained here
        write_outputs()


class _Validator:
    """``val_instance`` / ``val_prior`` / ``val_score`` on fixed noise and timesteps (rank 0).

    val_instance: denoising MSE of the instance images with the instance prompt (subject fit);
    val_prior: the same on held-out class images with the class prompt (prior kept). Both use the
    same seed in every trial, so ``val_score = val_instance + w * val_prior`` compares trials
    whatever their ``prior_loss_weight``.
    """

    def __init__(self, cfg: RaydbConfig, comps: Any, storage: Storage, cache: Any,
                 prompts: dict[str, torch.Tensor]) -> None:
        from raydb.train.encode_stage import read_encoded

        self.cfg, self.comps = cfg, comps
        self.instance = read_encoded(storage, cache.instance_uri)
        self.holdout = read_encoded(storage, cache.holdout_uri) if cache.num_holdout else None
        self.embeds, self.prompt_ids = prompts["embeds"], prompts["ids"]
        self.weight = cfg.tune.prior_weight_in_score if cfg.tune else 1.0
        self.clip = None
        if cfg.eval.clip_model:  # CLIP-I / CLIP-T on a few sampled images
            from raydb.data.ingest import load_images
            from raydb.train.clip_eval import load_clip

            self.clip = load_clip(cfg.eval.clip_model)
            self.instance_images = load_images(cfg.subject.instance_data, cfg.train.resolution,
                                               storage=storage, center_crop=cfg.train.center_crop)

    def __call__(self, unet: torch.nn.Module,
                 text_encoder: torch.nn.Module | None = None) -> dict[str, float]:
        """Scores ``unet``; with ``text_encoder`` (its LoRA trains) the prompts are re-encoded by
        it, so validation sees the conditioning the adapter will be served with."""
        from raydb.train.evaluate import denoising_loss

        embeds = self.embeds
        if text_encoder is not None:
            was_training = text_encoder.training
            text_encoder.eval()
            with torch.no_grad():
                device = next(text_encoder.parameters()).device
                embeds = text_encoder(self.prompt_ids.to(device))[0].float().cpu()
            text_encoder.train(was_training)
        kw = {"prediction_type": self.comps.prediction_type, "seed": self.cfg.train.seed + 7919}
        out = {"val_instance": denoising_loss(unet, self.comps.noise_scheduler, self.comps.vae,
                                              self.instance, embeds[0:1], **kw)}
        if self.holdout is not None:
            out["val_prior"] = denoising_loss(unet, self.comps.noise_scheduler, self.comps.vae,
                                              self.holdout, embeds[1:2], **kw)
        out["val_score"] = out["val_instance"] + self.weight * out.get("val_prior", 0.0)
        if self.clip is not None:
            from raydb.train.clip_eval import sample_clip_metrics

            clip = sample_clip_metrics(self.cfg, self.comps, unet, self.instance_images, *self.clip)
            out |= {"val_clip_i": clip["clip_i"], "val_clip_t": clip["clip_t"]}
        return out


def _first_kill(spec: str) -> bool:
    """``spec`` is ``"rank:step[:marker-file]"``; with a marker the kill happens only once."""
    parts = spec.split(":", 2)
    marker = parts[2] if len(parts) > 2 else None
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def prepare_encoded(cfg: RaydbConfig, storage: Storage, *, with_holdout: bool = False) -> tuple[Any, bool]:
    """Stages 1-2: prior images (shared cache) and the encode stage. Returns ``(EncodedCache, ran)``.

    ``with_holdout`` also encodes the held-out class images that validation (Tune) scores.
    """
    from raydb.data.ingest import load_images
    from raydb.models.components import resolve_model
    from raydb.train.encode_stage import run_encode_stage
    from raydb.train.run import load_class_images

    tc = cfg.train
    if cfg.prior.enabled and cfg.prior.num_class_images < cfg.cluster.num_workers:
        raise ValueError(f"prior.num_class_images ({cfg.prior.num_class_images}) must be at least "
                         f"cluster.num_workers ({cfg.cluster.num_workers}): class images are split "
                         "across workers")
    _, identity = resolve_model(cfg.model, storage, cfg.workspace)
    instance = load_images(cfg.subject.instance_data, tc.resolution, storage=storage,
                           center_crop=tc.center_crop)
    class_images = load_class_images(cfg, storage)
    holdout = load_class_images(cfg, storage, holdout=True) if with_holdout else None
    return run_encode_stage(cfg, storage, instance, class_images, model_identity=identity,
                            holdout_images=holdout)


def read_class_dataset(storage: Storage, cache: Any):
    """The encoded class rows as an in-memory Ray dataset (split across Train workers).

    Read by the caller's process with pyarrow and handed to Ray with ``from_items``, which builds
    the blocks in this process: the set is small (about 130 kB per 512 px image), any Ray Data read
    or ``from_arrow`` costs tasks in fresh worker processes (seconds of imports each), and a
    streaming read inside a Tune trial is limited to the trial's own tiny CPU share and never
    starts. One block per row (at most 256) lets Ray Train give every worker an equal share.
    """
    import ray

    table = pq.read_table(io.BytesIO(storage.read_bytes(cache.class_uri)))
    return ray.data.from_items(table.to_pylist(), override_num_blocks=max(1, min(table.num_rows, 256)))


def build_trainer(cfg: RaydbConfig, storage: Storage, cache: Any, *,
                  extra_config: dict[str, Any] | None = None, callbacks: list | None = None,
                  class_dataset: Any = None):
    """``(TorchTrainer, run uri)`` for ``cfg`` over an encoded cache (``raydb train`` and Tune).

    The Ray Train run lives in the run folder ``runs/<subject>/<run id>``, so its checkpoints sit
    beside the outputs and a rerun of the same config finds them.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydb.train.run import run_id, run_uri

    if class_dataset is None and cache.num_class:
        class_dataset = read_class_dataset(storage, cache)
    datasets = {"class": class_dataset} if class_dataset is not None else {}
    use_gpu = resolve_use_gpu(cfg)
    storage_path, storage_fs = _storage_location(storage, cfg)
    cpus = cfg.cluster.cpus_per_worker
    name, run = run_id(cfg), run_uri(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "encoded": cache.__dict__, "run": run,
                           "threads_per_worker": max(1, int(cpus)),
                           "test_kill_at": os.environ.get(_KILL_ENV)} | (extra_config or {}),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
    ), run


def train_distributed(cfg: RaydbConfig, storage: Storage | None = None, *, register: bool = True,
                      quiet: bool = False) -> dict[str, Any]:
    """Priors -> encode -> TorchTrainer -> register. Returns the JSON summary of ``raydb train``."""
    from raydb.ray_utils import init_ray
    from raydb.registry import register_adapter
    from raydb.train.run import finished_result, run_uri

    init_ray(cfg)
    storage = storage or Storage(cfg.s3_endpoint_url)
    run = run_uri(cfg)
    finished = storage.read_json_or(join(run, "adapter", "adapter.json"))
    if finished and finished.get("metrics", {}).get("steps", 0) >= cfg.train.max_steps:
        return finished_result(cfg, storage, run, finished, register=register, quiet=quiet)
    cache, _ = prepare_encoded(cfg, storage)
    trainer, run = build_trainer(cfg, storage, cache)
    trainer.fit()
    result = json.loads(storage.read_bytes(join(run, "result.json")))
    if register:
        result["registered"] = register_adapter(storage, cfg.workspace, cfg.subject.id,
                                                result["adapter_uri"])["uri"]
    return result
