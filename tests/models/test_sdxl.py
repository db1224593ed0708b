"""SDXL as a model family: the tiny SDXL, family detection, conditioning, the fp16 VAE guard."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from raydb.data.ingest import load_images_with_geometry
from raydb.models.family import SD, SDXL, check_finite_latents, detect_family, family_spec, vae_encode_dtype
from raydb.models.sdxl import encode_prompts_sdxl, time_ids_for, unet_added_conditions
from raydb.models.tiny_sdxl import tiny_sdxl_identity


def _sdxl_pipe(path: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sdxl_is_a_real_sdxl_folder(tiny_sdxl_dir: str) -> None:
    root = Path(tiny_sdxl_dir)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((root / "raydb_identity.json").read_text()) == {"identity": tiny_sdxl_identity()}
    pipe = _sdxl_pipe(tiny_sdxl_dir)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == widths  # both encoders' hidden states, concatenated
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    image = pipe("a photo of sks dog", num_inference_steps=1, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_family_is_read_from_the_folder(tiny_model_dir: str, tiny_sdxl_dir: str, tmp_path: Path) -> None:
    assert detect_family(tiny_model_dir) == SD
    assert detect_family(tiny_sdxl_dir) == SDXL
    assert family_spec(SDXL).default_resolution == 1024 and family_spec(SD).default_resolution == 512
    assert family_spec(SDXL).pipeline_class == "StableDiffusionXLPipeline"
    # A model_index.json that lists a second text encoder over an SD UNet is contradictory.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index | {"text_encoder_2": ["x", "y"]}))
    with pytest.raises(ValueError, match="model_index.json"):
        detect_family(broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match="unet/config.json"):
        detect_family(broken)


def test_prompt_conditioning_matches_the_sdxl_pipeline(tiny_sdxl_dir: str) -> None:
    pipe = _sdxl_pipe(tiny_sdxl_dir)
    prompts = ["a photo of sks dog", "a red toy on the beach"]
    hidden, pooled = encode_prompts_sdxl([pipe.tokenizer, pipe.tokenizer_2],
                                         [pipe.text_encoder, pipe.text_encoder_2], prompts)
    ref_hidden, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert hidden.shape == (2, 77, 32 + 48) and pooled.shape == (2, 48)
    assert torch.equal(hidden, ref_hidden) and torch.equal(pooled, ref_pooled)


def test_time_ids_come_from_each_images_real_crop(tmp_path: Path, tiny_sdxl_dir: str) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    # wide 97x64 (w x h): resized 97x64, cropped 16 px from the left; tall 64x130: resized to
    # 64x130, cropped 33 px from the top; a large square is only downscaled.
    sizes = {"a_wide.png": (97, 64), "b_tall.png": (64, 130), "c_square.png": (128, 128)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 10, 10)).save(photos / name)
    loaded = load_images_with_geometry(str(photos), 64)
    geometries = [g for _, g in loaded]
    expected = torch.tensor([[64, 97, 0, 16, 64, 64], [130, 64, 33, 0, 64, 64], [128, 128, 0, 0, 64, 64]],
                            dtype=torch.float32)
    assert torch.equal(time_ids_for(geometries), expected)
    # the flipped copy of the wide photo sees its crop from the other side: 97 - 64 - 16 = 17
    assert geometries[0].mirrored().crop_top_left == (0, 17)
    assert geometries[2].mirrored().crop_top_left == (0, 0)
    # the same numbers the SDXL pipeline builds for these sizes at inference
    pipe = _sdxl_pipe(tiny_sdxl_dir)
    ref = pipe._get_add_time_ids((64, 97), (0, 16), (64, 64), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids_for(geometries[:1]), ref)
    cond = unet_added_conditions(torch.zeros(3, 48), time_ids_for(geometries))
    assert cond["time_ids"].shape == (3, 6) and cond["text_embeds"].shape == (3, 48)
    with pytest.raises(ValueError, match="pooled"):
        unet_added_conditions(torch.zeros(2, 48), time_ids_for(geometries))


def test_fp16_sdxl_vae_is_encoded_in_fp32_and_nan_latents_are_refused(tiny_sdxl_dir: str) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    # Weights fp16 can hold (5000) whose activations it cannot (27 inputs * 5000 > 65504), the
    # way SDXL's real VAE overflows at 1024 px.
    with torch.no_grad():
        vae.encoder.conv_in.weight.fill_(5000.0)
    pixels = torch.rand(1, 3, 64, 64) * 0.5 + 0.5
    with torch.no_grad():
        half = copy.deepcopy(vae).to(torch.float16).encode(pixels.half()).latent_dist
    assert not torch.isfinite(half.mean).all()  # what a plain fp16 encode would cache
    with pytest.raises(ValueError, match="non-finite"):
        check_finite_latents(half.mean, half.std, "encode")
    dtype = vae_encode_dtype(vae.config, torch.float16)
    assert dtype == torch.float32 and vae_encode_dtype(vae.config, torch.bfloat16) == torch.bfloat16
    with torch.no_grad():
        full = vae.to(dtype).encode(pixels).latent_dist
    check_finite_latents(full.mean, full.std, "encode")
