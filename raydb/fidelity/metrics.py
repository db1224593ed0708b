"""DreamBooth's fidelity figures for the ``digits`` model, from sampled images.

Given images sampled from the instance prompt, the class prompt and (optionally) the other digits'
prompts, :func:`fidelity_figures` reads them with the judge (:mod:`raydb.fidelity.judge`):

- ``subject_fidelity``: fraction of instance-prompt samples that show the subject's trait *and*
  the subject's digit — the subject was learned;
- ``drift``: fraction of class-prompt samples that show the subject's trait — the class prompt now
  draws the subject (the DreamBooth paper's PRES idea: language drift);
- ``class_accuracy``: fraction of class-prompt samples read as the class's digit;
- ``diversity``: mean pairwise distance of the class-prompt samples' shapes (the paper's DIV
  idea; reported as a ratio to the base model's by the bench);
- ``other_class_accuracy``: the classifier's accuracy on the *other* digits' prompts — collateral
  drift the paper does not measure.

Each fraction comes with its binomial standard error (``*_se``), the spread a reader needs to
judge a difference between runs. :func:`fidelity_score` folds the first three into the one number
Tune can rank trials by (``tune.metric: val_fidelity``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from raydb.fidelity.judge import ColourTrait, DigitJudge

__all__ = ["sample_images", "fidelity_figures", "fidelity_score", "standard_error", "subject_digit"]


@torch.no_grad()
def sample_images(pipe: Any, prompt: str, seeds: list[int], *, steps: int = 25,
                  guidance_scale: float = 1.0, batch: int = 50) -> torch.Tensor:
    """Images ``[N, 3, S, S]`` in [0, 1] for ``prompt``; image i starts from
    ``torch.Generator().manual_seed(seeds[i])``, so a sample does not depend on its batch-mates.

    ``guidance_scale`` 1.0 samples without classifier-free guidance — what the fidelity figures use:
    guidance pushes the prompt's *difference* from the empty prompt, and with prior preservation
    training only the class prompt (never the empty one) that difference re-imports the subject.
    """
    out = []
    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        for start in range(0, len(seeds), batch):
            chunk = seeds[start:start + batch]
            gens = [torch.Generator().manual_seed(seed) for seed in chunk]
            images = pipe([prompt] * len(chunk), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=gens, output_type="pt").images
            out.append(images.float().cpu())
    finally:
        pipe.unet.train(was_training)
    return torch.cat(out)


def standard_error(fraction: float, n: int) -> float:
    """Binomial standard error of a fraction measured on ``n`` samples."""
    return math.sqrt(max(fraction * (1 - fraction), 0.0) / n) if n else float("nan")


def subject_digit(judge: DigitJudge, instance_images: list[Image.Image] | torch.Tensor) -> int:
    """The digit the subject's photos show (the judge's majority vote)."""
    return int(np.bincount(judge.classify(instance_images), minlength=10).argmax())


def fidelity_figures(
    judge: DigitJudge,
    trait: ColourTrait,
    digit: int,
    *,
    instance: torch.Tensor | None = None,
    class_samples: torch.Tensor | None = None,
    others: dict[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """The figures (module docstring) of whichever sample sets are given; each fraction also as
    ``<name>_se``. ``others`` maps each other digit to its prompt's samples."""
    out: dict[str, float] = {}

    def fraction(name: str, hits: np.ndarray) -> None:
        out[name] = float(hits.mean())
        out[f"{name}_se"] = standard_error(out[name], len(hits))

    if instance is not None:
        fraction("subject_fidelity", trait.present(instance) & (judge.classify(instance) == digit))
    if class_samples is not None:
        fraction("drift", trait.present(class_samples))
        fraction("class_accuracy", judge.classify(class_samples) == digit)
        out["diversity"], out["diversity_se"] = judge.diversity(class_samples)
    if others:
        fraction("other_class_accuracy", np.concatenate(
            [judge.classify(images) == d for d, images in sorted(others.items())]))
        out["other_class_trait"] = float(np.concatenate(
            [trait.present(images) for _, images in sorted(others.items())]).mean())
    return out


def fidelity_score(figures: dict[str, float]) -> float:
    """One number to rank adapters by, higher is better, in [0, 1]: the mean of subject fidelity,
    1 - drift and class accuracy (the subject learned, the class prompt neither drawing the
    subject nor forgetting its digit)."""
    return (figures["subject_fidelity"] + 1 - figures["drift"] + figures["class_accuracy"]) / 3
