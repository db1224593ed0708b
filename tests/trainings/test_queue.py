"""The training queue and what it keeps, fast tier (issue 24): per-tenant running caps, a cancel
that is retried until the job really stopped, the wall-clock limit, tenant names with ``--``,
retention of ended trainings' files, and the paginated listing. Ray's Jobs API is a fake whose
statuses the tests set; the job's entrypoint runs in-process without Ray where a test needs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from raydb.registry import list_subjects
from raydb.serving.subjects import find_subject
from raydb.storage import Storage
from raydb.trainings.job import run_training
from raydb.trainings.queue import queue_counts, reconcile
from raydb.trainings.retention import tenant_usage
from raydb.trainings.store import TrainingStore
from tests.helpers.trainings import auth
from tests.helpers.trainings import post_training as _post


def _status(c, tid: str, key: str = "key-one") -> dict:
    return c.get(f"/v1/trainings/{tid}", headers=auth(key)).json()


def test_the_queue_honours_the_per_tenant_running_cap(service):
    """Two job slots on the cluster, one per tenant: t1's second training waits although a slot is
    free, and t2's starts ahead of it (a tenant at its cap is skipped, not blocking others)."""
    cfg, jobs, client = service
    cfg.service.max_concurrent_trainings = 2
    c = client()
    a = _post(c, subject_id="a").json()
    b = _post(c, subject_id="b").json()
    other = _post(c, key="key-two", subject_id="c").json()
    assert (a["status"], b["status"], other["status"]) == ("running", "queued", "running")
    assert jobs.submitted == [a["job_id"], other["job_id"]]
    jobs.statuses[a["job_id"]] = "SUCCEEDED"  # a's job ends (without a result: it fails) ...
    c.app.state.raydb_trainings.service.pass_queue()
    assert _status(c, b["id"])["status"] == "running"  # ... and t1's next one takes its place


def test_a_cancel_whose_stop_fails_keeps_the_slot_until_the_job_has_stopped(service):
    """A failing ``ray job stop`` used to answer 500 and leave the job running outside the
    accounting (its slot freed, a new job started: one over max_concurrent_trainings). Now the
    cancel is decided (200, ``cancelled``, nothing will register), the stop is retried on every
    queue pass, and the slot is held until the Jobs API reports the job ended."""
    cfg, jobs, client = service
    c = client()
    svc = c.app.state.raydb_trainings.service
    first = _post(c).json()
    waiting = _post(c, subject_id="fido").json()
    jobs.failing_stops = 3
    resp = c.delete(f"/v1/trainings/{first['id']}", headers=auth())  # its stop, and its pass's, fail
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert jobs.statuses[first["job_id"]] == "RUNNING" and len(jobs.stop_calls) == 2
    svc.pass_queue()  # the third stop fails too: the job runs, its slot stays taken
    assert _status(c, waiting["id"])["status"] == "queued" and queue_counts(svc.store)["running"] == 1
    svc.pass_queue()  # the fourth works (the job is STOPPED now); this pass still counted it
    assert jobs.stopped == [first["job_id"]] and jobs.stop_calls == [first["job_id"]] * 4
    assert _status(c, waiting["id"])["status"] == "queued"
    svc.pass_queue()  # the job is seen to have ended: the slot is free, the waiting training starts
    assert _status(c, waiting["id"])["status"] == "running" and len(jobs.submitted) == 2
    assert jobs.stop_calls == [first["job_id"]] * 4  # no stop for a job that ended


def test_a_training_past_max_training_seconds_is_stopped_and_fails_saying_so(service):
    """Jobs had no wall-clock limit. Past ``service.max_training_seconds`` the queue claims the
    training's outcome (as DELETE would), stops the job and the training reads ``failed`` with the
    reason; the job, if it ever gets there, finds the outcome taken and registers nothing."""
    cfg, jobs, client = service
    cfg.service.max_training_seconds = 60
    c = client()
    svc = c.app.state.raydb_trainings.service
    tid = _post(c).json()["id"]
    waiting = _post(c, subject_id="fido").json()["id"]
    sub = jobs.submitted[0]
    assert reconcile(svc.store, jobs, cfg, now=time.time() + 30) == [] and jobs.stop_calls == []
    assert reconcile(svc.store, jobs, cfg, now=time.time() + 61) == [] and jobs.stopped == [sub]
    view = _status(c, tid)
    assert view["status"] == "failed"
    assert view["error"] == "stopped: it ran longer than service.max_training_seconds (60 s)"
    assert run_training(svc.store, "t1", tid, local=True) == "cancelled"  # a job that had not stopped
    assert list_subjects(Storage(), cfg.workspace, "t1") == {}
    svc.pass_queue()  # the job ended: the next training starts
    assert _status(c, waiting)["status"] == "running"


def test_a_tenant_named_with_double_dashes_can_train(service):
    """The queue's file names are ``<ns>--<tenant>--<id>.json``: a tenant with ``--`` in its name
    split into four parts and was skipped forever (queued, never started)."""
    cfg, jobs, client = service
    c = client()
    resp = _post(c, key="key-dashes")
    assert resp.status_code == 202 and resp.json()["status"] == "running", resp.text
    assert jobs.submitted == [f"raydb-a--b-{resp.json()['id']}"]
    store = TrainingStore(Storage(), cfg.workspace)
    assert run_training(store, "a--b", resp.json()["id"], local=True) == "succeeded"
    assert find_subject(Storage(), cfg.workspace, "a--b", "rex").version == "v0001"


def test_an_ended_trainings_photos_and_runs_are_deleted_after_retention(service):
    """``service.retention_s`` after its job ended, a training's photos and run folder are deleted;
    its record stays (with the progress it had), and so does the registered adapter."""
    cfg, jobs, client = service
    cfg.service.retention_s = 3600
    c = client()
    svc = c.app.state.raydb_trainings.service
    tid = _post(c).json()["id"]
    assert run_training(svc.store, "t1", tid, local=True) == "succeeded"
    jobs.statuses[jobs.submitted[0]] = "SUCCEEDED"
    svc.pass_queue()  # the job ended: the retention clock starts
    photos, run = Path(svc.store.photos_uri("t1", tid)), Path(svc.store.status("t1", tid)["run_uri"])
    before = tenant_usage(svc.store, "t1")
    svc.pass_queue()
    assert photos.is_dir() and run.is_dir()  # an hour to go
    cfg.service.retention_s = 0
    svc.pass_queue()
    assert not photos.exists() and not run.exists()
    assert tenant_usage(svc.store, "t1") < before
    view = _status(c, tid)
    assert view["status"] == "succeeded" and (view["step"], view["max_steps"]) == (2, 2) and view["loss"] > 0
    assert view["files_deleted_at"] is not None
    assert Path(find_subject(Storage(), cfg.workspace, "t1", "rex").uri).is_dir()  # the adapter stays
    svc.pass_queue()  # nothing left to delete
    assert list((Path(cfg.workspace) / "service" / "retention").iterdir()) == []


def test_listing_pages_through_the_tenants_trainings_reading_only_the_page(service, monkeypatch):
    """``GET /v1/trainings`` read every record of the tenant; now a page (``?limit=``, at most
    ``service.max_page_size``) in creation order, with the ``next`` cursor for ``?after=``."""
    cfg, jobs, client = service
    cfg.service.max_queued_trainings, cfg.service.max_queued_per_tenant = 6, 5
    cfg.service.max_page_size = 3
    c = client()
    ids = [_post(c, subject_id=f"s{i}").json()["id"] for i in range(5)]
    assert ids == sorted(ids)  # ids sort by creation time
    reads = []
    real = TrainingStore.request
    monkeypatch.setattr(TrainingStore, "request", lambda self, t, i: reads.append(i) or real(self, t, i))
    page = c.get("/v1/trainings?limit=2", headers=auth()).json()
    assert [v["id"] for v in page["trainings"]] == ids[:2] and page["next"] == ids[1]
    assert sorted(set(reads)) == ids[:2]  # only the page's records were read
    page = c.get(f"/v1/trainings?limit=2&after={page['next']}", headers=auth()).json()
    assert [v["id"] for v in page["trainings"]] == ids[2:4] and page["next"] == ids[3]
    page = c.get(f"/v1/trainings?after={page['next']}", headers=auth()).json()
    assert [v["id"] for v in page["trainings"]] == ids[4:] and page["next"] is None
    assert [v["id"] for v in c.get("/v1/trainings", headers=auth()).json()["trainings"]] == ids[:3]
    for limit in (0, 4, -1):
        resp = c.get(f"/v1/trainings?limit={limit}", headers=auth())
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "limit"], resp.text
    assert c.get("/v1/trainings", headers=auth("key-two")).json() == {"trainings": [], "next": None}


def test_queue_and_retention_files_name_their_tenant_exactly(tmp_path):
    """The queue's name parser takes the tenant between the first and the last ``--``."""
    from raydb.trainings.store import parse_entry

    assert parse_entry("00000000000000000012--a--b--tr-0190abc.json") == (12, "a--b", "tr-0190abc")
    assert parse_entry("00000000000000000012--t1--tr-1.json") == (12, "t1", "tr-1")
    for bad in ("12--t1.json", "x--t1--tr-1.json", "00000000000000000012--t1--tr-1.txt", "--t1--x.json",
                "00000000000000000012----tr-1.json"):
        assert parse_entry(bad) is None, bad
    store = TrainingStore(Storage(), str(tmp_path))
    (tmp_path / "service" / "queue").mkdir(parents=True)
    (tmp_path / "service" / "queue" / "stray.json").write_text(json.dumps({}))
    assert store.active() == []


def test_the_lease_is_exclusive_outlives_no_dead_holder_and_gives_up_in_time(tmp_path):
    """Admissions and queue passes decide under one lease: a second taker waits (LeaseBusy after
    ``wait_s``), takes over from a holder whose lease expired (it died) or whose record is
    unreadable, and a release by a holder whose lease was taken over leaves the new holder's alone."""
    import pytest

    from raydb.trainings.store import LeaseBusy

    store = TrainingStore(Storage(), str(tmp_path))
    lease = tmp_path / "service" / "lease.json"
    with store.lease():
        holder = json.loads(lease.read_text())["holder"]
        with pytest.raises(LeaseBusy, match="busy"):
            with store.lease(wait_s=0.2):
                pass
    assert json.loads(lease.read_text()) == {"holder": None, "expires": 0}  # released
    with store.lease():
        assert json.loads(lease.read_text())["holder"] not in (None, holder)
    for dead in ({"holder": "dead", "expires": time.time() - 1}, "not json"):
        lease.write_text(dead if isinstance(dead, str) else json.dumps(dead))
        with store.lease(wait_s=0.5):
            pass
    slow, taker = store.lease(ttl_s=0.05), store.lease(wait_s=0.5)
    slow.__enter__()
    time.sleep(0.1)  # the slow holder overran its lease: another takes it over ...
    taker.__enter__()
    new_holder = json.loads(lease.read_text())["holder"]
    slow.__exit__(None, None, None)  # ... and the slow one's release leaves the new holder's lease
    assert json.loads(lease.read_text())["holder"] == new_holder
    taker.__exit__(None, None, None)
    assert json.loads(lease.read_text()) == {"holder": None, "expires": 0}
