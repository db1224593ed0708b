"""The whole pipeline as one job: priors -> encode -> train (or tune) -> register -> deploy.

``run_pipeline`` calls each stage's own raydb function in order; every CLI verb that runs a stage
(``raydb prior``, ``encode``, ``train``, ``tune``, ``pipeline``) goes through it, so manifests and
skipping behave the same whichever verb ran a stage. It needs a running Ray cluster unless
``local`` (``raydb.cluster.init_ray``, called by the entry points). Before a stage runs it hashes the
config fields the stage depends on (its *inputs*, which include its upstream stages' inputs, since
their outputs are a function of them) and reads
``<workspace>/tenants/<tenant>/pipeline/<subject>/<stage>.json``. When that manifest records the same
hash and the outputs it lists still exist, the stage is skipped and its recorded outputs are handed
on; otherwise the stage runs and its manifest is written only after it succeeded, so a crash leaves
the stage to be redone. The stage functions also skip their own finished work (prior blocks, the
encoded cache, a finished run), so a rerun after a crash inside a stage is cheap as well.

The run ends with a table (stage, skipped or ran, seconds, key outputs), ``summary.json`` beside the
manifests, and the summary dict that the CLI prints as its final JSON line.

Instance photos and class images enter the hashes by content (sha256 locally, the ETag on S3);
the base model by its config (``model.pretrained``, ``model.revision``), not its bytes.

The pipeline is raydb's only registrar: the train and tune stages return a finished adapter (the
search: its best trial's), and only the ``register`` stage puts it in the registry (with the
search's hyperparameters and scores, and the exports of ``export_formats``), under the subject's
own tenant (subject ids are per tenant: ``(subject.tenant, subject.id)`` names it, and there is
nothing to claim). A caller that runs the stages in two calls — the
training service's job: ``prior, encode, train`` then, once the outcome is claimed, ``register`` —
can therefore cancel in between and be sure nothing was registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from raydb.config import RaydbConfig
from raydb.storage import NotFound, Storage, is_s3, join

__all__ = ["STAGES", "StageResult", "run_pipeline", "inputs_key", "manifest_matches", "run_stage",
           "stage_inputs", "format_summary", "pipeline_uri", "cluster_is_joined", "search_metadata"]

log = logging.getLogger(__name__)

STAGES = ("prior", "encode", "train", "tune", "register", "serve")


@dataclass
class StageResult:
    """One row of the summary. ``status``: ``ran``, ``skipped`` (manifest matched) or ``off``
    (not needed: prior preservation off or class images given; encode under ``local``)."""

    stage: str
    status: Literal["ran", "skipped", "off"]
    seconds: float
    outputs: dict[str, Any] = field(default_factory=dict)


# -- manifests (pure; no Ray) ------------------------------------------------------------------

def inputs_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def manifest_matches(manifest: dict[str, Any] | None, key: str) -> bool:
    """A manifest matches when it is complete and records the same inputs hash."""
    return bool(manifest) and manifest.get("inputs_key") == key and "outputs" in manifest


def pipeline_uri(cfg: RaydbConfig) -> str:
    """The subject's manifests, under its tenant's folder (``tenants/<tenant>/pipeline/<subject>``)."""
    from raydb.registry import tenant_uri

    return join(tenant_uri(cfg.workspace, cfg.subject.tenant), "pipeline", cfg.subject.id)


def run_stage(
    storage: Storage, manifest_uri: str, stage: str, inputs: dict[str, Any],
    run: Callable[[], dict[str, Any]], outputs_exist: Callable[[dict[str, Any]], bool],
) -> StageResult:
    """Skip ``stage`` when its manifest matches ``inputs`` and ``outputs_exist(outputs)``; else run it.

    ``run`` returns the stage's outputs (JSON-able); they are recorded with the inputs after it
    returned, so a stage that raises leaves any older manifest untouched and is redone next time.
    """
    start = time.perf_counter()
    key = inputs_key(inputs)
    manifest = storage.read_json_or(manifest_uri)
    if manifest_matches(manifest, key) and outputs_exist(manifest["outputs"]):
        return StageResult(stage, "skipped", time.perf_counter() - start, manifest["outputs"])
    outputs = run()
    seconds = time.perf_counter() - start
    storage.write_json(manifest_uri, {
        "stage": stage, "inputs_key": key, "inputs": inputs, "outputs": outputs,
        "seconds": round(seconds, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return StageResult(stage, "ran", seconds, outputs)


def _data_fingerprint(storage: Storage, uri: str | None) -> Any:
    """Identity of a folder of images: file names with content ids (sha256 locally, ETags on
    S3), so replacing a photo under the same name re-runs the stages that read it."""
    if not uri or uri.startswith("builtin:"):
        return uri
    if not is_s3(uri) and not Path(uri).is_dir():
        return uri
    return storage.content_ids(uri)


# Keys added to the tune / eval sections after searches were recorded, with the value that means
# "as before": left out of the tune stage's key at that value, so an older search's manifest still
# matches (and a finished search is not rerun) until one of them is actually set.
_LATER_TUNE_KEYS = {"prior_mode": None}
_LATER_EVAL_KEYS: dict[str, Any] = {}


def _without_later_defaults(section: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in later or v != later[k]}


def stage_inputs(cfg: RaydbConfig, storage: Storage, stage: str) -> dict[str, Any]:
    """The config fields ``stage`` depends on, cumulative over its upstream stages."""
    from raydb.prior.stage import prior_total_images
    from raydb.train.rundir import run_id

    c = cfg.to_dict()
    model = {k: c["model"][k] for k in ("pretrained", "revision", "prediction_type")}
    prior = {"model": model, "class_prompt": cfg.subject.class_prompt, "resolution": cfg.train.resolution,
             "prior": {k: v for k, v in c["prior"].items() if k not in ("concurrency", "mode")},
             "class_data": _data_fingerprint(storage, cfg.prior.class_data)}
    if cfg.prior_modes() != ["images"]:  # absent in image mode, so older manifests still match
        prior |= {"modes": cfg.prior_modes(), "images": prior_total_images(cfg)}
    if stage == "prior":
        return prior
    encode = prior | {
        "instance_data": _data_fingerprint(storage, cfg.subject.instance_data),
        "instance_prompt": cfg.subject.instance_prompt,
        "crop_flip": [cfg.train.center_crop, cfg.train.random_flip],
    }
    if stage == "encode":
        return encode
    # run_id hashes model, subject, prior, lora, train and the worker count.
    train = encode | {"run_id": run_id(cfg)}
    if stage == "train":
        return train
    tune = train | {"tune": c["tune"] and _without_later_defaults(c["tune"], _LATER_TUNE_KEYS),
                    "eval": _without_later_defaults(c["eval"], _LATER_EVAL_KEYS)}
    if stage == "tune":
        return tune
    if stage == "register":
        keyed = tune if cfg.tune is not None else train
        # exports are registration outputs too; absent when none, so older manifests still match
        return keyed | ({"export_formats": c["export_formats"]} if cfg.export_formats else {})
    if stage == "serve":
        return {"serve": _serve_config(cfg).to_dict()["serve"], "model": model, "workspace": cfg.workspace,
                "address": _ray_address()}
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


# -- the stages --------------------------------------------------------------------------------

def cluster_is_joined(cfg: RaydbConfig) -> bool:
    """True when we run against an existing cluster (``ray job submit``, RAY_ADDRESS, cluster.address)."""
    return bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def _ray_address() -> str | None:
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


def _serve_config(cfg: RaydbConfig) -> RaydbConfig:
    from raydb.serving.auth import with_env_keys  # env keys become digests: the hash never holds a key

    return with_env_keys(cfg)


def _exists_all(storage: Storage, *uris: str) -> bool:
    return all(storage.exists(u) for u in uris)


def _prior(cfg: RaydbConfig, storage: Storage, local: bool) -> dict[str, Any]:
    from raydb.prior import ensure_prior_images

    stats = ensure_prior_images(cfg, storage, use_ray=not local)
    return {"cache_uri": stats.cache_uri, "key": stats.key, "images": stats.requested,
            "images_generated": stats.images_generated}


def _prior_exists(storage: Storage, cfg: RaydbConfig, out: dict[str, Any], local: bool) -> bool:
    from raydb.prior.stage import resolve_prior_cache

    cache = resolve_prior_cache(cfg, storage, use_ray=not local)
    return cache.uri == out.get("cache_uri") and not cache.missing_blocks(storage, out["images"])


def _encode(cfg: RaydbConfig, storage: Storage) -> dict[str, Any]:
    from raydb.encode.stage import prepare_encoded

    # a search's validation also scores the held-out class images: encoded here, the tune stage
    # finds this cache instead of encoding everything again with them
    cache, ran = prepare_encoded(cfg, storage, with_holdout=cfg.tune is not None)
    return dict(cache.__dict__) | {"reused": not ran}


def _train(cfg: RaydbConfig, storage: Storage, local: bool, restart: bool) -> dict[str, Any]:
    if local:
        from raydb.train.local import train_subject

        result = train_subject(cfg, storage, resume=not restart)
    else:
        from raydb.train.stage import train_distributed

        result = train_distributed(cfg, storage, resume=not restart)
    return {k: result.get(k) for k in ("adapter_uri", "run_dir", "steps", "images_per_s", "loss")} | {
        "reused": bool(result.get("skipped"))}


def _tune(cfg: RaydbConfig, storage: Storage) -> dict[str, Any]:
    from raydb.tune import run_tune  # imported here: the search is optional and pulls in Ray Tune

    result = run_tune(cfg, storage)
    best = result["best"]
    return {"adapter_uri": join(best["run_dir"], "adapter"), "run_dir": best.get("run_dir"), "best": best,
            "results_csv": result.get("results_csv"), "plot": result.get("plot")}


def _adapter_exists(storage: Storage, out: dict[str, Any]) -> bool:
    from raydb.registry import ADAPTER_FILES

    return _exists_all(storage, *(join(out["adapter_uri"], f) for f in ADAPTER_FILES))


def search_metadata(cfg: RaydbConfig, tuned: dict[str, Any]) -> dict[str, Any] | None:
    """What a search adds to the registered adapter.json: the best trial's hyperparameters and
    validation scores (the one ``tune.metric`` ranked by among them), and where its results table
    is (None for a plain training)."""
    best = tuned.get("best")
    if not best:
        return None
    hyper = {k: best[k] for k in ("prior_mode", "prior_loss_weight", "learning_rate")}
    metric = cfg.tune.metric if cfg.tune is not None else "val_score"
    val = {k: best.get(k) for k in dict.fromkeys(("val_instance", "val_prior", "val_score", metric))}
    return {"tune": {"hyperparameters": hyper, "validation": val, "results_csv": tuned.get("results_csv")}}


def _register(cfg: RaydbConfig, storage: Storage, trained: dict[str, Any]) -> dict[str, Any]:
    from raydb.registry import register_adapter

    # Idempotent: the same weights (and search metadata) as a registered version keep that version.
    adapter_uri = trained["adapter_uri"]
    record = register_adapter(storage, cfg.workspace, cfg.subject.tenant, cfg.subject.id, adapter_uri,
                              extra_metadata=search_metadata(cfg, trained))
    out = {"uri": record["uri"], "version": record["version"], "adapter_uri": adapter_uri}
    if cfg.export_formats:
        from raydb.export import export_version

        out["exports"] = {fmt: export_version(storage, cfg, cfg.subject.id, record["version"], fmt=fmt)["uri"]
                          for fmt in cfg.export_formats}
    return out


def _register_current(storage: Storage, cfg: RaydbConfig, out: dict[str, Any]) -> bool:
    from raydb.registry import latest_version

    try:
        return latest_version(storage, cfg.workspace, cfg.subject.tenant, cfg.subject.id)["version"] \
            == out.get("version")
    except NotFound:
        return False


def _serve(cfg: RaydbConfig) -> dict[str, Any]:
    from raydb.serving import deploy

    deploy(cfg)
    prefix = cfg.serve.route_prefix.rstrip("/")
    return {"url": f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}/v1/generate",
            "app": cfg.serve.app_name}


def _serve_running(cfg: RaydbConfig) -> bool:
    from ray import serve

    try:
        app = serve.status().applications.get(cfg.serve.app_name)
    except Exception:  # Serve not started on this cluster
        return False
    return app is not None and str(app.status).endswith("RUNNING")


# -- the pipeline ------------------------------------------------------------------------------

def _selected(cfg: RaydbConfig, deploy: bool, stages: list[str] | None) -> list[str]:
    order = ["prior", "encode", "tune" if cfg.tune is not None else "train", "register"]
    order += ["serve"] if deploy else []
    if stages is None:
        return order
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected some of {', '.join(STAGES)}")
    if "tune" in stages and cfg.tune is None:
        raise ValueError("stage 'tune' needs a tune: section in the config")
    return [s for s in STAGES if s in stages]


def run_pipeline(cfg: RaydbConfig, storage: Storage | None = None, *, deploy: bool = False,
                 stages: list[str] | None = None, quiet: bool = False, local: bool = False,
                 restart: bool = False, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or skip) each stage in order; returns ``{subject, stages: [...], adapter_uri, registered,
    url, summary_uri}`` (plus ``run_dir``, ``steps``, ``images_per_s`` when a train stage ran).

    ``stages`` picks a subset (each stage's function fetches what it needs). ``local`` runs in this
    process without Ray: priors in-process, no separate encode stage (the trainer encodes), the
    single-process trainer. ``restart`` trains the run again from scratch. ``on_stage(name)`` is
    called as each stage starts (the training service records the current stage with it).
    """
    storage = storage or Storage(cfg.s3_endpoint_url)
    selected = _selected(cfg, deploy, stages)
    if "register" in selected:  # a registry of one global namespace moves to per-tenant names first
        from raydb.registry import migrate_registry

        migrate_registry(storage, cfg.workspace)
    base = pipeline_uri(cfg)
    results: list[StageResult] = []
    outputs: dict[str, dict[str, Any]] = {}
    from raydb.prior.stage import prior_total_images

    prior_off = not prior_total_images(cfg)  # off, class images given, or model mode needing none

    def stage(name: str, run: Callable[[], dict[str, Any]], exists: Callable[[dict], bool]) -> None:
        if not quiet:
            log.info("== pipeline stage %s", name)
        if on_stage is not None:
            on_stage(name)
        res = run_stage(storage, join(base, f"{name}.json"), name, stage_inputs(cfg, storage, name),
                        run, exists)
        outputs[name] = res.outputs
        results.append(res)

    for name in selected:
        if name == "prior":
            if prior_off:
                results.append(StageResult("prior", "off", 0.0, {"class_data": cfg.prior.class_data,
                                                                 "mode": cfg.prior.mode}))
                continue
            stage("prior", lambda: _prior(cfg, storage, local),
                  lambda o: _prior_exists(storage, cfg, o, local))
        elif name == "encode":
            if local:
                results.append(StageResult("encode", "off", 0.0, {"local": True}))
                continue
            stage("encode", lambda: _encode(cfg, storage),
                  lambda o: storage.exists(join(o["uri"], "manifest.json")))
        elif name in ("train", "tune"):
            if name == "train":
                stage(name, lambda: _train(cfg, storage, local, restart),  # a restart always trains
                      lambda o: not restart and _adapter_exists(storage, o))
            else:
                stage(name, lambda: _tune(cfg, storage), lambda o: _adapter_exists(storage, o))
        elif name == "register":
            trained = outputs.get("tune") or outputs.get("train") or _recorded(storage, cfg)
            stage("register", lambda t=trained: _register(cfg, storage, t),
                  lambda o, t=trained: o.get("adapter_uri") == t["adapter_uri"]
                  and _register_current(storage, cfg, o))
        elif name == "serve":
            stage("serve", lambda: _serve(cfg), lambda o: _serve_running(cfg))
    summary = {
        "subject": cfg.subject.id,
        "stages": [asdict(r) | {"seconds": round(r.seconds, 2)} for r in results],
        "adapter_uri": (outputs.get("tune") or outputs.get("train") or {}).get("adapter_uri"),
        "registered": outputs.get("register", {}).get("uri"),
        "url": outputs.get("serve", {}).get("url"),
        "summary_uri": join(base, "summary.json"),
    }
    trained = outputs.get("train") or {}
    summary |= {k: trained[k] for k in ("run_dir", "steps", "images_per_s") if k in trained}
    storage.write_json(summary["summary_uri"], summary)
    if not quiet:
        log.info("%s", format_summary(results))
    return summary


def _recorded(storage: Storage, cfg: RaydbConfig) -> dict[str, Any]:
    """The adapter of the last train/tune stage of this config (``register`` run on its own)."""
    name = "tune" if cfg.tune is not None else "train"
    manifest = storage.read_json_or(join(pipeline_uri(cfg), f"{name}.json"))
    if not manifest_matches(manifest, inputs_key(stage_inputs(cfg, storage, name))):
        raise ValueError(f"register: no finished {name} stage for this config; run it first "
                         f"(raydb pipeline --stages {name})")
    return manifest["outputs"]


def _key_outputs(res: StageResult) -> str:
    o = res.outputs
    picks = {
        "prior": lambda: f"{o.get('images')} images in {o.get('cache_uri')}",
        "encode": lambda: f"{o.get('num_instance')} instance + {o.get('num_class')} class in {o.get('uri')}",
        "train": lambda: f"{o.get('steps')} steps -> {o.get('adapter_uri')}",
        "tune": lambda: f"best trial {o.get('best', {}).get('trial')} -> {o.get('results_csv')}",
        "register": lambda: f"{o.get('version')} at {o.get('uri')}",
        "serve": lambda: f"{o.get('url')}",
    }
    if res.status == "off":
        if res.stage == "encode":
            return "encoded by the single-process trainer"
        if o.get("class_data"):
            return f"class images from {o['class_data']}"
        return "prior from the base model (no class images)" if o.get("mode") == "model" else \
            "prior preservation off"
    text = picks[res.stage]()
    return text + (" (found finished)" if o.get("reused") and res.status == "ran" else "")


def format_summary(results: list[StageResult]) -> str:
    """The per-stage table printed at the end of a pipeline run."""
    rows = [("stage", "status", "seconds", "outputs")]
    rows += [(r.stage, r.status, f"{r.seconds:.1f}", _key_outputs(r)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] for row in rows]
    return "\n".join(["pipeline summary:", *lines])
