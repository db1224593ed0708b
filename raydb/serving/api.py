"""The HTTP API's request and response shapes, and the limits a request is checked against.

``POST /v1/generate`` takes a :class:`GenerateRequest`; without a ``subject_id`` the base model
samples alone (the other side of a comparison, under the same limits). Types are checked by
pydantic; the limits come from ``serve`` in the config (steps, size, images, prompt length) and are
checked by :func:`validate_generate`, which raises :class:`RequestError` naming the field — the
server turns it into a 422 shaped like FastAPI's own validation errors (``detail[i].loc == ["body",
field]``).

The instance-token rule: a subject's adapter answers to its instance token (``sks`` in "a photo of
sks dog"). If the prompt does not contain the token, :func:`final_prompt` inserts it before the
subject's class noun (the last word of its class prompt) when that noun is in the prompt, else puts it
first; the response reports the prompt actually used.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raydb.config import ServeConfig
from raydb.errors import RequestError
from raydb.prompts import ensure_token

__all__ = [
    "MAX_TEXT_CHARS",
    "GenerateRequest",
    "GenerateParams",
    "validate_generate",
    "validation_detail",
    "final_prompt",
    "class_noun",
]


MAX_TEXT_CHARS = 4096  # hard ceiling on any text field, whatever serve.max_prompt_chars says
# guidance_scale when a request names none: SD/SDXL's classifier-free guidance as diffusers'
# pipelines default it; FLUX.1-dev's distilled guidance input as FluxPipeline defaults it (7.5 there
# would be far outside what the model was distilled at)
GUIDANCE_SCALE, FLUX_GUIDANCE_SCALE = 7.5, 3.5


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``; unknown keys are rejected.

    Every string has a ``max_length``, so pydantic stops at the ceiling; the configured (smaller)
    ``serve.max_prompt_chars`` is checked by :func:`validate_generate` with a friendlier message.
    """

    model_config = ConfigDict(extra="forbid")

    subject_id: str | None = Field(None, min_length=1, max_length=64)  # None: the base model alone
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)  # None: the family's default
    seed: int | None = Field(None, ge=0, lt=2**63)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    num_images: int = Field(1, ge=1)


class GenerateParams(BaseModel):
    """What a diffusion replica runs: a validated request with defaults filled in and the final prompt."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    seed: int
    width: int | None
    height: int | None
    num_images: int


def validation_detail(err: ValidationError) -> list[dict[str, Any]]:
    """A pydantic error as FastAPI's 422 ``detail`` list (input values left out: they may be long)."""
    return [{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]} for e in err.errors()]


def class_noun(class_prompt: str) -> str | None:
    """The class noun of a class prompt: its last word ("a photo of a dog" -> "dog")."""
    words = class_prompt.split()
    return words[-1].strip(".,!?") if words else None


def final_prompt(prompt: str, subject_meta: dict[str, Any]) -> str:
    """The prompt with the subject's instance token guaranteed (see the module docstring)."""
    subject = subject_meta.get("subject", {})
    token = subject.get("instance_token")
    if not token:
        return prompt
    return ensure_token(prompt, token, class_noun(subject.get("class_prompt", "")))


def validate_generate(req: GenerateRequest, cfg: ServeConfig, subject_meta: dict[str, Any], *,
                      base_family: str | None = None) -> GenerateParams:
    """Check ``req`` against the configured limits; fill defaults; apply the instance-token rule.

    The family's rules (FLUX.1: sizes in multiples of 16, guidance 3.5 by default) follow the
    subject's base model, or ``base_family`` (the served base model's) for a request without a
    subject."""
    if len(req.prompt) > cfg.max_prompt_chars:
        raise RequestError("prompt", f"at most {cfg.max_prompt_chars} characters, got {len(req.prompt)}")
    if req.negative_prompt is not None and len(req.negative_prompt) > cfg.max_prompt_chars:
        raise RequestError("negative_prompt", f"at most {cfg.max_prompt_chars} characters")
    steps = req.num_inference_steps or min(cfg.default_inference_steps, cfg.max_inference_steps)
    if steps > cfg.max_inference_steps:
        raise RequestError("num_inference_steps", f"at most {cfg.max_inference_steps}, got {steps}")
    # FLUX.1 packs its 8x-downsampled latents in 2x2 patches, so its sizes are multiples of 16
    flux = ((subject_meta.get("base_model") or {}).get("family") or base_family) == "flux"
    for name in ("width", "height"):
        value = getattr(req, name)
        if value is None:
            continue
        if flux and value % 16:
            raise RequestError(name, f"must be a multiple of 16 for a FLUX.1 model (8x VAE, 2x2 "
                                     f"latent packing), got {value}")
        if value % 8:
            raise RequestError(name, f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        if value > cfg.max_size:
            raise RequestError(name, f"at most {cfg.max_size}, got {value}")
    if req.num_images > cfg.max_images:
        raise RequestError("num_images", f"at most {cfg.max_images}, got {req.num_images}")
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    guidance = req.guidance_scale if req.guidance_scale is not None else \
        FLUX_GUIDANCE_SCALE if flux else GUIDANCE_SCALE
    return GenerateParams(
        prompt=final_prompt(req.prompt, subject_meta), negative_prompt=req.negative_prompt,
        num_inference_steps=steps, guidance_scale=guidance, seed=seed,
        width=req.width, height=req.height, num_images=req.num_images,
    )
