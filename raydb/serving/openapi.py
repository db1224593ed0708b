"""The HTTP API's OpenAPI document, complete enough to send every request from it.

The routes read their bodies themselves, through the ingress's gate (:mod:`raydb.serving.gate`:
413 past ``serve.max_body_bytes`` / ``service.max_upload_bytes``, 408 past ``serve.body_timeout_s``)
— ``POST /v1/generate`` as JSON, ``POST /v1/trainings`` as multipart after the key was checked —
so FastAPI cannot see their request schemas, and it knows nothing of the API key.
:func:`openapi_document` starts from FastAPI's document and adds what the routes really take and
answer: request bodies (JSON and multipart), response bodies (JSON, PNG, the error body with its
request id), the gate's refusals (408, 413, 429, 503) on every gated route, and the two ways to
present a key (``Authorization: Bearer`` or ``X-API-Key``) as security schemes on every route but
``/healthz``. The gate's capped reads stay as they are: the schema only describes them. Swagger
UI (``/docs`` when ``serve.docs`` is on) can then authorize and send each request; a client
generator gets real types.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raydb.serving.api import GenerateRequest

__all__ = ["openapi_document", "SECURITY_SCHEMES", "GENERATE_EXAMPLE"]

SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "An API key as `Authorization: Bearer <key>`."},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "The same API key as `X-API-Key: <key>`."},
}
_KEYED = [{"bearerAuth": []}, {"apiKeyHeader": []}]  # either one
_PUBLIC = {("/healthz", "get")}

GENERATE_EXAMPLE = {"subject_id": "my-dog", "prompt": "a photo of sks dog on a beach", "seed": 7,
                    "num_inference_steps": 30, "width": 512, "height": 512}


class ErrorBody(BaseModel):
    """Every error answer: what went wrong and the request's id (also the ``X-Request-ID`` header)."""

    detail: str | list[dict[str, Any]] = Field(
        description="A message, or for 422 a list of {type, loc, msg} naming the field (loc[1])")
    request_id: str | None = Field(None, description="Serve's id of this request: quote it in a report")


class GenerateResponse(BaseModel):
    """``POST /v1/generate`` with ``Accept: application/json``: the images and what produced them."""

    model_config = ConfigDict(extra="allow")

    images: list[str] = Field(description="base64-encoded PNGs, num_images of them")
    subject_id: str | None = Field(description="null: the base model alone answered")
    adapter_version: str | None = Field(description="the registered version that answered, e.g. v0003")
    prompt: str = Field(description="the prompt used (the instance token inserted when missing)")
    prompt_rewritten: bool
    negative_prompt: str | None = None
    num_inference_steps: int
    guidance_scale: float
    seed: int = Field(description="the seed used: send it back to get the same images")
    num_images: int
    width: int
    height: int


class SubjectRow(BaseModel):
    subject_id: str
    tenant: str | None = None
    latest_version: str
    versions: list[str]
    registered_at: str | None = None
    instance_token: str | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    family: str | None = Field(None, description="the base model's family: sd or sdxl")


class SubjectsResponse(BaseModel):
    subjects: list[SubjectRow]


class TrainingForm(BaseModel):
    """``POST /v1/trainings`` as ``multipart/form-data``: photos as files, the rest as fields."""

    subject_id: str = Field(description="the new subject's id (letters, digits, - and _)")
    instance_prompt: str = Field(description="e.g. 'a photo of sks dog'")
    class_prompt: str = Field(description="e.g. 'a photo of a dog'")
    overrides: str | None = Field(None, description="a JSON object of allowed config keys, e.g. "
                                                    '{"train.max_steps": 400}')
    photo_uris: str | None = Field(None, description="s3:// URIs of photos, whitespace-separated, "
                                                     "instead of (or besides) uploading them")
    photos: list[bytes] = Field(default_factory=list, description="the photos (JPEG, PNG, WebP)",
                                json_schema_extra={"items": {"type": "string", "format": "binary"}})


class TrainingView(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    subject_id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    stage: str | None = None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    trials: dict[str, int] | None = Field(None, description="a search's {planned, started}; null for one run")
    error: str | None = None
    subject: dict[str, Any] | None = Field(None, description="{subject_id, version} once registered")
    overrides: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    files_deleted_at: str | None = Field(None, description="when retention deleted its photos and runs")


class TrainingList(BaseModel):
    trainings: list[TrainingView]
    next: str | None = Field(None, description="the cursor of the next page (?after=), null on the last")


class Health(BaseModel):
    status: str


class Limits(BaseModel):
    """``GET /v1/limits``: the caller's tenant and what it may ask."""

    model_config = ConfigDict(extra="allow")

    tenant: str
    auth: str = Field(description="api_key or none")
    generate: dict[str, int] = Field(description="max_inference_steps, default_inference_steps, max_size, "
                                                 "max_images, max_prompt_chars")
    training: dict[str, Any] = Field(description="photo limits, resolution, the allowed overrides and "
                                                 "their bounds")


class SubjectDetail(BaseModel):
    """``GET /v1/subjects/{subject_id}``: one version in detail (``?version=``, default the latest)."""

    model_config = ConfigDict(extra="allow")

    subject_id: str
    version: str
    latest_version: str
    versions: list[dict[str, Any]] = Field(description="[{version, registered_at}]")
    files: list[dict[str, Any]] = Field(description="[{name, format, bytes, media_type}]: "
                                                    "/v1/subjects/{id}/versions/{version}/files/{name}")


class PhotoCheckForm(BaseModel):
    """``POST /v1/photo-checks`` as ``multipart/form-data``: the photos a training would get."""

    photos: list[bytes] = Field(description="the photos (JPEG, PNG, WebP)",
                                json_schema_extra={"items": {"type": "string", "format": "binary"}})
    resolution: int | None = Field(None, description="the training's, when the operator lets tenants set it")


class PhotoCheck(BaseModel):
    name: str
    ok: bool
    error: str | None = None
    width: int | None = None
    height: int | None = None


class PhotoChecks(BaseModel):
    photos: list[PhotoCheck] = Field(description="one row per photo, in order; nothing is stored")


_MODELS: list[type[BaseModel]] = [GenerateRequest, GenerateResponse, ErrorBody, SubjectRow, SubjectsResponse,
                                  TrainingForm, TrainingView, TrainingList, Health, Limits, SubjectDetail,
                                  PhotoCheckForm, PhotoChecks]
_ERRORS = {"400": "malformed body", "401": "missing or unknown API key",
           "403": "a photo URI the tenant may not name",
           "404": "unknown subject or training (another tenant's look the same)",
           "409": "conflict (subject taken, adapter for another base model, cancel too late)",
           "408": "the body did not all arrive in time (serve.body_timeout_s)",
           "411": "Content-Length required", "413": "body too large", "415": "not multipart/form-data",
           "422": "a field breaks a limit (detail names it)", "429": "over the tenant's limits (Retry-After)",
           "500": "the adapter could not be used", "503": "at capacity (Retry-After)",
           "504": "past the request time limit"}
_GATE = ["408", "413", "429", "503"]  # what the gate may answer on any route it guards


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _responses(ok: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    out = dict(ok)
    for code in errors:
        out[code] = {"description": _ERRORS[code], "content": _json("ErrorBody")}
    return out


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    """What each route takes and answers, beyond what FastAPI saw."""
    png = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
    training = {"description": "the training", "content": _json("TrainingView")}
    return {
        ("/healthz", "get"): {"responses": {"200": {"description": "alive", "content": _json("Health")}}},
        ("/v1/subjects", "get"): {"responses": _responses(
            {"200": {"description": "the tenant's subjects", "content": _json("SubjectsResponse")}},
            ["401", "429"])},
        ("/v1/generate", "post"): {
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("GenerateRequest"), "example": GENERATE_EXAMPLE}}},
            "responses": _responses({"200": {
                "description": "the images: JSON (base64) by default, one PNG with `Accept: image/png`",
                "content": _json("GenerateResponse") | png}},
                ["401", "404", "409", "413", "422", "429", "500", "503", "504"])},
        ("/v1/trainings", "post"): {
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": _ref("TrainingForm"),
                "encoding": {"photos": {"contentType": "image/jpeg, image/png, image/webp"}}}}},
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string"},
                            "description": "the same key returns the first submission (200), "
                                           "not a new one"}],
            "responses": _responses({"202": training | {"description": "queued"},
                                     "200": training | {"description": "an earlier submission, same key"}},
                                    ["400", "401", "403", "409", "411", "413", "415", "422", "429"])},
        ("/v1/trainings", "get"): {"responses": _responses(
            {"200": {"description": "one page of the tenant's trainings, oldest first",
                     "content": _json("TrainingList")}}, ["401", "422"])},
        ("/v1/trainings/{training_id}", "get"): {"responses": _responses({"200": training}, ["401", "404"])},
        ("/v1/trainings/{training_id}", "delete"): {"responses": _responses(
            {"200": training | {"description": "cancelled"}}, ["401", "404", "409"])},
        ("/v1/limits", "get"): {"responses": _responses(
            {"200": {"description": "what the caller may ask", "content": _json("Limits")}}, ["401"])},
        ("/v1/subjects/{subject_id}", "get"): {"responses": _responses(
            {"200": {"description": "the version in detail", "content": _json("SubjectDetail")}},
            ["401", "404", "422"])},
        ("/v1/subjects/{subject_id}/versions/{version}/files/{name}", "get"): {"responses": _responses(
            {"200": {"description": "the file: weights (safetensors) or a picture (PNG)", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}} | png}},
            ["401", "404"])},
        ("/v1/photo-checks", "post"): {
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": _ref("PhotoCheckForm"),
                "encoding": {"photos": {"contentType": "image/jpeg, image/png, image/webp"}}}}},
            "responses": _responses(
                {"200": {"description": "each photo's check", "content": _json("PhotoChecks")}},
                ["400", "401", "415", "422"])},
    }


def openapi_document(app: Any) -> dict[str, Any]:
    """FastAPI's document for ``app`` completed with bodies, responses and security (module doc)."""
    doc = copy.deepcopy(app.openapi())
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in _MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    components["securitySchemes"] = SECURITY_SCHEMES
    extra = _operations()
    for path, methods in doc.get("paths", {}).items():
        for method, op in methods.items():
            op.update(copy.deepcopy(extra.get((path, method), {})))
            if (path, method) in _PUBLIC:
                op["security"] = []
                continue
            op["security"] = copy.deepcopy(_KEYED)
            responses = op.setdefault("responses", {})
            for code in _GATE:
                responses.setdefault(code, {"description": _ERRORS[code], "content": _json("ErrorBody")})
    return doc
