"""Joining or starting a Ray cluster, the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os

from raydb.config import RaydbConfig

__all__ = ["init_ray"]


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

    if ray.is_initialized():
        return ray
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false"}
    address = (cfg.cluster.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return ray
    cpus = num_cpus or max(8, 2 * (os.cpu_count() or 1))
    ray.init(num_cpus=cpus, include_dashboard=dashboard, runtime_env={"env_vars": env},
             log_to_driver=False)
    return ray
