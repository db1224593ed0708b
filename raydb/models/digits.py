"""The ``digits`` base model: Stable Diffusion's architecture, small, *trained* on real digits.

Unlike ``tiny`` (random weights), this model has learned something: asked for "a drawing of a
three" it draws a recognizable three, black on white, 32 x 32 px. That is what lets raydb show
DreamBooth's claims (the subject is learned; prior preservation keeps the class) on a model that
can actually drift. Its parts are the real ones at toy widths:

- ``AutoencoderKL`` with three levels: 32 x 32 x 3 pixels <-> 8 x 8 x 4 latents (factor 4, not SD's
  8: an 8 x 8 digit needs 8 x 8 latents). It was trained on digits in random ink and background
  colours, so it can reconstruct colours the UNet never drew (the subject's red on yellow);
- ``UNet2DConditionModel`` (32, 64 channels, cross-attention on the text) trained on black-on-white
  digits to denoise under prompts that name the digit (:func:`raydb.data.digits.digit_prompt`);
- a CLIP text encoder with seeded *random*, frozen weights and a CLIP tokenizer whose vocabulary is
  built in code: the UNet learned to read its embeddings;
- a ``DDIMScheduler`` with SD 1.x's noise schedule.

The trained weights ship with raydb (``raydb/models/weights/digits/``, safetensors, fp16 for the
VAE and UNet) together with ``provenance.json`` (the recipe's settings, the data's sha256, the
weights' sha256 and the measured figures). :func:`build_untrained` builds the same architecture
with seeded random weights: the starting point of :mod:`raydb.models.digits_recipe`, which
retrains the shipped weights (``make digits-base``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from raydb.data.digits import DIGIT_NAMES

__all__ = ["DIGITS_SPEC", "WEIGHTS_DIR", "DigitsParts", "build_untrained", "digits_identity",
           "save_digits_model", "digits_weights_dir"]

# Part of the model's identity: bump "version" when the architecture or vocabulary changes.
DIGITS_SPEC: dict[str, Any] = {
    "version": 1,
    "seed": 2026,
    "resolution": 32,
    "unet": {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    "vae": {"block_out_channels": [16, 32, 64], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 8, "sample_size": 32},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    # whole-word tokens: the prompt words, the digits' names and DreamBooth's rare tokens
    "words": ["a", "drawing", "of", "the", "digit", "photo", "sks", "zwx", "red", "yellow",
              *DIGIT_NAMES],
    # SD 1.x's schedule: scaled-linear betas over 1000 steps, epsilon prediction
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon"},
}

# The shipped weights (package data, see pyproject.toml's [tool.setuptools.package-data]).
WEIGHTS_DIR = "weights/digits"


@dataclass
class DigitsParts:
    """The untrained pieces of the digits model (what the recipe trains and saves)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any


def build_untrained(seed: int | None = None) -> DigitsParts:
    """The digits architecture with seeded random weights (``DIGITS_SPEC['seed']`` by default).

    The text encoder's weights are the shipped model's (it never trains); the VAE and UNet are the
    recipe's starting point.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from raydb.models.tiny import build_tiny_tokenizer

    torch.manual_seed(DIGITS_SPEC["seed"] if seed is None else seed)
    tokenizer = build_tiny_tokenizer(words=DIGITS_SPEC["words"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **DIGITS_SPEC["text"]))
    spec_u, spec_v = DIGITS_SPEC["unet"], DIGITS_SPEC["vae"]
    unet = UNet2DConditionModel(
        in_channels=spec_v["latent_channels"], out_channels=spec_v["latent_channels"],
        **{k: tuple(v) if isinstance(v, list) else v for k, v in spec_u.items()})
    levels = len(spec_v["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec_v["latent_channels"],
        block_out_channels=tuple(spec_v["block_out_channels"]),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=spec_v["layers_per_block"], norm_num_groups=spec_v["norm_num_groups"],
        sample_size=spec_v["sample_size"])
    return DigitsParts(tokenizer, text_encoder, vae, unet, DDIMScheduler(**DIGITS_SPEC["scheduler"]))


def save_digits_model(parts: DigitsParts, path: str | Path, *, identity: str) -> Path:
    """``save_pretrained`` the parts as a diffusers folder: VAE and UNet in fp16 (they train in
    fp32; fp16 halves the shipped bytes and loads back into fp32), the text encoder in fp32."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        vae=parts.vae.to(torch.float16), text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet.to(torch.float16), scheduler=parts.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    parts.vae.to(torch.float32)
    parts.unet.to(torch.float32)
    (path / "raydb_identity.json").write_text(json.dumps({"identity": identity}) + "\n")
    return path


def digits_weights_dir() -> Path:
    """The shipped model folder inside the installed package."""
    folder = Path(str(resources.files("raydb.models"))) / WEIGHTS_DIR
    if not (folder / "raydb_identity.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained: digits: the shipped weights are missing from {folder} "
            "(a broken install, or a checkout before `make digits-base` wrote them)")
    return folder


def digits_identity() -> str:
    """Identity of the shipped digits model, e.g. ``digits-v1-5c0e9a1b`` (recorded by the recipe
    from the weights' sha256)."""
    return json.loads((digits_weights_dir() / "raydb_identity.json").read_text())["identity"]


def copy_digits_model(path: str | Path) -> Path:
    """Copy the shipped folder to ``path`` (the built-in models' writer signature, see
    :data:`raydb.models.components.BUILTIN_MODELS`)."""
    shutil.copytree(digits_weights_dir(), path)
    return Path(path)
