"""raydb.data.digits: the real digits as raydb reads them, and the built-in subject builtin:red-three."""

from __future__ import annotations

import numpy as np
import torch

from raydb.data.digits import (
    DIGIT_NAMES,
    SUBJECT_BACKGROUND,
    SUBJECT_DIGIT,
    SUBJECT_INDICES,
    SUBJECT_URI,
    base_training_indices,
    digit_prompt,
    digits_sha256,
    load_digit_ink,
    render,
    subject_images,
    upsample_ink,
)
from raydb.data.ingest import load_images


def test_digits_are_sklearns_1797_in_unit_ink():
    ink, labels = load_digit_ink()
    assert ink.shape == (1797, 8, 8) and ink.dtype == np.float32
    assert ink.min() == 0.0 and ink.max() == 1.0
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert len(digits_sha256()) == 64 and digits_sha256() == digits_sha256()


def test_subject_threes_are_left_out_of_the_base_models_data():
    _, labels = load_digit_ink()
    keep = base_training_indices(labels)
    assert len(keep) == 1797 - 5
    assert not set(SUBJECT_INDICES) & set(keep.tolist())
    assert (labels[list(SUBJECT_INDICES)] == SUBJECT_DIGIT).all()


def test_render_puts_ink_colour_on_background():
    ink = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])
    out = render(ink, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]]))
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # full ink
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))  # background
    assert torch.allclose(out[0, :, 1, 0], torch.tensor([0.5, 0.0, 0.5]))  # half way


def test_upsample_keeps_ink_in_range_and_shape():
    ink, _ = load_digit_ink()
    up = upsample_ink(ink[:3], 32)
    assert up.shape == (3, 32, 32) and up.min() >= 0 and up.max() <= 1
    # pooling the upsampled ink back to 8x8 stays close to the original
    back = torch.nn.functional.avg_pool2d(up[:, None], 4)[:, 0]
    assert (back - torch.from_numpy(ink[:3])).abs().mean() < 0.1


def test_subject_is_five_red_threes_on_yellow_and_deterministic():
    images = subject_images(32)
    assert len(images) == 5 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    corner = images[0].getpixel((0, 0))
    assert corner == SUBJECT_BACKGROUND
    assert [np.asarray(a).tobytes() for a in images] == [np.asarray(b).tobytes() for b in subject_images(32)]


def test_builtin_subject_ingests_at_the_training_resolution():
    for resolution in (32, 64):
        images = load_images(SUBJECT_URI, resolution)
        assert len(images) == 5 and images[0].size == (resolution, resolution)


def test_prompts_name_the_digit():
    assert digit_prompt(3) == "a drawing of a three"
    assert [digit_prompt(d).split()[-1] for d in range(10)] == list(DIGIT_NAMES)
