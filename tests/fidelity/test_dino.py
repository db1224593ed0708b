"""DINO (eval.dino_model): the [CLS]-cosine score, and Tune's validator reporting it beside CLIP."""

from __future__ import annotations

import pytest

from raydb.data.demo_subject import demo_images
from raydb.fidelity.dino import dino_score, load_dino


def test_dino_scores_are_cosines_and_an_image_against_itself_scores_one():
    model = load_dino("tiny")
    images = demo_images(3)
    assert dino_score(model, images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    other = dino_score(model, images[:2], images[2:])
    assert -1.0 <= other < 0.9999
    assert dino_score(model, images[:2], images[2:]) == other  # deterministic


def test_validator_reports_dino_on_the_instance_samples(make_cfg, monkeypatch):
    from raydb.encode.encoders import encode_images, encode_prompt_set, images_to_tensor
    from raydb.models.components import load_components
    from raydb.storage import Storage
    from raydb.train import clip_eval
    from raydb.train.evaluate import Validator

    cfg = make_cfg(eval={"dino_model": "tiny", "num_images": 2, "num_inference_steps": 2},
                   tune={"metric": "val_dino"})
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    photos = demo_images(2)
    encoded = encode_images(comps.vae, images_to_tensor([p.resize((64, 64)) for p in photos]))
    prompts = encode_prompt_set(comps, [cfg.subject.instance_prompt, cfg.subject.class_prompt])
    samples = []
    sample = clip_eval.sample_instance_images

    def recording(*args):
        samples.append(sample(*args))
        return samples[-1]

    monkeypatch.setattr(clip_eval, "sample_instance_images", recording)
    validator = Validator(cfg, comps, encoded, None, prompts, photos)
    out = validator(comps.unet)
    [images] = samples
    assert len(images) == 2 and "val_clip_i" not in out
    assert out["val_dino"] == pytest.approx(dino_score(validator.dino, images, photos))
    assert -1.0 <= out["val_dino"] <= 1.0
    with pytest.raises(ValueError, match="^eval.dino_model: DINO needs the instance images$"):
        Validator(cfg, comps, encoded, None, prompts, None)
