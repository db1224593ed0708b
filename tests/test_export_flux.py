"""FLUX.1 adapters in the kohya / ComfyUI single-file layout: BFL module names, exact fused LoRAs,
and a round trip through diffusers' kohya reader (``FluxPipeline.load_lora_weights``).

diffusers' reader hard-codes FLUX.1-dev's widths for the single blocks' fused ``linear1`` (3072 x 3
+ 12288), so the tiny model's round trip uses double-block and modulation targets, and the fused
modules are checked at FLUX.1-dev's real widths without a model (factor tensors only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raydb.config import LoraConfig
from raydb.export import kohya_metadata, to_kohya
from raydb.export_flux import flux_kohya_name, flux_kohya_tensors
from raydb.train.lora import add_lora, save_lora

DEV = {"_class_name": "FluxTransformer2DModel", "num_attention_heads": 24, "attention_head_dim": 128,
       "guidance_embeds": True}  # FLUX.1-dev's widths: inner 3072, single-block MLP 12288
# every double block's attention, MLPs and modulation, and the single blocks' modulation
DOUBLE_TARGETS = [f"transformer_blocks.{i}.attn.to_{p}" for i in (0, 1) for p in "qkv"] + [
    "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear"]


def _pipe(path: str):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_adapter(path: str, targets: list[str]) -> bytes:
    """An adapter (rank 4, alpha 8: scale 2) on the tiny Flux and its CLIP, with random factors."""
    pipe = _pipe(path)
    add_lora(pipe.transformer, LoraConfig(rank=4, alpha=8, target_modules=targets, train_text_encoder=True),
             pipe.text_encoder)
    g = torch.Generator().manual_seed(0)
    for name, p in [*pipe.transformer.named_parameters(), *pipe.text_encoder.named_parameters()]:
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return save_lora(pipe.transformer, pipe.text_encoder)


def _sample(pipe) -> np.ndarray:
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images


def test_kohya_file_gives_the_same_images_as_the_diffusers_adapter(tiny_flux_dir, tmp_path):
    weights = _random_adapter(tiny_flux_dir, DOUBLE_TARGETS)
    config = _pipe(tiny_flux_dir).transformer.config
    kohya = to_kohya(weights, dict(config))
    keys = st_load(kohya)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert {f"lora_unet_double_blocks_{i}_{m}" for i in (0, 1) for m in (
        "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "img_mlp_0", "img_mlp_2",
        "txt_mlp_0", "txt_mlp_2", "img_mod_lin", "txt_mod_lin")} | {
        f"lora_unet_single_blocks_{i}_modulation_lin" for i in (0, 1)} <= names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)  # 3 x rank 4
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 24.0  # scale 2 kept
    (tmp_path / "diffusers.safetensors").write_bytes(weights)
    (tmp_path / "kohya.safetensors").write_bytes(kohya)
    base, outs = _sample(_pipe(tiny_flux_dir)), {}
    for name in ("diffusers", "kohya"):
        pipe = _pipe(tiny_flux_dir)
        pipe.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors")
        outs[name] = _sample(pipe)
    assert np.abs(outs["diffusers"] - base).max() > 1e-2  # the adapter changes the picture
    np.testing.assert_array_equal(outs["kohya"], outs["diffusers"])


def _dev_factors(rank: int = 4, parts=("q", "k", "v", "mlp")) -> dict:
    g = torch.Generator().manual_seed(1)
    widths = {"q": 3072, "k": 3072, "v": 3072, "mlp": 12288}
    names = {"q": "attn.to_q", "k": "attn.to_k", "v": "attn.to_v", "mlp": "proj_mlp"}
    factors = {}
    for part in parts:
        factors[f"single_transformer_blocks.7.{names[part]}"] = (
            torch.randn(rank, 3072, generator=g), torch.randn(widths[part], rank, generator=g), 1.0)
    for p in "qkv":
        factors[f"transformer_blocks.3.attn.to_{p}"] = (
            torch.randn(rank, 3072, generator=g), torch.randn(3072, rank, generator=g), 1.0)
    return factors


def test_fused_modules_at_flux_dev_widths_are_exact_and_split_back_by_diffusers():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    factors = _dev_factors()
    tensors = flux_kohya_tensors(factors, DEV)
    down = tensors["lora_unet_single_blocks_7_linear1.lora_down.weight"]
    up = tensors["lora_unet_single_blocks_7_linear1.lora_up.weight"]
    assert down.shape == (16, 3072) and up.shape == (3 * 3072 + 12288, 16)
    # the fused update is exactly the parts' updates stacked by rows (zeros add nothing)
    parts = [factors[f"single_transformer_blocks.7.{m}"]
             for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    stacked = torch.cat([u @ d for d, u, _ in parts])
    torch.testing.assert_close(up @ down, stacked, rtol=1e-6, atol=1e-4)
    # diffusers' kohya reader finds the block structure and recovers every part's factors exactly
    back = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    for module, (d, u, _) in factors.items():
        assert torch.equal(back[f"transformer.{module}.lora_A.weight"], d), module
        assert torch.equal(back[f"transformer.{module}.lora_B.weight"], u), module


def test_a_missing_part_becomes_zero_rows_and_scales_follow_alpha():
    factors = {k: (d, u, 2.0) for k, (d, u, _) in _dev_factors(parts=("q", "v")).items()}
    tensors = flux_kohya_tensors(factors, DEV)
    up = tensors["lora_unet_single_blocks_7_linear1.lora_up.weight"]
    assert up.shape == (3 * 3072 + 12288, 8)
    assert not up[3072:6144].any() and not up[9216:].any()  # k and the MLP have no LoRA
    assert tensors["lora_unet_single_blocks_7_linear1.alpha"].item() == 16.0  # scale 2 x fused rank 8
    with pytest.raises(ValueError, match="different LoRA scales"):
        flux_kohya_tensors({**factors, "single_transformer_blocks.7.proj_mlp": (
            torch.ones(4, 3072), torch.ones(12288, 4), 1.0)}, DEV)


def test_names_refusals_and_metadata():
    name = flux_kohya_name
    assert name("single_transformer_blocks.3.proj_mlp") == ("lora_unet_single_blocks_3_linear1", 3, 4)
    assert name("transformer_blocks.18.attn.add_v_proj")[0] == "lora_unet_double_blocks_18_txt_attn_qkv"
    assert name("x_embedder")[0] == "lora_unet_img_in"
    assert name("time_text_embed.guidance_embedder.linear_2")[0] == "lora_unet_guidance_in_out_layer"
    with pytest.raises(ValueError, match="norm_out.linear"):
        flux_kohya_name("norm_out.linear")
    bad = st_save({"unet.x.lora_A.weight": torch.ones(2, 2), "unet.x.lora_B.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="not a LoRA weight of transformer/text_encoder"):
        to_kohya(bad, DEV)
    meta = kohya_metadata({"lora": {"rank": 16, "alpha": 16}, "base_model": {"pretrained": "flux-dev"},
                           "training": {"resolution": 1024}, "subject": {"id": "rex"}}, DEV)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
