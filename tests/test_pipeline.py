"""Stage skipping without Ray: manifest hashing, matching, and the run-or-skip decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydb.pipeline import (
    StageResult,
    format_summary,
    inputs_key,
    manifest_matches,
    run_stage,
    stage_inputs,
)
from raydb.storage import Storage


def test_inputs_key_is_order_independent_and_value_sensitive():
    assert inputs_key({"a": 1, "b": {"c": 2, "d": 3}}) == inputs_key({"b": {"d": 3, "c": 2}, "a": 1})
    assert inputs_key({"a": 1}) != inputs_key({"a": 2})


def test_manifest_matches_needs_same_key_and_outputs():
    key = inputs_key({"x": 1})
    assert manifest_matches({"inputs_key": key, "outputs": {}}, key)
    assert not manifest_matches(None, key)
    assert not manifest_matches({"inputs_key": key}, key)  # written without outputs: incomplete
    assert not manifest_matches({"inputs_key": "other", "outputs": {}}, key)


class _Counter:
    def __init__(self, tmp: Path):
        self.calls = 0
        self.out = tmp / "artifact.txt"

    def run(self) -> dict:
        self.calls += 1
        self.out.write_text(str(self.calls))
        return {"artifact": str(self.out)}

    def exists(self, outputs: dict) -> bool:
        return Path(outputs["artifact"]).is_file()


def test_run_stage_skips_reruns_on_change_and_on_missing_outputs(tmp_path):
    storage, stage = Storage(), _Counter(tmp_path)
    uri = str(tmp_path / "pipeline" / "s" / "train.json")
    first = run_stage(storage, uri, "train", {"lr": 1e-3}, stage.run, stage.exists)
    assert (first.status, stage.calls) == ("ran", 1)
    manifest = json.loads(Path(uri).read_text())
    assert manifest["inputs"] == {"lr": 1e-3} and manifest["outputs"] == first.outputs

    again = run_stage(storage, uri, "train", {"lr": 1e-3}, stage.run, stage.exists)
    assert (again.status, stage.calls, again.outputs) == ("skipped", 1, first.outputs)

    changed = run_stage(storage, uri, "train", {"lr": 2e-3}, stage.run, stage.exists)
    assert (changed.status, stage.calls) == ("ran", 2)

    stage.out.unlink()  # outputs gone: the matching manifest alone is not enough
    redo = run_stage(storage, uri, "train", {"lr": 2e-3}, stage.run, stage.exists)
    assert (redo.status, stage.calls) == ("ran", 3)


def test_failed_stage_keeps_old_manifest_and_is_redone(tmp_path):
    storage, stage = Storage(), _Counter(tmp_path)
    uri = str(tmp_path / "encode.json")
    run_stage(storage, uri, "encode", {"v": 1}, stage.run, stage.exists)
    before = Path(uri).read_text()

    def boom() -> dict:
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        run_stage(storage, uri, "encode", {"v": 2}, boom, stage.exists)
    assert Path(uri).read_text() == before
    assert run_stage(storage, uri, "encode", {"v": 2}, stage.run, stage.exists).status == "ran"


def test_stage_inputs_follow_only_relevant_fields(make_cfg, tmp_path):
    storage = Storage()
    base = make_cfg()
    steps = make_cfg(train={"max_steps": 7})
    concurrency = make_cfg(prior={"concurrency": 3})
    photos = make_cfg(subject={"instance_prompt": "a photo of zwx toy"})

    def key(cfg, stage):
        return inputs_key(stage_inputs(cfg, storage, stage))

    # Training length changes training and registration, not priors or the encoded cache.
    assert key(base, "prior") == key(steps, "prior") and key(base, "encode") == key(steps, "encode")
    assert key(base, "train") != key(steps, "train") and key(base, "register") != key(steps, "register")
    # The number of generator actors changes no pixels.
    assert key(base, "prior") == key(concurrency, "prior")
    assert key(base, "prior") == key(photos, "prior") and key(base, "encode") != key(photos, "encode")
    # A local photo folder is fingerprinted by its files' contents.
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"1")
    local = make_cfg(subject={"instance_data": str(folder)})
    k1 = key(local, "encode")
    (folder / "b.png").write_bytes(b"2")
    k2 = key(local, "encode")
    assert k2 != k1
    (folder / "b.png").write_bytes(b"3")  # replaced under the same name and size
    assert key(local, "encode") != k2
    tuned = make_cfg(tune={"learning_rate": [1e-4, 1e-3]})
    assert key(tuned, "register") == key(tuned, "tune") != key(base, "train")
    # prior.mode: the images to generate (none, or a search's held-out ones) key the prior stage,
    # and a search over the mode generates the image-mode trials' class images as well
    model = make_cfg(prior={"mode": "model", "num_holdout": 2})
    searched = make_cfg(prior={"mode": "model", "num_holdout": 2}, tune={"prior_mode": ["model"]})
    mixed = make_cfg(prior={"mode": "model"}, tune={"prior_mode": ["images", "model"]})
    assert len({key(base, "prior"), key(model, "prior"), key(searched, "prior"), key(mixed, "prior")}) == 4
    assert key(base, "train") != key(model, "train")
    assert key(mixed, "tune") != key(make_cfg(prior={"mode": "model"}, tune={}), "tune")
    # tune.metric and the judges it needs key the search once set (left out at their defaults)
    judged = make_cfg(tune={}, eval={"fidelity": "digits"})
    assert key(judged, "tune") != key(make_cfg(tune={}), "tune")
    ranked = make_cfg(tune={"metric": "val_fidelity"}, eval={"fidelity": "digits"})
    assert key(ranked, "tune") != key(judged, "tune")


def test_summary_table_lists_every_stage():
    text = format_summary([
        StageResult("prior", "skipped", 0.01, {"images": 4, "cache_uri": "/ws/priors/k"}),
        StageResult("train", "ran", 12.3, {"steps": 6, "adapter_uri": "/ws/runs/a", "reused": True}),
        StageResult("register", "ran", 0.2, {"version": "v0001",
                                             "uri": "/ws/tenants/t1/subjects/demo/v0001"}),
    ])
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["stage", "status", "seconds"]
    assert lines[2].split()[:3] == ["prior", "skipped", "0.0"] and "4 images" in lines[2]
    assert "6 steps -> /ws/runs/a (found finished)" in lines[3]
    assert "v0001 at /ws/tenants/t1/subjects/demo/v0001" in lines[4]
    off = [format_summary([StageResult("prior", "off", 0.0, {"class_data": data, "mode": mode})])
           for data, mode in ((None, "model"), (None, "images"), ("/c", "model"))]
    assert "prior from the base model (no class images)" in off[0]
    assert "prior preservation off" in off[1] and "class images from /c" in off[2]


def test_a_run_that_registers_moves_a_global_registry_to_per_tenant_names_first(make_cfg):
    """Subject ids are per tenant (issue 24): before its first stage, a run that will register moves
    a registry of the old global namespace (``subjects/<id>/``) under each version's tenant, so a
    CLI-only workspace migrates on its first registration. (Here the register stage then finds no
    trained adapter: only the move is looked at.)"""
    import hashlib

    from raydb.pipeline import run_pipeline
    from raydb.registry import latest_version

    cfg = make_cfg()
    old = Path(cfg.workspace) / "subjects" / "rex" / "v0001"
    old.mkdir(parents=True)
    (old / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (old / "adapter.json").write_text(json.dumps({"subject": {"tenant": "t9"},
                                                  "weights_sha256": hashlib.sha256(b"w").hexdigest()}))
    with pytest.raises(ValueError, match="no finished train stage"):
        run_pipeline(cfg, stages=["register"], local=True, quiet=True)
    assert latest_version(Storage(), cfg.workspace, "t9", "rex")["versions"] == ["v0001"]
    assert not (Path(cfg.workspace) / "subjects" / "rex").exists()


@pytest.mark.heavy
def test_only_the_register_stage_registers(make_cfg):
    """The job's two calls: prior + train leave a finished adapter and no registry entry; ``register``
    alone then registers that adapter. Everything lands under the subject's tenant
    (``tenants/<tenant>/``: runs, manifests, the registry)."""
    from raydb.pipeline import run_pipeline
    from raydb.registry import latest_version

    cfg = make_cfg(train={"max_steps": 2}, prior={"enabled": False}, subject={"tenant": "t7"})
    trained = run_pipeline(cfg, stages=["prior", "train"], local=True, quiet=True)
    assert Path(trained["adapter_uri"], "adapter.json").is_file() and trained["registered"] is None
    home = Path(cfg.workspace) / "tenants" / "t7"
    assert sorted(p.name for p in home.iterdir()) == ["pipeline", "runs"]
    assert trained["adapter_uri"].startswith(str(home / "runs" / cfg.subject.id) + "/")
    registered = run_pipeline(cfg, stages=["register"], local=True, quiet=True)
    record = latest_version(Storage(), cfg.workspace, "t7", cfg.subject.id)
    assert registered["registered"] == record["uri"] and record["version"] == "v0001"
    assert sorted(p.name for p in home.iterdir()) == ["pipeline", "runs", "subjects"]
    weights = "pytorch_lora_weights.safetensors"
    assert Path(record["uri"], weights).read_bytes() == Path(trained["adapter_uri"], weights).read_bytes()
