"""What SDXL's UNet is conditioned on, as plain tensor functions.

SD 1.x/2.x condition the UNet on one CLIP encoder's last hidden states. SDXL conditions it on

* ``encoder_hidden_states`` ``[P, L, D1 + D2]``: the *penultimate* hidden states of both text
  encoders, concatenated along features (768 + 1280 = 2048 in SDXL base);
* ``text_embeds`` ``[P, D2p]``: the second encoder's projected pooled embedding;
* ``time_ids`` ``[N, 6]``: per image, ``original_size (h, w) + crop_top_left (top, left) +
  target_size (h, w)`` — the "micro-conditioning" that tells the UNet how the training image was
  resized and cropped, so that at inference ``crop (0, 0)`` asks for uncropped framing.

The time ids must describe each training image's *real* crop (ingestion records it in
:class:`raydb.data.ingest.ImageGeometry`), which is why they travel with the encoded images, not
with the prompts. These functions reproduce ``StableDiffusionXLPipeline.encode_prompt`` and
``_get_add_time_ids`` (checked against them in tests), so training and inference condition alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raydb.data.ingest import ImageGeometry

__all__ = ["add_time_ids", "time_ids_for", "tokenize_sdxl", "sdxl_text_conditioning",
           "encode_prompts_sdxl", "unet_added_conditions"]


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
) -> torch.Tensor:
    """One image's ``[6]`` fp32 time ids: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def time_ids_for(geometries: Sequence[ImageGeometry]) -> torch.Tensor:
    """``[N, 6]`` time ids of N prepared images, from what ingestion actually did to each."""
    if not geometries:
        return torch.zeros(0, 6)
    return torch.stack([add_time_ids(g.original_size, g.crop_top_left, g.target_size) for g in geometries])


def tokenize_sdxl(tokenizers: Sequence, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> one ``[P, L]`` id tensor per tokenizer (SDXL's second one pads with "!")."""
    if len(tokenizers) != 2:
        raise ValueError("SDXL needs two tokenizers")
    first, second = (tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                         return_tensors="pt").input_ids for tok in tokenizers)
    return first, second


def sdxl_text_conditioning(
    text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids -> ``(hidden [P, L, D1 + D2], pooled [P, D2p])``, differentiable (text-encoder LoRA).

    The hidden states are each encoder's penultimate layer's (SDXL never uses the last); the
    pooled embedding is the second encoder's projected one (``text_embeds``).
    """
    if len(text_encoders) != 2 or len(input_ids) != 2:
        raise ValueError("SDXL needs two text encoders and their two id tensors")
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's text_embeds (CLIPTextModelWithProjection)
    if pooled is None or pooled.ndim != 2:
        raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection")
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_prompts_sdxl(
    tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(hidden [P, L, D1 + D2], pooled [P, D2p])``, fp32 on CPU (the encode cache)."""
    hidden, pooled = sdxl_text_conditioning(text_encoders, tokenize_sdxl(tokenizers, prompts))
    return hidden.float().cpu(), pooled.float().cpu()


def unet_added_conditions(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's ``added_cond_kwargs``: ``text_embeds [B, D2p]`` and ``time_ids [B, 6]``."""
    if pooled.shape[0] != time_ids.shape[0]:
        raise ValueError(f"SDXL conditioning: {pooled.shape[0]} pooled embeddings for "
                         f"{time_ids.shape[0]} time ids")
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
