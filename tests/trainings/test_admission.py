"""Admission to the training service, fast tier (issue 24): overrides typed and bounded by the config
layer, the operator's maxima checked before any photo is decoded, searches capped in trials and
GPUs, the fair queue and its atomic slot take, Idempotency-Keys bound to their request, and the
tenant's storage quota. The routes run on a plain FastAPI app, Ray's Jobs API is a fake."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from raydb.config import ConfigError, RaydbConfig, load_config
from raydb.errors import Refused
from raydb.serving.status import http_status
from raydb.storage import Storage
from raydb.trainings.queue import queue_counts
from raydb.trainings.retention import tenant_usage
from raydb.trainings.store import TrainingStore
from tests.helpers.trainings import FIELDS, auth, demo_photos
from tests.helpers.trainings import post_training as _post


def _refusal(resp) -> str:
    detail = resp.json()["detail"]
    return detail if isinstance(detail, str) else detail[0]["msg"]


@pytest.mark.parametrize("overrides, text", [
    ({"train.max_steps": "1000000000"}, "train.max_steps: Input should be a valid integer"),
    ({"train.max_steps": 1e9}, "train.max_steps: Input should be a valid integer"),
    ({"train.max_steps": 10**9}, "train.max_steps: at most 2000 (service.max_train_steps), got 1000000000"),
    ({"train.max_steps": 2001}, "train.max_steps: at most 2000 (service.max_train_steps), got 2001"),
    ({"lora.rank": "8"}, "lora.rank: Input should be a valid integer"),
    ({"lora.rank": 33}, "lora.rank: at most 32 (service.max_lora_rank), got 33"),
    ({"train.resolution": 1032}, "train.resolution: at most 1024 (service.max_resolution), got 1032"),
    ({"train.learning_rate": "0.1"}, "train.learning_rate: Input should be a valid number"),
    ({"train.learning_rate": float("nan")}, "train.learning_rate: Input should be greater than 0"),
    ({"train.max_steps": True}, "train.max_steps: Input should be a valid integer"),
])
def test_numbers_sent_as_strings_or_floats_are_held_to_the_integers_limits(service, overrides, text):
    """The step-limit bypass: ``"1000000000"`` and ``1e9`` passed the old ``isinstance(steps, int)``
    check and were stored as 10⁹ steps. Each override is now validated strictly by its own config
    field, then the whole typed config against the operator's maxima: 422 naming the field."""
    cfg, jobs, client = service
    resp = _post(client(), overrides=json.dumps(overrides))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"][0]
    assert detail["loc"] == ["body", "overrides"] and text in detail["msg"], detail
    assert jobs.submitted == [] and not (cfg.workspace and TrainingStore(Storage(), cfg.workspace).page(
        "t1", None, 10)[0])


def test_a_resolution_or_rank_over_the_maximum_is_refused_before_any_photo_is_decoded(service, monkeypatch):
    """Resolution 10000 used to be accepted and every photo prepared at it inside the ingress (GBs of
    memory per request). The maxima are checked on the typed config, before the first photo is read:
    here PIL and the ingestion code would fail the test if they were called at all."""
    import PIL.Image

    import raydb.data.ingest

    def never(*args, **kwargs):
        raise AssertionError("a photo was decoded")

    monkeypatch.setattr(PIL.Image, "open", never)
    monkeypatch.setattr(raydb.data.ingest, "load_images", never)
    cfg, jobs, client = service
    cfg.serve.max_lora_rank = 8  # the server's own cap is the lower one here
    c = client()
    for overrides, text in [({"train.resolution": 10000}, "train.resolution: at most 1024"),
                            ({"lora.rank": 16}, "lora.rank: at most 8 (serve.max_lora_rank), got 16"),
                            ({"train.resolution": 4096, "lora.rank": 64}, "; lora.rank: at most 8")]:
        resp = _post(c, overrides=json.dumps(overrides))
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["body", "overrides"] and text in _refusal(resp)


def test_a_resolution_the_base_models_family_cannot_train_at_is_422(make_cfg, tmp_path):
    """On a FLUX.1 base, train.resolution must be a multiple of 16: refused at submission (not by
    the job, after a queue wait), the family read from the model's config files without loading it."""
    from tests.helpers.trainings import FakeJobs, trainings_client

    cfg = make_cfg(workspace=str(tmp_path / "ws"), model={"pretrained": "tiny-flux"},
                   prior={"enabled": False}, train={"max_steps": 2, "resolution": 64})
    jobs = FakeJobs()
    client = trainings_client(cfg, jobs)
    resp = _post(client, overrides=json.dumps({"train.resolution": 72}))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"][0]
    assert detail["loc"] == ["body", "overrides"] and "FLUX.1 needs a multiple of 16" in detail["msg"]
    assert jobs.submitted == [] and not TrainingStore(Storage(), cfg.workspace).page("t1", None, 10)[0]
    assert _post(client, overrides=json.dumps({"train.resolution": 80})).status_code == 202


def test_a_search_is_capped_in_trials_and_counted_in_gpus(service):
    """``tune: true`` used to run as many trials at once as the cluster had GPUs. Now the stored
    search runs ``service.max_tune_gpus // cluster.num_workers`` trials at a time, a trial that alone
    needs more GPUs is refused, and an operator search planning more than ``service.max_tune_trials``
    trials is a config error at start."""
    cfg, jobs, client = service
    cfg.service.max_tune_gpus = 3
    c = client()

    def stored_concurrency(resp) -> int:
        assert resp.status_code == 202, resp.text
        request = TrainingStore(Storage(), cfg.workspace).request("t1", resp.json()["id"])
        return RaydbConfig.model_validate(request["config"]).tune.max_concurrent_trials

    assert stored_concurrency(_post(c, overrides=json.dumps({"tune": True}))) == 3
    cfg.service.max_queued_trainings, cfg.service.max_queued_per_tenant = 6, 5
    cfg.cluster.num_workers = 2
    assert stored_concurrency(_post(c, subject_id="b", overrides=json.dumps({"tune": True}))) == 1
    cfg.service.tune.max_concurrent_trials = 1
    cfg.cluster.num_workers = 1
    assert stored_concurrency(_post(c, subject_id="c", overrides=json.dumps({"tune": True}))) == 1
    cfg.cluster.num_workers = 4
    resp = _post(c, subject_id="d", overrides=json.dumps({"tune": True}))
    assert resp.status_code == 422 and "more than service.max_tune_gpus (3)" in _refusal(resp)
    grid = {"prior_loss_weight": [0.0, 0.5, 1.0], "learning_rate": [1e-4, 1e-3, 1e-2]}
    with pytest.raises(ConfigError, match=r"service.tune plans 9 trials, more than service.max_tune_trials"):
        load_config(data={"service": {"tune": grid}})
    assert load_config(data={"service": {"tune": grid, "max_tune_trials": 9}}).service.tune.planned_trials \
        == 9


def test_eight_racing_submissions_for_one_free_slot_accept_exactly_one(service):
    """The capacity check was not atomic: with one slot, eight concurrent submissions were all
    accepted. Admission now happens under the queue's lease: exactly one takes the slot."""
    cfg, jobs, client = service
    c = client()
    assert _post(c).status_code == 202  # running: the cluster's one job slot is taken
    svc = c.app.state.raydb_trainings.service
    photos = demo_photos(3, 96)
    barrier = threading.Barrier(8)

    def submit(i: int) -> int:
        barrier.wait()
        try:
            svc.submit("t1", FIELDS | {"subject_id": f"s{i}"}, photos, None)
            return 202
        except Refused as exc:
            return http_status(exc)

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(submit, range(8)))
    assert sorted(codes) == [202] + [429] * 7, codes
    counts = queue_counts(svc.store)
    assert (counts["queued"], counts["running"]) == (1, 1)
    page, _ = svc.store.page("t1", None, 100)
    assert len(page) == 2  # the refused ones left nothing behind


def test_an_idempotency_key_reused_with_another_request_is_refused(service):
    """The same key with a different body used to answer 200 with the first training, silently
    dropping the second request. Now: 422 naming the header and the training the key belongs to; the
    same body still gets the first training; a refused submission does not burn its key."""
    cfg, jobs, client = service
    c = client()
    first = _post(c, idem="order-1")
    assert first.status_code == 202
    assert _post(c, idem="order-1").json()["id"] == first.json()["id"]
    changes = ({"subject_id": "fido"}, {"photos": demo_photos(2, 96)}, {"overrides": '{"lora.rank": 2}'})
    for changed in changes:
        resp = _post(c, idem="order-1", **changed)
        assert resp.status_code == 422, (changed, resp.text)
        detail = resp.json()["detail"][0]
        assert detail["loc"] == ["header", "Idempotency-Key"] and first.json()["id"] in detail["msg"]
    # the queue is full for t1 (one waiting): refused, and the key stays free for the retry
    assert _post(c, subject_id="second").status_code == 202
    assert _post(c, idem="order-2", subject_id="third").status_code == 429
    c.delete(f"/v1/trainings/{first.json()['id']}", headers=auth())  # the queued one starts
    retried = _post(c, idem="order-2", subject_id="third")
    assert retried.status_code == 202 and retried.json()["subject_id"] == "third"
    # a key whose admission crashed before its training was written does not block the key
    store = c.app.state.raydb_trainings.service.store
    store.claim_idempotency("t2", "order-3", "tr-000000000000aaaaaaaaaaaa", "whatever")
    fresh = _post(c, key="key-two", idem="order-3", subject_id="again")
    assert fresh.status_code == 202 and fresh.json()["id"] != "tr-000000000000aaaaaaaaaaaa"
    assert store.idempotent("t2", "order-3")["id"] == fresh.json()["id"]


def test_a_submit_and_cancel_loop_stays_within_the_tenants_quota(service):
    """Each accepted submission stored its photos and ``DELETE`` deleted nothing, so a loop of
    submit + cancel grew the workspace without bound. The tenant's bytes (its own upload included)
    are now checked under the lease: past ``service.tenant_quota_bytes`` the submission gets 413,
    other tenants are unaffected, and the bytes come back once the retention time has passed."""
    cfg, jobs, client = service
    cfg.service.retention_s = 3600
    c = client()
    store = TrainingStore(Storage(), cfg.workspace)
    first = _post(c)
    one = tenant_usage(store, "t1")
    assert first.status_code == 202 and one > 0
    cfg.service.tenant_quota_bytes = int(2.5 * one)
    c.delete(f"/v1/trainings/{first.json()['id']}", headers=auth())
    codes = []
    for i in range(6):
        resp = _post(c, subject_id=f"loop{i}")
        codes.append(resp.status_code)
        if resp.status_code == 202:
            cancelled = c.delete(f"/v1/trainings/{resp.json()['id']}", headers=auth())
            assert cancelled.json()["status"] == "cancelled"
        else:
            assert resp.status_code == 413 and "service.tenant_quota_bytes" in _refusal(resp), resp.text
        assert tenant_usage(store, "t1") <= cfg.service.tenant_quota_bytes
    assert codes == [202, 413, 413, 413, 413, 413]
    assert _post(c, key="key-two").status_code == 202  # another tenant's quota is its own
    cfg.service.retention_s = 0  # the ended trainings' photos go on the next pass
    c.app.state.raydb_trainings.service.pass_queue()
    assert tenant_usage(store, "t1") < one
    assert _post(c, subject_id="after").status_code == 202
