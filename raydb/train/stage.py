"""The train stage on Ray Train: a ``TorchTrainer`` whose workers run the core step under DDP.

Driver (``train_distributed``): the encode stage (and the priors before it), then
``TorchTrainer(train_loop_per_worker, datasets={"class": encoded class rows})``; it returns the
finished adapter, which the pipeline registers.
Needs a running Ray cluster (``raydb.cluster.init_ray``, called by the entry points).

Worker (``train_loop_per_worker``): the class rows arrive as this worker's Ray Data shard; the few
instance latents and the prompt embeddings are read from storage by every worker (so a run works
with more workers than instance images). The UNet with LoRA is wrapped in DDP; accumulation
micro-batches run under ``no_sync`` except the last. Every ``train.checkpoint_every`` steps rank 0
reports a checkpoint (rundir.py's payload); a restarted worker group — or a rerun after the driver
died, since the run name and storage path are deterministic — resumes from
``ray.train.get_checkpoint()``. Rank 0 writes the outputs before its final report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from raydb import faults
from raydb.config import RaydbConfig
from raydb.encode.cache import EncodedCache
from raydb.storage import Storage, is_s3, join

__all__ = ["train_distributed", "build_trainer", "train_loop_per_worker", "resolve_use_gpu",
           "storage_location"]


def resolve_use_gpu(cfg: RaydbConfig) -> bool:
    import ray

    if cfg.cluster.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.cluster.use_gpu)


def storage_location(storage: Storage, cfg: RaydbConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: the subject's runs folder."""
    from raydb.train.rundir import runs_uri

    uri = runs_uri(cfg)
    if is_s3(uri):
        fs, path = storage.arrow_fs(uri)
        return path, fs
    Path(uri).mkdir(parents=True, exist_ok=True)
    return str(Path(uri).resolve()), None


def _class_shard(rank: int):
    """This worker's encoded class images (EncodedImages), from its Ray Data shard."""
    import ray.train

    from raydb.encode.cache import rows_to_encoded

    rows: dict[str, list] = {"index": [], "mean": [], "std": [], "shape": [], "time_ids": []}
    for batch in ray.train.get_dataset_shard("class").iter_batches(batch_size=None, batch_format="numpy"):
        for col in rows:
            rows[col].extend(list(batch[col]))
    if not rows["index"]:
        raise RuntimeError(f"worker {rank} received no class images; use at least "
                           "cluster.num_workers class images (prior.num_class_images)")
    return rows_to_encoded(rows)


def _group_metrics(m: dict[str, Any], world: int) -> dict[str, Any]:
    """One step's metrics over all workers: losses averaged, images summed over the slowest
    worker's time."""
    import torch.distributed as dist

    sums = torch.tensor([m["loss"], m["loss_instance"], m["loss_prior"], m["images"]], dtype=torch.float64)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    seconds = torch.tensor([m["seconds"]], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    m["loss"], m["loss_instance"], m["loss_prior"] = (float(x) / world for x in sums[:3])
    m["images"], m["seconds"] = int(sums[3]), float(seconds[0])
    m["images_per_s"] = m["images"] / m["seconds"]
    return m


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker. ``config``: cfg (dict), encoded cache fields, run uri,
    threads per worker, ``eval_every`` (Tune) and the test fault plan."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from raydb.encode.cache import load_prompts, read_encoded
    from raydb.metrics import observe_train_step
    from raydb.models.components import load_components
    from raydb.train.data import flow_inputs, prompt_inputs, training_data
    from raydb.train.device_options import compile_for_training, use_cuda_graphs
    from raydb.train.engine import TrainEngine, engine_compile_cache
    from raydb.train.evaluate import Validator
    from raydb.train.outputs import finish_run
    from raydb.train.progress import ProgressWriter
    from raydb.train.rundir import RESULT, checkpoint_dir_name, restore_checkpoint_dir, write_checkpoint_dir
    from raydb.train.step import build_train_state, weights_dtype

    cfg = RaydbConfig.model_validate(config["cfg"])
    storage, tc = Storage(cfg.s3_endpoint_url), cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    # T5's states come from the encode cache (FLUX.1): T5-XXL is not loaded unless CLIP metrics
    # sample images (eval.clip_model, dino_model, fidelity)
    comps = load_components(cfg.model, storage, cfg.workspace, device=device,
                            dtype=weights_dtype(tc, device), with_t5=cfg.eval.samples_images)
    cache = EncodedCache(**config["encoded"])
    prompts = load_prompts(storage, cache)
    # a search over prior.mode encodes class images for its image-mode trials; model-mode trials
    # without a pool leave them alone and repeat the instance half instead
    data = training_data(read_encoded(storage, cache.instance_uri),
                         _class_shard(rank) if cache.num_class and cfg.prior.uses_class_images else None,
                         **prompt_inputs(prompts, cfg.lora.train_text_encoder), **flow_inputs(tc, comps),
                         prior_from_instance=cfg.prior.from_instance)
    state = build_train_state(cfg, comps.denoiser, *comps.lora_text_encoders)
    model: torch.nn.Module = state.model if state.model is not None else comps.denoiser
    graphs = use_cuda_graphs(tc, device)
    if world > 1 and not graphs:  # the graph step all-reduces its flat gradients itself
        ids = [device.index] if device.type == "cuda" else None
        model = compile_for_training(tc, DistributedDataParallel(comps.denoiser, device_ids=ids))
    metrics: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            metrics = restore_checkpoint_dir(Path(ckpt_dir), state)
    resumed_from = state.step
    eval_every = config.get("eval_every")
    validator = Validator.from_cache(cfg, comps, storage, cache) if eval_every and rank == 0 else None

    def write_outputs() -> None:
        """Rank 0: adapter, metrics, pictures and ``result.json`` (what the driver reads)."""
        result = finish_run(cfg, storage, state, comps, metrics, samples=bool(tc.num_sample_images),
                            extra_metrics={"resumed_from": resumed_from, "num_workers": world},
                            device=device)
        storage.write_json(join(config["run"], RESULT), result | {"resumed_from": resumed_from})

    engine = TrainEngine(
        cfg, state, data, noise_scheduler=comps.noise_scheduler, prediction_type=comps.prediction_type,
        vae=comps.vae, device=device, rank=rank, world_size=world, model=model,
        compile_cache=engine_compile_cache(cfg, storage, model_identity=comps.identity, device=device,
                                           data=data, graphs=graphs))
    progress = ProgressWriter(storage, config["run"], tc.max_steps) if rank == 0 else None
    while state.step < tc.max_steps:
        faults.maybe_die(config.get("faults"), "train_step", rank=rank, step=state.step)
        m = engine.step()
        metrics.append(_group_metrics(m, world) if world > 1 else m)
        if progress is not None:
            progress.update(metrics[-1])
            observe_train_step(cfg.subject.id, metrics[-1])
        last = state.step >= tc.max_steps
        evaluate = bool(eval_every) and (state.step % eval_every == 0 or last)
        if not (state.step % tc.checkpoint_every == 0 or last or evaluate):
            continue
        report = {"step": state.step, "loss": m["loss"], "resumed_from": resumed_from}
        if validator is not None:  # rank 0 scores; Tune keeps rank 0's metrics
            val = validator(state.unet, state.text_encoder, state.text_encoder_2)
            m.update(val)
            report.update(val)
        if rank != 0:
            ray.train.report(report)
            continue
        if last:  # outputs before the final report: a Tune scheduler (ASHA at max_t) may stop
            write_outputs()  # the trial as soon as it sees that report
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint_dir(Path(tmp), state, metrics)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(state.step))
    engine.close()
    if rank == 0 and resumed_from >= tc.max_steps:  # resumed from the final checkpoint
        write_outputs()


def build_trainer(cfg: RaydbConfig, storage: Storage, cache: EncodedCache, *,
                  extra_config: dict[str, Any] | None = None, callbacks: list | None = None,
                  class_dataset: Any = None):
    """``(TorchTrainer, run uri)`` for ``cfg`` over an encoded cache (``raydb train`` and Tune).

    The Ray Train run lives in the run folder ``tenants/<tenant>/runs/<subject>/<run id>``, so its
    checkpoints sit beside the outputs and a rerun of the same config finds them.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydb.encode.stage import read_class_dataset
    from raydb.train.rundir import run_id, run_uri

    if not cfg.prior.uses_class_images:
        class_dataset = None
    elif class_dataset is None and cache.num_class:
        class_dataset = read_class_dataset(storage, cache)
    datasets = {"class": class_dataset} if class_dataset is not None else {}
    use_gpu = resolve_use_gpu(cfg)
    storage_path, storage_fs = storage_location(storage, cfg)
    cpus = cfg.cluster.cpus_per_worker
    name, run = run_id(cfg), run_uri(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "encoded": cache.__dict__, "run": run,
                           "threads_per_worker": max(1, int(cpus)),
                           "faults": faults.plan()} | (extra_config or {}),
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


def train_distributed(cfg: RaydbConfig, storage: Storage | None = None, *, quiet: bool = False,
                      resume: bool = True) -> dict[str, Any]:
    """Encode -> TorchTrainer. Returns the finished adapter's summary (``adapter_uri``, ``run_dir``,
    ``steps``, ``images_per_s``, ``loss``, ``resumed_from``); registers nothing.

    ``resume=False`` deletes the run folder first (checkpoints and any finished adapter): a fresh run.
    """
    from raydb.encode.stage import prepare_encoded
    from raydb.train.outputs import finished_result
    from raydb.train.rundir import RESULT, finished_adapter, run_uri

    storage = storage or Storage(cfg.s3_endpoint_url)
    if not resume:
        storage.delete(run_uri(cfg), recursive=True)
    finished = finished_adapter(cfg, storage)
    if finished:
        return finished_result(cfg, finished, quiet=quiet)
    cache, _ = prepare_encoded(cfg, storage)
    trainer, run = build_trainer(cfg, storage, cache)
    trainer.fit()
    return storage.read_json(join(run, RESULT))
