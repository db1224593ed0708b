"""``raydb.train.data`` pinned piece by piece, on synthetic tensors (no model, no Ray; milliseconds).

Latent means encode their image (``100 + i`` for instance image i, ``-(100 + j)`` for class image j)
and per-image SDXL time ids repeat the same code, so every row of a micro-batch can be traced back to
its source image and its conditioning checked against it.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from raydb.config import TrainConfig
from raydb.encode.encoders import EncodedImages
from raydb.train.data import (
    MicroBatch,
    TrainingData,
    make_micro_batch,
    prompt_inputs,
    step_micro_batches,
    training_data,
)
from tests.helpers.training_data import coded, image_code, micro_batch

LATENT = (1, 2, 2)  # 4 elements: torch draws them on its scalar path, the same on every CPU
L, D, D2P = 3, 5, 6


def _coded(count: int, sign: float, with_time_ids: bool = False) -> EncodedImages:
    return coded(count, sign, LATENT, with_time_ids=with_time_ids)


def _prompts(g: torch.Generator) -> dict[str, torch.Tensor]:
    """The encode cache's ``prompts.safetensors``: row 0 the instance prompt, row 1 the class prompt."""
    return {"embeds": torch.randn(2, L, D, generator=g), "ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
            "pooled": torch.randn(2, D2P, generator=g), "ids_2": torch.tensor([[7, 8, 9], [10, 11, 12]])}


# -- the sample stream is a stable format ----------------------------------------------------------
PINNED = {  # computed once with raydb's stream definition; they must never change silently
    "instance_t": [964, 576, 511, 972, 110, 18, 271, 210, 910, 226],
    "class_t": [500, 270, 321, 339, 53, 391, 464, 471, 869, 495],
    "instance_images": [3, 1, 0, 2, 4, 2, 4, 3, 1, 0],  # epochs of 5: two permutations
    "class_images": [-1, -3, -2, -1, -3, -2, -2, -3, -1, -2],  # epochs of 3
}


def test_sample_stream_is_pinned():
    """Seed 0's first timesteps and image orders, as integers (exact on every CPU).

    A checkpoint resumed by a later raydb must see the batches the interrupted run would have seen,
    so how ``(train.seed, stream, position)`` becomes a generator seed is a format: changing the
    hash, its size, byte order or mask, the stream names or the draw order changes these numbers.
    """
    data = TrainingData(instance=_coded(5, 1.0), class_=_coded(3, -1.0), instance_embeds=None,
                        class_embeds=None, instance_ids=torch.zeros(1, L, dtype=torch.long),
                        class_ids=torch.zeros(1, L, dtype=torch.long), latent_shape=LATENT)
    batches = [micro_batch(data, s, batch_size=1) for s in range(10)]
    instance_t = [int(b.timesteps[0]) for b in batches]
    class_t = [int(b.timesteps[1]) for b in batches]
    instance_images = [image_code(b.latent_mean)[0] for b in batches]
    class_images = [image_code(b.latent_mean)[1] for b in batches]
    assert instance_t == PINNED["instance_t"]
    assert class_t == PINNED["class_t"]
    assert instance_images == PINNED["instance_images"]
    assert class_images == PINNED["class_images"]
    # latent-sampling noise and diffusion noise are separate draws of the same generator
    for b in batches[:3]:
        assert not torch.equal(b.latent_eps, b.noise)




# -- training_data / prompt_inputs -----------------------------------------------------------------
def test_training_data_splits_the_prompt_rows_and_takes_time_ids_from_the_images():
    g = torch.Generator().manual_seed(0)
    p = _prompts(g)
    inst, cls = _coded(3, 1.0, with_time_ids=True), _coded(2, -1.0, with_time_ids=True)
    data = training_data(inst, cls, p["embeds"], p["ids"], prompt_pooled=p["pooled"],
                         prompt_ids_2=p["ids_2"])
    assert data.with_prior and data.latent_shape == LATENT and isinstance(data.latent_shape, tuple)
    for name, key in (("embeds", "embeds"), ("ids", "ids"), ("pooled", "pooled"), ("ids_2", "ids_2")):
        assert torch.equal(getattr(data, f"instance_{name}"), p[key][0:1]), name
        assert torch.equal(getattr(data, f"class_{name}"), p[key][1:2]), name
    assert data.instance_time_ids is inst.time_ids and data.class_time_ids is cls.time_ids
    assert data.instance is inst and data.class_ is cls


def test_training_data_without_prior_has_no_class_side():
    g = torch.Generator().manual_seed(0)
    p = _prompts(g)
    inst = _coded(3, 1.0, with_time_ids=True)
    explicit = (torch.ones(3, 6), torch.ones(2, 6))
    data = training_data(inst, None, p["embeds"][:1], p["ids"][:1], prompt_pooled=p["pooled"][:1],
                         prompt_ids_2=p["ids_2"][:1], time_ids=explicit)
    assert not data.with_prior
    for name in ("class_", "class_embeds", "class_ids", "class_pooled", "class_ids_2", "class_time_ids"):
        assert getattr(data, name) is None, name
    assert torch.equal(data.instance_embeds, p["embeds"][0:1])
    assert data.instance_time_ids is explicit[0]  # explicit time ids win over the images' own


def test_training_data_embeds_none_when_text_encoder_trains_and_pixels_need_a_shape():
    pixels = torch.zeros(5, 3, 16, 16)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="^" + re.escape(
            "latent_shape is required for pixel (uncached) training data") + "$"):
        training_data(pixels, pixels, None, ids)
    data = training_data(pixels, pixels, None, ids, latent_shape=LATENT)
    assert data.instance_embeds is None and data.class_embeds is None
    assert data.instance_pooled is None and data.class_ids_2 is None
    assert data.instance_time_ids is None and data.class_time_ids is None
    assert torch.equal(data.class_ids, ids[1:2])


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_prompt_inputs(train_text_encoder):
    g = torch.Generator().manual_seed(0)
    p = _prompts(g)
    got = prompt_inputs(p, train_text_encoder)
    assert set(got) == {"prompt_embeds", "prompt_ids", "prompt_pooled", "prompt_ids_2", "prompt_text_ids"}
    assert got["prompt_ids"] is p["ids"] and got["prompt_ids_2"] is p["ids_2"]
    if train_text_encoder:
        assert got["prompt_embeds"] is None and got["prompt_pooled"] is None
    else:
        assert got["prompt_embeds"] is p["embeds"] and got["prompt_pooled"] is p["pooled"]
    sd = prompt_inputs({"embeds": p["embeds"], "ids": p["ids"]}, train_text_encoder)  # SD 1.x cache
    assert sd["prompt_pooled"] is None and sd["prompt_ids_2"] is None and sd["prompt_text_ids"] is None
    # FLUX.1: only CLIP trains, so its pooled output is dropped while T5's states stay
    flux = prompt_inputs(p | {"text_ids": torch.zeros(2, 5, 3)}, train_text_encoder)
    assert flux["prompt_embeds"] is p["embeds"] and flux["prompt_text_ids"].shape == (2, 5, 3)
    assert (flux["prompt_pooled"] is None) == train_text_encoder


# -- make_micro_batch: conditioning per half --------------------------------------------------------
def test_sdxl_fields_follow_each_rows_half_and_image():
    """Pooled embeddings and second-tokenizer ids are the half's prompt repeated; time ids are the
    row's own image's (row i of the source's time ids belongs to image i)."""
    g = torch.Generator().manual_seed(1)
    p = _prompts(g)
    data = training_data(_coded(3, 1.0, True), _coded(4, -1.0, True), p["embeds"], p["ids"],
                         prompt_pooled=p["pooled"], prompt_ids_2=p["ids_2"])
    b = 3
    for step in range(3):
        batch = micro_batch(data, step, batch_size=b)
        assert batch.size == 2 * b
        assert image_code(batch.time_ids) == image_code(batch.latent_mean)
        assert batch.time_ids.shape == (2 * b, 6)
        for name, key in (("pooled", "pooled"), ("input_ids_2", "ids_2"), ("input_ids", "ids"),
                          ("encoder_hidden_states", "embeds")):
            got = getattr(batch, name)
            assert got.shape == (2 * b, *p[key].shape[1:]), name
            assert torch.equal(got[:b], p[key][0:1].expand(b, *p[key].shape[1:])), name
            assert torch.equal(got[b:], p[key][1:2].expand(b, *p[key].shape[1:])), name


def test_optional_fields_stay_none_and_instance_only_batches_have_b_rows():
    ids = torch.tensor([[1, 2, 3]])
    data = training_data(_coded(3, 1.0), None, None, ids)
    batch = micro_batch(data, 0, batch_size=2)
    assert batch.size == 2 and batch.noise.shape == (2, *LATENT) and batch.timesteps.shape == (2,)
    assert batch.timesteps.dtype == torch.long
    for name in ("encoder_hidden_states", "pooled", "time_ids", "input_ids_2", "pixels"):
        assert getattr(batch, name) is None, name
    assert torch.equal(batch.input_ids, ids.expand(2, L))
    assert image_code(batch.latent_mean) == [image_code(batch.latent_std * 1000)[i] for i in range(2)]


def test_pixel_sources_give_pixel_rows_of_the_same_images():
    """The uncached path samples the same images as the cached one (same positions), as pixels."""
    n_inst, n_cls = 5, 3  # 5 images of 3 channels: counting channels instead of images would show
    cached = TrainingData(instance=_coded(n_inst, 1.0), class_=_coded(n_cls, -1.0), instance_embeds=None,
                          class_embeds=None, instance_ids=torch.zeros(1, L, dtype=torch.long),
                          class_ids=torch.ones(1, L, dtype=torch.long), latent_shape=LATENT)

    def pixels(count: int, sign: float) -> torch.Tensor:
        return torch.stack([torch.full((3, 16, 16), sign * (100.0 + i)) for i in range(count)])

    raw = dataclasses.replace(cached, instance=pixels(n_inst, 1.0), class_=pixels(n_cls, -1.0))
    for step in range(4):
        a, b = micro_batch(cached, step, batch_size=2), micro_batch(raw, step, batch_size=2)
        assert b.latent_mean is None and b.latent_std is None
        assert b.pixels.shape == (4, 3, 16, 16)
        assert image_code(b.pixels) == image_code(a.latent_mean)
        assert a.pixels is None
        for name in ("latent_eps", "noise", "timesteps", "input_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


# -- step_micro_batches defaults, MicroBatch.pin_memory ---------------------------------------------
def test_step_micro_batches_defaults_are_rank_0_of_1_on_cpu():
    data = TrainingData(instance=_coded(3, 1.0), class_=None, instance_embeds=None, class_embeds=None,
                        instance_ids=torch.zeros(1, L, dtype=torch.long), class_ids=None, latent_shape=LATENT)
    tc = TrainConfig(batch_size=2, gradient_accumulation_steps=2, seed=5)
    got = step_micro_batches(data, tc, step=1, num_train_timesteps=1000)
    for micro, batch in enumerate(got):
        want = make_micro_batch(data, step=1, micro=micro, batch_size=2, accumulation=2, seed=5,
                                num_train_timesteps=1000, rank=0, world_size=1)
        assert batch.noise.device.type == "cpu"
        assert torch.equal(batch.noise, want.noise) and torch.equal(batch.timesteps, want.timesteps)
    moved = step_micro_batches(data, tc, step=1, num_train_timesteps=1000, device="meta")
    assert all(t.device.type == "meta" for b in moved for t in (b.noise, b.latent_mean, b.input_ids))


def test_pin_memory_pins_every_tensor_and_keeps_none(monkeypatch):
    """CPU-only machines cannot pin, so ``Tensor.pin_memory`` is replaced by a recording copy."""
    pinned: list[torch.Tensor] = []

    def fake_pin(self):
        out = self.clone()
        pinned.append(out)
        return out

    data = training_data(_coded(3, 1.0), None, None, torch.tensor([[1, 2, 3]]))
    batch = micro_batch(data, 0, batch_size=2)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    for f in dataclasses.fields(MicroBatch):
        before, after = getattr(batch, f.name), getattr(out, f.name)
        if before is None:
            assert after is None, f.name
        else:
            assert any(after is t for t in pinned), f.name
            assert torch.equal(after, before)
    assert len(pinned) == sum(getattr(batch, f.name) is not None for f in dataclasses.fields(MicroBatch))
