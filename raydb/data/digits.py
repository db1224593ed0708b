"""Real handwritten digits, shipped inside scikit-learn's wheel (no download), as RGB images.

``sklearn.datasets.load_digits`` holds 1,797 8x8 greyscale digits (ink 0..16, ten classes, about
180 each). raydb uses them three ways, all through this module:

- the ``digits`` base model (:mod:`raydb.models.digits_recipe`) learns to draw them, black ink on
  white, upsampled to 32 px, from prompts that name the digit (:func:`digit_prompt`);
- the judge (:mod:`raydb.fidelity.judge`) learns to read them;
- the built-in subject ``builtin:red-three`` (:func:`subject_images`) is five real threes drawn in
  red ink on yellow, a colouring the base model never saw (its UNet trained on black-on-white).

The five subject threes are left out of the base model's training data (:func:`base_training_indices`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["DIGIT_NAMES", "SUBJECT_URI", "SUBJECT_DIGIT", "SUBJECT_INK", "SUBJECT_BACKGROUND",
           "SUBJECT_INSTANCE_PROMPT", "SUBJECT_CLASS_PROMPT", "SUBJECT_INDICES", "load_digit_ink",
           "digits_sha256", "base_training_indices", "digit_prompt", "upsample_ink", "render",
           "to_pil", "subject_images"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SUBJECT_URI = "builtin:red-three"
SUBJECT_DIGIT = 3
SUBJECT_INK = (200, 25, 25)  # red
SUBJECT_BACKGROUND = (250, 215, 50)  # yellow
SUBJECT_INSTANCE_PROMPT = "a drawing of sks three"
SUBJECT_CLASS_PROMPT = "a drawing of a three"
# The last five threes of the dataset (by index): real handwriting, never shown to the base model.
SUBJECT_INDICES = (1750, 1756, 1758, 1765, 1770)


def load_digit_ink() -> tuple[np.ndarray, np.ndarray]:
    """``(ink [1797, 8, 8] float32 in [0, 1], labels [1797] int64)``: load_digits' pixels / 16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digits_sha256() -> str:
    """sha256 of the dataset as raydb reads it (ink bytes, then label bytes): the data's identity
    in the base model's provenance."""
    ink, labels = load_digit_ink()
    return hashlib.sha256(ink.tobytes() + labels.tobytes()).hexdigest()


def base_training_indices(labels: np.ndarray) -> np.ndarray:
    """Indices of the digits the base model trains on: all but the subject's five threes."""
    keep = np.ones(len(labels), dtype=bool)
    keep[list(SUBJECT_INDICES)] = False
    return np.flatnonzero(keep)


def digit_prompt(digit: int) -> str:
    """The prompt that names a digit, e.g. ``"a drawing of a three"`` (DreamBooth's class form)."""
    return f"a drawing of a {DIGIT_NAMES[digit]}"


def upsample_ink(ink: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """``[N, 8, 8]`` ink in [0, 1] -> ``[N, size, size]`` (bilinear; smooth strokes, not 4x4 blocks)."""
    x = torch.as_tensor(np.asarray(ink, dtype=np.float32))[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def render(ink: torch.Tensor, ink_rgb: torch.Tensor, background_rgb: torch.Tensor) -> torch.Tensor:
    """Colour ink maps: ``[N, S, S]`` ink in [0, 1], ``[N, 3]`` colours in [0, 1] -> ``[N, 3, S, S]``
    in [0, 1], each pixel ``background * (1 - ink) + ink_colour * ink``."""
    a = ink[:, None]
    return background_rgb[:, :, None, None] * (1 - a) + ink_rgb[:, :, None, None] * a


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, S, S]`` in [0, 1] -> RGB PIL images."""
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def subject_images(size: int = 32) -> list[Image.Image]:
    """The built-in subject: five real threes, red ink on yellow, ``size`` px (deterministic)."""
    ink, labels = load_digit_ink()
    idx = list(SUBJECT_INDICES)
    if not (labels[idx] == SUBJECT_DIGIT).all():  # the dataset changed under us
        raise RuntimeError(f"{SUBJECT_URI}: load_digits' images {idx} are not all {SUBJECT_DIGIT}s")
    n = len(idx)
    colour = torch.tensor(SUBJECT_INK, dtype=torch.float32).expand(n, 3) / 255
    background = torch.tensor(SUBJECT_BACKGROUND, dtype=torch.float32).expand(n, 3) / 255
    return to_pil(render(upsample_ink(ink[idx], size), colour, background))
