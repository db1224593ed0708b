"""Training as a service, fast tier: the ``/v1/trainings`` routes on a plain FastAPI app (no Ray),
Ray's Jobs API replaced by a fake, and the job's entrypoint (``run_training``) called in-process
without Ray, as the job would run it. tests/console/test_browser.py runs the real thing (a head cluster,
``raydb serve``, trainings as Ray jobs), through the console and over plain HTTP.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydb.data.ingest import load_images
from raydb.registry import list_subjects
from raydb.storage import Storage
from raydb.trainings.job import run_training
from raydb.trainings.store import TrainingStore
from tests.helpers.images import demo_photos, image_bytes
from tests.helpers.trainings import CancelDuringStage
from tests.helpers.trainings import post_training as _post


def _png(img: Image.Image) -> bytes:
    return image_bytes(img)


def _photos() -> list[tuple[str, bytes]]:
    return demo_photos(3, 96)


def _stored(cfg) -> list[str]:
    root = Path(cfg.workspace)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_bad_uploads_are_refused_naming_the_problem_and_store_nothing(service):
    cfg, jobs, client = service
    c = client()
    noise = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")  # 36 MP in a few kB
    good = _photos()[0]
    cases = [
        ([("notes.png", b"this is text, not a picture")], 422, "notes.png"),
        ([good, ("empty.jpg", b"")], 422, "empty.jpg: empty file"),
        ([], 422, "at least one photo"),
        (_photos() + [good], 422, "at most 3 photos"),
        ([("big.png", _png(Image.fromarray(noise)))], 413, "big.png"),
        ([("wide.png", _png(Image.new("RGB", (400, 120))))], 422, "wide.png: 400x120 is 48000 pixels"),
        ([("bomb.png", bomb.getvalue())], 422, "bomb.png: 6000x6000"),
        ([("tiny.png", _png(Image.new("RGB", (20, 20))))], 422, "too small"),
    ]
    for photos, status, text in cases:
        resp = _post(c, photos=photos)
        assert resp.status_code == status, (text, resp.text)
        detail = resp.json()["detail"][0]
        assert detail["loc"] == ["body", "photos"] and text in detail["msg"], (text, detail)
    for fields, text in [({"subject_id": "../x"}, "subject_id"), ({"class_prompt": " "}, "class_prompt"),
                         ({"colour": "red"}, "colour")]:
        resp = _post(c, **fields)
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", text], resp.text
    # an upload over service.max_upload_bytes: the ingress's gate (tests/serving/test_gate.py)
    assert _post(c, key="nope").status_code == 401
    assert _stored(cfg) == [] and jobs.submitted == []


def test_overrides_outside_the_allowed_list_are_422(service):
    cfg, jobs, client = service
    c = client()
    for overrides, text in [({"train.colour": 1}, "unknown key 'train.colour'"),
                            ({"train.seed": 3}, "'train.seed' may not be overridden"),
                            ({"serve.api_keys": {}}, "may not be overridden"),
                            ({"train.max_steps": 10**6}, "at most 2000"),
                            ({"train.learning_rate": -1}, "train.learning_rate"),
                            ({"tune": "yes"}, "'tune' must be true or false"),
                            ([1, 2], "JSON object")]:
        resp = _post(c, overrides=json.dumps(overrides))
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"][0]
        assert detail["loc"] == ["body", "overrides"] and text in detail["msg"], detail
    assert _stored(cfg) == []
    resp = _post(c, overrides=json.dumps({"train.max_steps": 3, "lora.rank": 2}))
    assert resp.status_code == 202, resp.text
    request = json.loads(next(Path(cfg.workspace).rglob("request.json")).read_text())
    assert request["config"]["train"]["max_steps"] == 3 and request["config"]["lora"]["rank"] == 2


def test_idempotency_queue_limits_and_tenant_isolation(service):
    cfg, jobs, client = service
    c = client()
    first = _post(c, idem="order-1")
    again = _post(c, idem="order-1")
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"] and first.json()["status"] == "running"
    assert len(c.get("/v1/trainings", headers={"X-API-Key": "key-one"}).json()["trainings"]) == 1
    assert len(jobs.submitted) == 1
    tid = first.json()["id"]
    # another tenant: the id does not exist for it
    for method in ("get", "delete"):
        resp = getattr(c, method)(f"/v1/trainings/{tid}", headers={"X-API-Key": "key-two"})
        assert resp.status_code == 404 and resp.json()["detail"] == f"unknown training {tid!r}"
    assert c.get("/v1/trainings", headers={"X-API-Key": "key-two"}).json() == {"trainings": [], "next": None}
    # one slot, one queued per tenant, two in all: t1's second waits, its third is refused — and
    # t2 still gets its place in the queue (t1 cannot fill it); a third tenant finds it full
    second = _post(c, key="key-one", subject_id="fido")
    assert second.status_code == 202 and second.json()["status"] == "queued"
    third = _post(c, key="key-one", subject_id="kit")
    assert third.status_code == 429 and third.headers["Retry-After"] == "7"
    assert "service.max_queued_per_tenant" in third.json()["detail"]
    theirs = _post(c, key="key-two", subject_id="kit")
    assert theirs.status_code == 202 and theirs.json()["status"] == "queued"
    full = _post(c, key="key-three", subject_id="kit")
    assert full.status_code == 429 and "queue is full" in full.json()["detail"]
    # the first job dies without a result: it fails, and the queued one starts
    jobs.statuses[jobs.submitted[0]] = "FAILED"
    c.app.state.raydb_trainings.service.pass_queue()  # the next queue pass (background thread or a GET)
    view = c.get(f"/v1/trainings/{tid}", headers={"X-API-Key": "key-one"}).json()
    assert view["status"] == "failed" and "driver killed" in view["error"]
    assert c.get(f"/v1/trainings/{second.json()['id']}", headers={"X-API-Key": "key-one"}).json()["status"] \
        == "running"
    assert len(jobs.submitted) == 2


def test_jobs_succeed_fail_and_cancel_and_a_new_ingress_still_answers(service):
    cfg, jobs, client = service
    cfg.service.max_concurrent_trainings = cfg.service.max_running_per_tenant = 3
    cfg.service.max_queued_trainings = 3
    c = client()
    ids = [_post(c, subject_id=sid).json()["id"] for sid in ("rex", "fido", "kit")]
    assert len(jobs.submitted) == 3
    store = TrainingStore(Storage(), cfg.workspace)
    # fido's job finds its base model gone (as if the operator's model path were corrupt)
    uri = Path(store.training_uri("t1", ids[1])) / "request.json"
    request = json.loads(uri.read_text())
    request["config"]["model"]["pretrained"] = "/nonexistent/model"
    uri.write_text(json.dumps(request))
    # kit is cancelled while its job runs: the job stops, and finds the outcome claimed
    cancelled = c.delete(f"/v1/trainings/{ids[2]}", headers={"X-API-Key": "key-one"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert jobs.stopped == [jobs.submitted[2]]
    assert [run_training(store, "t1", i, local=True) for i in ids] == ["succeeded", "failed", "cancelled"]
    c = client()  # a restarted ingress answers from the workspace alone
    views = {v["subject_id"]: v for v in c.get("/v1/trainings", headers={"X-API-Key": "key-one"}).json()[
        "trainings"]}
    assert views["rex"]["status"] == "succeeded" and views["rex"]["subject"] == {"subject_id": "rex",
                                                                                 "version": "v0001"}
    assert (views["rex"]["step"], views["rex"]["max_steps"]) == (2, 2) and views["rex"]["loss"] > 0
    # the tenant reads what failed and where, not the operator's paths; the operator's record has them
    assert views["fido"]["status"] == "failed" and views["fido"]["error"].startswith("stage ")
    assert "<path>" in views["fido"]["error"] and "nonexistent" not in views["fido"]["error"]
    assert "/nonexistent/model" in store.status("t1", ids[1])["error_detail"]
    assert views["kit"]["status"] == "cancelled" and views["kit"]["error"] is None
    registered = sorted(list_subjects(Storage(), cfg.workspace, "t1"))
    assert registered == ["rex"]  # neither the failed nor the cancelled training registered anything
    assert c.delete(f"/v1/trainings/{ids[0]}", headers={"X-API-Key": "key-one"}).status_code == 409


def test_two_tenants_can_each_train_a_subject_of_the_same_name(service):
    """Subject ids are per tenant (issue 24): t2 submitting ``rex`` after t1 registered its ``rex``
    is accepted (before: 409 "subject id 'rex' is taken", which also told t2 that someone had a
    ``rex``), trains, and registers t2's own ``rex``; t1's stays as it was."""
    from raydb.serving.subjects import find_subject

    cfg, jobs, client = service
    cfg.service.max_concurrent_trainings = cfg.service.max_queued_trainings = 2
    c = client()
    store = TrainingStore(Storage(), cfg.workspace)
    first = _post(c, key="key-one", photos=demo_photos(3, 96))
    assert first.status_code == 202, first.text
    assert run_training(store, "t1", first.json()["id"], local=True) == "succeeded"
    second = _post(c, key="key-two", photos=demo_photos(3, 80))
    assert second.status_code == 202, second.text
    assert run_training(store, "t2", second.json()["id"], local=True) == "succeeded"
    for tenant, key, resp in (("t1", "key-one", first), ("t2", "key-two", second)):
        view = c.get(f"/v1/trainings/{resp.json()['id']}", headers={"X-API-Key": key}).json()
        assert view["subject"] == {"subject_id": "rex", "version": "v0001"}
        assert list(list_subjects(Storage(), cfg.workspace, tenant)) == ["rex"]
    mine, theirs = (find_subject(Storage(), cfg.workspace, t, "rex") for t in ("t1", "t2"))
    assert mine.uri != theirs.uri and mine.metadata["weights_sha256"] != theirs.metadata["weights_sha256"]
    assert (mine.metadata["subject"]["tenant"], theirs.metadata["subject"]["tenant"]) == ("t1", "t2")


def test_a_training_cancelled_while_it_trains_registers_nothing(service):
    """``DELETE`` lands while the job's train stage runs: the stage finishes (its adapter is in the
    run folder), but the job finds the outcome claimed and registers nothing — no version, no
    subject folder (the pipeline, the only registrar, never ran its register stage)."""
    cfg, jobs, client = service
    c = client()
    tid = _post(c).json()["id"]
    store = TrainingStore(Storage(), cfg.workspace)
    job_store = CancelDuringStage(store, "train", lambda: c.delete(f"/v1/trainings/{tid}",
                                                                    headers={"X-API-Key": "key-one"}))
    assert run_training(job_store, "t1", tid, local=True) == "cancelled"
    assert job_store.cancelled and jobs.stopped == [jobs.submitted[0]]
    run = store.status("t1", tid)["run_uri"]
    assert (Path(run) / "adapter" / "pytorch_lora_weights.safetensors").is_file()  # it did train
    assert list_subjects(Storage(), cfg.workspace, "t1") == {}
    assert not (Path(cfg.workspace) / "tenants" / "t1" / "subjects").exists()
    view = c.get(f"/v1/trainings/{tid}", headers={"X-API-Key": "key-one"}).json()
    assert view["status"] == "cancelled" and view["subject"] is None


def test_a_cancel_arriving_while_the_job_registers_is_refused_and_the_training_succeeds(service):
    """The other side of the register-or-cancel decision: once the job won ``outcome.json`` and its
    register stage runs, ``DELETE`` answers 409 and changes nothing; the training succeeds with its
    version (deliberate break caught: the job registering without claiming the outcome first)."""
    cfg, jobs, client = service
    c = client()
    tid = _post(c).json()["id"]
    store = TrainingStore(Storage(), cfg.workspace)
    answers = []
    job_store = CancelDuringStage(store, "register", lambda: answers.append(
        c.delete(f"/v1/trainings/{tid}", headers={"X-API-Key": "key-one"})))
    assert run_training(job_store, "t1", tid, local=True) == "succeeded"
    [refused] = answers
    assert refused.status_code == 409 and "registering its result" in refused.json()["detail"]
    assert jobs.stop_calls == [] and store.outcome("t1", tid) == "register"
    view = c.get(f"/v1/trainings/{tid}", headers={"X-API-Key": "key-one"}).json()
    assert view["status"] == "succeeded" and view["subject"] == {"subject_id": "rex", "version": "v0001"}


def test_a_refused_submission_stays_queued_until_the_jobs_api_takes_it(service):
    cfg, jobs, client = service
    c = client()
    jobs.refuse = True
    resp = _post(c)
    assert resp.status_code == 202 and resp.json()["status"] == "queued" and jobs.submitted == []
    jobs.refuse = False
    c.app.state.raydb_trainings.service.pass_queue()
    view = c.get(f"/v1/trainings/{resp.json()['id']}", headers={"X-API-Key": "key-one"}).json()
    assert view["status"] == "running" and view["job_id"] == jobs.submitted[0]


# -- photos named by s3:// URI (moto's S3 server; the ingress's own Storage reads them) -------------

def _uri_service(service, s3_bucket, prefixes):
    cfg, jobs, client = service
    endpoint, bucket = s3_bucket
    cfg.s3_endpoint_url = endpoint
    cfg.service.photo_uri_prefixes = [p.replace("BUCKET", bucket) for p in prefixes]
    return cfg, jobs, client(), Storage(endpoint), bucket


def test_photos_named_by_s3_uri_are_copied_under_the_tenant(service, s3_bucket):
    cfg, jobs, c, s3, bucket = _uri_service(service, s3_bucket, ["BUCKET/{tenant}/"])
    photos = _photos()
    s3.write_bytes(f"{bucket}/t1/rex/a.png", photos[1][1])
    s3.write_bytes(f"{bucket}/t1/rex/more/b.png", photos[2][1])
    s3.write_bytes(f"{bucket}/t1/rex/.DS_Store", b"finder junk")  # hidden: skipped, as by ingestion
    uris = [f"{bucket}/t1/rex/"]
    resp = _post(c, photos=photos[:1], photo_uris=json.dumps(uris))
    assert resp.status_code == 202, resp.text
    store = TrainingStore(Storage(), cfg.workspace)
    folder = Path(store.photos_uri("t1", resp.json()["id"]))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        "photo-00-star0.png": photos[0][1], "photo-01-a.png": photos[1][1], "photo-02-b.png": photos[2][1]}
    request = store.request("t1", resp.json()["id"])
    assert request["photo_uris"] == uris and request["config"]["subject"]["instance_data"] == str(folder)
    # one object by its own URI, no upload; then the sources go away: the training reads its copy
    resp = _post(c, photos=[], subject_id="fido", photo_uris=f"{bucket}/t1/rex/a.png")
    assert resp.status_code == 202, resp.text
    s3.delete(f"{bucket}/t1", recursive=True)
    assert s3.list(f"{bucket}/t1", recursive=True) == []
    trained = store.request("t1", resp.json()["id"])["config"]
    images = load_images(trained["subject"]["instance_data"], trained["train"]["resolution"])
    assert len(images) == 1 and images[0].size == (64, 64)


def test_a_photo_uri_with_question_mark_or_hash_is_read_as_it_was_checked(service, s3_bucket):
    """'?' and '#' are key characters when the URI is checked and when it is read: ``t1/a?b.png`` is
    that object, not ``t1/a`` (which a URL parser would read)."""
    cfg, jobs, c, s3, bucket = _uri_service(service, s3_bucket, ["BUCKET/{tenant}/"])
    photos = _photos()
    s3.write_bytes(f"{bucket}/t1/a", photos[0][1])
    s3.write_bytes(f"{bucket}/t1/a?b.png", photos[1][1])
    s3.write_bytes(f"{bucket}/t1/c#d.png", photos[2][1])
    resp = _post(c, photos=[], photo_uris=json.dumps([f"{bucket}/t1/a?b.png", f"{bucket}/t1/c#d.png"]))
    assert resp.status_code == 202, resp.text
    folder = Path(TrainingStore(Storage(), cfg.workspace).photos_uri("t1", resp.json()["id"]))
    assert sorted(p.read_bytes() for p in folder.iterdir()) == sorted([photos[1][1], photos[2][1]])


def test_photo_uris_outside_the_tenants_prefixes_or_unreadable_are_refused(service, s3_bucket):
    cfg, jobs, c, s3, bucket = _uri_service(service, s3_bucket,
                                            ["BUCKET/{tenant}/", "s3://raydb-no-such-bucket/{tenant}/"])
    photos = _photos()
    for key in ("t1/ok.png", "t2/theirs.png", "t1-other/x.png", "elsewhere/x.png", "t1/four/1.png",
                "t1/four/2.png", "t1/four/3.png", "t1/four/4.png"):
        s3.write_bytes(f"{bucket}/{key}", photos[0][1])
    noise = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    s3.write_bytes(f"{bucket}/t1/big.png", _png(Image.fromarray(noise)))
    s3.write_bytes(f"{bucket}/t1/bigdir/big.png", _png(Image.fromarray(noise)))
    s3.write_bytes(f"{bucket}/t1/wide.png", _png(Image.new("RGB", (400, 120))))
    s3.write_bytes(f"{bucket}/t1/notes.png", b"this is text, not a picture")
    s3.write_bytes(f"{bucket}/t1/empty.png", b"")
    # S3 keys are literal: this object lies under t1/sneaky/, but a normalising proxy reads t2's
    s3.write_bytes(f"{bucket}/t1/sneaky/../../t2/theirs.png", photos[0][1])
    cases = [
        (f"{bucket}/t2/theirs.png", 403, "outside the folders"),             # another tenant's photos
        (f"{bucket}/t1-other/x.png", 403, "outside the folders"),            # prefix, not key boundary
        (f"{bucket}/elsewhere/x.png", 403, "outside the folders"),
        ("s3://another-bucket/t1/ok.png", 403, "outside the folders"),
        (f"{bucket}/t1/../t2/theirs.png", 422, "'..' path segments"),        # no escape by '..'
        (f"{bucket}/t1//ok.png", 422, "path segments"),
        (f"{bucket}/t1/sneaky/", 422, "t1/sneaky/../../t2/theirs.png'"),   # a folder lists it: refused too
        ("https://example.com/t1/ok.png", 422, "not an s3:// URI"),
        (f"{bucket}/t1/missing.png", 422, "no such object or folder"),
        (f"{bucket}/t1/none/", 422, "no such object or folder"),
        ("s3://raydb-no-such-bucket/t1/a.png", 422, "NoSuchBucket"),        # a 4xx, not a 500
        (f"{bucket}/t1/four/", 422, "at most 3 photos, got 5 (1 uploaded, 4 named by URI)"),
        (f"{bucket}/t1/bigdir/", 413, "bytes, at most 60000"),               # from the listing
        (f"{bucket}/t1/big.png", 413, "big.png: over 60000 bytes"),          # a ranged GET stops there
        (f"{bucket}/t1/wide.png", 422, "wide.png: 400x120 is 48000 pixels"),
        (f"{bucket}/t1/notes.png", 422, "notes.png"),
        (f"{bucket}/t1/empty.png", 422, "empty.png: empty file"),
        ('["s3://x/1.png", 2]', 422, "JSON list of s3:// URIs"),
    ]
    for uri, status, text in cases:
        resp = _post(c, photos=photos[:1], photo_uris=uri)
        assert resp.status_code == status, (uri, resp.text)
        detail = resp.json()["detail"][0]
        assert detail["loc"] == ["body", "photo_uris"] and text in detail["msg"], (uri, detail)
        if not uri.startswith("["):
            assert uri.split("/")[-1] in detail["msg"] or uri.endswith("/"), (uri, detail)
        assert "testing" not in resp.text  # moto's credentials never reach the client
    assert _stored(cfg) == [] and jobs.submitted == []
    # the feature off: refused, naming the setting; nothing stored
    cfg.service.photo_uri_prefixes = []
    resp = _post(c, photo_uris=f"{bucket}/t1/ok.png")
    assert resp.status_code == 403 and "service.photo_uri_prefixes" in resp.json()["detail"][0]["msg"]
    assert _stored(cfg) == [] and jobs.submitted == []


def test_photo_uri_prefixes_are_checked_when_the_config_loads(make_cfg):
    from raydb.config import ConfigError

    assert make_cfg(service={"photo_uri_prefixes": ["s3://uploads/{tenant}/"]})
    for prefix in ("https://uploads/x/", "s3://uploads/a/../b/", "s3://uploads/{user}/", "s3://Up_Loads/"):
        with pytest.raises(ConfigError, match=r"service\.photo_uri_prefixes"):
            make_cfg(service={"photo_uri_prefixes": [prefix]})


def test_read_bounded_stops_at_its_limit(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    for uri in (f"{bucket}/blob", str(tmp_path / "blob")):
        storage.write_bytes(uri, bytes(range(100)))
        assert storage.read_bounded(uri, 10) == bytes(range(10))
        assert storage.read_bounded(uri, 1000) == bytes(range(100))


def test_a_tune_training_reports_its_trials_progress(service):
    """``tune: true`` takes the operator's service.tune search, under a name of its own; GET sums the
    trials' progress (tests/tune/test_stage.py runs such a training for real)."""
    import time

    from raydb.config import RaydbConfig
    from raydb.tune import tune_uri
    from raydb.tune.results import record_trial

    cfg, jobs, client = service
    c = client()
    resp = _post(c, overrides=json.dumps({"tune": True}))
    assert resp.status_code == 202, resp.text
    tid = resp.json()["id"]
    store = TrainingStore(Storage(), cfg.workspace)
    trained = RaydbConfig.model_validate(store.request("t1", tid)["config"])
    # its own name, and as many trials at a time as service.max_tune_gpus (1) holds
    assert trained.tune.model_dump() == cfg.service.tune.model_dump() | {"name": tid,
                                                                         "max_concurrent_trials": 1}
    assert (resp.json()["step"], resp.json()["max_steps"]) == (None, 4)  # 2 planned trials x 2 steps
    assert resp.json()["trials"] == {"planned": 2, "started": 0}
    # the job's tune stage began 10 s ago; one trial has done 1 of its 2 steps
    began = int(time.time()) - 10
    store.write_status("t1", tid, state="running", stage="tune", run_uri=None)
    status_file = Path(store.training_uri("t1", tid)) / "status.json"
    status = json.loads(status_file.read_text())
    status_file.write_text(json.dumps(status | {"updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                            time.gmtime(began))}))
    run = str(Path(cfg.workspace) / "tenants" / "t1" / "runs" / "rex" / "rex-trial")
    record_trial(store.storage, tune_uri(trained), run)
    store.storage.write_json(f"{run}/progress.json", {"step": 1, "max_steps": 2, "loss": 0.25,
                                                      "images_per_s": 3.0, "updated_at": "x"})
    before = time.time()
    view = c.get(f"/v1/trainings/{tid}", headers={"X-API-Key": "key-one"}).json()
    after = time.time()
    assert (view["step"], view["max_steps"], view["loss"]) == (1, 4, 0.25)
    assert view["trials"] == {"planned": 2, "started": 1}
    # ETA: the time so far x the 3 steps left / the 1 step done
    assert 3 * (before - began) - 0.1 <= view["eta_s"] <= 3 * (after - began) + 0.1, view
