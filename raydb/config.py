"""One typed config tree for every stage, loaded from YAML then dotted ``key=value`` overrides.

Each concern (model, subject, prior, lora, train, cluster, tune, eval, serve, service) is its own pydantic
model. Every model forbids unknown keys, so a typo is an error that names the field path instead of
a silently ignored setting. Configs travel to Ray tasks and workers as plain dicts and are
re-validated there (``RaydbConfig.model_validate``), never through module globals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydb.ids import check_safe_id

__all__ = [
    "ConfigError",
    "ModelConfig",
    "SubjectConfig",
    "PriorConfig",
    "LoraConfig",
    "FlowConfig",
    "TrainConfig",
    "ClusterConfig",
    "SearchSpace",
    "TuneConfig",
    "EvalConfig",
    "ServeConfig",
    "ServiceConfig",
    "RaydbConfig",
    "load_config",
    "apply_overrides",
    "config_reference_markdown",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending field path."""


class _Strict(BaseModel):
    # YAML (and so every override) reads `id: 42` or `revision: 2024` as a number; a str field
    # takes it as text instead of rejecting it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Strict):
    pretrained: str = Field(
        "tiny",
        description="Base model: 'tiny' / 'tiny-sdxl' / 'tiny-flux' (built in: SD / SDXL / FLUX.1 at "
        "toy widths), a local diffusers directory, an s3:// prefix, or a Hugging Face hub id (needs "
        "network). SD 1.x/2.x, SDXL and FLUX.1 are told apart from the folder itself.",
    )
    revision: str | None = Field(None, description="Hub revision, for hub ids only.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type (default: from the scheduler)."
    )
    cache_dir: str | None = Field(
        None, description="Local cache for s3:// models (default: ~/.cache/raydb/models)."
    )


class SubjectConfig(_Strict):
    id: str = Field("demo", description="Registry id of the subject: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}.")
    tenant: str = Field("default", description="Tenant that owns the subject (used by serving).")
    instance_data: str = Field(
        "builtin:demo", description="Folder or s3:// prefix of the subject's photos, or builtin:demo."
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


class PriorConfig(_Strict):
    enabled: bool = Field(True, description="Train with prior preservation ([instance | class] batches).")
    class_data: str | None = Field(None, description="Existing class images (folder or s3://); "
                                   "when unset they are generated into the shared prior cache.")
    num_class_images: int = Field(100, ge=1, description="Class images used for prior preservation.")
    sample_batch_size: int = Field(4, ge=1, description="Images generated per pipeline call.")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps per class image.")
    guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance scale.")
    negative_prompt: str = Field("", description="Negative prompt for class images.")
    seed: int = Field(0, ge=0, description="Base seed; image i uses a seed derived from (seed, i).")
    concurrency: int | None = Field(None, ge=1, description="Generator actors (default: GPUs, or 1 on CPU).")
    num_holdout: int = Field(4, ge=0, description="Extra class images generated but never trained on "
                             "(used by validation metrics).")


class LoraConfig(_Strict):
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


class FlowConfig(_Strict):
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


class TrainConfig(_Strict):
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


class ClusterConfig(_Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved by each Train worker.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts before a run fails "
                              "(-1: unlimited).")
    address: str | None = Field(None, description="Ray address to join (default: auto-detect or "
                                "start local).")


class SearchSpace(_Strict):
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


class TuneConfig(_Strict):
    prior_loss_weight: SearchSpace = Field(default_factory=lambda: SearchSpace(values=[0.0, 1.0]),
                                           description="Search space of train.prior_loss_weight.")
    learning_rate: SearchSpace = Field(default_factory=lambda: SearchSpace(values=[1e-4]),
                                       description="Search space of train.learning_rate.")
    num_samples: int = Field(1, ge=1, description="Samples per grid point (or draws for ranges).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: what the cluster fits.")
    eval_every: int = Field(10, ge=1, description="Optimizer steps between validation metrics.")
    grace_period: int = Field(1, ge=1, description="ASHA: evaluations before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA reduction factor.")
    prior_weight_in_score: float = Field(1.0, ge=0.0, description="val_score = val_instance + w * val_prior.")
    name: str = Field("tune", description="Experiment name under the subject's tune folder.")


class EvalConfig(_Strict):
    clip_model: str | None = Field(None, description="CLIP model for CLIP-I/CLIP-T ('tiny' or a path).")
    num_images: int = Field(2, ge=1, description="Sampled images for CLIP metrics.")
    num_inference_steps: int = Field(10, ge=1, description="Denoising steps of the CLIP-metric samples.")


class ServeConfig(_Strict):
    auth: Literal["api_key", "none"] = Field("api_key", description="none: no authentication (only with a "
                                             "loopback serve.host).")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="sha256 hex digest of an API key -> tenant."
    )
    api_keys_env: str = Field("RAYDB_API_KEYS", description="Env var with 'key:tenant,key:tenant', read "
                              "once where the app is built (replicas never read it).")
    max_num_models_per_replica: int = Field(8, ge=1, description="Adapters resident per diffusion "
                                            "replica (least recently used unloaded first).")
    num_replicas: int = Field(1, ge=1, description="Diffusion replicas.")
    max_inference_steps: int = Field(50, ge=1, description="Largest num_inference_steps a request may ask.")
    default_inference_steps: int = Field(25, ge=1, description="num_inference_steps when a request "
                                         "gives none.")
    max_size: int = Field(768, ge=8, description="Largest width/height a request may ask (pixels).")
    max_images: int = Field(4, ge=1, description="Largest num_images per request.")
    max_prompt_chars: int = Field(500, ge=1, description="Longest prompt / negative prompt (characters).")
    host: str = Field("127.0.0.1", description="HTTP host Serve's proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port Serve's proxy binds.")
    route_prefix: str = Field("/", description="URL prefix of the app's routes.")
    app_name: str = Field("raydb", description="Ray Serve application name.")
    num_cpus_per_replica: float = Field(
        1.0, gt=0.0, description="CPUs reserved by each diffusion replica (also its torch threads)."
    )
    num_gpus_per_replica: float = Field(0.0, ge=0.0, description="GPUs reserved by each diffusion replica.")
    max_ongoing_requests: int = Field(
        16, ge=1,
        description="Requests a diffusion replica accepts at once (running + queued for the next "
                    "batch); keep it >= 2 x max_batch_size."
    )
    max_batch_size: int = Field(
        8, ge=1,
        description="Requests of one shape (size, steps, guidance) a diffusion replica runs in one "
                    "denoising loop, whatever their subjects; 1 turns batching off. Throughput for "
                    "latency: a batch finishes together."
    )
    batch_wait_ms: float = Field(
        20.0, ge=0.0,
        description="How long the first request of a batch waits for batch-mates on an idle replica "
                    "(a lone request's extra latency); 0 batches only what is already queued."
    )
    max_lora_rank: int = Field(
        32, ge=1,
        description="Largest adapter rank a replica serves: adapter slots are preallocated at this "
                    "rank (memory, and LoRA compute for every sample); higher ranks are refused (409)."
    )
    compile: Literal["off", "cudagraphs", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="torch.compile the serving UNet: 'cudagraphs' captures the eager kernels as CUDA "
                    "graphs (dynamo's cudagraphs backend, no inductor), the others are inductor modes "
                    "(reduce-overhead: inductor kernels under CUDA graphs). A replica compiles at "
                    "start-up (warm-up loops at batch 1 and max_batch_size, native size), not on a "
                    "request; measure with bench/serve_engine_gpu.py before turning it on."
    )
    compile_cache: bool = Field(
        False,
        description="With serve.compile, keep torch.compile's artifacts in <workspace>/compile-cache "
                    "(keyed by base model, torch, GPU, shapes, dtype, slots, mode) so the next replica "
                    "of the same base model starts warm. Off by default for the same reason as "
                    "train.compile_cache: torch deserializes these artifacts with pickle, so turn it on "
                    "only for a workspace that only trusted jobs can write."
    )
    max_queued_requests: int = Field(
        32, ge=1, description="Requests that may wait for a busy diffusion replica (beyond "
        "max_ongoing_requests); more are refused with 503 + Retry-After, so queues stay bounded."
    )
    request_timeout_s: float = Field(
        120.0, gt=0.0, description="Seconds a generation may take, queueing included; after that the "
        "denoising loop is stopped and the client gets 504."
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Largest accepted request body; a larger Content-Length gets 413 "
        "before the body is read."
    )
    tenant_max_concurrent: int = Field(
        4, ge=1, description="Requests one tenant may have in flight at once (more: 429 + Retry-After); "
        "also the most of one tenant's requests that can wait ahead of another tenant's."
    )
    tenant_rate_per_s: float = Field(
        2.0, ge=0.0, description="Sustained requests per second per tenant (token bucket; 0 = no rate "
        "limit); beyond it: 429 + Retry-After."
    )
    tenant_burst: int = Field(10, ge=1, description="Requests a tenant may send at once after being idle "
                              "(the token bucket's size).")
    adapter_failure_ttl_s: float = Field(
        10.0, ge=0.0, description="Seconds a failed adapter load is remembered (answered without reading "
        "the registry again); 0 = not cached."
    )
    docs: bool = Field(False, description="Serve /docs and /openapi.json (behind the API key).")
    api_keys_file: str | None = Field(
        None, description="Mounted secret file with 'key:tenant' entries (comma- or newline-separated), "
        "read once where the app is built; only digests reach the replicas."
    )

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> ServeConfig:
        """auth: none exposes every tenant's subjects, so it is only allowed on this machine."""
        if self.auth == "none" and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"serve.auth 'none' is only allowed with a loopback serve.host "
                             f"(127.0.0.1, ::1, localhost), not {self.host!r}")
        return self


class ServiceConfig(_Strict):
    """Training as a service: ``/v1/trainings`` on the ingress (docs/service.md)."""

    max_concurrent_trainings: int = Field(2, ge=1, description="Training jobs running on the cluster "
                                          "at once; later ones wait in the queue.")
    max_trainings_per_tenant: int = Field(1, ge=1, description="Training jobs one tenant may have "
                                          "running at once; its others wait in the queue.")
    max_queued_trainings: int = Field(20, ge=0, description="Trainings waiting for a slot; past this "
                                      "a new one gets 429 with Retry-After.")
    retry_after_s: int = Field(60, ge=1, description="Retry-After (seconds) of a 429 for a full queue "
                               "or a tenant at its limit.")
    allowed_overrides: list[str] = Field(
        default_factory=lambda: ["train.max_steps", "train.learning_rate", "train.prior_loss_weight",
                                 "lora.rank", "train.resolution", "tune"],
        description="Config keys a tenant may override per training (dotted; 'tune' switches the "
        "operator's tune: section on).")
    max_train_steps: int = Field(2000, ge=1, description="Largest train.max_steps a training may ask.")
    max_photos: int = Field(20, ge=1, description="Most photos in one training upload.")
    max_photo_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest photo file (bytes).")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest whole upload (bytes, "
                                  "from Content-Length, before the body is read).")
    max_photo_pixels: int = Field(25_000_000, ge=1, description="Most pixels (width x height) of one "
                                  "photo, read from its header before it is decoded.")
    photo_uri_prefixes: list[str] = Field(
        default_factory=list, description="s3:// folders a training may name in 'photo_uris' instead "
        "of uploading photos, '{tenant}' standing for the caller's tenant (e.g. s3://uploads/{tenant}/). "
        "Read with the service's own credentials, so a prefix without '{tenant}' is readable by every "
        "tenant. Empty: photos by URI are refused (403).")
    jobs_address: str | None = Field(None, description="Ray Jobs API (dashboard) address, e.g. "
                                     "http://127.0.0.1:8265 (default: the cluster the ingress runs on).")
    job_python: str | None = Field(None, description="Python that runs a training job's entrypoint "
                                   "(default: the ingress's own interpreter).")
    poll_interval_s: float = Field(5.0, gt=0.0, description="Seconds between the ingress's queue "
                                   "passes (start queued jobs, notice jobs that died).")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="The search a training with "
                             "'tune: true' runs.")

    @field_validator("photo_uri_prefixes")
    @classmethod
    def _photo_uri_prefixes(cls, value: list[str]) -> list[str]:
        """Each a plain s3:// folder once '{tenant}' is filled in (the rule photo URIs are held to)."""
        for prefix in value:
            from raydb.service.photo_uris import split_uri

            probe = prefix.replace("{tenant}", "t")
            if "{" in probe or "}" in probe:
                raise ValueError(f"{prefix!r}: '{{tenant}}' is the only placeholder")
            try:
                split_uri(probe)
            except ValueError as exc:
                raise ValueError(f"{prefix!r}: {exc}") from None
        return value


class RaydbConfig(_Strict):
    workspace: str = Field("./workspace", validate_default=True,
                           description="Local path or s3://bucket/prefix for all artifacts.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint "
                                        "(default: $AWS_ENDPOINT_URL).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    subject: SubjectConfig = Field(default_factory=SubjectConfig,
                                   description="The subject: id, owner, photos and prompts.")
    prior: PriorConfig = Field(default_factory=PriorConfig,
                               description="Prior preservation and class-image generation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter's shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray Train workers.")
    tune: TuneConfig | None = Field(None, description="Ray Tune search (none: train one run).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Validation metrics.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The Ray Serve app.")
    export_formats: list[Literal["kohya"]] = Field(
        default_factory=list, description="Extra adapter formats written at registration beside the "
        "diffusers file and listed in adapter.json (kohya: the single-file LoRA that ComfyUI, "
        "AUTOMATIC1111 and kohya's tools load).")
    service: ServiceConfig = Field(default_factory=ServiceConfig,
                                   description="Trainings submitted over HTTP (/v1/trainings).")

    @field_validator("workspace")
    @classmethod
    def _absolute_workspace(cls, value: str) -> str:
        """Local workspaces become absolute: Ray workers and Tune trials run in other folders."""
        if value.startswith("s3://"):
            return value.rstrip("/")
        return str(Path(value).expanduser().absolute())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, the form in which a config travels to Ray tasks and workers."""
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override's right-hand side as YAML so numbers, bools, lists and null work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``a.b.c=value`` overrides to a nested dict (a new dict is returned)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=60)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty segment in key {key!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section"
                )
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, data: dict | None = None
) -> RaydbConfig:
    """Load and validate a config: YAML file (or ``data``), then ``key=value`` overrides.

    Raises ConfigError naming each bad field path and the reason.
    """
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = dict(data or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    try:
        return RaydbConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def config_reference_markdown() -> str:
    """Markdown table of every config key with its default and description (for the README)."""

    def rows(model: type[BaseModel], prefix: str = ""):
        for name, info in model.model_fields.items():
            sub = next((c for c in getattr(info.annotation, "__args__", (info.annotation,))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub is not None and sub is not SearchSpace:
                yield from rows(sub, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(exclude_none=True)
            doc = (sub.__doc__ or "").strip().splitlines()[0] if sub else ""
            desc = info.description or doc if sub else info.description
            yield f"| `{prefix}{name}` | `{default!r}` | {desc or ''} |"

    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows(RaydbConfig)])
