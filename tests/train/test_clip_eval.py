"""CLIP-I / CLIP-T with a tiny random CLIP built in code (the path Tune's validator takes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raydb.data.demo_subject import demo_images
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


def _by_hand(clip, tok, generated, references, prompt) -> dict[str, float]:
    """CLIP-I and CLIP-T computed here, in float64, from CLIP's published preprocessing: pixels/255
    normalised per channel (the images are already at CLIP's input size), projected features, cosines
    averaged over all (generated, reference) pairs and over the generated images against the prompt."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])

    def unit(feats) -> np.ndarray:
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        f = feats.detach().double().numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def embed(images) -> np.ndarray:
        x = np.stack([(np.asarray(im, dtype=np.float64) / 255.0 - mean) / std for im in images])
        with torch.no_grad():
            return unit(clip.get_image_features(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2).float()))

    ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = unit(clip.get_text_features(input_ids=ids))
    gen, ref = embed(generated), embed(references)
    return {"clip_i": float((gen @ ref.T).mean()), "clip_t": float((gen @ text.T).mean())}


def test_clip_scores_equal_values_computed_independently():
    """CLIP-I is generated-vs-reference images, CLIP-T generated-images-vs-prompt, each matching the
    float64 computation above (the model runs in float32: 1e-5 covers its rounding, while the wrong
    pairings below differ by far more).

    Deliberate breaks caught: CLIP-T computed image-vs-image (``gen @ ref.T``), and CLIP-I computed
    reference-vs-reference.
    """
    clip, tok = load_clip("tiny")
    size = clip.config.vision_config.image_size
    pictures = [im.resize((size, size)) for im in demo_images(5)]
    generated, references, prompt = pictures[:2], pictures[2:], "a photo of sks toy"
    got = clip_scores(clip, tok, generated, references, prompt)
    expected = _by_hand(clip, tok, generated, references, prompt)
    assert got == pytest.approx(expected, abs=1e-5)
    wrong_t = _by_hand(clip, tok, generated, references, prompt)["clip_i"]  # image-vs-image
    wrong_i = _by_hand(clip, tok, references, references, prompt)["clip_i"]
    assert abs(expected["clip_t"] - wrong_t) > 1e-3 and abs(expected["clip_i"] - wrong_i) > 1e-3


def test_sampled_metrics_score_generated_images_against_the_instance_images(make_cfg, monkeypatch):
    """``sample_clip_metrics`` scores ``eval.num_images`` freshly sampled images (one seed each)
    against the instance images and the instance prompt.

    Deliberate break caught: CLIP-I of the instance images against themselves
    (``clip_scores(clip, tok, instance_images, instance_images, ...)``), which scores 1.0 forever.
    """
    import raydb.train.clip_eval as clip_eval

    calls = []
    real = clip_eval.clip_scores

    def spy(clip, tok, generated, references, prompt):
        calls.append((generated, references, prompt))
        return real(clip, tok, generated, references, prompt)

    monkeypatch.setattr(clip_eval, "clip_scores", spy)
    cfg = make_cfg(eval={"clip_model": "tiny", "num_images": 2, "num_inference_steps": 2})
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    clip, tok = load_clip("tiny")
    instance = demo_images(3, size=64)
    scores = sample_clip_metrics(cfg, comps, comps.unet, instance, clip, tok)
    [(generated, references, prompt)] = calls
    assert references is instance and prompt == cfg.subject.instance_prompt
    assert len(generated) == 2 and all(im.size == (64, 64) for im in generated)
    arrays = [np.asarray(im) for im in generated]
    assert not np.array_equal(arrays[0], arrays[1])  # one seed per image
    assert not any(np.array_equal(a, np.asarray(im)) for a in arrays for im in instance)

    def small(images):  # CLIP's input size; 64 -> 32 needs no crop
        return [im.resize((32, 32), Image.Resampling.BICUBIC) for im in images]

    assert scores == pytest.approx(_by_hand(clip, tok, small(generated), small(instance), prompt), abs=1e-5)
