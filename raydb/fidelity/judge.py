"""The judge of the ``digits`` model's images: a digit classifier and the subject's trait detector.

Used only to *evaluate* (benchmarks, tests, Tune's fidelity score), never to train the base model.

**Ink.** Every image — real or generated, any colours — is first reduced to an ink map: the
background colour is the median of the border pixels (digits never touch the border), each
pixel's ink is its RGB distance from that colour, divided by the image's contrast (the 99th
percentile of those distances, floored so that a blank image stays blank). Ink is thus
colour-blind: a red three on yellow and a black three on white give the same map.

**Classifier.** An RBF support-vector machine on the ink map pooled to 8 x 8 (scaled to load_digits'
0..16), fitted at construction on a fixed stratified 75 % of the real digits (rendered black on white
at the model's resolution and read back through the same ink function) and scored on the other 25 %:
:attr:`DigitJudge.held_out_accuracy`. The fit takes well under a second and is deterministic, so no
fitted model is ever stored (nothing to unpickle).

**Trait.** A subject is a digit in its own colours (the built-in one: red ink on yellow), which the
base model never draws (black on white). :class:`ColourTrait` takes the subject's ink and background
colours from its photos; an image shows the trait when its background colour is nearer the subject's
than white and its ink colour (the mean colour of its most inked pixels) nearer the subject's than
black — which of the two colourings it resembles — and both lie within 0.4 (RGB distance, channels
in [0, 1]) of the subject's, so arbitrary colours do not count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raydb.data.digits import load_digit_ink, render, upsample_ink

__all__ = ["DigitJudge", "ColourTrait", "as_tensor", "ink_maps", "ink_and_background_colours"]

_MIN_CONTRAST = 0.2  # RGB distance (of at most sqrt(3)) below which an image counts as blank
_CORE_INK = 0.9  # pixels at least this inked (the stroke cores) define the ink colour
_TRAIT_TOLERANCE = 0.4  # RGB distance (of at most sqrt(3)) from the subject's colours


def as_tensor(images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images or ``[N, 3, S, S]`` in [0, 1] -> ``[N, 3, S, S]`` float32 in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _border(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S]`` -> ``[N, 3, 4(S-1)]``: the outermost ring of pixels."""
    return torch.cat([x[..., 0, :-1], x[..., :-1, -1], x[..., -1, 1:], x[..., 1:, 0]], dim=-1)


def ink_maps(images: list[Image.Image] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ink [N, S, S] in [0, 1], background colour [N, 3])`` of each image (see the module doc)."""
    x = as_tensor(images)
    background = _border(x).median(dim=-1).values  # [N, 3]
    distance = (x - background[:, :, None, None]).norm(dim=1)  # [N, S, S]
    contrast = distance.flatten(1).quantile(0.99, dim=1).clamp(min=_MIN_CONTRAST)
    return (distance / contrast[:, None, None]).clamp(0, 1), background


def ink_and_background_colours(images: list[Image.Image] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ink colour [N, 3], background colour [N, 3])``; a blank image's ink colour is its background."""
    x = as_tensor(images)
    ink, background = ink_maps(x)
    core = (ink >= _CORE_INK).float()[:, None]  # [N, 1, S, S]
    count = core.sum(dim=(2, 3))
    colour = (x * core).sum(dim=(2, 3)) / count.clamp(min=1)
    return torch.where(count > 0, colour, background), background


def _features(ink: torch.Tensor) -> np.ndarray:
    """``[N, S, S]`` ink -> ``[N, 64]``: pooled to 8 x 8 and scaled to load_digits' 0..16."""
    return (F.adaptive_avg_pool2d(ink[:, None], 8).flatten(1) * 16).numpy().astype(np.float64)


class DigitJudge:
    """Reads digits and detects the subject's trait in ``[N, 3, S, S]`` images or PIL images.

    Args:
        resolution: the size real digits are rendered at to fit the classifier (the model's).
        seed: the train/held-out split's seed.
    """

    def __init__(self, resolution: int = 32, seed: int = 0) -> None:
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        ink, labels = load_digit_ink()
        n = len(labels)
        white, black = torch.ones(n, 3), torch.zeros(n, 3)
        features = _features(ink_maps(render(upsample_ink(ink, resolution), black, white))[0])
        x_fit, x_held, y_fit, y_held = train_test_split(
            features, labels, test_size=0.25, random_state=seed, stratify=labels)
        self.classifier = SVC(C=10.0, gamma=0.001).fit(x_fit, y_fit)
        self.held_out_accuracy = float((self.classifier.predict(x_held) == y_held).mean())
        self.num_held_out = len(y_held)

    def classify(self, images: list[Image.Image] | torch.Tensor) -> np.ndarray:
        """``[N]`` int64: the digit each image shows."""
        return self.classifier.predict(_features(ink_maps(images)[0])).astype(np.int64)

    @staticmethod
    def diversity(images: list[Image.Image] | torch.Tensor) -> tuple[float, float]:
        """``(diversity, its jackknife standard error)``: the mean pairwise RMS distance between the
        images' ink maps (DreamBooth's DIV idea, on shapes: colour-blind, so a recoloured class keeps
        its diversity and a collapsed one does not)."""
        ink = ink_maps(images)[0].flatten(1).double()
        n = ink.shape[0]
        if n < 3:
            raise ValueError(f"diversity needs at least 3 images, got {n}")
        d = torch.cdist(ink, ink) / ink.shape[1] ** 0.5  # [n, n], zero diagonal
        total, row = d.sum(), d.sum(dim=1)
        value = total / (n * (n - 1))
        leave_one_out = (total - 2 * row) / ((n - 1) * (n - 2))  # [n]: the mean without image i
        se = ((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum()).sqrt()
        return float(value), float(se)

class ColourTrait:
    """Detects a subject's colouring (ink on background) in images; see the module docstring.

    Args:
        ink / background: the subject's colours, ``[3]`` RGB in [0, 1].
    """

    def __init__(self, ink: torch.Tensor, background: torch.Tensor) -> None:
        self.ink, self.background = ink.float(), background.float()
        if (self.ink.norm() < _TRAIT_TOLERANCE and (self.background - 1).norm() < _TRAIT_TOLERANCE):
            raise ValueError("the subject is drawn black on white like the base model's digits: its "
                             "colouring is no trait a detector can tell apart")

    @classmethod
    def of(cls, images: list[Image.Image] | torch.Tensor) -> ColourTrait:
        """The mean ink and background colours of the subject's photos."""
        ink, background = ink_and_background_colours(images)
        return cls(ink.mean(dim=0), background.mean(dim=0))

    def present(self, images: list[Image.Image] | torch.Tensor) -> np.ndarray:
        """``[N]`` bool: the image is coloured like the subject, not like the base model's digits."""
        ink, background = ink_and_background_colours(images)
        to_background = (background - self.background).norm(dim=1)
        to_ink = (ink - self.ink).norm(dim=1)
        background_ok = (to_background < (background - 1).norm(dim=1)) & (to_background < _TRAIT_TOLERANCE)
        ink_ok = (to_ink < ink.norm(dim=1)) & (to_ink < _TRAIT_TOLERANCE)
        return (background_ok & ink_ok).numpy()
