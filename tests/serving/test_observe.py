"""The ingress's observer on a plain FastAPI app (no Ray): request ids in error bodies and log
records, metrics by tenant, route template, status and 429 reason."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.testclient import TestClient

from raydb.serving import observe


def _app(recorded: list, monkeypatch) -> TestClient:
    monkeypatch.setattr(observe, "record",
                        lambda name, value=1.0, **tags: recorded.append((name, value, tags)))
    app = FastAPI()

    @app.get("/v1/things/{thing_id}")
    def thing(thing_id: str) -> dict:
        observe.note(tenant="t1", subject=thing_id)
        logging.getLogger("ray.serve.raydb.test").warning("looking at %s", thing_id)
        if thing_id == "busy":
            observe.note(reject_reason="rate")
            raise HTTPException(429, "too many requests", headers={"Retry-After": "1"})
        if thing_id == "missing":
            raise HTTPException(404, f"unknown thing {thing_id!r}")
        return {"id": thing_id}

    observe.install(app)
    return TestClient(app)


def test_ids_metrics_and_log_fields(monkeypatch, caplog):
    recorded: list = []
    client = _app(recorded, monkeypatch)
    caplog.handler.addFilter(observe.RequestLogFields())
    with caplog.at_level("WARNING", logger="ray.serve.raydb.test"):
        ok = client.get("/v1/things/rex", headers={"X-Request-ID": "rid-1"})
        missing = client.get("/v1/things/missing", headers={"X-Request-ID": "rid-2"})
        busy = client.get("/v1/things/busy", headers={"X-Request-ID": "rid-3"})
        unrouted = client.get("/nowhere", headers={"X-Request-ID": "rid-4"})
    assert ok.json() == {"id": "rex"}
    assert missing.status_code == 404
    assert missing.json() == {"detail": "unknown thing 'missing'", "request_id": "rid-2"}
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["request_id"] == "rid-3"
    assert unrouted.json()["request_id"] == "rid-4"
    counts = [(tags["tenant"], tags["route"], tags["status"]) for name, _, tags in recorded
              if name == "raydb_http_requests_total"]
    assert counts == [("t1", "/v1/things/{thing_id}", "200"), ("t1", "/v1/things/{thing_id}", "404"),
                      ("t1", "/v1/things/{thing_id}", "429"), ("unknown", "unmatched", "404")]
    assert [tags for name, _, tags in recorded if name == "raydb_http_rejections_total"] == [
        {"tenant": "t1", "route": "/v1/things/{thing_id}", "reason": "rate"}]
    seconds = [v for name, v, _ in recorded if name == "raydb_http_request_seconds"]
    assert len(seconds) == 4 and all(0 <= s < 30 for s in seconds)
    fields = [(r.request_id, r.tenant, r.subject) for r in caplog.records]
    assert fields == [("rid-1", "t1", "rex"), ("rid-2", "t1", "missing"), ("rid-3", "t1", "busy")]
    assert observe.current_request_id() is None  # nothing leaks out of a request


def test_the_gates_refusals_carry_the_request_id_tenant_route_and_reason(monkeypatch, make_cfg):
    """The observer sits outside the ingress's gate: a 429 or 503 the gate answers before any route
    runs still carries the request id, and is counted for the caller's tenant, the route template
    and the limit that refused it."""
    from raydb.serving.gate import Gate, GateMiddleware

    recorded: list = []
    monkeypatch.setattr(observe, "record",
                        lambda name, value=1.0, **tags: recorded.append((name, value, tags)))
    cfg = make_cfg(serve={"tenant_api_rate_per_s": 0.001, "tenant_api_burst": 1, "ingress_max_requests": 1})
    router = APIRouter()  # an included router, as Serve mounts the ingress's class-based routes

    @router.get("/v1/things/{thing_id}")
    def thing(thing_id: str) -> dict:
        return {"id": thing_id}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(GateMiddleware)
    observe.install(app)  # as the ingress wires them: the observer outermost
    app.state.raydb_gate = gate = Gate(cfg, lambda headers: (headers.get("x-api-key"), "key"))
    client = TestClient(app)
    ok = client.get("/v1/things/rex", headers={"X-API-Key": "t1", "X-Request-ID": "rid-1"})
    over = client.get("/v1/things/rex", headers={"X-API-Key": "t1", "X-Request-ID": "rid-2"})
    with gate.capacity.admit():  # the ingress's own bound taken: the next request gets 503
        full = client.get("/v1/things/max", headers={"X-API-Key": "t2", "X-Request-ID": "rid-3"})
    assert ok.status_code == 200
    assert over.status_code == 429 and over.json() == {
        "detail": "too many requests: at most 0.001 requests per second per tenant", "request_id": "rid-2"}
    assert full.status_code == 503 and full.json()["request_id"] == "rid-3"
    counts = [(tags["tenant"], tags["route"], tags["status"]) for name, _, tags in recorded
              if name == "raydb_http_requests_total"]
    assert counts == [("t1", "/v1/things/{thing_id}", "200"), ("t1", "/v1/things/{thing_id}", "429"),
                      ("t2", "/v1/things/{thing_id}", "503")]
    assert [tags for name, _, tags in recorded if name == "raydb_http_rejections_total"] == [
        {"tenant": "t1", "route": "/v1/things/{thing_id}", "reason": "rate"},
        {"tenant": "t2", "route": "/v1/things/{thing_id}", "reason": "ingress"}]
