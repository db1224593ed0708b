"""Model architectures as plain dicts, and the builders that turn one into seeded random modules.

Why: the embedded tiny models (``tiny.py``, ``tiny_sdxl.py``) and the GPU benchmarks (``bench/``,
which measure SD 1.5 and SDXL base at their real sizes with random weights — timings do not depend on
the weights, and nothing is downloaded) build the same three kinds of modules. They are described
once, here, in one shape, so a benchmark's "SD 1.5" is the published SD 1.5 and its tiny smoke model
is the very model the tests train.

A *spec* names only what distinguishes a model (widths, depths, block types); ``architecture(spec,
resolution=..., vocab_size=...)`` expands it into the full keyword arguments:

    {"resolution": 512,                  # native image size, px (latents are resolution // 8)
     "family": "sd" | "sdxl",            # raydb.models.family
     "unet": {...},                      # diffusers UNet2DConditionModel(**unet)
     "vae": {...},                       # diffusers AutoencoderKL(**vae)
     "text": {...},                      # transformers CLIPTextConfig kwargs, token ids excluded
     "text_2": {...}}                    # SDXL only: CLIPTextModelWithProjection's config kwargs

SDXL is told by ``text_2`` in the spec: its UNet reads both encoders' hidden states (cross-attention
width = their sum) and a pooled embedding plus six size/crop ids (``text_time``). The builders
(``build_unet``, ``build_vae``, ``build_text_encoder``) do not seed, place or cast: callers seed once
and build in a fixed order (that order is part of a tiny model's weights) and may build straight
on a device with ``with torch.device("cuda"):``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SD_NOISE_SCHEDULE", "SD15_SPEC", "SDXL_BASE_SPEC", "architecture", "sd15", "sdxl_base",
           "build_unet", "build_vae", "build_text_encoder"]

# SD 1.x and SDXL base train with the same schedule: scaled-linear betas over 1000 steps.
SD_NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "num_train_timesteps": 1000}

CLIP_VOCAB = 49408  # the real CLIP tokenizers' vocabulary (the embedding's rows)

# runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json
SD15_SPEC: dict[str, Any] = {
    "resolution": 512,
    "unet": {"block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
             "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
             "norm_num_groups": 32},
    "vae": {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "latent_channels": 4,
            "layers_per_block": 2},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "hidden_act": "quick_gelu"},
}

# stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ config.json
SDXL_BASE_SPEC: dict[str, Any] = {
    "resolution": 1024,
    "unet": {"block_out_channels": [320, 640, 1280],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
             "attention_head_dim": [5, 10, 20],  # SDXL's config field holds the number of heads
             "addition_time_embed_dim": 256, "norm_num_groups": 32},
    "vae": {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "latent_channels": 4,
            "layers_per_block": 2, "scaling_factor": 0.13025},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "hidden_act": "quick_gelu"},
    "text_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280},
}


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def architecture(spec: dict[str, Any], *, resolution: int, vocab_size: int) -> dict[str, Any]:
    """The full constructor kwargs of ``spec``'s UNet, VAE and text encoder(s) at ``resolution``.

    ``spec``: ``unet``/``vae``/``text`` (and for SDXL ``text_2``) as in ``SD15_SPEC``; other keys
    (a tiny model's ``version``, ``seed``, ``words``) are ignored. ``vocab_size``: rows of the text
    embedding (the tokenizer's length).
    """
    sdxl = "text_2" in spec
    unet, vae = dict(spec["unet"]), dict(spec["vae"])
    text = {"vocab_size": vocab_size, "max_position_embeddings": 77, **spec["text"]}
    unet_kw = {"sample_size": resolution // 8, "in_channels": 4, "out_channels": 4, **_tuples(unet)}
    if sdxl:
        text_2 = {"vocab_size": vocab_size, "max_position_embeddings": 77, **spec["text_2"]}
        unet_kw |= {
            "use_linear_projection": True,
            "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
            "addition_embed_type": "text_time",
            # six add_time_ids (original h/w, crop top/left, target h/w), each sinusoidally
            # embedded, plus the pooled, projected embedding of the second text encoder
            "projection_class_embeddings_input_dim": 6 * unet["addition_time_embed_dim"]
            + text_2["projection_dim"],
        }
    levels = len(vae["block_out_channels"])
    vae_kw = {"in_channels": 3, "out_channels": 3, **_tuples(vae),
              "down_block_types": ("DownEncoderBlock2D",) * levels,
              "up_block_types": ("UpDecoderBlock2D",) * levels, "sample_size": resolution}
    if sdxl:
        vae_kw["force_upcast"] = True  # SDXL's VAE overflows in fp16
    out = {"resolution": resolution, "family": "sdxl" if sdxl else "sd", "unet": unet_kw, "vae": vae_kw,
           "text": text}
    if sdxl:
        out["text_2"] = text_2
    return out


def sd15(resolution: int | None = None) -> dict[str, Any]:
    """Stable Diffusion 1.5's architecture (UNet 859.5 M, VAE 83.7 M, text encoder 123.1 M)."""
    return architecture(SD15_SPEC, resolution=resolution or SD15_SPEC["resolution"], vocab_size=CLIP_VOCAB)


def sdxl_base(resolution: int | None = None) -> dict[str, Any]:
    """SDXL base 1.0's architecture (UNet 2.57 B, two text encoders 123 M + 695 M)."""
    return architecture(SDXL_BASE_SPEC, resolution=resolution or SDXL_BASE_SPEC["resolution"],
                        vocab_size=CLIP_VOCAB)


def build_unet(arch: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**arch["unet"])


def build_vae(arch: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**arch["vae"])


def build_text_encoder(arch: dict[str, Any], tokenizer, which: str = "text") -> torch.nn.Module:
    """``CLIPTextModel`` (``which="text"``) or SDXL's ``CLIPTextModelWithProjection`` (``"text_2"``),
    with the tokenizer's special-token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if which == "text_2" else CLIPTextModel
    return cls(CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **arch[which]))
