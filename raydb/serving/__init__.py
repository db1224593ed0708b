"""Serving: registered subjects over HTTP on Ray Serve (the last stage of the pipeline).

``build_application(cfg)`` wires the two deployments (see :mod:`raydb.serving.deployments`);
``raydb.serving.app:build_app`` exposes it to ``serve run`` / ``serve deploy``, and
``raydb serve --config …`` calls :func:`run_server`. The API, auth and error codes are documented
in docs/serving.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from raydb.config import RaydbConfig

__all__ = ["build_application", "deploy", "run_server", "console_url"]

logger = logging.getLogger(__name__)

INGRESS_HEADROOM = 32  # Serve slots of the ingress beyond serve.ingress_max_requests (see build_application)


def _warn_if_open(cfg: RaydbConfig) -> None:
    if cfg.serve.auth == "none":
        logger.warning("serve.auth is 'none': the API is open and every caller sees every tenant's "
                       "subjects. Use it only on a trusted local machine.")


def console_url(cfg: RaydbConfig) -> str:
    """Where the web console of a deployment with this config answers (docs/console.md)."""
    return f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}/ui/"


def build_application(cfg: RaydbConfig) -> Any:
    """The Serve application (``Application``): ingress -> diffusion replicas, sized from ``cfg.serve``."""
    from raydb.serving.auth import with_env_keys
    from raydb.serving.deployments import DiffusionDeployment, IngressDeployment

    _warn_if_open(cfg)
    sc = cfg.serve
    config = with_env_keys(cfg).to_dict()  # keys are read here, once; replicas get digests only
    diffusion = DiffusionDeployment.options(
        num_replicas=sc.num_replicas, max_ongoing_requests=sc.max_ongoing_requests,
        max_queued_requests=sc.max_queued_requests,
        ray_actor_options={"num_cpus": sc.num_cpus_per_replica, "num_gpus": sc.num_gpus_per_replica},
    ).bind(config)
    # The ingress only awaits the diffusion replicas, so it may hold many requests at once. Its gate
    # answers those beyond serve.ingress_max_requests with a JSON 503 at once (raydb/serving/gate.py);
    # the headroom lets them (and /healthz) reach it rather than wait in Serve's queue, which is
    # bounded too (Serve's own 503 beyond serve.ingress_max_queued).
    ingress = IngressDeployment.options(
        max_ongoing_requests=sc.ingress_max_requests + INGRESS_HEADROOM,
        max_queued_requests=sc.ingress_max_queued,
        ray_actor_options={"num_cpus": 0.1},
    )
    return ingress.bind(config, diffusion)


def deploy(cfg: RaydbConfig) -> Any:
    """Start Serve's HTTP proxy on ``serve.host:serve.port`` and run the app; returns the ingress handle.

    Joins the Ray cluster at ``cluster.address`` (or starts a local one) when Ray is not initialised.
    ConfigError, before anything is deployed, when Serve already runs with its proxy elsewhere
    (:mod:`raydb.serving.proxy`).
    """
    from ray import serve

    from raydb.cluster import init_ray
    from raydb.serving.proxy import check_open_proxy, check_same_proxy, running_proxy

    init_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    proxy = running_proxy()  # a running proxy ignores new options: say so instead of serving elsewhere
    check_same_proxy(cfg.serve, proxy)
    check_open_proxy(cfg.serve, proxy)
    return serve.run(build_application(cfg), name=cfg.serve.app_name,
                     route_prefix=cfg.serve.route_prefix, blocking=False)


def run_server(cfg: RaydbConfig, *, blocking: bool = True) -> Any:
    """``raydb serve``: deploy and print the address; with ``blocking``, wait for Ctrl-C and then shut
    Serve down, else return the ingress handle at once."""
    from ray import serve

    handle = deploy(cfg)
    prefix = cfg.serve.route_prefix.rstrip("/")
    logger.info("raydb serving on http://%s:%s%s/v1/generate (health: %s/healthz%s)", cfg.serve.host,
                cfg.serve.port, prefix, prefix, "; Ctrl-C stops" if blocking else "")
    if cfg.serve.console_enabled:
        logger.info("web console: %s", console_url(cfg))
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
