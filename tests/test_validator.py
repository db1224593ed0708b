"""The Tune validator scores the conditioning the adapter will be served with (fast tier, no Ray)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from raydb.data.demo import demo_images
from raydb.encode.cache import EncodedCache, write_encoded
from raydb.encode.encoders import encode_images, encode_prompts, images_to_tensor, tokenize
from raydb.models.components import load_components
from raydb.storage import Storage, join
from raydb.train.evaluate import Validator
from raydb.train.lora import add_lora


def _cache(cfg, comps, storage: Storage) -> EncodedCache:
    """Two instance images and the two prompts, written as the encode stage writes them."""
    enc = encode_images(comps.vae, images_to_tensor([im.resize((64, 64)) for im in demo_images(2)]))
    cache = EncodedCache(join(cfg.workspace, "encoded", "k"), "k", 2, 0)
    write_encoded(storage, cache.instance_uri, [
        {"index": i, "mean": enc.mean[i].numpy().tobytes(), "std": enc.std[i].numpy().tobytes(),
         "shape": list(enc.mean[i].shape)} for i in range(2)])
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    storage.write_bytes(cache.prompts_uri, save({
        "embeds": encode_prompts(comps.tokenizer, comps.text_encoder, prompts).contiguous(),
        "ids": tokenize(comps.tokenizer, prompts).contiguous()}))
    return cache


def test_validator_uses_the_trained_text_encoder(make_cfg):
    cfg = make_cfg(lora={"train_text_encoder": True})
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace)
    cache = _cache(cfg, comps, storage)
    add_lora(comps.unet, cfg.lora, comps.text_encoder)
    validator = Validator.from_cache(cfg, comps, storage, cache)
    frozen_prompts = validator(comps.unet)["val_instance"]
    # with its LoRA at init (lora_B = 0) the text encoder reproduces the cached embeddings
    assert validator(comps.unet, comps.text_encoder)["val_instance"] == pytest.approx(frozen_prompts)
    with torch.no_grad():
        for name, p in comps.text_encoder.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    comps.text_encoder.train()
    moved = validator(comps.unet, comps.text_encoder)["val_instance"]
    assert moved != pytest.approx(frozen_prompts, rel=1e-4)
    assert comps.text_encoder.training  # its mode is restored
