"""The pipeline's settings, one section per concern: the base model, the subject, prior images,
the LoRA adapter, the training loop, the Ray Train workers, the search and validation metrics."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raydb.config.base import Section
from raydb.ids import check_safe_id

__all__ = ["ModelConfig", "SubjectConfig", "PriorConfig", "PriorMode", "LoraConfig", "FlowConfig",
           "TrainConfig", "ClusterConfig", "SearchSpace", "TuneConfig", "EvalConfig"]


class ModelConfig(Section):
    pretrained: str = Field(
        "tiny",
        description="Base model: 'digits' (built in: SD's architecture, small, trained on real "
        "handwritten digits, 32 px), 'tiny' / 'tiny-sdxl' / 'tiny-flux' (built in: SD / SDXL / FLUX.1 "
        "at toy widths, random weights, for tests), a local diffusers directory, an s3:// prefix, or a "
        "Hugging Face hub id (needs network). SD 1.x/2.x, SDXL and FLUX.1 are told apart from the "
        "folder itself.",
    )
    revision: str | None = Field(None, description="Hub revision, for hub ids only.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type (default: from the scheduler)."
    )
    cache_dir: str | None = Field(
        None, description="Local cache for s3:// models (default: ~/.cache/raydb/models)."
    )


class SubjectConfig(Section):
    id: str = Field("demo", description="Registry id of the subject: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}.")
    tenant: str = Field("default", description="Tenant that owns the subject (used by serving).")
    instance_data: str = Field(
        "builtin:demo", description="Folder or s3:// prefix of the subject's photos, or a built-in "
        "subject: builtin:demo (a drawn toy) or builtin:red-three (five real threes in red ink on "
        "yellow, for the digits model)."
    )
    instance_prompt: str = Field("a photo of sks toy", description="Prompt with the subject token.")
    class_prompt: str = Field("a photo of a toy", description="Prompt of the subject's class.")
    instance_token: str | None = Field(
        None, description="Rare token naming the subject (default: the word of instance_prompt "
        "that is not in class_prompt)."
    )

    @field_validator("id", "tenant")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return check_safe_id(value)

    @field_validator("instance_prompt", "class_prompt")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


PriorMode = Literal["images", "model"]


class PriorConfig(Section):
    enabled: bool = Field(True, description="Train with prior preservation ([instance | class] batches).")
    mode: PriorMode = Field(
        "images", description="Target of the prior half. images: generated (or given) class images, "
        "whose noise is the target (DreamBooth). model: no class images; the instance latents (or "
        "class_data's, if given) under the class prompt, with the frozen base model's own prediction "
        "(every LoRA layer off, no gradient) as the target.")
    class_data: str | None = Field(None, description="Existing class images (folder or s3://); "
                                   "when unset they are generated into the shared prior cache. With "
                                   "mode model: an optional pool of images the prior half is drawn from.")
    num_class_images: int = Field(100, ge=1, description="Class images used for prior preservation.")
    sample_batch_size: int = Field(4, ge=1, description="Images generated per pipeline call.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps per class image.")
    guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance scale (FLUX.1-dev: "
                                  "its distilled guidance input; 3.5 as jobs/configs/flux-*.yaml set it).")
    negative_prompt: str = Field("", description="Negative prompt for class images.")
    seed: int = Field(0, ge=0, description="Base seed; image i uses a seed derived from (seed, i).")
    concurrency: int | None = Field(None, ge=1, description="Generator actors (default: GPUs, or 1 on CPU).")
    num_holdout: int = Field(4, ge=0, description="Extra class images generated but never trained on "
                             "(used by validation metrics; with mode model generated only for a search).")

    @property
    def uses_class_images(self) -> bool:
        """The prior half is drawn from class images: image mode, or model mode with a pool."""
        return self.enabled and (self.mode == "images" or self.class_data is not None)

    @property
    def from_instance(self) -> bool:
        """Model mode without a pool: the prior half repeats the instance half's draws."""
        return self.enabled and self.mode == "model" and self.class_data is None


class LoraConfig(Section):
    rank: int = Field(4, gt=0, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: equal to rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        None, description="Denoiser modules that receive LoRA layers (a module matches when its path "
        "is a target or ends with '.' + target). Default: the family's — SD/SDXL: the UNet's "
        "attention projections [to_q, to_k, to_v, to_out.0]; FLUX.1: the attention and MLP "
        "projections of both block kinds, without single blocks' proj_out "
        "(raydb.models.family.DEFAULT_TARGETS).",
    )
    train_text_encoder: bool = Field(False, description="Also train LoRA layers in the text encoder.")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="Text-encoder modules that receive LoRA layers when train_text_encoder is on.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must name at least one module")
        return value

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class FlowConfig(Section):
    """Flow-matching training (FLUX.1): how each sample's time sigma is drawn and its loss weighted.

    A sample is ``x_s = (1 - s) * latents + s * noise`` and the transformer learns the velocity
    ``noise - latents``. Defaults: sigmas drawn logit-normal(0, 1) — the density the SD3 paper
    found best among the rectified-flow samplings it compared, which puts most samples at
    mid-range sigmas where the velocity is hardest to predict — and no extra loss weighting,
    since that density already does the emphasising (weighting on top would count it twice).
    Ignored by SD/SDXL, which train on the DDPM schedule.
    """

    timestep_sampling: Literal["logit_normal", "uniform", "mode"] = Field(
        "logit_normal", description="Density of the per-sample sigma: logit_normal (sigmoid of a "
        "normal draw), uniform, or mode (SD3's mode sampling with heavy tails, see mode_scale).")
    logit_mean: float = Field(0.0, description="Mean of the normal draw under logit_normal.")
    logit_std: float = Field(1.0, gt=0.0, description="Std of the normal draw under logit_normal.")
    mode_scale: float = Field(1.29, ge=-1.0, le=1.75, description="Scale of mode sampling (SD3's s, "
                              "monotone for -1 <= s <= 2/(pi - 2); 0 is uniform).")
    shift: float = Field(1.0, gt=0.0, description="Shift of the drawn sigmas towards noise: s' = shift*s / "
                         "(1 + (shift - 1)*s); 1 is no shift (FLUX.1-dev samples at a resolution-"
                         "dependent shift of about 3 at 1024 px).")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Per-sample loss weight: none (1), sigma_sqrt (1/s^2) or cosmap "
        "(2 / (pi (1 - 2s + 2s^2))); each half of a prior batch is weighted by its own samples' sigmas.")
    guidance: float = Field(1.0, ge=0.0, description="Guidance input of a guidance-distilled model "
                            "(FLUX.1-dev) during training. The flow target (noise - latents) is the "
                            "plain conditional velocity, which is what a CFG-distilled model predicts "
                            "at guidance 1; training at 3.5 (diffusers' Flux DreamBooth script) teaches "
                            "it to give unguided velocities where it should guide.")


class TrainConfig(Section):
    resolution: int = Field(512, ge=8, description="Square training resolution in pixels (multiple of 8).")
    center_crop: bool = Field(True, description="Center-crop (else resize only) to the resolution.")
    random_flip: bool = Field(False, description="Add horizontally flipped copies (cached as their "
                              "own entries).")
    batch_size: int = Field(1, ge=1, description="Instance images per micro-batch per worker "
                            "(the same number of class images is appended).")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="lambda in loss = instance + lambda * prior.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm over LoRA parameters.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule (diffusers' get_scheduler)."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="Autocast dtype. auto: bf16 on CUDA GPUs that have it (compute "
        "capability 8.0+), fp16 on older GPUs, 'no' on CPU and with dtype float64.")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="Dtype of the frozen weights and the LoRA parameters when "
        "mixed_precision is 'no'. float64 is for exactness checks on CPU (e.g. DDP equivalence), "
        "where float32 kernels that differ only in reduction order would blur the comparison.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for UNet activation memory.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1 (first-moment decay).")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2 (second-moment decay).")
    adam_weight_decay: float = Field(1e-2, ge=0.0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon (denominator floor).")
    seed: int = Field(0, ge=0, description="Seed of noise, timesteps, LoRA init and data order.")
    checkpoint_every: int = Field(100, ge=1, description="Optimizer steps between checkpoints.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints kept per run.")
    cache_latents: bool = Field(True, description="Encode images and prompts once (frozen VAE/text "
                                "encoder) instead of every step.")
    num_sample_images: int = Field(4, ge=0, description="Images in the final sample grid.")
    sample_steps: int = Field(25, ge=1, description="Denoising steps for the sample grid.")
    sample_guidance_scale: float | None = Field(
        None, ge=0.0, le=50.0,
        description="Guidance scale of the sample grid (none: the pipeline's default, 7.5 for SD/SDXL, "
                    "3.5 for FLUX.1). The built-in digits model draws without guidance: its demo sets 1.")
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="Run the UNet's convolutions in NHWC memory format (auto: on CUDA, "
        "where it measured 1.24-1.36x on an H200; off on CPU).")
    fused_adam: Literal["auto"] | bool = Field(
        "auto", description="AdamW's fused kernel (auto: on CUDA; off on CPU).")
    compile: Literal["off", "blocks", "full"] = Field(
        "off", description="torch.compile the training UNet: 'full' compiles the whole forward and "
        "backward (fastest steps, minutes of compile), 'blocks' its repeated transformer and resnet "
        "blocks (shorter compile); validation and samples stay eager under 'full'.")
    compile_backend: str = Field("inductor", min_length=1,
                                 description="torch.compile backend (see torch._dynamo.list_backends()).")
    compile_cache: bool = Field(
        False, description="Keep torch.compile's artifacts in <workspace>/compile-cache so the next "
        "subject on the same base model, GPU and shapes starts warm. Off by default: torch "
        "deserializes these artifacts with pickle, so turn it on only for a workspace that only "
        "trusted jobs can write (raydb otherwise never unpickles anything from storage).")
    flow: FlowConfig = Field(default_factory=FlowConfig, description="Flow-matching sigma sampling, "
                             "loss weighting and guidance (FLUX.1 only).")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="Run each training step as captured CUDA graphs (forward, backward, "
        "clipping, fused AdamW) after a few eager warm-up steps, removing per-kernel host "
        "overhead. auto: on when training on CUDA, except with fp16 (GradScaler skips steps from "
        "the host); 'on' without a GPU or with fp16 is an error. Validation stays eager.")

    @model_validator(mode="after")
    def _dtype_without_autocast(self) -> TrainConfig:
        if self.dtype == "float64" and self.mixed_precision not in ("no", "auto"):
            raise ValueError(f"dtype: float64 needs mixed_precision 'no' (got {self.mixed_precision!r})")
        if self.cuda_graphs == "on" and self.mixed_precision == "fp16":
            raise ValueError("cuda_graphs: 'on' cannot be combined with mixed_precision 'fp16': fp16 "
                             "needs GradScaler, which reads its inf check on the host to skip a step, "
                             "and a CUDA graph cannot capture that; use bf16 or cuda_graphs 'off'")
        return self

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value


class ClusterConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved by each Train worker.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts before a run fails "
                              "(-1: unlimited).")
    address: str | None = Field(None, description="Ray address to join (default: auto-detect or "
                                "start local).")


class SearchSpace(Section):
    """A search dimension: an explicit list (grid) or ``{low, high}`` sampled log-uniformly."""

    values: list[float] | None = Field(None, description="Grid: try exactly these values.")
    low: float | None = Field(None, description="Lower end of a log-uniform range.")
    high: float | None = Field(None, description="Upper end of a log-uniform range.")

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, data: Any) -> Any:
        if isinstance(data, list | tuple):
            return {"values": list(data)}
        return data

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either a list of values or {low, high}, not both")
            if not self.values:
                raise ValueError("the list of values is empty")
            if any(v < 0 for v in self.values):
                raise ValueError("values must not be negative")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give a list of values or both low and high")
        if self.low <= 0 or self.high <= 0:
            raise ValueError("low and high must be positive for a log-uniform range")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class TuneConfig(Section):
    prior_loss_weight: SearchSpace = Field(default_factory=lambda: SearchSpace(values=[0.0, 1.0]),
                                           description="Search space of train.prior_loss_weight.")
    learning_rate: SearchSpace = Field(default_factory=lambda: SearchSpace(values=[1e-4]),
                                       description="Search space of train.learning_rate.")
    prior_mode: list[PriorMode] | None = Field(
        None, description="Grid over prior.mode, e.g. [images, model] (none: the config's prior.mode).")
    num_samples: int = Field(1, ge=1, description="Samples per grid point (or draws for ranges).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: what the cluster fits.")
    eval_every: int = Field(10, ge=1, description="Optimizer steps between validation metrics.")
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA reduction factor.")
    prior_weight_in_score: float = Field(1.0, ge=0.0, description="val_score = val_instance + w * val_prior.")
    name: str = Field("tune", description="Experiment name under the subject's tune folder.")
    metric: Literal["val_score", "val_fidelity", "val_clip_i", "val_clip_t", "val_dino"] = Field(
        "val_score", description="What ranks the trials: val_score (held-out denoising loss, lowest "
        "first) or a score of sampled images, highest first: val_fidelity (eval.fidelity), val_clip_i "
        "/ val_clip_t (eval.clip_model), val_dino (eval.dino_model).")

    @field_validator("prior_mode")
    @classmethod
    def _distinct_modes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("give each prior mode once, at least one")
        return value

    @property
    def planned_trials(self) -> int:
        """Trials the search runs: ``num_samples`` x the grid's points (a range is one point per
        sample; ``prior_mode`` is a grid dimension too)."""
        points = 1
        for space in (self.prior_loss_weight, self.learning_rate):
            points *= len(space.values) if space.values is not None else 1
        return self.num_samples * points * len(self.prior_mode or [None])


class EvalConfig(Section):
    clip_model: str | None = Field(None, description="CLIP model for CLIP-I/CLIP-T ('tiny' or a path).")
    dino_model: str | None = Field(None, description="DINO (ViT) model for the DINO subject-fidelity "
                                   "score ('tiny' or a path / hub id, e.g. facebook/dino-vits16).")
    fidelity: Literal["digits"] | None = Field(
        None, description="Judge sampled images for val_fidelity (subject fidelity, drift, class "
        "accuracy): 'digits' reads them with the digit classifier and the subject's colour-trait "
        "detector (for model.pretrained: digits).")
    num_images: int = Field(2, ge=1, le=256, description="Sampled images per prompt for the CLIP and "
                            "fidelity metrics.")
    num_inference_steps: int = Field(10, ge=1, description="Denoising steps of the metrics' samples.")

    @property
    def samples_images(self) -> bool:
        """Validation samples images (CLIP, DINO or fidelity scores): the trainer then needs every
        text encoder, FLUX.1's T5 included."""
        return bool(self.clip_model or self.dino_model or self.fidelity)
