"""The two Ray Serve deployments: an HTTP ingress and the diffusion replicas behind it.

``RaydbIngress`` (FastAPI) passes every request through its gate (:mod:`raydb.serving.gate`: the
ingress's own bound, 503; the tenant's concurrency cap and token bucket for the route's class, 429 +
``Retry-After``; the body's byte cap, 413, and read deadline, 408; an audit line), authenticates the
caller, resolves the subject in the registry for the caller's tenant, validates the body against
the configured limits and forwards to
``RaydbDiffusion`` with ``multiplexed_model_id="<tenant>/<subject>@<version>"``, so Serve routes the request
to a replica that already holds that adapter when one does. Each diffusion replica loads the base
pipeline once and keeps up to ``serve.max_num_models_per_replica`` adapters resident
(``@serve.multiplexed``, LRU); a new adapter is validated *before* it enters that cache, so a bad one
never evicts a good one.

Bounded requests: the replica queue is bounded (``serve.max_queued_requests``, 503 beyond); a
request gets ``serve.request_timeout_s`` (504 after); when the client disconnects or the deadline
passes the denoising loop stops at its next step (the pipeline's step callback), so an abandoned
request does not hold the replica.

Both deployments get the whole config as a plain dict and re-validate it; nothing reaches a replica
through module globals or its environment (API keys arrive as digests in the config, folded in
where the app is built). Replica-side failures come back as ``{"error": {"status", "detail"}}`` with
a generic ``detail``; the specifics (paths, model identities) go to the replica's log only.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation on
the ingress methods, which Serve re-wraps.
"""

import asyncio
import base64
import json
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from raydb.config import RaydbConfig
from raydb.errors import Refused, RequestError, TimedOut, Unavailable
from raydb.registry import migrate_registry, version_uri
from raydb.serving import observe
from raydb.serving.adapters import AdapterError, AdapterGone, GenerationCancelled, LoadedAdapter
from raydb.serving.api import GenerateRequest, validate_generate
from raydb.serving.audit import note
from raydb.serving.auth import KeyRing, key_from_headers
from raydb.serving.batcher import ShapeBatcher
from raydb.serving.console import ConsoleEndpoint, ConsoleHeadersMiddleware
from raydb.serving.console import router as console_router
from raydb.serving.engine import (
    DiffusionEngine,
    EngineRequest,
    compile_options,
    serving_compile_cache,
    warm_up_batches,
)
from raydb.serving.gate import Gate, GateMiddleware
from raydb.serving.limits import ImageWorkers
from raydb.serving.openapi import openapi_document
from raydb.serving.proxy import check_open_proxy, running_proxy
from raydb.serving.retry import DEFAULT_ATTEMPTS, call_with_retry, safe_to_repeat
from raydb.serving.slots import SlotPool
from raydb.serving.status import http_exception, http_status
from raydb.serving.subjects import (
    BadAdapterId,
    SubjectNotFound,
    find_subject,
    model_id,
    parse_model_id,
    tenant_subjects,
)
from raydb.serving.training_routes import TrainingsEndpoint
from raydb.serving.training_routes import router as trainings_router
from raydb.storage import Storage

__all__ = ["DiffusionDeployment", "IngressDeployment", "http_app"]

# What the ingress answers a /v1/generate request it will not run with (status: raydb.serving.status).
# A body over its cap or too slow is answered by the gate, which set those limits.
_REFUSALS = (Refused, ValidationError, SubjectNotFound)

logger = logging.getLogger("ray.serve")

# FastAPI's own /docs, /redoc and /openapi.json are off: the ingress serves them behind the API key
# when serve.docs is true.
http_app = FastAPI(title="raydb", description="DreamBooth-LoRA subjects over HTTP (see docs/serving.md).",
                   docs_url=None, redoc_url=None, openapi_url=None)
http_app.include_router(trainings_router)  # /v1/trainings (docs/service.md)
http_app.include_router(console_router)  # /ui and the /v1 routes it reads (docs/console.md)
http_app.add_middleware(GateMiddleware)  # every route: the ingress replica's ``gate`` (raydb/serving/gate.py)
# outside the gate: request ids in error bodies and logs, HTTP metrics (raydb/serving/observe.py)
observe.install(http_app)
http_app.add_middleware(ConsoleHeadersMiddleware)  # outside the gate: the CSP on every /ui answer


@serve.deployment(name="RaydbDiffusion")
class DiffusionDeployment:
    """Base pipeline once per replica as a batching engine; adapters multiplexed by ``<subject>@<version>``.

    Requests of one shape are batched (``serve.max_batch_size``, ``serve.batch_wait_ms``) into one
    denoising loop whatever their subjects: each adapter sits in an engine slot (see
    ``raydb/serving/engine.py``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from raydb.models.components import load_pipeline

        self.cfg = RaydbConfig.model_validate(config)
        sc = self.cfg.serve
        torch.set_num_threads(max(1, int(sc.num_cpus_per_replica)))
        self.storage = Storage(self.cfg.s3_endpoint_url)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # dtype=None: fp32 on CPU; on CUDA the family's half precision (fp16; bf16 for FLUX.1)
        pipe = load_pipeline(self.cfg.model, self.storage, self.cfg.workspace, dtype=None, device=device)
        # Evicted adapters that queued requests still hold keep their slots: one batch's worth extra.
        self.engine = DiffusionEngine(
            pipe, num_slots=sc.max_num_models_per_replica + sc.max_batch_size, max_lora_rank=sc.max_lora_rank,
            unet_targets=self.cfg.lora.target_modules,
            text_encoder_targets=self.cfg.lora.text_encoder_target_modules)
        if sc.compile != "off":  # compiled (and warmed up) before the replica takes requests
            cache = serving_compile_cache(self.engine, self.storage, self.cfg.workspace, mode=sc.compile,
                                          max_batch_size=sc.max_batch_size) if sc.compile_cache else None
            info = self.engine.compile_unet(cache=cache, warm_up=warm_up_batches(sc.max_batch_size),
                                            **compile_options(sc.compile))
            logger.info("serving UNet compiled (%s): %s", sc.compile, info)
        self.pool = SlotPool(self.engine, failure_ttl_s=sc.adapter_failure_ttl_s)
        self.in_flight = self.peak_in_flight = self.cancelled = 0
        self.batcher = ShapeBatcher(self.engine.run_batch, key=lambda r: self.engine.key(r.params),
                                    max_batch_size=sc.max_batch_size, wait_s=sc.batch_wait_ms / 1000,
                                    subject=lambda r: r.slot)

        async def load_adapter(adapter_id: str) -> LoadedAdapter:
            tenant, subject_id, version = parse_model_id(adapter_id)
            uri = version_uri(self.cfg.workspace, tenant, subject_id, version)
            # the pool keys adapters by the qualified name: two tenants' "alice" are two adapters
            return await asyncio.to_thread(self.pool.load, self.storage, uri, f"{tenant}/{subject_id}",
                                           version)

        # Built here, not as a class decorator, because the cache size comes from the config.
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=sc.max_num_models_per_replica)(
            load_adapter)

    async def _adapter(self, adapter_id: str) -> LoadedAdapter:
        """The resident adapter, validated (and staged) first when it is not resident yet: the
        multiplexer evicts before it loads, so only a valid adapter may reach it."""
        tenant, subject_id, version = parse_model_id(adapter_id)
        if not self.pool.is_resident(adapter_id):
            uri = version_uri(self.cfg.workspace, tenant, subject_id, version)
            await asyncio.to_thread(self.pool.stage, self.storage, uri, adapter_id)
        return await self._get_adapter(adapter_id)

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{"images": [png bytes], "width", "height"}`` or ``{"error": {status, detail}}``.

        Without a multiplexed model id the base model samples (``POST /v1/generate`` without a
        ``subject_id``: the base side of a comparison). A request whose client went away (Serve
        cancels it) or whose deadline passed asks its batch to stop; a batch stops when all its
        requests ask.
        """
        adapter_id = serve.get_multiplexed_model_id()
        adapter: LoadedAdapter | None = None
        stop = threading.Event()
        deadline = time.monotonic() + self.cfg.serve.request_timeout_s
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if adapter_id:
                adapter = await self._adapter(adapter_id)
                adapter.acquire()  # before any await: eviction now waits for this request
            try:
                if adapter is not None and not adapter.loaded:
                    raise AdapterGone("adapter was unloaded; retry the request")
                request = EngineRequest(params, adapter.slot if adapter else None,
                                        should_stop=lambda: stop.is_set() or time.monotonic() > deadline)
                result = await self.batcher.submit(request)
            finally:
                if adapter is not None and adapter.release():
                    await asyncio.to_thread(self.pool.unload, adapter)
        except GenerationCancelled as exc:
            self.cancelled += 1
            logger.info("request for %s stopped: %s", adapter_id or "base model", exc)
            return {"error": {"status": http_status(exc), "detail": "the request ran past its time limit"}}
        except asyncio.CancelledError:
            stop.set()  # the client went away: its batch stops at the next step if it was the last
            self.cancelled += 1
            raise
        except AdapterError as exc:
            logger.warning("adapter %s failed: %s", adapter_id, exc)
            return {"error": {"status": http_status(exc), "detail": exc.public}}
        except BadAdapterId as exc:
            logger.warning("bad adapter id %r: %s", adapter_id, exc)
            return {"error": {"status": http_status(exc), "detail": "bad adapter id"}}
        finally:
            self.in_flight -= 1
        return result

    def stats(self) -> dict[str, Any]:
        """Resident adapters, load/unload and UNet-forward counters, batches run, request counters
        (tests, benchmarks)."""
        return self.pool.stats() | {"batches": list(self.batcher.batches), "cancelled": self.cancelled,
                                    "peak_in_flight": self.peak_in_flight,
                                    "compile": self.engine.compile_info}

    def reset_peak(self) -> None:
        """Start a new ``peak_in_flight`` measurement."""
        self.peak_in_flight = self.in_flight


def _base_family(cfg: RaydbConfig, storage: Storage) -> str | None:
    """The served base model's family from its config files (None for a hub id, or a folder the
    diffusion replicas will refuse with the reason; the ingress does not load the model)."""
    from raydb.models.components import configured_family

    try:
        return configured_family(cfg.model, storage)
    except (OSError, ValueError):
        return None


@serve.deployment(name="RaydbIngress")
@serve.ingress(http_app)
class IngressDeployment:
    """``POST /v1/generate``, ``GET /v1/subjects``, ``GET /healthz``, ``/v1/trainings``, the console
    (``/ui`` and its routes: :mod:`raydb.serving.console`) (docs: serve.docs)."""

    def __init__(self, config: dict[str, Any], diffusion: DeploymentHandle) -> None:
        observe.install_log_fields()  # request id, tenant, subject on every log line of a request
        self.cfg = RaydbConfig.model_validate(config)
        sc = self.cfg.serve
        check_open_proxy(sc, running_proxy())  # auth: none behind a proxy on 0.0.0.0: refuse to start
        self.storage = Storage(self.cfg.s3_endpoint_url)
        self.diffusion = diffusion
        # digests only, folded in where the app was built: this replica never reads keys from its env
        self.keys = KeyRing(sc.api_keys) if sc.auth == "api_key" else None
        self.gate = Gate(self.cfg, self._caller)  # every route's limits, applied by GateMiddleware
        self.images = ImageWorkers(sc.image_workers, sc.image_queue)  # photo decoding, off the event loop
        self.trainings = TrainingsEndpoint(self.cfg, self.storage, self._tenant,  # /v1/trainings
                                           images=self.images)
        self.console = ConsoleEndpoint(self.cfg, self.storage, self._tenant, self.images)  # /ui
        self.base_family = _base_family(self.cfg, self.storage)  # a base-model request's size rules
        if self.keys is None:
            logger.warning("raydb serve: authentication is OFF (serve.auth=none); every caller is "
                           "tenant %r (subject.tenant). Use only on a trusted local machine.",
                           self.cfg.subject.tenant)
        elif not len(self.keys):
            logger.warning("raydb serve: no API keys configured (serve.api_keys, serve.api_keys_file or "
                           "$%s where the app is built); every request will get 401", sc.api_keys_env)
        migrated = migrate_registry(self.storage, self.cfg.workspace)
        if migrated:
            logger.info("raydb serve: moved %d registry versions to per-tenant subject names", migrated)

    def _caller(self, headers: Any) -> tuple[str | None, str]:
        """``(tenant, caller)`` of the presented key for the gate: ``caller`` is ``key``, ``no key``,
        ``invalid key`` or ``auth off`` (the route still answers 401 where a key is needed)."""
        if self.keys is None:
            return None, "auth off"
        key = key_from_headers(headers)
        tenant = self.keys.tenant_for(key)
        return tenant, "key" if tenant else ("invalid key" if key else "no key")

    def _tenant(self, request: Request) -> str | None:
        """The caller's tenant (None: auth is off); 401 for a missing or unknown key."""
        if self.keys is None:
            return None
        tenant = self.keys.tenant_for(key_from_headers(request.headers))
        if tenant is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key> or "
                                "X-API-Key: <key>)", headers={"WWW-Authenticate": "Bearer"})
        return tenant

    @http_app.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @http_app.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> dict[str, Any]:
        if not self.cfg.serve.docs:
            raise HTTPException(404, "Not Found")
        self._tenant(request)
        return openapi_document(http_app)  # bodies, responses and the key schemes (serving/openapi.py)

    @http_app.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> Response:
        if not self.cfg.serve.docs:
            raise HTTPException(404, "Not Found")
        self._tenant(request)
        return get_swagger_ui_html(openapi_url="openapi.json", title="raydb")

    @http_app.get("/v1/subjects")
    async def subjects(self, request: Request) -> dict[str, Any]:
        tenant = self._tenant(request)
        rows = await asyncio.to_thread(tenant_subjects, self.storage, self.cfg.workspace,
                                       tenant or self.cfg.subject.tenant)
        return {"subjects": rows}

    @http_app.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        tenant = self._tenant(request)  # before reading the body: unauthenticated callers learn nothing
        try:  # the tenant's limits and the body's cap and deadline: the gate
            return await self._generate(request, tenant)
        except _REFUSALS as exc:  # the status comes from the one table (raydb.serving.status)
            raise http_exception(exc) from None

    async def _generate(self, request: Request, tenant: str | None) -> Response:
        """Raises one of ``_REFUSALS`` for a request it will not run: a body that is not a
        GenerateRequest, an unknown subject, a broken limit."""
        sc = self.cfg.serve
        req = GenerateRequest.model_validate_json(await request.body())
        observe.note(subject=req.subject_id)
        note(request, subject_id=req.subject_id, prompt=req.prompt, negative_prompt=req.negative_prompt)
        subject = None  # no subject_id: the base model alone (what a comparison sets beside subjects)
        if req.subject_id is not None:
            subject = await asyncio.to_thread(find_subject, self.storage, self.cfg.workspace,
                                              tenant or self.cfg.subject.tenant, req.subject_id)
        params = validate_generate(req, sc, subject.metadata if subject else {}, base_family=self.base_family)
        note(request, adapter_version=subject and subject.version, num_images=params.num_images,
             num_inference_steps=params.num_inference_steps, width=params.width, height=params.height)
        want_png = "image/png" in request.headers.get("accept", "")
        if want_png and params.num_images != 1:
            raise RequestError("num_images", "Accept: image/png returns one image; use application/json "
                                             "for more")
        adapter = model_id(subject.tenant, subject.subject_id, subject.version) if subject else None
        result = await self._call_replica(adapter, params.model_dump())
        if "error" in result:  # the replica's status, from the same table
            what = f"subject {subject.subject_id!r}" if subject else "base model"
            raise HTTPException(result["error"]["status"], f"{what}: {result['error']['detail']}")
        used = params.model_dump() | {"subject_id": subject and subject.subject_id,
                                      "adapter_version": subject and subject.version,
                                      "prompt_rewritten": params.prompt != req.prompt,
                                      "width": result["width"], "height": result["height"]}
        if want_png:
            version = {"X-Raydb-Adapter-Version": subject.version} if subject else {}
            return Response(result["images"][0], media_type="image/png",
                            headers={"X-Raydb-Seed": str(params.seed)} | version)
        body = used | {"images": [base64.b64encode(png).decode("ascii") for png in result["images"]]}
        return Response(json.dumps(body), media_type="application/json")

    async def _call_replica(self, adapter: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """The replica's answer within ``serve.request_timeout_s`` (``adapter``: the multiplexed model
        id, None for the base model alone); the replica request is cancelled (its denoising loop
        stops) on timeout and when this request is cancelled (client gone)."""
        handle = self.diffusion.options(multiplexed_model_id=adapter) if adapter else self.diffusion
        sent = []  # a replica that dies is retried with the same (seeded) params: retry.py

        def send():
            sent.append(handle.generate.remote(params))
            return sent[-1]

        async def answer() -> dict[str, Any]:
            return await call_with_retry(send, what="generate",
                                         attempts=DEFAULT_ATTEMPTS if safe_to_repeat(params) else 1)

        try:
            return await asyncio.wait_for(answer(), timeout=self.cfg.serve.request_timeout_s)
        except TimeoutError:
            sent[-1].cancel()
            raise TimedOut("the request ran past its time limit") from None
        except asyncio.CancelledError:
            if sent:
                sent[-1].cancel()
            raise
        except BackPressureError:
            raise Unavailable("the server is at capacity; retry", retry_after=1,
                              rejection="backpressure") from None
