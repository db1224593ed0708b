"""CLIP-I / CLIP-T with a tiny random CLIP built in code (the path Tune's validator takes)."""

from __future__ import annotations

import pytest
import torch

from raydb.data.demo import demo_images
from raydb.models.components import load_components
from raydb.storage import Storage
from raydb.train.clip_eval import clip_scores, load_clip, sample_clip_metrics


def test_clip_scores_are_cosines_and_identity_scores_one():
    clip, tok = load_clip("tiny")
    images = demo_images(3)
    same = clip_scores(clip, tok, images[:1], images[:1], "a photo of sks toy")
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5)  # an image against itself
    other = clip_scores(clip, tok, images[:2], images[2:], "a photo of sks toy")
    assert -1.0 <= other["clip_i"] <= 1.0 and -1.0 <= other["clip_t"] <= 1.0
    assert other["clip_i"] != pytest.approx(1.0)


def test_sampled_clip_metrics_from_the_training_components(make_cfg):
    cfg = make_cfg(eval={"clip_model": "tiny", "num_images": 2, "num_inference_steps": 2})
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    clip, tok = load_clip(cfg.eval.clip_model)
    first = sample_clip_metrics(cfg, comps, comps.unet, demo_images(2), clip, tok)
    again = sample_clip_metrics(cfg, comps, comps.unet, demo_images(2), clip, tok)
    assert set(first) == {"clip_i", "clip_t"}
    assert first == again  # fixed seeds: the same numbers every evaluation
    assert all(torch.isfinite(torch.tensor(v)) for v in first.values())
