"""The Tune validator: which latents, prompts and seed each score uses, how they combine, and that it
scores the conditioning the adapter will be served with (fast tier, no Ray).

The tiny models are loaded once per module and never modified: a test that needs other weights
(a perturbed or LoRA-adapted text encoder) works on a deep copy.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save

from raydb.config import load_config
from raydb.data.demo_subject import demo_images
from raydb.data.ingest import load_images
from raydb.encode.cache import EncodedCache, load_prompts, read_encoded, write_encoded
from raydb.encode.encoders import (
    EncodedImages,
    encode_images,
    encode_prompt_set,
    encode_prompts,
    images_to_tensor,
    tokenize,
)
from raydb.models.components import load_components
from raydb.models.sdxl import sdxl_text_conditioning
from raydb.storage import Storage, join
from raydb.train.evaluate import Validator, denoising_loss, fixed_timesteps
from raydb.train.lora import add_lora

SEED = 3
VAL_SEED = SEED + 7919  # validation draws: a fixed offset from train.seed, never the training noise


def _cfg(root: Path, pretrained: str = "tiny", **sections):
    data = {"workspace": str(root / "ws"),
            "model": {"pretrained": pretrained, "cache_dir": str(root / "cache")},
            "train": {"resolution": 64, "seed": SEED}}
    return load_config(data={**data, **sections})


def _rows(enc: EncodedImages) -> list[dict]:
    return [{"index": i, "mean": enc.mean[i].numpy().tobytes(), "std": enc.std[i].numpy().tobytes(),
             "shape": list(enc.mean[i].shape)} for i in range(len(enc))]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Tiny SD components and an encode cache: 1 instance image, 1 held-out class image, 2 prompts;
    plus the expected losses, computed here straight from the cached latents."""
    root = tmp_path_factory.mktemp("validator")
    cfg = _cfg(root)
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace)
    images = [im.resize((64, 64)) for im in demo_images(2)]
    instance = encode_images(comps.vae, images_to_tensor(images[:1]))
    holdout = encode_images(comps.vae, images_to_tensor(images[1:]))
    uri = join(cfg.workspace, "encoded", "k")
    write_encoded(storage, join(uri, "instance.parquet"), _rows(instance))
    write_encoded(storage, join(uri, "holdout.parquet"), _rows(holdout))
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    embeds = encode_prompts(comps.tokenizer, comps.text_encoder, prompts)
    ids = tokenize(comps.tokenizer, prompts)
    storage.write_bytes(join(uri, "prompts.safetensors"),
                        save({"embeds": embeds.contiguous(), "ids": ids.contiguous()}))

    def expected(encoded: EncodedImages, prompt: torch.Tensor) -> float:
        return denoising_loss(comps.unet, comps.noise_scheduler, comps.vae, encoded, prompt,
                              prediction_type=comps.prediction_type, seed=VAL_SEED)

    cached_instance = read_encoded(storage, join(uri, "instance.parquet"))
    cached_holdout = read_encoded(storage, join(uri, "holdout.parquet"))
    return {
        "root": root, "cfg": cfg, "storage": storage, "comps": comps, "ids": ids, "expected": expected,
        "with_holdout": EncodedCache(uri, "k", 1, 0, 1),
        "without_holdout": EncodedCache(uri, "k", 1, 0, 0),  # the holdout file exists but is not used
        "instance": expected(cached_instance, embeds[:1]),
        "prior": expected(cached_holdout, embeds[1:]),
        "encoded": (cached_instance, cached_holdout),
    }


def _embeds(sd) -> torch.Tensor:
    return load_prompts(sd["storage"], sd["with_holdout"])["embeds"]


def test_fixed_timesteps_are_the_midpoints_of_equal_slices():
    assert fixed_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(1000, 1).tolist() == [500]
    assert fixed_timesteps(10, 3).tolist() == [1, 5, 8]  # 1.67, 5, 8.33 rounded down
    assert fixed_timesteps(1000, 4).dtype == torch.long
    with pytest.raises(ValueError, match="^num_timesteps must be at least 1, got 0$"):
        fixed_timesteps(1000, 0)


def test_scores_are_the_denoising_losses_of_instance_and_held_out_latents(sd):
    """val_instance: the instance latents with the instance prompt; val_prior: the held-out class
    latents with the class prompt; val_score = val_instance + tune.prior_weight_in_score * val_prior.

    The prompt matters to the tiny UNet (so a swapped prompt row would show).
    """
    assert sd["expected"](sd["encoded"][0], _embeds(sd)[1:]) != pytest.approx(sd["instance"], rel=1e-6)
    cfg = _cfg(sd["root"], tune={"prior_weight_in_score": 0.25})
    validator = Validator.from_cache(cfg, sd["comps"], sd["storage"], sd["with_holdout"])
    got = validator(sd["comps"].unet)
    assert got == pytest.approx({"val_instance": sd["instance"], "val_prior": sd["prior"],
                                 "val_score": sd["instance"] + 0.25 * sd["prior"]}, rel=1e-6)
    assert sd["prior"] != pytest.approx(sd["instance"], rel=1e-3)


def test_without_tune_the_prior_weighs_one_and_without_holdout_there_is_no_prior(sd):
    cfg = sd["cfg"]
    assert cfg.tune is None
    both = Validator.from_cache(cfg, sd["comps"], sd["storage"], sd["with_holdout"])(sd["comps"].unet)
    assert both["val_score"] == pytest.approx(sd["instance"] + sd["prior"], rel=1e-6)
    alone = Validator.from_cache(cfg, sd["comps"], sd["storage"], sd["without_holdout"])(sd["comps"].unet)
    assert alone == pytest.approx({"val_instance": sd["instance"], "val_score": sd["instance"]}, rel=1e-6)


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with scaled token embeddings: other hidden states, so other prompt embeddings."""
    out = copy.deepcopy(module)
    [weight] = [p for name, p in out.named_parameters() if name.endswith("token_embedding.weight")]
    with torch.no_grad():
        weight.mul_(1.5)
    return out


@pytest.mark.parametrize("training", [True, False])
def test_a_given_text_encoder_re_encodes_the_prompts(sd, training: bool):
    """With ``text_encoder`` the prompts are its last hidden states for the cached token ids, not the
    cached embeddings; its train/eval mode is restored afterwards."""
    comps = sd["comps"]
    encoder = _perturbed(comps.text_encoder).train(training)
    with torch.no_grad():
        embeds = encoder.eval()(sd["ids"])[0].float()
    encoder.train(training)
    expected = sd["expected"](sd["encoded"][0], embeds[:1])
    assert expected != pytest.approx(sd["instance"], rel=1e-6)
    validator = Validator.from_cache(sd["cfg"], comps, sd["storage"], sd["without_holdout"])
    assert validator(comps.unet, encoder) == pytest.approx(
        {"val_instance": expected, "val_score": expected}, rel=1e-6)
    assert encoder.training is training


def test_a_lora_text_encoder_at_init_reproduces_the_cached_prompts(sd):
    """LoRA at init (lora_B = 0) leaves the text encoder unchanged, so re-encoding gives the cached
    numbers; moving its LoRA weights moves the score."""
    comps = sd["comps"]
    cfg = _cfg(sd["root"], lora={"train_text_encoder": True})
    unet, encoder = copy.deepcopy(comps.unet), copy.deepcopy(comps.text_encoder)
    add_lora(unet, cfg.lora, encoder)
    validator = Validator.from_cache(cfg, comps, sd["storage"], sd["without_holdout"])
    assert validator(unet, encoder)["val_instance"] == pytest.approx(sd["instance"], rel=1e-6)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert validator(unet, encoder)["val_instance"] != pytest.approx(sd["instance"], rel=1e-4)


def test_clip_model_needs_the_instance_images(sd):
    cfg = _cfg(sd["root"], eval={"clip_model": "tiny"})
    cache = sd["without_holdout"]
    prompts = {"embeds": _embeds(sd), "ids": sd["ids"]}
    with pytest.raises(ValueError, match="^eval.clip_model: CLIP-I needs the instance images$"):
        Validator(cfg, sd["comps"], read_encoded(sd["storage"], cache.instance_uri), None, prompts)


@pytest.fixture
def clip_calls(monkeypatch):
    """``load_clip`` / ``sample_clip_metrics`` replaced by recorders (both tested in train/test_clip_eval.py):
    here only what the validator hands them and what it does with their numbers matter."""
    import raydb.train.clip_eval as clip_eval

    calls: dict[str, list] = {"load": [], "sample": []}
    model, tokenizer = object(), object()

    def load_clip(spec):
        calls["load"].append(spec)
        return model, tokenizer

    def sample_clip_metrics(cfg, comps, unet, instance_images, clip, clip_tokenizer):
        calls["sample"].append((cfg, comps, unet, instance_images, clip, clip_tokenizer))
        return {"clip_i": 0.25, "clip_t": -0.5}

    monkeypatch.setattr(clip_eval, "load_clip", load_clip)
    monkeypatch.setattr(clip_eval, "sample_clip_metrics", sample_clip_metrics)
    calls["model"] = (model, tokenizer)
    return calls


def test_clip_metrics_are_added_to_the_denoising_scores(sd, clip_calls):
    cfg = _cfg(sd["root"], eval={"clip_model": "tiny"})
    comps, storage, cache = sd["comps"], sd["storage"], sd["with_holdout"]
    images = demo_images(2, size=64)
    prompts = {"embeds": _embeds(sd), "ids": sd["ids"]}
    validator = Validator(cfg, comps, read_encoded(storage, cache.instance_uri),
                          read_encoded(storage, cache.holdout_uri), prompts, images)
    assert clip_calls["load"] == ["tiny"]
    got = validator(comps.unet)
    assert got == pytest.approx({"val_instance": sd["instance"], "val_prior": sd["prior"],
                                 "val_score": sd["instance"] + sd["prior"],
                                 "val_clip_i": 0.25, "val_clip_t": -0.5}, rel=1e-6)
    [args] = clip_calls["sample"]
    assert args[0] is cfg and args[1] is comps and args[2] is comps.unet and args[3] is images
    assert args[4:] == clip_calls["model"]


@pytest.mark.parametrize("center_crop", [True, False])
def test_from_cache_loads_the_instance_photos_for_clip_as_training_does(
    sd, clip_calls, s3_bucket, center_crop: bool,
):
    """CLIP-I's reference photos are ``subject.instance_data`` read through the given storage (here an
    S3 endpoint of its own) at ``train.resolution`` with ``train.center_crop``."""
    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    for i, size in enumerate([(96, 64), (64, 112)]):  # not square: cropping and squashing differ
        buf = io.BytesIO()
        demo_images(1, size=128)[0].resize(size).save(buf, "PNG")
        storage.write_bytes(join(bucket, f"photos/img{i}.png"), buf.getvalue())
    photos = join(bucket, "photos")
    cfg = _cfg(sd["root"], eval={"clip_model": "tiny"}, subject={"instance_data": photos},
               train={"resolution": 64, "seed": SEED, "center_crop": center_crop})
    validator = Validator.from_cache(cfg, sd["comps"], storage, sd["without_holdout"])
    expected = load_images(photos, 64, storage=storage, center_crop=center_crop)
    other = load_images(photos, 64, storage=storage, center_crop=not center_crop)
    assert [im.tobytes() for im in validator.instance_images] == [im.tobytes() for im in expected]
    assert [im.tobytes() for im in expected] != [im.tobytes() for im in other]
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in validator.instance_images)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Tiny SDXL components, one instance image's latents with its time ids, the two prompts' tensors."""
    root = tmp_path_factory.mktemp("validator-sdxl")
    cfg = _cfg(root, "tiny-sdxl")
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    enc = encode_images(comps.vae, images_to_tensor([demo_images(1, size=64)[0]]))
    encoded = EncodedImages(enc.mean, enc.std, torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]))
    prompts = encode_prompt_set(comps, [cfg.subject.instance_prompt, cfg.subject.class_prompt])
    return cfg, comps, encoded, prompts


def test_sdxl_scores_use_the_pooled_embedding_and_both_text_encoders(sdxl):
    """SDXL: the instance score conditions on the instance prompt's hidden states *and* its pooled
    embedding; given both text encoders, both are re-encoded from the cached token ids."""
    cfg, comps, encoded, prompts = sdxl

    def expected(embeds: torch.Tensor, pooled: torch.Tensor) -> float:
        return denoising_loss(comps.unet, comps.noise_scheduler, comps.vae, encoded, embeds[:1],
                              prediction_type=comps.prediction_type, seed=VAL_SEED, pooled=pooled[:1])

    validator = Validator(cfg, comps, encoded, None, prompts)
    cached = expected(prompts["embeds"], prompts["pooled"])
    assert validator(comps.unet) == pytest.approx({"val_instance": cached, "val_score": cached}, rel=1e-6)
    encoders = (_perturbed(comps.text_encoder), _perturbed(comps.text_encoder_2))
    with torch.no_grad():
        embeds, pooled = sdxl_text_conditioning(encoders, (prompts["ids"], prompts["ids_2"]))
    moved = expected(embeds.float(), pooled.float())
    assert moved != pytest.approx(cached, rel=1e-6)
    assert validator(comps.unet, *encoders)["val_instance"] == pytest.approx(moved, rel=1e-6)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """Tiny Flux components, one instance image's latents, the two prompts' tensors."""
    root = tmp_path_factory.mktemp("validator-flux")
    cfg = _cfg(root, "tiny-flux")
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    enc = encode_images(comps.vae, images_to_tensor([demo_images(1, size=64)[0]]))
    prompts = encode_prompt_set(comps, [cfg.subject.instance_prompt, cfg.subject.class_prompt])
    return cfg, comps, EncodedImages(enc.mean, enc.std), prompts


def test_flux_scores_use_t5_states_clip_pooled_and_guidance(flux):
    """FLUX.1: fixed sigmas, the instance prompt's T5 states and CLIP pooled output, guidance 1.0
    (train.flow.guidance) into the distilled transformer; a trained CLIP re-encodes only the pooled
    output (T5's states stay cached)."""
    from raydb.models.flux import flux_text_conditioning

    cfg, comps, encoded, prompts = flux

    def expected(pooled: torch.Tensor, guidance: float = 1.0) -> float:
        return denoising_loss(comps.transformer, comps.noise_scheduler, comps.vae, encoded,
                              prompts["embeds"][:1], prediction_type="flow_matching", seed=VAL_SEED,
                              pooled=pooled[:1], text_ids=prompts["text_ids"][:1], guidance=guidance)

    validator = Validator(cfg, comps, encoded, None, prompts)
    cached = expected(prompts["pooled"])
    scores = validator(comps.transformer)
    assert scores == pytest.approx({"val_instance": cached, "val_score": cached}, rel=1e-6)
    assert expected(prompts["pooled"], guidance=3.5) != pytest.approx(cached, rel=1e-6)  # guidance counts
    assert expected(prompts["pooled"]) == cached  # fixed draws: a deterministic number
    clip = _perturbed(comps.text_encoder)
    with torch.no_grad():
        _, pooled = flux_text_conditioning((clip, None), (prompts["ids"], None))
    moved = expected(pooled.float())
    assert moved != pytest.approx(cached, rel=1e-6)
    assert validator(comps.transformer, clip)["val_instance"] == pytest.approx(moved, rel=1e-6)
