"""The two Ray Serve deployments: an HTTP ingress and the diffusion replicas behind it.

``RaydbIngress`` (FastAPI) authenticates the caller, resolves the subject in the registry for the
caller's tenant, validates the body against the configured limits and forwards to ``RaydbDiffusion``
with ``multiplexed_model_id="<subject>@<version>"``, so Serve routes the request to a replica that
already holds that adapter when one does. Each diffusion replica loads the base pipeline once and
keeps up to ``serve.max_num_models_per_replica`` adapters resident (``@serve.multiplexed``, LRU).

Both deployments get the whole config as a plain dict and re-validate it; nothing reaches a replica
through module globals. Replica-side failures come back as ``{"error": {"status", "detail"}}`` so
one subject's broken adapter fails only that subject's requests.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation on
the ingress methods, which Serve re-wraps.
"""

import asyncio
import base64
import json
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from raydb.config import RaydbConfig
from raydb.registry import version_uri
from raydb.serving.adapters import AdapterError, AdapterGone, LoadedAdapter
from raydb.serving.api import GenerateRequest, RequestError, validate_generate, validation_detail
from raydb.serving.auth import KeyRing, key_from_headers
from raydb.serving.batcher import ShapeBatcher
from raydb.serving.engine import DiffusionEngine, EngineRequest
from raydb.serving.slots import SlotPool
from raydb.serving.subjects import (
    SubjectNotFound,
    find_subject,
    model_id,
    parse_model_id,
    tenant_subjects,
)
from raydb.storage import Storage

__all__ = ["DiffusionDeployment", "IngressDeployment", "http_app"]

logger = logging.getLogger("ray.serve")

http_app = FastAPI(title="raydb", description="DreamBooth-LoRA subjects over HTTP (see docs/serving.md).")


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
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = load_pipeline(self.cfg.model, self.storage, self.cfg.workspace, dtype=dtype, device=device)
        # Evicted adapters that queued requests still hold keep their slots: one batch's worth extra.
        self.engine = DiffusionEngine(
            pipe, num_slots=sc.max_num_models_per_replica + sc.max_batch_size, max_lora_rank=sc.max_lora_rank,
            unet_targets=self.cfg.lora.target_modules,
            text_encoder_targets=self.cfg.lora.text_encoder_target_modules)
        if sc.compile != "off":
            self.engine.compile_unet(mode=sc.compile)
        self.pool = SlotPool(self.engine)
        self.batcher = ShapeBatcher(self.engine.run_batch, key=lambda r: self.engine.key(r.params),
                                    max_batch_size=sc.max_batch_size, wait_s=sc.batch_wait_ms / 1000)

        async def load_adapter(adapter_id: str) -> LoadedAdapter:
            subject_id, version = parse_model_id(adapter_id)
            uri = version_uri(self.cfg.workspace, subject_id, version)
            return await asyncio.to_thread(self.pool.load, self.storage, uri, subject_id, version)

        # Built here, not as a class decorator, because the cache size comes from the config.
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=sc.max_num_models_per_replica)(
            load_adapter)

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{"images": [png bytes], "width", "height", "base_model"}`` or ``{"error": {status, detail}}``.

        Without a multiplexed model id the base model samples (used by tests and benchmarks only;
        the HTTP API always names a subject).
        """
        adapter_id = serve.get_multiplexed_model_id()
        adapter: LoadedAdapter | None = None
        try:
            if adapter_id:
                adapter = await self._get_adapter(adapter_id)
                adapter.acquire()  # before any await: eviction now waits for this request
            try:
                if adapter is not None and not adapter.loaded:
                    raise AdapterGone("adapter was unloaded; retry the request")
                result = await self.batcher.submit(EngineRequest(params, adapter.slot if adapter else None))
            finally:
                if adapter is not None and adapter.release():
                    await asyncio.to_thread(self.pool.unload, adapter)
        except AdapterError as exc:
            logger.warning("adapter %s failed: %s", adapter_id, exc)
            return {"error": {"status": exc.status, "detail": str(exc)}}
        except ValueError as exc:  # bad adapter id
            return {"error": {"status": 400, "detail": str(exc)}}
        return result | {"base_model": self.pool.identity}

    def stats(self) -> dict[str, Any]:
        """Resident adapters, load/unload and UNet-forward counters, batches run (tests, benchmarks)."""
        return self.pool.stats() | {"batches": list(self.batcher.batches)}


@serve.deployment(name="RaydbIngress")
@serve.ingress(http_app)
class IngressDeployment:
    """``POST /v1/generate``, ``GET /v1/subjects``, ``GET /healthz``."""

    def __init__(self, config: dict[str, Any], diffusion: DeploymentHandle) -> None:
        self.cfg = RaydbConfig.model_validate(config)
        self.storage = Storage(self.cfg.s3_endpoint_url)
        self.diffusion = diffusion
        self.keys = KeyRing.from_config(self.cfg.serve) if self.cfg.serve.auth == "api_key" else None
        if self.keys is None:
            logger.warning("raydb serve: authentication is OFF (serve.auth=none); every caller sees "
                           "every tenant's subjects. Use only on a trusted local machine.")
        elif not len(self.keys):
            logger.warning("raydb serve: no API keys configured (serve.api_keys or $%s); every request "
                           "will get 401", self.cfg.serve.api_keys_env)

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

    @http_app.get("/v1/subjects")
    async def subjects(self, request: Request) -> dict[str, Any]:
        tenant = self._tenant(request)
        rows = await asyncio.to_thread(tenant_subjects, self.storage, self.cfg.workspace, tenant)
        return {"subjects": rows}

    @http_app.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        tenant = self._tenant(request)  # before parsing: unauthenticated callers learn nothing
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise HTTPException(422, validation_detail(exc)) from None
        try:
            subject = await asyncio.to_thread(find_subject, self.storage, self.cfg.workspace,
                                              req.subject_id, tenant)
        except SubjectNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        try:
            params = validate_generate(req, self.cfg.serve, subject.metadata)
        except RequestError as exc:
            raise HTTPException(422, exc.detail()) from None
        want_png = "image/png" in request.headers.get("accept", "")
        if want_png and params.num_images != 1:
            raise HTTPException(422, RequestError("num_images", "Accept: image/png returns one image; "
                                                  "use application/json for more").detail())
        result = await self.diffusion.options(
            multiplexed_model_id=model_id(subject.subject_id, subject.version)
        ).generate.remote(params.model_dump())
        if "error" in result:
            raise HTTPException(result["error"]["status"],
                                f"subject {subject.subject_id!r}: {result['error']['detail']}")
        used = params.model_dump() | {"subject_id": subject.subject_id, "adapter_version": subject.version,
                                      "prompt_rewritten": params.prompt != req.prompt,
                                      "width": result["width"], "height": result["height"],
                                      "base_model": result["base_model"]}
        if want_png:
            return Response(result["images"][0], media_type="image/png", headers={
                "X-Raydb-Seed": str(params.seed), "X-Raydb-Adapter-Version": subject.version})
        body = used | {"images": [base64.b64encode(png).decode("ascii") for png in result["images"]]}
        return Response(json.dumps(body), media_type="application/json")
