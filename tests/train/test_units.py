"""Small pieces of the training core, without the tiny UNet (no Ray): the step's micro-batch list,
moving a micro-batch between devices, the base weights' dtype, restoring LoRA weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from raydb.config import TrainConfig
from raydb.encode.encoders import EncodedImages
from raydb.train.data import MicroBatch, TrainingData, make_micro_batch, step_micro_batches
from raydb.train.lora import load_lora_state, lora_state_dicts
from raydb.train.step import weights_dtype

LATENT = (4, 2, 2)


def _data() -> TrainingData:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(5, *LATENT, generator=g)
    return TrainingData(
        instance=EncodedImages(mean[:3], torch.full_like(mean[:3], 0.5)),
        class_=EncodedImages(mean[3:], torch.full_like(mean[3:], 0.5)),
        instance_embeds=torch.randn(1, 7, 8, generator=g), class_embeds=torch.randn(1, 7, 8, generator=g),
        instance_ids=torch.ones(1, 7, dtype=torch.long), class_ids=torch.zeros(1, 7, dtype=torch.long),
        latent_shape=LATENT)


def _equal(a: MicroBatch, b: MicroBatch) -> bool:
    for f in dataclasses.fields(MicroBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


@pytest.mark.parametrize(("accumulation", "batch_size", "rank", "world_size"), [(1, 1, 0, 1), (3, 2, 1, 2)])
def test_step_micro_batches_are_the_steps_micro_batches_in_order(accumulation, batch_size, rank, world_size):
    """Deliberate break caught: ``step_micro_batches`` passing ``micro=0`` for every micro-batch (or
    dropping ``rank``, the seed or the accumulation count)."""
    tc = TrainConfig(batch_size=batch_size, gradient_accumulation_steps=accumulation, seed=11)
    data = _data()
    got = step_micro_batches(data, tc, step=4, num_train_timesteps=50, rank=rank, world_size=world_size)
    assert len(got) == accumulation
    for micro, batch in enumerate(got):
        want = make_micro_batch(data, step=4, micro=micro, batch_size=batch_size, accumulation=accumulation,
                                seed=11, num_train_timesteps=50, rank=rank, world_size=world_size)
        assert _equal(batch, want) and batch.size == 2 * batch_size
    other_seed = step_micro_batches(data, tc.model_copy(update={"seed": 12}), step=4, num_train_timesteps=50,
                                    rank=rank, world_size=world_size)
    assert not _equal(other_seed[0], got[0])
    assert int(max(b.timesteps.max() for b in got)) < 50


def test_micro_batch_to_moves_every_tensor_and_keeps_none():
    batch = make_micro_batch(_data(), step=0, micro=0, batch_size=2, accumulation=1, seed=0,
                             num_train_timesteps=10)
    moved = batch.to("meta")
    for f in dataclasses.fields(MicroBatch):
        before, after = getattr(batch, f.name), getattr(moved, f.name)
        if before is None:
            assert after is None, f.name
        else:
            assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype
    assert batch.noise.device.type == "cpu"  # a copy: the original stays
    assert moved.pixels is None and moved.latent_mean is not None


def test_micro_batch_to_passes_non_blocking(monkeypatch):
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return original(self, *args, **kwargs)

    batch = make_micro_batch(_data(), step=0, micro=0, batch_size=1, accumulation=1, seed=0,
                             num_train_timesteps=10)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    batch.to("cpu", non_blocking=True)
    assert seen and all(flag is True for flag in seen)
    seen.clear()
    batch.to("cpu")
    assert seen and all(flag is False for flag in seen)


@pytest.mark.parametrize(("settings", "dtype"), [
    ({}, torch.float32),
    ({"dtype": "float64"}, torch.float64),
    ({"mixed_precision": "bf16"}, torch.bfloat16),
    ({"mixed_precision": "fp16"}, torch.float16),
    ({"mixed_precision": "no", "dtype": "float64"}, torch.float64),
    ({"mixed_precision": "auto"}, torch.float32),  # auto on CPU: no mixed precision
])
def test_weights_dtype(settings, dtype):
    assert weights_dtype(TrainConfig(**settings), "cpu") == dtype
    assert weights_dtype(TrainConfig(**settings)) == dtype


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(4, 4)
        self.to_k = torch.nn.Linear(4, 4)


def _lora_module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = inject_adapter_in_model(PeftLoraConfig(r=2, target_modules=["to_q", "to_k"],
                                                    init_lora_weights="gaussian"), _Tiny())
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.normal_()
    return module


def _lora(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def test_load_lora_state_restores_unet_and_each_text_encoder_it_was_given():
    """Deliberate break caught: ``load_lora_state`` skipping the text encoders (a resumed run with
    text-encoder LoRA would restart those weights)."""
    unet, enc, enc2 = _lora_module(1), _lora_module(2), _lora_module(3)
    states = lora_state_dicts(unet, enc, enc2, dtype=None)
    assert set(states) == {"unet", "text_encoder", "text_encoder_2"}
    unet_b, enc_b, enc2_b = _lora_module(4), _lora_module(5), _lora_module(6)
    load_lora_state(unet_b, states, enc_b, enc2_b)
    for a, b in ((unet, unet_b), (enc, enc_b), (enc2, enc2_b)):
        want, got = _lora(a), _lora(b)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_load_lora_state_leaves_an_encoder_without_saved_state_alone():
    unet, enc = _lora_module(1), _lora_module(2)
    states = lora_state_dicts(unet, None, None, dtype=None)
    assert set(states) == {"unet"}
    before = _lora(enc)
    load_lora_state(_lora_module(3), states, enc, None)
    after = _lora(enc)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("guidance", [None, 1.0])
def test_sample_grid_uses_the_configured_guidance(guidance, make_cfg, monkeypatch):
    """``train.sample_guidance_scale`` reaches both rows of the grid; none leaves the pipeline's
    default (the digits demo samples at 1: at SD's default 7.5 its subject row was mush while the
    served image, generated at 1, showed the subject)."""
    import io

    from PIL import Image

    from raydb.models import components
    from raydb.train.outputs import sample_grid_png

    calls = []

    class Pipe:
        def __call__(self, prompt, **kwargs):
            calls.append(kwargs)
            return type("Out", (), {"images": [Image.new("RGB", (8, 8))]})()

        def load_lora_weights(self, *args, **kwargs):
            pass

    monkeypatch.setattr(components, "load_pipeline", lambda *args, **kwargs: Pipe())
    cfg = make_cfg(train={"num_sample_images": 2, "sample_guidance_scale": guidance, "resolution": 8})
    png = sample_grid_png(cfg, None, b"weights")
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    assert len(calls) == 4  # two seeds, base row and adapter row
    assert all(c.get("guidance_scale") == guidance for c in calls)
    assert [c["generator"].initial_seed() for c in calls] == [0, 1, 0, 1]
