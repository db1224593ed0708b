"""The training step as CUDA graph(s): the same math as ``optimizer_step``, without the host.

Why: a DreamBooth step at 1 + 1 images on an H100/H200 is ~30 ms of GPU kernels inside a ~200 ms
step; the rest is Python launching ~5,000 kernels. A CUDA graph records those launches once and
replays them with one call, so the GPU, not the host, sets the pace.

What ``GraphStep`` runs, per optimizer step (all tensors on the training device):

  A  ``grads.zero_()``; for each of the k micro-batches (static input buffers ``[N, ...]``, N = 2B
     with prior, one per ``MicroBatch`` field: SDXL's pooled embedding and time ids, FLUX.1's
     sigmas, guidance and text ids included): ``forward_loss`` -> ``(total / k).backward()`` into
     the gradients, which are views of one flat buffer ``grads [P]`` (P = number of LoRA weights
     that receive a gradient, found by the first step's backward), so they never move
  R  (DDP, world > 1) one ``all_reduce`` of ``grads`` and ``/ world``: eager, between the graphs
  B  ``clip_grad_norm_`` -> norm of the clipped gradient -> ``optimizer.step()`` (AdamW; on CUDA
     ``capturable=True``, its step counters and the learning rate are device tensors)

With one process A and B are one graph; under DDP they are two, with the all-reduce eager in
between (NCCL collectives inside a graph need extra care: ``NCCL_ASYNC_ERROR_HANDLING=0``, DDP
built on a side stream, 11+ warm-up iterations; one all-reduce of a few MB per step costs far less
than the launches the graphs save). DDP's ``no_sync`` has nothing to do here: there is no DDP
wrapper on this path, so micro-batches never all-reduce and the one reduction is explicit.
The lr schedule steps on the host (``LambdaLR.step`` fills the lr tensor in place), so the graph
reads each step's lr and never a baked-in one.

Capture: the first ``warmup_steps`` steps run the same functions eagerly on a side stream (they
are real training steps, and they create AdamW's state and the autocast caches outside the
capture), then the next step is captured and every later step replays. Shapes are fixed by the
first batch: a batch of another shape raises (a graph replays fixed shapes; ``make_micro_batch``
never yields a partial batch, so a change means a caller bug); build a new ``GraphStep`` for the
new shape (one explicit re-capture). fp16 needs ``GradScaler``, which decides on the host (with
``.item()``) whether to skip a step; that cannot be captured, so fp16 is refused here.

With ``capture=False`` (the CPU, and CUDA warm-up) the very same functions run eagerly: the CPU
tests compare this path with ``optimizer_step``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from raydb.config import RaydbConfig
from raydb.train.data import MicroBatch
from raydb.train.device_options import resolve_mixed_precision
from raydb.train.step import TrainState, forward_loss

__all__ = ["GraphStep", "tensor_lr"]

# Every field of a micro-batch gets a static buffer: a family's conditioning (SDXL's pooled embeds
# and time ids, Flux's sigmas, guidance and text ids, ...) is whatever MicroBatch carries, so the
# graph-ready step never needs to know which family it runs.
_FIELDS = tuple(f.name for f in dataclasses.fields(MicroBatch))


def _signature(batch: MicroBatch) -> tuple:
    return tuple((name, None if (t := getattr(batch, name)) is None else (tuple(t.shape), t.dtype))
                 for name in _FIELDS)


def tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Make every param group's lr a 0-d tensor on its parameters' device, in place.

    The lr scheduler then writes each step's lr into that tensor (``fill_``), so a captured
    optimizer reads the current lr. Checkpoints keep a plain float (a state-dict hook converts
    it), so a run checkpointed under graphs resumes with or without them.
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            param = group["params"][0]
            # float64 masters keep a float64 lr, so the eager CPU path matches optimizer_step exactly
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=param.device)
    if not getattr(optimizer, "_raydb_tensor_lr", False):
        optimizer.register_state_dict_post_hook(_float_lr_in_state_dict)
        optimizer.register_load_state_dict_post_hook(tensor_lr)
        optimizer._raydb_tensor_lr = True


def _float_lr_in_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    for group in state_dict["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state_dict


def _host_lr(state: TrainState) -> float:
    """This step's lr without a device sync: diffusers' schedules are ``LambdaLR``s."""
    lr = state.optimizer.param_groups[0]["lr"]
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    sched = state.lr_scheduler
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return float(sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch))
    return float(lr)


class GraphStep:
    """One optimizer step over fixed-shape micro-batches, captured as CUDA graph(s) after warm-up.

    Call it like ``optimizer_step`` (same metrics dict); it owns the gradients of ``state.params``
    (views of one flat buffer) from its first call on, so do not mix it with ``optimizer_step``
    on the same state.
    """

    def __init__(
        self, state: TrainState, cfg: RaydbConfig, *, noise_scheduler, prediction_type: str,
        with_prior: bool, vae, capture: bool, warmup_steps: int = 3, world_size: int = 1,
        process_group: Any = None,
    ) -> None:
        if state.scaler is not None:
            raise ValueError("train.mixed_precision: fp16 needs GradScaler, which decides on the host "
                             "whether to skip a step; the graph-ready step does not support it "
                             "(use bf16, or train.cuda_graphs=off)")
        params = state.params
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("the graph-ready step needs all trained parameters in one dtype on "
                             "one device")
        self.device = params[0].device
        if capture and self.device.type != "cuda":
            raise ValueError(f"train.cuda_graphs: capture needs a CUDA device, the parameters are "
                             f"on {self.device.type}")
        self.state, self.cfg = state, cfg
        self.noise_scheduler, self.prediction_type = noise_scheduler, prediction_type
        self.with_prior, self.vae = with_prior, vae
        self.capture, self.warmup_steps = capture, warmup_steps
        self.world_size, self.process_group = world_size, process_group
        self.mixed_precision = resolve_mixed_precision(cfg.train, self.device)
        self.model = state.model if state.model is not None else state.unet
        if capture and warmup_steps < 1:
            raise ValueError("GraphStep: capture needs at least one eager warm-up step (it finds "
                             "which parameters receive gradients)")
        self._grads: torch.Tensor | None = None  # bound after the first backward (_bind_grads)
        self._trained: list[torch.nn.Parameter] = []
        self._views: list[torch.Tensor] = []
        self._static: list[MicroBatch] | None = None
        self._signature: list[tuple] | None = None
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._outputs: tuple[torch.Tensor, ...] | None = None
        self._eager_steps = 0
        if self.device.type == "cuda":
            for group in state.optimizer.param_groups:
                group["capturable"] = True
        tensor_lr(state.optimizer)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    # -------------------------------------------------------------- setup

    def _check_grads(self) -> None:
        """The trained gradients are still the views of the flat buffer (a captured graph wrote
        into those addresses; a ``zero_grad(set_to_none)`` would have replaced them)."""
        if not all(p.grad is not None and p.grad.data_ptr() == v.data_ptr()
                   for p, v in zip(self._trained, self._views, strict=True)):
            raise RuntimeError("GraphStep: the gradients were replaced (zero_grad(set_to_none)?); "
                               "the step owns them from its first call on")

    def _bind_grads(self) -> None:
        """After the first backward: the gradients become views of one flat buffer (fixed
        addresses, one all-reduce, one zero), for exactly the parameters that received one.

        A LoRA layer the loss never reaches (SDXL's first text encoder's last layer: SDXL reads its
        penultimate hidden states) keeps ``grad = None``, as under ``optimizer_step``, so AdamW
        skips it — weight decay included — on both paths. Which parameters get a gradient is a
        property of the model's graph, so the first step's answer holds for every later one.
        """
        self._trained = [p for p in self.state.params if p.grad is not None]
        if not self._trained:
            raise ValueError("GraphStep: no trained parameter received a gradient")
        total = sum(p.numel() for p in self._trained)
        self._grads = torch.zeros(total, dtype=self._trained[0].dtype, device=self.device)
        views = torch.split(self._grads, [p.numel() for p in self._trained])
        self._views = [v.view_as(p) for v, p in zip(views, self._trained, strict=True)]
        for p, v in zip(self._trained, self._views, strict=True):
            v.copy_(p.grad)
            p.grad = v

    def _load(self, micro_batches: list[MicroBatch]) -> None:
        """Copy the step's batches into the static buffers (``non_blocking`` from pinned memory)."""
        sig = [_signature(b) for b in micro_batches]
        if self._signature is None:
            self._signature = sig
            self._static = [MicroBatch(**{
                name: None if (t := getattr(b, name)) is None
                else torch.empty(t.shape, dtype=t.dtype, device=self.device)
                for name in _FIELDS}) for b in micro_batches]
        elif sig != self._signature:
            raise ValueError(
                "GraphStep: the micro-batches changed shape or count (a CUDA graph replays fixed "
                f"shapes): expected {self._signature}, got {sig}; build a new GraphStep to capture "
                "the new shape")
        for static, batch in zip(self._static, micro_batches, strict=True):
            for name in _FIELDS:
                src = getattr(batch, name)
                if src is not None:
                    getattr(static, name).copy_(src, non_blocking=True)

    # -------------------------------------------------------------- the step's parts

    def _forward_backward(self) -> torch.Tensor:
        """A: accumulate the gradients of all micro-batches; returns ``[total, instance, prior]``."""
        tc = self.cfg.train
        n = len(self._static)
        if self._grads is not None:
            self._grads.zero_()
        sums = None
        for batch in self._static:
            parts = forward_loss(
                self.model, self.noise_scheduler, batch, prediction_type=self.prediction_type,
                prior_loss_weight=tc.prior_loss_weight, with_prior=self.with_prior, vae=self.vae,
                text_encoder=self.state.text_encoder, mixed_precision=self.mixed_precision,
                autocast_cache=not self.capture, text_encoder_2=self.state.text_encoder_2,
                loss_weighting=tc.flow.weighting, prior_mode=self.cfg.prior.mode,
            )
            (parts.total / n).backward()
            prior = parts.prior if parts.prior is not None else torch.zeros_like(parts.total)
            step_parts = torch.stack([parts.total, parts.instance, prior]).detach().float() / n
            sums = step_parts if sums is None else sums + step_parts
        return sums

    def _reduce(self) -> None:
        """R: average the gradients over the workers (what DDP's all-reduce does)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(self._grads, group=self.process_group)
            self._grads.div_(self.world_size)

    def _update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """B: clip, measure, step AdamW. Returns (norm before clipping, norm applied)."""
        params = self._trained
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        clipped = torch.nn.utils.get_total_norm([p.grad for p in params]).float()
        self.state.optimizer.step()
        return grad_norm.float(), clipped

    def _eager(self) -> tuple[torch.Tensor, ...]:
        sums = self._forward_backward()
        if self._grads is None:  # the first step: bind what the backward filled
            self._bind_grads()
        self._reduce()
        return (sums, *self._update())

    def _capture(self) -> tuple[torch.Tensor, ...]:
        """Record the step (it does not run during capture; the caller replays it)."""
        pool = torch.cuda.graph_pool_handle()
        first = torch.cuda.CUDAGraph()
        with torch.cuda.graph(first, pool=pool):
            sums = self._forward_backward()
            if self.world_size == 1:
                outputs = (sums, *self._update())
        self._graphs = [first]
        if self.world_size > 1:
            second = torch.cuda.CUDAGraph()
            with torch.cuda.graph(second, pool=pool):
                outputs = (sums, *self._update())
            self._graphs.append(second)
        return outputs

    def _replay(self) -> tuple[torch.Tensor, ...]:
        self._graphs[0].replay()
        if len(self._graphs) > 1:
            self._reduce()
            self._graphs[1].replay()
        return self._outputs

    # -------------------------------------------------------------- the step

    def __call__(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step; returns what ``optimizer_step`` returns (one host sync)."""
        start = time.perf_counter()
        state = self.state
        if self._grads is None:
            state.optimizer.zero_grad(set_to_none=True)  # the first backward shows what is trained
        else:
            self._check_grads()
        self._load(micro_batches)
        lr = _host_lr(state)
        if self.captured:
            outputs = self._replay()
        elif not self.capture:
            outputs = self._eager()
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                if self._eager_steps < self.warmup_steps:
                    outputs = self._eager()
                    self._eager_steps += 1
                else:
                    self._outputs = self._capture()
            torch.cuda.current_stream().wait_stream(side)
            if self._outputs is not None:
                outputs = self._replay()
        state.lr_scheduler.step()
        state.step += 1
        sums, grad_norm, clipped = outputs
        values = torch.cat([sums, grad_norm.reshape(1), clipped.reshape(1)]).tolist()  # one sync
        seconds = time.perf_counter() - start
        images = sum(b.size for b in micro_batches)
        totals = dict(zip(("loss", "loss_instance", "loss_prior", "grad_norm", "grad_norm_clipped"),
                          values, strict=True))
        return {"step": state.step, **totals, "lr": lr, "images": images, "seconds": seconds,
                "images_per_s": images / seconds}

