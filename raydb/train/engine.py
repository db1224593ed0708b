"""The training loops' step: prefetched batches, then the graph step or ``optimizer_step``.

Both loops (``train/local.py`` in one process, ``train/stage.py`` in each Ray Train worker) call
``TrainEngine.step()`` once per optimizer step:

* batches always come from ``BatchPrefetcher`` (a background thread builds exactly what
  ``step_micro_batches`` builds, from the current step on, for this rank), so building them is off
  the step's critical path; on the CPU the tensors are identical, so nothing changes numerically;
* the update is ``GraphStep`` (captured CUDA graphs) when ``train.cuda_graphs`` resolves on — the
  graph path replaces DDP's hooks by one explicit all-reduce of the flat gradient buffer — and
  today's ``optimizer_step`` (through the DDP wrapper when there is one) otherwise;
* with ``train.compile`` and ``train.compile_cache`` set, the workspace compile cache
  (``raydb/compile_cache.py``) is loaded before the first step and saved after the first ``SAVE_AFTER``
  steps of a cold run. It is opt-in because torch deserializes its artifacts with pickle.

Validation and sampling stay eager: they call ``state.unet`` outside any graph.

Two keyword seams exist for measuring and testing this very loop (``bench/`` drives it, never a
copy): ``prefetch=False`` builds each step's batches in the calling thread, on the step's critical
path (the same ``step_micro_batches`` tensors; the baseline the prefetcher is measured against), and
``graph_step`` forces the graph step (True) or ``optimizer_step`` (False) instead of resolving
``train.cuda_graphs``; off CUDA the graph step runs its own eager path (``capture=False``), which is
how the CPU checks its math against ``optimizer_step``.
"""

from __future__ import annotations

from typing import Any

import torch

from raydb.compile_cache import CompileCache, compile_cache_key
from raydb.config import RaydbConfig
from raydb.storage import Storage
from raydb.train.data import MicroBatch, TrainingData, step_micro_batches
from raydb.train.device_options import resolve_mixed_precision, use_cuda_graphs
from raydb.train.graphs import GraphStep
from raydb.train.prefetch import BatchPrefetcher
from raydb.train.step import TrainState, optimizer_step

__all__ = ["TrainEngine", "engine_compile_cache"]

SAVE_AFTER = 5  # steps: the graph step's warm-up (3) + capture + one replay have compiled everything


def engine_compile_cache(cfg: RaydbConfig, storage: Storage, *, model_identity: str,
                         device: torch.device, data: TrainingData, graphs: bool) -> CompileCache:
    """The workspace compile-cache entry of this run's compiled step (see ``raydb/compile_cache.py``)."""
    tc = cfg.train
    n = tc.batch_size * (2 if data.with_prior else 1)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    key, parts = compile_cache_key(
        model_identity=model_identity, device_name=device_name,
        shapes={"micro_batch": [n, *data.latent_shape], "accumulation": tc.gradient_accumulation_steps,
                "cached_latents": not isinstance(data.instance, torch.Tensor)},
        options={"compile": tc.compile, "backend": tc.compile_backend, "cuda_graphs": graphs,
                 "mixed_precision": resolve_mixed_precision(tc, device), "dtype": tc.dtype,
                 "channels_last": tc.channels_last, "gradient_checkpointing": tc.gradient_checkpointing,
                 "lora": cfg.lora.model_dump(mode="json")})
    return CompileCache(storage, cfg.workspace, key, parts)


class TrainEngine:
    """``step()``: one optimizer step of the run from ``state.step`` on (build it after a restore).

    ``prefetch`` / ``graph_step``: the measuring seams described in the module docstring; training
    code leaves them at their defaults.
    """

    def __init__(self, cfg: RaydbConfig, state: TrainState, data: TrainingData, *, noise_scheduler,
                 prediction_type: str, vae, device: torch.device | str, rank: int = 0,
                 world_size: int = 1, model: torch.nn.Module | None = None,
                 compile_cache: CompileCache | None = None, prefetch: bool = True,
                 graph_step: bool | None = None) -> None:
        self.cfg, self.state, self.model, self.data = cfg, state, model, data
        self.device = torch.device(device)
        self.graphs = use_cuda_graphs(cfg.train, self.device) if graph_step is None else graph_step
        self.kw: dict[str, Any] = dict(noise_scheduler=noise_scheduler, prediction_type=prediction_type,
                                       with_prior=data.with_prior, vae=vae)
        self._batch_args = dict(num_train_timesteps=noise_scheduler.config.num_train_timesteps,
                                rank=rank, world_size=world_size)
        self.prefetcher = BatchPrefetcher(
            data, cfg.train, start_step=state.step, stop_step=cfg.train.max_steps, device=self.device,
            **self._batch_args) if prefetch else None
        self.graph_step = GraphStep(state, cfg, capture=self.device.type == "cuda",
                                    world_size=world_size, **self.kw) if self.graphs else None
        # opt-in (train.compile_cache): torch unpickles its artifacts
        use_cache = cfg.train.compile != "off" and cfg.train.compile_cache
        self.compile_cache = compile_cache if use_cache else None
        if self.compile_cache is not None:
            self.compile_cache.load()
        self._steps = 0

    def _batches(self, *, to_device: bool) -> list[MicroBatch]:
        if self.prefetcher is not None:
            return self.prefetcher.next(to_device=to_device)
        return step_micro_batches(self.data, self.cfg.train, step=self.state.step,
                                  device=self.device if to_device else "cpu", **self._batch_args)

    def step(self) -> dict[str, float]:
        """The next step's batches through the update; returns ``optimizer_step``'s metrics."""
        if self.graph_step is not None:
            m = self.graph_step(self._batches(to_device=False))
        else:
            m = optimizer_step(self.state, self._batches(to_device=True), cfg=self.cfg, model=self.model,
                               **self.kw)
        self._steps += 1
        if self.compile_cache is not None and self._steps == SAVE_AFTER:
            self.compile_cache.save()
        return m

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def __enter__(self) -> TrainEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
