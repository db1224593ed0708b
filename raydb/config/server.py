"""The server's settings, an operator's concern: the Ray Serve app (``serve``) and the trainings it
takes over HTTP (``service``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raydb.config.base import Section
from raydb.config.stages import TuneConfig
from raydb.storage import s3_segments

__all__ = ["ServeConfig", "ServiceConfig", "TENANT_DENIED_OVERRIDES", "denied_override"]


class ServeConfig(Section):
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
        32, ge=1, le=100_000, description="Requests that may wait for a busy diffusion replica (beyond "
        "max_ongoing_requests); more are refused with 503 + Retry-After, so queues stay bounded."
    )
    request_timeout_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="Seconds a generation may take, queueing included; after "
        "that the denoising loop is stopped and the client gets 504."
    )
    max_body_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, description="Largest accepted request body (every route but "
        "the photo uploads: service.max_upload_bytes); a larger Content-Length gets 413 before the body is "
        "read, a body without one is cut off there (413)."
    )
    tenant_max_concurrent: int = Field(
        4, ge=1, le=10_000, description="POST /v1/generate requests one tenant may have in flight at once "
        "(more: 429 + Retry-After); also the most of one tenant's requests that can wait ahead of another "
        "tenant's."
    )
    tenant_rate_per_s: float = Field(
        2.0, ge=0.0, le=10_000.0, description="Sustained POST /v1/generate requests per second per tenant "
        "(token bucket; 0 = no rate limit); beyond it: 429 + Retry-After."
    )
    tenant_burst: int = Field(10, ge=1, le=10_000, description="Requests a tenant may send at once after "
                              "being idle (the token bucket's size).")
    tenant_api_max_concurrent: int = Field(
        8, ge=1, le=10_000, description="Requests one tenant may have in flight at once on every route "
        "other than /v1/generate (/v1/subjects, /v1/trainings, the console; more: 429 + Retry-After). "
        "A caller without a valid key is held to the same limits per client address.")
    tenant_api_rate_per_s: float = Field(
        10.0, ge=0.0, le=10_000.0, description="Sustained requests per second per tenant on every route "
        "other than /v1/generate (token bucket; 0 = no rate limit); beyond it: 429 + Retry-After.")
    tenant_api_burst: int = Field(30, ge=1, le=10_000, description="The token bucket's size for "
                                  "tenant_api_rate_per_s.")
    tenant_max_uploads: int = Field(
        2, ge=1, le=1000, description="Photo uploads (POST /v1/trainings, the console's photo checks) one "
        "tenant may have in flight at once, body read and photo checks included; more: 429 + Retry-After.")
    body_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="Seconds a request's whole body may take to arrive, counted "
        "from its headers; a slower body (a client trickling bytes) gets 408 and frees its slot.")
    ingress_max_requests: int = Field(
        256, ge=1, le=100_000, description="Requests the ingress replica works on at once, all tenants "
        "together; more get 503 + Retry-After at once (Serve's own queue in front of the ingress is "
        "bounded too: ingress_max_queued).")
    ingress_max_queued: int = Field(
        64, ge=1, le=100_000, description="Requests Ray Serve's proxy may hold waiting for the ingress "
        "replica; beyond it Serve answers 503.")
    image_workers: int = Field(
        2, ge=1, le=64, description="Threads of the ingress that decode and prepare uploaded photos (the "
        "submission check), apart from its event loop and its other work.")
    image_queue: int = Field(
        8, ge=0, le=10_000, description="Photo checks that may wait for an image worker; beyond it: 503 + "
        "Retry-After.")
    audit_dir: str | None = Field(
        None, description="Local folder of the per-tenant audit log (<tenant>.jsonl, one JSON line per "
        "request: who, what, when, outcome); every line also goes to the 'raydb.audit' logger. None: "
        "the logger only.")
    audit_prompts: bool = Field(False, description="Put prompts into the audit log (off: never).")
    adapter_failure_ttl_s: float = Field(
        10.0, ge=0.0, description="Seconds a failed adapter load is remembered (answered without reading "
        "the registry again); 0 = not cached."
    )
    docs: bool = Field(False, description="Serve /docs and /openapi.json (behind the API key).")
    console: bool | None = Field(
        None, description="Serve the web console at /ui (static files only: everything it shows comes "
        "from the API, behind the API key). Default: on when serve.auth is api_key."
    )
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

    @field_validator("audit_dir")
    @classmethod
    def _local_audit_dir(cls, value: str | None) -> str | None:
        """Lines are appended, which object stores cannot do: a local (or mounted) folder only."""
        if value is not None and "://" in value:
            raise ValueError(f"{value!r}: a local folder (the audit log is appended to line by line)")
        return value

    @property
    def console_enabled(self) -> bool:
        """Whether ``/ui`` is served: ``console``, or by default whenever authentication is on."""
        return self.console if self.console is not None else self.auth == "api_key"


# Config keys no tenant may ever override, whatever service.allowed_overrides says (an operator's
# list naming one is a config error at start): each hands a tenant a boundary that is not its own.
# A key is denied when it is one of these or lies under one (a section).
TENANT_DENIED_OVERRIDES: dict[str, str] = {
    "subject": "identity and data: who owns the training, its id and its photos come from the request",
    "workspace": "storage: where every tenant's data is kept",
    "s3_endpoint_url": "storage: which object store the job reads and writes",
    "model": "code and data: which weights the job loads (a path, bucket or hub id) and where it caches them",
    "prior.class_data": "data: a folder or bucket the job would read",
    "prior.concurrency": "the cluster's resources",
    "eval.clip_model": "code and data: a model the job would load",
    "train.compile_cache": "code execution: torch unpickles compile artifacts from the cache",
    "train.compile_backend": "code execution: a torch.compile backend is code the job runs",
    "cluster": "the cluster's resources and address",
    "serve": "the server's own settings",
    "service": "the service's own limits",
    "export_formats": "storage: files written into the registry",
}


def denied_override(key: str) -> str | None:
    """Why ``key`` can never be a tenant override, or None. ``tune`` (the switch) may be allowed;
    the search's own settings (``tune.*``) are the operator's ``service.tune``."""
    if key.startswith("tune."):
        return "the search is the operator's: 'tune' switches service.tune on"
    for denied, why in TENANT_DENIED_OVERRIDES.items():
        if key == denied or key.startswith(denied + "."):
            return why
    return None


class ServiceConfig(Section):
    """Training as a service: ``/v1/trainings`` on the ingress (docs/service.md). Every limit a tenant
    can reach is one of these fields, typed and bounded here."""

    max_concurrent_trainings: int = Field(2, ge=1, description="Training jobs running on the cluster "
                                          "at once; later ones wait in the queue.")
    max_running_per_tenant: int = Field(1, ge=1, description="Training jobs one tenant may have "
                                        "running at once; its others wait in the queue.")
    max_queued_trainings: int = Field(20, ge=1, description="Trainings waiting to start, all tenants "
                                      "together; past this a new one gets 429 with Retry-After.")
    max_queued_per_tenant: int = Field(5, ge=1, description="Trainings one tenant may have waiting to "
                                       "start; past this its new one gets 429 with Retry-After (so one "
                                       "tenant cannot fill the queue for the others).")
    retry_after_s: int = Field(60, ge=1, description="Retry-After (seconds) of a 429 for a full queue "
                               "or a tenant at its limit.")
    allowed_overrides: list[str] = Field(
        default_factory=lambda: ["train.max_steps", "train.learning_rate", "train.prior_loss_weight",
                                 "prior.mode", "lora.rank", "train.resolution", "tune"],
        description="Config keys a tenant may override per training (dotted; 'tune' switches the "
        "operator's tune: section on). Identity, data, storage and code-execution keys (subject.*, "
        "workspace, model.*, train.compile_cache, cluster.*, ...) are refused here at start.")
    max_train_steps: int = Field(2000, ge=1, description="Largest train.max_steps a training may have.")
    max_resolution: int = Field(1024, ge=8, le=4096, description="Largest train.resolution a training "
                                "may have (checked before any photo is decoded).")
    max_lora_rank: int = Field(32, ge=1, description="Largest lora.rank a training may have (and never "
                               "above serve.max_lora_rank: an adapter the server cannot serve is refused "
                               "before it is trained).")
    max_training_seconds: float = Field(6 * 3600.0, gt=0.0, description="Wall-clock seconds a training's "
                                        "Ray job may run; then it is stopped and the training fails "
                                        "saying so.")
    max_tune_trials: int = Field(8, ge=1, description="Most trials a 'tune: true' training's search may "
                                 "plan (service.tune's grid x num_samples is checked against it at "
                                 "start).")
    max_tune_gpus: int = Field(1, ge=1, description="GPUs one 'tune: true' search may hold at once: it "
                               "runs max_tune_gpus // cluster.num_workers trials at a time (never the "
                               "whole cluster), the rest wait.")
    tenant_quota_bytes: int = Field(5 * 1024**3, ge=1, description="Bytes one tenant's trainings may "
                                    "keep in the workspace (their photos, runs, searches and manifests; "
                                    "records and registered adapters are not counted), checked at "
                                    "each submission; past it the submission gets 413.")
    retention_s: float = Field(86400.0, ge=0.0, description="Seconds an ended training's photos and "
                               "runs are kept after it ended; then they are deleted (its record "
                               "and registered adapter stay).")
    max_page_size: int = Field(100, ge=1, description="Most trainings one GET /v1/trainings page "
                               "returns (?limit=, default this).")
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
                                   "passes (start queued jobs, notice jobs that died or ran too long, "
                                   "delete what is past its retention).")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="The search a training with "
                             "'tune: true' runs.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_trainings_per_tenant" in data:
            raise ValueError("max_trainings_per_tenant is now max_running_per_tenant (and "
                             "max_queued_per_tenant bounds a tenant's waiting trainings)")
        return data

    @field_validator("allowed_overrides")
    @classmethod
    def _no_denied_overrides(cls, value: list[str]) -> list[str]:
        for key in value:
            why = denied_override(key)
            if why is not None:
                raise ValueError(f"{key!r} can never be a tenant override ({why})")
        return value

    @field_validator("photo_uri_prefixes")
    @classmethod
    def _photo_uri_prefixes(cls, value: list[str]) -> list[str]:
        """Each a plain s3:// folder once '{tenant}' is filled in (the rule photo URIs are held to),
        with '{tenant}' only in the key: tenant names may hold upper-case letters and '_', which a
        bucket name cannot, so a bucket made from one could never be named."""
        for prefix in value:
            probe = prefix.replace("{tenant}", "t")
            if "{" in probe or "}" in probe:
                raise ValueError(f"{prefix!r}: '{{tenant}}' is the only placeholder")
            try:
                s3_segments(probe)
            except ValueError as exc:
                raise ValueError(f"{prefix!r}: {exc}") from None
            if "{tenant}" in prefix[len("s3://"):].partition("/")[0]:
                raise ValueError(f"{prefix!r}: '{{tenant}}' may only stand in the key, not in the bucket "
                                 "(tenant names are not valid bucket names)")
        return value

    @model_validator(mode="after")
    def _fair_and_bounded(self) -> ServiceConfig:
        if self.max_queued_per_tenant >= self.max_queued_trainings:
            raise ValueError(f"service.max_queued_per_tenant ({self.max_queued_per_tenant}) must be below "
                             f"service.max_queued_trainings ({self.max_queued_trainings}): one tenant could "
                             "fill the queue for every other")
        if self.tune.planned_trials > self.max_tune_trials:
            raise ValueError(f"service.tune plans {self.tune.planned_trials} trials, more than "
                             f"service.max_tune_trials ({self.max_tune_trials})")
        return self

    def tune_concurrency(self, num_workers: int) -> int:
        """Trials a 'tune: true' search runs at once: what ``max_tune_gpus`` holds, each trial
        holding ``num_workers`` GPUs (at least one trial; the config refuses a trial that alone
        needs more), and never more than ``service.tune.max_concurrent_trials``."""
        fits = max(1, self.max_tune_gpus // num_workers)
        return min(fits, self.tune.max_concurrent_trials or fits)
