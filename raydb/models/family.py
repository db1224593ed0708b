"""Which model family a diffusers folder holds: ``sd`` (SD 1.x / 2.x) or ``sdxl``.

The family decides everything family-specific (text encoders, conditioning, default resolution,
pipeline class, adapter key layout on export), so it is read from the folder itself — never
guessed from a name: ``model_index.json`` lists the components (SDXL has ``text_encoder_2``), and
the UNet's config says how it is conditioned (SDXL: ``addition_embed_type="text_time"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SD", "SDXL", "FAMILIES", "detect_family", "family_of_unet_config", "sd_version"]

SD = "sd"
SDXL = "sdxl"
FAMILIES = (SD, SDXL)


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
