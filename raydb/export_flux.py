"""FLUX.1 adapters in the single-file layout kohya's sd-scripts write and ComfyUI loads.

sd-scripts trains FLUX.1 on Black Forest Labs' own model code, so its LoRA names BFL's modules, not
diffusers': ``lora_unet_<bfl module, dots as underscores>`` for the transformer and ``lora_te1_…``
for CLIP-L (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``), each with
``.lora_down.weight`` (rank, in), ``.lora_up.weight`` (out, rank) and a scalar ``.alpha``; the
layer's update is ``up @ down * alpha / rank``. Where BFL fuses what diffusers splits, one kohya
module stands for several diffusers ones:

======================================  =====================================================
BFL module (after ``lora_unet_``)       diffusers modules (double block i: ``transformer_blocks.i``;
                                        single block i: ``single_transformer_blocks.i``)
======================================  =====================================================
double_blocks_i_img_attn_qkv            attn.to_q, attn.to_k, attn.to_v (fused, in that order)
double_blocks_i_img_attn_proj           attn.to_out.0
double_blocks_i_txt_attn_qkv            attn.add_q_proj, add_k_proj, add_v_proj (fused)
double_blocks_i_txt_attn_proj           attn.to_add_out
double_blocks_i_img_mlp_0 / _2          ff.net.0.proj / ff.net.2
double_blocks_i_txt_mlp_0 / _2          ff_context.net.0.proj / ff_context.net.2
double_blocks_i_img_mod_lin / txt_…     norm1.linear / norm1_context.linear
single_blocks_i_linear1                 attn.to_q, attn.to_k, attn.to_v, proj_mlp (fused)
single_blocks_i_linear2                 proj_out
single_blocks_i_modulation_lin          norm.linear
img_in, txt_in, final_layer_linear      x_embedder, context_embedder, proj_out
time_in_ / vector_in_ / guidance_in_    time_text_embed.timestep_ / text_ / guidance_embedder
in_layer, out_layer                     .linear_1, .linear_2
======================================  =====================================================

A fused module's LoRA is exact, not an approximation: for parts with factors ``(down_k, up_k)``
the fused ``down`` stacks the downs (rank ``R = sum r_k``) and the fused ``up`` is block-diagonal —
part k's rows hold ``up_k`` in part k's rank columns and zeros elsewhere (a part without LoRA gets
zero rows) — so ``up @ down`` is exactly the parts' updates stacked by rows. The scale stays
``alpha / rank`` per part (the fused alpha is ``scale * R``). Loaders that split fused modules
(diffusers' kohya reader) find the block structure and recover each part's factors exactly.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["FLUX_BASE_MODEL_VERSION", "flux_kohya_tensors", "flux_kohya_name"]

FLUX_BASE_MODEL_VERSION = "flux1"

# diffusers module suffix (within a double block) -> (BFL module, part index, number of parts)
_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3),
    "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1), "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1),
}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
}


def flux_kohya_name(module: str) -> tuple[str, int, int]:
    """``(kohya name, part, parts)`` of a diffusers transformer module, e.g.
    ``single_transformer_blocks.3.proj_mlp`` -> ``("lora_unet_single_blocks_3_linear1", 3, 4)``."""
    block = re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", module)
    if block:
        table, kind = (_SINGLE, "single_blocks") if block[1] else (_DOUBLE, "double_blocks")
        if block[3] in table:
            bfl, part, parts = table[block[3]]
            return f"lora_unet_{kind}_{block[2]}_{bfl}", part, parts
    elif module in _TOP:
        return f"lora_unet_{_TOP[module]}", 0, 1
    raise ValueError(f"kohya export: FLUX.1 transformer module {module!r} has no kohya/BFL name "
                     "(exported: attention, MLP, modulation and embedding linears; norm_out.linear "
                     "orders its scale and shift differently and is not exported)")


def _part_widths(parts: int, config: dict[str, Any]) -> list[int]:
    """Output widths of a fused module's parts, from the transformer config (FLUX.1-dev: 3072 each
    for q/k/v; 12288 for the single blocks' MLP)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    # a single block's MLP is 4x wide (FluxSingleTransformerBlock's mlp_ratio)
    return [inner] * 3 + [4 * inner] if parts == 4 else [inner] * parts


def flux_kohya_tensors(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], transformer_config: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """Kohya tensors from per-module transformer LoRA factors ``{module: (down [r, in], up [out, r],
    scale)}`` (scale = alpha / r): ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` per BFL
    module, fused modules built as the module docstring describes."""
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    num_parts: dict[str, int] = {}
    for module, value in sorted(factors.items()):
        name, part, parts = flux_kohya_name(module)
        groups.setdefault(name, {})[part] = value
        num_parts[name] = parts
    out: dict[str, torch.Tensor] = {}
    for name, given in groups.items():
        parts = num_parts[name]
        scales = {scale for _, _, scale in given.values()}
        if len(scales) != 1:
            raise ValueError(f"kohya export: the parts of {name} have different LoRA scales "
                             f"{sorted(scales)}; a fused module has one alpha")
        scale = scales.pop()
        if parts == 1:
            down, up, _ = given[0]
            rank = down.shape[0]
        else:
            widths = _part_widths(parts, transformer_config)
            for k, (_, up, _) in given.items():
                if up.shape[0] != widths[k]:
                    raise ValueError(f"kohya export: part {k} of {name} has {up.shape[0]} outputs, the "
                                     f"base model's is {widths[k]}")
            order = sorted(given)
            rank = sum(given[k][0].shape[0] for k in order)
            down = torch.cat([given[k][0] for k in order])
            up = torch.zeros(sum(widths), rank, dtype=down.dtype)
            column = 0
            for k in order:
                part_down, part_up, _ = given[k]
                row = sum(widths[:k])
                up[row:row + widths[k], column:column + part_down.shape[0]] = part_up
                column += part_down.shape[0]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out
