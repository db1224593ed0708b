"""Many subjects in one job: ``raydb batch --manifest subjects.yaml`` (and ``jobs/batch.py``).

A manifest lists subjects over one base config::

    defaults:                 # optional: config sections merged over --config for every subject
      train: {max_steps: 400}
    subjects:
      - id: rex
        tenant: shop1         # optional (default: the base config's subject.tenant)
        instance_data: photos/rex      # relative paths are relative to the manifest
        instance_prompt: a photo of sks dog
        class_prompt: a photo of a dog
        config: {train: {learning_rate: 5.0e-5}}   # optional per-subject overrides

``run_batch`` works in three phases, each subject's failure recorded and isolated:

1. **check**: every subject's config is validated and its photos decoded by the ingestion rules, so a
   bad subject fails before any compute is spent on it;
2. **priors**: subjects are grouped by their prior stage's inputs (base model, class prompt, prior
   settings, resolution: the same hash the pipeline's prior manifest uses) and each group's class
   images are generated *once*, before any training starts — concurrent trainings of one class would
   otherwise race to generate the same blocks;
3. **train**: each subject runs the whole pipeline (``run_pipeline``: priors found in the cache,
   its own encode pass, train or tune, register). With Ray each subject is a task (``num_cpus=0``:
   the task only drives Ray Data / Ray Train, whose workers reserve the CPUs and GPUs), at most
   ``max_concurrent`` in flight, so trainings share the cluster as its resources allow and Ray queues
   the rest; ``local`` runs them one after another in this process (no Ray).

A rerun is cheap: the pipeline's manifests skip every finished stage, so finished subjects train
nothing. The end is a table (subject, status, seconds, version, error) and a summary dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydb.config import ConfigError, RaydbConfig, load_config
from raydb.errors import error_line
from raydb.storage import Storage, is_s3

__all__ = ["BatchSubject", "SubjectOutcome", "load_manifest", "run_batch", "format_batch_summary"]

_SUBJECT_KEYS = {"id", "tenant", "instance_data", "instance_prompt", "class_prompt", "instance_token",
                 "config"}


@dataclass
class BatchSubject:
    """One manifest entry resolved to a validated config (or the error that stopped it)."""

    subject_id: str
    cfg: RaydbConfig | None
    error: str | None = None


@dataclass
class SubjectOutcome:
    """One row of the batch summary. ``status``: ``trained`` (its train or tune stage ran),
    ``skipped`` (training found finished; ``stages`` says whether a cheaper stage still ran, e.g. the
    encode stage of a subject first trained with ``--local``) or ``failed``."""

    subject_id: str
    status: str
    seconds: float = 0.0
    version: str | None = None
    registered: str | None = None
    error: str | None = None
    stages: dict[str, str] = field(default_factory=dict)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def load_manifest(path: str | Path, base: RaydbConfig) -> list[BatchSubject]:
    """Parse ``path`` into one :class:`BatchSubject` per entry, each config validated over ``base``.

    A malformed manifest (not YAML, no ``subjects`` list, duplicate ids) raises ConfigError; a bad
    entry only marks that subject failed, naming the entry and the field.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"manifest {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), list) or not data["subjects"]:
        raise ConfigError(f"manifest {p}: needs a non-empty 'subjects' list")
    unknown = set(data) - {"defaults", "subjects"}
    if unknown:
        raise ConfigError(f"manifest {p}: unknown top-level key(s) {sorted(unknown)}")
    base_dict = _merge(base.to_dict(), data.get("defaults") or {})
    out: list[BatchSubject] = []
    for i, entry in enumerate(data["subjects"]):
        where = f"manifest {p}: subjects[{i}]"
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(f"{where}: each subject is a mapping with at least an 'id'")
        sid = str(entry["id"])
        extra = set(entry) - _SUBJECT_KEYS
        if extra:
            out.append(BatchSubject(sid, None, f"{where}: unknown key(s) {sorted(extra)}"))
            continue
        subject = {k: v for k, v in entry.items() if k not in ("config",)}
        data_uri = subject.get("instance_data")
        if isinstance(data_uri, str) and not is_s3(data_uri) and not data_uri.startswith("builtin:"):
            subject["instance_data"] = str((p.parent / data_uri).resolve())
        merged = _merge(base_dict, entry.get("config") or {})
        merged["subject"] = _merge(merged.get("subject", {}), subject)
        try:
            out.append(BatchSubject(sid, load_config(data=merged)))
        except ConfigError as exc:
            out.append(BatchSubject(sid, None, f"{where} ({sid}): {exc}"))
    ids = [s.subject_id for s in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"manifest {p}: duplicate subject id(s) {dupes}")
    return out


def _check_photos(cfg: RaydbConfig, storage: Storage) -> None:
    """Decode the subject's photos by the ingestion rules (raises IngestError naming each file)."""
    from raydb.data.ingest import load_images

    load_images(cfg.subject.instance_data, cfg.train.resolution, storage=storage,
                center_crop=cfg.train.center_crop)


def _prior_groups(subjects: list[BatchSubject], storage: Storage) -> dict[str, list[BatchSubject]]:
    """Subjects that need generated class images, keyed by their prior stage's inputs hash
    (``prior.mode: model`` subjects need none, unless a search validates on held-out ones)."""
    from raydb.pipeline import inputs_key, stage_inputs
    from raydb.prior.stage import prior_total_images

    groups: dict[str, list[BatchSubject]] = {}
    for s in subjects:
        if s.cfg is not None and prior_total_images(s.cfg):
            groups.setdefault(inputs_key(stage_inputs(s.cfg, storage, "prior")), []).append(s)
    return groups


def _outcome(subject_id: str, summary: dict[str, Any], seconds: float) -> SubjectOutcome:
    stages = {s["stage"]: s["status"] for s in summary["stages"]}
    trained = "ran" in (stages.get("train"), stages.get("tune"))
    version = next((s["outputs"].get("version") for s in summary["stages"] if s["stage"] == "register"), None)
    return SubjectOutcome(subject_id, "trained" if trained else "skipped", seconds, version,
                          summary.get("registered"), stages=stages)


def _run_subject(cfg_dict: dict[str, Any], local: bool) -> dict[str, Any]:
    """One subject's whole pipeline; returns its summary or ``{"error": ...}`` (never raises)."""
    from raydb.pipeline import run_pipeline

    start = time.perf_counter()
    cfg = RaydbConfig.model_validate(cfg_dict)
    try:
        summary = run_pipeline(cfg, local=local, quiet=True)
    except Exception as exc:  # isolated: one subject's failure is its row, not the batch's
        return {"error": error_line(exc), "seconds": time.perf_counter() - start}
    return {"summary": summary, "seconds": time.perf_counter() - start}


def _run_trainings(todo: list[BatchSubject], local: bool, max_concurrent: int | None,
                   done: Callable[[BatchSubject, dict[str, Any]], None]) -> None:
    if local:
        for s in todo:
            done(s, _run_subject(s.cfg.to_dict(), True))
        return
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_run_subject)
    limit = max_concurrent or len(todo)
    pending: dict[Any, BatchSubject] = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < limit:
            s = queue.pop(0)
            pending[task.remote(s.cfg.to_dict(), False)] = s
        ready, _ = ray.wait(list(pending), num_returns=1)
        s = pending.pop(ready[0])
        try:
            done(s, ray.get(ready[0]))
        except Exception as exc:  # the task's process died (OOM, node lost)
            done(s, {"error": error_line(exc), "seconds": 0.0})


def run_batch(subjects: list[BatchSubject], storage: Storage | None = None, *, local: bool = False,
              max_concurrent: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Check, fill priors once per class, train every subject; returns ``{subjects: [rows], priors:
    [{key, subjects, images_generated}], failed: n}``. Needs Ray unless ``local``."""
    from raydb.pipeline import run_pipeline

    start_cfg = next((s.cfg for s in subjects if s.cfg is not None), None)
    storage = storage or Storage(start_cfg.s3_endpoint_url if start_cfg else None)
    outcomes: dict[str, SubjectOutcome] = {}

    def fail(s: BatchSubject, error: str) -> None:
        outcomes[s.subject_id] = SubjectOutcome(s.subject_id, "failed", error=error)
        s.cfg = None

    for s in subjects:  # 1. check
        if s.cfg is None:
            fail(s, s.error or "invalid config")
            continue
        try:
            _check_photos(s.cfg, storage)
        except Exception as exc:
            fail(s, error_line(exc))
    priors = []
    for key, group in _prior_groups(subjects, storage).items():  # 2. one prior fill per class
        class_prompt = group[0].cfg.subject.class_prompt
        if not quiet:
            print(f"== batch priors for {class_prompt!r} ({', '.join(s.subject_id for s in group)})",
                  flush=True)
        try:
            summary = run_pipeline(group[0].cfg, stages=["prior"], local=local, quiet=True)
            row = summary["stages"][0]  # a skipped stage reports its earlier run's outputs
            generated = row["outputs"].get("images_generated", 0) if row["status"] == "ran" else 0
        except Exception as exc:
            for s in group:
                fail(s, f"prior images for {class_prompt!r}: {error_line(exc)}")
            generated = 0
        priors.append({"key": key, "class_prompt": class_prompt, "subjects": [s.subject_id for s in group],
                       "images_generated": generated})

    def done(s: BatchSubject, result: dict[str, Any]) -> None:
        if "error" in result:
            outcomes[s.subject_id] = SubjectOutcome(s.subject_id, "failed", result["seconds"],
                                                    error=result["error"])
        else:
            outcomes[s.subject_id] = _outcome(s.subject_id, result["summary"], result["seconds"])
        if not quiet:
            print(f"== batch subject {s.subject_id}: {outcomes[s.subject_id].status}", flush=True)

    _run_trainings([s for s in subjects if s.cfg is not None], local, max_concurrent, done)  # 3.
    rows = [outcomes[s.subject_id] for s in subjects]
    if not quiet:
        print(format_batch_summary(rows), flush=True)
    return {"subjects": [asdict(r) | {"seconds": round(r.seconds, 2)} for r in rows], "priors": priors,
            "failed": sum(r.status == "failed" for r in rows)}


def format_batch_summary(rows: list[SubjectOutcome]) -> str:
    """The table printed at the end of a batch: one line per subject."""
    table = [("subject", "status", "seconds", "version", "error")]
    table += [(r.subject_id, r.status, f"{r.seconds:.1f}", r.version or "-",
               (r.error or "").splitlines()[0] if r.error else "") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4] for row in table]
    return "\n".join(["batch summary:", *lines])
