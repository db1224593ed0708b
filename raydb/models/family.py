"""Which model family a diffusers folder holds: ``sd`` (SD 1.x / 2.x) or ``sdxl``.

The family decides everything family-specific (text encoders, conditioning, default resolution,
pipeline class, adapter key layout on export), so it is read from the folder itself — never
guessed from a name: ``model_index.json`` lists the components (SDXL has ``text_encoder_2``), and
the UNet's config says how it is conditioned (SDXL: ``addition_embed_type="text_time"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SD", "SDXL", "FAMILIES", "FamilySpec", "family_spec", "detect_family",
           "family_of_unet_config", "sd_version", "vae_encode_dtype", "check_finite_latents"]

SD = "sd"
SDXL = "sdxl"
FAMILIES = (SD, SDXL)


@dataclass(frozen=True)
class FamilySpec:
    """The facts that differ between families; everything else (loss, step, DDP, checkpoints,
    Tune, registry, pipeline) is shared."""

    name: str
    pipeline_class: str  # the diffusers pipeline that samples from this family
    default_resolution: int  # the resolution the family's base models were trained at
    tokenizers: tuple[str, ...]  # subfolders, in encoder order
    text_encoders: tuple[str, ...]
    pooled_text: bool  # UNet also takes a pooled text embedding + size/crop time ids (SDXL)


_SPECS = {
    SD: FamilySpec(SD, "StableDiffusionPipeline", 512, ("tokenizer",), ("text_encoder",), False),
    SDXL: FamilySpec(SDXL, "StableDiffusionXLPipeline", 1024, ("tokenizer", "tokenizer_2"),
                     ("text_encoder", "text_encoder_2"), True),
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


def detect_family(path: str | Path) -> str:
    """The family of the diffusers folder ``path`` (``sd`` or ``sdxl``).

    Raises ``ValueError`` naming the file when the folder is neither (no UNet config, or a
    ``model_index.json`` that contradicts the UNet).
    """
    path = Path(path)
    unet_json = path / "unet" / "config.json"
    if not unet_json.is_file():
        raise ValueError(f"model family: {unet_json} is missing; {path} is not a diffusers SD/SDXL folder")
    family = family_of_unet_config(_read_json(unet_json))
    index_json = path / "model_index.json"
    if index_json.is_file():
        index = _read_json(index_json)
        listed = SDXL if "text_encoder_2" in index else SD
        if listed != family:
            raise ValueError(
                f"model family: {index_json} describes a {listed} pipeline "
                f"({index.get('_class_name')}) but {unet_json} is a {family} UNet"
            )
    return family


def sd_version(unet_config: dict[str, Any]) -> str:
    """Kohya's ``ss_base_model_version`` for a UNet: ``sd_v1``, ``sd_v2`` or ``sdxl_base_v1-0``.

    SD 2.x is told from 1.x by its OpenCLIP-H text width (cross-attention dim 1024 vs. 768).
    """
    if family_of_unet_config(unet_config) == SDXL:
        return "sdxl_base_v1-0"
    return "sd_v2" if unet_config.get("cross_attention_dim") == 1024 else "sd_v1"
