"""The shared trainer core on the tiny SDXL: the same step, with SDXL's added conditioning.

Fast tier: no Ray. Components are loaded straight from the tiny SDXL folder; the encodings are
what the encode stage caches for SDXL (both encoders' hidden states, the pooled embedding, and
per-image size/crop time ids).
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load

from raydb.config import load_config
from raydb.data.ingest import ImageGeometry
from raydb.encode.encoders import EncodedImages, encode_images
from raydb.models.sdxl import encode_prompts_sdxl, time_ids_for, tokenize_sdxl
from raydb.train.data import TrainingData, make_micro_batch
from raydb.train.lora import save_lora
from raydb.train.step import build_train_state, forward_loss, optimizer_step


def _components(path: str):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()
    return pipe, DDPMScheduler.from_pretrained(path, subfolder="scheduler")


def _data(pipe, train_text_encoder: bool) -> TrainingData:
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    pixels = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoded = encode_images(pipe.vae, pixels)
    # image i was cropped i px from the left: time_ids[:, 3] names the image a sample came from
    geometry = [ImageGeometry((96, 64 + i), (96, 64 + i), (16, i), (64, 64)) for i in range(6)]
    prompts = ["a photo of sks dog", "a photo of dog"]
    (i_hidden, c_hidden), (i_pooled, c_pooled) = (
        t.split(1) for t in encode_prompts_sdxl(tokenizers, encoders, prompts))
    (i_ids, c_ids), (i_ids2, c_ids2) = (t.split(1) for t in tokenize_sdxl(tokenizers, prompts))
    keep = not train_text_encoder
    return TrainingData(
        instance=EncodedImages(encoded.mean[:3], encoded.std[:3]),
        class_=EncodedImages(encoded.mean[3:], encoded.std[3:]),
        instance_embeds=i_hidden if keep else None, class_embeds=c_hidden if keep else None,
        instance_ids=i_ids, class_ids=c_ids, latent_shape=tuple(encoded.mean.shape[1:]),
        instance_pooled=i_pooled if keep else None, class_pooled=c_pooled if keep else None,
        instance_time_ids=time_ids_for(geometry[:3]), class_time_ids=time_ids_for(geometry[3:]),
        instance_ids_2=i_ids2, class_ids_2=c_ids2,
    )


def _cfg(train_text_encoder: bool = False):
    train = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "resolution": 64}
    return load_config(data={"train": train, "lora": {"rank": 2, "train_text_encoder": train_text_encoder}})


def _micro(data: TrainingData, step: int):
    return make_micro_batch(data, step=step, micro=0, batch_size=2, accumulation=1, seed=0,
                            num_train_timesteps=1000)


def test_sdxl_step_trains_unet_lora_with_added_conditioning(tiny_sdxl_dir: str) -> None:
    pipe, scheduler = _components(tiny_sdxl_dir)
    data = _data(pipe, train_text_encoder=False)
    batch = _micro(data, 0)
    assert batch.time_ids.shape == (4, 6) and batch.pooled.shape == (4, 48)
    # each sample carries its own image's crop (instance half: images 0-2, class half: 3-5)
    assert set(batch.time_ids[:2, 3].tolist()) <= {0, 1, 2}
    assert set(batch.time_ids[2:, 3].tolist()) <= {3, 4, 5}
    cfg = _cfg()
    state = build_train_state(cfg, pipe.unet, pipe.text_encoder)
    kw = {"prediction_type": "epsilon", "prior_loss_weight": 1.0, "with_prior": True, "vae": pipe.vae}
    with torch.no_grad():
        loss = forward_loss(pipe.unet, scheduler, batch, **kw).total
        batch.time_ids = batch.time_ids + 100  # another framing -> another prediction
        moved = forward_loss(pipe.unet, scheduler, batch, **kw).total
    assert loss.item() != moved.item()
    before = {k: p.detach().clone() for k, p in pipe.unet.named_parameters()}
    for step in range(3):
        metrics = optimizer_step(state, [_micro(data, step)], cfg=cfg, noise_scheduler=scheduler,
                                 prediction_type="epsilon", with_prior=True, vae=pipe.vae)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = dict(pipe.unet.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_sdxl_text_encoder_lora_trains_both_encoders(tiny_sdxl_dir: str) -> None:
    pipe, scheduler = _components(tiny_sdxl_dir)
    data = _data(pipe, train_text_encoder=True)
    cfg = _cfg(train_text_encoder=True)
    state = build_train_state(cfg, pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert state.text_encoder is pipe.text_encoder and state.text_encoder_2 is pipe.text_encoder_2
    before = {n: {k: p.detach().clone() for k, p in m.named_parameters() if "lora_B" in k}
              for n, m in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2))}
    for step in range(2):
        optimizer_step(state, [_micro(data, step)], cfg=cfg, noise_scheduler=scheduler,
                       prediction_type="epsilon", with_prior=True, vae=pipe.vae)
    for name, module in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        now = {k: p for k, p in module.named_parameters() if "lora_B" in k}
        assert any(not torch.equal(before[name][k], now[k]) for k in now), name
    keys = st_load(save_lora(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
