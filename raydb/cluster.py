"""Joining or starting a Ray cluster, the same way from the CLI, jobs and tests; free ports for the
servers raydb starts (the GCS, Serve's HTTP proxy) and for tests."""

from __future__ import annotations

import os

from raydb.config import RaydbConfig

__all__ = ["init_ray", "start_local_ray", "free_port", "free_ports"]


def free_ports(count: int, host: str = "") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` ("": every interface) right now. The sockets are
    held until all are chosen, so the ports differ; another process may still take one before its
    server binds it."""
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port(host: str = "") -> int:
    """One TCP port free on ``host`` (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


def start_local_ray(num_cpus: int, *, dashboard: bool = True, env: dict[str, str] | None = None,
                    log_to_driver: bool = False, logging_level: int = 20):
    """Start a local cluster whose processes all know its address.

    Ray's state API (which Train uses to clean up placement groups) auto-detects the cluster; with
    more than one Ray instance on a machine (a ``ray start`` cluster beside a test session, two
    users) that fails with "Found multiple active Ray instances". So the GCS port is chosen up
    front and ``RAY_ADDRESS`` is given to every worker through the job's runtime env.
    """
    import ray
    from ray.util import get_node_ip_address

    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    address = f"{get_node_ip_address()}:{port}"
    env = dict(env or {}) | {"RAY_ADDRESS": address}
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env={"env_vars": env},
                 log_to_driver=log_to_driver, logging_level=logging_level)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    os.environ["RAY_ADDRESS"] = address  # this driver's own state-API calls and subprocesses
    return ray


def init_ray(cfg: RaydbConfig | None = None, *, num_cpus: int | None = None, dashboard: bool = True):
    """Join the cluster running us (``ray job submit``, ``RAY_ADDRESS``, ``cluster.address``) or
    start a local one.

    A local cluster gets more *logical* CPUs than the machine has cores (at least 8): Ray Data
    stages, Train workers and Tune drivers each hold a CPU slot while mostly waiting on each other,
    and on a 2-core laptop they would otherwise starve. The dashboard stays on: Ray Train's
    placement-group cleanup needs the State API it serves (trials stopped early by ASHA otherwise
    leak their placement groups).
    """
    import ray

    from raydb.terminal import filter_known_noise, is_verbose, library_env

    if ray.is_initialized():
        return ray
    if not is_verbose():  # the CLI without --verbose: Ray's INFO lines and known false alarms stay out
        filter_known_noise()
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false"}
    env |= library_env()
    address = (cfg.cluster.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:  # joining: the cluster's (or the submitted job's) runtime env applies as it is
        ray.init(address=address, log_to_driver=True, logging_level=_ray_level())
        return ray
    cpus = num_cpus or max(8, 2 * (os.cpu_count() or 1))
    return start_local_ray(cpus, dashboard=dashboard, env=env, logging_level=_ray_level())


def _ray_level() -> int:
    """Ray's driver logging: INFO (its default) with --verbose or outside the CLI, else WARNING."""
    import logging

    from raydb.terminal import is_verbose

    return logging.INFO if is_verbose() else logging.WARNING
