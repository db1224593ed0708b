"""Encode images and prompts once with the frozen VAE and text encoder.

The VAE and (unless LoRA trains it) the text encoder never change during DreamBooth-LoRA training,
so re-encoding every step — what diffusers' script does — wastes most of a small step. We keep the
VAE's latent *distribution* (mean and std) rather than one sample, so every step still draws a fresh
``latent_dist.sample()`` exactly as the reference loop does; only the encoder pass is saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from raydb.models.family import FLUX, SDXL, check_finite_latents
from raydb.models.flux import encode_prompts_flux
from raydb.models.sdxl import encode_prompts_sdxl, tokenize_sdxl

__all__ = ["EncodedImages", "images_to_tensor", "encode_images", "encode_prompts", "tokenize",
           "encode_prompt_set"]


@dataclass
class EncodedImages:
    """Latent distributions of N images: ``mean``/``std`` are ``[N, C, h, w]`` fp32 (h = H/8).

    ``time_ids`` ``[N, 6]`` (SDXL only): each image's size/crop conditioning, from ingestion.
    """

    mean: torch.Tensor
    std: torch.Tensor
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.mean.shape[0]


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images (same size) -> ``[N, 3, H, W]`` fp32 in [-1, 1] (the VAE's input range)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, *, batch_size: int = 8) -> EncodedImages:
    """``[N, 3, H, W]`` pixels -> latent distribution parameters, computed in ``batch_size`` chunks.

    Non-finite latents (a VAE overflowing in fp16) raise instead of reaching a cache; components
    load SDXL's VAE in fp32 under fp16 for that reason (``vae_encode_dtype``).
    """
    param = next(vae.parameters())
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(param.device, param.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    encoded = EncodedImages(torch.cat(means), torch.cat(stds))
    check_finite_latents(encoded.mean, encoded.std, f"encode ({param.dtype} VAE)")
    return encoded


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ``[P, L]`` token ids padded/truncated to the tokenizer's max length (77 for SD)."""
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ``[P, L, D]`` last hidden states (SD's cross-attention conditioning), fp32 on CPU."""
    param = next(text_encoder.parameters())
    ids = tokenize(tokenizer, prompts).to(param.device)
    return text_encoder(ids)[0].float().cpu()


def encode_prompt_set(comps, prompts: list[str], *, with_embeds: bool = True) -> dict[str, torch.Tensor]:
    """The prompt tensors the trainer needs, for ``comps.family``: ``ids [P, L]`` and (unless
    ``with_embeds=False``: the text encoders train) ``embeds [P, L, D]``; SDXL adds ``ids_2``
    ``[P, L]`` and ``pooled [P, D2p]`` (``embeds`` is then both encoders' states, concatenated).
    FLUX.1: ``embeds`` are T5's states ``[P, L_t5, D]``, ``pooled`` CLIP's ``[P, Dp]``, ``ids`` /
    ``ids_2`` CLIP's / T5's ids and ``text_ids`` ``[P, L_t5, 3]`` (all of them, always: a trained
    CLIP recomputes only the pooled output, T5 is never trained)."""
    if comps.family == FLUX:
        return encode_prompts_flux(comps.tokenizers, comps.text_encoders, prompts)
    if comps.family == SDXL:
        ids, ids_2 = tokenize_sdxl(comps.tokenizers, prompts)
        out = {"ids": ids, "ids_2": ids_2}
        if with_embeds:
            out["embeds"], out["pooled"] = encode_prompts_sdxl(comps.tokenizers, comps.text_encoders, prompts)
        return out
    out = {"ids": tokenize(comps.tokenizer, prompts)}
    if with_embeds:
        out["embeds"] = encode_prompts(comps.tokenizer, comps.text_encoder, prompts)
    return out
