"""``eval.fidelity: digits``: the fidelity figures as validation metrics, so Tune can rank by them.

:class:`raydb.train.evaluate.Validator` calls :class:`DigitsFidelity` at every evaluation: it samples
``eval.num_images`` images for the instance prompt and as many for the class prompt with the
current (LoRA) UNet — seeds ``0..n-1``, ``eval.num_inference_steps`` DDIM steps, no guidance —
and reports, beside ``val_score``:

- ``val_fidelity``: :func:`raydb.fidelity.metrics.fidelity_score` (higher is better), what
  ``tune.metric: val_fidelity`` ranks trials by;
- ``val_subject_fidelity``, ``val_drift``, ``val_class_accuracy``: its parts.

The subject's digit and colours come from its own photos (the judge's reading of them), so any
coloured-digit subject works, not only the built-in one.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from raydb.config import RaydbConfig

__all__ = ["DigitsFidelity"]


class DigitsFidelity:
    """Scores a UNet by sampling; see the module docstring.

    Args:
        cfg: supplies the prompts, ``train.resolution`` and ``eval.num_images`` /
            ``eval.num_inference_steps``.
        instance_images: the subject's prepared photos (its digit and colouring).
    """

    def __init__(self, cfg: RaydbConfig, instance_images: list[Image.Image]) -> None:
        from raydb.fidelity.judge import ColourTrait, DigitJudge
        from raydb.fidelity.metrics import subject_digit

        self.cfg = cfg
        self.judge = DigitJudge(resolution=cfg.train.resolution)
        self.trait = ColourTrait.of(instance_images)
        self.digit = subject_digit(self.judge, instance_images)

    @torch.no_grad()
    def __call__(self, comps: Any, unet: torch.nn.Module) -> dict[str, float]:
        from raydb.fidelity.metrics import fidelity_figures, fidelity_score, sample_images
        from raydb.train.clip_eval import sampling_pipeline

        pipe = sampling_pipeline(comps, unet)
        seeds = list(range(self.cfg.eval.num_images))
        steps = self.cfg.eval.num_inference_steps
        instance = sample_images(pipe, self.cfg.subject.instance_prompt, seeds, steps=steps)
        class_samples = sample_images(pipe, self.cfg.subject.class_prompt, seeds, steps=steps)
        figures = fidelity_figures(self.judge, self.trait, self.digit, instance=instance,
                                   class_samples=class_samples)
        return {"val_fidelity": fidelity_score(figures), "val_subject_fidelity": figures["subject_fidelity"],
                "val_drift": figures["drift"], "val_class_accuracy": figures["class_accuracy"]}
