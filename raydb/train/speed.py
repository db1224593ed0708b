"""Speed options of the training step: channels_last, fused AdamW and ``torch.compile``.

None of them changes the math; they change how the same step is laid out on the device:

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
  evaluation too.
"""

from __future__ import annotations

import torch

from raydb.config import TrainConfig

__all__ = ["use_channels_last", "use_fused_adam", "prepare_unet", "compile_for_training"]

_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def _on_cuda(module: torch.nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def use_channels_last(tc: TrainConfig, unet: torch.nn.Module) -> bool:
    return _on_cuda(unet) if tc.channels_last == "auto" else bool(tc.channels_last)


def use_fused_adam(tc: TrainConfig, params: list[torch.nn.Parameter]) -> bool:
    if tc.fused_adam == "auto":
        return bool(params) and params[0].device.type == "cuda"
    return bool(tc.fused_adam)


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
