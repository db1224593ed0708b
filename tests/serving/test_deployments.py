"""Serving: unit tests for auth/validation, then one real Serve app over HTTP (integration tier).

The Ray tests share one module-scoped app: three trained subjects in two tenants (alice and bob of
t1, carol of t2), six random-adapter subjects of t1 (``s1``..``s6``) and ``wide`` (rank 16, above
the app's ``max_lora_rank=8``), t2's own ``alice`` (subject ids are per tenant), plus two bad
registry entries of t1 — ``alien`` (adapter.json names
another base model) and ``broken`` (weights file corrupted). ``max_num_models_per_replica=2`` and one
diffusion replica, so cycling three subjects must evict and reload adapters; ``max_batch_size=8``.
Each tenant may have ``TENANT_CAP`` (= one batch) requests in flight; the rate limit is off here (it
is unit-tested with a fake clock), and tests that send more at once hold a client-side semaphore.

Batched images are compared with their one-by-one results within a tolerance (:func:`_close`): the
replica runs fp32, where a batched kernel may round the last bits differently (seen: at most 2 of
the 12,288 pixel values of a 64x64 image differ, by one level); subjects differ by far more.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from raydb.cluster import free_port
from raydb.config import ServeConfig, load_config
from raydb.errors import RequestError
from raydb.serving.api import GenerateRequest, final_prompt, validate_generate
from raydb.serving.auth import KeyRing, hash_key, key_from_headers, parse_env_keys

REPO = Path(__file__).resolve().parents[2]
KEY_A, KEY_B = "test-key-tenant-one", "test-key-tenant-two"
KEY_ENV = "test-key-from-env"  # a tenant-one key given in plain text through the environment
SUBJECTS = [("alice", "t1", "sks", "dog"), ("bob", "t1", "zwx", "cat"), ("carol", "t2", "qpv", "toy")]
RANDOM = ["s1", "s2", "s3", "s4", "s5", "s6"]  # random adapters (alice's tenant and token)
EIGHT = ["alice", "bob", *RANDOM]
META = {"subject": {"instance_token": "sks", "class_prompt": "a photo of a dog"}}
TENANT_CAP = 8  # = serve.max_batch_size: one tenant can never hold more than one batch
INGRESS_CAP = 64  # serve.ingress_max_requests: below the 72 slow uploads of one test
UPLOAD_DEADLINE_S = 6.0  # serve.body_timeout_s


# -- unit tier: no Ray -------------------------------------------------------------------------------
def test_keyring_matches_hashed_and_env_keys_only():
    k1, k2, k3 = "k1-0123456789abcdef", "k2-0123456789abcdef", "k:3-0123456789abcdef"
    cfg = ServeConfig(api_keys={hash_key(k1): "t1"}, api_keys_env="TEST_KEYS")
    ring = KeyRing.from_config(cfg, environ={"TEST_KEYS": f"{k2}:t2, {k3}:t3"})
    assert [ring.tenant_for(k) for k in (k1, k2, k3, "nope", "", None)] == \
        ["t1", "t2", "t3", None, None, None]
    with pytest.raises(ValueError, match="sha256 hex digest"):
        KeyRing({"k1": "t1"})  # a plain key where a digest belongs
    with pytest.raises(ValueError, match="entry 1") as err:
        parse_env_keys("secret-without-tenant")
    assert "secret" not in str(err.value)  # keys never appear in messages
    assert key_from_headers({"authorization": "Bearer abc"}) == "abc"
    assert key_from_headers({"x-api-key": "xyz"}) == "xyz"
    assert key_from_headers({"authorization": "Basic abc"}) is None


def test_validate_generate_limits_name_the_field_and_token_rule():
    cfg = ServeConfig(max_inference_steps=10, default_inference_steps=4, max_size=128, max_images=2,
                      max_prompt_chars=20)
    ok = validate_generate(GenerateRequest(subject_id="a", prompt="a dog on a beach", seed=1), cfg, META)
    assert (ok.prompt, ok.num_inference_steps, ok.seed) == ("a sks dog on a beach", 4, 1)
    for body, field in [({"width": 60}, "width"), ({"height": 256}, "height"),
                        ({"num_inference_steps": 11}, "num_inference_steps"),
                        ({"num_images": 3}, "num_images"), ({"prompt": "x" * 21}, "prompt")]:
        with pytest.raises(RequestError) as err:
            validate_generate(GenerateRequest(**({"subject_id": "a", "prompt": "p"} | body)), cfg, META)
        assert err.value.detail()[0]["loc"] == ["body", field]
    assert final_prompt("a sks dog", META) == "a sks dog"
    assert final_prompt("a castle", META) == "sks a castle"


def test_evicted_adapter_in_use_is_unloaded_by_its_last_user():
    from raydb.serving.adapters import LoadedAdapter

    class Pool:
        unloaded: list[str] = []

        def unload(self, adapter):
            self.unloaded.append(adapter.name)

        def evicted(self, adapter):
            pass

    pool = Pool()
    adapter = LoadedAdapter(pool, "adapter0", "alice", "v0001", {})
    adapter.acquire()
    adapter.__del__()  # Serve evicts it while a request still holds it
    assert pool.unloaded == [] and adapter.loaded
    assert adapter.release() is True and not adapter.loaded  # the last user unloads it
    adapter.__del__()  # the garbage collector's call is a no-op
    idle = LoadedAdapter(pool, "adapter1", "bob", "v0001", {})
    idle.__del__()
    assert pool.unloaded == ["adapter1"] and not idle.loaded


def test_shipped_serve_configs_load_and_build():
    from ray.serve.schema import ServeDeploySchema

    deploy = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve/config.yaml").read_text()))
    app_args = deploy.applications[0].args
    assert deploy.applications[0].import_path == "raydb.serving.app:build_app"
    load_config(REPO / app_args["config"])
    from raydb.serving.app import build_app

    assert type(build_app({"config": str(REPO / app_args["config"])})).__name__ == "Application"


# -- integration tier: one Serve app over real HTTP --------------------------------------------------
def _train(workspace: str, sid: str, tenant: str, token: str, noun: str) -> None:
    from raydb.pipeline import run_pipeline

    cfg = load_config(data={
        "workspace": workspace, "model": {"pretrained": "tiny"}, "prior": {"enabled": False},
        "subject": {"id": sid, "tenant": tenant, "instance_prompt": f"a photo of {token} {noun}",
                    "class_prompt": f"a photo of a {noun}"},
        "train": {"resolution": 64, "max_steps": 4, "learning_rate": 1e-2, "checkpoint_every": 1000,
                  "num_sample_images": 0, "seed": len(sid)},
    })
    run_pipeline(cfg, local=True, quiet=True)  # trained and registered


def _bad_copies(workspace: str) -> None:
    """``alien``: alice's adapter claiming another base model; ``broken``: bob's with bad weights."""
    from raydb.registry import latest_version, register_adapter
    from raydb.storage import Storage, join

    storage = Storage()
    alien = register_adapter(storage, workspace, "t1", "alien",
                             latest_version(storage, workspace, "t1", "alice")["uri"])
    meta = storage.read_json(join(alien["uri"], "adapter.json"))
    meta["base_model"]["identity"] = "some-other-base-model"
    storage.write_json(join(alien["uri"], "adapter.json"), meta)
    broken = register_adapter(storage, workspace, "t1", "broken",
                              latest_version(storage, workspace, "t1", "bob")["uri"])
    weights = Path(broken["uri"]) / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # flip tensor bytes; the header still parses
    weights.write_bytes(bytes(data))


def _random_subjects(workspace: str) -> None:
    from raydb.storage import Storage
    from tests.helpers.adapters import register_random_adapter

    for i, sid in enumerate(RANDOM):
        register_random_adapter(Storage(), workspace, "alice", sid, rank=4, seed=100 + i, tenant="t1")
    register_random_adapter(Storage(), workspace, "alice", "wide", rank=16, seed=99, tenant="t1")
    # t2's own "alice" (subject ids are per tenant): another adapter under the same name
    register_random_adapter(Storage(), workspace, "carol", "alice", rank=4, seed=7, tenant="t2")


@pytest.fixture(scope="module")
def served_workspace(tmp_path_factory) -> str:
    """The registry every Serve test reads: the three subjects plus the two bad copies."""
    workspace = str(tmp_path_factory.mktemp("serve-ws"))
    for subject in SUBJECTS:
        _train(workspace, *subject)
    _bad_copies(workspace)
    _random_subjects(workspace)
    return workspace


@pytest.fixture(scope="module")
def server(ray_cluster, served_workspace):
    import httpx
    from ray import serve

    from raydb.serving import run_server

    workspace = served_workspace
    port = free_port()
    os.environ["RAYDB_TEST_SERVE_KEYS"] = f"{KEY_ENV}:t1"
    cfg = load_config(data={
        "workspace": workspace, "model": {"pretrained": "tiny"},
        "serve": {"api_keys": {hash_key(KEY_A): "t1", hash_key(KEY_B): "t2"}, "port": port,
                  "api_keys_env": "RAYDB_TEST_SERVE_KEYS",
                  "max_num_models_per_replica": 2, "max_size": 128, "max_inference_steps": 8,
                  "default_inference_steps": 2, "max_images": 2, "num_cpus_per_replica": 1,
                  "max_batch_size": 8, "batch_wait_ms": 100, "max_lora_rank": 8, "max_ongoing_requests": 32,
                  "tenant_max_concurrent": TENANT_CAP, "tenant_rate_per_s": 0,
                  # the ingress's own bound below the 72 slow uploads of the slow-uploads test, as
                  # Serve's 64 ingress slots were in the review; their body deadline kept short
                  "ingress_max_requests": INGRESS_CAP, "body_timeout_s": UPLOAD_DEADLINE_S},
    })
    run_server(cfg, blocking=False)
    del os.environ["RAYDB_TEST_SERVE_KEYS"]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    deadline = time.time() + 60
    while client.get("/healthz").status_code != 200:
        assert time.time() < deadline, "server did not become healthy"
        time.sleep(0.5)
    yield client
    client.close()
    serve.shutdown()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _generate(client, subject_id: str, key: str = KEY_A, **body):
    body = {"subject_id": subject_id, "prompt": "a photo", "seed": 3, "num_inference_steps": 2,
            "width": 64, "height": 64} | body
    return client.post("/v1/generate", json=body, headers=_auth(key))


def _pixels(png_or_b64: bytes | str) -> np.ndarray:
    data = base64.b64decode(png_or_b64) if isinstance(png_or_b64, str) else png_or_b64
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _image(client, subject_id: str, key: str = KEY_A, **body) -> np.ndarray:
    resp = _generate(client, subject_id, key, **body)
    assert resp.status_code == 200, resp.text
    return _pixels(resp.json()["images"][0])


def _diffusion():
    from ray import serve

    return serve.get_deployment_handle("RaydbDiffusion", app_name="raydb")


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to batched kernels' last bits: no pixel value off by more than 3 levels, and on
    average under 0.05 levels (distinct subjects differ by > 1 level on average)."""
    diff = np.abs(a - b)
    return diff.max() <= 3 and diff.mean() <= 0.05


def _forwards() -> int:
    return _diffusion().stats.remote().result()["unet_forwards"]


def _base_params(seed: int, steps: int = 2) -> dict:
    return {"prompt": "a photo of sks dog", "negative_prompt": None, "num_inference_steps": steps,
            "guidance_scale": 7.5, "seed": seed, "width": 64, "height": 64, "num_images": 1}


def _handle_image(params: dict, subject: str | None = None) -> np.ndarray:
    handle = _diffusion().options(multiplexed_model_id=f"t1/{subject}@v0001") if subject else _diffusion()
    return _pixels(handle.generate.remote(params).result()["images"][0])


@pytest.mark.ray
def test_subjects_differ_from_each_other_and_base_and_repeat(server):
    first = {}
    for sid, _, token, noun in SUBJECTS:
        key = KEY_B if sid == "carol" else KEY_A
        resp = _generate(server, sid, key, prompt=f"a {noun} on a beach")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["prompt"] == f"a {token} {noun} on a beach" and body["prompt_rewritten"] is True
        identity = _diffusion().stats.remote().result()["base_model"]
        assert "base_model" not in body and identity not in resp.text  # the server's model stays its own
        assert (body["adapter_version"], body["seed"], body["width"]) == ("v0001", 3, 64)
        first[sid] = _pixels(body["images"][0])
        base = _diffusion().generate.remote(
            {k: body[k] for k in ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale",
                                  "seed", "width", "height", "num_images")}).result()
        assert np.abs(first[sid] - _pixels(base["images"][0])).mean() > 1.0, f"{sid} looks like the base"
        png = server.post("/v1/generate", headers=_auth(key) | {"Accept": "image/png"},
                          json={"subject_id": sid, "prompt": f"a {noun} on a beach", "seed": 3,
                                "num_inference_steps": 2, "width": 64, "height": 64})
        assert png.headers["content-type"] == "image/png"
        assert np.array_equal(_pixels(png.content), first[sid])  # same request + seed: same image
    for a, b in [("alice", "bob"), ("alice", "carol"), ("bob", "carol")]:
        assert np.abs(first[a] - first[b]).mean() > 1.0, f"{a} and {b} look alike"


@pytest.mark.ray
def test_cycling_three_subjects_through_two_slots_evicts_and_reloads(server):
    keys = {"alice": KEY_A, "bob": KEY_A, "carol": KEY_B}
    first = {sid: _image(server, sid, keys[sid]) for sid in keys}
    before = _diffusion().stats.remote().result()
    for sid in ["alice", "bob", "carol"] * 2:  # LRU of 2 over a cycle of 3: every request misses
        assert np.array_equal(_image(server, sid, keys[sid]), first[sid]), sid
    after = _diffusion().stats.remote().result()
    assert after["loads"] - before["loads"] == 6 and after["unloads"] - before["unloads"] == 6
    assert len(after["resident"]) == 2  # evicted adapters are gone from the pipeline too


@pytest.mark.ray
def test_eight_subjects_at_once_share_denoising_loops_and_equal_one_by_one(server):
    start = _forwards()
    alone = {sid: _image(server, sid, seed=5) for sid in EIGHT}
    eight_loops = _forwards() - start  # 8 requests one after another: 8 loops
    with ThreadPoolExecutor(len(EIGHT)) as pool:
        results = list(pool.map(lambda sid: _generate(server, sid, seed=5), EIGHT))
    assert [r.status_code for r in results] == [200] * len(EIGHT)
    assert _forwards() - start - eight_loops < eight_loops  # counted: fewer UNet forwards
    for sid, resp in zip(EIGHT, results, strict=True):
        assert _close(_pixels(resp.json()["images"][0]), alone[sid]), sid
    for a, b in [("s1", "s2"), ("s1", "alice")]:
        assert np.abs(alone[a] - alone[b]).mean() > 1.0, f"{a} and {b} look alike"


@pytest.mark.ray
def test_base_model_and_subjects_share_one_batch_and_shapes_never_mix(server):
    jobs = [(None, 0, 2), ("alice", 1, 2), (None, 2, 2), ("bob", 3, 2),  # (subject, seed, steps)
            (None, 0, 3), ("alice", 1, 3), (None, 2, 3), ("bob", 3, 3)]
    alone = [_handle_image(_base_params(seed, steps), sid) for sid, seed, steps in jobs]
    counts = [_forwards()]
    for steps in (2, 3):  # UNet forwards of one loop of each shape
        _handle_image(_base_params(0, steps))
        counts.append(_forwards())
    loop2, loop3 = counts[1] - counts[0], counts[2] - counts[1]
    start = _forwards()
    handle = _diffusion()
    responses = [(handle.options(multiplexed_model_id=f"t1/{sid}@v0001") if sid else handle)
                 .generate.remote(_base_params(seed, steps)) for sid, seed, steps in jobs]  # all at once
    images = [_pixels(r.result()["images"][0]) for r in responses]
    # One loop per shape: base and two subjects in each, the two step counts in separate loops.
    assert _forwards() - start == loop2 + loop3
    batches = _diffusion().stats.remote().result()["batches"][-2:]
    assert sorted((key[2], size) for key, size in batches) == [(2, 4), (3, 4)]
    for job, image, expected in zip(jobs, images, alone, strict=True):
        assert _close(image, expected), job


@pytest.mark.ray
def test_eviction_under_concurrent_load_loses_no_request(server):
    keys = {sid: KEY_A for sid in EIGHT} | {"carol": KEY_B}
    sequential = {sid: _image(server, sid, keys[sid], seed=1) for sid in keys}
    before = _diffusion().stats.remote().result()
    jobs = list(keys) * 3  # 9 subjects over 2 resident adapters, 27 requests at once
    slots = {key: threading.Semaphore(TENANT_CAP) for key in (KEY_A, KEY_B)}  # a client within its cap

    def run(sid):
        with slots[keys[sid]]:
            return _generate(server, sid, keys[sid], seed=1)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert [r.status_code for r in results] == [200] * len(jobs)
    for sid, resp in zip(jobs, results, strict=True):
        assert _close(_pixels(resp.json()["images"][0]), sequential[sid]), sid
    after = _diffusion().stats.remote().result()
    # Adapters were evicted while requests held them, and their slots came back afterwards.
    assert after["loads"] - before["loads"] >= len(keys) and len(after["resident"]) == 2


@pytest.mark.ray
def test_error_statuses(server):
    assert server.get("/healthz").status_code == 200
    assert server.get("/v1/subjects").status_code == 401
    assert server.get("/v1/subjects", headers=_auth("wrong-key")).status_code == 401
    assert server.get("/v1/subjects", headers={"X-API-Key": KEY_A}).status_code == 200
    assert server.get("/v1/subjects", headers=_auth(KEY_ENV)).status_code == 200
    assert _generate(server, "alice", key="wrong-key").status_code == 401
    for sid in ("nobody", "../subjects/alice", "../subjects/carol"):  # the latter two exist (see
        resp = _generate(server, sid)  # test_registry's traversal test for the check's necessity)
        assert resp.status_code == 404 and "unknown subject" in resp.json()["detail"]
    for body, field in [({"width": 65}, "width"), ({"num_inference_steps": 9}, "num_inference_steps"),
                        ({"prompt": None}, "prompt"), ({"colour": "red"}, "colour"),
                        ({"num_images": 3}, "num_images"), ({"seed": -1}, "seed")]:
        resp = _generate(server, "alice", **body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["detail"][0]["loc"] == ["body", field]
    identity = _diffusion().stats.remote().result()["base_model"]
    resp = _generate(server, "alien")
    assert resp.status_code == 409 and "base model" in resp.json()["detail"]
    assert identity not in resp.text and "some-other-base-model" not in resp.text  # no identities
    resp = _generate(server, "broken")
    assert resp.status_code == 500 and "corrupt" in resp.json()["detail"]
    assert "/" not in resp.json()["detail"]  # no paths
    resp = _generate(server, "wide")  # rank 16 > serve.max_lora_rank
    assert resp.status_code == 409 and "serve.max_lora_rank" in resp.json()["detail"], resp.text
    assert _generate(server, "alice").status_code == 200  # the replica still serves everyone else
    assert _generate(server, "carol", key=KEY_B).status_code == 200


@pytest.mark.ray
def test_a_tenant_sees_and_uses_only_its_own_subjects(server):
    def listed(key: str) -> list[str]:
        rows = server.get("/v1/subjects", headers=_auth(key)).json()["subjects"]
        return [row["subject_id"] for row in rows]

    assert listed(KEY_A) == sorted(["alice", "alien", "bob", "broken", *RANDOM, "wide"])
    assert listed(KEY_B) == ["alice", "carol"]
    rows = server.get("/v1/subjects", headers=_auth(KEY_B)).json()["subjects"]
    assert rows[1]["instance_token"] == "qpv" and rows[1]["versions"] == ["v0001"]
    resp = _generate(server, "carol", KEY_A)  # t2's subject: for t1 it does not exist
    assert resp.status_code == 404 and resp.json()["detail"] == "unknown subject 'carol'"
    # subject ids are per tenant: each tenant's "alice" is its own adapter (issue 24)
    mine, theirs = _image(server, "alice", KEY_A), _image(server, "alice", KEY_B)
    assert np.abs(mine - theirs).mean() > 1.0, "t1's and t2's alice look alike"
    assert np.array_equal(_image(server, "alice", KEY_A), mine)


@pytest.mark.ray
def test_docs_and_openapi_are_off_by_default(server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert server.get(path).status_code == 404, path
        assert server.get(path, headers=_auth(KEY_A)).status_code == 404, path


@pytest.mark.ray
def test_a_failing_adapter_load_evicts_nothing(server):
    assert _generate(server, "alice").status_code == 200
    assert _generate(server, "bob").status_code == 200  # both slots now hold healthy adapters
    before = _diffusion().stats.remote().result()
    for _ in range(2):  # the second time from the failure cache
        assert _generate(server, "broken").status_code == 500
        assert _generate(server, "alien").status_code == 409
    assert _generate(server, "alice").status_code == 200 and _generate(server, "bob").status_code == 200
    after = _diffusion().stats.remote().result()
    assert (after["loads"], after["unloads"], after["resident"]) == \
        (before["loads"], before["unloads"], before["resident"])  # nothing was evicted or reloaded


@pytest.mark.ray
def test_one_tenants_flood_does_not_delay_another_beyond_one_batch(server):
    """50 concurrent requests of t1 and one of t2: t1 gets 429s beyond its cap, so at most
    TENANT_CAP of its requests are ever ahead of t2's in the replica (peak in flight <= cap + 1)."""
    _diffusion().reset_peak.remote().result()
    with ThreadPoolExecutor(51) as pool:
        flood = [pool.submit(_generate, server, "alice", KEY_A, seed=i) for i in range(50)]
        other = pool.submit(_generate, server, "carol", KEY_B)
        responses = [f.result() for f in flood]
        assert other.result().status_code == 200
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= TENANT_CAP
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert _diffusion().stats.remote().result()["peak_in_flight"] <= TENANT_CAP + 1


@pytest.mark.ray
def test_a_20mb_body_is_refused_with_413_before_it_is_read(server):
    """Only the headers and 64 KiB of a declared 20 MB body are sent: the 413 must come anyway."""
    head = (f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_A}\r\n"
            "Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.base_url.port), timeout=60) as conn:
        conn.sendall(head + b'{"subject_id": "alice", "prompt": "' + b"x" * 65536)
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413", status_line


def _slow_upload_head(key: str) -> bytes:
    """A ``POST /v1/trainings`` that declares 5000 bytes and sends a well-formed start of its
    multipart body; the rest is to come 1 byte at a time."""
    return (f"POST /v1/trainings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 5000\r\n\r\n"
            '--x\r\nContent-Disposition: form-data; name="subject_id"\r\n\r\na').encode()


def _answer_status(conn: socket.socket) -> int | None:
    """The status of the answer waiting on ``conn``; None while none has come."""
    conn.setblocking(False)
    try:
        head = conn.recv(4096)
    except BlockingIOError:
        return None
    finally:
        conn.setblocking(True)
    return int(head.split(b" ", 2)[1]) if head else -1


@pytest.mark.ray
def test_72_slow_uploads_of_one_tenant_do_not_delay_another_tenants_generate(server):
    """The review's attack over real HTTP: t1 opens 72 uploads trickling 1 byte/s (more than the
    ingress's 64 slots). t1 may hold ``serve.tenant_max_uploads`` (2) of them; the other 70 are
    answered 429 at once, so the ingress stays free and t2's generate, sent while the two trickle,
    is answered within one batch of its usual time (review: 0.1 s became 20.6 s). The two end with
    408 at ``serve.body_timeout_s``. Bounded: 72 connections, about UPLOAD_DEADLINE_S + 4 s.

    Fails on the code before the gate: every upload takes an ingress slot until it times out.
    """
    port = server.base_url.port
    latencies = []
    for _ in range(3):  # t2's generate alone: its own batch
        sent = time.monotonic()
        assert _generate(server, "carol", KEY_B).status_code == 200
        latencies.append(time.monotonic() - sent)
    usual = sorted(latencies)[1]
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(72)]
    statuses: dict[int, int] = {}
    try:
        for conn in conns:
            conn.sendall(_slow_upload_head(KEY_A))
        start = time.monotonic()
        while len(statuses) < 70 and time.monotonic() - start < 20:
            for i, conn in enumerate(conns):
                if i not in statuses and (status := _answer_status(conn)) is not None:
                    statuses[i] = status
            time.sleep(0.1)
        assert sorted(statuses.values()) == [429] * 70, statuses
        held = [i for i in range(72) if i not in statuses]
        sent = time.monotonic()
        other = _generate(server, "carol", KEY_B)
        latency = time.monotonic() - sent
        assert other.status_code == 200, other.text
        assert all(_answer_status(conns[i]) is None for i in held), "the uploads should still trickle"
        assert latency <= 2 * usual + 2.0, f"t2's generate took {latency:.1f} s (alone {usual:.2f} s)"
        while len(statuses) < 72 and time.monotonic() - start < UPLOAD_DEADLINE_S + 15:
            for i in held:
                if i not in statuses:
                    status = _answer_status(conns[i])
                    if status is None:
                        conns[i].sendall(b"a")  # 1 byte/s
                    else:
                        statuses[i] = status
            time.sleep(1.0)
        assert [statuses.get(i) for i in held] == [408, 408]
    finally:
        for conn in conns:
            conn.close()
    assert _generate(server, "alice").status_code == 200  # t1's slots came back


@pytest.mark.ray
def test_a_redeploy_onto_a_serve_listening_elsewhere_is_refused(server, served_workspace):
    """Serve's proxy already listens on the fixture's port: ``raydb serve`` with another port fails
    naming both, instead of deploying an app that is not served where the config says."""
    from raydb.config import ConfigError
    from raydb.serving import deploy

    cfg = load_config(data={"workspace": served_workspace, "model": {"pretrained": "tiny"},
                            "serve": {"port": server.base_url.port + 1, "app_name": "raydb-elsewhere",
                                      "route_prefix": "/elsewhere"}})
    with pytest.raises(ConfigError, match=f"proxy on 127.0.0.1:{server.base_url.port}"):
        deploy(cfg)
    assert "raydb-elsewhere" not in _serve_apps()
    assert server.get("/healthz").status_code == 200


def _serve_apps() -> list[str]:
    from ray import serve

    return list(serve.status().applications)


# -- faults: a diffusion replica SIGKILLed under load ------------------------------------------------
FAULT_APP, FAULT_PREFIX = "raydb-faults", "/faults"


def _replica_pids(app: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if a.class_name == f"ServeReplica:{app}:RaydbDiffusion"]


def _load(client, combos, seconds: float, clients: int, kill_after: float, app: str) -> list[tuple]:
    """``clients`` threads send generate requests (cycling ``combos``) for ``seconds``; one diffusion
    replica process of ``app`` is SIGKILLed ``kill_after`` seconds in. Returns (combo, status, body)."""
    import signal
    import threading

    stop = time.time() + seconds
    results: list[tuple] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        i = offset
        while time.time() < stop:
            sid, seed = combos[i % len(combos)]
            resp = client.post(f"{FAULT_PREFIX}/v1/generate", headers=_auth(KEY_A), json={
                "subject_id": sid, "prompt": "a photo", "seed": seed, "num_inference_steps": 2,
                "width": 64, "height": 64})
            with lock:
                results.append(((sid, seed), resp.status_code, resp.text if resp.status_code != 200
                                else resp.json()["images"][0]))
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_after)
    with lock:
        before = len(results)
    pids = _replica_pids(app)
    assert pids, "no diffusion replica found to kill"
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join()
    assert len(results) > before, "no request finished after the kill"
    return results


@pytest.mark.ray
def test_a_killed_diffusion_replica_costs_no_client_errors(server, served_workspace):
    """4 clients for 12 s against 2 diffusion replicas; one replica process is SIGKILLed mid-load.
    Every request gets 200 and the image a sequential request with the same seed gets (up to the
    batching engine's last bits, ``_close``): the ingress
    retried the lost requests on the other replica (raydb/serving/retry.py). Then, scaled to 1
    replica, the same kill: waiting requests are served by the restarted replica, none fails.

    Deliberate break caught: the ingress without the retry (``attempts=1``): the requests in flight
    on the killed replica answer 500.
    """
    import httpx
    from ray import serve

    from raydb.serving import build_application

    def deploy(replicas: int) -> None:
        cfg = load_config(data={
            "workspace": served_workspace, "model": {"pretrained": "tiny"},
            "serve": {"api_keys": {hash_key(KEY_A): "t1"}, "num_replicas": replicas,
                      "max_num_models_per_replica": 2, "max_inference_steps": 8,
                      "num_cpus_per_replica": 1, "tenant_rate_per_s": 0, "tenant_max_concurrent": 8},
        })
        serve.run(build_application(cfg), name=FAULT_APP, route_prefix=FAULT_PREFIX, blocking=False)
        deadline = time.time() + 120
        while len(_replica_pids(FAULT_APP)) != replicas:
            assert time.time() < deadline, f"{replicas} replicas did not come up"
            time.sleep(0.5)

    combos = [("alice", 0), ("bob", 1), ("alice", 2), ("bob", 3)]
    client = httpx.Client(base_url=str(server.base_url), timeout=120)
    try:
        deploy(2)
        expected = {}
        for sid, seed in combos:
            resp = client.post(f"{FAULT_PREFIX}/v1/generate", headers=_auth(KEY_A), json={
                "subject_id": sid, "prompt": "a photo", "seed": seed, "num_inference_steps": 2,
                "width": 64, "height": 64})
            assert resp.status_code == 200, resp.text
            expected[(sid, seed)] = _pixels(resp.json()["images"][0])
        for replicas, seconds in ((2, 12), (1, 10)):
            if replicas == 1:
                deploy(1)
            results = _load(client, combos, seconds, clients=4, kill_after=4, app=FAULT_APP)
            failed = [(combo, status, body[:200]) for combo, status, body in results if status != 200]
            assert not failed, f"{replicas} replica(s): {len(failed)} of {len(results)} failed: {failed[:3]}"
            for combo, _, body in results:
                # the batching engine: equal up to batched kernels' last bits (see _close)
                assert _close(_pixels(body), expected[combo]), combo
    finally:
        client.close()
        serve.delete(FAULT_APP)


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first ``name{...}`` sample whose labels include ``labels`` (None: absent)."""
    import re

    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return None


@pytest.mark.ray
def test_request_ids_in_bodies_and_logs_and_raydb_series_on_rays_prometheus_endpoint(server, ray_cluster):
    """Real requests through Serve's proxy, then Ray's own metrics endpoint (the node's metrics agent,
    what Prometheus scrapes): raydb's series are there with the tenant, route and status."""
    import glob
    import uuid

    ok_id, denied_id = f"ok-{uuid.uuid4().hex}", f"denied-{uuid.uuid4().hex}"
    body = {"subject_id": "alice", "prompt": "a photo", "seed": 5, "num_inference_steps": 2,
            "width": 64, "height": 64}
    ok = server.post("/v1/generate", json=body, headers=_auth(KEY_A) | {"X-Request-ID": ok_id})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == ok_id
    denied = server.post("/v1/generate", json=body, headers=_auth("wrong-key") | {"X-Request-ID": denied_id})
    assert denied.status_code == 401 and denied.json()["request_id"] == denied_id
    missing = server.post("/v1/generate", json=body | {"subject_id": "nobody"}, headers=_auth(KEY_A))
    assert missing.status_code == 404  # Serve made this request's id: the body carries it too
    assert missing.json()["request_id"] == missing.headers["x-request-id"] != ""
    big_id = f"big-{uuid.uuid4().hex}"  # answered by the gate (serve.max_body_bytes), inside the observer
    big = server.post("/v1/generate", content=b"x" * 70_000, headers=_auth(KEY_A) | {
        "X-Request-ID": big_id, "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["request_id"] == big_id

    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:  # the agent exports what processes reported (every few seconds)
        text = _scrape(port)
        if _sample(text, "ray_raydb_http_requests_total", tenant="unknown", status="401") and \
                _sample(text, "ray_raydb_batch_size_count") and \
                _sample(text, "ray_raydb_adapter_loads_total", result="loaded"):
            break
        time.sleep(3)
    assert _sample(text, "ray_raydb_http_requests_total", tenant="t1", route="/v1/generate", method="POST",
                   status="200") >= 1
    assert _sample(text, "ray_raydb_http_requests_total", tenant="unknown", route="/v1/generate",
                   status="401") >= 1
    assert _sample(text, "ray_raydb_http_requests_total", tenant="t1", status="404") >= 1
    assert _sample(text, "ray_raydb_http_requests_total", tenant="t1", route="/v1/generate",
                   status="413") >= 1  # the gate's answer, counted with the tenant and the route template
    assert _sample(text, "ray_raydb_http_request_seconds_count", tenant="t1", route="/v1/generate") >= 1
    assert _sample(text, "ray_raydb_batch_size_count") >= 1
    assert _sample(text, "ray_raydb_batch_queue_wait_seconds_count") >= 1
    assert _sample(text, "ray_raydb_adapter_loads_total", result="loaded") >= 1
    assert _sample(text, "ray_raydb_adapter_slots", state="total") == 2 + 8  # models per replica + batch size
    assert _sample(text, "ray_serve_num_http_requests_total") is not None  # Serve's own beside ours

    # the diffusion replica's log line for this request carries its id (Serve's) and its batch
    lines = [line for path in glob.glob("/tmp/ray/session_*/logs/serve/replica_*RaydbDiffusion*.log")
             for line in open(path, errors="replace") if ok_id in line]
    assert any("batch" in line for line in lines), lines


@pytest.mark.ray
def test_a_request_built_from_the_openapi_document_is_answered_as_it_says(server):
    """The key header, the body and the answer's shape all come from the document (serve.docs
    serves the same document; here it is built in-process from the same app)."""
    import jsonschema

    from raydb.serving.deployments import http_app
    from raydb.serving.openapi import openapi_document

    doc = openapi_document(http_app)
    op = doc["paths"]["/v1/generate"]["post"]
    scheme = doc["components"]["securitySchemes"][next(iter(op["security"][1]))]
    assert (scheme["type"], scheme["in"]) == ("apiKey", "header")
    body = op["requestBody"]["content"]["application/json"]["example"]
    # a subject of this registry, and sizes within this server's limits
    body = body | {"subject_id": "alice", "width": 64, "height": 64, "num_inference_steps": 2}
    resp = server.post("/v1/generate", json=body, headers={scheme["name"]: KEY_A})
    assert resp.status_code == 200, resp.text
    schemas = {"components": doc["components"]}
    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(resp.json(), {**answer, **schemas})
    error = op["responses"]["401"]["content"]["application/json"]["schema"]
    denied = server.post("/v1/generate", json=body)
    assert denied.status_code == 401
    jsonschema.validate(denied.json(), {**error, **schemas})
