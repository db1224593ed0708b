"""How the training step runs on its device: mixed precision, CUDA graphs, and the speed options
channels_last, fused AdamW and ``torch.compile``.

``resolve_mixed_precision`` and ``use_cuda_graphs`` turn ``auto`` into a decision for the device.
None of the speed options changes the math; they change how the same step is laid out on the device:

* ``train.channels_last`` stores the UNet's conv weights (and hence its activations) as NHWC,
  which cuDNN's tensor-core kernels prefer (1.24-1.36x on an H200). ``auto`` turns it on for CUDA
  only; on CPU it has not been measured to help.
* ``train.fused_adam`` uses AdamW's single fused kernel instead of the multi-tensor ``foreach``
  path. ``auto``: on CUDA.
* ``train.compile`` runs the training UNet through ``torch.compile``. ``full`` compiles the whole
  forward (and, through AOTAutograd, its backward) as one graph, which removes most of the
  per-kernel host overhead that dominates small LoRA steps on a big GPU. It compiles a separate
  wrapper, so the eager UNet (same parameters) still serves validation and sample images without
  recompiling for ``no_grad``. It is refused on CPU with inductor, where it computes wrong LoRA
  gradients (``bench/compile_parity.py``); on CUDA, ``bench/gpu_truth.py`` checks its first step
  against eager. ``blocks`` compiles each ``BasicTransformerBlock`` and ``ResnetBlock2D`` in place
  (regional compilation: blocks of one shape share a compiled graph, so the compile is far
  shorter; its gradients match eager with inductor on CPU), and those blocks stay compiled for
  evaluation too. For FLUX.1 the blocks are its ``FluxTransformerBlock`` (double-stream) and
  ``FluxSingleTransformerBlock``; channels_last has no convolution to act on there (a no-op).
"""

from __future__ import annotations

import torch

from raydb.config import TrainConfig

__all__ = ["use_channels_last", "use_fused_adam", "prepare_unet", "compile_for_training",
           "resolve_mixed_precision", "use_cuda_graphs"]

# the repeated blocks of each denoiser: SD/SDXL's UNet, FLUX.1's transformer (double, single stream)
_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def _on_cuda(module: torch.nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def use_channels_last(tc: TrainConfig, unet: torch.nn.Module) -> bool:
    return _on_cuda(unet) if tc.channels_last == "auto" else bool(tc.channels_last)


def use_fused_adam(tc: TrainConfig, params: list[torch.nn.Parameter]) -> bool:
    if tc.fused_adam == "auto":
        return bool(params) and params[0].device.type == "cuda"
    return bool(tc.fused_adam)


def resolve_mixed_precision(tc: TrainConfig, device: torch.device | str) -> str:
    """``train.mixed_precision`` for training on ``device``: ``no``, ``fp16`` or ``bf16``.

    ``auto``: bf16 on CUDA devices with bf16 tensor cores (compute capability 8.0+, Ampere and
    later), fp16 on older GPUs, ``no`` on CPU (and always ``no`` with ``train.dtype=float64``,
    the exactness mode). An explicit value is returned as is.
    """
    if tc.mixed_precision != "auto":
        return tc.mixed_precision
    device = torch.device(device)
    if tc.dtype == "float64" or device.type != "cuda":
        return "no"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def use_cuda_graphs(tc: TrainConfig, device: torch.device | str) -> bool:
    """Whether the training step runs as captured CUDA graphs (``raydb.train.graphs``).

    ``auto``: on CUDA, unless the resolved precision is fp16 (GradScaler decides on the host
    whether to skip a step, which a graph cannot capture). ``on`` where that is impossible raises
    an error naming the field. ``train.compile`` composes: compiled kernels are captured too.
    """
    device = torch.device(device)
    mode = tc.cuda_graphs
    precision = resolve_mixed_precision(tc, device)
    if mode == "auto":
        return device.type == "cuda" and precision != "fp16"
    if mode == "on":
        if device.type != "cuda":
            raise ValueError(f"train.cuda_graphs: 'on' needs a CUDA device; this run trains on "
                             f"{device.type} (use 'auto' or 'off')")
        if precision == "fp16":
            raise ValueError("train.cuda_graphs: 'on' cannot run with fp16 (train.mixed_precision "
                             "resolves to 'fp16'): GradScaler reads its inf check on the host to "
                             "skip steps, which a CUDA graph cannot capture; use bf16 or "
                             "cuda_graphs 'off'")
        return True
    return False


def _check_backend(tc: TrainConfig) -> None:
    from torch import _dynamo

    known = _dynamo.list_backends(exclude_tags=())
    if tc.compile_backend not in known:
        raise ValueError(f"train.compile_backend: unknown torch.compile backend "
                         f"{tc.compile_backend!r}; this torch has {', '.join(sorted(known))}")


def prepare_unet(tc: TrainConfig, unet: torch.nn.Module) -> None:
    """In place, after LoRA is added: memory format and (``compile='blocks'``) regional compile."""
    if use_channels_last(tc, unet):
        unet.to(memory_format=torch.channels_last)
    if tc.compile == "blocks":
        from torch import _dynamo

        _check_backend(tc)
        blocks = [m for m in unet.modules() if type(m).__name__ in _BLOCKS]
        # one compiled graph per distinct block signature (channels, resolution, up/down): SD's
        # UNet has more than dynamo's default limit of 8 per code object, and hitting the limit
        # silently falls back to eager
        limit = max(_dynamo.config.recompile_limit, 4 * len(blocks))
        _dynamo.config.recompile_limit = limit
        _dynamo.config.accumulated_recompile_limit = max(
            _dynamo.config.accumulated_recompile_limit, 8 * limit)
        for block in blocks:
            block.compile(backend=tc.compile_backend)


def compile_for_training(tc: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The module the training step calls: ``torch.compile(model)`` under ``compile='full'``.

    ``model`` may be the UNet or its DDP wrapper (compiling the wrapper lets dynamo split the
    graph at DDP's bucket boundaries so gradient all-reduce overlaps the backward).
    """
    if tc.compile != "full":
        return model
    _check_backend(tc)
    if tc.compile_backend == "inductor" and not _on_cuda(model):
        # Measured with torch 2.13 on the tiny UNet: inductor's CPU code for the whole graph gives
        # wrong LoRA gradients in the down and mid blocks (grad norm 0.147 instead of 0.170), while
        # the same graph through aot_eager / aot_eager_decomp_partition, and compile='blocks' with
        # inductor, match eager (bench/compile_parity.py). Refuse rather than train on them.
        raise ValueError("train.compile: 'full' with the inductor backend is refused on CPU (it "
                         "computes wrong LoRA gradients there; see bench/compile_parity.py); use "
                         "'blocks', or compile_backend='aot_eager'")
    return torch.compile(model, backend=tc.compile_backend)
