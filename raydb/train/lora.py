"""LoRA through peft on the denoiser's projections (and optionally the text encoder).

The denoiser is the UNet (SD/SDXL: attention projections by default) or FLUX.1's transformer
(attention and MLP projections by default, ``raydb.models.family.DEFAULT_TARGETS``).

Initialisation follows diffusers' DreamBooth-LoRA script: ``init_lora_weights="gaussian"``, so
``lora_B`` starts at zero and the adapted model equals the base model at step 0. Trainable LoRA
parameters are kept in fp32 even when the frozen base runs in fp16/bf16, because optimizer updates
of ~1e-4 relative size vanish in half precision.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from raydb.config import LoraConfig
from raydb.models.family import FLUX, family_of_denoiser, lora_targets
from raydb.registry import ADAPTER_WEIGHTS

__all__ = ["add_lora", "trainable_parameters", "lora_disabled", "lora_state_dicts", "save_lora",
           "load_lora_state", "canonical_header", "read_safetensors_header"]


def add_lora(
    unet: torch.nn.Module, cfg: LoraConfig, text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> list[torch.nn.Parameter]:
    """Inject LoRA layers; return the trainable parameters. Base weights stay frozen.

    With ``lora.train_text_encoder`` every given text encoder gets LoRA layers too (SDXL passes
    its second encoder as ``text_encoder_2``). The LoRA parameters are fp32 master weights
    whatever the base dtype (fp16/bf16 under mixed precision), except over a float64 base
    (``train.dtype``), where they are float64 too.
    """
    encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]
    if cfg.train_text_encoder and not encoders:
        raise ValueError("lora.train_text_encoder needs the text encoder")
    family = family_of_denoiser(unet)
    targets = lora_targets(cfg.target_modules, family)
    # checked before anything is injected, so a bad config leaves every module untouched
    _check_targets(unet, targets, "lora.target_modules", "the transformer" if family == FLUX else "the UNet")
    for encoder in encoders if cfg.train_text_encoder else []:
        _check_targets(encoder, cfg.text_encoder_target_modules, "lora.text_encoder_target_modules",
                       "the text encoder")
    master = torch.float64 if next(unet.parameters()).dtype == torch.float64 else torch.float32
    unet.requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.dropout,
        init_lora_weights="gaussian", target_modules=targets,
    ))
    if cfg.train_text_encoder:
        for encoder in encoders:
            encoder.requires_grad_(False)
            # peft's own injection (what diffusers' add_adapter does for the UNet): transformers'
            # add_adapter refuses peft versions older than the one it was released against.
            inject_adapter_in_model(PeftLoraConfig(
                r=cfg.rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.dropout,
                init_lora_weights="gaussian", target_modules=list(cfg.text_encoder_target_modules),
            ), encoder)
    params = trainable_parameters(unet, *(encoders if cfg.train_text_encoder else []))
    for p in params:
        p.data = p.data.to(master)
    return params


def _check_targets(module: torch.nn.Module, targets: list[str], field: str, what: str) -> None:
    """peft's rule for a list of targets: a module whose name equals a target or ends with
    ``"." + target``. peft's own error for no match does not name our config field."""
    names = [name for name, _ in module.named_modules()]
    if not any(name == t or name.endswith("." + t) for name in names for t in targets):
        raise ValueError(f"{field} {list(targets)} matched no module of {what}")


def trainable_parameters(*modules: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


@contextlib.contextmanager
def lora_disabled(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Inside: every LoRA layer of ``modules`` (None skipped; wrappers such as DDP or a compiled
    module are searched through) computes its base layer only — the frozen base model.

    peft's ``enable_adapters`` also flips ``requires_grad`` of the LoRA weights; each weight's flag
    is restored on exit, so what trains (and what DDP and AdamW track) is unchanged afterwards.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {id(m): m for module in modules if module is not None for m in module.modules()
              if isinstance(m, BaseTunerLayer)}.values()
    saved = [(m, m.disable_adapters, [(p, p.requires_grad) for p in m.parameters()]) for m in layers]
    try:
        for m, _, _ in saved:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled, flags in saved:
            m.enable_adapters(not was_disabled)
            for p, flag in flags:
                p.requires_grad_(flag)


_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def lora_state_dicts(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None, *, dtype: torch.dtype | None = torch.float32,
) -> dict[str, dict[str, torch.Tensor]]:
    """peft-format LoRA state dicts ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}``
    on CPU (an encoder appears only when it carries LoRA layers), in ``dtype`` (fp32 for adapter
    files); ``dtype=None`` keeps the master weights' dtype, which checkpoints need: a float64 run
    resumed from fp32-rounded weights would no longer match an uninterrupted one."""
    from peft.utils import get_peft_model_state_dict

    def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        weights = get_peft_model_state_dict(module)
        return {k: v.detach().to("cpu", dtype or v.dtype) for k, v in weights.items()}

    out = {"unet": state(unet)}
    for name, encoder in zip(_ENCODER_NAMES, (text_encoder, text_encoder_2), strict=True):
        if encoder is not None and getattr(encoder, "peft_config", None):
            out[name] = state(encoder)
    return out


def load_lora_state(
    unet: torch.nn.Module, states: dict[str, dict[str, torch.Tensor]],
    text_encoder: torch.nn.Module | None = None, text_encoder_2: torch.nn.Module | None = None,
) -> None:
    """Restore LoRA weights saved by :func:`lora_state_dicts` (checkpoint resume)."""
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(unet, states["unet"])
    for name, encoder in zip(_ENCODER_NAMES, (text_encoder, text_encoder_2), strict=True):
        if encoder is not None and name in states:
            set_peft_model_state_dict(encoder, states[name])


def save_lora(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> bytes:
    """The adapter as ``pytorch_lora_weights.safetensors`` bytes, in diffusers' LoRA format.

    Keys are ``unet.…``, ``text_encoder.…`` and (SDXL) ``text_encoder_2.…``; loadable by
    ``StableDiffusionPipeline.load_lora_weights`` / ``StableDiffusionXLPipeline.load_lora_weights``.
    For a FLUX.1 transformer (``unet`` is the denoiser) the keys are ``transformer.…`` and
    ``text_encoder.…`` (CLIP) in peft's ``lora_A`` / ``lora_B`` spelling, as
    ``FluxPipeline.save_lora_weights`` writes and ``FluxPipeline.load_lora_weights`` reads them.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    if family_of_denoiser(unet) == FLUX:
        return _save_flux_lora(unet, text_encoder)
    states = lora_state_dicts(unet, text_encoder, text_encoder_2)
    layers = {name: convert_state_dict_to_diffusers(state) for name, state in states.items()}
    modules = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    # Without the adapter config in the file header the loader assumes lora_alpha == rank, so an
    # adapter trained with lora.alpha != lora.rank would be served at the wrong scale.
    kwargs = {f"{name}_lora_layers": layers.get(name) for name in modules} | {
        f"{name}_lora_adapter_metadata": _adapter_metadata(module) if name in layers else None
        for name, module in modules.items()
    }
    # Both classes write the same format; only SDXL's knows a second text encoder.
    saver = StableDiffusionXLPipeline if "text_encoder_2" in layers else StableDiffusionPipeline
    if saver is StableDiffusionPipeline:
        kwargs = {k: v for k, v in kwargs.items() if "text_encoder_2" not in k}
    with tempfile.TemporaryDirectory() as tmp:
        saver.save_lora_weights(tmp, safe_serialization=True, weight_name=ADAPTER_WEIGHTS, **kwargs)
        return canonical_header((Path(tmp) / ADAPTER_WEIGHTS).read_bytes())


def _save_flux_lora(transformer: torch.nn.Module, text_encoder: torch.nn.Module | None) -> bytes:
    from diffusers import FluxPipeline

    states = lora_state_dicts(transformer, text_encoder)
    kwargs = {"transformer_lora_layers": states["unet"],
              "transformer_lora_adapter_metadata": _adapter_metadata(transformer)}
    if "text_encoder" in states:
        kwargs |= {"text_encoder_lora_layers": states["text_encoder"],
                   "text_encoder_lora_adapter_metadata": _adapter_metadata(text_encoder)}
    with tempfile.TemporaryDirectory() as tmp:
        FluxPipeline.save_lora_weights(tmp, safe_serialization=True, weight_name=ADAPTER_WEIGHTS, **kwargs)
        return canonical_header((Path(tmp) / ADAPTER_WEIGHTS).read_bytes())


def _adapter_metadata(module: torch.nn.Module | None) -> dict | None:
    """The peft LoraConfig (rank, alpha, targets) of ``module``'s adapter, as diffusers stores it."""
    config = (getattr(module, "peft_config", None) or {}).get("default")
    if config is None:
        return None
    # Sets (target_modules) are sorted so the adapter bytes do not depend on the hash seed.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def read_safetensors_header(data: bytes) -> tuple[dict, int]:
    """``(header, data_offset)`` of safetensors bytes: the JSON header (tensor entries and
    ``__metadata__``) and where the tensor bytes start."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), 8 + size


def canonical_header(data: bytes, metadata_update: dict[str, str] | None = None) -> bytes:
    """Rewrite a safetensors header with sorted keys (and ``metadata_update`` merged into its
    ``__metadata__``); tensor bytes are left untouched.

    safetensors writes ``__metadata__`` from a Rust HashMap, whose order changes per process, so
    the same adapter would otherwise get a different sha256 in every worker and rerun.
    """
    header, offset = read_safetensors_header(data)
    if metadata_update:
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata_update}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + data[offset:]
