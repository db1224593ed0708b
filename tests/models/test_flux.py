"""FLUX.1 as a model family: the tiny Flux, family detection, and conditioning identical to
``FluxPipeline``'s own (``encode_prompt``, latent packing and ids, the transformer call).

Fast tier, no Ray. Exact equality where the same kernels run on the same inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raydb.models.family import FLUX, SD, SDXL, detect_family, family_spec
from raydb.models.flux import (
    encode_prompts_flux,
    flux_velocity,
    latent_image_ids,
    max_sequence_length,
    pack_latents,
    tokenize_flux,
    unpack_latents,
)

PROMPTS = ["a photo of sks dog", "a red toy on the beach, in snow!"]


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_flux_is_detected_and_generates_offline(tiny_flux_dir, pipe, tiny_model_dir, tiny_sdxl_dir):
    assert detect_family(tiny_flux_dir) == FLUX
    assert detect_family(tiny_model_dir) == SD and detect_family(tiny_sdxl_dir) == SDXL
    spec = family_spec(FLUX)
    assert (spec.pipeline_class, spec.default_resolution, spec.denoiser, spec.objective) == (
        "FluxPipeline", 1024, "transformer", "flow")
    config = pipe.transformer.config
    assert config.guidance_embeds and config.in_channels == 4 * pipe.vae.config.latent_channels == 64
    blocks = pipe.transformer
    assert len(blocks.transformer_blocks) == 2 and len(blocks.single_transformer_blocks) == 2
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    images = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                  max_sequence_length=max_sequence_length(pipe.tokenizer_2),
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_family_detection_refuses_contradictions_and_names_the_file(tiny_flux_dir, tmp_path):
    index = _copy(tiny_flux_dir, tmp_path / "index")
    meta = json.loads((index / "model_index.json").read_text())
    (index / "model_index.json").write_text(json.dumps(meta | {"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match=r"model_index\.json describes a StableDiffusion3Pipeline"):
        detect_family(index)
    other = _copy(tiny_flux_dir, tmp_path / "other")
    config = json.loads((other / "transformer" / "config.json").read_text())
    config["_class_name"] = "SD3Transformer2DModel"
    (other / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"transformer/config\.json is a 'SD3Transformer2DModel'"):
        detect_family(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither .*unet/config\.json nor .*transformer/config\.json"):
        detect_family(tmp_path / "empty")
    bare = _copy(tiny_flux_dir, tmp_path / "bare")  # no model_index.json: the transformer decides
    (bare / "model_index.json").unlink()
    assert detect_family(bare) == FLUX


def test_prompt_conditioning_equals_flux_pipeline_encode_prompt(pipe):
    length = max_sequence_length(pipe.tokenizer_2)
    assert length == 32  # the tiny T5's limit (FLUX.1-dev: 512)
    ours = encode_prompts_flux((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                               PROMPTS)
    with torch.no_grad():  # as in FluxPipeline.__call__ (T5's kernels differ in their last bits with grad)
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu",
                                                      max_sequence_length=length)
    assert torch.equal(ours["embeds"], embeds) and torch.equal(ours["pooled"], pooled)
    assert ours["embeds"].shape == (2, length, 48) and ours["pooled"].shape == (2, 32)
    assert torch.equal(ours["text_ids"][0], text_ids) and torch.equal(ours["text_ids"][1], text_ids)
    clip_ids, t5_ids = tokenize_flux((pipe.tokenizer, pipe.tokenizer_2), PROMPTS)
    assert torch.equal(ours["ids"], clip_ids) and torch.equal(ours["ids_2"], t5_ids)
    assert clip_ids.shape == (2, 77) and t5_ids.shape == (2, length)
    assert (t5_ids != pipe.tokenizer_2.unk_token_id).all()  # the built-in vocabulary covers prompts


def test_latent_packing_and_ids_equal_the_pipeline_helpers(pipe):
    latents = torch.randn(3, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 3, 16, 6, 10))
    assert packed.shape == (3, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # the pipeline unpacks from pixel sizes (latents x 8)
    assert torch.equal(pipe._unpack_latents(packed, 48, 80, pipe.vae_scale_factor), latents)
    assert torch.equal(latent_image_ids(6, 10), pipe._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def test_transformer_call_equals_the_pipelines(pipe):
    """flux_velocity (unpacked in, unpacked out) = the transformer called the way the pipeline
    calls it (packed latents, t / 1000, guidance per sample, 2-d ids)."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 4, 6, generator=g)
    sigmas = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu",
                                                      max_sequence_length=32)
        ours = flux_velocity(pipe.transformer, latents, sigmas, t5_states=embeds, pooled=pooled,
                             text_ids=text_ids, guidance=torch.full((2,), 3.5))
        theirs = pipe.transformer(
            hidden_states=pipe._pack_latents(latents, 2, 16, 4, 6), timestep=(sigmas * 1000) / 1000,
            guidance=torch.full([1], 3.5).expand(2), pooled_projections=pooled, encoder_hidden_states=embeds,
            txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
            return_dict=False)[0]
    torch.testing.assert_close(ours, pipe._unpack_latents(theirs, 32, 48, 8), rtol=0, atol=0)
    with pytest.raises(ValueError, match="guidance-distilled"):
        flux_velocity(pipe.transformer, latents, sigmas, t5_states=embeds, pooled=pooled, text_ids=text_ids,
                      guidance=None)


def test_configured_family_reads_only_the_config_files(tiny_flux_dir, s3_bucket, tmp_path):
    """What a training submission checks its resolution against, before any work is queued: a
    built-in model's family (the same as its folder's), a local folder's, an ``s3://`` folder's from
    its few config files (its weights are never read), and None for a hub id (offline)."""
    from raydb.config import ModelConfig
    from raydb.models.components import BUILTIN_MODELS, configured_family, resolve_model
    from raydb.storage import Storage

    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    for name in BUILTIN_MODELS:  # every built-in model: the family its materialised folder has
        model = ModelConfig(pretrained=name)
        folder, _ = resolve_model(model, storage, str(tmp_path / "ws"))
        assert configured_family(model, storage) == detect_family(folder), name
    assert configured_family(ModelConfig(pretrained="tiny"), storage) == SD
    assert configured_family(ModelConfig(pretrained=tiny_flux_dir), storage) == FLUX
    storage.upload_dir(tiny_flux_dir, f"{bucket}/flux")
    reads = []
    read_bytes = storage.read_bytes
    storage.read_bytes = lambda uri: reads.append(uri) or read_bytes(uri)
    assert configured_family(ModelConfig(pretrained=f"{bucket}/flux"), storage) == FLUX
    assert reads and all(uri.endswith(".json") for uri in reads), reads
    assert configured_family(ModelConfig(pretrained="black-forest-labs/FLUX.1-dev"), storage) is None
