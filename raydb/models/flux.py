"""What FLUX.1's transformer is conditioned on, and how its latents are laid out, as plain tensor
functions.

SD and SDXL condition a UNet on text hidden states through cross-attention. FLUX.1 feeds a
``FluxTransformer2DModel`` (MMDiT) with

* ``hidden_states`` ``[N, h/2 * w/2, 4C]``: the VAE latents ``[N, C=16, h, w]`` cut into 2x2
  patches and *packed* into a token sequence (:func:`pack_latents`); the prediction comes back
  packed and is unpacked the same way;
* ``encoder_hidden_states`` ``[N, L, D_t5]``: the T5 encoder's last hidden states, padded to
  ``max_sequence_length`` tokens (512 for FLUX.1-dev) and used without an attention mask;
* ``pooled_projections`` ``[N, D_clip]``: the CLIP text model's pooled output (CLIP's token states
  are not used at all);
* ``txt_ids`` ``[L, 3]`` (zeros) and ``img_ids`` ``[h/2 * w/2, 3]`` (``(0, row, column)`` per
  patch): the positions the rotary embedding rotates by — one set per batch, not per sample;
* ``timestep`` ``[N]``: the flow-matching time ``sigma`` in [0, 1] (the pipeline passes
  ``t / 1000``; the model multiplies by 1000 inside);
* ``guidance`` ``[N]``: the guidance scale as an *input* of guidance-distilled models
  (FLUX.1-dev, ``guidance_embeds=True``; None for FLUX.1-schnell). One forward per sample, no
  classifier-free doubling.

These functions reproduce ``FluxPipeline.encode_prompt``, ``_pack_latents``, ``_unpack_latents``
and ``_prepare_latent_image_ids`` (checked against them in tests), so training, validation and
serving condition the transformer exactly as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MAX_SEQUENCE_LENGTH", "max_sequence_length", "pack_latents", "unpack_latents",
           "latent_image_ids", "text_ids_for", "tokenize_flux", "flux_text_conditioning",
           "encode_prompts_flux", "flux_velocity", "PACK"]

MAX_SEQUENCE_LENGTH = 512  # FLUX.1-dev's T5 length (FluxPipeline's default and upper bound)
PACK = 2  # latents are packed in 2x2 patches: a pixel side must be a multiple of 8 * 2 = 16


def max_sequence_length(tokenizer_2) -> int:
    """T5 tokens per prompt: the tokenizer's own limit, at most 512 (FLUX.1-dev: 512)."""
    return int(min(MAX_SEQUENCE_LENGTH, tokenizer_2.model_max_length))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, (h/2)(w/2), 4C]``: each 2x2 patch (row-major) becomes one token whose
    features are ``(channel, dy, dx)``-ordered, as ``FluxPipeline._pack_latents``."""
    n, c, h, w = latents.shape
    if h % PACK or w % PACK:
        raise ValueError(f"Flux latents must have even height and width to pack, got {h}x{w}")
    patches = latents.reshape(n, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[N, (h/2)(w/2), 4C]`` -> ``[N, C, h, w]``."""
    n, tokens, features = packed.shape
    if tokens != (h // PACK) * (w // PACK) or features % (PACK * PACK):
        raise ValueError(f"{tokens} packed tokens of {features} features do not make {h}x{w} latents")
    c = features // (PACK * PACK)
    patches = packed.reshape(n, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, c, h, w)


def latent_image_ids(h: int, w: int, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` rotary positions of the packed tokens of ``h x w`` latents: ``(0, row,
    column)`` of each 2x2 patch (the first axis is the text/image axis, zero for images)."""
    rows, cols = h // PACK, w // PACK
    # built on the device: no host-to-device copy (the training step may be inside a CUDA graph capture)
    ids = torch.zeros(rows, cols, 3, device=device, dtype=torch.float32)
    ids[..., 1] = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(rows * cols, 3).to(dtype)


def text_ids_for(length: int, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[L, 3]`` rotary positions of L text tokens: all zero (FLUX.1 places text by attention
    alone; only image tokens get positions)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def tokenize_flux(tokenizers: Sequence, prompts: list[str], sequence_length: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(clip_ids [P, 77], t5_ids [P, L])``, both padded to their full length."""
    if len(tokenizers) != 2:
        raise ValueError("FLUX.1 needs two tokenizers (CLIP, T5)")
    clip, t5 = tokenizers
    length = sequence_length or max_sequence_length(t5)
    clip_ids = clip(prompts, padding="max_length", truncation=True, max_length=clip.model_max_length,
                    return_tensors="pt").input_ids
    t5_ids = t5(prompts, padding="max_length", truncation=True, max_length=length,
                return_tensors="pt").input_ids
    return clip_ids, t5_ids


def flux_text_conditioning(
    text_encoders: Sequence[torch.nn.Module | None], input_ids: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Token ids -> ``(t5_states [P, L, D_t5], pooled [P, D_clip])``, differentiable (CLIP LoRA).

    Either encoder may be None (with its ids): its output is then None — the step encodes only
    CLIP's pooled output when CLIP's LoRA trains (T5 never trains, its states stay cached).
    """
    clip, t5 = text_encoders
    clip_ids, t5_ids = input_ids
    pooled = states = None
    if clip is not None:
        pooled = clip(clip_ids.to(next(clip.parameters()).device), output_hidden_states=False).pooler_output
    if t5 is not None:
        states = t5(t5_ids.to(next(t5.parameters()).device), output_hidden_states=False)[0]
    return states, pooled


@torch.no_grad()
def encode_prompts_flux(tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], prompts: list[str],
                        ) -> dict[str, torch.Tensor]:
    """Prompts -> the encode cache's prompt tensors, fp32 on CPU: ``embeds [P, L, D_t5]`` (T5),
    ``pooled [P, D_clip]`` (CLIP), ``ids [P, 77]`` (CLIP), ``ids_2 [P, L]`` (T5) and ``text_ids
    [P, L, 3]``."""
    ids, ids_2 = tokenize_flux(tokenizers, prompts)
    states, pooled = flux_text_conditioning(text_encoders, (ids, ids_2))
    text_ids = text_ids_for(ids_2.shape[1]).expand(len(prompts), -1, -1).contiguous()
    return {"embeds": states.float().cpu(), "pooled": pooled.float().cpu(), "ids": ids, "ids_2": ids_2,
            "text_ids": text_ids}


def flux_velocity(
    transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, *, t5_states: torch.Tensor,
    pooled: torch.Tensor, text_ids: torch.Tensor, guidance: torch.Tensor | None,
) -> torch.Tensor:
    """The transformer's velocity prediction ``[N, C, h, w]`` for noisy latents ``[N, C, h, w]``.

    ``sigmas`` ``[N]`` are the samples' flow times; ``guidance`` ``[N]`` (guidance-distilled
    models) or None; ``text_ids`` ``[L, 3]`` — or ``[N, L, 3]``, whose rows must then be equal
    (the rotary embedding takes one position set per batch). Inputs are cast to the transformer's
    frozen dtype; the output keeps it.
    """
    n, _, h, w = noisy.shape
    if text_ids.ndim == 3:
        text_ids = text_ids[0]  # equal rows: checked where the batch is built (train.data)
    config = getattr(transformer, "config", None) or transformer.module.config  # DDP wraps
    if config.guidance_embeds and guidance is None:
        raise ValueError("this FLUX.1 transformer is guidance-distilled (guidance_embeds): it needs a "
                         "guidance value per sample")
    # the frozen base's dtype (LoRA masters may be fp32 under bf16); any parameter's if none is frozen
    params = list(transformer.parameters())
    dtype = next((p for p in params if not p.requires_grad), params[0]).dtype
    out = transformer(
        hidden_states=pack_latents(noisy).to(dtype), timestep=sigmas.to(dtype),
        guidance=guidance.to(dtype) if config.guidance_embeds else None,
        pooled_projections=pooled.to(dtype), encoder_hidden_states=t5_states.to(dtype),
        txt_ids=text_ids.to(dtype), img_ids=latent_image_ids(h, w, device=noisy.device, dtype=dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)
