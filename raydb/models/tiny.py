"""The embedded tiny model: Stable Diffusion's architecture at toy widths, with seeded random weights.

It has SD's geometry — a VAE that downsamples by 8 into 4 latent channels, a UNet with
cross-attention on CLIP text embeddings, SD's noise schedule — so every code path (LoRA targets,
latent shapes, schedulers, ``StableDiffusionPipeline``) is the one real checkpoints take. The
tokenizer's vocabulary is built here, in code: printable bytes plus a few whole words, so nothing
is ever downloaded. The model is written with ``save_pretrained`` and read back with
``from_pretrained`` exactly like a real checkpoint.
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

__all__ = ["TINY_SPEC", "tiny_identity", "build_tiny_tokenizer", "tiny_architecture", "tiny_vocab_size",
           "save_tiny_model"]

# Bump when the architecture or vocabulary changes: it is part of the model identity (cache keys).
TINY_SPEC = {
    "version": 1,
    "seed": 1234,
    "unet": {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    # SD's VAE is ~0.4x the UNet's width with 2 resnets per level, and runs at full resolution;
    # keeping that proportion keeps the cost of encoding (what the latent cache saves) realistic.
    "vae": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "latent_channels": 4,
            "layers_per_block": 2},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "words": ["a", "photo", "of", "sks", "dog", "cat", "toy", "the", "in", "on", "with", "red",
              "blue", "green", "beach", "snow", "zwx", "person", "picture", "drawing"],
}


def tiny_identity() -> str:
    """Content identity of the tiny model, e.g. ``tiny-v1-3fa2c1d0``."""
    digest = hashlib.sha256(json.dumps(TINY_SPEC, sort_keys=True).encode()).hexdigest()[:8]
    return f"tiny-v{TINY_SPEC['version']}-{digest}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = TINY_SPEC["words"] if words is None else words
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in words:  # whole-word merges so common prompt words are one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append((pieces[0], pieces[1]))
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def build_tiny_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>",
                         words: list[str] | None = None):
    """A CLIPTokenizer whose byte-level BPE vocabulary is built in code (no download).

    ``pad_token="!"`` gives SDXL's second tokenizer (open_clip pads with token 0, "!"); ``words``
    (default: the tiny model's) become whole-word tokens.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         pad_token=pad_token)


def tiny_architecture(resolution: int = 64) -> dict:
    """The tiny model's full architecture (``raydb.models.architectures``): what ``save_tiny_model``
    builds, and the CPU smoke configuration of the GPU benchmarks."""
    return architecture(TINY_SPEC, resolution=resolution, vocab_size=tiny_vocab_size())


def tiny_vocab_size() -> int:
    """Entries of the tiny tokenizers' vocabulary (both: they differ in the pad token only)."""
    return len(_vocab_and_merges()[0])


def save_tiny_model(path: str | Path) -> Path:
    """Build the tiny SD model with seeded random weights and ``save_pretrained`` it to ``path``.

    The folder is a regular diffusers layout (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), loadable by ``StableDiffusionPipeline.from_pretrained``.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    path = Path(path)
    arch = tiny_architecture()
    torch.manual_seed(TINY_SPEC["seed"])  # then UNet, VAE, text encoder: the order fixes the weights
    tokenizer = build_tiny_tokenizer()
    unet, vae, text_encoder = build_unet(arch), build_vae(arch), build_text_encoder(arch, tokenizer)
    # SD 1.x's schedule: scaled-linear betas, 1000 training steps, epsilon prediction.
    scheduler = PNDMScheduler(**SD_NOISE_SCHEDULE, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "raydb_identity.json").write_text(json.dumps({"identity": tiny_identity()}) + "\n")
    return path
