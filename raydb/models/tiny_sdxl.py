"""The embedded tiny SDXL: Stable Diffusion XL's architecture at toy widths, seeded random weights.

What makes SDXL a different family is kept, only the widths shrink: the UNet is conditioned with
``addition_embed_type="text_time"`` (a pooled text embedding plus six size/crop numbers per image,
``add_time_ids``), its cross-attention reads the concatenated hidden states of *two* text
encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, whose projected pooled output is
the pooled embedding), it uses linear projections in the transformer blocks and several
transformer layers per block, a VAE with SDXL's scaling factor and ``force_upcast`` (SDXL's VAE
overflows in fp16), and SDXL's Euler schedule. Down/up blocks follow SDXL's order (a plain block
first, then cross-attention blocks) with SDXL's two resnets per level, so adapter key names (and
their kohya/SGM mapping) are the ones a real SDXL checkpoint produces. Both tokenizers are built in
code (:func:`raydb.models.tiny.build_tiny_tokenizer`); written with ``save_pretrained``, loaded by
``StableDiffusionXLPipeline.from_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from raydb.models.architectures import (
    SD_NOISE_SCHEDULE,
    architecture,
    build_text_encoder,
    build_unet,
    build_vae,
)
from raydb.models.tiny import TINY_SPEC, build_tiny_tokenizer, tiny_vocab_size

__all__ = ["TINY_SDXL_SPEC", "tiny_sdxl_identity", "tiny_sdxl_architecture", "save_tiny_sdxl_model"]

# Bump when the architecture changes: it is part of the model identity (cache keys). The
# vocabulary is tiny.py's, so its spec (words) is hashed in too.
TINY_SDXL_SPEC = {
    "version": 1,
    "seed": 4321,
    "unet": {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2],
        "attention_head_dim": [2, 4],  # SDXL's config field holds the number of heads
        "addition_time_embed_dim": 8,
        "norm_num_groups": 8,
    },
    "vae": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "latent_channels": 4,
            "layers_per_block": 2, "scaling_factor": 0.13025},
    # Different widths on purpose: the UNet's cross_attention_dim is their sum (768 + 1280 in SDXL).
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "text_2": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 48},
}


def tiny_sdxl_identity() -> str:
    """Content identity of the tiny SDXL model, e.g. ``tiny-sdxl-v1-3fa2c1d0``."""
    spec = {"sdxl": TINY_SDXL_SPEC, "vocabulary": TINY_SPEC["words"]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"tiny-sdxl-v{TINY_SDXL_SPEC['version']}-{digest}"


def tiny_sdxl_architecture(resolution: int = 64) -> dict:
    """The tiny SDXL's full architecture (``raydb.models.architectures``): what
    ``save_tiny_sdxl_model`` builds, and the CPU smoke configuration of the SDXL benchmark."""
    return architecture(TINY_SDXL_SPEC, resolution=resolution, vocab_size=tiny_vocab_size())


def save_tiny_sdxl_model(path: str | Path) -> Path:
    """Build the tiny SDXL with seeded random weights and ``save_pretrained`` it to ``path``.

    The folder is a regular SDXL diffusers layout (model_index.json naming
    ``StableDiffusionXLPipeline``; unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
    tokenizer_2/, scheduler/).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    path = Path(path)
    arch = tiny_sdxl_architecture()
    # seed, then both encoders, UNet, VAE: the order fixes the weights
    torch.manual_seed(TINY_SDXL_SPEC["seed"])
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder = build_text_encoder(arch, tokenizer)
    text_encoder_2 = build_text_encoder(arch, tokenizer_2, "text_2")
    unet, vae = build_unet(arch), build_vae(arch)
    # SDXL base's schedule: scaled-linear betas, 1000 steps, epsilon prediction, Euler sampling.
    scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "raydb_identity.json").write_text(json.dumps({"identity": tiny_sdxl_identity()}) + "\n")
    return path
