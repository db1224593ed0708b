"""Which model family a diffusers folder holds: ``sd`` (SD 1.x / 2.x), ``sdxl`` or ``flux`` (FLUX.1).

The family decides everything family-specific (text encoders, conditioning, denoiser, training
objective, default resolution, pipeline class, adapter key layout on export), so it is read from
the folder itself — never guessed from a name: the denoiser's config says what it is (a
``FluxTransformer2DModel`` under ``transformer/``, or a UNet under ``unet/`` whose
``addition_embed_type="text_time"`` marks SDXL), and ``model_index.json``, when present, must
agree (SDXL lists ``text_encoder_2``; Flux names ``FluxPipeline``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SD", "SDXL", "FLUX", "FAMILIES", "FamilySpec", "family_spec", "detect_family",
           "family_of_unet_config", "family_of_denoiser", "family_of_denoiser_config", "sd_version",
           "vae_encode_dtype",
           "check_finite_latents", "DEFAULT_TARGETS", "lora_targets", "FLOW_MATCHING", "check_resolution"]

SD = "sd"
SDXL = "sdxl"
FLUX = "flux"
FAMILIES = (SD, SDXL, FLUX)
FLOW_MATCHING = "flow_matching"  # FLUX.1's prediction type: the velocity noise - latents


@dataclass(frozen=True)
class FamilySpec:
    """The facts that differ between families; everything else (loss, step, DDP, checkpoints,
    Tune, registry, pipeline) is shared."""

    name: str
    pipeline_class: str  # the diffusers pipeline that samples from this family
    default_resolution: int  # the resolution the family's base models were trained at
    tokenizers: tuple[str, ...]  # subfolders, in encoder order
    text_encoders: tuple[str, ...]
    pooled_text: bool  # the denoiser also takes a pooled text embedding (SDXL, Flux)
    denoiser: str = "unet"  # subfolder of the denoiser: "unet" or "transformer" (Flux)
    # "diffusion": DDPM noise + epsilon / v targets; "flow": rectified flow (x_t = (1 - s) x + s n,
    # target n - x), the objective FLUX.1 was trained with
    objective: str = "diffusion"
    cuda_dtype: str = "float16"  # half precision for sampling on CUDA (Flux: bf16, as released)


_SPECS = {
    SD: FamilySpec(SD, "StableDiffusionPipeline", 512, ("tokenizer",), ("text_encoder",), False),
    SDXL: FamilySpec(SDXL, "StableDiffusionXLPipeline", 1024, ("tokenizer", "tokenizer_2"),
                     ("text_encoder", "text_encoder_2"), True),
    FLUX: FamilySpec(FLUX, "FluxPipeline", 1024, ("tokenizer", "tokenizer_2"),
                     ("text_encoder", "text_encoder_2"), True, denoiser="transformer", objective="flow",
                     cuda_dtype="bfloat16"),
}


def family_spec(family: str) -> FamilySpec:
    if family not in _SPECS:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    return _SPECS[family]


def vae_encode_dtype(vae_config: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype to run the VAE encoder in when the model runs in ``dtype``.

    SDXL's VAE overflows in fp16 (activations above 65504 become inf, then NaN latents); its
    config says so with ``force_upcast``, and it is then run in fp32. bf16 has fp32's range.
    """
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast") else dtype


def check_finite_latents(mean: torch.Tensor, std: torch.Tensor, what: str) -> None:
    """Refuse non-finite latents before they reach a cache (a NaN would poison every step)."""
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ValueError(f"{what}: the VAE produced non-finite latents (inf/NaN); encode in fp32 "
                         "(train.mixed_precision=no) or use a VAE that is fp16-safe")


def family_of_unet_config(unet_config: dict[str, Any]) -> str:
    """``sdxl`` for a UNet with SDXL's pooled-text + size/crop conditioning, else ``sd``."""
    return SDXL if unet_config.get("addition_embed_type") == "text_time" else SD


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model family: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model family: {path} is not a JSON object")
    return data


def _flux_transformer(config: dict[str, Any]) -> bool:
    return config.get("_class_name") == "FluxTransformer2DModel"


def detect_family(path: str | Path) -> str:
    """The family of the diffusers folder ``path`` (``sd``, ``sdxl`` or ``flux``).

    Raises ``ValueError`` naming the file when the folder is none of them (no UNet or Flux
    transformer config, or a ``model_index.json`` that contradicts the denoiser).
    """
    path = Path(path)
    unet_json = path / "unet" / "config.json"
    transformer_json = path / "transformer" / "config.json"
    index_json = path / "model_index.json"
    index = _read_json(index_json) if index_json.is_file() else None
    if transformer_json.is_file() and not unet_json.is_file():
        config = _read_json(transformer_json)
        if not _flux_transformer(config):
            raise ValueError(f"model family: {transformer_json} is a {config.get('_class_name')!r}; "
                             "raydb trains FluxTransformer2DModel transformers (FLUX.1)")
        listed = (index.get("transformer") or [None, None])[-1] if index is not None else None
        if index is not None and (index.get("_class_name") != "FluxPipeline"
                                  or listed != "FluxTransformer2DModel"):
            raise ValueError(f"model family: {index_json} describes a {index.get('_class_name')} pipeline "
                             f"but {transformer_json} is a FLUX.1 transformer")
        return FLUX
    if not unet_json.is_file():
        raise ValueError(f"model family: neither {unet_json} nor {transformer_json} exists; {path} is "
                         "not a diffusers SD/SDXL/FLUX.1 folder")
    family = family_of_unet_config(_read_json(unet_json))
    if index is not None:
        listed = SDXL if "text_encoder_2" in index else SD
        if listed != family or "transformer" in index:
            raise ValueError(
                f"model family: {index_json} describes a {index.get('_class_name')} pipeline "
                f"but {unet_json} is a {family} UNet"
            )
    return family


def sd_version(unet_config: dict[str, Any]) -> str:
    """Kohya's ``ss_base_model_version`` for a UNet: ``sd_v1``, ``sd_v2`` or ``sdxl_base_v1-0``.

    SD 2.x is told from 1.x by its OpenCLIP-H text width (cross-attention dim 1024 vs. 768).
    """
    if family_of_unet_config(unet_config) == SDXL:
        return "sdxl_base_v1-0"
    return "sd_v2" if unet_config.get("cross_attention_dim") == 1024 else "sd_v1"


# The denoiser modules LoRA targets by default (``lora.target_modules`` unset). SD/SDXL: the UNet's
# attention projections. FLUX.1: the attention of both block kinds (image stream ``to_*``, text
# stream ``add_*`` / ``to_add_out``; single blocks share ``to_q/k/v``) and the MLPs (double blocks'
# ``ff`` / ``ff_context``, single blocks' ``proj_mlp``). Single blocks' ``proj_out`` is the output
# projection of their attention and MLP together, but its name is also the transformer's final
# layer's, which peft's suffix rule cannot tell apart; list ``proj_out`` to adapt both.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    SD: ("to_q", "to_k", "to_v", "to_out.0"),
    SDXL: ("to_q", "to_k", "to_v", "to_out.0"),
    FLUX: ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"),
}


def family_of_denoiser_config(config: dict[str, Any]) -> str:
    """The family of a denoiser's config (``unet/`` or ``transformer/config.json``)."""
    return FLUX if _flux_transformer(config) else family_of_unet_config(config)


def family_of_denoiser(module: torch.nn.Module) -> str:
    """The family of a loaded denoiser: ``flux`` for a FLUX.1 transformer, else the UNet's."""
    if type(module).__name__ == "FluxTransformer2DModel":
        return FLUX
    return family_of_denoiser_config(dict(getattr(module, "config", {}) or {}))


def lora_targets(target_modules: list[str] | None, family: str) -> list[str]:
    """The denoiser's LoRA targets: ``lora.target_modules`` when set, else the family's default."""
    if target_modules is not None:
        return list(target_modules)
    return list(DEFAULT_TARGETS[family_spec(family).name])


def check_resolution(resolution: int, family: str) -> None:
    """Refuse a ``train.resolution`` the family cannot train at: FLUX.1 packs its 8x-downsampled
    latents in 2x2 patches, so its sides are multiples of 16 (SD/SDXL: 8, checked by the config)."""
    if family == FLUX and resolution % 16:
        raise ValueError(f"train.resolution: FLUX.1 needs a multiple of 16 (8x VAE, 2x2 latent "
                         f"packing), got {resolution}")
