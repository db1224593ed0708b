"""The embedded tiny FLUX.1: Flux's architecture at toy widths, seeded random weights.

What makes FLUX.1 a different family is kept, only the widths shrink: a ``FluxTransformer2DModel``
with both kinds of blocks — double-stream blocks (separate image and text streams with joint
attention: ``attn.to_q/k/v/to_out`` and ``attn.add_q/k/v_proj/to_add_out``, feed-forwards ``ff`` and
``ff_context``) and single-stream blocks (one stream: ``attn.to_q/k/v``, ``proj_mlp``, ``proj_out``)
— rotary position ids over (text, row, column), the guidance embedding of the guidance-distilled
FLUX.1-dev, and 2x2-packed latents (``in_channels = 4 x 16``); a 16-channel ``AutoencoderKL`` with
Flux's scaling and shift factors and no quant convs; a CLIP text model (only its pooled output is
used) and a T5 encoder (its hidden states are the token conditioning), both tokenizers built in
code (no download); and FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` (shift 3, resolution-
dependent shift at sampling). Written with ``save_pretrained``, it loads with
``FluxPipeline.from_pretrained`` like a real checkpoint, so adapter key names (and their kohya
mapping) are the ones a real FLUX.1 checkpoint produces.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path

import torch

from raydb.models.tiny import TINY_SPEC, build_tiny_tokenizer

__all__ = ["TINY_FLUX_SPEC", "tiny_flux_identity", "build_tiny_t5_tokenizer", "save_tiny_flux_model"]

# Bump when the architecture or vocabulary changes: it is part of the model identity (cache keys).
TINY_FLUX_SPEC = {
    "version": 1,
    "seed": 2718,
    "transformer": {
        "num_layers": 2,  # double-stream blocks (FLUX.1: 19)
        "num_single_layers": 2,  # single-stream blocks (FLUX.1: 38)
        "attention_head_dim": 16,  # FLUX.1: 128 = 16 + 56 + 56 rotary dims over (text, row, column)
        "num_attention_heads": 2,  # FLUX.1: 24 (inner width 3072)
        "axes_dims_rope": [4, 6, 6],
        "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled (schnell is not)
    },
    # FLUX.1's VAE: 16 latent channels, 8x downsampling, no quant convs, scale and shift factors
    "vae": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "latent_channels": 16,
            "layers_per_block": 1, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    # T5 v1.1 (FLUX.1: T5-XXL, d_model 4096, 512 tokens) at toy width: gated-GELU feed-forward
    "t5": {"d_model": 48, "d_kv": 12, "d_ff": 96, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "max_length": 32},
}

# FLUX.1-dev's training/sampling schedule (its scheduler_config.json)
_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_flux_identity() -> str:
    """Content identity of the tiny Flux model, e.g. ``tiny-flux-v1-3fa2c1d0``."""
    spec = {"flux": TINY_FLUX_SPEC, "scheduler": _SCHEDULER, "vocabulary": TINY_SPEC["words"]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"tiny-flux-v{TINY_FLUX_SPEC['version']}-{digest}"


def build_tiny_t5_tokenizer(model_max_length: int = TINY_FLUX_SPEC["t5"]["max_length"]):
    """A T5 (SentencePiece-Unigram) tokenizer whose vocabulary is built in code (no download).

    T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; then whole words of the tiny
    vocabulary (``▁photo``: one token each, preferred by their score) and single characters, with
    and without the word-start marker, so every ASCII prompt tokenizes without ``<unk>``.
    """
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -1.0) for word in TINY_SPEC["words"]]
    vocab += [(f"▁{c}", -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def save_tiny_flux_model(path: str | Path) -> Path:
    """Build the tiny FLUX.1 with seeded random weights and ``save_pretrained`` it to ``path``.

    The folder is a regular FLUX.1 diffusers layout (model_index.json naming ``FluxPipeline``;
    transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ (T5), tokenizer/, tokenizer_2/,
    scheduler/).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(TINY_FLUX_SPEC["seed"])
    spec_x, spec_v = TINY_FLUX_SPEC["transformer"], TINY_FLUX_SPEC["vae"]
    spec_t, spec_5 = TINY_FLUX_SPEC["text"], TINY_FLUX_SPEC["t5"]
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec_t,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=spec_5["d_model"], d_kv=spec_5["d_kv"], d_ff=spec_5["d_ff"],
        num_layers=spec_5["num_layers"], num_heads=spec_5["num_heads"],
        relative_attention_num_buckets=spec_5["relative_attention_num_buckets"],
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
    ))
    latent_channels = spec_v["latent_channels"]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels,  # 2x2 patches of 16 channels, packed
        num_layers=spec_x["num_layers"], num_single_layers=spec_x["num_single_layers"],
        attention_head_dim=spec_x["attention_head_dim"], num_attention_heads=spec_x["num_attention_heads"],
        joint_attention_dim=spec_5["d_model"], pooled_projection_dim=spec_t["hidden_size"],
        guidance_embeds=spec_x["guidance_embeds"], axes_dims_rope=tuple(spec_x["axes_dims_rope"]),
    )
    n_vae = len(spec_v["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=tuple(spec_v["block_out_channels"]),
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        norm_num_groups=spec_v["norm_num_groups"], layers_per_block=spec_v["layers_per_block"],
        sample_size=64, scaling_factor=spec_v["scaling_factor"], shift_factor=spec_v["shift_factor"],
        use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "raydb_identity.json").write_text(json.dumps({"identity": tiny_flux_identity()}) + "\n")
    return path
