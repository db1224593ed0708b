"""CLIP-I / CLIP-T for sampled images (DreamBooth's subject-fidelity and prompt-fidelity scores).

CLIP-I: mean cosine similarity between CLIP image embeddings of generated images and of the real
instance images. CLIP-T: mean cosine similarity between generated images and the prompt. Enabled by
``eval.clip_model``: ``tiny`` (a random CLIP built in code, for tests — the numbers only prove the
path works) or a local CLIP folder / hub id (e.g. ``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["load_clip", "clip_scores", "sampling_pipeline", "sample_instance_images", "sample_clip_metrics"]

_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's preprocessing constants
_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(spec: str) -> tuple[Any, Any]:
    """``(CLIPModel, tokenizer)``: ``tiny`` is built in code with seeded random weights."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    if spec == "tiny":
        from raydb.models.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(4321)
        config = CLIPConfig(
            text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        )
        return CLIPModel(config).eval(), tokenizer
    return CLIPModel.from_pretrained(spec, use_safetensors=True).eval(), CLIPTokenizer.from_pretrained(spec)


def _pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """CLIP preprocessing: resize (shorter side) + center crop to ``size``, normalise -> [N,3,S,S]."""
    from raydb.data.ingest import prepare_image

    arr = np.stack([np.asarray(prepare_image(im, size), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)


@torch.no_grad()
def clip_scores(clip, tokenizer, generated: list[Image.Image], references: list[Image.Image],
                prompt: str) -> dict[str, float]:
    """``{"clip_i": ..., "clip_t": ...}``, cosine similarities in [-1, 1]."""
    size = clip.config.vision_config.image_size

    def embed_images(images: list[Image.Image]) -> torch.Tensor:
        out = clip.get_image_features(pixel_values=_pixels(images, size))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    gen, ref = embed_images(generated), embed_images(references)
    ids = tokenizer([prompt], padding="max_length", truncation=True,
                    max_length=min(77, tokenizer.model_max_length), return_tensors="pt").input_ids
    out = clip.get_text_features(input_ids=ids)
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    text = torch.nn.functional.normalize(feats.float(), dim=-1)
    return {"clip_i": float((gen @ ref.T).mean()), "clip_t": float((gen @ text.T).mean())}


def sampling_pipeline(comps, unet):
    """A pipeline of the family over ``comps`` with ``unet`` (the LoRA-adapted training denoiser:
    a UNet, or FLUX.1's transformer) and a DDIM scheduler (FLUX.1: its flow-matching Euler one): what
    validation metrics sample with (progress bar off). FLUX.1 needs T5 loaded (``with_t5``)."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    family = getattr(comps, "family", "sd")
    if family == "flux":  # the flow-matching schedule samples Flux; DDIM does not apply
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.noise_scheduler.config),
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2, transformer=unet)
    elif family == "sdxl":
        scheduler = DDIMScheduler.from_config(comps.noise_scheduler.config)
        pipe = StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=unet, scheduler=scheduler)
    else:
        scheduler = DDIMScheduler.from_config(comps.noise_scheduler.config)
        pipe = StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_instance_images(cfg, comps, unet) -> list[Image.Image]:
    """``eval.num_images`` images of the instance prompt from the current (LoRA) UNet, seeds 0..n-1:
    what CLIP-I / CLIP-T and DINO score."""
    from raydb.models.components import pipeline_call_kwargs

    pipe = sampling_pipeline(comps, unet)
    res = cfg.train.resolution
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    try:
        images = [pipe(cfg.subject.instance_prompt, num_inference_steps=cfg.eval.num_inference_steps,
                       height=res, width=res, generator=torch.Generator(device).manual_seed(i),
                       **pipeline_call_kwargs(pipe)).images[0]
                  for i in range(cfg.eval.num_images)]
    finally:
        unet.train(was_training)
    return images


def sample_clip_metrics(cfg, comps, unet, instance_images: list[Image.Image], clip, clip_tokenizer,
                        ) -> dict[str, float]:
    """Sample ``eval.num_images`` images with the current (LoRA) UNet, fixed seeds, and score them."""
    return clip_scores(clip, clip_tokenizer, sample_instance_images(cfg, comps, unet), instance_images,
                       cfg.subject.instance_prompt)
