"""raydb's own Prometheus series, recorded through Ray's metrics API.

Ray exports every series a process records to the Prometheus endpoint of its node's metrics agent
(``ray start --metrics-export-port``; ``ray.nodes()[i]["MetricsExportPort"]``), with a ``ray_``
prefix: ``raydb_http_requests_total`` is scraped as ``ray_raydb_http_requests_total``. Inside Serve
replicas the series go through :mod:`ray.serve.metrics`, which adds the ``deployment``,
``replica`` and ``application`` tags; elsewhere (Train workers, the training queue) through
:mod:`ray.util.metrics`. Without Ray (unit tests, ``--local`` runs) recording is a no-op.

:data:`SERIES` is the one list of them: docs/operations.md documents each (a test checks), and
each is made on first use in a process, since Ray metrics live in the process that records them.
Tag values are bounded sets: tenants come from the configured API keys, routes are route
templates (never raw paths), reasons and outcomes are fixed words.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["SERIES", "Series", "record", "observe_train_step", "LATENCY_BOUNDARIES_S"]

# Seconds: a health check is milliseconds, a generation on a GPU one to ten seconds, on a CPU or
# behind a cold adapter load up to minutes.
LATENCY_BOUNDARIES_S = [0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120]
_BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
_WAIT_BOUNDARIES_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
_LOAD_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_STEP_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@dataclass(frozen=True)
class Series:
    """One series: its kind (counter, gauge, histogram), what it counts, its tags, where recorded."""

    kind: str
    description: str
    tags: tuple[str, ...]
    where: str  # "serve" (a Serve replica) or "ray" (any Ray process)
    boundaries: tuple[float, ...] = ()


SERIES: dict[str, Series] = {
    # -- the HTTP API (the ingress replica) ----------------------------------------------------
    "raydb_http_requests_total": Series(
        "counter", "HTTP requests answered, by tenant (unknown before authentication), route "
        "template, method and status code", ("tenant", "route", "method", "status"), "serve"),
    "raydb_http_request_seconds": Series(
        "histogram", "Time from a request's arrival at the ingress to its answer", ("tenant", "route"),
        "serve", tuple(LATENCY_BOUNDARIES_S)),
    "raydb_http_rejections_total": Series(
        "counter", "Requests refused for want of capacity (429, or 503 with a reason), by tenant, route "
        "and reason (rate, concurrency, uploads, ingress, image_workers, trainings, backpressure)",
        ("tenant", "route", "reason"), "serve"),
    # -- generation (the diffusion replicas) ---------------------------------------------------
    "raydb_batch_size": Series(
        "histogram", "Requests generated together in one batch", ("subject_count",), "serve",
        tuple(_BATCH_BOUNDARIES)),
    "raydb_batch_queue_wait_seconds": Series(
        "histogram", "Time a request waited in the batch queue before its batch started", (), "serve",
        tuple(_WAIT_BOUNDARIES_S)),
    "raydb_adapter_loads_total": Series(
        "counter", "Adapter loads into a replica's slots, by result (loaded, failed)", ("result",), "serve"),
    "raydb_adapter_load_seconds": Series(
        "histogram", "Time to fetch, check and load one adapter into a slot", (), "serve",
        tuple(_LOAD_BOUNDARIES_S)),
    "raydb_adapter_evictions_total": Series(
        "counter", "Adapters evicted from a replica's slots to make room (least recently used)", (), "serve"),
    "raydb_adapter_slots": Series(
        "gauge", "Adapter slots of a replica, by state (occupied, total)", ("state",), "serve"),
    # -- trainings (the training queue) --------------------------------------------------------
    "raydb_trainings": Series(
        "gauge", "Trainings in the queue, by state (queued, running)", ("state",), "ray"),
    "raydb_trainings_finished_total": Series(
        "counter", "Trainings that ended, by outcome (succeeded, failed, cancelled)", ("outcome",), "ray"),
    # -- training (rank 0 of a Ray Train run) --------------------------------------------------
    "raydb_train_step_seconds": Series(
        "histogram", "Wall time of one optimizer step (all workers)", ("subject",), "ray",
        tuple(_STEP_BOUNDARIES_S)),
    "raydb_train_images_per_second": Series(
        "gauge", "Training throughput of the last step, summed over workers", ("subject",), "ray"),
}

_made: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(name: str) -> Any:
    """The process's metric object for ``name``, made on first use."""
    with _lock:
        if name not in _made:
            spec = SERIES[name]
            if spec.where == "serve":
                from ray.serve import metrics as api
            else:
                from ray.util import metrics as api
            kinds = {"counter": api.Counter, "gauge": api.Gauge, "histogram": api.Histogram}
            kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
            if spec.kind == "histogram":
                kwargs["boundaries"] = list(spec.boundaries)
            _made[name] = kinds[spec.kind](name, **kwargs)
        return _made[name]


def record(name: str, value: float = 1.0, **tags: str) -> None:
    """Add to a counter, set a gauge or observe a histogram: ``record("raydb_adapter_loads_total",
    result="loaded")``. Tags must be exactly the series' tag keys (a typo is an error, not a new
    series). Never raises for a metrics backend problem: a lost sample must not fail a request."""
    spec = SERIES[name]
    if set(tags) != set(spec.tags):
        raise ValueError(f"{name}: tags {sorted(tags)} != {sorted(spec.tags)}")
    metric = _metric(name)
    values = {k: str(v) for k, v in tags.items()}
    try:
        if spec.kind == "counter":
            metric.inc(value, tags=values)
        elif spec.kind == "gauge":
            metric.set(value, tags=values)
        else:
            metric.observe(value, tags=values)
    except Exception:  # noqa: BLE001 - metrics are best effort by design
        pass


def observe_train_step(subject: str, step_metrics: dict[str, Any]) -> None:
    """Rank 0 of a training run, after each optimizer step (``seconds``, ``images_per_s``)."""
    if step_metrics.get("seconds") is not None:
        record("raydb_train_step_seconds", float(step_metrics["seconds"]), subject=subject)
    if step_metrics.get("images_per_s") is not None:
        record("raydb_train_images_per_second", float(step_metrics["images_per_s"]), subject=subject)
