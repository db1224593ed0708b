"""The ingress's gate without Ray: every route under its tenant's limits, the ingress's own bound,
body caps and deadlines, the audit log, the image workers (issue 24, item 2).

The app here is the gate, the real ``/v1/trainings`` routes (a fake Jobs API) and stand-ins for
``/v1/generate`` (a "batch" is an ``asyncio.sleep``) and the read-only routes; the Serve ingress
applies the same :class:`~raydb.serving.gate.Gate` (tests/serving/test_deployments.py runs it over
Serve). Concurrency is made with events the routes wait on, and the two tests about slow bodies
run a real HTTP server (uvicorn in a thread) with raw sockets trickling bytes, bounded in time and
count. Every asynchronous test is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request

from raydb.cluster import free_port
from raydb.serving.audit import AuditLog, note
from raydb.serving.gate import Gate, GateMiddleware, route_class, route_path
from raydb.serving.limits import ImageWorkers, ImageWorkersBusy
from raydb.serving.training_routes import TrainingsEndpoint, router
from raydb.storage import Storage
from tests.helpers.images import demo_photos
from tests.helpers.trainings import FakeJobs

KEYS = {"key-one": "t1", "key-two": "t2", "key-three": "t3"}
TIMEOUT = 30  # seconds any one asynchronous test may take


def _caller(headers) -> tuple[str | None, str]:
    key = headers.get("x-api-key")
    if key is None:
        return None, "no key"
    tenant = KEYS.get(key)
    return tenant, "key" if tenant else "invalid key"


def _tenant(request: Request) -> str:
    tenant = KEYS.get(request.headers.get("x-api-key", ""))
    if tenant is None:
        raise HTTPException(401, "missing or invalid API key")
    return tenant


def gated_app(cfg, *, audit: AuditLog | None = None, clock=time.monotonic) -> FastAPI:
    """The gate in front of the trainings routes and stand-ins for the ingress's own routes.

    ``POST /v1/generate`` reads its JSON body, waits ``hold`` (an asyncio.Event name in
    ``app.state.events``) or ``batch_s`` seconds, and fails with ``fail`` (a status) or ``crash``.
    """
    app = FastAPI()
    app.include_router(router)
    app.add_middleware(GateMiddleware)
    app.state.raydb_gate = Gate(cfg, _caller, audit=audit, clock=clock)
    app.state.raydb_trainings = TrainingsEndpoint(cfg, Storage(), _tenant, jobs=FakeJobs(), background=False)
    app.state.events = {}

    @app.post("/v1/generate")
    async def generate(request: Request) -> dict:
        body = json.loads(await request.body())
        note(request, subject_id=body.get("subject_id"), prompt=body.get("prompt"))
        if body.get("hold"):
            await app.state.events.setdefault(body["hold"], asyncio.Event()).wait()
        await asyncio.sleep(body.get("batch_s", 0.0))
        if body.get("crash"):
            raise RuntimeError("the replica fell over")
        if body.get("fail"):
            raise HTTPException(body["fail"], "refused by the route")
        return {"ok": True, "tenant": _tenant(request)}

    @app.get("/v1/subjects")
    async def subjects(request: Request, hold: str | None = None) -> dict:
        if hold:
            await app.state.events.setdefault(hold, asyncio.Event()).wait()
        return {"subjects": [], "tenant": _tenant(request)}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def _key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _until(predicate, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- classes of routes ---------------------------------------------------------------------------------
def test_route_classes_cover_every_route_but_healthz():
    assert route_class("POST", "/v1/generate") == "generate"
    assert route_class("POST", "/v1/trainings") == route_class("post", "/v1/trainings/") == "upload"
    assert route_class("POST", "/v1/photo-checks") == "upload"
    for method, path in [("GET", "/v1/subjects"), ("GET", "/v1/trainings"), ("DELETE", "/v1/trainings/x"),
                         ("GET", "/ui"), ("GET", "/ui/app.js"), ("GET", "/docs"), ("GET", "/v1/generate"),
                         ("GET", "/no/such/route"), ("POST", "/healthz")]:
        assert route_class(method, path) == "api", (method, path)
    assert route_class("GET", "/healthz") is None and route_class("HEAD", "/healthz") is None
    assert route_path({"path": "/faults/v1/generate", "root_path": "/faults"}) == "/v1/generate"
    assert route_path({"path": "/v1/generate", "root_path": ""}) == "/v1/generate"


# -- per-tenant limits on every route ------------------------------------------------------------------
def test_every_route_is_under_its_tenants_rate_and_the_classes_are_apart(make_cfg):
    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    cfg = make_cfg(serve={"tenant_api_rate_per_s": 1.0, "tenant_api_burst": 3, "tenant_rate_per_s": 1.0,
                          "tenant_burst": 2})
    app = gated_app(cfg, clock=clock)

    async def main():
        async with _client(app) as c:
            subjects = [(await c.get("/v1/subjects", headers=_key("key-one"))).status_code for _ in range(3)]
            over = await c.get("/v1/trainings", headers=_key("key-one"))  # same bucket: every api route
            ui = await c.get("/ui", headers=_key("key-one"))  # a route the app does not even have
            gen = [(await c.post("/v1/generate", json={}, headers=_key("key-one"))).status_code
                   for _ in range(3)]
            other = await c.get("/v1/subjects", headers=_key("key-two"))
            health = [(await c.get("/healthz")).status_code for _ in range(10)]
            anon = [(await c.get("/v1/subjects")).status_code for _ in range(4)]  # no key: per address
            clock.now += 1.0
            again = await c.get("/v1/subjects", headers=_key("key-one"))
            return subjects, over, ui, gen, other, health, anon, again

    subjects, over, ui, gen, other, health, anon, again = _run(main())
    assert subjects == [200, 200, 200]
    assert over.status_code == 429 and over.headers["Retry-After"] == "1"
    assert over.json() == {"detail": "too many requests: at most 1 requests per second per tenant",
                           "request_id": None}  # the id: the observer (tests/serving/test_observe.py)
    assert ui.status_code == 429
    assert gen == [200, 200, 429]  # /v1/generate has its own bucket (burst 2)
    assert other.status_code == 200 and health == [200] * 10
    assert anon == [401, 401, 401, 429]  # refused by the route, limited by the gate
    assert again.status_code == 200  # a token came back after a second


def test_concurrency_caps_per_class_and_uploads_count_as_api_requests_too(make_cfg):
    cfg = make_cfg(serve={"tenant_api_max_concurrent": 3, "tenant_max_uploads": 1, "tenant_max_concurrent": 2,
                          "tenant_rate_per_s": 0, "tenant_api_rate_per_s": 0})
    app = gated_app(cfg)
    gate = app.state.raydb_gate

    async def main():
        async with _client(app) as c:
            held = [asyncio.ensure_future(c.post("/v1/generate", json={"hold": "g"}, headers=_key("key-one")))
                    for _ in range(2)]
            await _until(lambda: gate.limiters["generate"].in_flight("t1") == 2, "two generate requests")
            third = await c.post("/v1/generate", json={}, headers=_key("key-one"))
            elsewhere = await c.post("/v1/generate", json={}, headers=_key("key-two"))

            async def slow_upload():  # an upload whose body waits for an event
                async def body():
                    yield b"--x\r\n"
                    await app.state.events.setdefault("u", asyncio.Event()).wait()
                    yield b"--x--\r\n"
                return await c.post("/v1/trainings", content=body(), headers=_key("key-one") | {
                    "content-type": "multipart/form-data; boundary=x"})

            upload = asyncio.ensure_future(slow_upload())
            await _until(lambda: gate.uploads.in_flight("t1") == 1, "one upload")
            second_upload = await c.post("/v1/trainings", files={"photos": ("a.png", b"x")},
                                         headers=_key("key-one"))
            api = [asyncio.ensure_future(c.get("/v1/subjects?hold=s", headers=_key("key-one")))
                   for _ in range(2)]
            await _until(lambda: gate.limiters["api"].in_flight("t1") == 3, "an upload and two api requests")
            fourth = await c.get("/v1/subjects", headers=_key("key-one"))
            for event in ("g", "u", "s"):
                app.state.events[event].set()
            return ([r.status_code for r in await asyncio.gather(*held)], third, elsewhere, second_upload,
                    [r.status_code for r in await asyncio.gather(*api)] + [fourth.status_code],
                    (await upload).status_code)

    held, third, elsewhere, second_upload, api, upload = _run(main())
    assert held == [200, 200] and third.status_code == 429 and elsewhere.status_code == 200
    assert third.json()["detail"] == "too many requests: at most 2 requests in flight per tenant"
    assert second_upload.status_code == 429
    assert "at most 1 uploads in flight per tenant" in second_upload.json()["detail"]
    assert api == [200, 200, 429]  # the held upload took one of t1's 3 api slots
    assert upload == 400  # not a well-formed multipart body: answered by the route, not the gate
    assert all(lim.in_flight("t1") == 0 for lim in [*gate.limiters.values(), gate.uploads])


def test_a_failing_request_gives_back_its_tenant_slot(make_cfg):
    """Deliberate break caught: a gate that releases slots only on success (the cap of 2 would
    turn the third failure into a 429)."""
    cfg = make_cfg(serve={"tenant_max_concurrent": 2, "tenant_rate_per_s": 0})
    app = gated_app(cfg)

    async def main():
        async with _client(app) as c:
            out = []
            for body in [{"fail": 404}, {"fail": 503}, {"crash": True}, {"fail": 422}, {}]:
                try:
                    out.append((await c.post("/v1/generate", json=body, headers=_key("key-one"))).status_code)
                except RuntimeError:
                    out.append("crash")  # ASGITransport re-raises the app's error
            return out

    assert _run(main()) == [404, 503, "crash", 422, 200]
    assert app.state.raydb_gate.limiters["generate"].in_flight("t1") == 0
    assert app.state.raydb_gate.capacity.in_use == 0


def test_the_ingress_bound_answers_503_with_a_clear_body(make_cfg):
    cfg = make_cfg(serve={"ingress_max_requests": 2, "tenant_rate_per_s": 0})
    app = gated_app(cfg)

    async def main():
        async with _client(app) as c:
            held = [asyncio.ensure_future(c.post("/v1/generate", json={"hold": "g"}, headers=_key(k)))
                    for k in ("key-one", "key-two")]
            await _until(lambda: app.state.raydb_gate.capacity.in_use == 2, "two requests in progress")
            full = await c.get("/v1/subjects", headers=_key("key-three"))
            health = await c.get("/healthz")
            app.state.events["g"].set()
            await asyncio.gather(*held)
            after = await c.get("/v1/subjects", headers=_key("key-three"))
            return full, health, after

    full, health, after = _run(main())
    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
    assert full.json() == {"detail": "the server is at capacity (2 requests in progress); retry",
                           "request_id": None}
    assert health.status_code == 200 and after.status_code == 200


# -- bodies ----------------------------------------------------------------------------------------------
def test_bodies_over_their_cap_are_refused_before_or_as_soon_as_they_pass_it(make_cfg):
    """The ingress's byte limit: a declared length over it is refused before a byte is read, a
    chunked body as soon as it passes it; uploads have their own cap and name the 'photos' field."""
    cfg = make_cfg(serve={"max_body_bytes": 1024, "tenant_rate_per_s": 0},
                   service={"max_upload_bytes": 4096})
    app = gated_app(cfg)
    sent: list[int] = []

    def chunks(n: int, size: int):
        async def body():
            for _ in range(n):
                sent.append(size)
                yield b" " * size
        return body()

    async def main():
        async with _client(app) as c:
            declared = await c.post("/v1/generate", headers=_key("key-one") | {"content-length": "20000000"},
                                    content=chunks(3, 600))
            read_before = len(sent)
            chunked = await c.post("/v1/generate", headers=_key("key-one"), content=chunks(5, 600))
            upload = await c.post("/v1/trainings", headers=_key("key-one") | {"content-length": str(10**9)},
                                  content=b"")
            small_upload = await c.post("/v1/trainings", headers=_key("key-one"),
                                        files={"photos": ("a.png", b"x" * 2000)})
            fits = await c.post("/v1/generate", headers=_key("key-one"), json={"prompt": "x" * 900})
            return declared, read_before, chunked, upload, small_upload, fits

    declared, read_before, chunked, upload, small_upload, fits = _run(main())
    assert declared.status_code == 413 and read_before == 0
    assert declared.json()["detail"] == "request body of 20000000 bytes; at most 1024 allowed"
    assert chunked.status_code == 413 and chunked.json()["detail"] == "request body over 1024 bytes"
    assert len(sent) == 2  # the third 600-byte chunk was never asked for
    assert upload.status_code == 413
    assert upload.json()["detail"][0]["loc"] == ["body", "photos"]
    assert "at most 4096" in upload.json()["detail"][0]["msg"]
    assert small_upload.status_code == 422  # 2 kB is within the upload cap (and no image)
    assert fits.status_code == 200


@contextmanager
def _http_server(app):
    """``app`` on a real HTTP server (uvicorn in a thread) on a free port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _status_of(conn: socket.socket) -> int | None:
    """The status of the answer waiting on ``conn`` (None when none has come yet)."""
    conn.setblocking(False)
    try:
        head = conn.recv(4096)
    except BlockingIOError:
        return None
    finally:
        conn.setblocking(True)
    return int(head.split(b" ", 2)[1]) if head else -1


def test_slow_uploads_of_one_tenant_do_not_delay_another_tenants_generate(make_cfg):
    """72 uploads of t1 trickling 1 byte/s (the review's attack): t1 holds at most
    ``tenant_max_uploads`` of them, the others are answered 429 at once; t2's generate (one
    0.2 s "batch") is answered while they trickle, without waiting for them; the two held uploads
    end with 408 at ``serve.body_timeout_s``, and t1's slots are free again. Bounded: 72
    connections, about 3 s."""
    cfg = make_cfg(serve={"body_timeout_s": 2.0, "tenant_max_uploads": 2, "tenant_api_rate_per_s": 0,
                          "tenant_api_max_concurrent": 100, "tenant_rate_per_s": 0})
    app = gated_app(cfg)
    head = (b"POST /v1/trainings HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: key-one\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 5000\r\n\r\n")
    with _http_server(app) as port:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(72)]
        statuses: dict[int, int] = {}
        try:
            for conn in conns:  # a well-formed start, then a field value 1 byte at a time
                conn.sendall(head + b'--x\r\nContent-Disposition: form-data; name="subject_id"\r\n\r\na')
            start = time.monotonic()
            while len(statuses) < 70 and time.monotonic() - start < 10:  # the refusals come at once
                for i, conn in enumerate(conns):
                    if i not in statuses and (status := _status_of(conn)) is not None:
                        statuses[i] = status
                time.sleep(0.05)
            assert sorted(statuses.values()) == [429] * 70, statuses
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                sent = time.monotonic()
                other = client.post("/v1/generate", headers=_key("key-two"), json={"batch_s": 0.2})
                latency = time.monotonic() - sent
            held = [i for i in range(72) if i not in statuses]
            assert other.status_code == 200 and all(_status_of(conns[i]) is None for i in held)
            assert latency < 1.5, f"another tenant's generate took {latency:.2f} s"  # not the 2 s deadline
            while len(statuses) < 72 and time.monotonic() - start < 10:  # 1 byte/s until the deadline
                for i in held:
                    if i not in statuses:
                        status = _status_of(conns[i])
                        if status is None:
                            conns[i].sendall(b"a")
                        else:
                            statuses[i] = status
                time.sleep(1.0 if len(statuses) < 72 else 0)
            assert [statuses[i] for i in held] == [408, 408]
            assert time.monotonic() - start < 6
        finally:
            for conn in conns:
                conn.close()
    gate = app.state.raydb_gate
    assert gate.uploads.in_flight("t1") == 0 and gate.limiters["api"].in_flight("t1") == 0


def test_a_body_that_stops_coming_is_answered_408_and_frees_its_slots(make_cfg):
    cfg = make_cfg(serve={"body_timeout_s": 0.5, "tenant_max_concurrent": 1, "tenant_rate_per_s": 0})
    app = gated_app(cfg)
    with _http_server(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-API-Key: key-one\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sub")
            answer = conn.recv(4096)  # nothing more is sent
        assert answer.split(b" ", 2)[1] == b"408", answer
        assert b"did not arrive within 0.5 s (5 bytes came)" in answer
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.post("/v1/generate", headers=_key("key-one"), json={}).status_code == 200


# -- audit -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", [False, True])
def test_the_audit_log_says_who_did_what_when_and_how_it_ended(make_cfg, tmp_path, prompts):
    audit_dir = tmp_path / "audit"
    cfg = make_cfg(serve={"audit_dir": str(audit_dir), "audit_prompts": prompts, "tenant_rate_per_s": 0,
                          "tenant_max_concurrent": 1})
    app = gated_app(cfg)

    async def main():
        async with _client(app) as c:
            await c.post("/v1/generate", json={"subject_id": "alice", "prompt": "a secret plan"},
                         headers=_key("key-one"))
            await c.post("/v1/generate", json={"fail": 404, "subject_id": "carol"}, headers=_key("key-one"))
            await c.get("/v1/subjects", headers=_key("key-two"))
            await c.get("/v1/subjects", headers=_key("not-a-key"))
            await c.get("/healthz")

    _run(main())
    app.state.raydb_gate.audit.flush()
    t1 = [json.loads(line) for line in (audit_dir / "t1.jsonl").read_text().splitlines()]
    assert [(r["method"], r["path"], r["status"], r["outcome"], r["subject_id"]) for r in t1] == [
        ("POST", "/v1/generate", 200, "ok", "alice"), ("POST", "/v1/generate", 404, "refused", "carol")]
    assert t1[0]["tenant"] == "t1" and t1[0]["caller"] == "key" and t1[0]["client"] == "127.0.0.1"
    assert t1[0]["time"].endswith("Z") and isinstance(t1[0]["duration_ms"], int)
    assert ("prompt" in t1[0]) is prompts and (t1[0].get("prompt") == "a secret plan") is prompts
    t2 = [json.loads(line) for line in (audit_dir / "t2.jsonl").read_text().splitlines()]
    assert [(r["path"], r["status"]) for r in t2] == [("/v1/subjects", 200)]
    anon = [json.loads(line) for line in (audit_dir / "_anonymous.jsonl").read_text().splitlines()]
    assert [(r["tenant"], r["caller"], r["status"]) for r in anon] == [(None, "invalid key", 401)]
    text = "".join(p.read_text() for p in audit_dir.iterdir())
    assert "key-one" not in text and "not-a-key" not in text and "healthz" not in text


# -- image workers -------------------------------------------------------------------------------------------
def test_image_workers_run_apart_and_refuse_beyond_their_queue():
    workers = ImageWorkers(workers=1, queue=1)
    release = threading.Event()
    threads: list[str] = []

    def work(i: int) -> int:
        threads.append(threading.current_thread().name)
        release.wait(TIMEOUT)
        return i

    async def main():
        running = [asyncio.ensure_future(workers.run(work, i)) for i in range(2)]  # one runs, one waits
        await _until(lambda: workers.pending == 2, "two calls taken")
        with pytest.raises(ImageWorkersBusy, match="busy checking other uploads") as err:
            await workers.run(work, 3)
        assert err.value.retry_after == 5
        release.set()
        return await asyncio.gather(*running)

    try:
        assert _run(main()) == [0, 1]
    finally:
        workers.close()
    assert workers.pending == 0 and all(name.startswith("raydb-images") for name in threads)


def test_a_submission_checks_its_photos_on_the_image_workers(make_cfg, monkeypatch):
    """Deliberate break caught: create_training calling the service through asyncio.to_thread
    (the default executor every other route's blocking work shares)."""
    cfg = make_cfg(serve={"tenant_api_rate_per_s": 0}, train={"resolution": 64}, prior={"enabled": False})
    app = gated_app(cfg)
    endpoint = app.state.raydb_trainings
    seen: list[str] = []
    submit = endpoint.service.submit

    def recording_submit(*args):
        seen.append(threading.current_thread().name)
        return submit(*args)

    monkeypatch.setattr(endpoint.service, "submit", recording_submit)

    async def main():
        async with _client(app) as c:
            return await c.post("/v1/trainings", headers=_key("key-one"), files=[
                ("subject_id", (None, "rex")), ("instance_prompt", (None, "a photo of sks toy")),
                ("class_prompt", (None, "a photo of a toy")),
                *[("photos", (name, data, "image/png")) for name, data in demo_photos(3, 96)]])

    resp = _run(main())
    assert resp.status_code == 202, resp.text
    assert seen and seen[0].startswith("raydb-images")
