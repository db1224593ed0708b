"""DreamBooth with and without prior preservation on one subject, judged from sampled images.

The comparison behind ``bench/fidelity.py`` and the README's finding. Every *arm* trains the same
subject with the same seeds, steps, batches and learning rate through raydb's own trainer
(:func:`raydb.train.local.train_subject`, the engine ``raydb train --local`` runs); an arm differs
from the base config only by its overrides (by default ``λ = 0``, ``λ = 1`` with class images, and
``λ = 1`` with ``prior.mode: model`` — the base model's own prediction as the prior target, no class
images; add an :class:`Arm` to compare anything else). Each adapter is then loaded the way a diffusers
user loads it (``load_lora_weights``) and scored two ways:

- held-out denoising losses on fixed noise (``val_instance``, ``val_prior``, ``val_score`` — what
  Tune ranks by default, :class:`raydb.train.evaluate.Validator`);
- the fidelity figures of :mod:`raydb.fidelity.metrics`, on ``samples`` images per prompt sampled
  from seeds ``0..samples-1`` (the same seeds for the base model and every arm), without guidance.

The base model is scored the same way, so each arm's class accuracy and diversity read against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from raydb.config import RaydbConfig, apply_overrides
from raydb.data.digits import digit_prompt
from raydb.fidelity.metrics import fidelity_figures, fidelity_score, sample_images, subject_digit
from raydb.storage import Storage

__all__ = ["Arm", "ARMS", "DEFAULT_ARMS", "run_fidelity"]


@dataclass(frozen=True)
class Arm:
    """One training of the comparison.

    Args:
        name: suffix of the arm's keys in the bench's JSON line (``subject_fidelity_<name>``).
        overrides: dotted ``key=value`` config overrides that make this arm (``raydb`` syntax).
        label: how tables and pictures name the arm.
    """

    name: str
    overrides: tuple[str, ...]
    label: str = ""


# Every arm the bench knows, by name (``bench/fidelity.py --arms l0,l1``); add one to compare more.
ARMS = {arm.name: arm for arm in (
    Arm("l0", ("train.prior_loss_weight=0.0",), "λ = 0 (no prior preservation)"),
    Arm("l1", ("train.prior_loss_weight=1.0",), "λ = 1 (prior preservation)"),
    # attempts to keep the class (and the other classes) better; see the README's finding
    Arm("l2_c300", ("train.prior_loss_weight=2.0", "prior.num_class_images=300"), "λ = 2, 300 class images"),
    Arm("l1_te", ("train.prior_loss_weight=1.0", "lora.train_text_encoder=true"), "λ = 1, text-encoder LoRA"),
    # prior preservation without class images: l1 with the frozen base's prediction as the target
    Arm("model", ("train.prior_loss_weight=1.0", "prior.mode=model"), "λ = 1, prior.mode: model"),
)}
DEFAULT_ARMS = (ARMS["l0"], ARMS["l1"], ARMS["model"])


@dataclass
class _Sampler:
    """Samples the current UNet of ``pipe`` for every prompt the figures need."""

    pipe: Any
    instance_prompt: str
    class_prompt: str
    digit: int
    seeds: list[int]
    other_seeds: list[int]
    steps: int
    keep: int  # images kept per prompt for the picture grid
    pictures: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, *, others: bool = True) -> dict[str, Any]:
        sample = lambda prompt, seeds: sample_images(self.pipe, prompt, seeds, steps=self.steps)  # noqa: E731
        instance, cls = sample(self.instance_prompt, self.seeds), sample(self.class_prompt, self.seeds)
        other = {d: sample(digit_prompt(d), self.other_seeds) for d in range(10) if d != self.digit} \
            if others else None
        return {"instance": instance, "class": cls, "others": other}


def run_fidelity(
    cfg: RaydbConfig,
    arms: tuple[Arm, ...] = DEFAULT_ARMS,
    *,
    samples: int = 50,
    other_samples: int = 20,
    sample_steps: int = 25,
    keep_pictures: int = 8,
    storage: Storage | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train every arm, score the base model and each adapter; see the module docstring.

    Returns ``{"base": figures, "<arm name>": figures | validation, "settings": ..., "pictures":
    {"base"|arm: {"class"|"instance": [keep, 3, S, S], "others": [9, 3, S, S] (seed 0 of each other
    digit's prompt)}}, "tune_pick": arm name, "fidelity_pick": arm name}``. ``tune_pick`` is the
    arm with the lowest ``val_score``, ``fidelity_pick`` the one
    with the highest :func:`~raydb.fidelity.metrics.fidelity_score`.
    """
    from raydb.data.ingest import load_images
    from raydb.encode.encoders import encode_images, encode_prompt_set, images_to_tensor
    from raydb.fidelity.judge import ColourTrait, DigitJudge
    from raydb.models.components import load_components, load_pipeline
    from raydb.prior.stage import class_images
    from raydb.train.evaluate import Validator
    from raydb.train.local import train_subject

    storage = storage or Storage(cfg.s3_endpoint_url)
    res = cfg.train.resolution
    judge = DigitJudge(resolution=res)
    instance = load_images(cfg.subject.instance_data, res, storage=storage, center_crop=cfg.train.center_crop)
    trait = ColourTrait.of(instance)
    digit = subject_digit(judge, instance)
    holdout = class_images(cfg, storage, holdout=True)  # generates the prior cache if missing
    if not holdout:
        raise ValueError("prior.num_holdout must be > 0: val_prior needs held-out class images")
    comps = load_components(cfg.model, storage, cfg.workspace, with_unet=False)
    pipe = load_pipeline(cfg.model, storage, cfg.workspace)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)  # frozen, as the Validator expects (only LoRA layers train)
    encoded = [encode_images(comps.vae, images_to_tensor(images)) for images in (instance, holdout)]
    prompts = encode_prompt_set(comps, [cfg.subject.instance_prompt, cfg.subject.class_prompt])
    validator = Validator(cfg, comps, *encoded, prompts)
    sampler = _Sampler(pipe, cfg.subject.instance_prompt, cfg.subject.class_prompt, digit,
                       list(range(samples)), list(range(other_samples)), sample_steps, keep_pictures)

    def score(name: str, text_encoder: torch.nn.Module | None = None) -> dict[str, Any]:
        t = time.perf_counter()
        images = sampler()
        figures = fidelity_figures(judge, trait, digit, instance=images["instance"],
                                   class_samples=images["class"], others=images["others"])
        figures["fidelity_score"] = fidelity_score(figures)
        figures |= validator(pipe.unet, text_encoder)  # with its text-encoder LoRA, if it trains one
        out["pictures"][name] = {k: images[k][:keep_pictures] for k in ("class", "instance")}
        out["pictures"][name]["others"] = torch.stack([x[0] for _, x in sorted(images["others"].items())])
        log(f"{name}: scored in {time.perf_counter() - t:.0f}s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if not k.endswith("_se")))
        return figures

    out: dict[str, Any] = {"pictures": {}}
    out["base"] = score("base")
    for arm in arms:
        arm_cfg = RaydbConfig.model_validate(apply_overrides(cfg.to_dict(), list(arm.overrides)))
        t = time.perf_counter()
        result = train_subject(arm_cfg, storage, samples=False, quiet=True)
        trained_s = round(time.perf_counter() - t, 1)  # ~0 when the workspace held the finished run
        log(f"{arm.name}: trained {result['steps']} steps in {trained_s:.0f}s ({result['adapter_uri']})")
        pipe.load_lora_weights(result["adapter_uri"])
        try:
            encoder = pipe.text_encoder if arm_cfg.lora.train_text_encoder else None
            out[arm.name] = score(arm.name, encoder) | {"train_seconds": trained_s}
        finally:
            pipe.unload_lora_weights()
    base = out["base"]
    for arm in arms:
        fig = out[arm.name]
        fig["diversity_ratio"] = fig["diversity"] / base["diversity"]
        relative = ((fig["diversity_se"] / fig["diversity"]) ** 2
                    + (base["diversity_se"] / base["diversity"]) ** 2) ** 0.5
        fig["diversity_ratio_se"] = fig["diversity_ratio"] * relative  # delta method
    out["tune_pick"] = min(arms, key=lambda a: out[a.name]["val_score"]).name
    out["fidelity_pick"] = max(arms, key=lambda a: out[a.name]["fidelity_score"]).name
    out["settings"] = {
        "subject": cfg.subject.instance_data, "digit": digit, "instance_prompt": cfg.subject.instance_prompt,
        "class_prompt": cfg.subject.class_prompt, "samples_per_prompt": samples,
        "other_samples_per_prompt": other_samples, "sample_steps": sample_steps, "guidance_scale": 1.0,
        "steps": cfg.train.max_steps, "learning_rate": cfg.train.learning_rate,
        "batch_size": cfg.train.batch_size, "lora_rank": cfg.lora.rank, "seed": cfg.train.seed,
        "num_class_images": cfg.prior.num_class_images, "judge_held_out_accuracy": judge.held_out_accuracy,
        "arms": {a.name: {"overrides": list(a.overrides), "label": a.label} for a in arms},
    }
    return out
