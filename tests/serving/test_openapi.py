"""The OpenAPI document is valid and complete: bodies, responses and the key schemes on every route."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from raydb.serving.openapi import SECURITY_SCHEMES, openapi_document


@pytest.fixture(scope="module")
def doc():
    from raydb.serving.deployments import http_app

    return openapi_document(http_app)


def test_the_document_is_valid_openapi(doc):
    validate(doc)  # raises naming the first violation, unresolvable $refs included


def test_every_route_but_health_takes_a_key_and_every_post_has_a_body(doc):
    operations = {(path, method): op for path, methods in doc["paths"].items()
                  for method, op in methods.items()}
    assert {("/v1/generate", "post"), ("/v1/subjects", "get"), ("/v1/trainings", "post"),
            ("/v1/trainings", "get"), ("/v1/trainings/{training_id}", "get"),
            ("/v1/trainings/{training_id}", "delete"), ("/healthz", "get"), ("/v1/limits", "get"),
            ("/v1/subjects/{subject_id}", "get"), ("/v1/photo-checks", "post"),
            ("/v1/subjects/{subject_id}/versions/{version}/files/{name}", "get")} <= operations.keys()
    assert not [key for key in operations if key[0].startswith("/ui")]  # the console's files: not API
    assert doc["components"]["securitySchemes"] == SECURITY_SCHEMES
    for (path, method), op in operations.items():
        assert op["security"] == ([] if path == "/healthz" else [{"bearerAuth": []}, {"apiKeyHeader": []}])
        if path != "/healthz":  # the gate guards it: its refusals are part of the route's answers
            assert {"408", "413", "429", "503"} <= op["responses"].keys(), (path, method)
        assert "200" in op["responses"] or "202" in op["responses"], (path, method)
        if method == "post":
            assert op["requestBody"]["required"] is True, path
    generate = operations[("/v1/generate", "post")]
    body = generate["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    request_schema = doc["components"]["schemas"]["GenerateRequest"]
    assert set(request_schema["required"]) == {"prompt"}  # no subject_id: the base model alone
    assert set(body["example"]) <= set(request_schema["properties"])
    assert set(generate["responses"]["200"]["content"]) == {"application/json", "image/png"}
    assert generate["responses"]["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    form = operations[("/v1/trainings", "post")]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form == {"$ref": "#/components/schemas/TrainingForm"}
    photos = doc["components"]["schemas"]["TrainingForm"]["properties"]["photos"]
    assert photos["items"] == {"type": "string", "format": "binary"}
