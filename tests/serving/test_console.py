"""The console's server side without Ray: ``/ui`` under its Content-Security-Policy, and the ``/v1``
routes it adds — key first, the tenant's limits, tenant checks, no workspace paths — on a plain
FastAPI app with the ingress's own key check behind the ingress's gate. tests/console/test_browser.py
drives the real thing in Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zipfile
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from PIL import Image

from raydb.config import load_config
from raydb.console import STATIC, asset_names
from raydb.errors import RequestError
from raydb.registry import register_adapter
from raydb.serving.auth import KeyRing, hash_key, key_from_headers
from raydb.serving.console import CONTENT_SECURITY_POLICY, ConsoleEndpoint, ConsoleHeadersMiddleware, router
from raydb.serving.gate import Gate, GateMiddleware
from raydb.serving.limits import ImageWorkers
from raydb.storage import Storage
from raydb.trainings.validate import validate_submission

REPO = Path(__file__).resolve().parents[2]
KEYS = {"console-key-tenant-one": "t1", "console-key-tenant-two": "t2"}
ONE, TWO = {"X-API-Key": "console-key-tenant-one"}, {"Authorization": "Bearer console-key-tenant-two"}
PNG = b"\x89PNG\r\n\x1a\n"


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "white" if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def _register(tmp_path: Path, ws: str, sid: str, tenant: str, *, pictures: bool = True,
              exports: bool = False, weights: bytes | None = None) -> None:
    src = tmp_path / f"src-{sid}-{len(list(tmp_path.iterdir()))}"
    src.mkdir()
    weights = weights or sid.encode() * 8
    (src / "pytorch_lora_weights.safetensors").write_bytes(weights)
    if pictures:
        (src / "samples.png").write_bytes(_png((64, 32)))
        (src / "loss_curve.png").write_bytes(_png((40, 30)))
    meta = {"weights_sha256": hashlib.sha256(weights).hexdigest(),
            "subject": {"tenant": tenant, "instance_token": "sks",
                        "instance_prompt": "a photo of <b>sks</b> dog", "class_prompt": "a photo of a dog"},
            "base_model": {"pretrained": "tiny", "identity": "tiny-abc", "family": "sd",
                           "prediction_type": "epsilon"},
            "lora": {"rank": 4, "alpha": 4.0}, "training": {"max_steps": 3, "learning_rate": 0.01},
            "metrics": {"loss": 0.25, "steps": 3},
            "tune": {"hyperparameters": {"prior_loss_weight": 1.0}, "validation": {"val_score": 0.5},
                     "results_csv": f"{ws}/tune/{sid}/results.csv"}}
    (src / "adapter.json").write_text(json.dumps(meta))
    record = register_adapter(Storage(), ws, tenant, sid, str(src))
    if exports:  # as raydb export writes it: the file, then adapter.json listing it
        version = Path(record["uri"])
        (version / "lora_kohya.safetensors").write_bytes(b"kohya" + weights)
        meta = json.loads((version / "adapter.json").read_text())
        meta["exports"] = {"kohya": {"weights": "lora_kohya.safetensors"}}
        (version / "adapter.json").write_text(json.dumps(meta))


def _app(cfg, clock=time.monotonic) -> TestClient:
    """The console's router behind the ingress's gate, with the ingress's key check."""
    ring = KeyRing({hash_key(k): t for k, t in KEYS.items()})

    def caller(headers) -> tuple[str | None, str]:  # as deployments.IngressDeployment._caller
        key = key_from_headers(headers)
        tenant = ring.tenant_for(key)
        return tenant, "key" if tenant else ("invalid key" if key else "no key")

    def tenant_of(request: Request) -> str | None:  # the ingress's check (deployments._tenant)
        tenant = ring.tenant_for(key_from_headers(request.headers))
        if tenant is None:
            raise HTTPException(401, "missing or invalid API key")
        return tenant

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(GateMiddleware)
    app.add_middleware(ConsoleHeadersMiddleware)  # as the ingress: outside the gate
    app.state.raydb_gate = Gate(cfg, caller, clock=clock)
    app.state.raydb_console = ConsoleEndpoint(cfg, Storage(), tenant_of, ImageWorkers(1, 2))
    return TestClient(app, follow_redirects=False)


@pytest.fixture
def served(tmp_path, make_cfg):
    ws = str(tmp_path / "ws")
    _register(tmp_path, ws, "alice", "t1", exports=True)
    _register(tmp_path, ws, "alice", "t1", weights=b"second version", pictures=False)  # v0002
    _register(tmp_path, ws, "carol", "t2", pictures=False)
    cfg = make_cfg(workspace=ws, train={"resolution": 64},
                   service={"max_photos": 3, "max_photo_bytes": 60_000, "max_photo_pixels": 200 * 200})
    return cfg, _app(cfg)


# -- /ui --------------------------------------------------------------------------------------------
def test_every_console_response_carries_the_csp(served, make_cfg, tmp_path):
    cfg, client = served
    csp = CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    root = client.get("/ui")
    assert root.status_code == 307 and root.headers["location"] == "ui/"
    responses = [root, client.get("/ui/")]
    for name in sorted(asset_names()):
        resp = client.get(f"/ui/{name}")
        assert resp.status_code == 200 and resp.content == (STATIC / name).read_bytes(), name
        responses.append(resp)
    assert responses[1].content == (STATIC / "index.html").read_bytes()
    assert responses[1].headers["content-type"] == "text/html; charset=utf-8"
    assert client.get("/ui/app.js").headers["content-type"] == "text/javascript; charset=utf-8"
    missing = [client.get(p) for p in ("/ui/nope.js", "/ui/%2e%2e/__init__.py", "/ui/..%2F__init__.py",
                                       "/ui/static/app.js", "/ui/__init__.py", "/ui/sub/dir/")]
    assert [r.status_code for r in missing] == [404] * len(missing)
    assert [str(r.url).split("/", 3)[-1][:3] for r in missing] == ["ui/"] * len(missing)
    # FastAPI's own answers under /ui (no route wrote them) carry it too
    not_allowed = [client.post("/ui/"), client.delete("/ui/app.js"), client.put("/ui")]
    assert [r.status_code for r in not_allowed] == [405] * 3
    missing += not_allowed
    off = _app(make_cfg(workspace=str(tmp_path / "off"), serve={"console": False}))
    off_responses = [off.get("/ui"), off.get("/ui/"), off.get("/ui/app.js")]
    assert [r.status_code for r in off_responses] == [404] * 3
    for resp in responses + missing + off_responses:
        assert resp.headers["content-security-policy"] == csp, resp.url
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["x-frame-options"] == "DENY"


def test_a_console_page_that_fails_still_carries_the_csp(served, monkeypatch):
    """An exception in a /ui handler: a plain 500 with the security headers (Starlette's own 500 is
    written outside every middleware of ours), and the exception still reaches the server."""
    from raydb.serving import console

    cfg, client = served

    def broken(name: str):
        raise OSError(f"cannot read {name}")

    monkeypatch.setattr(console, "asset", broken)
    with pytest.raises(OSError, match="cannot read app.js"):
        client.get("/ui/app.js")  # the test client re-raises what the server would log
    quiet = TestClient(client.app, raise_server_exceptions=False)
    resp = quiet.get("/ui/app.js")
    assert resp.status_code == 500 and resp.text == "Internal Server Error"
    assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert resp.headers["x-frame-options"] == "DENY"
    assert quiet.get("/v1/limits", headers=ONE).status_code == 200  # the next request is served


def test_console_defaults_to_on_exactly_when_auth_is_on():
    on = load_config(data={"serve": {}})
    off = load_config(data={"serve": {"auth": "none"}})
    forced = load_config(data={"serve": {"auth": "none", "console": True}})
    assert (on.serve.console_enabled, off.serve.console_enabled, forced.serve.console_enabled) == \
        (True, False, True)


def test_console_files_are_plain_modules_that_never_write_html():
    """No markup from strings anywhere (every tenant string goes in as text), no inline script or
    style for the CSP to allow, and every imported module is shipped."""
    sources = {name: (STATIC / name).read_text() for name in asset_names()}
    for name, text in sources.items():
        if name.endswith(".js"):
            for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                           "new Function", "setAttribute(\"on", "javascript:"):
                assert banned not in text, (name, banned)
            for imported in re.findall(r'from "\./([^"]+)"', text):
                assert imported in sources, (name, imported)
    html = sources["index.html"]
    assert re.findall(r"<script[^>]*>", html) == ['<script type="module" src="app.js">']
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    assert re.findall(r'(?:src|href)="([^"#]+)"', html) == ["style.css", "app.js"]
    assert not re.search(r"https?://", "".join(sources.values()))  # nothing from another origin


def test_the_wheel_carries_the_console(tmp_path):
    """The static files are package data: a built wheel has every one of them."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("raydb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"raydb/console/static/{n}" for n in asset_names()} <= names
    assert "raydb/console/__init__.py" in names and "raydb/serving/console.py" in names


# -- /v1 routes ---------------------------------------------------------------------------------------
def _data_routes() -> list[tuple[str, str]]:
    """Every /v1 route of the console router, with its path parameters filled in."""
    fill = {"subject_id": "alice", "version": "v0001", "name": "samples.png"}
    out = []
    for route in router.routes:
        if route.path.startswith("/v1/"):
            for method in route.methods:
                out.append((method, re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], route.path)))
    return sorted(out)


def test_no_console_route_serves_data_without_the_key(served):
    cfg, client = served
    routes = _data_routes()
    assert len(routes) == 4, routes  # a new route joins this test by itself
    for method, path in routes:
        for headers in ({}, {"X-API-Key": "wrong-key-0123456789"}, {"Authorization": "Basic abc"}):
            resp = client.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert "alice" not in resp.text and "carol" not in resp.text
    photo = [("photos", ("p.png", _png((64, 64)), "image/png"))]
    answers = {path: client.request(method, path, headers=ONE, files=photo if method == "POST" else None)
               for method, path in routes}
    assert [r.status_code for r in answers.values()] == [200] * len(routes), \
        {p: r.text for p, r in answers.items()}


def test_subjects_and_files_are_the_tenants_own(served):
    cfg, client = served
    detail = client.get("/v1/subjects/alice", headers=ONE).json()
    assert (detail["version"], detail["latest_version"]) == ("v0002", "v0002")
    assert [v["version"] for v in detail["versions"]] == ["v0001", "v0002"]
    assert all(v["registered_at"] for v in detail["versions"])
    assert detail["subject"]["instance_prompt"] == "a photo of <b>sks</b> dog"
    assert detail["tune"] == {"hyperparameters": {"prior_loss_weight": 1.0}, "validation": {"val_score": 0.5}}
    assert cfg.workspace not in json.dumps(detail)  # the search's results path stays in the workspace
    # the base model's family, never where the operator keeps it nor its identity
    assert detail["base_model"] == {"family": "sd", "prediction_type": "epsilon"}
    assert "tiny-abc" not in json.dumps(detail) and "pretrained" not in json.dumps(detail)
    v1 = client.get("/v1/subjects/alice", params={"version": "v0001"}, headers=ONE).json()
    assert {f["name"]: f["format"] for f in v1["files"]} == {
        "pytorch_lora_weights.safetensors": "diffusers", "lora_kohya.safetensors": "kohya",
        "loss_curve.png": None, "samples.png": None}
    assert [f["name"] for f in detail["files"]] == ["pytorch_lora_weights.safetensors"]

    base = "/v1/subjects/alice/versions/v0001/files"
    weights = client.get(f"{base}/pytorch_lora_weights.safetensors", headers=ONE)
    assert weights.content == b"alice" * 8
    assert weights.headers["content-disposition"] == \
        'attachment; filename="alice-v0001-pytorch_lora_weights.safetensors"'
    assert client.get(f"{base}/lora_kohya.safetensors", headers=ONE).content == b"kohya" + b"alice" * 8
    samples = client.get(f"{base}/samples.png", headers=ONE)
    assert samples.headers["content-type"] == "image/png" and samples.content.startswith(PNG)
    assert Image.open(io.BytesIO(samples.content)).size == (64, 32)

    # another tenant's subject reads exactly like a missing one, for every route and file
    for path in ("/v1/subjects/alice", f"{base}/samples.png", f"{base}/pytorch_lora_weights.safetensors"):
        theirs = client.get(path, headers=TWO)
        nobody = client.get(path.replace("alice", "nobody"), headers=TWO)
        assert theirs.status_code == nobody.status_code == 404
        assert theirs.json()["detail"] == nobody.json()["detail"].replace("nobody", "alice")
    assert client.get("/v1/subjects/carol", headers=ONE).status_code == 404
    assert client.get("/v1/subjects/carol", headers=TWO).json()["files"][0]["format"] == "diffusers"
    refused = ["/v1/subjects/alice?version=v0009", "/v1/subjects/alice?version=..",
               f"{base}/adapter.json", f"{base}/CLAIM", f"{base}/..%2Fowner.json",
               "/v1/subjects/alice/versions/v0002/files/samples.png",  # v0002 has no pictures
               "/v1/subjects/alice/versions/v0002/files/lora_kohya.safetensors",  # nor an export
               "/v1/subjects/alice/versions/latest/files/samples.png", "/v1/subjects/..%2F..%2Fetc"]
    for path in refused:
        assert client.get(path, headers=ONE).status_code == 404, path


def test_console_routes_are_under_the_tenants_limits(served):
    """The gate's ``api`` bucket holds the console's routes and files, per tenant (and per client
    address for a caller without a valid key); photo checks are ``upload``s, body cap included."""
    cfg, _ = served
    now = [0.0]
    limited = cfg.model_copy(deep=True)
    limited.serve.tenant_api_rate_per_s, limited.serve.tenant_api_burst = 1.0, 2
    limited.service.max_upload_bytes = 2048
    client = _app(limited, clock=lambda: now[0])
    paths = ["/v1/limits", "/v1/subjects/alice", "/v1/subjects/alice/versions/v0001/files/samples.png"]
    assert [client.get(p, headers=ONE).status_code for p in paths] == [200, 200, 429]
    refused = client.get("/v1/limits", headers=ONE)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert client.get("/v1/subjects/carol", headers=TWO).status_code == 200  # its own bucket
    now[0] += 1.0
    assert client.get(paths[2], headers=ONE).status_code == 200
    # the console's files too: a caller without a key is held to its address's bucket
    files = [client.get(p) for p in ("/ui/", "/ui/app.js", "/ui/api.js")]
    assert [r.status_code for r in files] == [200, 200, 429]
    assert files[2].headers["content-security-policy"] == CONTENT_SECURITY_POLICY  # the gate's 429 too
    assert "content-security-policy" not in refused.headers  # the API's answers are not pages
    now[0] += 10.0
    assert client.get("/v1/limits").status_code == 401  # the key is checked before anything is read
    too_big = [("photos", ("p.png", b"x" * 4096, "image/png"))]
    big = client.post("/v1/photo-checks", headers=TWO, files=too_big)
    assert big.status_code == 413 and big.json()["detail"][0]["loc"] == ["body", "photos"]


def test_limits_describe_what_the_server_accepts(served):
    cfg, client = served
    limits = client.get("/v1/limits", headers=ONE).json()
    assert limits["tenant"] == "t1" and limits["auth"] == "api_key"
    assert limits["generate"] == {"max_inference_steps": 50, "default_inference_steps": 25, "max_size": 768,
                                  "max_images": 4, "max_prompt_chars": 500}
    t = limits["training"]
    assert (t["max_photos"], t["max_photo_bytes"], t["min_photo_side"], t["resolution"]) == \
        (3, 60_000, 32, 64)
    by_key = {o["key"]: o for o in t["overrides"]}
    assert list(by_key) == cfg.service.allowed_overrides
    assert by_key["train.max_steps"] | {"description": ""} == {
        "key": "train.max_steps", "label": "Max Steps (train.max_steps)", "type": "integer",
        "default": cfg.train.max_steps, "minimum": 1, "exclusive_minimum": None, "maximum": 2000,
        "enum": None, "description": ""}
    # a choice is offered as its choices (the console draws a select, not a number box)
    assert (by_key["prior.mode"]["type"], by_key["prior.mode"]["enum"]) == ("string", ["images", "model"])
    assert by_key["train.learning_rate"]["exclusive_minimum"] == 0.0
    assert by_key["tune"]["type"] == "boolean"
    # every maximum the submission enforces (trainings/validate.over_limits), not just the schema's
    assert by_key["train.resolution"]["maximum"] == cfg.service.max_resolution == 1024
    assert by_key["lora.rank"]["maximum"] == min(cfg.service.max_lora_rank, cfg.serve.max_lora_rank)


def test_photo_checks_say_per_photo_what_a_training_would(served):
    """Each photo's message is the one POST /v1/trainings gives for that photo alone."""
    cfg, client = served
    photos = [("ok.png", _png((64, 64))), ("notes.png", b"plain text"), ("tiny.png", _png((20, 20))),
              ("wide.png", _png((400, 120))), ("empty.jpg", b"")]
    resp = client.post("/v1/photo-checks", headers=ONE,
                       files=[("photos", (n, d, "image/png")) for n, d in photos[:3]])
    rows = resp.json()["photos"]
    assert [(r["name"], r["ok"]) for r in rows] == \
        [("ok.png", True), ("notes.png", False), ("tiny.png", False)]
    assert (rows[0]["width"], rows[0]["height"], rows[0]["error"]) == (64, 64, None)
    resp = client.post("/v1/photo-checks", headers=ONE,
                       files=[("photos", (n, d, "image/png")) for n, d in photos[3:]])
    rows += resp.json()["photos"]
    for (name, data), row in zip(photos[1:], rows[1:], strict=True):
        with pytest.raises(RequestError) as err:
            validate_submission({"subject_id": "x", "instance_prompt": "a sks dog", "class_prompt": "a dog"},
                                [(name, data)], cfg, tenant="t1", training_id="t", photos_uri="/unused",
                                storage=Storage())
        assert err.value.message.endswith(row["error"]), (name, err.value.message, row["error"])
    # the training's resolution raises the smallest side (64 px photo, 256 px training: 128 needed)
    big = client.post("/v1/photo-checks", headers=ONE, data={"resolution": "256"},
                      files=[("photos", photos[0])]).json()["photos"][0]
    assert not big["ok"] and ">= 128 px" in big["error"]
    for data, status, field in [({"resolution": "12"}, 422, "resolution"),
                                ({"resolution": "1032"}, 422, "resolution"),
                                ({"colour": "red"}, 422, "colour"),
                                ({}, 422, "photos")]:
        resp = client.post("/v1/photo-checks", headers=ONE, data=data,
                           files=[] if field == "photos" else [("photos", photos[0])])
        if field == "photos":  # no file at all: not multipart, refused before any check
            assert resp.status_code == 415
            continue
        assert resp.status_code == status and resp.json()["detail"][0]["loc"] == ["body", field], resp.text
    four = [("photos", (f"p{i}.png", photos[0][1], "image/png")) for i in range(4)]
    assert client.post("/v1/photo-checks", headers=ONE, files=four).json()["detail"][0]["msg"] == \
        "at most 3 photos, got 4"
